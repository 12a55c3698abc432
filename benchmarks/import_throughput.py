"""ClevrSkills import throughput (`make import-clevrskills`), one core.

    python benchmarks/import_throughput.py [--copies 12] [--image-size 128] [--quick]

Copies the two real ClevrSkills trajectories of tests/clevrskills_sample/ (PlaceNextTo, 54 steps;
Push, 55 steps) ``--copies`` times into a temporary source tree and imports it in this process
(WORKERS=1, one thread): decoding both cameras' MP4s, resizing, labels, HDF5 writes, indexes and
statistics included. Then it times the stages on one trajectory, and projects the time to import
ClevrSkills' 330k released trajectories (time grows with a trajectory's steps; the projection
scales by the mean length). Ends with ``clevrskills_trajectories_per_min=<per minute per core>``.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "clevrskills_sample"
TRAJECTORIES = ("place_next_to/traj_44", "push/traj_45")
RELEASED = 330_000


def stages(path: Path, image_size: int, out: Path, repeat: int = 3) -> dict[str, float]:
    """Seconds per stage for one trajectory (best of ``repeat``)."""
    import numpy as np

    from datamodules.clevrskills.convert import Settings, convert, fit_images, write
    from datamodules.clevrskills.labels import coarse_labels, fine_labels
    from datamodules.clevrskills.source import decode_video, load_trajectory

    best: dict[str, float] = {}

    def clock(name, fn):
        t0 = time.perf_counter()
        result = fn()
        best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
        return result

    for _ in range(repeat):
        traj = clock("read arrays + trace", lambda: load_trajectory(path))
        clock("labels (fine + coarse)", lambda: (fine_labels(traj.trace, traj.success),
                                                 coarse_labels(traj.trace, traj.success)))
        frames = clock("decode 2 MP4s (PyAV)", lambda: [decode_video(path / "image" / c / "rgb.mp4", len(traj) + 1)
                                                         for c in ("base_camera", "hand_camera")])
        clock(f"resize to {image_size} px", lambda: [fit_images(np.asarray(f), image_size, "crop") for f in frames])
        c = convert(path, 0, "x/traj_0", Settings(image_size=image_size))
        clock("write HDF5 (lzf)", lambda: write(out / "stage" / "seed_0000000.h5", c))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=12, help="copies of each sample trajectory")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="4 copies (8 trajectories, well under 2 minutes)")
    args = ap.parse_args()
    import torch
    from omegaconf import OmegaConf

    from datamodules.clevrskills.importer import run_import

    torch.set_num_threads(1)
    copies = 4 if args.quick else args.copies
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        for i in range(copies):
            for rel in TRAJECTORIES:
                shutil.copytree(SAMPLE / rel, src / f"copy{i:03d}" / rel)
        n = copies * len(TRAJECTORIES)
        cfg = OmegaConf.create({"src": str(src), "out": str(out), "level": "fine", "image_size": args.image_size,
                                "aspect": "crop", "workers": 1, "task": None,
                                "task_names": {"PlaceNextTo": "PlaceNextTo", "Push": "PushToTarget"}})
        t0 = time.perf_counter()
        manifest = run_import(cfg, progress=False)
        seconds = time.perf_counter() - t0
        assert manifest["imported"] == n, manifest["skip_reasons"]
        best = stages(SAMPLE / TRAJECTORIES[0], args.image_size, Path(tmp))
    steps = sum(54 if "place" in t else 55 for t in TRAJECTORIES) * copies
    per_min = n / seconds * 60
    print(f"imported {n} trajectories ({steps} steps, {args.image_size} px, fine labels) in {seconds:.1f} s "
          f"on one core")
    print(f"\n{'stage (one 54-step trajectory)':<32}{'ms':>8}")
    for name, s in best.items():
        print(f"{name:<32}{s * 1000:>8.1f}")
    print(f"{'sum':<32}{sum(best.values()) * 1000:>8.1f}")
    print(f"\nthroughput: {per_min:.0f} trajectories/min/core, {steps / seconds:.0f} steps/s/core")
    print(f"\nprojection for ClevrSkills' {RELEASED:,} trajectories (hours; time grows with the steps per trajectory):")
    print(f"{'mean steps':>11}{'1 core':>9}{'8 cores':>9}{'16 cores':>10}")
    for mean in (steps / n, 100, 200):
        hours = RELEASED * mean / (steps / seconds) / 3600
        print(f"{mean:>11.0f}{hours:>9.1f}{hours / 8:>9.1f}{hours / 16:>10.1f}")
    print(f"clevrskills_trajectories_per_min={per_min:.1f}")


if __name__ == "__main__":
    main()
