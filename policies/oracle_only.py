"""OracleOnly: the task's scripted oracle as a policy (the reference upper bound).

It runs the same code lines, through the same interpreter and skills, as ``envs.oracle.run_oracle``
does for data generation, but one action per ``act`` call, so that the evaluator can run it like
any learned policy.
"""

from __future__ import annotations

from .base import CodePolicy


class OracleOnly(CodePolicy):
    kind = "oracle"

    def reset(self, task: str, prompt: str) -> None:
        super().reset(task, prompt)
        self._program = iter(self.env.oracle(self.executor.api))

    def next_line(self, observation: dict) -> str | None:
        return next(self._program, None)
