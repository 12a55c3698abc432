"""Oracle success per task over seeds 0..N-1 (target: >= 95 % on every task).

    python benchmarks/oracle_success.py [--seeds 20] [--tasks all] [--quick]

Prints a table and ends with ``min_success=<fraction>`` (the worst task).
"""

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--tasks", default="all", help="level, task or comma list (default: all)")
    ap.add_argument("--quick", action="store_true", help="3 seeds per task (< 2 minutes)")
    args = ap.parse_args()
    import envs
    from envs.oracle import run_oracle

    seeds = 3 if args.quick else args.seeds
    print(f"{'task':<14}{'level':<10}{'success':>9}{'steps':>8}{'lines':>7}{'s/ep':>7}  failures")
    worst = 1.0
    for task in envs.resolve_tasks(args.tasks):
        env = envs.make_env(task, obs_mode="none")
        results, t0 = [], time.time()
        for seed in range(seeds):
            results.append(run_oracle(env, seed))
        env.close()
        rate = float(np.mean([r.success for r in results]))
        worst = min(worst, rate)
        fails = {}
        for r in results:
            if not r.success:
                fails[r.failure] = fails.get(r.failure, []) + [r.seed]
        print(f"{task:<14}{envs.TASKS[task].level:<10}{rate:>9.0%}{np.mean([len(r) for r in results]):>8.0f}"
              f"{np.mean([len(r.key_lines) for r in results]):>7.1f}{(time.time() - t0) / seeds:>7.2f}  "
              f"{fails or '-'}")
    print(f"min_success={worst:.3f}")


if __name__ == "__main__":
    main()
