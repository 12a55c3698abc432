"""PyTorch dataset over oracle HDF5 files: one sample per environment step.

Labels (a few strings per episode) are read once at construction. Images are read lazily per
sample from per-process file handles (safe with DataLoader workers and fork or spawn), one chunk
(one frame) per camera. An episode's low-dim arrays (actions, proprioception, suction, object
poses: a few kB per episode) are read whole on its first sample and kept per process: read per
sample, six small HDF5 reads cost about 100 ms of every batch of 64 (measured), as much as a
third of a cpu-preset training step.

A sample is a dict::

    base_rgb, wrist_rgb  (3, H, W) uint8     cameras at step t
    proprio              (21,) float32       qpos (7), qvel (7), tcp_pose (7)
    suction              (2,) float32        suction on, object attached
    actions              (horizon, 7) float32  actions t .. t+horizon-1; past the episode's end the
                                             last one repeated; with ``chunk_end="line"``, past
                                             the running line's end a hold (no motion, the line's
                                             last suction command): where its recorded skill ended
    action_mask          (horizon,) bool     False on the padded entries
    instruction          str                 the step's code label (key-step or commented)
    cache_info           str                 ExtractMemoryInfo of the memory
    memory               str                 key-step lines before t, newline-joined
    prompt               str                 the natural-language task prompt
    key_step             bool
    task, episode, t     str, str, int

With ``load_state=True`` the sample also holds the privileged state keys of
``lightning_modules.dp.state.state_sample`` (object poses, sizes, names, the episode's
``pose_dict``), and ``object_bbox`` (``MAX_OBJECTS``, 4) float32, the objects' base-image pixel
boxes (``obs/bboxes``, zero-padded): format version 2 files only. With ``assignment_objects=True``
too (the code targets' teacher), ``pose_object_xy`` (``MAX_POSES``, ``MAX_OBJECTS``, 2) float32,
the objects' table positions (m) at the step each ``pose_dict`` value was assigned.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from configs.errors import ConfigError, MissingInputError

from . import schema
from lightning_modules.dp.state import MAX_OBJECTS, MAX_POSES, rests_on_table, state_sample

from .labels import DEFAULT_EMPTY_MEMORY_INFO, extract_memory_info, is_key_step, pose_assignments, shifted_labels


@dataclass
class _Episode:
    file: str
    name: str
    task: str
    seed: int
    prompt: str
    length: int
    labels: list[str]
    key_t: list[int]  # steps that are key-steps
    key_lines: list[str]
    line_ends: list[int]  # per key-step: the step where its recorded skill ended (``line_end``)
    objects: list[str] | None = None  # state: object names, sizes (N, 2) and pose_dict
    sizes: np.ndarray | None = None
    pose_dict: dict | None = None
    pose_assigned_t: list[int] | None = None  # per pose_dict key: the step its (last) assignment ran


def assignment_steps(keys, recorded: list[str]) -> list[int]:
    """Per ``pose_dict`` key, the last recorded key-step whose line assigns it (0 if none): where
    the stored value was computed, from the objects' positions then. (A commented step is never
    an assignment.)"""
    latest = pose_assignments(recorded)
    return [latest[k][0] if k in latest else 0 for k in keys]


CHUNK_ENDS = ("episode", "line")
LOWDIM_KEYS = ("actions", "obs/qpos", "obs/qvel", "obs/tcp_pose", "obs/suction")


class OracleStepDataset(Dataset):
    """Steps of the episodes in ``files`` (task index files, ``<Task>.h5``).

    ``chunk_end``: ``episode`` (Diffusion Policy's chunks: the recorded actions up to the episode's
    end) or ``line`` (not in the paper: a chunk stops at the end of its code line and holds still
    after it, so a code-conditioned DP is never trained on actions that the *next* line asks for
    and that its own line does not tell; the policy holds until the planner moves on, and the new
    key-step regenerates the chunk). The line ends where the skill its label names ended in the
    recording, which is the oracle's next key-step: also under shifted oracle labels
    (``shift_k``) or VLM labels, whose boundaries move only the text (when the VLM wrote as many
    lines as the oracle; else at its own next key-step). Ending chunks at the moved boundaries
    taught the DP to stop a motion up to ``shift_k`` steps early (measured, README, Figure 6).
    """

    def __init__(self, files, horizon: int = 16, label_set: str = "oracle", shift_k: int = 0,
                 shift_seed: int = 0, empty_memory_info: str = DEFAULT_EMPTY_MEMORY_INFO,
                 select: Callable[[str, int], bool] | None = None, load_images: bool = True,
                 load_state: bool = False, chunk_end: str = "episode", assignment_objects: bool = False):
        self.files = [str(f) for f in files]
        self.horizon = int(horizon)
        self.empty_memory_info = empty_memory_info
        self.load_images, self.load_state = load_images, load_state
        if assignment_objects and not load_state:
            raise ConfigError("assignment_objects (pose_object_xy) needs load_state")
        self.assignment_objects = assignment_objects
        if chunk_end not in CHUNK_ENDS:
            raise ConfigError(f"chunk_end must be one of {CHUNK_ENDS}, got {chunk_end!r}")
        self.chunk_end = chunk_end
        self.episodes: list[_Episode] = []
        for path in self.files:
            with schema.open_index(path) as f:
                task = str(f.attrs["task"])
                for name in f["episodes"]:
                    seed = int(name[5:])
                    if select is not None and not select(task, seed):
                        continue
                    ep = f["episodes"][name]
                    group = f"labels/{label_set}"
                    if group not in ep:
                        raise schema.SchemaError(f"{path}:{name} has no label set {label_set!r}; "
                                                 f"has {sorted(ep['labels'])}")
                    labels = recorded = list(ep[f"{group}/code"].asstr()[:])
                    if label_set != "oracle":
                        recorded = list(ep["labels/oracle/code"].asstr()[:]) if "labels/oracle" in ep else labels
                    if shift_k > 0:
                        labels = shifted_labels(labels, shift_k, np.random.default_rng([shift_seed, seed]))
                    key_t = [t for t, lab in enumerate(labels) if is_key_step(lab)]
                    length = int(ep.attrs["num_steps"])
                    # the skills' recorded ends are the oracle's key-steps (see the class docstring)
                    recorded_t = key_t if recorded is labels else [t for t, lab in enumerate(recorded) if is_key_step(lab)]
                    line_ends = (recorded_t if len(recorded_t) == len(key_t) else key_t)[1:] + [length]
                    episode = _Episode(path, name, task, seed, str(ep.attrs["prompt"]), length, labels, key_t,
                                       [labels[t] for t in key_t], line_ends)
                    if load_state:
                        if "object_pose" not in ep["obs"] or "radius" not in ep["objects"]:
                            raise schema.SchemaError(
                                f"{path}:{name} (format version {int(ep.attrs['version'])}) has no object "
                                f"poses, which the state observation needs: regenerate it with `make data`")
                        episode.objects = list(ep["objects/name"].asstr()[:])
                        episode.sizes = np.stack([ep["objects/height"][:], ep["objects/radius"][:]], 1)
                        episode.pose_dict = schema.read_pose_dict(ep[group])
                        if assignment_objects:
                            episode.pose_assigned_t = assignment_steps(episode.pose_dict, recorded)
                    self.episodes.append(episode)
        self._offsets = np.cumsum([0] + [e.length for e in self.episodes])
        self._handles: dict[str, object] = {}
        self._groups: dict[tuple[str, str], object] = {}
        self._lowdim: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self._pid = None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _group(self, ep: _Episode):
        """The episode's HDF5 group, opened once per process (external links stay open)."""
        self._this_process()
        key = (ep.file, ep.name)
        if key not in self._groups:
            if ep.file not in self._handles:
                self._handles[ep.file] = schema.open_index(ep.file)
            self._groups[key] = self._handles[ep.file]["episodes"][ep.name]
        return self._groups[key]

    def _this_process(self) -> None:
        """In a new (worker) process, start with no HDF5 handles and no cached arrays: never shared."""
        if self._pid != os.getpid():
            self._handles, self._groups, self._lowdim, self._pid = {}, {}, {}, os.getpid()

    def _arrays(self, ep: _Episode) -> dict[str, np.ndarray]:
        """The episode's low-dim arrays (``LOWDIM_KEYS``, with ``obs/object_pose`` for the state),
        read whole once per process."""
        self._this_process()
        key = (ep.file, ep.name)
        arrays = self._lowdim.get(key)
        if arrays is None:
            g = self._group(ep)
            keys = LOWDIM_KEYS + (("obs/object_pose", "obs/bboxes") if self.load_state else ())
            arrays = self._lowdim[key] = {k: g[k][:] for k in keys}
        return arrays

    def locate(self, index: int) -> tuple[_Episode, int]:
        e = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self.episodes[e], int(index - self._offsets[e])

    def resting_object_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """Every recorded step's objects that rest on the table (``rests_on_table``; needs
        ``load_state``): their base-image box centres as (N, 2)
        (x, y) in [-1, 1] of the image, and their table positions (N, 2) in metres. For the
        named-object keypoints' pixel-to-table map (``lightning_modules/dp/keypoints.py``)."""
        if not self.load_state:
            raise ValueError("resting_object_pixels needs the recorded objects (load_state)")
        uv, xy = [], []
        for path in sorted({ep.file for ep in self.episodes}):  # own handles: the dataset keeps none (picklable)
            with schema.open_index(path) as f:
                for ep in (e for e in self.episodes if e.file == path):
                    g = f["episodes"][ep.name]
                    boxes, pose = g["obs/bboxes"][:], g["obs/object_pose"][:]  # (T, N, 4) px, (T, N, 7)
                    keep = (boxes[..., 2] > boxes[..., 0]) & rests_on_table(pose[..., 2], ep.sizes[None, :, 0])
                    centres = np.stack([boxes[..., 0] + boxes[..., 2], boxes[..., 1] + boxes[..., 3]], -1) / 2
                    uv.append(centres[keep] / g["obs/base_rgb"].shape[2] * 2 - 1)
                    xy.append(pose[..., :2][keep])
        return np.concatenate(uv).astype(np.float32), np.concatenate(xy).astype(np.float32)

    @staticmethod
    def line_end(ep: _Episode, t: int) -> int:
        """The step where the skill of the line labelling ``t`` ended in the recording: with the
        oracle's labels the next key-step after t (or the episode's end); it may be t or earlier
        under shifted or VLM labels (the label still names a skill that has ended)."""
        i = bisect.bisect_right(ep.key_t, t) - 1
        if i < 0:
            return ep.key_t[0] if ep.key_t else ep.length
        return ep.line_ends[i]

    def memory(self, ep: _Episode, t: int) -> list[str]:
        return ep.key_lines[: bisect.bisect_left(ep.key_t, t)]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        ep, t = self.locate(index)
        a = self._arrays(ep)
        end = min(t + self.horizon, ep.length)
        line_end = self.line_end(ep, t) if self.chunk_end == "line" else ep.length
        stop = max(min(end, line_end), t)  # t: the labelled skill has already ended, hold at once
        actions = a["actions"][t:stop]
        pad = self.horizon - len(actions)
        mask = np.ones(self.horizon, dtype=bool)
        if pad:
            last = min(stop, line_end) - 1  # the line's last recorded action
            filler = a["actions"][last:last + 1].copy()
            if line_end < end:  # the line ends inside the chunk: hold still, keep the suction command
                filler[:, :6] = 0.0
            actions = np.concatenate([actions, np.repeat(filler, pad, axis=0)])
            mask[-pad:] = False
        memory = self.memory(ep, t)
        sample = {
            "proprio": torch.from_numpy(np.concatenate([a["obs/qpos"][t], a["obs/qvel"][t], a["obs/tcp_pose"][t]])),
            "suction": torch.from_numpy(a["obs/suction"][t].copy()),
            "actions": torch.from_numpy(actions.astype(np.float32)),
            "action_mask": torch.from_numpy(mask),
            "instruction": ep.labels[t],
            "cache_info": extract_memory_info(memory, self.empty_memory_info),
            "memory": "\n".join(memory),
            "prompt": ep.prompt,
            "key_step": is_key_step(ep.labels[t]),
            "task": ep.task,
            "episode": ep.name,
            "t": t,
        }
        if self.load_state:
            sample.update(state_sample(ep.objects, ep.sizes, a["obs/object_pose"][t], ep.pose_dict))
            boxes = np.zeros((MAX_OBJECTS, 4), np.float32)  # base-image pixel boxes (named-object keypoints)
            boxes[: len(ep.objects)] = a["obs/bboxes"][t]
            sample["object_bbox"] = torch.from_numpy(boxes)
        if self.assignment_objects:  # the objects' table positions when each pose_dict value was computed
            assigned = np.zeros((MAX_POSES, MAX_OBJECTS, 2), np.float32)
            for p, t_assigned in enumerate(ep.pose_assigned_t):
                assigned[p, : len(ep.objects)] = a["obs/object_pose"][t_assigned, :, :2]
            sample["pose_object_xy"] = torch.from_numpy(assigned)
        if self.load_images:
            g = self._group(ep)
            for k in schema.RGB_KEYS:
                sample[k] = torch.from_numpy(g[f"obs/{k}"][t]).permute(2, 0, 1).contiguous()
        return sample


def resolve_dataset_tasks(spec, folder) -> list[str]:
    """Task names of ``spec`` for a dataset folder: our suite's tasks and levels
    (``envs.resolve_tasks``), plus any other name whose index file ``<folder>/<name>.h5`` exists
    (imported data keeps ClevrSkills' names where the suite has no such task, e.g. ``Touch``)."""
    import envs

    folder = Path(folder)
    try:
        return envs.resolve_tasks(spec, extra_tasks={p.stem for p in folder.glob("*.h5")})
    except envs.UnknownTaskError as e:
        raise envs.UnknownTaskError(f"{e}; nor is there such a task index file <name>.h5 in {folder}") from None


def dataset_files(folder, tasks: list[str], check: bool = True) -> list[Path]:
    """Index files of ``tasks`` in a dataset folder; a clear error names what is missing. With
    ``check`` every episode file is opened and its shapes checked first (``datamodules.check``,
    quick form): a bad one raises :class:`~datamodules.schema.SchemaError` naming it and the
    repair command, before any training step."""
    from .check import check_dataset, repair_command

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"no dataset folder {folder}; generate one with "
                                f"`make data TASKS={','.join(tasks)} OUT={folder}`")
    files = [folder / f"{t}.h5" for t in tasks]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise MissingInputError(f"missing dataset files {missing}; generate them with "
                                f"`make data TASKS={','.join(tasks)} OUT={folder}`")
    if check:
        _, problems = check_dataset(folder, tasks, decode_images=False, parse_labels=False)
        if problems:
            first = problems[0]
            raise schema.SchemaError(
                f"{len(problems)} bad episode file(s) in {folder}, e.g. {first.path}: {first.reason}; "
                f"move them aside with `{repair_command(folder)}`, then regenerate them with `make data` "
                f"(same TASKS, EPISODES and OUT)")
    return files
