"""Closed-loop skill controllers: generators of 7-D actions that read the scene every step.

Each skill is a generator; it yields one action per control step and returns ``True`` on
success or ``False`` when it hit its own step cap or lost the object. A skill never loops
forever: every phase is bounded by ``max_steps``.
"""

from __future__ import annotations

from typing import Generator

import numpy as np
import sapien
from transforms3d.quaternions import quat2axangle

from ..robot import MAX_DELTA_POS, MAX_DELTA_ROT

Action = np.ndarray
SkillGen = Generator[Action, None, bool]

Q_DOWN = np.array([0.0, 1.0, 0.0, 0.0])  # TCP z-axis pointing at the table
FAST = 0.025  # m per control step (0.5 m/s at 20 Hz)
SLOW = 0.008
CLEARANCE = 0.045  # free height kept above every object while travelling
MIN_TRAVEL_HEIGHT = 0.12  # lowest TCP travel height (m), the oracle's as scripted


class Motion:
    """Low-level helpers shared by the skills: TCP servoing and scene geometry."""

    def __init__(self, env, slack: float = 1.0):
        self.env = env
        # Tolerances and step caps are multiplied by ``slack``. The oracle acts with 1. DP+Oracle's
        # tracker, which runs the skills only to follow a learned policy, uses more: a learned
        # policy is less precise and slower than the controller it imitates.
        self.slack = float(slack)
        # Every commanded speed is multiplied by ``speed_scale``. 1 for the oracle; data generation
        # can draw it per episode (``make data oracle_speed=[lo,hi]``) so that how long a skill
        # runs varies between demonstrations and only the scene tells when it is done.
        self.speed_scale = 1.0
        # The lowest travel height. Data generation can draw it per episode (``make data
        # oracle_travel_height=[lo,hi]``) so that picks, pushes and topples start their descent
        # from varied heights and only the scene (the TCP's height, the seal) tells when to stop.
        self.min_travel_height = MIN_TRAVEL_HEIGHT

    def cap(self, max_steps: int) -> int:
        return int(round(max_steps * self.slack))

    # ------------------------------------------------------------ scene geometry
    def tcp(self) -> np.ndarray:
        return self.env.agent.tcp.pose.sp.p.astype(np.float64)

    def world_vertices(self, name: str) -> np.ndarray:
        T = self.env.object_pose(name).to_transformation_matrix()
        return self.env.specs[name].vertices() @ T[:3, :3].T + T[:3, 3]

    def top(self, name: str) -> float:
        return float(self.world_vertices(name)[:, 2].max())

    def bottom(self, name: str) -> float:
        return float(self.world_vertices(name)[:, 2].min())

    def xy(self, name: str) -> np.ndarray:
        return self.env.object_pose(name).p[:2].astype(np.float64)

    def held(self) -> str | None:
        return self.env.suction.attached

    def travel_height(self) -> float:
        """TCP height that keeps the held object (if any) CLEARANCE above everything else."""
        held = self.held()
        tops = [self.top(n) for n in self.env.specs if n != held]
        z = max(tops, default=0.0) + CLEARANCE
        if held is not None:
            z += self.tcp()[2] - self.bottom(held)
        return max(z, self.min_travel_height)

    def column(self, name: str) -> list[str]:
        """``name`` and the objects standing over its footprint (a stack on it)."""
        base = self.xy(name)
        r = self.env.specs[name].radius
        return [n for n in self.env.specs
                if n == name or (np.linalg.norm(self.xy(n) - base) < r and n != self.held())]

    def column_height(self, name: str) -> float:
        """Height of the column standing on ``name`` (its own top, or the top of a stack)."""
        return max(self.top(n) for n in self.column(name))

    # ------------------------------------------------------------ actions
    def action(self, delta_p: np.ndarray, suction: bool) -> Action:
        """Translation delta (m) -> normalised action with orientation hold (cup down)."""
        a = np.zeros(7, dtype=np.float32)
        a[:3] = np.clip(delta_p / MAX_DELTA_POS, -1, 1)
        q = self.env.agent.tcp.pose.sp.q
        err = (sapien.Pose(q=Q_DOWN) * sapien.Pose(q=q).inv()).q
        if err[0] < 0:
            err = -err
        axis, angle = quat2axangle(err)
        a[3:6] = np.clip(axis * angle / MAX_DELTA_ROT, -1, 1)
        a[6] = 1.0 if suction else -1.0
        return a

    def toward(self, goal: np.ndarray, speed: float, suction: bool) -> Action:
        speed = speed * self.speed_scale
        delta = goal - self.tcp()
        dist = np.linalg.norm(delta)
        if dist > speed:
            delta *= speed / dist
        return self.action(delta, suction)

    def servo(self, goal_fn, speed: float, suction: bool, tol: float, max_steps: int,
              stop_fn=None) -> SkillGen:
        """Move the TCP to ``goal_fn()`` (re-evaluated each step) until within ``tol``."""
        for _ in range(self.cap(max_steps)):
            if stop_fn is not None and stop_fn():
                return True
            goal = goal_fn()
            if np.linalg.norm(goal - self.tcp()) < tol * self.slack:
                return True
            yield self.toward(goal, speed, suction)
        return False

    def hold(self, steps: int = 1) -> SkillGen:
        for _ in range(steps):
            yield self.action(np.zeros(3), self.env.suction.on)
        return True


# ---------------------------------------------------------------------------- skills
def move3d(m: Motion, goal_xy_fn, z: float | None = None, max_steps: int = 60) -> SkillGen:
    """Rise to travel height, then fly above ``goal_xy_fn()`` (xy, re-read every step)."""
    z = m.travel_height() if z is None else z
    suction = m.env.suction.on
    if m.tcp()[2] < z - 0.02:
        ok = yield from m.servo(lambda: np.array([*m.tcp()[:2], z]), FAST, suction, 0.015, max_steps // 3)
        if not ok:
            return False
    return (yield from m.servo(lambda: np.array([*goal_xy_fn(), z]), FAST, suction, 0.006, max_steps))


def pick(m: Motion, name: str, max_steps: int = 60) -> SkillGen:
    """Descend onto ``name`` with suction on until it is attached, then lift it."""
    if m.held() is not None:
        return False
    steps = 0
    while m.held() != name:
        if m.held() is not None or steps >= m.cap(max_steps):
            return False
        top = m.top(name)
        tcp = m.tcp()
        goal = np.array([*m.xy(name), top - 0.01])
        speed = FAST if tcp[2] > top + 0.04 else SLOW
        yield m.toward(goal, speed, True)
        steps += 1
    lift = m.travel_height()
    return (yield from m.servo(lambda: np.array([*m.tcp()[:2], lift]), FAST, True, 0.015, max_steps))


def place(m: Motion, name: str, goal_xy_fn, goal_bottom_fn, max_steps: int = 70) -> SkillGen:
    """Lower the held ``name`` until it rests at ``goal_bottom_fn()`` above ``goal_xy_fn()``,
    release suction and back off upwards."""
    if m.held() != name:
        return False
    last_bottom = None
    for step in range(m.cap(max_steps)):
        bottom = m.bottom(name)
        gap = bottom - goal_bottom_fn()
        resting = last_bottom is not None and gap < 0.012 and last_bottom - bottom < 0.0015
        if gap < 0.004 or resting:
            break
        last_bottom = bottom
        offset = m.xy(name) - m.tcp()[:2]  # the object may hang slightly off-centre
        xy = goal_xy_fn() - offset
        z = m.tcp()[2] - gap
        speed = FAST if gap > 0.04 else SLOW
        yield m.toward(np.array([*xy, z]), speed, True)
    else:
        return False
    yield m.action(np.zeros(3), False)  # release
    yield m.action(np.zeros(3), False)
    up = m.tcp()[2] + 0.06
    yield from m.servo(lambda: np.array([*m.tcp()[:2], up]), FAST, False, 0.015, 20)
    return m.held() is None


def push(m: Motion, name: str, goal_xy: np.ndarray, max_steps: int = 100) -> SkillGen:
    """Push ``name`` (low, with the cup's side) until its centre reaches ``goal_xy``.

    Closed loop: every step the push direction is re-aimed from the object's current position
    to the goal, so an object that veers sideways is steered back.
    """
    r = m.env.specs[name].radius
    start_obj = m.xy(name)
    d0 = goal_xy - start_obj
    if np.linalg.norm(d0) < 1e-3:
        return True
    d0 = d0 / np.linalg.norm(d0)
    z_push = min(0.02, m.top(name) * 0.5)
    standoff = r + 0.03
    # fly to the approach point, go down behind the object
    ok = yield from move3d(m, lambda: m.xy(name) - d0 * standoff, max_steps=40)
    if not ok:
        return False
    ok = yield from m.servo(lambda: np.array([*(m.xy(name) - d0 * standoff), z_push]), FAST, False, 0.01, 25)
    if not ok:
        return False
    for _ in range(m.cap(max_steps)):
        rem = goal_xy - m.xy(name)
        if np.linalg.norm(rem) < 0.006 or rem @ d0 <= 0.003:
            break
        d = rem / np.linalg.norm(rem)
        contact = m.xy(name) - d * (r + 0.012)
        yield m.toward(np.array([*(contact + d * 0.02), z_push]), 0.015, False)
    else:
        return False
    up = m.travel_height()
    yield from m.servo(lambda: np.array([*m.tcp()[:2], up]), FAST, False, 0.015, 20)
    return float(np.linalg.norm(goal_xy - m.xy(name))) < 0.03


def topple(m: Motion, name: str, direction: np.ndarray, max_steps: int = 80) -> SkillGen:
    """Knock over ``name`` (and whatever stands on it) by pushing high on its column."""
    d = direction / np.linalg.norm(direction)
    height = m.column_height(name)
    z_hit = max(height - 0.018, 0.02)  # high on the column: it tips instead of sliding
    start = m.xy(name)
    standoff = max(m.env.specs[n].radius for n in m.column(name)) + 0.035
    ok = yield from move3d(m, lambda: start - d * standoff, max_steps=40)
    if not ok:
        return False
    ok = yield from m.servo(lambda: np.array([*(start - d * standoff), z_hit]), FAST, False, 0.01, 25)
    if not ok:
        return False
    for _ in range(m.cap(max_steps)):
        if m.column_height(name) < height - 0.02 or tilt(m.env.object_pose(name)) > np.deg2rad(50):
            break
        yield m.toward(np.array([*(start + d * 0.12), z_hit]), 0.02, False)
    else:
        return False
    yield from m.hold(3)
    up = m.travel_height()
    yield from m.servo(lambda: np.array([*m.tcp()[:2], up]), FAST, False, 0.015, 20)
    return True


def tilt(pose: sapien.Pose) -> float:
    """Angle (rad) between an object's z-axis and the world's up axis."""
    R = pose.to_transformation_matrix()[:3, :3]
    return float(np.arccos(np.clip(R[2, 2], -1.0, 1.0)))
