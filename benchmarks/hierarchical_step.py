"""Time per control step: VLM+DP (the paper's hierarchical policy) vs the flat DP, cpu presets.

    python benchmarks/hierarchical_step.py [--dp RUN/policy.pt] [--vlm RUN/export] [--steps 60] [--quick]

Both policies act in the same real PlaceOnTop episode (seed 100000, 64 px) for ``--steps``
control steps on one thread; we time ``policy.act`` only (the simulator step is the same for
both). VLM+DP queries the VLM at every step (early stopping and prefix cache on, as in
rollouts) and predicts a DDIM-10 chunk when its queue empties or a new key-step arrives; the
flat DP predicts a chunk every ``n_action_steps`` steps. Without ``--dp`` the latency is taken
on a random-init cpu-preset DP (the cost does not depend on the weights); without ``--vlm`` it
uses ``outputs/demo/vlm/export`` or ``outputs/vlm/cpu/export``, else trains one briefly (as
benchmarks/vlm_early_stop.py does: with ``--quick`` too briefly to mean much).
Ends with ``vlmdp_over_flat=<VLM+DP ms/step / flat DP ms/step>`` (goal <= 1.5).
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
    from omegaconf import OmegaConf

    from configs import load_config
    from datamodules.stats import load_stats
    from lightning_modules.dp.module import DiffusionPolicyModule

    cfg = load_config("dp", ["preset=cpu"])
    module = DiffusionPolicyModule(model={**OmegaConf.to_container(cfg.model), "conditioning": "code"},
                                   n_action_steps=cfg.n_action_steps)
    module.set_stats(load_stats(sorted(data.glob("*.h5"))))
    return module.export_policy(path)


def time_policy(policy, steps: int, image_size: int) -> list[float]:
    import envs
    from envs.tabletop import observation_arrays

    env = envs.make_env("PlaceOnTop", image_size=image_size)
    obs, _ = env.reset(seed=100000)
    policy.attach(env)
    policy.reset("PlaceOnTop", env.prompt())
    times = []
    for _ in range(steps):
        o = observation_arrays(obs)
        t0 = time.perf_counter()
        action = policy.act(o)
        times.append(time.perf_counter() - t0)
        obs, *_ = env.step(action)
    env.close()
    return times


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
        hier = VLMDP(VLMPlanner.from_pretrained(vlm, constrain_objects=not args.free_decoding),
                     DiffusionPolicy.from_checkpoint(dp_path))
        results = {"flat DP": time_policy(flat, steps, 64), "VLM+DP": time_policy(hier, steps, 64)}
    print(f"{steps} control steps of PlaceOnTop (seed 100000, 64 px), 1 thread; DP {dp_path if args.dp else 'random-init cpu preset'}, VLM {vlm}")
    print(f"{'policy':<10}{'mean ms/step':>14}{'median':>9}{'max':>9}")
    for name, t in results.items():
        print(f"{name:<10}{1e3 * statistics.mean(t):>14.1f}{1e3 * statistics.median(t):>9.1f}{1e3 * max(t):>9.1f}")
    ratio = statistics.mean(results["VLM+DP"]) / statistics.mean(results["flat DP"])
    print(f"vlmdp_over_flat={ratio:.2f}")


if __name__ == "__main__":
    main()
