"""Unit slices of a sharded parameter (`hf_sparse.sharded.Box`): each rank's block of a global tensor, the slice's
indices inside it, and its part of the slice's values, checked against the global tensor for row (dim 0), column
(dim 1) and element-wise (flattened, dim -1) slices, over even, uneven and empty shards. The 2-process runs under
FSDP2 are in tests/test_distributed.py."""

import pytest
import torch

from hf_sparse.dropped import put, take
from hf_sparse.sharded import Box


def blocks(rows: int, cols: int, ranks: int, dim: int = 0) -> list[Box]:
    """The blocks torch.chunk gives each rank (FSDP2's Shard layout): ceil(n / ranks) per rank, the last ones short
    or empty."""
    n = rows if dim == 0 else cols
    size = -(-n // ranks)
    out = []
    for r in range(ranks):
        start, stop = min(r * size, n), min((r + 1) * size, n)
        out.append(Box((start, 0), (stop - start, cols)) if dim == 0 else Box((0, start), (rows, stop - start)))
    return out


@pytest.mark.parametrize("rows, cols, ranks, shard_dim", [(5, 3, 2, 0), (7, 6, 3, 0), (5, 3, 4, 0), (4, 6, 4, 1)])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_each_block_holds_its_part_of_a_unit_slice(rows, cols, ranks, shard_dim, dim):
    g = torch.Generator().manual_seed(rows * 10 + cols)
    full = torch.randn(rows, cols, generator=g)
    n = full.numel() if dim == -1 else full.shape[dim]
    idx = torch.randperm(n, generator=g)[: max(1, n // 2)].sort().values
    values = take(full, dim, idx)  # the slice in the global layout
    rebuilt = torch.zeros_like(full)
    seen = []
    for box in blocks(rows, cols, ranks, shard_dim):
        r0, c0 = box.offset
        local = full[r0:r0 + box.shape[0], c0:c0 + box.shape[1]].clone()
        local_idx, positions = box.slice(tuple(full.shape), dim, idx)
        part = box.values(values, dim, positions)
        assert torch.equal(take(local, dim, local_idx), part)  # reading on the block = the global slice's part
        written = torch.zeros_like(local)
        put(written, dim, local_idx, part)  # writing it back touches exactly those entries
        rebuilt[r0:r0 + box.shape[0], c0:c0 + box.shape[1]] = written
        seen.append(positions)
    expected = torch.zeros_like(full)
    put(expected, dim, idx, values)
    assert torch.equal(rebuilt, expected)  # the blocks together hold the whole slice, each entry once
    if dim == -1 or dim == shard_dim:
        assert torch.equal(torch.cat(seen).sort().values, torch.arange(idx.numel()))
