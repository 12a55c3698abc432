"""What does a DP training step cost on one CPU core, and what does the fused AdamW save?

    python benchmarks/train_step.py [--data data/oracle] [--steps 20] [--quick]

The cpu preset DP (state observation, batch 64), built as ``make train-dp`` builds it, on one
thread: forward + backward, the optimizer step and the EMA update, timed per part. The optimizer is
torch's AdamW in two forms in the same run, in alternating rounds (machines are noisy): the
per-tensor loop (torch's default on the CPU) and the fused kernel that
``lightning_modules.training.adamw`` picks. Without ``--data`` a small dataset is generated into a
temporary folder. Ends with ``fused_step_speedup=<whole step with the loop / with fused>``.
"""

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a `make data` folder (default: generate a small one)")
    ap.add_argument("--tasks", default="PlaceOnTop,Push")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per optimizer form")
    ap.add_argument("--quick", action="store_true", help="6 steps per form (< 2 minutes)")
    args = ap.parse_args()
    import torch
    from diffusers.training_utils import EMAModel

    from configs import load_config
    from datamodules.generate import small_dataset
    from train_dp import build

    torch.set_num_threads(1)
    steps = 6 if args.quick else max(2, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or small_dataset(tmp, args.tasks.split(","), 3)
        cfg = load_config("dp", ["preset=cpu", f"data_dir={data}", f"tasks={args.tasks}", "data.num_workers=0"])
        torch.manual_seed(0)
        module, dm = build(cfg)
        dm.setup("fit")
        batch = []
        while len(batch) < 4:  # a small dataset may hold fewer batches: go round again
            batch += list(itertools.islice(dm.train_dataloader(), 4 - len(batch)))
    model = module.model
    params = list(model.parameters())
    ema = EMAModel(params, decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    optimizers = {"per-tensor loop": torch.optim.AdamW(params, lr=1e-4, foreach=False),
                  "fused": torch.optim.AdamW(params, lr=1e-4, fused=True)}
    parts = {name: {"forward+backward": [], "optimizer": [], "ema": []} for name in optimizers}

    def step(name: str, b, record: bool) -> None:
        t0 = time.perf_counter()
        loss = model.loss(b)
        loss.backward()
        t1 = time.perf_counter()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        ema.step(params)
        t3 = time.perf_counter()
        if record:
            for part, dt in zip(("forward+backward", "optimizer", "ema"), (t1 - t0, t2 - t1, t3 - t2)):
                parts[name][part].append(dt)

    for name in optimizers:  # warm-up: text cache, optimizer state, allocator
        step(name, batch[0], record=False)
    for i in range(steps):  # alternate, so that a slower moment of the machine hits both
        for name in optimizers:
            step(name, batch[i % len(batch)], record=True)

    ms = {name: {part: 1000 * statistics.median(v) for part, v in p.items()} for name, p in parts.items()}
    # forward + backward is the same work under both optimizers: its median over all steps goes
    # into both totals, so the ratio measures the optimizer, not the machine's noise
    fwd = 1000 * statistics.median([t for p in parts.values() for t in p["forward+backward"]])
    print(f"cpu preset DP ({sum(p.numel() for p in params) / 1e6:.1f}M parameters, {len(params)} tensors), "
          f"batch {cfg.data.batch_size}, one thread, median of {steps} steps each, ms:")
    print(f"{'optimizer':<18}{'fwd+bwd':>10}{'optimizer':>11}{'ema':>8}{'step':>9}")
    total = {}
    for name, m in ms.items():
        total[name] = fwd + m["optimizer"] + m["ema"]
        print(f"{name:<18}{m['forward+backward']:>10.1f}{m['optimizer']:>11.1f}{m['ema']:>8.1f}{total[name]:>9.1f}")
    print(f"(step = the pooled forward+backward median {fwd:.1f} ms + optimizer + ema)")
    loop, fused = total["per-tensor loop"], total["fused"]
    print(f"fused_step_speedup={loop / fused:.3f}")


if __name__ == "__main__":
    main()
