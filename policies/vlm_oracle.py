"""VLMOracle (paper 4.2, "VLM + Oracle"): the VLM plans key-steps, the oracle skills execute them.

The VLM in key-step mode proposes the next key-step line from the current base-camera image
(and its memory); the safe interpreter runs that line with the oracle's closed-loop skill until
the skill terminates; then the VLM is asked again. The interpreter decides what runs (the
planner's own ``PlanStep.error`` check is only counted): code that does not parse, calls
something outside the API or names an object that is not in the scene ends the episode as a
recorded failure (:class:`~policies.base.PolicyFailure` "code error" / "unknown object"),
never a crash, never ``exec``.

The VLM is asked with ``require_key_step``: a skill that terminated has ended its line, so the
answer "# <running line>" (not finished, which a VLM trained with ``unfinished_request_fraction``
gives where VLM+DP's DP stopped short) is not on offer; the best line that is a key-step is taken.
"""

from __future__ import annotations

from .base import CodePolicy, Planner, scene_objects


class VLMOracle(CodePolicy):
    """``planner``: a :class:`~policies.base.Planner` (``reset(prompt)``, ``check_context``,
    ``next_key_step(image, require_key_step) -> PlanStep``)."""

    kind = "vlm_oracle"

    def __init__(self, planner: Planner):
        super().__init__()
        self.planner = planner

    def reset(self, task: str, prompt: str) -> None:
        super().reset(task, prompt)
        self.planner.reset(prompt, objects=scene_objects(self.env))
        self.vlm_queries = 0
        self.vlm_tokens = 0
        self.vlm_errors = 0

    def next_line(self, observation: dict) -> str:
        self.planner.check_context(observation["base_rgb"], request=True)  # "context full"
        step = self.planner.next_key_step(observation["base_rgb"], require_key_step=True)
        self.vlm_queries += 1
        self.vlm_tokens += int(step.tokens or 0)
        self.vlm_errors += bool(step.error)
        return step.line

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "vlm_queries": float(self.vlm_queries), "vlm_tokens": float(self.vlm_tokens),
                "vlm_errors": float(self.vlm_errors)}
