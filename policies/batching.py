"""Acting in B environments at once: the policies' model calls of one control step as batches.

A policy's step is written once, as a generator (:meth:`policies.base.Policy.act_steps`) that
yields the model calls it needs and receives their results::

    def act_steps(self, observation):
        step = yield PlanRequest(self.planner, observation["base_rgb"], keystep=False)
        chunk = yield ChunkRequest(self.dp, observation, step.line, cache_info, scene)
        return action

:func:`act` runs one policy, serving each request at once with the single-row call
(``planner.step``, ``dp.predict_action_chunk``): that is ``policy.act``. :func:`serve` takes the
requests of B policies and runs those of one kind on one model as one batch
(``VLMPlanner.plan_many``, ``DiffusionPolicy.predict_many``); a group of one request takes the
single-row call, so a batch of one computes exactly what ``act`` computes, and objects without
the batch method (test stand-ins) are served one by one. :func:`act_batch` steps B policies in
lockstep (one action each, now); ``policies.episodes.run_batched`` lets each environment run
ahead until it waits on a model call, and holds DP chunk requests back (``defer``) until they
can go together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import PolicyFailure


@dataclass
class PlanRequest:
    """A VLM query: ``planner.next_key_step(image, require_key_step)`` if ``keystep`` else
    ``planner.step(image)`` (``image``: ``(H, W, 3)`` uint8); the result is a ``PlanStep``."""

    planner: object
    image: np.ndarray
    keystep: bool = False
    require_key_step: bool = False  # with keystep: the answer may not be the running line commented out

    def run(self):
        if not self.keystep:
            return self.planner.step(self.image)
        return self.planner.next_key_step(self.image, require_key_step=self.require_key_step)

    def group(self):
        """Requests of one group can be served together (the same model), else None."""
        model = getattr(self.planner, "model", None)
        return ("plan", id(model)) if model is not None and hasattr(self.planner, "plan_many") else None

    @staticmethod
    def run_many(requests: list["PlanRequest"]) -> list:
        planner = requests[0].planner
        return planner.plan_many([r.planner for r in requests], [r.image for r in requests],
                                 [r.keystep for r in requests], [r.require_key_step for r in requests])


@dataclass
class ChunkRequest:
    """A diffusion-policy chunk: ``dp.predict_action_chunk(observation, instruction, cache_info
    [, scene=scene])``; the result is ``(horizon, 7)``."""

    dp: object
    observation: dict
    instruction: str
    cache_info: str
    scene: dict | None = None
    defer = True  # a batched evaluator may hold it back to predict it with other slots' chunks

    def run(self):
        scene = {"scene": self.scene} if self.scene is not None else {}
        return self.dp.predict_action_chunk(self.observation, self.instruction, self.cache_info, **scene)

    def group(self):
        model = getattr(self.dp, "model", None)
        return ("chunk", id(model)) if model is not None and hasattr(self.dp, "predict_many") else None

    @staticmethod
    def run_many(requests: list["ChunkRequest"]) -> list:
        return requests[0].dp.predict_many([r.dp for r in requests], [r.observation for r in requests],
                                           [r.instruction for r in requests], [r.cache_info for r in requests],
                                           [r.scene for r in requests])


def serve(requests: list) -> list:
    """The results of ``requests``, in order: those of one group as one batch (see the module
    docstring), single requests and ungrouped ones one by one."""
    results: list = [None] * len(requests)
    groups: dict = {}
    for i, r in enumerate(requests):
        key = r.group()
        if key is None:
            results[i] = r.run()
        else:
            groups.setdefault(key, []).append(i)
    for rows in groups.values():
        if len(rows) == 1:
            results[rows[0]] = requests[rows[0]].run()
            continue
        for i, out in zip(rows, type(requests[rows[0]]).run_many([requests[i] for i in rows])):
            results[i] = out
    return results


def act(steps) -> np.ndarray:
    """Run one ``act_steps`` generator to its action, serving each request at once."""
    try:
        request = next(steps)
        while True:
            request = steps.send(request.run())
    except StopIteration as stop:
        return stop.value


def act_batch(steps: list) -> list:
    """Run B ``act_steps`` generators side by side, serving their requests in batches. Returns,
    per generator, its action or the :class:`~policies.base.PolicyFailure` it raised."""
    out: list = [None] * len(steps)
    pending: dict[int, object] = {}

    def advance(i: int, value) -> None:
        try:
            pending[i] = steps[i].send(value)
        except StopIteration as stop:
            out[i] = stop.value
        except PolicyFailure as failure:
            out[i] = failure

    for i in range(len(steps)):
        advance(i, None)
    while pending:
        rows = sorted(pending)
        results = serve([pending.pop(i) for i in rows])
        for i, result in zip(rows, results):
            advance(i, result)
    return out


__all__ = ["PlanRequest", "ChunkRequest", "serve", "act", "act_batch"]
