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


class Box:
    """The block of a global tensor one rank holds: its start (`offset`) and size (`shape`) in every dimension."""

    def __init__(self, offset: tuple[int, ...], shape: tuple[int, ...]):
        self.offset, self.shape = tuple(offset), tuple(shape)

    def slice(self, global_shape: tuple[int, ...], dim: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices of the slice inside this block, positions of those entries among `idx`): along `dim`, or, for
        dim -1, into the flattened tensor (the block's own row-major order)."""
        if dim == -1:
            coords = torch.stack(torch.unravel_index(idx, tuple(global_shape)))  # [ndim, n] global coordinates
            start = torch.tensor(self.offset, device=idx.device)[:, None]
            size = torch.tensor(self.shape, device=idx.device)[:, None]
            positions = ((coords >= start) & (coords < start + size)).all(0).nonzero().squeeze(1)
            strides = [1] * len(self.shape)
            for d in range(len(self.shape) - 2, -1, -1):
                strides[d] = strides[d + 1] * self.shape[d + 1]
            local = ((coords[:, positions] - start) * torch.tensor(strides, device=idx.device)[:, None]).sum(0)
            return local, positions
        positions = ((idx >= self.offset[dim]) & (idx < self.offset[dim] + self.shape[dim])).nonzero().squeeze(1)
        return idx[positions] - self.offset[dim], positions

    def values(self, values: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
        """This block's part of `values`, the slice's entries in the global layout (the global tensor's shape but
        along `dim`, where there is one per index; dim -1: one per flat index)."""
        positions = positions.to(values.device)
        if dim == -1:
            return values.reshape(-1)[positions]
        out = values.index_select(dim, positions)
        for d in range(out.dim()):
            if d != dim:
                out = out.narrow(d, self.offset[d], self.shape[d])
        return out


def local_slice(
    t: torch.Tensor, dim: int, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Box | None, torch.Tensor | None]:
    """(the tensor this rank holds, the slice's indices in it, its block and the positions of those entries among
    `idx`; the last two None when the tensor is not sharded and every index is local)."""
    if not is_sharded(t):
        return t, idx, None, None
    local = t.to_local()  # a view: in-place writes reach the DTensor
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    box = Box(offset, shape)
    local_idx, positions = box.slice(tuple(t.shape), dim, idx.to(local.device))
    return local, local_idx, box, positions


def local_values(values: torch.Tensor, dim: int, box: Box | None, positions: torch.Tensor | None) -> torch.Tensor:
    """The part of a global slice's `values` that `local_slice` placed on this rank."""
    return values if box is None else box.values(values, dim, positions)
