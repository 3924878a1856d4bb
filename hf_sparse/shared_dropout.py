"""Common random numbers across the forwards of one structure update, dropout included.

VR-PGE compares the losses of two masks; any randomness the two forwards do not share adds variance to
L1 - L2. Restoring the RNG state before each forward is not enough: the number of random draws depends on
the mask (attention dropout over the kept heads, LoRA dropout over the kept width), so after the first
gathered layer the two forwards' streams part. Here every dropout module call reseeds the generator of its
input's device from (a per-step base seed, the module's index, its call count in this forward): every tensor
whose shape does not depend on the mask (the hidden-state dropout after each block, for example) gets the
same dropout bits in every forward, whatever the masks did before it.

Gradient checkpointing recomputes a segment's forward during backward: the call counts are reset when a
forward ends, so a recomputed module call (counted from 0 again) draws the bits of its first call. A module
called several times inside one checkpointed segment recomputes in the same order and stays aligned.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _seed(base: int, index: int, call: int) -> int:
    h = (base * _MIX[0] + (index + 1) * _MIX[1] + (call + 1) * _MIX[2]) % (1 << 64)
    h ^= h >> 29
    return h % (1 << 63)


def _reseed(device: torch.device, seed: int) -> None:
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


class SharedDropout:
    """Pre-hooks on the model's dropout modules, active inside `active(base_seed)`."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        self.base: int | None = None
        self.calls: dict[int, int] = {}

    def new_forward(self) -> None:
        """Call at the start and at the end of each forward (see the module docstring)."""
        self.calls = {}

    @contextmanager
    def active(self, base_seed: int):
        self.base, self.calls = int(base_seed), {}
        handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.base = None

    def _hook(self, index: int):
        def pre_hook(module, args):
            if self.base is None or not module.training or module.p == 0 or not args:
                return
            call = self.calls.get(index, 0)
            self.calls[index] = call + 1
            x = args[0]
            if torch.is_tensor(x):
                _reseed(x.device, _seed(self.base, index, call))

        return pre_hook


def rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
