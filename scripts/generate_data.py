"""`make data`: oracle episodes to HDF5.  Usage: generate_data.py [TASKS=..] [EPISODES=..] [key=value ..]

POLICY=vlm_oracle VLM=<export> generates the episodes with VLM+Oracle instead (only successes are
kept; the executed VLM lines are the labels; datamodules/generate.py).
"""

import sys

from configs import cli_config, run_entry_point, to_yaml

ALIASES = {"TASKS": "tasks", "DATASET": "tasks", "EPISODES": "episodes", "SEED_START": "seed_start",
           "WORKERS": "workers", "OUT": "out", "POLICY": "policy", "VLM": "vlm"}


def main(argv: list[str]) -> int:
    cfg = cli_config("data", argv, ALIASES)
    import envs
    from datamodules.generate import generate

    tasks = envs.cli_tasks(cfg.tasks)
    print(to_yaml(cfg))
    manifest = generate(cfg, tasks)
    print(f"\n{'task':<14}{'episodes':>9}{'tried':>7}{'success':>9}  failures")
    for task, info in manifest["tasks"].items():
        print(f"{task:<14}{info['episodes']:>9}{info['seeds_tried']:>7}{info['success_rate']:>9.0%}  "
              f"{info['failure_reasons'] or '-'}")
    print(f"\nwrote {cfg.out}/<Task>.h5 and {cfg.out}/manifest.json")
    incomplete = [t for t, i in manifest["tasks"].items() if "incomplete" in i]
    if incomplete:
        print(f"error: incomplete tasks: {incomplete}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_entry_point(main)
