"""Pre- and post-processing of the diffusion policy (kept apart from the network, as in lerobot).

- :class:`Normalizer`: actions to [-1, 1] with the dataset min/max (Diffusion Policy's default,
  which matches ``clip_sample``), proprioception to zero mean / unit std. Its buffers are part of
  the policy's ``state_dict``, so a checkpoint alone restores them.
- :func:`preprocess_images`: uint8 (B, 3, H, W) -> float (B, 3, S, S) in [0, 1], resized to the
  network's image size (data may be recorded at a larger size).
- :func:`conditioning_texts`: which strings a conditioning mode feeds the text encoder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from configs.errors import ConfigError

# conditioning mode -> (label set read from the HDF5 files, instruction source)
CONDITIONING = {
    "code": "oracle",          # oracle code label of the step + cache info
    "code_shifted": "oracle",  # same labels with random subtask-boundary shifts (paper 5.2)
    "vlm": "vlm",              # labels written by VLM relabelling (`make relabel-dp`)
    "task": "oracle",          # flat baseline: the natural-language task prompt only
    "none": "oracle",          # no language at all
}


def check_conditioning(mode: str) -> str:
    if mode not in CONDITIONING:
        raise ConfigError(f"unknown conditioning {mode!r}; use one of {sorted(CONDITIONING)}")
    return mode


def conditioning_texts(mode: str, batch: dict) -> tuple[list[str], list[str]] | None:
    """(instruction texts, cache-info texts) of a batch, or None when the mode uses no language.

    Code modes never see the overall task prompt (paper 4.3: the low-level policy relies only on
    the subtask code); the flat baseline sees only the prompt.
    """
    if mode == "none":
        return None
    if mode == "task":
        return list(batch["prompt"]), [""] * len(batch["prompt"])
    return list(batch["instruction"]), list(batch["cache_info"])


class Normalizer(nn.Module):
    """Action (A,) min/max and proprio (P,) mean/std, from ``datamodules.stats.load_stats``."""

    def __init__(self, action_dim: int = 7, proprio_dim: int = 21):
        super().__init__()
        self.register_buffer("action_min", -torch.ones(action_dim))
        self.register_buffer("action_max", torch.ones(action_dim))
        self.register_buffer("proprio_mean", torch.zeros(proprio_dim))
        self.register_buffer("proprio_std", torch.ones(proprio_dim))

    def set_stats(self, stats: dict) -> "Normalizer":
        def t(x):
            return torch.as_tensor(np.asarray(x), dtype=torch.float32)

        self.action_min.copy_(t(stats["actions"]["min"]))
        self.action_max.copy_(t(stats["actions"]["max"]))
        keys = ("qpos", "qvel", "tcp_pose")
        self.proprio_mean.copy_(torch.cat([t(stats[k]["mean"]) for k in keys]))
        self.proprio_std.copy_(torch.cat([t(stats[k]["std"]) for k in keys]))
        return self

    def _range(self) -> torch.Tensor:
        return (self.action_max - self.action_min).clamp_min(1e-4)  # constant dims stay finite

    def normalize_actions(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.action_min) / self._range() * 2.0 - 1.0

    def unnormalize_actions(self, a: torch.Tensor) -> torch.Tensor:
        return (a.clamp(-1.0, 1.0) + 1.0) / 2.0 * self._range() + self.action_min

    def normalize_proprio(self, p: torch.Tensor) -> torch.Tensor:
        return (p - self.proprio_mean) / self.proprio_std.clamp_min(1e-4)


def preprocess_images(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 1]."""
    x = rgb.float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x
