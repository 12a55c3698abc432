"""Oracle data generation throughput, HDF5 writes included, and reader throughput.

    python benchmarks/datagen_throughput.py [--episodes 30] [--quick]

One worker process (one core) generates base+wrist 128x128 episodes of PlaceOnTop and Swap
into a temporary folder; then a DataLoader with 2 workers reads random samples. Goal: >= 2000
PlaceOnTop episodes per hour per core. Ends with ``episodes_per_hour_per_core=<PlaceOnTop>``.
"""

import argparse
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="8 episodes per task (< 2 minutes)")
    args = ap.parse_args()
    import torch
    from omegaconf import OmegaConf

    from datamodules.dataset import OracleStepDataset
    from datamodules.generate import generate

    n = 8 if args.quick else args.episodes
    rows, rates = [], {}
    with tempfile.TemporaryDirectory() as out:
        for task in ("PlaceOnTop", "Swap"):
            cfg = OmegaConf.create({"tasks": task, "episodes": n, "seed_start": 0, "max_seeds_factor": 3,
                                    "workers": 1, "out": out,
                                    "env": {"image_size": args.image_size, "backend": "auto"}})
            # warm-up: worker start and env creation are not part of the steady rate
            warm = OmegaConf.merge(cfg, {"episodes": 1, "seed_start": 10_000, "out": out + "/warm"})
            generate(warm, [task], progress=False)
            t0 = time.perf_counter()
            manifest = generate(cfg, [task], progress=False)
            dt = time.perf_counter() - t0
            info = manifest["tasks"][task]
            rates[task] = info["episodes"] / dt * 3600  # successful episodes only
            ds = OracleStepDataset([f"{out}/{task}.h5"], load_images=False)
            rows.append((task, info["episodes"], len(ds) / max(info["episodes"], 1), dt, rates[task]))
        ds = OracleStepDataset([f"{out}/PlaceOnTop.h5", f"{out}/Swap.h5"], horizon=16)
        loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=2)
        t0, count = time.perf_counter(), 0
        for batch in loader:
            count += len(batch["t"])
            if count >= 1000:
                break
        read = count / (time.perf_counter() - t0)
    print(f"{'task':<12}{'episodes':>9}{'steps/ep':>9}{'seconds':>9}{'eps/h/core':>12}")
    for task, eps, steps, dt, rate in rows:
        print(f"{task:<12}{eps:>9}{steps:>9.0f}{dt:>9.1f}{rate:>12.0f}")
    print(f"reader: {read:.0f} samples/s (random access, batch 32, 2 workers, images + 16-step chunks)")
    print(f"episodes_per_hour_per_core={rates['PlaceOnTop']:.0f}")


if __name__ == "__main__":
    main()
