"""`make demo`: oracle episodes of a few tasks as a PNG grid and captioned MP4s.

Usage: demo.py [TASKS=...] [key=value ...]   (config: configs/demo.yaml)
"""

import sys
import time
from pathlib import Path

import numpy as np

from configs import cli_config

ALIASES = {"TASKS": "tasks", "OUT": "out", "SEED": "seed"}


def main(argv: list[str]) -> int:
    cfg = cli_config("demo", argv, ALIASES)
    import envs
    from envs.oracle import run_oracle
    from envs.tabletop import observation_arrays
    from envs.video import caption, grid, write_mp4, write_png

    tasks = envs.cli_tasks(cfg.tasks)
    out = Path(cfg.out)
    rows, titles, failures = [], [], 0
    for task in tasks:
        t0 = time.time()
        env = envs.make_env(task, image_size=cfg.env.image_size, backend=cfg.env.backend)
        ep = run_oracle(env, int(cfg.seed), record_obs=True)
        frames = [observation_arrays(o) for o in ep.observations]
        video = [caption(np.concatenate([f["base_rgb"], f["wrist_rgb"]], axis=1),
                         ("" if s.key_step else "# ") + s.line) for f, s in zip(frames, ep.steps)]
        write_mp4(out / f"{task}.mp4", video)
        picks = np.linspace(0, len(frames) - 1, int(cfg.frames_per_episode)).round().astype(int)
        rows.append([frames[i]["base_rgb"] for i in picks])
        titles.append(f"{task}: {ep.prompt}  [{'success' if ep.success else 'FAIL: ' + ep.failure}]")
        failures += not ep.success
        env.close()
        print(f"{task:<13} {'ok  ' if ep.success else 'FAIL'} {len(ep):4d} steps  {time.time() - t0:5.1f} s  "
              f"{len(ep.key_lines)} code lines: {ep.key_lines[0]} ...")
    write_png(out / "oracle_grid.png", grid(rows, titles))
    print(f"\nwrote {out}/oracle_grid.png (rows: tasks, columns: time) and {out}/<Task>.mp4 "
          "(base | wrist camera, caption: the running code line)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
