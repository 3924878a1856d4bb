"""Score-gated layers. They know nothing about training: each reads its group's current mask.

`SparseLinear` replaces an `nn.Linear` or a GPT-2 `Conv1D` that produces (`role="out"`) or consumes
(`role="in"`) the units of a group. Under gather compute the kept rows (out) or columns (in) are gathered
and a smaller dense matmul runs on them: the activations between the two members have only the kept units,
a dropped unit costs nothing forward or backward and gets no gradient. Under mask compute the consuming
member multiplies its input by the mask (the reference implementation; exact zeros either way).

The layer keeps the original parameter names (`weight`, `bias`), so a patched model's state dict has the
original keys plus the groups' `scores`/`mask`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .structure import UnitGroup, unit_rows

try:  # transformers' GPT-2 style linear: weight is [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

SUPPORTED_LAYER_TYPES = "torch.nn.Linear, transformers.pytorch_utils.Conv1D"


def is_supported_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (Conv1D is not None and type(module) is Conv1D)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an `nn.Linear` or a GPT-2 `Conv1D` (which stores its weight [in, out])."""
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return module.weight.shape[0], module.weight.shape[1]


class _GatheredLinear(torch.autograd.Function):
    """`F.linear` on the kept rows (`dim=0`, a producer: rows and bias entries `idx`) or the kept columns
    (`dim=1`, a consumer) of a weight, with a backward written for the sparse case.

    Autograd's own backward of `index_select` scatter-adds the small gradient into a full-size zero tensor
    (`index_add_`/`scatter_add_`, slow on CPU for column gathers and a read-modify-write everywhere). Here the
    kept block's gradient is computed by one small matmul and *copied* into place (`index_copy_`: the
    indices are unique). Same math, same result; the dropped rows/columns get exact zeros.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, idx, dim, transposed):
        w = weight.t() if transposed else weight  # [out, in] view
        w_kept = w.index_select(dim, idx)
        b = bias.index_select(0, idx) if bias is not None and dim == 0 else bias
        # Saved for backward: the weight itself (the parameter, no copy; the kept block is gathered again in
        # backward, one layer at a time) and x only when the weight needs a gradient (a frozen base under LoRA
        # needs only the kept block for grad_x). Saving the kept copy and x always made LoRA on a sparse base
        # hold 10-16x the activation memory of LoRA on the dense base at small batches.
        needs_w = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if needs_w else None, weight, idx)
        ctx.dim, ctx.transposed = dim, transposed
        ctx.x_shape = x.shape
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        return F.linear(x, w_kept, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, idx = ctx.saved_tensors
        dtype = grad_out.dtype  # under autocast the forward ran in lower precision: follow grad_out's dtype
        grad_x = grad_w = grad_b = None
        w = weight.t() if ctx.transposed else weight
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(w.index_select(ctx.dim, idx).to(dtype))
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_kept = g2.t().mm(x.reshape(g2.shape[0], x.shape[-1]).to(dtype))  # [out or kept, kept or in]
            grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=grad_out.device)
            (grad_w.t() if ctx.transposed else grad_w).index_copy_(ctx.dim, idx, grad_kept.to(weight.dtype))
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            shape, bias_dtype = ctx.bias_shape
            summed = g2.sum(0).to(bias_dtype)
            if ctx.dim == 0:
                grad_b = torch.zeros(shape, dtype=bias_dtype, device=grad_out.device).index_copy_(0, idx, summed)
            else:
                grad_b = summed
        return grad_x, grad_w, grad_b, None, None, None


def gathered_linear(x, weight, bias, idx, dim: int, transposed: bool = False) -> torch.Tensor:
    """`F.linear(x, W[idx], b[idx])` (dim 0) or `F.linear(x, W[:, idx], b)` (dim 1) where W is the weight in
    [out, in] layout (`weight.t()` for a transposed, Conv1D-style weight)."""
    return _GatheredLinear.apply(x, weight, bias, idx, dim, transposed)


class _GroupRef:
    """Holds the group without registering it as a submodule (it is registered once, on its block)."""

    __slots__ = ("group",)

    def __init__(self, group: UnitGroup):
        self.group = group

    def __deepcopy__(self, memo):  # deep copies of the model must follow the copied group
        import copy

        return _GroupRef(copy.deepcopy(self.group, memo))


class SparseLinear(nn.Module):
    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        group: UnitGroup,
        role: str,
        width: int = 1,
        segments: int = 1,
        transposed: bool = False,
    ):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self._ref = _GroupRef(group)
        self.role = role
        self.width = width
        self.segments = segments
        self.transposed = transposed  # Conv1D stores [in, out]
        out_features = weight.shape[1] if transposed else weight.shape[0]
        self.segment_size = out_features // segments

    @property
    def group(self) -> UnitGroup:
        return self._ref.group

    @property
    def in_features(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    @classmethod
    def from_linear(cls, module: nn.Module, group: UnitGroup, role: str, width: int = 1, segments: int = 1) -> "SparseLinear":
        if not is_supported_linear(module):
            raise TypeError(f"hf_sparse cannot sparsify a {type(module).__name__}; supported layer types: {SUPPORTED_LAYER_TYPES}")
        transposed = Conv1D is not None and isinstance(module, Conv1D)
        return cls(module.weight, module.bias, group, role, width, segments, transposed)

    def to_linear(self, zero_dropped: bool = True) -> nn.Module:
        """The original layer type with these parameters; dropped units' rows/columns zeroed in place."""
        if zero_dropped:
            self.zero_dropped_()
        if self.transposed:
            layer = Conv1D(self.out_features, self.in_features)
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = self.weight
        layer.bias = self.bias
        return layer

    @torch.no_grad()
    def zero_dropped_(self) -> None:
        keep = self.group.expanded_mask(self.width, self.segments if self.role == "out" else 1).to(self.weight.dtype)
        w = self.weight.t() if self.transposed else self.weight  # [out, in] view
        if self.role == "out":
            w.mul_(keep[:, None])
            if self.bias is not None:
                self.bias.mul_(keep)
        else:
            w.mul_(keep[None, :])

    def unit_slices(self, units: torch.Tensor) -> list[tuple[str, nn.Parameter, int, torch.Tensor]]:
        """(name, parameter, dim, indices) of the entries of this layer's parameters that `units` (unit indices
        of its group) own: rows and bias entries of a producer, columns of a consumer, in the stored layout."""
        if self.role == "out":
            idx = unit_rows(units, self.width, self.segments, self.segment_size)
            out = [("weight", self.weight, 1 if self.transposed else 0, idx)]
            if self.bias is not None:
                out.append(("bias", self.bias, 0, idx))
            return out
        return [("weight", self.weight, 0 if self.transposed else 1, unit_rows(units, self.width))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        w = self.weight.t() if self.transposed else self.weight  # [out, in], a view
        if not group.gathers:
            if self.role == "in" and not group.all_kept:
                x = x * group.expanded_mask(self.width).to(x.dtype)
            return F.linear(x, w, self.bias)
        idx = group.index(self.width, self.segments, self.segment_size)
        if self.role == "in" and group.none_kept:
            if x.shape[-1] == 0:  # the block's core was skipped (empty_blocks.py): the output is the bias
                idx = idx[:0]
            else:  # the one computed stand-in unit is dropped too
                x = x * 0
        return gathered_linear(x, self.weight, self.bias, idx, 0 if self.role == "out" else 1, self.transposed)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        text = (
            f"{kind}(in={self.in_features}, out={self.out_features}), role={self.role}, unit_width={self.width}, "
            f"segments={self.segments}, group={self.group.kind}"
        )
        if _asked_by_peft():
            # PEFT's only message for a layer it cannot wrap is "Target module <repr> is not supported": the repr
            # is where the fix can reach the user who put LoRA on an already sparsified model
            text += (". hf_sparse: put LoRA on the model first, then sparsify it: "
                     "model = get_peft_model(model, lora_config); hf_sparse.sparsify_model(model, sparse_config)")
        return text


def _asked_by_peft(depth: int = 12) -> bool:
    """True when PEFT's adapter injection is formatting this layer (its 'not supported' error)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith("peft.tuners"):
            return True
        frame = frame.f_back
    return False


class MaskedWeightLinear(SparseLinear):
    """Element-wise units: one score per weight, `W * mask` in a dense matmul. On dense hardware this
    saves no compute at all; it exists for fine-grained sparsity targets and comparisons."""

    def __init__(self, weight, bias, group, transposed=False):
        super().__init__(weight, bias, group, role="out", transposed=transposed)

    @classmethod
    def from_linear(cls, module: nn.Module, group: UnitGroup, *args, **kwargs) -> "MaskedWeightLinear":
        if not is_supported_linear(module):
            raise TypeError(f"hf_sparse cannot sparsify a {type(module).__name__}; supported layer types: {SUPPORTED_LAYER_TYPES}")
        return cls(module.weight, module.bias, group, Conv1D is not None and isinstance(module, Conv1D))

    def unit_slices(self, units: torch.Tensor) -> list[tuple[str, nn.Parameter, int, torch.Tensor]]:
        # one unit per weight: indices into the flattened weight (dim -1 marks the flat view)
        return [("weight", self.weight, -1, units)]

    @torch.no_grad()
    def zero_dropped_(self) -> None:
        self.weight.mul_(self.group.mask.view_as(self.weight).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not self.group.all_kept:
            w = w * self.group.mask.view_as(w).to(w.dtype)
        return F.linear(x, w.t() if self.transposed else w, self.bias)
