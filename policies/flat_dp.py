"""FlatDP: the flat baseline, a diffusion policy conditioned on the task prompt (or on nothing).

No VLM: the DP receives the natural-language task prompt as its instruction at every chunk and
the empty cache info (``"None"``, as in training); a DP trained with ``conditioning: none``
ignores both. Chunks ``(horizon, 7)`` are predicted and their first ``n_action_steps`` actions
executed from a queue (there are no key-steps, so nothing is ever regenerated early).
"""

from __future__ import annotations

from datamodules.labels import DEFAULT_EMPTY_MEMORY_INFO

from .vlm_dp import ChunkedDP


class FlatDP(ChunkedDP):
    kind = "flat_dp"

    def __init__(self, dp, *, n_action_steps: int | None = None, horizon: int | None = None, **holds):
        """``holds``: :class:`ChunkedDP`'s ``hold_threshold`` and ``snap_holds``."""
        super().__init__(dp, regenerate_on_keystep=False, n_action_steps=n_action_steps, horizon=horizon, **holds)

    def reset_instructions(self, prompt: str) -> None:
        self.prompt = prompt

    def next_instruction(self, observation: dict) -> tuple[str, bool, str]:
        return self.prompt, False, DEFAULT_EMPTY_MEMORY_INFO
