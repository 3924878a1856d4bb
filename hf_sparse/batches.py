"""Splitting a batch into the chunks that get their own masks (`mask_groups`), and counting what a loss averages
over, as the Trainer counts it."""

from __future__ import annotations

from typing import Any

import torch


def batch_size(inputs) -> int | None:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def split_batch(inputs: dict[str, Any], groups: int) -> list[dict[str, Any]]:
    """`groups` chunks (at most one per example) along the batch dimension (tensors whose first dimension is the
    batch size)."""
    batch = batch_size(inputs)
    if groups == 1 or batch is None or batch == 1:
        return [inputs]
    groups = min(groups, batch)  # an epoch's last batch may be smaller: one example per chunk at least
    chunks = [dict() for _ in range(groups)]
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            for chunk, part in zip(chunks, torch.tensor_split(value, groups)):
                chunk[key] = part
        else:
            for chunk in chunks:
                chunk[key] = value
    return chunks


def count_items(inputs: dict[str, Any], loss_shifts_labels: bool) -> float:
    """What the loss averages over, counted like `Trainer._get_num_items_in_batch` counts (examples without
    labels). Not that method itself: it counts only for models that take num_items_in_batch and sums over
    every rank, and a chunk's share needs the local count for every model."""
    labels = inputs.get("shift_labels")
    if labels is None and isinstance(inputs.get("labels"), torch.Tensor):
        labels = inputs["labels"]
        if labels.dim() > 1 and loss_shifts_labels:
            labels = labels[..., 1:]
    if labels is None:
        return float(batch_size(inputs) or 1)
    return float(labels.ne(-100).sum())
