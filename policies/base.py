"""The interface every inference-time policy shares, so the evaluator does not care which runs.

An episode, as the evaluator runs it::

    policy.attach(env)                  # once per env; policies that run oracle skills keep it
    policy.reset(task, prompt)          # task name, natural-language task prompt
    while not policy.finished and t < cap:
        action = policy.act(observation)    # observation: envs.tabletop.observation_arrays(obs)
        # (policies.episodes.run_batched steps B policies at once, through policy.act_steps)
        obs, ... = env.step(action)         # action: (7,) float32 in [-1, 1]

``observation`` is the dict of numpy arrays of :func:`envs.tabletop.observation_arrays`
(``base_rgb (H,W,3) uint8``, ``wrist_rgb``, ``qpos (7,)``, ``qvel (7,)``, ``tcp_pose (7,)``,
``suction (2,)``, ``bboxes (N,4)``). A policy that cannot go on (bad VLM code, an unknown
object, ...) raises :class:`PolicyFailure`; the evaluator records the episode as a failure with
that reason instead of crashing.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from envs.oracle import SkillExecutor
from envs.skills import CodeError, UnknownObjectError


class PolicyFailure(Exception):
    """Ends an episode as a recorded failure.

    ``reason`` is a short category that is counted over episodes ("code error",
    "unknown object", "vlm error", "oracle error", "invalid action"); ``detail`` says exactly
    what happened (the offending code line, the error message).
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Planner(Protocol):
    """What VLMDP and VLMOracle need of a planner (:class:`policies.vlm_planner.VLMPlanner` is the
    one implementation; its ``PlanStep``: ``line``, ``new_key_step``, ``tokens``, ``error``, ``early_stopped``)."""

    def reset(self, task_prompt: str, objects: list[str] | None = None) -> None: ...

    @property
    def cache_info(self) -> str: ...

    def step(self, image: np.ndarray): ...

    def next_key_step(self, image: np.ndarray, require_key_step: bool = False): ...

    def check_context(self, image: np.ndarray, request: bool = False) -> None:
        """Raise PolicyFailure("context full") when the next query would not fit the model."""


class Policy:
    """Base class: see the module docstring for the episode protocol."""

    kind = "policy"
    reads_wrist = True  # reads ``wrist_rgb``: the evaluator renders the wrist camera only for such policies

    def __init__(self):
        self.env = None
        self.instruction = ""  # what the policy is doing now (video captions)
        self.finished = False  # True once the policy has nothing more to do (``done()`` ran)

    def attach(self, env) -> None:
        """Give the policy the environment it acts in (used by policies that run oracle skills)."""
        self.env = env.unwrapped

    def reset(self, task: str, prompt: str) -> None:
        """Start an episode of ``task`` described by ``prompt``; clears all per-episode state."""
        self.instruction = ""
        self.finished = False

    def act(self, observation: dict) -> np.ndarray:
        """One (7,) float32 action for the current observation."""
        raise NotImplementedError

    def act_steps(self, observation: dict):
        """The step of :meth:`act` as a generator that yields its model calls and returns the
        action (:mod:`policies.batching` serves the calls of B policies as batches). This default
        makes no model calls that can be batched: it acts at once."""
        return self.act(observation)
        yield  # unreachable: makes this a generator

    def stats(self) -> dict[str, float]:
        """Per-episode counters (chunks generated, chunks dropped, VLM queries, ...)."""
        return {}


def scene_objects(env) -> list[str] | None:
    """The names ``get_actor`` resolves in ``env`` (None when no env is attached)."""
    specs = getattr(env, "specs", None)
    return sorted(specs) if specs else None


def code_failure(error: CodeError, line: str) -> PolicyFailure:
    """A CodeError of the interpreter as a PolicyFailure: "unknown object" or "code error"."""
    reason = "unknown object" if isinstance(error, UnknownObjectError) else "code error"
    return PolicyFailure(reason, f"{line!r}: {error}")


class CodePolicy(Policy):
    """A policy that executes skill-API code lines with the oracle skills (closed loop).

    Subclasses say where the next line comes from (``next_line``); this class runs each line
    through the safe interpreter (:class:`envs.oracle.SkillExecutor`, never ``exec``) until the
    skill terminates, then asks for the next line. ``done()`` ends the policy after its one
    still step; a program that ends without ``done()`` ends the policy too.
    """

    reads_wrist = False  # the skills read the scene; a VLM reads the base camera

    def reset(self, task: str, prompt: str) -> None:
        super().reset(task, prompt)
        if self.env is None:
            raise RuntimeError(f"{type(self).__name__} runs oracle skills: call attach(env) before reset")
        self.executor = SkillExecutor(self.env)
        self.lines_started = 0

    def next_line(self, observation: dict) -> str | None:
        """The next code line to execute, or None when the program is over."""
        raise NotImplementedError

    def act(self, observation: dict) -> np.ndarray:
        action = self._next_action()
        while action is None:
            line = self.next_line(observation)
            if line is None:  # the program ended without done(): hold still, and stop
                self.finished = True
                return self.executor.api.motion.action(np.zeros(3), self.env.suction.on)
            try:
                self.executor.start(line)
            except CodeError as e:
                raise code_failure(e, line) from None
            self.lines_started += 1
            self.instruction = line
            action = self._next_action()
        if self.executor.skill_name == "done":
            self.finished = True
        return action

    def _next_action(self):
        try:
            return self.executor.next_action()
        except CodeError as e:  # a skill that finds the scene unusable while running
            raise code_failure(e, self.executor.line or "") from None

    def stats(self) -> dict[str, float]:
        return {"code_lines": float(self.lines_started)}
