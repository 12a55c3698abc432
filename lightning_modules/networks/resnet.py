"""ResNet-18 with GroupNorm, trained from scratch (paper 4.3, as in Diffusion Policy).

Hand-written because torchvision's only wheel here is a CUDA build that breaks the CPU torch
(and with it lightning, torchmetrics and transformers). Same topology as torchvision's
``resnet18``: 7x7 stem, max-pool, 4 stages of 2 basic blocks; BatchNorm is replaced by
GroupNorm (groups = channels // 16), which behaves the same in train and eval and with EMA.
``width`` scales the channels (64 for the paper, smaller for the CPU preset). ``maxpool=False``
drops the stem's max-pool, so a small image keeps twice the resolution in every stage (a 56 px
crop ends on a 4x4 map instead of 2x2; the issue's diagnosis measured it, with spatial softmax, as
the better image encoder for 64 px images).

``pool``: how the last feature map becomes one vector. ``spatial_softmax`` (default) is Diffusion
Policy's (robomimic's): a 1x1 conv to ``keypoints`` maps, a softmax over positions per map, and
the expected (x, y) of each, i.e. where things are; the paper says only "a standard ResNet-18",
so we take Diffusion Policy's choice. ``avg`` is torchvision's global average pool, which keeps
what is in the image but little of where (kept for comparison and older checkpoints).

``film_dim`` > 0 conditions every basic block on a vector (B, film_dim), as RT-1's FiLM-EfficientNet
conditions its image tower on the instruction: the block's output before the residual sum becomes
``y * (1 + gamma) + beta`` with (gamma, beta) a linear map of the vector, zero-initialised so the
network starts as the plain ResNet. Not in the paper (its ResNet sees the image alone); why: with
one vector per camera the pooled text must pick the named object out of a summary of all of them,
and the cpu image DP did not learn that (README, "Measured closed-loop success").
"""

from __future__ import annotations

import torch
from torch import nn

from configs.errors import ConfigError


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // 16), channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, film_dim: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))
        self.film = None
        if film_dim > 0:
            self.film = nn.Linear(film_dim, 2 * cout)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, film: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.film is not None:
            gamma, beta = self.film(film)[:, :, None, None].chunk(2, 1)
            y = y * (1 + gamma) + beta
        return torch.relu(y + (x if self.skip is None else self.skip(x)))


class SpatialSoftmax(nn.Module):
    """Feature map (B, C, h, w) -> keypoints (B, 2 * keypoints): the softmax-weighted mean (x, y)
    in [-1, 1] of each of ``keypoints`` 1x1-conv maps (temperature 1, as Diffusion Policy)."""

    def __init__(self, channels: int, keypoints: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(channels, keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.conv(x)
        b, k, h, w = maps.shape
        attn = maps.flatten(2).softmax(-1)  # (B, K, h*w)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                                indexing="ij")
        grid = torch.stack([xs.flatten(), ys.flatten()], -1).to(attn.dtype)  # (h*w, 2)
        return (attn @ grid).flatten(1)


class ResNet18GN(nn.Module):
    """Image (B, 3, H, W) float in [0, 1] (and with ``film_dim`` a conditioning vector
    (B, film_dim)) -> feature (B, out_dim) (``pool``, then a linear layer)."""

    POOLS = ("spatial_softmax", "avg")

    def __init__(self, out_dim: int = 512, width: int = 64, pool: str = "spatial_softmax", keypoints: int = 32,
                 maxpool: bool = True, film_dim: int = 0):
        super().__init__()
        if pool not in self.POOLS:
            raise ConfigError(f"unknown image pool {pool!r}; pools: {list(self.POOLS)}")
        w = width
        stem = [nn.Conv2d(3, w, 7, 2, 3, bias=False), _norm(w), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*stem, *([nn.MaxPool2d(3, 2, 1)] if maxpool else []))  # no weights either way
        stages, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(cin, cout, stride, film_dim), BasicBlock(cout, cout, 1, film_dim)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.keypoints = SpatialSoftmax(cin, keypoints) if pool == "spatial_softmax" else None
        self.head = nn.Linear(2 * keypoints if self.keypoints is not None else cin, out_dim)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

        self.film_dim = int(film_dim)
        # the maps ``forward(..., maps=True)`` returns: the ends of stages 1-3, finest first
        first = 4 if maxpool else 2
        self.map_channels = (w, 2 * w, 4 * w)
        self.map_strides = (first, 2 * first, 4 * first)

    def forward(self, images: torch.Tensor, film: torch.Tensor | None = None, maps: bool = False):
        """The feature (B, out_dim); with ``maps`` also the stage 1-3 outputs [(B, C_k, H / s_k,
        W / s_k)] (channels ``map_channels``, strides ``map_strides``), for a finer search than the
        last map's."""
        if (film is None) != (self.film_dim == 0):
            raise ValueError(f"ResNet18GN(film_dim={self.film_dim}) got {'no' if film is None else 'a'} film vector")
        x = self.stem((images - self.mean) / self.std)
        stage_ends = []
        for i, block in enumerate(self.stages):
            x = block(x, film)
            if i in (1, 3, 5):
                stage_ends.append(x)
        out = self.head(self.keypoints(x) if self.keypoints is not None else x.mean(dim=(2, 3)))
        return (out, stage_ends) if maps else out
