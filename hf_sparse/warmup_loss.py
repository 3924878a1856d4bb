"""The dense warm-up's training loss, read to tell whether the task has started to be learned.

A mask is only as good as the training it is read after: read while the loss is still at its starting level
(a classifier at chance), the Taylor importance ranks units by noise and every criterion tried picks the same poor
structure (docs/structure_tasks.md). `WarmupLoss` keeps two windows of the warm-up's per-step losses, the first
`window` steps (the starting level) and the latest `window` (where the loss is now); `SparseTrainer` extends the
warm-up while the latest window has not fallen `warmup_loss_drop` below the first (docs/method.md §11).
"""

from __future__ import annotations

import math
from collections import deque


class WarmupLoss:
    """Per-step training losses of the dense warm-up: the mean of the first `window` steps and of the latest."""

    def __init__(self, window: int, start_step: int = 0):
        if window < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        self.window = window
        self.start_step = start_step  # the training step of the first loss (0 unless resumed without the levels)
        self.first: list[float] = []
        self.recent: deque[float] = deque(maxlen=window)

    def add(self, loss: float) -> None:
        if len(self.first) < self.window:
            self.first.append(loss)
        self.recent.append(loss)

    def full(self) -> bool:
        """Both windows hold `window` steps."""
        return len(self.first) == self.window and len(self.recent) == self.window

    def levels(self) -> tuple[float, float]:
        """(starting level, current level); NaN before any step."""
        if not self.first:
            return float("nan"), float("nan")
        return sum(self.first) / len(self.first), sum(self.recent) / len(self.recent)

    def state_dict(self) -> dict:
        return {"window": self.window, "start_step": self.start_step, "first": list(self.first),
                "recent": list(self.recent)}

    @classmethod
    def from_state_dict(cls, state: dict) -> WarmupLoss:
        levels = cls(int(state["window"]), start_step=int(state["start_step"]))
        levels.first = [float(x) for x in state["first"]]
        levels.recent.extend(float(x) for x in state["recent"])
        return levels


def still_at_start(start: float, now: float, drop: float) -> bool:
    """True while the loss has not fallen `drop` (a share of the starting level) below where it started. A
    non-positive or non-finite level never holds the warm-up back (a relative drop means nothing there)."""
    if not (math.isfinite(start) and math.isfinite(now) and start > 0):
        return False
    return now > (1.0 - drop) * start
