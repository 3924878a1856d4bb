"""The data of `prune_model`: calibration batches and the search's endless stream, from whatever a user has (a
`datasets.Dataset`, a torch dataset, a streaming dataset, a list of examples or of ready batches)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("hf_sparse.prune")


def batches(model: nn.Module, dataset: Any, batch_size: int, data_collator: Callable | None, seed: int,
            calibration_batches: int = 0) -> tuple[list[dict], Iterator[dict]]:
    """(the calibration batches, an endless stream of the search's batches), on the model's device.

    A sized dataset of examples (`datasets.Dataset`, a torch `Dataset`, a list of example dicts) is shuffled from
    `seed` and collated: the first `calibration_batches` batches calibrate, the rest of the epoch feeds the search,
    and later epochs reshuffle *without* the calibration examples (so the start's and the final masks' losses are
    measured on batches the search never saw). An iterable dataset of examples (a torch `IterableDataset`, a
    streaming `datasets.IterableDataset`) is batched lazily and read again from its start when it ends. A list of
    ready batches (dicts of batched tensors) is split the same way and cycled; a one-shot iterator of batches is
    read lazily (and what it gave is cycled once it ends).
    """
    from torch.utils.data import DataLoader, IterableDataset, Subset
    from transformers import default_data_collator

    device = next(model.parameters()).device
    collate = data_collator or default_data_collator

    def to_device(batch: dict) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    if isinstance(dataset, (list, tuple)) and dataset and all(_is_batch(b) for b in dataset):
        ready = [to_device(b) for b in dataset]
        calibration, rest = ready[:calibration_batches], ready[calibration_batches:]
        if not rest:
            logger.warning("hf_sparse.prune_model: %d ready batches, all of them calibration batches: the search "
                           "reuses them, so the start's and the final losses are measured on data it saw",
                           len(ready))
        return calibration, _cycle(rest or ready)
    if isinstance(dataset, dict) and not _is_batch(dataset):  # a DatasetDict
        raise ValueError(f"prune_model: got a dict of splits {sorted(dataset)}; pass one split, e.g. "
                         "dataset['train']")
    if isinstance(dataset, (list, tuple)) or (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
                                             and not isinstance(dataset, IterableDataset)):
        if len(dataset) == 0:
            raise ValueError("prune_model: the dataset is empty")
        dataset = _model_columns(model, dataset)
        generator = torch.Generator().manual_seed(seed)
        # the order a shuffling DataLoader draws from `seed` (what the Trainer and the study's baselines see)
        order = [int(i) for b in DataLoader(range(len(dataset)), batch_size=batch_size, shuffle=True,
                                           generator=generator) for i in b]
        held = order[: calibration_batches * batch_size]
        if len(held) >= len(dataset):
            raise ValueError(f"prune_model: {len(dataset)} examples are not enough for {calibration_batches} "
                             f"calibration batches of {batch_size} and a search on other examples; give more data "
                             "or lower calibration_batches / batch_size")
        calibration = [to_device(collate([dataset[i] for i in held[j: j + batch_size]]))
                       for j in range(0, len(held), batch_size)]
        first = order[len(held):]
        searched = Subset(dataset, sorted(first))

        def stream() -> Iterator[dict]:
            for j in range(0, len(first), batch_size):  # the first epoch: the shuffle's order after the calibration
                yield to_device(collate([dataset[i] for i in first[j: j + batch_size]]))
            loader = DataLoader(searched, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                generator=generator, drop_last=len(searched) >= batch_size)
            while True:
                for batch in loader:
                    yield to_device(batch)

        return calibration, stream()
    if isinstance(dataset, IterableDataset) or hasattr(dataset, "iter") and hasattr(dataset, "column_names"):
        stream = (to_device(b) for b in endless(DataLoader(dataset, batch_size=batch_size, collate_fn=collate)))
        return [next(stream) for _ in range(calibration_batches)], stream
    iterator = iter(dataset)  # an iterator of ready batches, read lazily
    calibration = []
    for batch in iterator:
        if not _is_batch(batch):
            raise ValueError("prune_model: the data is an iterator of single examples; pass a dataset (a list, a "
                             "datasets.Dataset, a torch Dataset or IterableDataset) so they can be batched")
        calibration.append(to_device(batch))
        if len(calibration) == calibration_batches:
            break
    return calibration, _cycle((to_device(b) for b in iterator), fallback=calibration)


def endless(loader: Iterable[dict]) -> Iterator[dict]:
    """`loader` read again from its start each time it ends (a shuffling DataLoader reshuffles)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data yielded no batch")


def _cycle(source: Iterable[dict], fallback: list[dict] | None = None) -> Iterator[dict]:
    """`source` once, lazily, then what it gave over and over (or `fallback` if it gave nothing)."""
    seen = []
    for batch in source:
        seen.append(batch)
        yield batch
    seen = seen or list(fallback or [])
    if not seen:
        raise ValueError("prune_model: the dataset yielded no batch")
    while True:
        yield from seen


def _is_batch(item: Any) -> bool:
    return isinstance(item, dict) and any(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in item.values())


def _model_columns(model: nn.Module, dataset: Any) -> Any:
    """A `datasets.Dataset` without the columns the model's forward does not take (text, ids of examples), as the
    Trainer drops them (`remove_unused_columns`)."""
    names = getattr(dataset, "column_names", None)
    if not names:
        return dataset
    accepted = set(inspect.signature(model.forward).parameters) | {"label", "label_ids", "labels"}
    unused = [n for n in names if n not in accepted]
    if len(unused) == len(names):
        raise ValueError(f"prune_model: none of the dataset's columns {names} is an input of "
                         f"{type(model).__name__}.forward; tokenize the dataset first")
    return dataset.remove_columns(unused) if unused else dataset
