"""Blocks whose units are all dropped cost nothing.

Under gather compute a group with nothing kept would still compute one stand-in unit (so every reshape stays
valid) and zero it in the consuming layer. Here the block's *core* (the module that computes from its units:
an attention module, an MLP, BERT's intermediate layer) is skipped instead: its output is what the block
gives with no unit, the output projection's bias (or zeros), or a zero-width tensor when the consuming
projection lives outside the core. Where a norm feeds only that block (the pre-norm of a Llama or GPT-2
block), the norm is skipped too: its output would be read by nobody.

Exactness: forward values and every gradient equal the stand-in path's (a dropped block's output is the
bias either way; its parameters' gradients are exact zeros either way, given explicitly here so that DDP,
FSDP and Adam see the same parameters with gradients). A decoder's cache still receives a (zero) key/value
so its length stays right.

Mechanics: the core's and the norm's classes are swapped for a subclass of their own (same name, one
`forward` in front; `unsparsify_model` / `shrink_model` swap them back), the way FSDP2's `fully_shard` does.
Not done under mask compute (nothing is gathered there) nor under DeepSpeed ZeRO-3 (its parameters are
gathered by hooks on the submodules a skip never calls): those keep the stand-in.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .structure import UnitGroup

SKIP_ATTR = "_hf_sparse_skip"


class _ZeroGrads(torch.autograd.Function):
    """Identity on `out` whose backward also gives `params` exact zero gradients (what they get on the
    stand-in path, where the block's output is multiplied by 0)."""

    @staticmethod
    def forward(ctx, out, *params):
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.specs])


def update_empty_cache(module: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], head_dim: int) -> None:
    """Hand an attention with no head one zero key/value head for the cache, so the cache counts the positions
    seen (Transformers' cache layers report length 0 for a tensor of no elements, and the model reads its
    position offset from the first layer). Nobody reads these values: the attention is never computed."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layer_idx = getattr(module, "layer_idx", None)
    if cache is not None and hasattr(cache, "update") and layer_idx is not None and x.dim() == 3:
        empty = x.new_zeros(x.shape[0], 1, x.shape[1], head_dim)
        with contextlib.suppress(Exception):  # a cache that cannot hold zero heads just stays unused
            cache.update(empty, empty.clone(), layer_idx)


class EmptySkip:
    """What one skipped module needs to know: its group, what it returns when empty, whose gradients to zero."""

    def __init__(self, group: UnitGroup, role: str, consumer: str | None = None, dropout: str | None = None,
                 head_dim: int = 0, zero_grad_modules: tuple[nn.Module, ...] = ()):
        self.group = group
        self.role = role  # "core" or "norm"
        self.consumer = consumer  # path of the consuming projection inside the core; None: it lives outside
        self.dropout = dropout  # path of the core's output dropout (applied to the bias, as the stand-in would)
        self.head_dim = head_dim
        self.zero_grad_modules = zero_grad_modules  # the norm feeding the core: its parameters are skipped too

    def active(self, module: nn.Module) -> bool:
        group = self.group
        if not group.none_kept or group.compute != "gather":
            return False
        first = next(module.parameters(), None)
        return first is None or not hasattr(first, "ds_id")  # DeepSpeed ZeRO-3 parameter: keep the stand-in

    def core_output(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        x = kwargs.get("hidden_states", args[0] if args else None)
        lead = x.shape[:-1]
        if self.group.kind == "head":
            update_empty_cache(module, x, kwargs, self.head_dim)
        if self.consumer is None:
            out = x.new_zeros(*lead, 0)
        else:
            layer = module.get_submodule(self.consumer)
            base = getattr(layer, "base_layer", layer)  # a LoRA consumer: its adapter adds B(A(0)) = 0
            out = x.new_zeros(*lead, base.out_features)
            bias = base.bias
            if bias is not None:
                out = out + bias.to(x.dtype)  # the bias keeps its real gradient
            if self.dropout is not None:
                out = module.get_submodule(self.dropout)(out)
        if torch.is_grad_enabled():
            params = [p for m in (module, *self.zero_grad_modules) for p in m.parameters() if p.requires_grad]
            if self.consumer is not None and bias is not None:  # the consumer's bias already has its gradient
                params = [p for p in params if p is not bias]
            if not self.zero_grad_modules and x.requires_grad:
                # whatever fed only this core (OPT's pre-norm, for one) gets its zero gradient as well
                params.append(x)
            if params:
                out = _ZeroGrads.apply(out, *params)
        return (out, None) if self.group.kind == "head" else out


class _Skippable:
    """Put in front of a core's or a norm's own class: skips its forward while its group keeps nothing."""

    def forward(self, *args, **kwargs):
        skip: EmptySkip | None = self.__dict__.get(SKIP_ATTR)
        if skip is not None and skip.active(self):
            if skip.role == "norm":
                return args[0] if args else next(iter(kwargs.values()))  # read by nobody: the core is skipped
            return skip.core_output(self, args, kwargs)
        return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        # pickle (torch.save of a whole model) names a class by where it is defined: name the module's own class
        # and rebuild ours from it on load (copies and loads keep skipping)
        reduced = super().__reduce_ex__(protocol)
        own = _own_class(type(self))
        if own is None or not isinstance(reduced, tuple) or len(reduced) < 2:
            return reduced  # a class set on top of ours (FSDP's): left as it is
        return (_new_skippable, (own,), *reduced[2:])


_CLASSES: dict[type, type] = {}  # a module's own class -> ours in front of it


def _own_class(cls: type) -> type | None:
    """The module's own class if `cls` is one of ours, else None."""
    own = cls.__bases__[-1]
    return own if _CLASSES.get(own) is cls else None


def _new_skippable(cls: type):
    return object.__new__(_skippable_class(cls))


def _skippable_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_Skippable, cls), {"__qualname__": cls.__qualname__,
                                                             "__module__": cls.__module__})
    return _CLASSES[cls]


def install_skip(module: nn.Module, skip: EmptySkip) -> None:
    if isinstance(module, _Skippable):
        raise ValueError(f"{type(module).__name__} is already skipped when empty by another unit group")
    module.__dict__[SKIP_ATTR] = skip
    module.__class__ = _skippable_class(type(module))


def remove_skip(module: nn.Module) -> None:
    """Put the module's own class back (a class set on top of ours since, e.g. by FSDP, is left alone)."""
    own = _own_class(type(module))
    module.__dict__.pop(SKIP_ATTR, None)
    if own is not None:
        module.__class__ = own


def remove_skips(model: nn.Module) -> None:
    for module in model.modules():
        if SKIP_ATTR in module.__dict__:
            remove_skip(module)


def skipped_modules(model: nn.Module) -> list[tuple[str, EmptySkip]]:
    return [(name, m.__dict__[SKIP_ATTR]) for name, m in model.named_modules() if SKIP_ATTR in m.__dict__]
