"""Unit slices of parameters sharded by FSDP2 (`fully_shard`: DTensor parameters and optimizer state).

A slice (dim, indices) is stated in the parameter's global layout. Between steps an FSDP2 parameter is a DTensor
of which each rank holds a block; torch refuses to mix it with plain index tensors. `local_slice` turns a global
slice into the slice of this rank's block (the entries it holds, and where they sit among the global ones), so
that reading, writing and zeroing dropped units touch the local shard only and need no communication: every
rank does the same for its own block.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor = None


def is_sharded(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def select(values: torch.Tensor, dim: int, positions: torch.Tensor | None) -> torch.Tensor:
    """The entries of `values` (one per index of a global slice, along `dim`) that `positions` names."""
    if positions is None:
        return values
    return values.reshape(-1)[positions] if dim == -1 else values.index_select(dim, positions.to(values.device))


def local_slice(t: torch.Tensor, dim: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(the tensor this rank holds, the slice's indices in it, positions of those entries among `idx`; None when
    the tensor is not sharded and every index is local). dim -1: indices into the flattened tensor."""
    if not is_sharded(t):
        return t, idx, None
    local = t.to_local()  # a view: in-place writes reach the DTensor
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    idx = idx.to(local.device)
    if dim == -1:
        coords = torch.stack(torch.unravel_index(idx, tuple(t.shape)))  # [ndim, n] global coordinates
        start = torch.tensor(offset, device=idx.device)[:, None]
        size = torch.tensor(shape, device=idx.device)[:, None]
        inside = ((coords >= start) & (coords < start + size)).all(0)
        positions = inside.nonzero().squeeze(1)
        local_coords = (coords[:, positions] - start)
        strides = torch.tensor([int(torch.tensor(shape[d + 1:]).prod()) for d in range(len(shape))], device=idx.device)
        return local, (local_coords * strides[:, None]).sum(0), positions
    inside = (idx >= offset[dim]) & (idx < offset[dim] + shape[dim])
    positions = inside.nonzero().squeeze(1)
    return local, idx[positions] - offset[dim], positions
