"""Named-object keypoints of the image DP (``model.object_keypoint_weight`` > 0; not in the paper).

The objects a code line hands to ``get_actor('...')`` are found in the base camera's image by
text-conditioned attention over a feature map, and their image positions become observation
tokens, as the state DP's role tokens give it the named objects' positions (``state.py``).

Why: the image DP did not learn to find the named object within CPU hours. Its spatial-softmax
keypoints on the last 4x4 map put the first named object 6-8 cm from where it is at an episode's
start, where the object is 20 cm from the TCP and a pick needs about 1 cm (README, "Measured
closed-loop success", session 24). Here the search runs on a 28x28 map (2 px cells in a 56 px
crop, about 2 cm on the table), and it is taught directly: a cross-entropy between its
attention and a Gaussian around the named object's box centre (``obs/bboxes``, recorded in
training only), a CenterNet-style dense target that says where, not only how far off.

Per row and role r (the r-th distinct name in the line's ``get_actor`` calls, at most 2; with
``keypoint_memory_names``, config ``model.keypoint_memory_names``, then the names in the cache
info's assignments of the ``pose_dict`` keys the line reads: ``named_objects``)::

    feature map   (B, dim, h, w)   1x1 projections of ResNet stages 1-3, upsampled to stage 1's map
    query         (B, R, dim)      an MLP of the name's frozen text embedding (its tokens' mean)
    attention     (B, R, h*w)      softmax over positions of query . features / sqrt(dim)
    uv            (B, R, 2)        its expected pixel (x, y) in the uncropped image, then in [-1, 1]
    xy            (B, R, 2)        a map of uv to the table (decimetres): the base camera is fixed
    token         (B, R, d_model)  an MLP of (uv, xy, xy - tcp, 1), zeros where the line names no object

The map to the table (``keypoint_table_map``) is either ``learned``: an MLP trained by an MSE to
the object's recorded position with uv detached, so it only reads the attention; or
``homography``: the projective map of the table plane that a fixed camera gives, fitted by least
squares to the training data's resting objects (box centre -> position) before training
(``fit_homography``; on the L0 data a median 0.4 cm from the objects, where the learned map of
session 25 was 1.2 cm off). A pixel is a ray, not a point: either map is one only for objects at
rest on the table. ``keypoint_table_resting_only`` therefore teaches the learned map only where the
named object rests (not lifted, not stacked). ``peak_window`` (test time only): see ``attention``.
A task prompt has no ``get_actor`` calls: there the objects are the names of the suite's vocabulary
that it mentions, in order (``envs.objects.OBJECT_NAME``), so that a flat DP's prompt grounds its
objects as a code line does, as the state DP's mention roles do for either text.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from configs.errors import ConfigError
from datamodules.labels import POSE_DICT_READ, pose_assignments
from envs.objects import OBJECT_NAME

from .state import MAX_ROLES, POS_SCALE, mlp

GET_ACTOR = re.compile(r"get_actor\(\s*['\"]([^'\"]+)['\"]\s*\)")
HEATMAP_SIGMA_PX = 1.5  # the Gaussian target's std in image pixels (objects are 8-11 px across at 64 px)
TOKEN_FEATURES = 2 + 2 + 2 + 1  # uv, xy, xy - tcp, present
TABLE_MAPS = ("learned", "homography")  # keypoint_table_map: how an image position becomes a table position


def named_objects(text: str, memory_info: str | None = None) -> list[str]:
    """The distinct names a line passes to ``get_actor``, in order, at most ``MAX_ROLES``; for a text
    without ``get_actor`` calls (a task prompt), the object names it mentions (``OBJECT_NAME``). With
    ``memory_info`` (the cache info: the memory's ``pose_dict`` assignments) then also the names in
    the latest assignments of the keys the line reads (``labels.pose_assignments``): for
    ``move3d(pose_dict['target'])`` after
    ``pose_dict['target'] = free_space_next_to(get_actor('a'), get_actor('b'), ...)``, a and b."""
    names: list[str] = []
    mentions = [m.group(1) for m in GET_ACTOR.finditer(text or "")] or OBJECT_NAME.findall(text or "")
    for name in mentions:
        if name not in names:
            names.append(name)
    if memory_info:
        reads = {m.group(2) for m in POSE_DICT_READ.finditer(text or "")}
        for key, (_, line) in pose_assignments(memory_info.splitlines()).items():  # in memory order
            if key in reads:
                names += [n for n in named_objects(line) if n not in names]
    return names[:MAX_ROLES]


class NamedObjectKeypoints(nn.Module):
    """Base-camera feature maps + the line's named objects -> keypoint tokens (see the module docstring)."""

    def __init__(self, stage_channels: tuple[int, ...], stage_strides: tuple[int, ...], text_dim: int,
                 d_model: int, dim: int = 32, peak_window: int = 0, table_map: str = "learned"):
        super().__init__()
        if table_map not in TABLE_MAPS:
            raise ConfigError(f"unknown keypoint_table_map {table_map!r}; use one of {list(TABLE_MAPS)}")
        self.table_map = table_map
        self.stride = stage_strides[0]  # of the finest map, in pixels of the (resized) image
        self.peak_window = int(peak_window)
        if self.peak_window < 0:
            raise ConfigError(f"keypoint_peak_window={self.peak_window} must be >= 0 (0: the whole map)")
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in stage_channels)
        self.query = mlp(text_dim, 2 * dim, dim)
        if table_map == "learned":
            self.to_xy = mlp(2, 64, 2)
        else:  # the plane-to-plane projection, fitted to the training data (fit_homography)
            self.register_buffer("homography", torch.eye(3))
        self.token = mlp(TOKEN_FEATURES, d_model, d_model)
        self.dim = dim

    def forward(self, maps: list[torch.Tensor], offset: tuple[int, int], image_size: int, names: list[list[str]],
                tcp: torch.Tensor, text_encoder) -> dict:
        """``maps``: ResNet stage outputs, finest first (B, C_k, h_k, w_k); ``offset``: the crop's
        (row, column) in the resized image of ``image_size`` px; ``names``: each row's named objects;
        ``tcp`` (B, 3) m. Returns ``tokens`` (B, R, d_model), ``present`` (B, R) bool, ``logits``
        (B, R, h*w), ``uv`` (B, R, 2) in [-1, 1] of the uncropped image, ``xy`` (B, R, 2) dm, and
        the ``names`` searched for."""
        h, w = maps[0].shape[-2:]
        feat = sum(F.interpolate(p(m), size=(h, w), mode="bilinear", align_corners=False) if m.shape[-2:] != (h, w)
                   else p(m) for p, m in zip(self.proj, maps))
        B, R = feat.shape[0], MAX_ROLES
        vec, present = self._name_vectors(names, text_encoder, feat.device)
        q = self.query(vec)  # (B, R, dim)
        logits = torch.einsum("brd,bdp->brp", q, feat.flatten(2)) * self.dim ** -0.5
        uv_px = self.attention(logits, h, w) @ self.pixel_grid(h, w, offset, feat.device)  # (B, R, 2)
        uv = uv_px / image_size * 2 - 1
        xy = self.table_xy(uv.detach())
        rel = xy - tcp[:, None, :2] * POS_SCALE
        feats = torch.cat([uv, xy, rel, torch.ones(B, R, 1, device=feat.device)], -1) * present[..., None]
        tokens = self.token(feats) * present[..., None]
        return {"tokens": tokens, "present": present, "logits": logits, "uv": uv, "xy": xy,
                "grid": (h, w, offset), "names": names}

    def table_xy(self, uv: torch.Tensor) -> torch.Tensor:
        """(..., 2) image positions in [-1, 1] -> (..., 2) table positions (dm)."""
        if self.table_map == "learned":
            return self.to_xy(uv)
        p = torch.cat([uv, torch.ones_like(uv[..., :1])], -1) @ self.homography.T
        return p[..., :2] / p[..., 2:].clamp_min(1e-6)

    @torch.no_grad()
    def fit_homography(self, uv: torch.Tensor, xy: torch.Tensor) -> float:
        """Fit the ``homography`` map (``table_map: homography``) to image positions ``uv`` (N, 2)
        in [-1, 1] and table positions ``xy`` (N, 2) in dm by least squares (the direct linear
        transform with h33 = 1); returns the median error (dm) on them."""
        if len(uv) < 4:
            raise ValueError(f"a homography needs at least 4 points, got {len(uv)}")
        u, v, x, y = uv[:, 0].double(), uv[:, 1].double(), xy[:, 0].double(), xy[:, 1].double()
        one, zero = torch.ones_like(u), torch.zeros_like(u)
        rows = torch.cat([torch.stack([u, v, one, zero, zero, zero, -u * x, -v * x], 1),
                          torch.stack([zero, zero, zero, u, v, one, -u * y, -v * y], 1)])
        h = torch.linalg.lstsq(rows, torch.cat([x, y])[:, None]).solution[:, 0]
        self.homography.copy_(torch.cat([h, h.new_ones(1)]).view(3, 3).float())
        return float((self.table_xy(uv.float()) - xy.float()).norm(dim=-1).median())

    def attention(self, logits: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, R, h*w) weights of the expected pixel: the softmax over the whole map, or at test
        time (eval mode) with ``peak_window`` k > 0 only over the (2k+1)^2 cells around its peak
        cell (a soft-argmax of the mode: an attention split between two like objects, e.g. a red
        triangle and a red hexagon, then points at one of them instead of between them). Training
        keeps the whole map, so the DP's loss reaches every cell's logit through the pixel."""
        if not self.peak_window or self.training:
            return logits.softmax(-1)
        peak = logits.argmax(-1)  # (B, R)
        rows = torch.arange(h * w, device=logits.device) // w
        cols = torch.arange(h * w, device=logits.device) % w
        near = (((rows - (peak // w)[..., None]).abs() <= self.peak_window)
                & ((cols - (peak % w)[..., None]).abs() <= self.peak_window))
        return logits.masked_fill(~near, float("-inf")).softmax(-1)

    def pixel_grid(self, h: int, w: int, offset: tuple[int, int], device) -> torch.Tensor:
        """(h*w, 2) pixel (x, y) of each cell's centre in the uncropped image."""
        s = self.stride
        ys = torch.arange(h, device=device, dtype=torch.float32) * s + (s - 1) / 2 + offset[0]
        xs = torch.arange(w, device=device, dtype=torch.float32) * s + (s - 1) / 2 + offset[1]
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([xx.flatten(), yy.flatten()], -1)

    def heatmap_loss(self, out: dict, centres_px: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the attention (``out['logits']``) against a Gaussian (std
        ``HEATMAP_SIGMA_PX``) around each role's box centre ``centres_px`` (B, R, 2) in uncropped
        pixels, over the roles with ``known`` (B, R) True; 0 if none."""
        h, w, offset = out["grid"]
        grid = self.pixel_grid(h, w, offset, centres_px.device)
        d2 = ((grid[None, None] - centres_px[:, :, None]) ** 2).sum(-1)  # (B, R, h*w)
        target = (-d2 / (2 * HEATMAP_SIGMA_PX ** 2)).softmax(-1)
        ce = -(target * out["logits"].log_softmax(-1)).sum(-1)
        return (ce * known).sum() / known.sum().clamp_min(1)

    def _name_vectors(self, names: list[list[str]], text_encoder, device):
        vec = torch.zeros(len(names), MAX_ROLES, self.query[0].in_features, device=device)
        present = torch.zeros(len(names), MAX_ROLES, dtype=torch.bool, device=device)
        unique = sorted({n for ns in names for n in ns})
        if unique:
            means = text_encoder.mean_embeddings(unique)
            index = {n: i for i, n in enumerate(unique)}
            for b, ns in enumerate(names):
                for r, n in enumerate(ns):
                    vec[b, r], present[b, r] = means[index[n]], True
        return vec, present
