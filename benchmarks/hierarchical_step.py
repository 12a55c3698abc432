"""Time per control step: VLM+DP (the paper's hierarchical policy) vs the flat DP, cpu presets.

    python benchmarks/hierarchical_step.py [--dp RUN/policy.pt] [--vlm RUN/export] [--steps 60] [--quick]

Both policies act in the same real PlaceOnTop episode (seed 100000, 64 px) for ``--steps``
control steps on one thread; we time ``policy.act`` only (the simulator step is the same for
both). Before that each policy runs one untimed episode of another scene (seed 100001, other
objects), as in an evaluation, where a process has run episodes before: first calls (buffer
allocation, the planner's pixel table) are not counted, while the strings of the timed scene
are still new to the DP's text-encoder cache. VLM+DP queries the VLM at every step (early
stopping, prefix cache and the fast queries of ``policies.vlm_planner``, as in rollouts) and
predicts a DDIM-10 chunk when its queue empties or a new key-step arrives; the flat DP predicts
a chunk every ``n_action_steps`` steps. A third row times VLM+DP with the reference decoding
(one library forward per token, ``VLMPlanner(fast=False)``), for comparison in the same run; a
fourth the paced VLM+DP of the cpu evaluations (``query_every_step=False``: the VLM is asked when
the DP's line ends, not in the paper).
The clock is the thread's CPU time (equal to the wall time on an idle machine with one thread;
on a busy one it leaves out the time other processes hold the core); wall times are printed
too, and the VLM's and the DP's shares of VLM+DP. Without ``--dp`` the latency is taken on a
random-init cpu-preset DP, seeded (the cost of a chunk does not depend on the weights; the actions
do, and through the scene the VLM's key-steps and the chunks they regenerate); without ``--vlm`` it uses
``outputs/demo/vlm/export`` or ``outputs/vlm/cpu/export``, else trains one briefly (as
benchmarks/vlm_early_stop.py does: with ``--quick`` too briefly to mean much).
Ends with ``vlmdp_over_flat=<VLM+DP CPU ms/step / flat DP CPU ms/step>`` (goal <= 1.5).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def fresh_dp(data: Path, path: Path) -> Path:
    import torch
    from omegaconf import OmegaConf

    from configs import load_config
    from datamodules.stats import load_stats
    from lightning_modules.dp.module import DiffusionPolicyModule

    cfg = load_config("dp", ["preset=cpu"])
    torch.manual_seed(0)  # the same random DP in every run: its actions steer the VLM, and so the cost
    module = DiffusionPolicyModule(model={**OmegaConf.to_container(cfg.model), "conditioning": "code"},
                                   n_action_steps=cfg.n_action_steps)
    module.set_stats(load_stats(sorted(data.glob("*.h5"))))
    return module.export_policy(path)


class Clock:
    """CPU (thread) and wall seconds spent in the wrapped methods of an object."""

    def __init__(self, obj, *names):
        self.cpu = self.wall = 0.0
        for name in names:
            if hasattr(obj, name):
                setattr(obj, name, self.wrap(getattr(obj, name)))

    def wrap(self, f):
        def timed(*args, **kwargs):
            c, w = time.thread_time(), time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self.cpu += time.thread_time() - c
                self.wall += time.perf_counter() - w
        return timed


def time_policy(policy, steps: int, image_size: int, seed: int = 100000) -> tuple[list[float], list[float]]:
    """(CPU seconds, wall seconds) of ``policy.act`` at each of ``steps`` steps of PlaceOnTop."""
    import envs
    from envs.tabletop import observation_arrays

    env = envs.make_env("PlaceOnTop", image_size=image_size)
    obs, _ = env.reset(seed=seed)
    policy.attach(env)
    policy.reset("PlaceOnTop", env.prompt())
    cpu, wall = [], []
    for _ in range(steps):
        o = observation_arrays(obs)
        c, w = time.thread_time(), time.perf_counter()
        action = policy.act(o)
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
        obs, *_ = env.step(action)
    env.close()
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", default=None)
    ap.add_argument("--vlm", default=None)
    ap.add_argument("--data", default="data/oracle")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--vlm-train-steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="24 steps, a 30-step VLM if none is found (< 2 min)")
    ap.add_argument("--free-decoding", action="store_true", help="VLM without object-constrained decoding")
    args = ap.parse_args()
    import torch

    from policies.diffusion_policy import DiffusionPolicy
    from policies.flat_dp import FlatDP
    from policies.vlm_dp import VLMDP
    from policies.vlm_planner import VLMPlanner
    from vlm_early_stop import ensure_data, ensure_vlm

    torch.set_num_threads(1)
    steps = 24 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = ensure_data(args.data, ["PlaceOnTop"], tmp)
        vlm = args.vlm or next((p for p in ("outputs/demo/vlm/export", "outputs/vlm/cpu/export") if Path(p).exists()),
                               None)
        vlm = ensure_vlm(vlm, data, 30 if args.quick else args.vlm_train_steps, tmp)
        dp_path = Path(args.dp) if args.dp else fresh_dp(data, Path(tmp) / "dp.pt")
        flat = FlatDP(DiffusionPolicy.from_checkpoint(dp_path))
        policies = {"flat DP": flat}
        clocks = {}
        for name, fast, every_step in (("VLM+DP", True, True), ("VLM+DP reference", False, True),
                                       ("VLM+DP paced", True, False)):
            planner = VLMPlanner.from_pretrained(vlm, constrain_objects=not args.free_decoding, fast=fast)
            policies[name] = VLMDP(planner, DiffusionPolicy.from_checkpoint(dp_path), query_every_step=every_step)
            clocks[name] = (Clock(planner, "step", "next_key_step"),
                            Clock(policies[name].dp, "predict_action_chunk"))
        results = {}
        for name, policy in policies.items():
            time_policy(policy, steps, 64, seed=100001)  # warm-up, untimed (see the docstring)
            for clock in clocks.get(name, ()):
                clock.cpu = clock.wall = 0.0
            results[name] = time_policy(policy, steps, 64)
    print(f"{steps} control steps of PlaceOnTop (seed 100000, 64 px, after one untimed episode of seed 100001), "
          f"1 thread; DP {dp_path if args.dp else 'random-init cpu preset'}, VLM {vlm}")
    print(f"{'policy':<18}{'CPU ms/step':>12}{'median':>8}{'max':>8}{'wall ms/step':>13}{'VLM ms/step':>12}"
          f"{'DP ms/step':>11}{'chunks':>7}")
    for name, (cpu, wall) in results.items():
        vlm_ms, dp_ms = (f"{1e3 * c.cpu / steps:.1f}" for c in clocks[name]) if name in clocks else ("-", "-")
        print(f"{name:<18}{1e3 * statistics.mean(cpu):>12.1f}{1e3 * statistics.median(cpu):>8.1f}"
              f"{1e3 * max(cpu):>8.1f}{1e3 * statistics.mean(wall):>13.1f}{vlm_ms:>12}{dp_ms:>11}"
              f"{policies[name].chunks:>7}")
    flat_cpu = statistics.mean(results["flat DP"][0])
    print(f"wall-time ratio {statistics.mean(results['VLM+DP'][1]) / statistics.mean(results['flat DP'][1]):.2f}; "
          f"reference decoding {statistics.mean(results['VLM+DP reference'][0]) / flat_cpu:.2f}; "
          f"paced (the cpu evaluations' QUERY_EVERY_STEP=false) {statistics.mean(results['VLM+DP paced'][0]) / flat_cpu:.2f}")
    print(f"vlmdp_over_flat={statistics.mean(results['VLM+DP'][0]) / flat_cpu:.2f}")


if __name__ == "__main__":
    main()
