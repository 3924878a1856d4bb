"""The parameter entries of units a mask leaves out, as slices: for saving them apart (so a checkpoint's main
weights carry explicit zeros and load as the sparse model anywhere) and for keeping them still while the
optimizer steps (a unit not computed in a step must not move, nor its optimizer state).

A slice is (state-dict name, parameter, dim, indices) in the parameter's stored layout; dim -1 means the
flattened parameter (element-wise units).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .layers import SparseLinear
from .sharded import local_slice, local_values
from .structure import SparseStructure

DROPPED_WEIGHTS_NAME = "hf_sparse_dropped.safetensors"

Slice = tuple[str, nn.Parameter, int, torch.Tensor]


def unit_slices(model: nn.Module, structure: SparseStructure, keep: torch.Tensor | None = None) -> Iterator[Slice]:
    """The slices of every parameter entry owned by a unit that `keep` (flat, 0/1; default: the current masks)
    leaves out."""
    flat = structure.masks() if keep is None else keep
    per_group = dict(zip((id(g) for g in structure), structure.split(flat.to(structure.device))))
    dropped_units = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, SparseLinear):
            continue
        key = id(layer.group)
        if key not in per_group:
            continue
        if key not in dropped_units:
            dropped_units[key] = (per_group[key] == 0).nonzero().squeeze(1)
        units = dropped_units[key]
        if units.numel() == 0:
            continue
        for pname, param, dim, idx in layer.unit_slices(units.to(layer.weight.device)):
            yield (f"{name}.{pname}" if name else pname), param, dim, idx


def take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).index_select(0, idx) if dim == -1 else t.index_select(dim, idx)


@torch.no_grad()
def put(t: torch.Tensor, dim: int, idx: torch.Tensor, values: torch.Tensor) -> None:
    if dim == -1:
        t.view(-1).index_copy_(0, idx, values.to(t.dtype))
    else:
        t.index_copy_(dim, idx, values.to(t.dtype))


def _fill_zero(t: torch.Tensor, dim: int, idx: torch.Tensor) -> None:
    if dim == -1:
        t.view(-1).index_fill_(0, idx, 0)
    else:
        t.index_fill_(dim, idx, 0)


def _zero(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    if dim == -1:
        return t.reshape(-1).index_fill(0, idx, 0).view_as(t)
    return t.index_fill(dim, idx, 0)


@torch.no_grad()
def split_dropped(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(state dict whose dropped entries are zeros, {name: the dropped entries' values}) for the current masks.

    The first is what any loader sees (plain `from_pretrained` then computes exactly the sparse model); the
    second keeps the dropped weights so that training can go on (they may come back while the search runs)."""
    structure = SparseStructure(model)
    out = dict(state_dict)
    dropped = {}
    for name, param, dim, idx in unit_slices(model, structure):
        if name not in out:
            continue
        base = out[name].detach()
        dropped[name] = take(base, dim, idx.to(base.device)).contiguous()
        out[name] = _zero(base, dim, idx.to(base.device))
    return out, dropped


@torch.no_grad()
def restore_dropped(model: nn.Module, dropped: dict[str, torch.Tensor], source: str) -> None:
    """Put saved dropped entries back (the masks must be the ones they were saved with: they are loaded first)."""
    structure = SparseStructure(model)
    expected = {}
    for name, param, dim, idx in unit_slices(model, structure):
        expected[name] = (param, dim, idx)
    if set(expected) != set(dropped):
        missing, extra = sorted(set(expected) - set(dropped)), sorted(set(dropped) - set(expected))
        raise ValueError(
            f"{source} does not match the saved masks: dropped entries missing for {missing[:4]}, unexpected for "
            f"{extra[:4]}; the folder was edited or mixes two saves. Re-save the model."
        )
    for name, (param, dim, idx) in expected.items():
        values = dropped[name]
        if values.numel() != idx.numel() * (1 if dim == -1 else param.numel() // param.shape[dim]):
            raise ValueError(f"{source}: {name} holds {values.numel()} dropped values, the mask needs another count")
        # FSDP2: this rank's block only
        local, local_idx, box, positions = local_slice(param.data, dim, idx.to(param.device))
        put(local, dim, local_idx, local_values(values, dim, box, positions).to(local.device))


class FrozenUnits:
    """Keeps the weights and optimizer state of units not computed in a step exactly as they were.

    Why: a dropped unit gets an explicit zero gradient, and AdamW would still move it (weight decay, stale
    momentum), a unit kept with probability s would get ~1/s times more decay per useful gradient: a bias
    against uncertain units. Works with any torch optimizer (the Trainer's fused AdamW or one the user
    passes): before the step the dropped slices of each parameter and of every optimizer-state tensor of the
    parameter's shape are read, after the step they are written back (search phase: the computed units change
    every step). Once the mask is fixed, `settle` sets the dropped entries aside and zeroes them in the live
    tensors, which then stay still at no cost per step; `unsettle` (end of training, before a best model is
    loaded) and `restored` (around every save) put the set-aside values back, so that a fixed run keeps its
    dropped weights: it can be unfixed, regrown or exported at another sparsity. Adam's step counter still
    advances (it is per tensor).
    """

    def __init__(self, model: nn.Module, structure: SparseStructure):
        self.model, self.structure = model, structure
        self.keep: torch.Tensor | None = None  # the units computed in this step (set by the trainer)
        self.settled: torch.Tensor | None = None  # a fixed mask whose dropped entries are all zero (see settle)
        self._saved: list = []
        # (this rank's tensor, dim, local indices, the dropped values set aside on the CPU) of a settled mask
        self._stash: list = []
        self._handles = []
        self.optimizer: torch.optim.Optimizer | None = None

    @torch.no_grad()
    def settle(self, keep: torch.Tensor) -> None:
        """For a mask that stays fixed: set the dropped units' weights aside (on the CPU) and zero them and their
        optimizer state once. With a zero gradient, zero state and zero weight every usual optimizer update (SGD,
        Adam/AdamW with weight decay, Adagrad, RMSprop, Lion, Adafactor) is exactly zero, so the dropped entries
        stay still at no per-step cost. The model computes the same function (those units are never computed
        again); the set-aside values come back with `unsettle` / `restored`."""
        self.unsettle()  # another mask settled before: its values go back first
        for _, param, dim, idx in unit_slices(self.model, self.structure, keep):
            if not param.requires_grad:
                continue  # a frozen base (LoRA): no optimizer moves it
            local, local_idx, _, _ = local_slice(param.data, dim, idx)  # FSDP2: each rank its own block
            self._stash.append((local, dim, local_idx, take(local, dim, local_idx).to("cpu", copy=True)))
            _fill_zero(local, dim, local_idx)
            for t in self._states(param):
                local_state, state_idx, _, _ = local_slice(t, dim, idx)
                _fill_zero(local_state, dim, state_idx)
        self.settled = keep.clone()

    @torch.no_grad()
    def unsettle(self) -> None:
        """Put the dropped weights set aside by `settle` back (their optimizer state stays zero)."""
        for local, dim, local_idx, values in self._stash:
            put(local, dim, local_idx, values.to(local.device))
        self._stash = []
        self.settled = None

    @contextlib.contextmanager
    def restored(self):
        """The dropped weights back in place while the block runs (a save writes their real values), zeroed again
        after it (the fixed phase goes on at no cost)."""
        stash = self._stash
        with torch.no_grad():
            for local, dim, local_idx, values in stash:
                put(local, dim, local_idx, values.to(local.device))
        try:
            yield
        finally:
            with torch.no_grad():
                for local, dim, local_idx, _ in stash:
                    _fill_zero(local, dim, local_idx)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.detach()
        self.optimizer = optimizer
        self._handles = [optimizer.register_step_pre_hook(self._before), optimizer.register_step_post_hook(self._after)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def _before(self, optimizer, args, kwargs):
        self._saved = []
        if self.keep is None or bool((self.keep > 0).all()):
            return
        if self.settled is not None and torch.equal(self.keep.to(self.settled.device), self.settled):
            return  # the fixed phase: nothing dropped can move (see settle)
        for _, param, dim, idx in unit_slices(self.model, self.structure, self.keep):
            if not param.requires_grad:
                continue
            for t in [param.data] + self._states(param):
                local, local_idx, _, _ = local_slice(t, dim, idx)  # FSDP2: each rank keeps its own block
                self._saved.append((local, dim, local_idx, take(local, dim, local_idx)))

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs):
        for local, dim, local_idx, values in self._saved:
            put(local, dim, local_idx, values)
        self._saved = []

    def _states(self, param: nn.Parameter) -> list[torch.Tensor]:
        """The optimizer-state tensors laid out like the parameter (Adam's moments; not its step counter)."""
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(param, {})
        return [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]
