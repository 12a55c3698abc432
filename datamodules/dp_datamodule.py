"""DataModule of the diffusion policy: oracle steps of one or more task files.

- Train/val split by episode: per task, the last ``val_fraction`` of the episodes (by seed, at
  least one when a task has two or more) are held out.
- A task-balancing sampler draws every task equally often, whatever its episode lengths
  (Lightning wraps it for DDP).
- Workers open the HDF5 files lazily (see ``OracleStepDataset``).
- ``observation: state`` reads object poses instead of images (``lightning_modules/dp/state.py``).
- The label set follows the conditioning mode (``vlm`` reads ``labels/vlm``; ``code_shifted``
  shifts subtask boundaries by up to ``shift_k`` steps, seeded per episode).

Batches are dicts of stacked tensors (shapes in ``datamodules/dataset.py``) and lists of strings.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from configs.errors import ConfigError

from . import schema
from .dataset import OracleStepDataset, dataset_files
from .labels import extract_memory_info
from .stats import load_stats


def split_episodes(files, val_fraction: float) -> dict[str, set[int]]:
    """Held-out seeds per task: the last ``ceil(val_fraction * n)`` seeds (none if n < 2)."""
    held = {}
    for path in files:
        with schema.open_index(path) as f:
            task = str(f.attrs["task"])
            seeds = sorted(int(n[5:]) for n in f["episodes"])
        n_val = min(len(seeds) - 1, math.ceil(val_fraction * len(seeds))) if len(seeds) > 1 else 0
        held[task] = set(seeds[len(seeds) - n_val:]) if n_val > 0 else set()
    return held


def task_balanced_weights(dataset: OracleStepDataset) -> torch.Tensor:
    """Per-sample weights (N,) such that each task's samples sum to 1."""
    steps_per_task: dict[str, int] = {}
    for ep in dataset.episodes:
        steps_per_task[ep.task] = steps_per_task.get(ep.task, 0) + ep.length
    return torch.cat([torch.full((ep.length,), 1.0 / steps_per_task[ep.task]) for ep in dataset.episodes])


class DiffusionPolicyDataModule(L.LightningDataModule):
    def __init__(self, data_dir: str, tasks: list[str], *, label_set: str = "oracle", shift_k: int = 0,
                 horizon: int = 16, batch_size: int = 64, num_workers: int = 2, val_fraction: float = 0.1,
                 balance_tasks: bool = True, seed: int = 0, observation: str = "rgb",
                 chunk_end: str = "episode", load_state: bool | None = None, assignment_objects: bool = False):
        super().__init__()
        self.files = dataset_files(Path(data_dir), list(tasks))
        self.label_set, self.shift_k, self.horizon = label_set, shift_k, horizon
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.balance_tasks, self.seed = val_fraction, balance_tasks, seed
        self.observation = observation  # rgb: camera images; state: object poses (no images read)
        self.chunk_end = chunk_end  # episode | line (see OracleStepDataset)
        # the object poses: the state DP's observation, an image DP's localisation targets
        self.load_state = observation == "state" if load_state is None else bool(load_state)
        self.assignment_objects = assignment_objects  # pose_object_xy (the code targets' teacher; OracleStepDataset)
        self.train_set = self.val_set = None

    def stats(self) -> dict:
        """Normalisation statistics of the dataset (for the policy's Normalizer)."""
        return load_stats(self.files)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        held = split_episodes(self.files, self.val_fraction)
        common = dict(horizon=self.horizon, label_set=self.label_set, shift_k=self.shift_k,
                      shift_seed=self.seed, load_images=self.observation == "rgb",
                      load_state=self.load_state, chunk_end=self.chunk_end,
                      assignment_objects=self.assignment_objects)
        self.train_set = OracleStepDataset(self.files, select=lambda task, s: s not in held[task], **common)
        self.val_set = OracleStepDataset(self.files, select=lambda task, s: s in held[task], **common)
        if len(self.train_set) == 0:
            raise ConfigError(f"no training episodes in {[str(f) for f in self.files]}")

    def resting_object_pixels(self) -> tuple:
        """The training set's resting objects: box centres (N, 2) in [-1, 1], table xy (N, 2) m
        (``OracleStepDataset.resting_object_pixels``)."""
        self.setup()
        return self.train_set.resting_object_pixels()

    def unique_texts(self) -> set[str]:
        """Every instruction, cache info and prompt string of the training set (few, cacheable)."""
        out = set()
        for ep in self.train_set.episodes:
            out.update(ep.labels)
            out.add(ep.prompt)
            out.update(extract_memory_info(ep.key_lines[:i], self.train_set.empty_memory_info)
                       for i in range(len(ep.key_lines) + 1))
            out.update(ep.objects or ())
        return out

    def _loader(self, dataset, sampler=None, shuffle=False) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          multiprocessing_context="spawn" if self.num_workers > 0 else None,
                          drop_last=(sampler is not None or shuffle) and len(dataset) >= self.batch_size)

    def train_dataloader(self) -> DataLoader:
        if self.balance_tasks:
            gen = torch.Generator().manual_seed(self.seed)
            sampler = WeightedRandomSampler(task_balanced_weights(self.train_set), len(self.train_set),
                                            replacement=True, generator=gen)
            return self._loader(self.train_set, sampler=sampler)
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if len(self.val_set) == 0:
            return []
        return self._loader(self.val_set)
