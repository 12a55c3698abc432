"""Skill-API queries on a recorded scene: the values of ``pose_dict[...] = query(...)`` lines
for steps of a recorded episode (``make relabel-dp`` stores them with the VLM's labels, as the
generator stores the oracle's).

The scene is rebuilt from the episode's task and seed (resets are deterministic) and its objects
are moved to their recorded poses (``obs/object_pose`` at the line's step) before the line runs.
Only queries are evaluated, never skills; the robot is not moved.
"""

from __future__ import annotations

import numpy as np

from .interpreter import CodeError, Interpreter


class RecordedScene:
    """One environment per task, made on first use (``image_size`` small: nothing is rendered).
    ``pose_values(task, seed, names, poses, lines)`` -> (pose_dict, errors); close() at the end."""

    def __init__(self, image_size: int = 32):
        self.image_size = image_size
        self._envs: dict[str, object] = {}

    def _env(self, task: str):
        if task not in self._envs:
            from envs import make_env  # the package imports this module's package: import here

            self._envs[task] = make_env(task, image_size=self.image_size)
        return self._envs[task]

    def pose_values(self, task: str, seed: int, names: list[str], poses: np.ndarray,
                    lines: list[tuple[int, str]]) -> tuple[dict[str, tuple[float, float, float]], int]:
        """``poses`` (T, N, 7): recorded object poses (position, wxyz quaternion) in ``names`` order;
        ``lines``: (step, ``pose_dict[...] = ...`` line) in order. Returns key -> position (3,) of
        the lines that ran, and how many raised :class:`CodeError` (they store nothing)."""
        import sapien

        from .api import SkillAPI

        from envs import UnknownTaskError

        try:
            env = self._env(task)
        except UnknownTaskError:  # e.g. an imported ClevrSkills task: no scene to rebuild
            return {}, len(lines)
        env.reset(seed=int(seed))
        if not set(names) <= set(env.actors):  # not a scene of our generator (imported data)
            return {}, len(lines)
        interpreter = Interpreter(SkillAPI(env))
        errors = 0
        for t, line in lines:
            for name, pose in zip(names, np.asarray(poses[t], dtype=np.float64)):
                env.actors[name].set_pose(sapien.Pose(p=pose[:3].tolist(), q=pose[3:].tolist()))
            try:
                interpreter.execute(line)
            except CodeError:
                errors += 1
        values = {k: tuple(float(v) for v in pose.p) for k, pose in interpreter.api.pose_dict.items()}
        return values, errors

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
