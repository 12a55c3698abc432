"""Environment throughput on one core, base + wrist RGB rendered every step (target >= 40/s).

    python benchmarks/env_throughput.py [--steps 400] [--image-size 128] [--quick]

Steps a PlaceOnTop env with oracle actions (so objects and the arm move as in data
generation), resets excluded, and reports steps/s also for state-only observations
(obs_mode=none) in the same run. Ends with ``steps_per_s=<rgb figure>``.
"""

import argparse
import os
import time

import numpy as np


def measure(task: str, obs_mode: str, image_size: int, steps: int) -> tuple[float, float]:
    import envs
    from envs.oracle import run_oracle

    env = envs.make_env(task, image_size=image_size, obs_mode=obs_mode)
    actions = []
    seed = 0
    while len(actions) < steps:  # record oracle actions first (not timed)
        actions.append(np.array(run_oracle(env, seed).actions))
        seed += 1
    t_step, n, t_reset = 0.0, 0, 0.0
    for seed, acts in enumerate(actions):
        t0 = time.perf_counter()
        env.reset(seed=seed)
        t1 = time.perf_counter()
        for a in acts:
            env.step(a)
        t_step += time.perf_counter() - t1
        t_reset += t1 - t0
        n += len(acts)
    env.close()
    return n / t_step, t_reset / len(actions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--task", default="PlaceOnTop")
    ap.add_argument("--quick", action="store_true", help="150 steps (< 1 minute)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    steps = 150 if args.quick else args.steps
    rgb, rgb_reset = measure(args.task, "rgb", args.image_size, steps)
    state, state_reset = measure(args.task, "none", args.image_size, steps)
    print(f"{'observation':<34}{'steps/s':>9}{'reset s':>9}")
    print(f"{f'base+wrist RGB {args.image_size}x{args.image_size}':<34}{rgb:>9.1f}{rgb_reset:>9.3f}")
    print(f"{'state only (no rendering)':<34}{state:>9.1f}{state_reset:>9.3f}")
    print(f"rendering costs {1000 / rgb - 1000 / state:.1f} ms/step ({state / rgb:.2f}x)")
    print(f"steps_per_s={rgb:.1f}")


if __name__ == "__main__":
    main()
