"""The privileged ``state`` observation of the diffusion policy: object-centric tokens.

Not the paper's setting (the paper's DP sees camera images; ``model.observation: rgb``). It is
ManiSkill's ``state`` observation mode, made for CPU users: an image DP needs GPU hours to learn
to localise objects, a state DP learns within minutes, so the whole hierarchy (VLM plans, DP
acts) can be run and seen to work without a GPU.

Per sample (the batch keys of :func:`state_sample`, padded to ``MAX_OBJECTS`` / ``MAX_POSES``)::

    object_pose    (M, 7) float32   world position (m) and quaternion wxyz of each object
    object_size    (M, 2) float32   height, footprint radius (m)
    object_mask    (M,) bool        True for a real object
    object_names   str              the objects' names, newline-joined ("red cube\\nblue cylinder")
    pose_keys      str              the keys of the episode's ``pose_dict``, newline-joined
    pose_values    (P, 3) float32   their stored positions (m), in the order of ``pose_keys``

Tokens (``StateTokens``), each ``d_model`` wide:
  * one per object: its name's frozen text embedding (mean over tokens), its pose, its size and
    its position relative to the TCP, plus a *mention* embedding: the object named first in the
    conditioning text gets role 1, the second role 2 (``mention_roles``). The rule reads object
    names in whatever text conditions the DP, so the flat baseline's task prompt gets the same
    grounding as a code line: what differs between them is only what the text says.
  * one per ``pose_dict['key']`` read in the conditioning text (in order, at most
    ``MAX_TARGETS``): the stored position, its offset from the TCP and, with ``object_offset``
    (config ``model.target_object_offset``, default off), its offset from the role-1 object, zero
    when the text names none. A task prompt has none. The object offset makes a push's remaining
    distance (goal - object) linear in the features; measured, it did not help DP+Oracle on L0
    (Push 8/32 against 15/32 without, one training each; README), so it is off by default.
  * ``skip``: the tokens of role 1, role 2 and the two targets (zeros where absent), which feed
    FiLM directly (with the proprio and suction tokens), as ``obs_skip`` does for the cameras.
Positions are scaled by ``POS_SCALE`` (metres to decimetres) so that features are of order 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from datamodules.labels import POSE_DICT_READ

MAX_OBJECTS = 4  # tasks have 1 or 3 objects
MAX_POSES = 6  # pose_dict entries per episode
MAX_ROLES = 2  # no skill takes more than two objects
MAX_TARGETS = 2  # pose_dict reads per line
POS_SCALE = 10.0
RESTING_TOLERANCE_M = 0.01  # an object rests on the table if its centre is at most this above half its height
OBJECT_FEATURES = 3 + 4 + 2 + 3  # position, quaternion, size, position - tcp
TARGET_FEATURES = 3 + 3 + 3  # position, position - tcp, position - role-1 object
BASE_TARGET_FEATURES = 3 + 3  # without the object offset
N_SKIP = MAX_ROLES + MAX_TARGETS


def mention_roles(text: str, names: list[str]) -> list[int]:
    """Role of each name in ``text``: 1 for the first mentioned, 2 for the second, 0 otherwise."""
    found = sorted((text.find(n), i) for i, n in enumerate(names) if n and n in text)
    roles = [0] * len(names)
    for order, (_, i) in enumerate(found[:MAX_ROLES]):
        roles[i] = order + 1
    return roles


def roles_of(texts: list[str], names: list[list[str]], n_slots: int, device=None) -> torch.Tensor:
    """``mention_roles`` of each row's object ``names`` in its text, padded: (B, n_slots) long."""
    roles = torch.zeros(len(names), n_slots, dtype=torch.long)
    for b, (text, ns) in enumerate(zip(texts, names)):
        roles[b, : len(ns)] = torch.tensor(mention_roles(text, ns), dtype=torch.long)
    return roles.to(device)


def pose_reads(text: str) -> list[str]:
    """The distinct ``pose_dict['key']`` keys of ``text``, in order, at most ``MAX_TARGETS``."""
    keys: list[str] = []
    for m in POSE_DICT_READ.finditer(text):
        if m.group(2) not in keys:
            keys.append(m.group(2))
    return keys[:MAX_TARGETS]


def state_sample(names: list[str], sizes, object_pose, pose_dict: dict) -> dict:
    """One sample's state keys (see the module docstring) from the scene's object ``names``,
    ``sizes`` (N, 2) height/radius, ``object_pose`` (N, 7) and ``pose_dict`` (key -> (3,))."""
    n = len(names)
    if n > MAX_OBJECTS:
        raise ValueError(f"the state observation holds at most {MAX_OBJECTS} objects, got {n}")
    if len(pose_dict) > MAX_POSES:
        raise ValueError(f"the state observation holds at most {MAX_POSES} pose_dict entries, got {len(pose_dict)}")
    pose = np.zeros((MAX_OBJECTS, 7), np.float32)
    size = np.zeros((MAX_OBJECTS, 2), np.float32)
    pose[:n], size[:n] = np.asarray(object_pose, np.float32).reshape(n, 7), np.asarray(sizes, np.float32).reshape(n, 2)
    keys = list(pose_dict)
    values = np.zeros((MAX_POSES, 3), np.float32)
    if keys:
        values[: len(keys)] = np.asarray([pose_dict[k] for k in keys], np.float32)
    return {"object_pose": torch.from_numpy(pose), "object_size": torch.from_numpy(size),
            "object_mask": torch.arange(MAX_OBJECTS) < n, "object_names": "\n".join(names),
            "pose_keys": "\n".join(keys), "pose_values": torch.from_numpy(values)}


def rests_on_table(z, height, tolerance_m: float = RESTING_TOLERANCE_M):
    """Whether objects rest on the table (neither lifted nor stacked): centre height ``z`` (m) at
    most ``tolerance_m`` above half their ``height`` (m). Elementwise on tensors or numpy arrays of
    one shape, e.g. (B, N)."""
    return z <= height / 2 + tolerance_m


def mlp(n_in: int, hidden: int, n_out: int | None = None) -> nn.Sequential:
    """Linear -> Mish -> Linear, ``n_in`` -> ``hidden`` -> ``n_out`` (default ``hidden``): the
    small heads of the state tokens and of the keypoints (``keypoints.py``)."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Mish(), nn.Linear(hidden, hidden if n_out is None else n_out))


class StateTokens(nn.Module):
    """State keys + conditioning texts -> object and target tokens, their padding, skip tokens."""

    def __init__(self, d_model: int, text_dim: int, object_offset: bool = False):
        super().__init__()
        self.object_offset = bool(object_offset)
        self.objects = mlp(OBJECT_FEATURES, d_model)
        self.name_proj = nn.Linear(text_dim, d_model)
        self.role = nn.Embedding(MAX_ROLES + 1, d_model)
        self.targets = mlp(TARGET_FEATURES if object_offset else BASE_TARGET_FEATURES, d_model)
        self.target_type = nn.Parameter(torch.randn(MAX_TARGETS, d_model) * 0.02)

    def forward(self, batch: dict, texts: list[str] | None, tcp: torch.Tensor, text_encoder):
        """``texts``: the conditioning text of each sample (None: no language); ``tcp`` (B, 3) m;
        ``text_encoder``: a :class:`~.text.FrozenTextEncoder` for the object names.

        Returns tokens (B, M + MAX_TARGETS, D), pad (B, M + MAX_TARGETS) True = padding, and
        skip (B, N_SKIP, D).
        """
        pose, size = batch["object_pose"].float(), batch["object_size"].float()
        mask = batch["object_mask"].bool()
        B, M = mask.shape
        device = pose.device
        names = [s.split("\n") if s else [] for s in batch["object_names"]]
        name_vec = self._name_vectors(names, M, text_encoder, device)
        rel = pose[..., :3] - tcp[:, None]
        feats = torch.cat([pose[..., :3] * POS_SCALE, pose[..., 3:], size * POS_SCALE, rel * POS_SCALE], -1)
        roles = (roles_of(texts, names, M, device) if texts is not None
                 else torch.zeros(B, M, dtype=torch.long, device=device))
        obj = self.objects(feats) + self.name_proj(name_vec) + self.role(roles)
        obj = obj * mask[..., None]
        first = (roles == 1) & mask  # (B, M): the role-1 object, if the text names one
        anchor = (pose[..., :3] * first[..., None]).sum(1)
        targets, target_mask = self._targets(batch, texts, tcp, anchor, first.any(1))
        if not self.object_offset:
            targets = targets[..., :BASE_TARGET_FEATURES]
        tgt = (self.targets(targets) + self.target_type) * target_mask[..., None]
        role_onehot = torch.stack([(roles == r) & mask for r in range(1, MAX_ROLES + 1)], 1).float()
        skip = torch.cat([role_onehot @ obj, tgt], 1)  # (B, MAX_ROLES + MAX_TARGETS, D)
        tokens = torch.cat([obj, tgt], 1)
        pad = torch.cat([~mask, ~target_mask], 1)
        return tokens, pad, skip

    def _name_vectors(self, names: list[list[str]], M: int, text_encoder, device) -> torch.Tensor:
        unique = sorted({n for ns in names for n in ns})
        out = torch.zeros(len(names), M, self.name_proj.in_features, device=device)
        if not unique:
            return out
        vec = text_encoder.mean_embeddings(unique)
        index = {n: i for i, n in enumerate(unique)}
        for b, ns in enumerate(names):
            for j, n in enumerate(ns):
                out[b, j] = vec[index[n]]
        return out

    @staticmethod
    def _targets(batch: dict, texts: list[str] | None, tcp: torch.Tensor, anchor: torch.Tensor,
                 has_anchor: torch.Tensor):
        B = tcp.shape[0]
        values = batch["pose_values"].float()
        targets = torch.zeros(B, MAX_TARGETS, TARGET_FEATURES, device=tcp.device)
        mask = torch.zeros(B, MAX_TARGETS, dtype=torch.bool, device=tcp.device)
        if texts is None:
            return targets, mask
        for b, text in enumerate(texts):
            keys = batch["pose_keys"][b].split("\n") if batch["pose_keys"][b] else []
            for k, key in enumerate(pose_reads(text)):
                if key in keys:
                    p = values[b, keys.index(key)]
                    off = (p - anchor[b]) * has_anchor[b]
                    targets[b, k] = torch.cat([p * POS_SCALE, (p - tcp[b]) * POS_SCALE, off * POS_SCALE])
                    mask[b, k] = True
        return targets, mask
