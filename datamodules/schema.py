"""HDF5 layout of oracle datasets (documented in README, "Data schema").

A dataset folder holds, per task, an index file ``<Task>.h5`` whose ``episodes/`` group has one
HDF5 *external link* per episode, to ``<Task>/seed_<seed>.h5:/episode``. Each episode file is
written whole to a temporary name and renamed: a crash never leaves a half-written episode,
and the index is rebuilt (also atomically) from the episode files. ``manifest.json`` records
the generator config, version, seeds, counts and success rates.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from configs.errors import UserError

FORMAT = "code2action-oracle"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 lacks obs/object_pose, objects/radius and labels/*/pose_*
RGB_KEYS = ("base_rgb", "wrist_rgb")
LOW_DIM_KEYS = ("qpos", "qvel", "tcp_pose", "suction", "bboxes", "object_pose")
STR = h5py.string_dtype("utf-8")
# A label set's ``notation`` attribute: absent or API_NOTATION = lines of our skill API (parsed by
# envs.skills.Interpreter); anything else (ClevrSkills' converter notation) is text only.
API_NOTATION = "code2action-api"


class SchemaError(UserError, ValueError):
    """A file that is not a valid dataset of this format/version."""


def episode_name(seed: int) -> str:
    return f"seed_{seed:07d}"


def write_episode(path: Path, episode, observations: dict[str, np.ndarray], labels: list[str],
                  key_steps: list[bool], success_per_step: np.ndarray, objects,
                  pose_dict: dict | None = None, extra=None) -> None:
    """Atomically write one episode file (``path`` appears complete or not at all).

    ``observations``: stacked arrays (T, ...) as in ``envs.tabletop.observation_arrays``;
    ``labels``: per-step code (key-step plain, later steps commented); ``objects``: specs;
    ``pose_dict``: key -> position (3,) the oracle stored (``labels/oracle/pose_keys|pose_values``);
    ``extra``: optional callable given the ``/episode`` group before the file is closed, to add
    attributes, datasets or label sets (the ClevrSkills importer's robot attributes and second
    label set); what it writes is just as atomic as the rest.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("episode")
            g.attrs.update(format=FORMAT, version=VERSION, task=episode.task, seed=episode.seed,
                           prompt=episode.prompt, success=bool(episode.success), num_steps=len(episode))
            obs = g.create_group("obs")
            for k in RGB_KEYS:
                if k in observations:
                    a = observations[k]
                    obs.create_dataset(k, data=a, chunks=(1, *a.shape[1:]), compression="lzf")
            for k in LOW_DIM_KEYS:
                obs.create_dataset(k, data=observations[k].astype(np.float32))
            g.create_dataset("actions", data=np.asarray(episode.actions, dtype=np.float32))
            g.create_dataset("success", data=np.asarray(success_per_step, dtype=bool))
            write_label_set(g, "oracle", labels, key_steps, pose_dict)
            o = g.create_group("objects")
            o.create_dataset("name", data=np.array([s.name for s in objects], dtype=object), dtype=STR)
            o.create_dataset("shape", data=np.array([s.shape for s in objects], dtype=object), dtype=STR)
            o.create_dataset("colour", data=np.array([s.colour for s in objects], dtype=object), dtype=STR)
            o.create_dataset("height", data=np.array([s.height for s in objects], dtype=np.float32))
            o.create_dataset("radius", data=np.array([s.radius for s in objects], dtype=np.float32))
            if extra is not None:
                extra(g)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_label_set(episode_group, name: str, labels: list[str], key_steps: list[bool],
                    pose_dict: dict | None = None, **attrs):
    """Create ``labels/<name>`` in an ``/episode`` group: ``code`` (T,) str, ``key_step`` (T,) bool,
    the ``pose_dict`` datasets, and ``attrs`` as its attributes (e.g. ``notation``). Returns it."""
    lab = episode_group.create_group(f"labels/{name}")
    lab.create_dataset("code", data=np.array(labels, dtype=object), dtype=STR)
    lab.create_dataset("key_step", data=np.asarray(key_steps, dtype=bool))
    write_pose_dict(lab, pose_dict or {})
    lab.attrs.update(attrs)
    return lab


def label_notation(label_group) -> str:
    """The notation of a ``labels/<name>`` group (``API_NOTATION`` when it does not say)."""
    return str(label_group.attrs.get("notation", API_NOTATION))


def write_pose_dict(group, pose_dict: dict) -> None:
    """Store ``pose_dict`` (key -> position (3,)) in a label group as ``pose_keys`` (K,) str and
    ``pose_values`` (K, 3) float32: the positions the code's ``pose_dict['key']`` reads refer to."""
    keys = sorted(pose_dict)
    group.create_dataset("pose_keys", data=np.array(keys, dtype=object), dtype=STR)
    group.create_dataset("pose_values", data=np.array([pose_dict[k] for k in keys], dtype=np.float32).reshape(-1, 3))


def read_pose_dict(group) -> dict[str, tuple[float, float, float]]:
    """The ``pose_dict`` of a label group (empty for version-1 files, which did not record it)."""
    if "pose_keys" not in group:
        return {}
    return {k: tuple(float(v) for v in vals)
            for k, vals in zip(group["pose_keys"].asstr()[:], group["pose_values"][:])}


def write_index(index_path: Path, task: str, seeds: list[int]) -> None:
    """Atomically (re)write ``<Task>.h5`` linking the given episodes, in seed order."""
    fd, tmp = tempfile.mkstemp(dir=index_path.parent, prefix=index_path.name, suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=FORMAT, version=VERSION, task=task, num_episodes=len(seeds))
            g = f.create_group("episodes")
            for seed in sorted(seeds):
                g[episode_name(seed)] = h5py.ExternalLink(f"{task}/{episode_name(seed)}.h5", "/episode")
        os.replace(tmp, index_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_index(path: str | Path) -> h5py.File:
    """Open a task index file read-only, checking format and version."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise SchemaError(f"{path}: not a readable HDF5 file ({e})") from None
    fmt, version = f.attrs.get("format"), f.attrs.get("version")
    if fmt != FORMAT:
        f.close()
        raise SchemaError(f"{path}: not a {FORMAT} file (format attribute {fmt!r})")
    if version is None or int(version) not in READABLE_VERSIONS:
        f.close()
        raise SchemaError(f"{path}: format version {version}, this code reads versions {READABLE_VERSIONS}")
    if "episodes" not in f:
        f.close()
        raise SchemaError(f"{path}: has no 'episodes' group")
    return f


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}
