"""VLM relabelling of diffusion-policy data (paper 4.3, 5.2): ``make relabel-dp``.

The planner runs over every step of every episode, closed-loop on its own memory as at inference
(``VLMPlanner.step`` with early stopping), and its lines are stored as the label set
``labels/<label_set>`` (``code`` (T,) str, ``key_step`` (T,) bool, ``pose_keys``/``pose_values``: the
positions of its ``pose_dict`` lines (:func:`label_poses`), attributes naming the VLM) in the
episode files, next to ``labels/oracle``. The DP trains on them with its ``vlm`` conditioning.

``keystep_on_line_end`` (default True; not in the paper): where the recorded line has ended (the
oracle starts a new key-step at that step) and the VLM has not itself named a new key-step since
the previous line end, the VLM gets the key-step request (``next_key_step``, with
``require_key_step``: the recorded line did end, so "# <running line>", not finished, is not on
offer), as VLM+DP asks it when the DP's chunk ends in holds (``keystep_on_hold``, the evaluator's
default). In recorded data
the executing policy is the oracle, so its line ends are what the DP's would be. With False the VLM
must see every line end in the image (the paper's every-step query). Why: so queried, our VLM
kept naming the running line (measured: PlaceOnTop labels stuck on ``# pick(...)`` for the rest of
the episode, 42 % of lines equal to the oracle's, and a DP trained on them at 0/64 as VLM+DP).

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
from datamodules.labels import POSE_DICT_ASSIGNMENT, is_key_step


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


def write_labels(ep: EpisodeRef, label_set: str, lines: list[str], attrs: dict,
                 pose_dict: dict | None = None) -> None:
    """Atomically replace ``labels/<label_set>`` in the episode file (copy, write, rename), with
    the positions of its ``pose_dict`` lines (key -> (3,); none: empty)."""
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
            schema.write_pose_dict(lab, pose_dict or {})
            lab.attrs.update(attrs)
        os.replace(tmp, ep.path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def mode_name(keystep_on_line_end: bool) -> str:
    """The ``mode`` attribute of a label set: how the planner was queried."""
    return ("step, key-step request at recorded line ends (VLM + DP inference with keystep_on_hold)"
            if keystep_on_line_end else "step (VLM + DP inference, closed loop on its own memory)")


def plan(files, label_set: str, vlm_id: str, overwrite: bool,
         mode: str | None = None) -> tuple[list[EpisodeRef], list[EpisodeRef]]:
    """(to do, done) episodes; RelabelError if some hold labels of another VLM and not overwrite.
    Labels of the same VLM made in another ``mode`` (when given) are redone."""
    todo, done, foreign = [], [], []
    for index in files:
        for ep in episodes_of(Path(index)):
            labels, attrs, _ = stored_labels(ep, label_set)
            if labels is None:
                todo.append(ep)
            elif attrs.get("vlm_id") == vlm_id and mode is not None and attrs.get("mode") != mode:
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


class LineEndRequests:
    """When relabelling asks the VLM with the key-step request (``keystep_on_line_end``).

    ``line_ends`` (T,) bool: the recorded policy starts a new line at step t (the oracle's key-steps).
    ``request(t)`` is True at a line end t > 0 unless the VLM named a new key-step by itself since
    the previous line end (it then already moved on, early); t = 0 is the plan's first line, asked
    with a plain query as at inference. Call ``observe(t, new_key_step)`` after each query."""

    def __init__(self, line_ends):
        self.line_ends = np.asarray(line_ends, dtype=bool)
        self.advanced = False

    def request(self, t: int) -> bool:
        return bool(self.line_ends[t]) and t > 0 and not self.advanced

    def observe(self, t: int, new_key_step: bool) -> None:
        self.advanced = False if self.line_ends[t] else self.advanced or bool(new_key_step)


def label_poses(ep: EpisodeRef, lines: list[str], scene) -> tuple[dict, int]:
    """The positions of the ``pose_dict[...] = ...`` key-step lines among ``lines`` (the state DP
    reads them): the oracle's recorded values when the lines are the oracle's own, else the lines
    run on the recorded scene (``scene``: :class:`envs.skills.replay.RecordedScene`).
    Returns (key -> position (3,), lines that failed to run)."""
    assignments = [(t, x) for t, x in enumerate(lines) if is_key_step(x) and POSE_DICT_ASSIGNMENT.match(x)]
    if not assignments:
        return {}, 0
    with h5py.File(ep.path, "r") as f:
        g = f["episode"]
        oracle = [x for x in g["labels/oracle/code"].asstr()[:] if is_key_step(x) and POSE_DICT_ASSIGNMENT.match(x)]
        if [x for _, x in assignments] == oracle:
            return schema.read_pose_dict(g["labels/oracle"]), 0
        if "object_pose" not in g["obs"]:  # version-1 data: no recorded scene
            return {}, len(assignments)
        names, poses = list(g["objects/name"].asstr()[:]), g["obs/object_pose"][:]
        task, seed = str(g.attrs["task"]), int(g.attrs["seed"])
    return scene.pose_values(task, seed, names, poses, assignments)


def relabel_episode(planner, ep: EpisodeRef, keystep_on_line_end: bool = True) -> tuple[list[str], int, int, int]:
    """Run the planner over the episode's base-camera frames: (lines, errors, early stops, tokens).
    ``keystep_on_line_end``: the key-step request where the recorded line ended (module docstring)."""
    with h5py.File(ep.path, "r") as f:
        g = f["episode"]
        prompt = str(g.attrs["prompt"])
        objects = list(g["objects/name"].asstr()[:])
        frames = g["obs/base_rgb"][:]
        line_ends = g["labels/oracle/key_step"][:].astype(bool)
    planner.reset(prompt, objects=objects)
    rule = LineEndRequests(line_ends if keystep_on_line_end else np.zeros_like(line_ends))
    lines, errors, early, tokens = [], 0, 0, 0
    for t, image in enumerate(frames):
        step = planner.next_key_step(image, require_key_step=True) if rule.request(t) else planner.step(image)
        rule.observe(t, bool(step.new_key_step))
        lines.append(step.line)
        errors += step.error is not None
        early += step.early_stopped
        tokens += step.tokens
    return lines, errors, early, tokens


def relabel(files, planner, vlm_path, label_set: str = "vlm", overwrite: bool = False,
            progress: bool = True, keystep_on_line_end: bool = True) -> dict[str, Agreement]:
    """Relabel every episode of the task index ``files``; returns per-task agreement with the oracle."""
    from tqdm import tqdm

    vlm_id = vlm_identity(vlm_path)
    mode = mode_name(keystep_on_line_end)
    todo, done = plan(files, label_set, vlm_id, overwrite, mode)
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
             "mode": mode}
    from envs.skills.replay import RecordedScene

    scene = RecordedScene()
    with tqdm(total=total, unit="step", disable=not progress, desc="relabel") as bar:
        for ep in todo:
            lines, errors, early, tokens = relabel_episode(planner, ep, keystep_on_line_end)
            poses, pose_errors = label_poses(ep, lines, scene)
            write_labels(ep, label_set, lines, {**attrs, "errors": errors, "pose_errors": pose_errors}, poses)
            _, _, oracle = stored_labels(ep, label_set)
            a = stats.setdefault(ep.task, Agreement())
            a.add(lines, oracle, errors, early, tokens)
            a.relabelled += 1
            a.new_steps += len(lines)
            bar.update(len(lines))
    scene.close()
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
