"""The robot skill API whose calls are the code labels (names after ClevrSkills' solvers).

Queries run instantly and return values::

    get_actor(description) -> Actor          # "red cube"; UnknownObjectError if absent
    get_pose(actor) -> Pose
    free_space(actor) -> Pose                # a free table spot for ``actor``
    free_space_next_to(actor, next_to_actor, direction='left') -> Pose
    offset_pose(actor, direction='left', distance=0.1) -> Pose   # the actor's pose, moved

Skills are closed-loop controllers that act until their own termination::

    move3d(target)                           # fly above an Actor or a Pose
    pick(actor)                              # suction-grasp and lift
    place(actor, target)                     # put the held actor on an Actor or at a Pose
    push(actor, direction='left', distance=0.1) / push(actor, towards=actor_or_pose)
    topple(actor)                            # knock it (and what stands on it) over
    touch(actor, push=False)                 # ClevrSkills' touch: parsed in imported labels, not run here
    done()                                   # the task is finished

``pose_dict['key'] = <query>`` remembers a pose for later lines (it holds still one step).
Directions are as seen from the base camera: 'left', 'right', 'behind' (towards the robot),
'front' (towards the camera).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import numpy as np

from . import controllers as C
from .interpreter import CodeError, UnknownObjectError

DIRECTIONS = {
    "left": np.array([0.0, -1.0]),
    "right": np.array([0.0, 1.0]),
    "behind": np.array([-1.0, 0.0]),
    "front": np.array([1.0, 0.0]),
}
SKILLS = ("move3d", "pick", "place", "push", "topple", "touch", "done")
QUERIES = ("get_actor", "get_pose", "free_space", "free_space_next_to", "offset_pose")
REACH_X = (-0.2, 0.17)  # table area the oracle uses for free-space targets
REACH_Y = (-0.24, 0.24)


@dataclass(frozen=True)
class Actor:
    """Handle of a scene object, as returned by ``get_actor``."""

    name: str


@dataclass(frozen=True)
class Pose:
    """World pose: position (m) and quaternion (w, x, y, z)."""

    p: tuple[float, float, float]
    q: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)


@dataclass
class Skill:
    """A skill call ready to run: ``gen`` yields actions and returns success."""

    name: str
    gen: Generator[np.ndarray, None, bool]


class SkillAPI:
    """Binds the API to one environment. ``pose_dict`` persists across lines of an episode."""

    def __init__(self, env):
        self.env = env
        self.motion = C.Motion(env)
        self.pose_dict: dict[str, Pose] = {}

    # ------------------------------------------------------------------ helpers
    def _actor(self, value, arg: str) -> Actor:
        if not isinstance(value, Actor):
            raise CodeError(f"{arg} must be get_actor(...), got {type(value).__name__}")
        return value

    def _target_xy(self, target):
        if isinstance(target, Actor):
            return lambda: self.motion.xy(target.name)
        if isinstance(target, Pose):
            xy = np.array(target.p[:2])
            return lambda: xy
        raise CodeError(f"target must be an actor or a pose, got {type(target).__name__}")

    def _direction(self, direction) -> np.ndarray:
        if direction not in DIRECTIONS:
            raise CodeError(f"unknown direction {direction!r}; use one of {sorted(DIRECTIONS)}")
        return DIRECTIONS[direction]

    def _is_free(self, xy: np.ndarray, radius: float, ignore: set[str]) -> bool:
        for n, spec in self.env.specs.items():
            if n in ignore:
                continue
            if np.linalg.norm(self.motion.xy(n) - xy) < radius + spec.radius + 0.025:
                return False
        return REACH_X[0] <= xy[0] <= REACH_X[1] and REACH_Y[0] <= xy[1] <= REACH_Y[1]

    # ------------------------------------------------------------------ queries
    def get_actor(self, description) -> Actor:
        if not isinstance(description, str):
            raise CodeError("get_actor takes an object description string")
        if description not in self.env.specs:
            raise UnknownObjectError(f"no {description!r} in the scene; objects: {sorted(self.env.specs)}")
        return Actor(description)

    def get_pose(self, actor) -> Pose:
        pose = self.env.object_pose(self._actor(actor, "actor").name)
        return Pose(tuple(float(v) for v in pose.p), tuple(float(v) for v in pose.q))

    def free_space(self, actor) -> Pose:
        """The reachable table spot farthest from every other object (deterministic grid)."""
        name = self._actor(actor, "actor").name
        spec = self.env.specs[name]
        best, best_d = None, -1.0
        for x in np.linspace(REACH_X[0] + 0.03, REACH_X[1] - 0.03, 9):
            for y in np.linspace(REACH_Y[0] + 0.03, REACH_Y[1] - 0.03, 11):
                d = min((np.hypot(x - self.motion.xy(n)[0], y - self.motion.xy(n)[1]) - self.env.specs[n].radius
                         for n in self.env.specs if n != name), default=1.0)
                if d > best_d + 1e-9:
                    best, best_d = (x, y), d
        return Pose((float(best[0]), float(best[1]), spec.height / 2))

    def free_space_next_to(self, actor, next_to_actor, direction="left") -> Pose:
        """A table spot beside ``next_to_actor`` on side ``direction`` with room for ``actor``."""
        a = self.env.specs[self._actor(actor, "actor").name]
        b_name = self._actor(next_to_actor, "next_to_actor").name
        b = self.env.specs[b_name]
        d = self._direction(direction)
        centre = self.motion.xy(b_name)
        for extra in (0.03, 0.05, 0.07, 0.09):
            xy = centre + d * (a.radius + b.radius + extra)
            if self._is_free(xy, a.radius, ignore={a.name, b_name}):
                return Pose((float(xy[0]), float(xy[1]), a.height / 2))
        raise CodeError(f"no free space {direction} of {b_name!r}")

    def offset_pose(self, actor, direction="left", distance=0.1) -> Pose:
        """The actor's pose moved ``distance`` m (in (0, 0.3]) towards ``direction`` on the table:
        where a push in that direction takes it (the Push oracle stores it as its goal)."""
        pose = self.get_pose(actor)
        xy = np.array(pose.p[:2]) + self._direction(direction) * self._distance(distance)
        return Pose((float(xy[0]), float(xy[1]), pose.p[2]), pose.q)

    @staticmethod
    def _distance(distance) -> float:
        if not isinstance(distance, (int, float)) or isinstance(distance, bool) or not 0.0 < distance <= 0.3:
            raise CodeError("distance must be a number in (0, 0.3] m")
        return float(distance)

    # ------------------------------------------------------------------ skills
    def move3d(self, target) -> Skill:
        return Skill("move3d", C.move3d(self.motion, self._target_xy(target)))

    def pick(self, actor) -> Skill:
        return Skill("pick", C.pick(self.motion, self._actor(actor, "actor").name))

    def place(self, actor, target) -> Skill:
        name = self._actor(actor, "actor").name
        if isinstance(target, Actor):
            if target.name == name:
                raise CodeError("cannot place an object on itself")
            bottom = lambda: self.motion.top(target.name)  # noqa: E731
        elif isinstance(target, Pose):
            bottom = lambda: max(target.p[2] - self.env.specs[name].height / 2, 0.0)  # noqa: E731
        else:
            raise CodeError(f"target must be an actor or a pose, got {type(target).__name__}")
        return Skill("place", C.place(self.motion, name, self._target_xy(target), bottom))

    def push(self, actor, direction=None, distance=0.1, towards=None) -> Skill:
        name = self._actor(actor, "actor").name
        if (direction is None) == (towards is None):
            raise CodeError("push needs exactly one of direction=... or towards=...")
        start = self.motion.xy(name)
        if isinstance(towards, Pose):  # push until the object's centre is at the pose
            return Skill("push", C.push(self.motion, name, np.array(towards.p[:2], dtype=np.float64)))
        if towards is not None:
            other = self._actor(towards, "towards").name
            if other == name:
                raise CodeError("cannot push an object towards itself")
            offset = self.motion.xy(other) - start
            gap = self.env.specs[name].radius + self.env.specs[other].radius + 0.015
            length = float(np.linalg.norm(offset))
            goal = start + offset / max(length, 1e-6) * max(length - gap, 0.0)
            return Skill("push", C.push(self.motion, name, goal))
        return Skill("push", C.push(self.motion, name, start + self._direction(direction) * self._distance(distance)))

    def topple(self, actor) -> Skill:
        name = self._actor(actor, "actor").name
        # push away from the robot base: the arm never reaches over the falling column
        away = self.motion.xy(name) - np.array([-0.615, 0.0])
        return Skill("topple", C.topple(self.motion, name, away))

    def touch(self, actor, push=False) -> Skill:
        """ClevrSkills' touch (its Touch task, ``make import-clevrskills``): a valid line of imported
        labels, but this suite has no Touch task and no touch controller, so running it is a CodeError."""
        self._actor(actor, "actor")
        raise CodeError("touch(...) labels ClevrSkills' Touch task; this simulator has no touch skill")

    def done(self) -> Skill:
        return Skill("done", self.motion.hold(1))

    def hold(self) -> Skill:
        """The one still step of a ``pose_dict`` assignment line (not callable from code)."""
        return Skill("assign", self.motion.hold(1))
