"""Diffusion-policy chunk latency: DDIM-10 vs DDPM-100, same model, one run.

    python benchmarks/dp_sampling.py [--preset cpu_rgb|paper] [--repeats 20] [--quick]

Builds the preset's network (random weights: latency does not depend on training), takes one
64x64 (cpu) or 128x128 (paper) observation and times ``DiffusionPolicyModel.sample`` for one
chunk on one core, text embeddings cached (as in a rollout). Goal: DDIM-10 >= 9x faster.
Ends with ``ddim10_speedup=<DDPM-100 time / DDIM-10 time>``.
"""

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu_rgb")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5 repeats (< 1 minute)")
    args = ap.parse_args()
    import torch
    from omegaconf import OmegaConf

    from configs import load_config
    from lightning_modules.dp.model import DiffusionPolicyModel

    torch.set_num_threads(args.threads)
    cfg = load_config("dp", [f"preset={args.preset}"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = DiffusionPolicyModel(**OmegaConf.to_container(cfg.model), conditioning="code").to(device).eval()
    s = cfg.model.image_size
    batch = {"base_rgb": torch.randint(0, 256, (1, 3, s, s), dtype=torch.uint8, device=device),
             "wrist_rgb": torch.randint(0, 256, (1, 3, s, s), dtype=torch.uint8, device=device),
             "proprio": torch.zeros(1, 21, device=device), "suction": torch.zeros(1, 2, device=device),
             "instruction": ["place(get_actor('red cube'), pose_dict['blue cube'])"],
             "cache_info": ["pose_dict['blue cube'] = get_pose(get_actor('blue cube'))"]}
    repeats = 5 if args.quick else args.repeats
    rows = {}
    for name, kw in (("DDIM-10", dict(sampler="ddim", num_inference_steps=10)), ("DDPM-100", dict(sampler="ddpm"))):
        model.sample(batch, **kw)  # warm-up (and the text-embedding cache)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.sample(batch, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows[name] = statistics.median(times)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"preset {args.preset}: {params:.1f}M parameters, {s}x{s} images, horizon {cfg.model.horizon}, "
          f"device {device}, {args.threads} thread(s), median of {repeats}")
    per_action = f"ms/action ({cfg.n_action_steps} executed)"
    print(f"{'sampler':<10}{'ms/chunk':>10}{per_action:>24}")
    for name, t in rows.items():
        print(f"{name:<10}{t * 1e3:>10.1f}{t * 1e3 / cfg.n_action_steps:>24.1f}")
    print(f"ddim10_speedup={rows['DDPM-100'] / rows['DDIM-10']:.2f}")


if __name__ == "__main__":
    main()
