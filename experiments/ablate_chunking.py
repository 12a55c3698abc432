"""Action-chunking ablation (paper 5.2, Figure 5): VLM+DP success with and without regeneration.

    python experiments/ablate_chunking.py --dp RUN/policy.pt --vlm RUN/export [--episodes 16]
    python experiments/ablate_chunking.py --train [--train-steps 3000]     # train both first (cpu presets)

Variants, all with the same DP (horizon H) and VLM:

  ==============  =====================  ===============  ==========================================
  variant         regenerate_on_keystep  n_action_steps   meaning
  ==============  =====================  ===============  ==========================================
  regenerate      true                   H                a new key-step drops the queued chunk (paper)
  full_chunk      false                  H                the whole chunk is executed blindly
  half_horizon    false                  H / 2            half the horizon executed, without regeneration
  ==============  =====================  ===============  ==========================================

(For "half the prediction horizon" we execute the first H/2 actions of each chunk of the same
DP, rather than train a second DP with horizon H/2.)  Tasks: Pick, PlaceNextTo, PlaceOnTop as in
the paper; seeds are the evaluator's (100000, ...), never the training seeds.

``--train`` generates the data (``make data``) and trains the DP and the VLM on these tasks
with the cpu presets, under ``--out``; existing runs there are resumed, not overwritten.
Writes ``<out>/results.md``, ``results.csv`` and ``success.png`` (bar plot per task and variant).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASKS = ["Pick", "PlaceNextTo", "PlaceOnTop"]


def variants(horizon: int) -> dict[str, dict]:
    return {"regenerate": {"regenerate_on_keystep": True, "n_action_steps": horizon},
            "full_chunk": {"regenerate_on_keystep": False, "n_action_steps": horizon},
            "half_horizon": {"regenerate_on_keystep": False, "n_action_steps": horizon // 2}}


def run(script: str, *args: str) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / script), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def train(out: Path, tasks: list[str], episodes: int, steps: int, vlm_steps: int, image_size: int) -> tuple[str, str]:
    """Data, DP and VLM for ``tasks`` under ``out`` (cpu presets); returns (dp, vlm) paths."""
    data = out / "data"
    run("generate_data.py", f"OUT={data}", f"TASKS={','.join(tasks)}", f"EPISODES={episodes}", "WORKERS=2",
        f"env.image_size={image_size}")
    dp_out, vlm_out = out / "dp", out / "vlm"
    if not (dp_out / "policy.pt").exists():
        run("train_dp.py", f"DATA={data}", f"DATASET={','.join(tasks)}", f"OUT={dp_out}", "RESUME=auto",
            f"trainer.max_steps={steps}", f"model.image_size={image_size}")
    if not (vlm_out / "export").exists():
        run("train_vlm.py", f"DATA={data}", f"DATASET={','.join(tasks)}", f"OUT={vlm_out}", "RESUME=auto",
            f"STEPS={vlm_steps}")
    return str(dp_out / "policy.pt"), str(vlm_out / "export")


def bar_plot(rows: list[dict], tasks: list[str], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next(r["success"] for r in rows if r["variant"] == name and r["task"] == t) for t in tasks]
        ax.bar(np.arange(len(tasks)) + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("success rate")
    ax.set_title("VLM+DP: action-chunk regeneration (paper Fig. 5)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", help="DP checkpoint (.ckpt or policy.pt)")
    ap.add_argument("--vlm", help="VLM export folder")
    ap.add_argument("--train", action="store_true", help="generate data and train the DP and VLM first")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--episodes", type=int, default=16, help="evaluation episodes per task and variant")
    ap.add_argument("--train-episodes", type=int, default=40, help="--train: demonstrations per task")
    ap.add_argument("--train-steps", type=int, default=3000, help="--train: DP optimizer steps")
    ap.add_argument("--vlm-steps", type=int, default=3000, help="--train: VLM optimizer steps")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="outputs/ablate_chunking")
    args = ap.parse_args(argv)

    out = Path(args.out)
    from envs import UnknownTaskError, resolve_tasks

    try:
        tasks = resolve_tasks(args.tasks)
    except UnknownTaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.train:
        dp, vlm = train(out, tasks, args.train_episodes, args.train_steps, args.vlm_steps, args.image_size)
    elif args.dp and args.vlm:
        dp, vlm = args.dp, args.vlm
    else:
        print("error: give --dp and --vlm checkpoints, or --train to train them", file=sys.stderr)
        return 2

    from policies.diffusion_policy import DiffusionPolicy
    from policies.evaluator import evaluate
    from policies.spec import PolicySpec, PolicySpecError

    try:
        horizon = DiffusionPolicy.from_checkpoint(dp).horizon
        specs = {name: PolicySpec("vlm_dp", dp=dp, vlm=vlm, options=opts).validate()
                 for name, opts in variants(horizon).items()}
    except (PolicySpecError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for name, spec in specs.items():
        result = evaluate(spec, tasks, args.episodes, workers=args.workers, image_size=args.image_size,
                          video_episodes=0, progress=True)
        for task, r in result.per_task.items():
            rows.append({"variant": name, "task": task, "success": r.success_rate, "episodes": len(r.episodes),
                         "mean_length": r.mean_length})
        print(f"{name:<14}" + "  ".join(f"{t}={result.per_task[t].success_rate:.2f}" for t in tasks), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = list(specs)
    lines = [f"VLM+DP chunking ablation: DP {dp}, VLM {vlm}, horizon {horizon}, {args.episodes} episodes "
             "per task and variant", "", "| variant | " + " | ".join(tasks) + " | mean |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for name in names:
        vals = [next(r["success"] for r in rows if r["variant"] == name and r["task"] == t) for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    bar_plot(rows, tasks, names, out / "success.png")
    print("\n".join(lines))
    print(f"\nwrote {out}/results.md, results.csv, success.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
