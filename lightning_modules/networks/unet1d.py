"""Conditional 1-D temporal U-Net with FiLM (Diffusion Policy's noise-prediction network).

Hand-written because diffusers' ``UNet1DModel`` has no global-conditioning (FiLM) input.
Structure as in Chi et al. 2023: sinusoidal timestep embedding + MLP, concatenated with the
global condition; each residual block = Conv1d-GroupNorm-Mish, FiLM (per-channel scale and
bias from the condition), Conv1d-GroupNorm-Mish; down path with stride-2 convs, mid blocks,
up path with skip connections and transposed convs.

Shapes: ``sample`` (B, T, action_dim), ``timestep`` (B,) int or float, ``cond`` (B, cond_dim)
-> (B, T, action_dim). T must be divisible by 2 ** (len(channels) - 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, groups: int):
        super().__init__(nn.Conv1d(cin, cout, kernel, padding=kernel // 2), nn.GroupNorm(groups, cout), nn.Mish())


class FiLMResBlock(nn.Module):
    """x (B, cin, T), cond (B, cond_dim) -> (B, cout, T)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, kernel: int = 5, groups: int = 8):
        super().__init__()
        self.block1 = ConvBlock(cin, cout, kernel, groups)
        self.block2 = ConvBlock(cout, cout, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * cout))
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        y = self.block1(x)
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        y = self.block2(scale * y + bias)
        return y + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """Noise predictor eps(x_t, t, cond); see the module docstring for shapes."""

    def __init__(self, action_dim: int, cond_dim: int, channels=(256, 512, 1024), step_embed_dim: int = 256,
                 kernel: int = 5, groups: int = 8):
        super().__init__()
        self.step_embed = nn.Sequential(SinusoidalEmbedding(step_embed_dim), nn.Linear(step_embed_dim, 4 * step_embed_dim),
                                        nn.Mish(), nn.Linear(4 * step_embed_dim, step_embed_dim))
        c = step_embed_dim + cond_dim
        dims = [action_dim, *channels]
        self.down = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(channels) - 1
            self.down.append(nn.ModuleList([FiLMResBlock(cin, cout, c, kernel, groups),
                                            FiLMResBlock(cout, cout, c, kernel, groups),
                                            nn.Identity() if last else nn.Conv1d(cout, cout, 3, 2, 1)]))
        mid = channels[-1]
        self.mid = nn.ModuleList([FiLMResBlock(mid, mid, c, kernel, groups), FiLMResBlock(mid, mid, c, kernel, groups)])
        self.up = nn.ModuleList()
        rev = list(channels[::-1])
        for i, (cin, cout) in enumerate(zip(rev[:-1], rev[1:])):
            self.up.append(nn.ModuleList([FiLMResBlock(2 * cin, cout, c, kernel, groups),
                                          FiLMResBlock(cout, cout, c, kernel, groups),
                                          nn.ConvTranspose1d(cout, cout, 4, 2, 1)]))
        self.final = nn.Sequential(ConvBlock(channels[0], channels[0], kernel, groups),
                                   nn.Conv1d(channels[0], action_dim, 1))
        self.levels = len(channels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if sample.shape[1] % (2 ** (self.levels - 1)):
            raise ValueError(f"horizon {sample.shape[1]} must be divisible by {2 ** (self.levels - 1)}")
        if timestep.dim() == 0:
            timestep = timestep.expand(sample.shape[0])
        g = torch.cat([self.step_embed(timestep.to(sample.device)), cond], dim=-1)
        x = sample.transpose(1, 2)  # (B, action_dim, T)
        skips = []
        for res1, res2, down in self.down:
            x = res2(res1(x, g), g)
            skips.append(x)
            x = down(x)
        for block in self.mid:
            x = block(x, g)
        for res1, res2, up in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = up(res2(res1(x, g), g))
        return self.final(x).transpose(1, 2)
