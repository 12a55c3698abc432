"""Is the HDF5 loader fast enough for diffusion-policy training? With vs without the text cache.

    python benchmarks/dp_loader.py [--data data/oracle] [--steps 20] [--quick]

Measures, in one run on the cpu_rgb preset (the image DP, batch 64): (a) DataLoader samples/s with 2 workers
(random task-balanced access, images + 16-step chunks), (b) training samples/s of the
LightningModule's step (forward, backward, AdamW) on one core with the text-embedding cache,
and (c) the same without the cache (the frozen encoder runs every step). Without --data a
small dataset is generated into a temporary folder. Goal: the loader >= 5x training.
Ends with ``loader_over_train=<(a) / (b)>``.
"""

import argparse
import tempfile
import time


def samples_per_s(iterator, batches: int, batch_size: int, step=None) -> float:
    batch = next(iterator)  # warm-up (worker start, first reads)
    if step:
        step(batch)
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        if step:
            step(batch)
    return batches * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a `make data` folder (default: generate a small one)")
    ap.add_argument("--tasks", default="PlaceOnTop,Push")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="5 training steps (< 2 minutes)")
    args = ap.parse_args()
    import itertools

    import torch
    from omegaconf import OmegaConf

    from configs import load_config
    from datamodules.dp_datamodule import DiffusionPolicyDataModule
    from datamodules.generate import small_dataset
    from lightning_modules.dp.model import reads_recorded_objects
    from lightning_modules.dp.module import DiffusionPolicyModule

    steps = 5 if args.quick else args.steps
    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or small_dataset(tmp, tasks, 4)
        cfg = load_config("dp", ["preset=cpu_rgb"])  # the image DP: images + chunks through the loader
        bs = cfg.data.batch_size
        state = reads_recorded_objects(cfg.model)  # the preset's keypoints are taught by the recorded boxes
        dm = DiffusionPolicyDataModule(data, tasks, batch_size=bs, num_workers=2, horizon=cfg.model.horizon,
                                       load_state=state)
        dm.setup()
        loader_rate = samples_per_s(itertools.cycle(dm.train_dataloader()), 4 * steps, bs)
        torch.set_num_threads(1)
        module = DiffusionPolicyModule(model={**OmegaConf.to_container(cfg.model), "conditioning": "code"})
        module.set_stats(dm.stats())
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        dm0 = DiffusionPolicyDataModule(data, tasks, batch_size=bs, num_workers=0, horizon=cfg.model.horizon,
                                        load_state=state)
        dm0.setup()
        batches = [b for b, _ in zip(itertools.cycle(dm0.train_dataloader()), range(steps + 1))]

        def step(batch):
            module.model.loss(batch).backward()
            opt.step()
            opt.zero_grad()

        rates = {}
        for cached in (True, False):
            module.model.text.use_cache = cached
            module.model.text.cache.clear()
            rates[cached] = samples_per_s(iter(batches), steps, bs, step)
    print(f"cpu_rgb preset, batch {bs}, tasks {tasks}, {steps} training steps on 1 thread")
    print(f"{'what':<40}{'samples/s':>10}")
    print(f"{'HDF5 loader (2 workers)':<40}{loader_rate:>10.0f}")
    print(f"{'training step, text-embedding cache':<40}{rates[True]:>10.0f}")
    print(f"{'training step, no cache':<40}{rates[False]:>10.0f}")
    print(f"cache speed-up of the training step: {rates[True] / rates[False]:.2f}x")
    print(f"loader_over_train={loader_rate / rates[True]:.2f}")


if __name__ == "__main__":
    main()
