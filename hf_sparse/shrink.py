"""Physical removal of dropped neurons and heads (`shrink_model`) and its inverse for loading (`apply_shapes`).

Per-layer sizes go into `config.hf_sparse_shapes` (config.json), and `load_sparse_model` rebuilds them. An
attention module with no head left becomes `NoHeadsAttention`; a GPT-2 `Conv1D` with no input, `ZeroInputConv1D`.

A model of `SparseConfig(uniform_layers=True)` gets a standard config instead (`_standard_plan`): every layer
keeps the same counts, so the family's own fields (`intermediate_size`, `num_key_value_heads` with an explicit
`head_dim`, ...) say the sizes, and plain `from_pretrained` loads it; a kind the config cannot express keeps its
full size with the dropped units zeroed.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from .architectures import DEFAULT_HEAD_DIM_ATTRS, DEFAULT_SHRINK_ATTRS, get_architecture, head_geometry
from .empty_blocks import remove_skips, update_empty_cache
from .layers import Conv1D, MaskedWeightLinear, SparseLinear, layer_features
from .model_state import CONFIG_ATTR, get_sparse_config, is_sparsified, lora_parts, parent_module
from .structure import SparseStructure, unit_rows

SHAPES_KEY = "hf_sparse_shapes"  # the attribute of the Transformers config (a field of config.json)
SHAPES_VERSION = 1

logger = logging.getLogger("hf_sparse.export")


class ZeroInputConv1D(Conv1D):
    """A GPT-2 `Conv1D` with no input features (every consumed unit removed): its output is the bias.
    `Conv1D.forward` reshapes with `view(-1, 0)`, which torch rejects for an empty tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.nf) + self.bias.to(x.dtype)


class NoHeadsAttention(nn.Module):
    """Stands in for an attention module whose heads were all removed: the attention adds nothing, so its
    output is the output projection's bias (or, where the projection lives outside, an empty tensor that the
    outer output layer turns into its bias). It keeps the original submodules (zero-sized), so state-dict
    keys do not change, and hands a zero key/value head to the cache so the cache length stays right."""

    def __init__(self, original: nn.Module, consumer: str | None, head_dim: int):
        super().__init__()
        for name, value in vars(original).items():  # layer_idx, is_causal, config, ...: read by some callers
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        for name, child in original.named_children():
            self.add_module(name, child)
        self.consumer = consumer
        self.removed_head_dim = head_dim
        self.original_class = type(original).__name__

    def extra_repr(self) -> str:
        return f"no heads left (was {self.original_class})"

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        x = hidden_states if hidden_states is not None else args[0]
        lead = x.shape[:-1]
        update_empty_cache(self, x, kwargs, self.removed_head_dim)
        if self.consumer is None:
            return x.new_zeros(*lead, 0), None
        layer = self.get_submodule(self.consumer)
        out_features = layer_features(layer)[0]
        out = x.new_zeros(*lead, out_features)
        if getattr(layer, "bias", None) is not None:
            out = out + layer.bias.to(x.dtype)
        return out, None


def _new_layer(transposed: bool, in_features: int, out_features: int, bias: bool, device="meta") -> nn.Module:
    """A Linear / Conv1D of the given shape whose parameters are assigned after (on `device`, meta by default)."""
    with torch.device(device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        if not transposed:
            return nn.Linear(in_features, out_features, bias=bias)
        cls = ZeroInputConv1D if in_features == 0 else Conv1D
        return cls(out_features, in_features)


def _shrunk_layer(layer: SparseLinear, kept: torch.Tensor) -> nn.Module:
    if layer.role == "out":
        idx = unit_rows(kept, layer.width, layer.segments, layer.segment_size)
        in_f, out_f = layer.in_features, int(idx.numel())
    else:
        idx = unit_rows(kept, layer.width, 1, 0)
        in_f, out_f = int(idx.numel()), layer.out_features
    new = _new_layer(layer.transposed, in_f, out_f, layer.bias is not None)
    dim = (1 if layer.transposed else 0) if layer.role == "out" else (0 if layer.transposed else 1)
    w = layer.weight.detach().index_select(dim, idx.to(layer.weight.device)).clone()
    new.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        b = layer.bias.detach()
        b = b.index_select(0, idx.to(b.device)).clone() if layer.role == "out" else b.clone()
        new.bias = nn.Parameter(b, requires_grad=layer.bias.requires_grad)
    elif not layer.transposed:
        new.bias = None
    return new


def _head_counts(kept_units: int, width_of_group: int, head_dim: int, shrink_attrs) -> dict[str, int]:
    """The attention module's head-count attributes at the kept sizes (`BlockSpec.shrink_attrs`)."""
    query_heads = kept_units * (width_of_group // head_dim)
    counts = {"query_heads": query_heads, "kv_heads": kept_units, "query_width": query_heads * head_dim}
    return {attr: counts[count] for attr, count in shrink_attrs}


@torch.no_grad()
def shrink_model(model: nn.Module) -> nn.Module:
    """Physically remove the dropped neurons and heads (by the current mask: call `fix_masks` first).

    Returns the model (changed in place) with plain `nn.Linear` / `Conv1D` layers of the kept sizes and the
    attention modules' head counts adjusted. The per-layer sizes are stored in `model.config.hf_sparse_shapes`,
    so `model.save_pretrained(path)` writes them to config.json and `hf_sparse.load_sparse_model(path)`
    rebuilds the model (plain `from_pretrained` would see the dense sizes and refuse the weights).

    With `SparseConfig.uniform_layers` the sizes go into the config's own fields instead (no
    `hf_sparse_shapes`): `from_pretrained` of the saved folder builds the shrunk model (`_standard_plan`).
    """
    if not is_sparsified(model):
        raise ValueError("shrink_model needs a sparsified model: call hf_sparse.sparsify_model(model, config) first")
    config = get_sparse_config(model)
    if config.uses_weights:
        raise ValueError(
            "element-wise (granularity='weight') sparsity cannot be removed physically; export it with "
            "hf_sparse.unsparsify_model(model) (dropped weights zeroed) instead"
        )
    names = {id(m): n for n, m in model.named_modules()}
    members: dict[int, list[tuple[str, SparseLinear]]] = defaultdict(list)
    for name, module in model.named_modules():
        if isinstance(module, MaskedWeightLinear) or not isinstance(module, SparseLinear):
            continue
        if _is_lora_member(model, name):
            raise ValueError(
                f"{name} belongs to a PEFT LoRA layer; merge the adapters first with "
                "hf_sparse.merge_lora_sparse(model, shrink=True)"
            )
        members[id(module.group)].append((name, module))
    structure = SparseStructure(model)
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise ValueError("shrink_model needs a Transformers model (with a .config to store the layer sizes in)")
    standard = _standard_plan(model_config, structure, config) if config.uniform_layers else None
    # a model shrunk before (and sparsified again) keeps the sizes of the layers this round leaves alone
    shapes = copy.deepcopy(getattr(model_config, SHAPES_KEY, None)) or {}
    shapes = {"version": SHAPES_VERSION, "modules": {}, "attributes": {}, "no_heads": {}, **shapes}
    plan = []  # compute everything first, then swap
    zeroed = []  # (group name, group, its layers): kept at full size, dropped units zeroed (standard config)
    for group_name, group in zip(structure.names, structure.groups):
        kept = group.mask.nonzero().squeeze(1)
        layers = members[id(group)]
        if not layers:
            raise ValueError(f"unit group {group_name} has no layers")
        if standard is not None and group.kind in standard[1]:
            zeroed.append((group_name, group, layers))
            continue
        new_layers = [(name, layer, _shrunk_layer(layer, kept)) for name, layer in layers]
        attrs: dict[str, dict[str, int]] = defaultdict(dict)
        no_heads = None
        if group.kind == "head":
            out_layers = [(n, l) for n, l in layers if l.role == "out"]
            in_layers = [(n, l) for n, l in layers if l.role == "in"]
            for module, attr, width in group._head_attrs:
                attrs[names[id(module)]][attr] = int(kept.numel()) * width
            # the module that reshapes into heads: the parent of the producers (q/k/v or c_attn)
            attn_name = out_layers[0][0].rpartition(".")[0]
            attn = model.get_submodule(attn_name)
            spec = getattr(group, "spec", None)
            head_dim = _head_dim(attn, model_config, spec.head_dim_attrs if spec else DEFAULT_HEAD_DIM_ATTRS)
            group_width = max(l.width for _, l in out_layers)
            shrink_attrs = spec.shrink_attrs if spec else DEFAULT_SHRINK_ATTRS
            for attr, value in _head_counts(int(kept.numel()), group_width, head_dim, shrink_attrs).items():
                if attr in vars(attn) and attr not in attrs[attn_name] and isinstance(vars(attn)[attr], int):
                    attrs[attn_name][attr] = value
            if kept.numel() == 0:
                consumer = in_layers[0][0]
                inside = consumer.startswith(attn_name + ".")
                no_heads = (attn_name, consumer[len(attn_name) + 1:] if inside else None, head_dim)
        plan.append((group_name, group, new_layers, attrs, no_heads))

    remove_skips(model)  # the cores of empty blocks get their own classes back (NoHeadsAttention copies them)
    for group_name, group, layers in zeroed:
        for name, layer in layers:
            parent, child = parent_module(model, name)
            setattr(parent, child, layer.to_linear(zero_dropped=True))
        group.restore_head_attrs()
        owner, attr = parent_module(model, group_name)
        delattr(owner, attr)
    for group_name, group, new_layers, attrs, no_heads in plan:
        for name, layer, new in new_layers:
            parent, child = parent_module(model, name)
            setattr(parent, child, new)
            out_features, in_features = layer_features(new)
            shapes["modules"][name] = {"in_features": in_features, "out_features": out_features}
        group._head_attrs = []  # the attributes now follow the kept sizes, not the dense ones
        for module_name, values in attrs.items():
            module = model.get_submodule(module_name)
            for attr, value in values.items():
                setattr(module, attr, value)
            shapes["attributes"].setdefault(module_name, {}).update(values)
        if no_heads is not None:
            attn_name, consumer, head_dim = no_heads
            parent, child = parent_module(model, attn_name)
            setattr(parent, child, NoHeadsAttention(model.get_submodule(attn_name), consumer, head_dim))
            shapes["no_heads"][attn_name] = {"consumer": consumer, "head_dim": head_dim}
        owner, attr = parent_module(model, group_name)
        delattr(owner, attr)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    if standard is not None:
        for attr, value in standard[0].items():
            setattr(model_config, attr, value)
    else:
        setattr(model_config, SHAPES_KEY, shapes)
    return model


def _standard_plan(model_config, structure: SparseStructure, config) -> tuple[dict[str, int], set[str]] | None:
    """How a uniform-layers model shrinks into a standard config: (the config fields to set, the kinds kept at
    full size with their dropped units zeroed), or None (the `hf_sparse_shapes` path: a model shrunk before).

    A kind is removed physically when every layer of the model has a group of it (none excluded), every group
    keeps the same number n >= 1 of its units, and the family's config can say n (`ArchitectureSpec`:
    `mlp_size_attr`; `explicit_head_dim`, and n query heads dividing hidden_size where `heads_divide_hidden`).
    Otherwise that kind stays at full size with the dropped units' weights zeroed: the config is still the
    standard one and the logits are the sparse model's. Each such choice is logged with its reason."""
    if getattr(model_config, SHAPES_KEY, None):
        logger.warning("hf_sparse.shrink: the model was shrunk before (config.%s): its per-layer sizes stay there, so "
                       "it loads with hf_sparse.load_sparse_model only (uniform_layers needs one shrink of the dense "
                       "model for a standard config)", SHAPES_KEY)
        return None
    spec = get_architecture(model_config, config.architecture)
    layers = getattr(model_config, "num_hidden_layers", None)
    fields: dict[str, int] = {}
    zeroed: set[str] = set()
    for kind, counts in structure.kept_counts().items():
        groups = [g for g in structure if g.kind == kind]
        name = {"neuron": "MLP neurons", "head": "attention heads"}[kind]
        n = counts[0]
        reason = None
        if len(groups) != layers:
            reason = f"{len(groups)} of the model's {layers} layers have prunable {name} (the others keep theirs)"
        elif len(set(counts)) != 1:
            reason = (f"the layers keep different numbers of {name} ({counts}): the mask is not the uniform top-K "
                      "(call hf_sparse.fix_masks(model) first)")
        elif n == 0:
            reason = f"every {name[:-1]} is dropped, which a config cannot say"
        elif kind == "neuron":
            if spec.mlp_size_attr is None:
                reason = "the architecture layout names no config field for the MLP width (mlp_size_attr)"
            else:
                fields[spec.mlp_size_attr] = n
        else:
            geometry = head_geometry(model_config)
            query_heads = n * geometry.group_size
            hidden = getattr(model_config, "hidden_size", None)
            if not spec.explicit_head_dim:
                reason = (f"{model_config.model_type}'s config derives the head size from hidden_size / "
                          "num_attention_heads, so fewer heads cannot keep their size")
            elif spec.heads_divide_hidden and (not isinstance(hidden, int) or hidden % query_heads):
                reason = (f"{type(model_config).__name__} refuses num_attention_heads={query_heads}: it does not "
                          f"divide hidden_size={hidden}")
            else:
                fields.update(num_attention_heads=query_heads, num_key_value_heads=n, head_dim=geometry.head_dim)
        if reason is not None:
            zeroed.add(kind)
            logger.warning("hf_sparse.shrink: uniform_layers: the %s keep their full size in the export, the dropped "
                           "ones zeroed (the config stays standard; no compute saved there), because %s", name, reason)
    return fields, zeroed


def _head_dim(attn: nn.Module, model_config, attrs: tuple[str, ...]) -> int:
    for attr in attrs:
        value = vars(attn).get(attr)
        if isinstance(value, int):
            return value
    return head_geometry(model_config).head_dim


def _is_lora_member(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if lora_parts(model.get_submodule(".".join(parts[:i]))) is not None:
            return True
    return False


def apply_shapes(model: nn.Module, shapes: dict[str, Any]) -> nn.Module:
    """Resize a freshly built dense model to the per-layer sizes of a shrunk export (in place; the new layers'
    values are whatever their constructor gives until a state dict is loaded)."""
    if not isinstance(shapes, dict) or shapes.get("version") != SHAPES_VERSION:
        raise ValueError(
            f"config.{SHAPES_KEY} is malformed or of an unknown version (expected version {SHAPES_VERSION}): "
            f"{str(shapes)[:200]}"
        )
    try:
        for name, size in shapes["modules"].items():
            old = model.get_submodule(name)
            transposed = isinstance(old, Conv1D)
            if not (transposed or type(old) is nn.Linear):
                raise ValueError(f"{name} is a {type(old).__name__}, expected nn.Linear or Conv1D")
            parent, child = parent_module(model, name)
            new = _new_layer(transposed, int(size["in_features"]), int(size["out_features"]), old.bias is not None,
                             device=old.weight.device)  # real tensors: the model may be sparsified before loading
            setattr(parent, child, new.to(old.weight.dtype))
        for name, values in shapes["attributes"].items():
            module = model.get_submodule(name)
            for attr, value in values.items():
                setattr(module, attr, value)
        for name, spec in shapes["no_heads"].items():
            parent, child = parent_module(model, name)
            setattr(parent, child, NoHeadsAttention(model.get_submodule(name), spec["consumer"], int(spec["head_dim"])))
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(
            f"config.{SHAPES_KEY} does not fit this model ({type(e).__name__}: {e}); was the export made from "
            "another architecture?"
        ) from e
    return model
