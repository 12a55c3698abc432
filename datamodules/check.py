"""Verify and repair oracle datasets (``make check-data DATA=... [REPAIR=1]``).

``check_dataset`` opens every episode file of every task index in a dataset folder and reports
what is wrong with each: a file that does not open (truncated, foreign), a wrong format or
version, missing arrays, lengths that disagree with ``num_steps``, images that do not decode,
code labels that do not parse (in the label sets written in our API's notation: see
``schema.label_notation``). ``repair`` moves the bad episode files to ``quarantine/<Task>/`` and
rewrites the task's index without them, so that the next ``make data`` with the same settings
regenerates exactly those seeds.

Training runs the quick form (``decode_images=False, parse_labels=False``: opening and shapes,
about a millisecond per episode) before its first step, through ``datamodules.dataset.dataset_files``,
so a bad file stops it with an error naming the file and the repair command instead of a crash
mid-epoch.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from . import schema
from .generate import scan
from .labels import is_key_step


@dataclass(frozen=True)
class Problem:
    """One bad file: the task, the seed (None for the index itself), the file and the reason."""

    task: str
    seed: int | None
    path: Path
    reason: str


def _parser():
    from envs.skills.interpreter import Interpreter

    return Interpreter(api=None)


def check_episode(path: Path, *, decode_images: bool = True, parse_labels: bool = True, parser=None) -> str | None:
    """The first thing wrong with one episode file, or None when it is sound."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        return f"does not open as HDF5 ({str(e).splitlines()[0]})"
    with f:
        if "episode" not in f:
            return "has no /episode group"
        g = f["episode"]
        fmt, version = g.attrs.get("format"), g.attrs.get("version")
        if fmt != schema.FORMAT:
            return f"format attribute {fmt!r}, expected {schema.FORMAT!r}"
        if version is None or int(version) not in schema.READABLE_VERSIONS:
            return f"format version {version}, readable: {schema.READABLE_VERSIONS}"
        try:
            T = int(g.attrs["num_steps"])
            low_dim = [k for k in schema.LOW_DIM_KEYS if not (k == "object_pose" and int(version) < 2)]
            needed = ["actions", "success", "labels/oracle/code", "labels/oracle/key_step", "objects/name",
                      *(f"obs/{k}" for k in low_dim)]
            missing = [k for k in needed if k not in g]
            if missing:
                return f"lacks {missing}"
            arrays = [*needed[:4], *(f"obs/{k}" for k in low_dim), *(f"obs/{k}" for k in schema.RGB_KEYS if f"obs/{k}" in g)]
            arrays += [f"labels/{s}/code" for s in g["labels"] if s != "oracle"]
            wrong = [f"{k} {g[k].shape[0]}" for k in arrays if g[k].shape[0] != T]
            if wrong:
                return f"has {T} steps but {', '.join(wrong)} rows"
            if g["actions"].shape[1:] != (7,):
                return f"actions of shape {g['actions'].shape}, expected ({T}, 7)"
            if decode_images:
                for k in schema.RGB_KEYS:
                    if f"obs/{k}" in g:
                        images = g[f"obs/{k}"][:]
                        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                            return f"obs/{k} is {images.dtype} {images.shape}, expected (T, H, W, 3) uint8"
            if parse_labels:
                parser = parser or _parser()
                for label_set in g["labels"]:
                    if schema.label_notation(g[f"labels/{label_set}"]) != schema.API_NOTATION:
                        continue  # e.g. ClevrSkills' coarse notation: text, not our API
                    for t, line in enumerate(g[f"labels/{label_set}/code"].asstr()[:]):
                        if is_key_step(line):
                            try:
                                parser.parse(line)
                            except Exception as e:  # CodeError: the label is not valid API code
                                return f"labels/{label_set} step {t}: {line!r} does not parse ({e})"
        except (OSError, KeyError, ValueError, TypeError) as e:  # a damaged chunk or attribute
            return f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def index_files(folder: Path, tasks: list[str] | None = None) -> list[Path]:
    """The task index files of a dataset folder (``<Task>.h5``), those of ``tasks`` if given."""
    folder = Path(folder)
    if tasks is not None:
        return [folder / f"{t}.h5" for t in tasks]
    return sorted(p for p in folder.glob("*.h5") if (folder / p.stem).is_dir())


def check_dataset(folder, tasks: list[str] | None = None, *, decode_images: bool = True,
                  parse_labels: bool = True, progress: bool = False) -> tuple[dict[str, int], list[Problem]]:
    """({task: episodes checked}, problems) for the index files of ``folder``. An episode is
    checked whether the index links it or it only lies in ``<Task>/``; a link to a missing
    file is a problem too."""
    parser = _parser() if parse_labels else None
    counts: dict[str, int] = {}
    problems: list[Problem] = []
    for index in index_files(folder, tasks):
        task = index.stem
        try:
            linked = _linked_seeds(index)
        except schema.SchemaError as e:
            linked = set()
            problems.append(Problem(task, None, index, str(e)))
        episode_dir = index.parent / task
        on_disk = scan(episode_dir)[0]
        seeds = sorted(linked | on_disk)
        counts[task] = len(seeds)
        items = seeds
        if progress:
            from tqdm import tqdm

            items = tqdm(seeds, desc=f"{task:>12}", unit="ep", dynamic_ncols=True)
        for seed in items:
            path = episode_dir / f"{schema.episode_name(seed)}.h5"
            if seed not in on_disk:
                problems.append(Problem(task, seed, path, "linked from the index but missing"))
                continue
            reason = check_episode(path, decode_images=decode_images, parse_labels=parse_labels, parser=parser)
            if reason:
                problems.append(Problem(task, seed, path, reason))
    return counts, problems


def repair(folder, problems: list[Problem]) -> list[Path]:
    """Move each bad episode file to ``<folder>/quarantine/<Task>/`` (never deleted) and rewrite
    every affected task index from the sound episode files. Returns the moved files' new paths."""
    folder = Path(folder)
    moved: list[Path] = []
    for p in problems:
        if p.seed is not None and p.path.exists():
            dest = folder / "quarantine" / p.task / p.path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = dest.with_name(f"{dest.stem}.{len(list(dest.parent.glob(dest.stem + '*')))}{dest.suffix}")
            shutil.move(str(p.path), dest)
            moved.append(dest)
    bad = {(p.task, p.seed) for p in problems}
    for task in sorted({p.task for p in problems}):
        on_disk = scan(folder / task)[0]
        seeds = _indexed_seeds(folder, task)
        seeds = on_disk if seeds is None else seeds & on_disk
        schema.write_index(folder / f"{task}.h5", task, sorted(s for s in seeds if (task, s) not in bad))
    return moved


def _indexed_seeds(folder: Path, task: str) -> set[int] | None:
    """The seeds the task's index links, else those its manifest lists, else None."""
    try:
        return _linked_seeds(folder / f"{task}.h5")
    except schema.SchemaError:
        seeds = schema.read_manifest(folder).get("tasks", {}).get(task, {}).get("seeds")
        return set(seeds) if seeds is not None else None


def _linked_seeds(index: Path) -> set[int]:
    with schema.open_index(index) as f:
        return {int(n[5:]) for n in f["episodes"]}


def repair_command(folder) -> str:
    return f"make check-data DATA={folder} REPAIR=1"
