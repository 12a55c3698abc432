"""VLMOracle (paper 4.2, "VLM + Oracle"): the VLM plans key-steps, the oracle skills execute them.

The VLM in key-step mode proposes the next key-step line from the current base-camera image
(and its memory); the safe interpreter runs that line with the oracle's closed-loop skill until
the skill terminates; then the VLM is asked again. The interpreter decides what runs (the
planner's own ``PlanStep.error`` check is only counted): code that does not parse, calls
something outside the API or names an object that is not in the scene ends the episode as a
recorded failure (:class:`~policies.base.PolicyFailure` "code error" / "unknown object"),
never a crash, never ``exec``.

A key-step request answered with the running line commented out (``# `` + line: "that call is
not finished", what a VLM trained with ``unfinished_request_fraction`` may answer; see
``policies.vlm_dp``) runs that line again with its skill, at most ``MAX_REISSUES`` times in a row;
after that the episode ends as a recorded failure ("vlm error"), never a loop without actions.
"""

from __future__ import annotations

from datamodules.labels import is_key_step, uncomment

from .base import CodePolicy, Planner, PolicyFailure, scene_objects

MAX_REISSUES = 3  # an "unfinished" answer re-runs the running line at most this many times in a row


class VLMOracle(CodePolicy):
    """``planner``: a :class:`~policies.base.Planner` (``reset(prompt)``, ``check_context``,
    ``next_key_step(image) -> PlanStep``)."""

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
        self.running = ""  # the last key-step line run
        self.reissued_lines, self.reissues_in_a_row = 0, 0

    def next_line(self, observation: dict) -> str:
        self.planner.check_context(observation["base_rgb"], request=True)  # "context full"
        step = self.planner.next_key_step(observation["base_rgb"])
        self.vlm_queries += 1
        self.vlm_tokens += int(step.tokens or 0)
        self.vlm_errors += bool(step.error)
        if not is_key_step(step.line) and self.running and uncomment(step.line) == self.running:
            if self.reissues_in_a_row >= MAX_REISSUES:
                raise PolicyFailure("vlm error", f"{step.line!r}: the running line called unfinished "
                                    f"{MAX_REISSUES + 1} times in a row")
            self.reissued_lines += 1
            self.reissues_in_a_row += 1
            return self.running  # "not finished": its skill runs again
        self.running, self.reissues_in_a_row = step.line, 0
        return step.line

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "vlm_queries": float(self.vlm_queries), "vlm_tokens": float(self.vlm_tokens),
                "vlm_errors": float(self.vlm_errors), "reissued_lines": float(self.reissued_lines)}
