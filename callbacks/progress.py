"""Training progress as plain lines, for logs: ``step 1500/4000 (38 %)  train/loss 0.0412  2.91 steps/s  eta 0:14:19``.

Lightning's progress bar redraws one terminal line; written to a file (``make demo``'s logs, an
experiment stage's ``stage.log``) it shows nothing until an epoch ends, so a 30-minute training
looked stalled. :func:`lightning_modules.training.make_trainer` uses this callback instead of the
bar when the bar is off or stdout is not a terminal: one line at the first step, then at most one
every ``every_s`` seconds, and one at the end of the fit.
"""

from __future__ import annotations

import time

import lightning as L


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (also the experiment runner's times)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLines(L.Callback):
    """Prints ``step k/N (p %)``, the last ``train/loss``, steps per second since the fit began and
    the time left, to stdout (flushed)."""

    def __init__(self, every_s: float = 60.0):
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.every_s = float(every_s)
        self._start_step = 0
        self._start = self._last = 0.0
        self._first = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step, self._start, self._last, self._first = trainer.global_step, time.monotonic(), 0.0, True

    def line(self, trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total} ({100 * step / total:.0f} %)" if total and total > 0 else f"step {step}"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"train/loss {float(loss):.4f}")
        elapsed, done = time.monotonic() - self._start, step - self._start_step
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.2f} steps/s")
            if total and total > step:
                parts.append(f"eta {format_duration((total - step) / rate)}")
        return "  ".join(parts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if self._first or now - self._last >= self.every_s:
            self._last, self._first = now, False
            print(self.line(trainer), flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        print(f"{self.line(trainer)}  (fit took {format_duration(time.monotonic() - self._start)})", flush=True)
