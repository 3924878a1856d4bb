"""sparsify_model / unsparsify_model: find the units, build groups and layers, swap them in atomically.

Patching is all or nothing: every group and layer is built and checked before the first `setattr`, and a
failure during the swap puts back what was already swapped. A group is registered once, as
`sparse_neurons` / `sparse_heads` / `sparse_weights` on the module that owns its projections.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .architectures import BlockSpec, get_architecture, head_geometry
from .budget import check_keeps_a_unit, project_to_budget
from .config import SparseConfig
from .empty_blocks import EmptySkip, install_skip, remove_skip, remove_skips
from .layers import SUPPORTED_LAYER_TYPES, MaskedWeightLinear, SparseLinear, is_supported_linear, layer_features
from .model_state import CONFIG_ATTR, get_sparse_config, is_sparsified, lora_parts
from .shrink import shrink_model
from .structure import SparseStructure, UnitGroup, check_keeps_a_level

__all__ = ["CONFIG_ATTR", "get_sparse_config", "init_scores", "is_sparsified", "sparsify_model", "unit_magnitudes",
           "unsparsify_model"]

logger = logging.getLogger(__name__)

GROUP_ATTR = {"neuron": "sparse_neurons", "head": "sparse_heads", "weight": "sparse_weights"}


@dataclass
class _Swap:
    parent: nn.Module
    name: str
    old: nn.Module
    new: nn.Module


def _name_matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _base(module: nn.Module) -> nn.Module:
    parts = lora_parts(module)
    return parts[0] if parts else module


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear / Conv1D (through a LoRA wrapper)."""
    base = _base(module)
    if not is_supported_linear(base):
        raise TypeError(
            f"hf_sparse cannot sparsify a {type(base).__name__}; supported layer types: {SUPPORTED_LAYER_TYPES} "
            "(optionally wrapped by a PEFT LoRA layer)"
        )
    return layer_features(base)


def _layer_swaps(member_module: nn.Module, member_parent: nn.Module, member_name: str, make: Callable) -> list[_Swap]:
    """The swaps that make one member sparse: the layer itself, or inside a LoRA layer its base layer and
    the adapter matrix that touches the units (lora_B for producers, lora_A for consumers)."""
    parts = lora_parts(member_module)
    if parts is None:
        return [_Swap(member_parent, member_name, member_module, make(member_module, adapter=False))]
    base, lora_a, lora_b = parts
    swaps = [_Swap(member_module, "base_layer", base, make(base, adapter=False))]
    for adapter_name in lora_a.keys():
        swaps.append(_Swap(lora_b, adapter_name, lora_b[adapter_name], make(lora_b[adapter_name], adapter="B")))
        swaps.append(_Swap(lora_a, adapter_name, lora_a[adapter_name], make(lora_a[adapter_name], adapter="A")))
    return swaps


def _build_block_groups(model, config, spec: BlockSpec, kind: str, geometry, candidates: list[str]):
    """Groups and swaps for every block of one kind that passes the target/exclude filters."""
    plans = []
    for block_name, block in model.named_modules():
        if isinstance(block, (UnitGroup, SparseLinear)) or not spec.matches(block_name):
            continue
        members = []
        for m in spec.members:
            try:
                module = _get(block, m.path)
            except AttributeError:
                members = None
                break
            members.append((m, module, f"{block_name}.{m.path}"))
        if not members:
            continue
        names = [full for _, _, full in members]
        candidates.extend(names)
        if config.target_modules is not None and not any(_name_matches(n, config.target_modules) for n in names):
            continue
        if config.exclude_modules is not None and any(
            _name_matches(n, config.exclude_modules) for n in names + [block_name]
        ):
            continue
        plan = _plan_block(block_name, block, members, spec, kind, geometry, config)
        plans.append(plan + (None, _empty_skips(model, block_name, block, spec, plan[2], geometry)))
    return plans


def _empty_skips(model, block_name: str, block: nn.Module, spec: BlockSpec, group: UnitGroup, geometry):
    """The modules to skip while the group keeps nothing (empty_blocks.py), from the layout's `empty`."""
    empty = spec.empty
    if empty is None or group.compute != "gather":
        return []
    where = f"the empty-block layout of {block_name!r} ({empty})"
    try:
        core = _get(block, empty.core)
    except AttributeError:
        raise ValueError(f"{where}: the block has no module {empty.core!r}") from None
    consumer = next(m.path for m in spec.members if m.role == "in")
    inside = empty.core == "" or consumer.startswith(empty.core + ".")
    consumer = (consumer[len(empty.core) + 1:] if empty.core else consumer) if inside else None
    if empty.dropout is not None and not isinstance(getattr(core, empty.dropout, None), nn.Module):
        raise ValueError(f"{where}: the core has no dropout module {empty.dropout!r}")
    norm = None
    if empty.norm is not None:
        norm = getattr(_get(model, block_name.rpartition(".")[0]), empty.norm, None)
        if not isinstance(norm, nn.Module):
            raise ValueError(f"{where}: the block's parent has no norm module {empty.norm!r}")
    head_dim = geometry.head_dim if group.kind == "head" else 0
    core_skip = EmptySkip(group, "core", consumer, empty.dropout if inside else None, head_dim,
                          (norm,) if norm is not None else ())
    return [(core, core_skip)] + ([(norm, EmptySkip(group, "norm"))] if norm is not None else [])


def _plan_block(block_name, block, members, spec, kind, geometry, config):
    shapes = []
    for m, module, full in members:
        try:
            shapes.append((m, module, full, _weight_shape(module)))
        except TypeError as e:
            where = "SparseConfig.architecture" if config.architecture is not None else "the architecture table"
            raise TypeError(
                f"{full} (member {m.path!r} of {kind} block {block_name!r}): {e}. Point {where} at the "
                "projections' Linear/Conv1D layers (never embeddings, norms or heads)."
            ) from None
    # number of units from the first out member: its rows are segments * units * width
    m0, _, full0, (out0, _) = shapes[0]
    width0 = geometry.width(m0.width) if kind == "head" else 1
    num_units = out0 // (m0.segments * width0)
    cost = 0.0
    for m, module, full, (out_f, in_f) in shapes:
        width = geometry.width(m.width) if kind == "head" else 1
        rows = out_f if m.role == "out" else in_f
        if rows != num_units * width * (m.segments if m.role == "out" else 1):
            raise ValueError(
                f"{full}: {rows} {'rows' if m.role == 'out' else 'columns'} do not split into {num_units} units of "
                f"width {width}; check the architecture layout for this model"
            )
        base = _base(module)
        cost += (in_f if m.role == "out" else out_f) * width * (m.segments if m.role == "out" else 1)
        if m.role == "out" and base.bias is not None:
            cost += width * m.segments
    group = UnitGroup(kind, num_units, cost, compute=config.compute)
    group.spec = spec  # its layout: shrink_model reads how to rename the heads from it
    group.to(device=_base(members[0][1]).weight.device)
    swaps = []
    for m, module, full, _ in shapes:
        width = geometry.width(m.width) if kind == "head" else 1
        parent_path, _, child = f"{m.path}".rpartition(".")
        parent = _get(block, parent_path)

        def make(layer, adapter, m=m, width=width):
            if adapter == "A" and m.role == "out" or adapter == "B" and m.role == "in":
                return layer  # the adapter side that does not touch the units stays dense
            return SparseLinear.from_linear(layer, group, m.role, width, m.segments if m.role == "out" else 1)

        swaps.extend(s for s in _layer_swaps(module, parent, child, make) if s.new is not s.old)
    head_attrs = [(_get(block, p.rpartition(".")[0]) if "." in p else block, p.rpartition(".")[2], geometry.width(w))
                  for p, w in spec.head_attrs]
    return block_name, block, group, swaps, head_attrs


def _build_weight_groups(model, config, spec, candidates):
    """One element-wise group per targeted projection."""
    if spec is not None and config.target_modules is None:
        member_paths = [(b.anchor, m.path) for b in spec.blocks().values() for m in b.members]
        wanted = lambda name: any(re.search(rf"(^|\.){a}\.{re.escape(p)}$", name) for a, p in member_paths)  # noqa: E731
    else:
        wanted = lambda name: _name_matches(name, config.target_modules)  # noqa: E731
    plans = []
    for name, module in model.named_modules():
        if isinstance(module, (UnitGroup, SparseLinear)):
            continue
        if not (is_supported_linear(module) or lora_parts(module) is not None):
            continue
        if any(isinstance(p, SparseLinear) for p in module.children()):
            continue
        if lora_parts(module) is None and _is_inside_lora(model, name):
            continue
        candidates.append(name)
        if not wanted(name):
            continue
        if config.exclude_modules is not None and _name_matches(name, config.exclude_modules):
            continue
        base = _base(module)
        if not is_supported_linear(base):
            raise TypeError(f"{name}: hf_sparse cannot sparsify a {type(base).__name__}; supported: {SUPPORTED_LAYER_TYPES}")
        group = UnitGroup("weight", base.weight.numel(), 1.0, compute="mask")
        group.to(device=base.weight.device)
        parent_path, _, child = name.rpartition(".")
        parent = _get(model, parent_path)
        if lora_parts(module) is not None:
            swaps = [_Swap(module, "base_layer", base, MaskedWeightLinear.from_linear(base, group))]
            owner_name, owner = name, module
        else:
            swaps = [_Swap(parent, child, module, MaskedWeightLinear.from_linear(module, group))]
            owner_name, owner = parent_path, parent
        # the owner may hold several projections: name the group after the layer
        plans.append((owner_name, owner, group, swaps, [], f"sparse_weights_{child}" if owner is parent else None, []))
    return plans


def _set_admissible_head_counts(plans, geometry, hidden_size: int | None) -> None:
    """The kv-group counts whose query heads divide hidden_size: the only ones the family's config accepts
    (a uniform-layers mask keeps one of them, so that its shrunk export loads with plain from_pretrained)."""
    if not isinstance(hidden_size, int):
        return
    for plan in plans:
        group = plan[2]
        if group.kind == "head":
            group.admissible_counts = [n for n in range(1, group.num_units + 1)
                                       if hidden_size % (n * geometry.group_size) == 0]


def _is_inside_lora(model, name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = _get(model, ".".join(parts[:i]))
        if lora_parts(parent) is not None:
            return True
    return False


def sparsify_model(model: nn.Module, config: SparseConfig | None = None, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Patch a Transformers (or PEFT LoRA) model in place with score-gated sparse layers; returns it.

    `filter_fn(module, name) -> bool` is an escape hatch beside target_modules: a group is built only if
    it returns True for its block (neuron/head) or projection (weight).
    """
    config = config if config is not None else SparseConfig()
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
    if is_sparsified(model):
        raise ValueError(
            "this model is already sparsified (it has hf_sparse unit groups); call hf_sparse.unsparsify_model(model) "
            "first, or keep training the sparse model as it is"
        )
    _refuse_unsupported(model)
    model_config = getattr(model, "config", None)
    candidates: list[str] = []
    if config.uses_weights:
        spec = None
        if config.target_modules is None or config.architecture is not None:
            spec = get_architecture(model_config, config.architecture)
        plans = _build_weight_groups(model, config, spec, candidates)
    else:
        spec = get_architecture(model_config, config.architecture)
        blocks = spec.blocks()
        missing = [g for g in config.granularity if g not in blocks]
        if missing:
            raise ValueError(f"SparseConfig.granularity asks for {missing} but the architecture layout defines no such block")
        geometry = head_geometry(model_config) if "head" in config.granularity else None
        plans = []
        for kind in config.granularity:
            plans += _build_block_groups(model, config, blocks[kind], kind, geometry, candidates)
        if geometry is not None and spec.heads_divide_hidden:
            _set_admissible_head_counts(plans, geometry, getattr(model_config, "hidden_size", None))
    if filter_fn is not None:
        plans = [p for p in plans if filter_fn(p[1], p[0])]
    if not plans:
        shown = sorted(set(candidates))[:40]
        raise ValueError(
            f"SparseConfig target_modules={config.target_modules!r} exclude_modules={config.exclude_modules!r} "
            f"granularity={config.granularity} matched no module. Candidate module names: {shown}"
            + (" ..." if len(set(candidates)) > 40 else "")
            + ". Use names or dotted suffixes from this list (a list), or a regex over full names (a string)."
        )

    done: list[_Swap] = []
    registered: list[tuple[nn.Module, str]] = []
    skipped: list[nn.Module] = []
    try:
        for owner_name, owner, group, swaps, head_attrs, attr, skips in plans:
            attr = attr or GROUP_ATTR[group.kind]
            if hasattr(owner, attr):
                raise ValueError(f"{owner_name or 'the model'} already has an attribute {attr!r}")
            owner.add_module(attr, group)
            registered.append((owner, attr))
            for s in swaps:
                setattr(s.parent, s.name, s.new)
                done.append(s)
            for module, name, width in head_attrs:
                group.track_head_attr(module, name, width)
            for module, skip in skips:
                install_skip(module, skip)
                skipped.append(module)
        setattr(model, CONFIG_ATTR, config)
        init_scores(model, config)
    except BaseException:
        for module in skipped:
            remove_skip(module)
        for s in reversed(done):
            setattr(s.parent, s.name, s.old)
        for owner, attr in registered:
            delattr(owner, attr)
        if hasattr(model, CONFIG_ATTR):
            delattr(model, CONFIG_ATTR)
        raise
    structure = SparseStructure(model)
    logger.info(
        "hf_sparse: %d unit groups, %d units, %.0f prunable parameters, target sparsity %.2f",
        len(structure.groups), structure.num_units, structure.total_budget("params"), config.sparsity,
    )
    return model


SUPPORTED_PEFT = ("plain LoRA (peft.LoraConfig without use_dora) on torch.nn.Linear / Conv1D base layers (and on "
                  "torch.nn.Embedding layers, which stay dense)")


def _refuse_unsupported(model: nn.Module) -> None:
    """Refuse, before anything is patched, models the sparse layers cannot compute correctly."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"the model has parameters on the meta device ({meta[0]}, ...): they hold no values to train or prune. "
            "Load the weights first (from_pretrained without device_map='meta' / init_empty_weights), then sparsify"
        )
    for name, cfg in (getattr(model, "peft_config", None) or {}).items():
        kind = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", "")))
        if kind.upper() != "LORA":
            raise ValueError(
                f"adapter {name!r} is a PEFT {kind} adapter: hf_sparse supports {SUPPORTED_PEFT}. Its per-unit "
                "scaling would be applied to units the sparse layers do not compute"
            )
        if getattr(cfg, "use_dora", False):
            raise ValueError(
                f"adapter {name!r} uses DoRA (use_dora=True): its per-row weight norm needs the whole row, which the "
                f"gathered layers do not compute. hf_sparse supports {SUPPORTED_PEFT}"
            )
    for mname, module in model.named_modules():
        parts = lora_parts(module)
        # LoRA on an embedding works as on a dense model: the units live in the blocks' projections, so no sparse
        # layer ever replaces an embedding, and merge_lora_sparse merges its adapter with PEFT's own merge
        if parts is not None and not is_supported_linear(parts[0]) and not isinstance(parts[0], nn.Embedding):
            raise ValueError(
                f"{mname}: LoRA on a {type(parts[0]).__name__} base layer (quantized or custom): hf_sparse supports "
                f"{SUPPORTED_PEFT}; dequantize the base first"
            )


@torch.no_grad()
def init_scores(model: nn.Module, config: SparseConfig) -> None:
    """Set the keep probabilities as `config.score_init` says (see SparseConfig)."""
    structure = SparseStructure(model)
    costs = structure.costs(config.budget)
    check_keeps_a_unit(costs, config.sparsity)  # (raised inside sparsify_model's undo block: nothing stays patched)
    if config.uniform_layers:
        check_keeps_a_level(structure, costs, config.sparsity)
    target = (1.0 - config.sparsity) * float(costs.double().sum())
    if config.score_init == "ones":
        flat = torch.ones(structure.num_units, device=structure.device)
    elif config.score_init == "budget":
        flat = torch.full((structure.num_units,), 1.0 - config.sparsity, device=structure.device)
    else:
        flat = unit_magnitudes(model, structure)
        # scale so the largest unit sits at 1, then project: the strongest units start near-certain
        flat = project_to_budget(flat / flat.max().clamp(min=1e-12) * 2.0, costs, target)
    structure.set_scores(flat)


@torch.no_grad()
def unit_magnitudes(model: nn.Module, structure: SparseStructure | None = None) -> torch.Tensor:
    """Per unit, the L2 norm of all the weights it spans (rows of producers, columns of consumers), divided
    by sqrt(parameters) so units of different sizes compare: the naive importance for magnitude pruning."""
    structure = structure or SparseStructure(model)
    sums = {id(g): torch.zeros(g.num_units, dtype=torch.float64, device=g.mask.device) for g in structure}
    for layer in model.modules():
        if not isinstance(layer, SparseLinear):
            continue
        g = layer.group
        if isinstance(layer, MaskedWeightLinear):
            sums[id(g)] += layer.weight.detach().double().reshape(-1) ** 2
            continue
        w = layer.weight.detach().double()
        w = w.t() if layer.transposed else w  # [out, in]
        if layer.role == "out":
            per_row = (w**2).sum(1)
            if layer.bias is not None:
                per_row = per_row + layer.bias.detach().double() ** 2
            per_unit = per_row.view(layer.segments, g.num_units, layer.width).sum((0, 2))
        else:
            per_unit = (w**2).sum(0).view(g.num_units, layer.width).sum(1)
        sums[id(g)] += per_unit
    return torch.cat([(sums[id(g)] / g.params_per_unit.double()).sqrt().float() for g in structure])


def _swapped_layers(model: nn.Module):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SparseLinear):
                yield parent, name, child


def unsparsify_model(model: nn.Module, shrink: bool = False) -> nn.Module:
    """Undo `sparsify_model`: the original layer classes back, dropped units zeroed in the weights (by the
    current mask: call `fix_masks` first to choose it), unit groups and their attributes removed."""
    if not is_sparsified(model):
        raise ValueError("this model is not sparsified; there is nothing to undo")
    if shrink:
        return shrink_model(model)
    remove_skips(model)
    for parent, name, layer in list(_swapped_layers(model)):
        setattr(parent, name, layer.to_linear(zero_dropped=True))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, UnitGroup):
                child.restore_head_attrs()
                delattr(parent, name)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
