"""VLM relabelling of diffusion-policy data (paper 4.3, 5.2): ``make relabel-dp``.

The planner runs over every step of every episode, closed-loop on its own memory exactly as at
inference (``VLMPlanner.step`` with early stopping), and its lines are stored as the label set
``labels/<label_set>`` (``code`` (T,) str, ``key_step`` (T,) bool, attributes naming the VLM) in the
episode files, next to ``labels/oracle``. The DP trains on them with its ``vlm`` conditioning.

Crash safety: an episode file is copied to a temporary file, the labels are written into the
copy, and the copy is renamed over the original; a crash leaves either the old or the new file.
Resumable: episodes that already hold labels from the same VLM are skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from configs.errors import UserError
from datamodules import schema
from datamodules.labels import is_key_step


class RelabelError(UserError, ValueError):
    """Relabelling cannot start (labels from another VLM, ...); the message says why."""


@dataclass
class EpisodeRef:
    task: str
    name: str
    path: Path  # the episode file


@dataclass
class Agreement:
    episodes: int = 0
    relabelled: int = 0
    steps: int = 0
    new_steps: int = 0
    same_line: int = 0
    same_key: int = 0
    errors: int = 0
    early_stops: int = 0
    tokens: int = 0

    def add(self, vlm: list[str], oracle: list[str], errors: int = 0, early: int = 0, tokens: int = 0) -> None:
        self.episodes += 1
        self.steps += len(vlm)
        self.same_line += sum(a == b for a, b in zip(vlm, oracle))
        self.same_key += sum(is_key_step(a) == is_key_step(b) for a, b in zip(vlm, oracle))
        self.errors += errors
        self.early_stops += early
        self.tokens += tokens


def vlm_identity(path) -> str:
    """Identifies a VLM: its resolved path plus size and mtime of its weight/checkpoint files."""
    path = Path(path).resolve()
    files = sorted(path.rglob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else [path]
    stamp = ",".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
    return f"{path}|{stamp}"


def episodes_of(index_file: Path) -> list[EpisodeRef]:
    with schema.open_index(index_file) as f:
        task = str(f.attrs["task"])
        out = []
        for name in f["episodes"]:
            link = f["episodes"].get(name, getlink=True)
            out.append(EpisodeRef(task, name, Path(index_file).parent / link.filename))
    return out


def stored_labels(ep: EpisodeRef, label_set: str) -> tuple[list[str] | None, dict, list[str]]:
    """(labels of ``label_set`` or None, their attributes, the oracle labels) of an episode."""
    with h5py.File(ep.path, "r") as f:
        g = f["episode"]
        oracle = list(g["labels/oracle/code"].asstr()[:])
        key = f"labels/{label_set}"
        if key in g and "code" in g[key]:
            return list(g[f"{key}/code"].asstr()[:]), dict(g[key].attrs), oracle
        return None, {}, oracle


def write_labels(ep: EpisodeRef, label_set: str, lines: list[str], attrs: dict) -> None:
    """Atomically replace ``labels/<label_set>`` in the episode file (copy, write, rename)."""
    fd, tmp = tempfile.mkstemp(dir=ep.path.parent, prefix=ep.path.name, suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(ep.path, tmp)
        with h5py.File(tmp, "r+") as f:
            g = f["episode"]
            if len(lines) != int(g.attrs["num_steps"]):
                raise ValueError(f"{ep.path}: {len(lines)} labels for {g.attrs['num_steps']} steps")
            key = f"labels/{label_set}"
            if key in g:
                del g[key]
            lab = g.create_group(key)
            lab.create_dataset("code", data=np.array(lines, dtype=object), dtype=schema.STR)
            lab.create_dataset("key_step", data=np.array([is_key_step(x) for x in lines], dtype=bool))
            lab.attrs.update(attrs)
        os.replace(tmp, ep.path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plan(files, label_set: str, vlm_id: str, overwrite: bool) -> tuple[list[EpisodeRef], list[EpisodeRef]]:
    """(to do, done) episodes; RelabelError if some hold labels of another VLM and not overwrite."""
    todo, done, foreign = [], [], []
    for index in files:
        for ep in episodes_of(Path(index)):
            labels, attrs, _ = stored_labels(ep, label_set)
            if labels is None:
                todo.append(ep)
            elif attrs.get("vlm_id") == vlm_id and not overwrite:
                done.append(ep)
            elif overwrite:
                todo.append(ep)
            else:
                foreign.append(ep)
    if foreign:
        raise RelabelError(f"{len(foreign)} episodes (e.g. {foreign[0].path}) already hold labels/{label_set} "
                           f"from another VLM; pass overwrite=true to replace them")
    return todo, done


def relabel_episode(planner, ep: EpisodeRef) -> tuple[list[str], int, int, int]:
    """Run the planner over the episode's base-camera frames: (lines, errors, early stops, tokens)."""
    with h5py.File(ep.path, "r") as f:
        g = f["episode"]
        prompt = str(g.attrs["prompt"])
        objects = list(g["objects/name"].asstr()[:])
        frames = g["obs/base_rgb"][:]
    planner.reset(prompt, objects=objects)
    lines, errors, early, tokens = [], 0, 0, 0
    for image in frames:
        step = planner.step(image)
        lines.append(step.line)
        errors += step.error is not None
        early += step.early_stopped
        tokens += step.tokens
    return lines, errors, early, tokens


def relabel(files, planner, vlm_path, label_set: str = "vlm", overwrite: bool = False,
            progress: bool = True) -> dict[str, Agreement]:
    """Relabel every episode of the task index ``files``; returns per-task agreement with the oracle."""
    from tqdm import tqdm

    vlm_id = vlm_identity(vlm_path)
    todo, done = plan(files, label_set, vlm_id, overwrite)
    stats: dict[str, Agreement] = {}
    for ep in done:
        labels, _, oracle = stored_labels(ep, label_set)
        stats.setdefault(ep.task, Agreement()).add(labels, oracle)
    total = 0
    for ep in todo:
        with h5py.File(ep.path, "r") as f:
            total += int(f["episode"].attrs["num_steps"])
    attrs = {"vlm": str(Path(vlm_path).resolve()), "vlm_id": vlm_id,
             "early_stop_k": planner.early_stop_k if todo else -1,
             "mode": "step (VLM + DP inference, closed loop on its own memory)"}
    with tqdm(total=total, unit="step", disable=not progress, desc="relabel") as bar:
        for ep in todo:
            lines, errors, early, tokens = relabel_episode(planner, ep)
            write_labels(ep, label_set, lines, {**attrs, "errors": errors})
            _, _, oracle = stored_labels(ep, label_set)
            a = stats.setdefault(ep.task, Agreement())
            a.add(lines, oracle, errors, early, tokens)
            a.relabelled += 1
            a.new_steps += len(lines)
            bar.update(len(lines))
    return stats


def summary(stats: dict[str, Agreement]) -> str:
    """A table: per task, episodes (relabelled now), steps, line and key-step agreement with the
    oracle labels, malformed lines and early stops (of the episodes relabelled now)."""
    rows = [f"{'task':<14}{'episodes':>9}{'new':>5}{'steps':>7}{'same line':>10}{'same key':>9}"
            f"{'errors':>7}{'early':>7}{'tok/step':>9}"]
    tot = Agreement()
    counters = ("episodes", "relabelled", "steps", "new_steps", "same_line", "same_key", "errors", "early_stops",
                "tokens")
    for task, a in stats.items():
        rows.append(_row(task, a))
        for k in counters:
            setattr(tot, k, getattr(tot, k) + getattr(a, k))
    rows.append(_row("all", tot))
    return "\n".join(rows)


def _row(name: str, a: Agreement) -> str:
    n = max(a.steps, 1)
    return (f"{name:<14}{a.episodes:>9}{a.relabelled:>5}{a.steps:>7}{a.same_line / n:>10.1%}{a.same_key / n:>9.1%}"
            f"{a.errors:>7}{a.early_stops:>7}{a.tokens / max(a.new_steps, 1):>9.2f}")
