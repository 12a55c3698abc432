"""Shared success predicates and oracle snippets for the task files."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..skills import controllers as C
from ..skills.code import actor, call

UPRIGHT = np.deg2rad(20)  # max tilt of an object that counts as standing


def xy(env, name: str) -> np.ndarray:
    return env.object_pose(name).p[:2].astype(np.float64)


def bottom(env, name: str) -> float:
    return C.Motion(env).bottom(name)


def top(env, name: str) -> float:
    return C.Motion(env).top(name)


def is_free(env, name: str) -> bool:
    """Not held by the suction cup."""
    return env.suction.attached != name


def upright(env, name: str) -> bool:
    return C.tilt(env.object_pose(name)) < UPRIGHT


def on_table(env, name: str) -> bool:
    """Standing on the table (tolerant to resting-contact jitter)."""
    return bottom(env, name) < 0.01 and upright(env, name) and is_free(env, name)


def on_top(env, a: str, b: str) -> bool:
    """``a`` rests on ``b``: bottom near b's top, centre over b's footprint, released."""
    close = abs(bottom(env, a) - top(env, b)) < 0.015
    over = np.linalg.norm(xy(env, a) - xy(env, b)) < env.specs[b].radius
    return close and over and upright(env, a) and is_free(env, a)


def pick_and_place(api, obj: str, target_expr: str, retries: int = 1) -> Iterator[str]:
    """move3d / pick (retried when the grasp fails) / move3d / place."""
    for _ in range(retries + 1):
        yield call("move3d", actor(obj))
        yield call("pick", actor(obj))
        if api.env.suction.attached == obj:
            break
    yield call("move3d", target_expr)
    yield call("place", actor(obj), target_expr)
