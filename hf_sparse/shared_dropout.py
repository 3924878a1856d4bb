"""Common random numbers across the forwards of one structure update, dropout included.

VR-PGE compares the losses of two masks; any randomness the two forwards do not share adds variance to
L1 - L2. Restoring the RNG state before each forward is not enough: the number of random draws depends on
the mask (attention dropout over the kept heads, LoRA dropout over the kept width), so after the first
gathered layer the two forwards' streams part. Here every dropout module call reseeds the generator of its
input's device from (a per-step base seed, the module's index, its call count in this forward): every tensor
whose shape does not depend on the mask (the hidden-state dropout after each block, for example) gets the
same dropout bits in every forward, whatever the masks did before it.

Each call's keep mask is drawn once per structure update and reused by the later forwards whose tensor has its
shape: random numbers are slow on a CPU (drawing a mask costs ~30 multiplies there, measured in
docs/benchmarks.md), and a search step runs two forwards over hidden states no mask changes. The masks come from
`torch.rand` (half the time of `bernoulli_` here) and are applied as `x * keep / (1 - p)`, as dropout does. After
each call the generator is reseeded from (base seed, module, call) again, so the functional dropouts that follow
(inside attention) draw alike in every forward whether the mask was drawn or reused.

Gradient checkpointing recomputes a segment's forward during backward: the call counts are reset when a
forward ends, so a recomputed module call (counted from 0 again) reuses the mask of its first call. A module
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
    """Hooks on the model's dropout modules, active inside `active(base_seed)`: the pre-hook finds (or draws) the
    call's keep mask and turns the module's own forward into the identity; the post-hook applies the mask."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        self.base: int | None = None
        self.calls: dict[int, int] = {}
        self.masks: dict[tuple[int, int], torch.Tensor] = {}  # (module, call) -> keep mask, for this update
        self._pending: dict[int, tuple[nn.Module, torch.Tensor]] = {}

    def new_forward(self) -> None:
        """Call at the start and at the end of each forward (see the module docstring)."""
        self.calls = {}

    @contextmanager
    def active(self, base_seed: int):
        self.base, self.calls, self.masks = int(base_seed), {}, {}
        handles = []
        for i, m in enumerate(self.modules):  # prepended: hooks a user put on dropout see the dropped output
            handles.append(m.register_forward_pre_hook(self._pre_hook(i), prepend=True))
            handles.append(m.register_forward_hook(self._post_hook(i), prepend=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for module, _ in self._pending.values():  # a forward that raised between the two hooks
                module.training = True
            self.base, self.masks, self._pending = None, {}, {}

    def _pre_hook(self, index: int):
        def pre_hook(module, args):
            if self.base is None or not module.training or module.p == 0 or not args or not torch.is_tensor(args[0]):
                return
            call = self.calls.get(index, 0)
            self.calls[index] = call + 1
            x = args[0]
            keep = self.masks.get((index, call))
            if keep is None or keep.shape != x.shape or keep.device != x.device or keep.dtype != x.dtype:
                _reseed(x.device, _seed(self.base, index, call))
                # 0/1 in the input's dtype (no conversion per use); the 1 / (1 - p) is applied as a scalar, as
                # dropout does: folded into a bf16 mask it would be rounded (a bias of up to 0.4%)
                keep = (torch.rand(x.shape, device=x.device) >= module.p).to(x.dtype)
                self.masks[(index, call)] = keep
            _reseed(x.device, _seed(self.base + 1, index, call))  # the stream after this call: alike every time
            self._pending[index] = (module, keep)
            module.training = False  # its own forward is the identity now; the post-hook drops

        return pre_hook

    def _post_hook(self, index: int):
        def post_hook(module, args, out):
            pending = self._pending.pop(index, None)
            if pending is None:
                return None
            module.training = True
            return (args[0] * pending[1]).mul_(1.0 / (1.0 - module.p))

        return post_hook


def rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
