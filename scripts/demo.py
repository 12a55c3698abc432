"""`make demo`: the whole pipeline on the cpu presets, each stage through its own entry point.

Usage: demo.py [TASKS=...] [EPISODES=...] [OUT=...] [key=value ...]   (config: configs/demo.yaml)

1. oracle preview: one episode per task as a PNG grid and captioned MP4s     (<out>/oracle/)
2. oracle data    : scripts/generate_data.py                                  (<out>/data/)
3. code VLM       : scripts/train_vlm.py, cpu preset                          (<out>/vlm/)
4. diffusion pol. : scripts/train_dp.py, cpu preset (state observation), code
                    conditioning, with rollout success curves in TensorBoard  (<out>/dp/)
   3 and 4 run side by side, one core each; the one still training takes the
   freed core (logs in <out>/logs/)
5. evaluation     : scripts/evaluate.py, VLM+DP and VLM+Oracle               (<out>/eval/)

A stage whose result exists is skipped (runs are resumed with RESUME=auto), so an interrupted
demo continues where it stopped.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

from configs import cli_config, run_entry_point

ALIASES = {"TASKS": "tasks", "EPISODES": "episodes", "OUT": "out", "SEED": "seed"}
ROOT = Path(__file__).resolve().parents[1]


def oracle_preview(cfg, tasks: list[str], out: Path) -> int:
    """One oracle episode per task: ``grid.png`` (rows: tasks) and ``<Task>.mp4``; returns failures."""
    import numpy as np

    import envs
    from envs.oracle import run_oracle
    from envs.tabletop import observation_arrays
    from envs.video import caption, grid, write_mp4, write_png

    rows, titles, failures = [], [], 0
    for task in tasks:
        env = envs.make_env(task, image_size=cfg.env.image_size, backend=cfg.env.backend)
        ep = run_oracle(env, int(cfg.seed), record_obs=True)
        frames = [observation_arrays(o) for o in ep.observations]
        write_mp4(out / f"{task}.mp4", [caption(np.concatenate([f["base_rgb"], f["wrist_rgb"]], axis=1),
                                                ("" if s.key_step else "# ") + s.line)
                                        for f, s in zip(frames, ep.steps)])
        picks = np.linspace(0, len(frames) - 1, int(cfg.frames_per_episode)).round().astype(int)
        rows.append([frames[i]["base_rgb"] for i in picks])
        titles.append(f"{task}: {ep.prompt}  [{'success' if ep.success else 'FAIL: ' + ep.failure}]")
        failures += not ep.success
        env.close()
        print(f"{task:<13} {'ok  ' if ep.success else 'FAIL'} {len(ep):4d} steps  "
              f"{len(ep.key_lines)} code lines: {ep.key_lines[0]} ...")
    write_png(out / "grid.png", grid(rows, titles))
    return failures


def _command(script: str, args) -> tuple[list[str], dict]:
    # One intra-op thread per process: the cpu-preset models gain little from more, and
    # oversubscribed OpenMP threads on a busy 2-core machine made training steps 10-100x slower
    # (measured).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return [sys.executable, str(ROOT / "scripts" / script), *args], env


def stage(name: str, script: str, *args: str) -> None:
    print(f"\n=== {name}: {script} {' '.join(args)}", flush=True)
    t0 = time.time()
    cmd, env = _command(script, args)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    print(f"=== {name}: done in {time.time() - t0:.0f} s", flush=True)


def parallel_stages(stages: list[tuple[str, str, list[str]]], logs: Path, cores: int | None = None) -> None:
    """Run independent stages side by side, their output in ``logs/<script>.log``; raises
    CalledProcessError for the first that fails (after all have ended). Each stage gets
    ``threads_file=logs/<script>.threads`` holding its share of the ``cores`` (one each on 2
    cores), raised when another stage ends (``callbacks.threads``: the DP takes the core the VLM
    freed)."""
    logs.mkdir(parents=True, exist_ok=True)
    cores = max(1, int(cores or os.cpu_count() or 1))
    running = []
    t0 = time.time()
    for name, script, args in stages:
        threads = logs / f"{Path(script).stem}.threads"
        threads.write_text(f"{max(1, cores // len(stages))}\n")
        cmd, env = _command(script, [*args, f"threads_file={threads}"])
        log = logs / f"{Path(script).stem}.log"
        print(f"\n=== {name} (in parallel, log {log}): {script} {' '.join(args)}", flush=True)
        running.append((name, cmd, threads, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"),
                                                             stderr=subprocess.STDOUT)))
    failed = None
    while running:
        ended = [r for r in running if r[3].poll() is not None]
        for name, cmd, _, proc in ended:
            rc = proc.returncode
            print(f"=== {name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} after {time.time() - t0:.0f} s",
                  flush=True)
            if rc != 0 and failed is None:
                failed = subprocess.CalledProcessError(rc, cmd)
        running = [r for r in running if r not in ended]
        if ended and running:
            share = max(1, cores // len(running))
            for name, _, threads, _ in running:
                threads.write_text(f"{share}\n")
                print(f"=== {name}: now {share} thread(s)", flush=True)
        time.sleep(0.5 if running else 0)
    if failed is not None:
        raise failed


def main(argv: list[str]) -> int:
    cfg = cli_config("demo", argv, ALIASES)
    import envs

    tasks = envs.cli_tasks(cfg.tasks)
    out = Path(cfg.out)
    size = f"env.image_size={cfg.env.image_size}"
    t_start = time.time()
    print(f"=== oracle preview: {', '.join(tasks)}")
    failures = oracle_preview(cfg, tasks, out / "oracle")
    data, vlm, dp = out / "data", out / "vlm", out / "dp"
    try:
        stage("oracle data", "generate_data.py", f"OUT={data}", f"TASKS={','.join(tasks)}",
              f"EPISODES={cfg.episodes}", f"WORKERS={cfg.workers}", size)
        training = []  # the VLM and the DP are independent: trained side by side, one core each
        if not (vlm / "export").exists():
            training.append(("code VLM", "train_vlm.py", [
                f"DATA={data}", f"DATASET={','.join(tasks)}", f"OUT={vlm}", "RESUME=auto", f"STEPS={cfg.vlm_steps}",
                f"data.code_fraction={cfg.vlm_code_fraction}", "trainer.enable_progress_bar=false"]))
        if not (dp / "policy.pt").exists():
            training.append(("diffusion policy", "train_dp.py", [
                f"DATA={data}", f"DATASET={','.join(tasks)}", f"OUT={dp}", "RESUME=auto",
                f"trainer.max_steps={cfg.dp_steps}", f"trainer.val_check_interval={cfg.dp_val_every}",
                f"model.image_size={cfg.env.image_size}", f"rollout.every_n_val_epochs={cfg.rollout_every}",
                f"rollout.episodes={cfg.rollout_episodes}", "data.num_workers=0", "trainer.enable_progress_bar=false"]))
        if training:
            parallel_stages(training, out / "logs")
        for policy in ("vlm_dp", "vlm_oracle"):
            pacing = [f"QUERY_EVERY_STEP={str(bool(cfg.query_every_step)).lower()}"] if policy == "vlm_dp" else []
            stage(f"evaluate {policy}", "evaluate.py", f"POLICY={policy}", f"DP={dp / 'policy.pt'}",
                  f"VLM={vlm / 'export'}", f"TASKS={','.join(tasks)}", f"EPISODES={cfg.eval_episodes}",
                  f"WORKERS={cfg.workers}", f"OUT={out / 'eval' / policy}", size, *pacing)
    except subprocess.CalledProcessError as e:
        print(f"error: stage failed ({' '.join(map(str, e.cmd[1:]))}, exit {e.returncode})", file=sys.stderr)
        return 1
    print(f"\nmake demo finished in {(time.time() - t_start) / 60:.1f} min. Results:")
    print(f"  oracle preview   {out}/oracle/grid.png and <Task>.mp4 (code line in the caption)")
    for policy in ("vlm_dp", "vlm_oracle"):
        print(f"  {policy:<16} {out}/eval/{policy}/results.md, videos/*.mp4")
    print(f"  TensorBoard      make tensorboard   (logdir outputs/: {dp}/tb has train/loss, val/action_mse and "
          f"rollout/success/*; {vlm}/tb has the VLM metrics)")
    for policy in ("vlm_dp", "vlm_oracle"):
        results = out / "eval" / policy / "results.md"
        if results.exists():
            print(f"\n{policy}:\n{results.read_text()}")
    return 1 if failures else 0


if __name__ == "__main__":
    run_entry_point(main)
