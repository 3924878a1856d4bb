"""The base trainer's own per-forward bookkeeping kept out of the structure update's extra forwards.

A structure update runs each batch under several masks; only one of those forwards trains the weights. TRL's
trainers count tokens (`_total_train_tokens`) and append per-forward metrics (`_metrics[mode][name]`) inside
`compute_loss`: without this, a run with 2 masks would report twice the tokens it trained on.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def uncounted(trainer: Any) -> Iterator[None]:
    """Leave `trainer`'s token count and metric lists as they were before the block (those it has)."""
    tokens = getattr(trainer, "_total_train_tokens", None)
    metrics = getattr(trainer, "_metrics", None)
    lengths = None
    if isinstance(metrics, dict) and all(isinstance(d, dict) for d in metrics.values()):
        lengths = {mode: {k: len(v) for k, v in d.items() if isinstance(v, list)} for mode, d in metrics.items()}
    try:
        yield
    finally:
        if tokens is not None:
            trainer._total_train_tokens = tokens
        if lengths is not None:
            for mode, d in metrics.items():
                for name, values in d.items():
                    if isinstance(values, list):
                        del values[lengths.get(mode, {}).get(name, 0):]
