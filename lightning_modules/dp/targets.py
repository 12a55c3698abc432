"""Code-target tokens for the image DP (``model.keypoint_targets``; not in the paper).

A line such as ``move3d(pose_dict['target'])`` names no object: where it goes was computed by an
earlier line, whose code the cache info holds, e.g.
``pose_dict['target'] = free_space_next_to(get_actor('a'), get_actor('b'), direction='behind')``
or ``pose_dict['goal'] = offset_pose(get_actor('x'), direction='left', distance=0.1)``. The state DP
is given that position (``state.py``); the image DP is not, and was measured to carry the object to
the reference object itself instead of beside it (PlaceNextTo 0-2 of 32, README session 27).

For each ``pose_dict`` key the line reads (at most ``MAX_TARGETS``) whose assignment is in the cache
info, :func:`target_queries` reads that assignment's code: its objects (``get_actor``), and its
``direction`` and ``distance`` arguments. The anchor is the assignment's last object (the reference
``b`` of ``free_space_next_to``, the pushed ``x`` of ``offset_pose``). :class:`CodeTargets` then
estimates the position from the named-object keypoints' table positions of those objects
(``keypoints.py``, which search for them): anchor + an MLP of (direction unit vector, has
direction, distance, the other object's offset from the anchor). It is taught by an MSE to the
recorded ``pose_dict`` value (training only, as the keypoints are), and each estimate becomes a
token (position, position - TCP), fed to the pooling and to FiLM.

``held`` (test time, ``model.keypoint_target_hold``): a ``pose_dict`` value is computed once, when
its line runs, and then stays put, however its objects move. The estimate above follows the
anchor's *current* keypoint, so once Push's push moves the object, its ``goal`` moves with it and
the DP cannot tell "before the push" from "after". With a per-episode ``held`` dict (assignment
code -> estimate), the first estimate of each assignment is kept for the rest of the episode.
In training the same holds for the recorded value, which is why ``model.keypoint_target_teacher``
(> 0) builds the tokens from it, plus Gaussian noise of that many dm, and not from the estimate
(which follows the moving object); the estimate is still taught by its MSE, whose target then
moves with the anchor since the assignment (:func:`anchor_moved`), so that the head learns the
value's offset from its anchor as it was when the value was computed.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from datamodules.labels import pose_assignments
from envs.skills.api import DIRECTIONS

from .keypoints import named_objects
from .state import MAX_TARGETS, POS_SCALE, mlp, pose_reads

DIRECTION_ARG = re.compile(r"direction\s*=\s*['\"](\w+)['\"]")
DISTANCE_ARG = re.compile(r"distance\s*=\s*([0-9]*\.?[0-9]+)")
QUERY_FEATURES = 2 + 1 + 1 + 2 + 1  # direction, has direction, distance, other - anchor, has other
TOKEN_FEATURES = 2 + 2  # position, position - tcp


def target_queries(line: str, memory_info: str | None) -> list[dict | None]:
    """For each key ``line`` reads (``state.pose_reads``), the code of its assignment in
    ``memory_info``: ``{"key", "code", "objects", "direction", "distance"}`` (code: the
    assignment's line; objects in order of mention; direction one of ``DIRECTIONS`` or None;
    distance in m or None), or None where the cache info holds no assignment of the key."""
    assignments = pose_assignments((memory_info or "").splitlines())
    out: list[dict | None] = []
    for key in pose_reads(line or ""):
        if key not in assignments:
            out.append(None)
            continue
        code = assignments[key][1]
        objects = named_objects(code)  # the assignment's own get_actor names
        direction = DIRECTION_ARG.search(code)
        distance = DISTANCE_ARG.search(code)
        out.append({"key": key, "code": code, "objects": objects,
                    "direction": direction.group(1) if direction and direction.group(1) in DIRECTIONS else None,
                    "distance": float(distance.group(1)) if distance else None})
    return out


class CodeTargets(nn.Module):
    """Keypoint table positions + the code of the positions a line reads -> target tokens."""

    def __init__(self, d_model: int, hidden: int = 64):
        super().__init__()
        self.offset = mlp(QUERY_FEATURES, hidden, 2)
        self.token = mlp(TOKEN_FEATURES, d_model)
        self.slot = nn.Parameter(torch.randn(MAX_TARGETS, d_model) * 0.02)

    def forward(self, lines: list[str], memory: list[str], kp: dict, tcp: torch.Tensor,
                held: list[dict | None] | None = None, teacher: tuple | None = None) -> dict:
        """``lines``, ``memory``: each row's instruction and cache info; ``kp``: the keypoints'
        output (``names`` searched for, ``xy`` (B, R, 2) dm, ``present`` (B, R)); ``tcp`` (B, 3) m;
        ``held`` (test time): per row None or the episode's dict of assignment code -> (2,) dm
        estimate, read where it has the assignment and filled where it has not (module docstring);
        ``teacher`` (training): ``(pose_keys, pose_values, noise_dm)``, see :meth:`_teacher`. The
        tokens are built from the held or teacher position; ``xy`` is always the estimate.
        Returns ``tokens`` (B, MAX_TARGETS, d_model), ``present`` (B, MAX_TARGETS) bool, ``xy``
        (B, MAX_TARGETS, 2) dm (the estimates), ``keys`` (each row's keys, None where absent) and
        ``anchors`` (each row's anchor object per slot, None where absent)."""
        B, device = len(lines), kp["xy"].device
        feats = torch.zeros(B, MAX_TARGETS, QUERY_FEATURES, device=device)
        anchor_index = torch.zeros(B, MAX_TARGETS, dtype=torch.long, device=device)
        other_index = torch.zeros(B, MAX_TARGETS, dtype=torch.long, device=device)
        has_other = torch.zeros(B, MAX_TARGETS, dtype=torch.bool, device=device)
        present = torch.zeros(B, MAX_TARGETS, dtype=torch.bool, device=device)
        keys: list[list[str | None]] = []
        anchors: list[list[str | None]] = []
        codes: dict[tuple[int, int], str] = {}  # (row, slot) -> assignment code, for ``held``
        for b, (line, info) in enumerate(zip(lines, memory)):
            row: list[str | None] = []
            anchors.append([None] * MAX_TARGETS)
            searched = kp["names"][b]
            for k, query in enumerate(target_queries(line, info)):
                found = [searched.index(n) for n in (query or {}).get("objects", []) if n in searched]
                if not found or not bool(kp["present"][b, found[-1]]):
                    row.append(None)
                    continue
                row.append(query["key"])
                anchors[b][k] = searched[found[-1]]
                codes[b, k] = query["code"]
                present[b, k] = True
                anchor_index[b, k] = found[-1]
                if len(found) > 1:
                    other_index[b, k], has_other[b, k] = found[0], True
                if query["direction"]:
                    feats[b, k, :2] = torch.as_tensor(DIRECTIONS[query["direction"]], dtype=torch.float32)
                    feats[b, k, 2] = 1.0
                feats[b, k, 3] = (query["distance"] or 0.0) * POS_SCALE
            keys.append(row)
        xy = kp["xy"].detach()  # the keypoints' own losses teach them; this head learns the offset
        anchor = xy.gather(1, anchor_index[..., None].expand(-1, -1, 2))
        other = xy.gather(1, other_index[..., None].expand(-1, -1, 2))
        feats[..., 4:6] = (other - anchor) * has_other[..., None]
        feats[..., 6] = has_other.float()
        estimate = anchor + self.offset(feats)
        position = estimate
        if held is not None:
            position = self._hold(estimate, codes, held)
        if teacher is not None:
            position = self._teacher(estimate, keys, *teacher)
        rel = position - tcp[:, None, :2] * POS_SCALE
        tokens = (self.token(torch.cat([position, rel], -1)) + self.slot) * present[..., None]
        return {"tokens": tokens, "present": present, "xy": estimate, "keys": keys, "anchors": anchors}

    @staticmethod
    def _hold(estimate: torch.Tensor, codes: dict, held: list[dict | None]) -> torch.Tensor:
        """``estimate`` (B, MAX_TARGETS, 2) with each held assignment's first estimate in place of
        its new one; the new ones of assignments not yet held are stored in ``held``."""
        estimate = estimate.clone()
        for (b, k), code in codes.items():
            if held[b] is None:
                continue
            if code in held[b]:
                estimate[b, k] = held[b][code].to(estimate)
            else:
                held[b][code] = estimate[b, k].detach().clone()
        return estimate

    @staticmethod
    def _teacher(estimate: torch.Tensor, keys: list, pose_keys: list[str], pose_values: torch.Tensor,
                 noise_dm: float) -> torch.Tensor:
        """The token positions in training with ``keypoint_target_teacher``: the recorded value +
        N(0, ``noise_dm``^2) per coordinate where the key was recorded, else ``estimate`` (detached)."""
        target, known = recorded_targets(keys, pose_keys, pose_values, estimate.device)
        noisy = target + noise_dm * torch.randn_like(target)
        return torch.where(known[..., None], noisy, estimate.detach())

    @staticmethod
    def loss(out: dict, pose_keys: list[str], pose_values: torch.Tensor,
             anchor_moved: torch.Tensor | None = None) -> torch.Tensor:
        """MSE (dm^2) of the estimates against the recorded ``pose_dict`` values: ``pose_keys``
        (each row's keys joined by newlines) and ``pose_values`` (B, P, 3) m; over the present
        slots whose key was recorded (0 if none). ``anchor_moved`` (B, MAX_TARGETS, 2) dm
        (:func:`anchor_moved`): how far each slot's anchor has moved since the value was computed,
        added to the value, so that the head learns the value's offset from its anchor *then*
        (Push moves its goal's anchor; the goal stays)."""
        target, known = recorded_targets(out["keys"], pose_keys, pose_values, out["xy"].device)
        if anchor_moved is not None:
            target = target + anchor_moved
        err = ((out["xy"] - target) ** 2).mean(-1)
        return (err * known).sum() / known.sum().clamp_min(1)


def recorded_slots(keys: list, pose_keys: list[str]):
    """(row b, slot k, recorded index p) of each slot whose key (``CodeTargets`` output ``keys``)
    is among its row's recorded keys (``pose_keys``: joined by newlines)."""
    for b, row in enumerate(keys):
        recorded = pose_keys[b].split("\n") if pose_keys[b] else []
        for k, key in enumerate(row):
            if key is not None and key in recorded:
                yield b, k, recorded.index(key)


def recorded_targets(keys: list, pose_keys: list[str], pose_values: torch.Tensor,
                     device) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorded table positions of each row's slot keys (``CodeTargets`` output ``keys``):
    (B, MAX_TARGETS, 2) dm, and (B, MAX_TARGETS) bool where the key was recorded. ``pose_keys``:
    each row's recorded keys joined by newlines; ``pose_values`` (B, P, 3) m."""
    B = len(pose_keys)
    target = torch.zeros(B, MAX_TARGETS, 2, device=device)
    known = torch.zeros(B, MAX_TARGETS, dtype=torch.bool, device=device)
    for b, k, p in recorded_slots(keys, pose_keys):
        target[b, k] = pose_values[b, p, :2].float() * POS_SCALE
        known[b, k] = True
    return target, known


def anchor_moved(out: dict, object_names: list[str], object_pose: torch.Tensor, pose_keys: list[str],
                 pose_object_xy: torch.Tensor) -> torch.Tensor:
    """(B, MAX_TARGETS, 2) dm: each slot's anchor object's table position now (``object_pose``
    (B, N, 7) m) less where it was when its key's value was computed (``pose_object_xy``
    (B, P, N, 2) m, the dataset's); 0 where the anchor or the key is not recorded.
    ``object_names``, ``pose_keys``: each row's names and keys joined by newlines."""
    moved = torch.zeros(len(out["keys"]), MAX_TARGETS, 2, device=object_pose.device)
    for b, k, p in recorded_slots(out["keys"], pose_keys):
        scene = object_names[b].split("\n") if object_names[b] else []
        if out["anchors"][b][k] in scene:
            j = scene.index(out["anchors"][b][k])
            moved[b, k] = (object_pose[b, j, :2] - pose_object_xy[b, p, j]).float() * POS_SCALE
    return moved
