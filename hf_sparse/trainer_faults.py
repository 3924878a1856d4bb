"""`FaultsMixin`: a `SparseTrainer` run whose loss turns non-finite. One such step (an fp16 overflow, a bad batch)
is left out of the structure update and warned about; a run that stays non-finite (NaN weights never recover)
stops with the step it began at, before a mask is fixed from it."""

from __future__ import annotations

from transformers.utils import logging

logger = logging.get_logger("hf_sparse.trainer")

# Structure updates in a row whose losses are all non-finite before the run stops.
NONFINITE_UPDATES_TO_STOP = 3


class FaultsMixin:
    # the first step of the current run of non-finite losses, and its length (reset by a finite update)
    _nonfinite_since: int | None = None
    _nonfinite_run: int = 0

    def _note_nonfinite(self, step: int, what: str) -> None:
        """A step whose loss (or warm-up derivative) was NaN / inf: counted, warned about once per run of them."""
        if self._nonfinite_since is None:
            self._nonfinite_since = step
            logger.warning(f"SparseTrainer: {what} at step {step} is not finite; this step's structure information "
                           "is left out (the run stops if it goes on)")
        self._nonfinite_run += 1

    def _raise_diverged(self, step: int, extent: str) -> None:
        since = self._nonfinite_since if self._nonfinite_since is not None else step
        raise RuntimeError(
            f"SparseTrainer: the loss has been non-finite since step {since} ({extent}): the training diverged "
            f"(learning_rate={self.args.learning_rate}) or the data hold NaN / inf, so no structure can be learned or "
            "fixed from it; nothing was fixed. Lower --learning_rate (or set --max_grad_norm), check the inputs, and "
            f"train again or resume from a checkpoint before step {since}"
        )

    def _note_finite(self) -> None:
        self._nonfinite_since, self._nonfinite_run = None, 0
