"""Intra-op threads that follow a file, so that a training can take a core another one freed.

``make demo`` trains the VLM and the DP side by side, one thread each, on a 2-core machine; the VLM
finishes first and its core would sit idle while the DP trains on. :class:`ThreadsFromFile` reads
an integer from ``path`` every ``every_n_steps`` training steps and calls ``torch.set_num_threads``
when it changed; ``scripts/demo.py`` writes the share of the cores each running stage may use
(a DP step of the cpu preset: 226 against 148 ms with 1 and 2 threads, measured). A missing,
empty or malformed file leaves the threads as they are.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def read_threads(path: Path) -> int | None:
    """The positive integer in ``path``, or None (missing, empty, malformed, not positive)."""
    try:
        n = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return n if n > 0 else None


class ThreadsFromFile(L.Callback):
    """Sets ``torch.set_num_threads`` from the integer in ``path``, checked every ``every_n_steps``."""

    def __init__(self, path, every_n_steps: int = 20):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.path, self.every_n_steps = Path(path), int(every_n_steps)

    def apply(self) -> None:
        n = read_threads(self.path)
        if n is not None and n != torch.get_num_threads():
            print(f"intra-op threads {torch.get_num_threads()} -> {n} ({self.path})", flush=True)
            torch.set_num_threads(n)

    def on_train_start(self, trainer, pl_module) -> None:
        self.apply()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.apply()
