"""Score-gated layers: gather compute (real sparse forward/backward) against the mask reference, exact zeros
for dropped units, and the layer-level building blocks (SparseLinear, MaskedWeightLinear, UnitGroup)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (ARCHS, HEADS, HIDDEN, KV_HEADS, assert_grads_close, random_group_masks, tiny_inputs,
                      tiny_model)
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_sparse as hs
from hf_sparse.layers import MaskedWeightLinear, SparseLinear
from hf_sparse.structure import UnitGroup

HEAD_DIM = HIDDEN // HEADS
GQA = {"llama", "mistral", "qwen2"}
# the module (relative to the group's owner) that consumes the units: its input columns are the units
CONSUMER = {
    "bert": {"head": "output.dense", "neuron": "output.dense"},
    "roberta": {"head": "output.dense", "neuron": "output.dense"},
    "gpt2": {"head": "c_proj", "neuron": "c_proj"},
    "llama": {"head": "o_proj", "neuron": "down_proj"},
    "mistral": {"head": "o_proj", "neuron": "down_proj"},
    "qwen2": {"head": "o_proj", "neuron": "down_proj"},
    "opt": {"head": "out_proj", "neuron": "fc2"},
}


def _unit_width(arch: str, kind: str) -> int:
    if kind == "neuron":
        return 1
    return HEAD_DIM * (HEADS // KV_HEADS if arch in GQA else 1)


def _patched_pair(arch, seed=0, all_dropped=0, all_kept=1, granularity=("neuron", "head"), attn="eager"):
    """(original, gather model, mask model, structure of the gather model, flat mask), both with the mask set."""
    base = tiny_model(arch, attn=attn)
    models = {}
    for compute in ("gather", "mask"):
        m = copy.deepcopy(base)
        hs.sparsify_model(m, hs.SparseConfig(granularity=list(granularity), compute=compute))
        models[compute] = m
    structure = hs.SparseStructure(models["gather"])
    mask = random_group_masks(structure, seed=seed, all_dropped=all_dropped, all_kept=all_kept)
    structure.set_masks(mask)
    hs.SparseStructure(models["mask"]).set_masks(mask)
    return base, models["gather"], models["mask"], structure, mask


def _forward_backward(model, arch, seed=0):
    out = model(**tiny_inputs(arch, seed=seed)).logits
    # a loss with a generic (non-symmetric) upstream gradient
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(123))
    (out * w).sum().backward()
    return out.detach()


def _dropped_weight_positions(layer: SparseLinear):
    """Booleans over the [out, in] view of the layer's weight (and its bias) marking the dropped units'
    rows (producers) or columns (consumers), computed from the mask and the unit layout."""
    mask = layer.group.mask.bool()
    w = layer.weight.t() if layer.transposed else layer.weight
    out_f, in_f = w.shape
    if layer.role == "out":
        unit_of_row = (torch.arange(out_f) % layer.segment_size) // layer.width
        dropped_rows = ~mask[unit_of_row]
        return dropped_rows[:, None].expand(out_f, in_f), dropped_rows
    unit_of_col = torch.arange(in_f) // layer.width
    return (~mask[unit_of_col])[None, :].expand(out_f, in_f), None


def _assert_dropped_grads_zero(model):
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, SparseLinear):
            continue
        grad = layer.weight.grad.t() if layer.transposed else layer.weight.grad
        dropped_w, dropped_b = _dropped_weight_positions(layer)
        assert torch.all(grad[dropped_w] == 0), f"{name}: a dropped unit's weight has a nonzero gradient"
        if layer.role == "out" and layer.bias is not None:
            assert torch.all(layer.bias.grad[dropped_b] == 0), f"{name}: a dropped unit's bias has a nonzero gradient"
        if not layer.group.none_kept:
            assert grad[~dropped_w].abs().max() > 0, f"{name}: kept units got no gradient at all"
        checked += int(dropped_w.any())
    assert checked >= 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dropped_kind", ["head", "neuron"])
def test_gather_matches_mask_outputs_and_grads(arch, dropped_kind):
    """Random masks with one group entirely dropped and one entirely kept: same logits, same gradients of
    every parameter, and exactly zero gradients on the dropped units' rows/columns in both modes."""
    base, mg, mm, structure, mask = _patched_pair(arch)
    # re-draw so that the all-dropped group is the first group of `dropped_kind` and the all-kept one of the other
    kinds = [g.kind for g in structure]
    i_drop = kinds.index(dropped_kind)
    i_keep = next(i for i, k in enumerate(kinds) if k != dropped_kind)
    mask = random_group_masks(structure, seed=1, all_dropped=i_drop, all_kept=i_keep)
    structure.set_masks(mask)
    hs.SparseStructure(mm).set_masks(mask)
    assert any(g.gathers for g in structure) and structure.groups[i_drop].none_kept
    og, om = _forward_backward(mg, arch), _forward_backward(mm, arch)
    torch.testing.assert_close(og, om, rtol=1e-5, atol=1e-5)
    assert_grads_close(dict(mg.named_parameters()), dict(mm.named_parameters()))
    _assert_dropped_grads_zero(mg)
    _assert_dropped_grads_zero(mm)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "opt"])
def test_gather_matches_mask_sdpa(arch):
    _, mg, mm, _, _ = _patched_pair(arch, seed=5, attn="sdpa")
    og, om = _forward_backward(mg, arch), _forward_backward(mm, arch)
    torch.testing.assert_close(og, om, rtol=1e-5, atol=1e-5)
    assert_grads_close(dict(mg.named_parameters()), dict(mm.named_parameters()))
    _assert_dropped_grads_zero(mg)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_unit_weights_do_not_affect_output(arch):
    """A dropped unit's output is exactly zero: overwriting its rows/columns with large random values leaves
    the logits bitwise unchanged, in gather and in mask compute."""
    _, mg, mm, structure, mask = _patched_pair(arch, seed=3)
    x = tiny_inputs(arch)
    for model in (mg, mm):
        with torch.no_grad():
            before = model(**x).logits
            gen = torch.Generator().manual_seed(7)
            for layer in model.modules():
                if isinstance(layer, SparseLinear):
                    w = layer.weight.t() if layer.transposed else layer.weight
                    dropped_w, dropped_b = _dropped_weight_positions(layer)
                    w[dropped_w] = 50 * torch.randn(int(dropped_w.sum()), generator=gen)
                    if dropped_b is not None and layer.bias is not None:
                        layer.bias[dropped_b] = 50 * torch.randn(int(dropped_b.sum()), generator=gen)
            after = model(**x).logits
        assert torch.equal(before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_model_equals_dense_model_with_dropped_units_zeroed_by_hand(arch):
    """The mask hits the units the architecture says it does: zeroing the consumer's columns of the dropped
    neurons/heads by hand in the unpatched model gives the same logits (independent of hf_sparse's indexing)."""
    base, mg, mm, structure, mask = _patched_pair(arch, seed=4)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, group in zip(structure.names, structure.groups):
            owner = name.rpartition(".")[0]
            consumer = ref.get_submodule(f"{owner}.{CONSUMER[arch][group.kind]}")
            width = _unit_width(arch, group.kind)
            w = consumer.weight if isinstance(consumer, Conv1D) else consumer.weight.t()  # [in, out]
            for u in (group.mask == 0).nonzero().flatten().tolist():
                w[u * width:(u + 1) * width] = 0
        x = tiny_inputs(arch)
        expected = ref(**x).logits
        torch.testing.assert_close(mm(**x).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mg(**x).logits, expected, rtol=1e-5, atol=1e-5)
        # and the mask matters: the unmasked model differs
        assert (base(**x).logits - expected).abs().max() > 1e-3


def test_head_attributes_follow_computed_heads():
    _, mg, mm, structure, _ = _patched_pair("gpt2", granularity=("head",))
    attn = mg.transformer.h[1].attn
    group = attn.sparse_heads
    group.set_mask(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert attn.num_heads == 2 and attn.split_size == 2 * HEAD_DIM
    group.set_mask(torch.zeros(4))  # nothing kept: one stand-in head is computed and zeroed
    assert attn.num_heads == 1 and attn.split_size == HEAD_DIM
    group.set_mask(torch.ones(4))
    assert attn.num_heads == HEADS and attn.split_size == HIDDEN
    # mask compute never changes the shapes
    mm.transformer.h[1].attn.sparse_heads.set_mask(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert mm.transformer.h[1].attn.num_heads == HEADS


# --- layer level ----------------------------------------------------------------------------------------


def _pair_layers(transposed_out=False, width=2, segments=1, units=5, hidden=6, bias=True, compute="gather", seed=0):
    torch.manual_seed(seed)
    group = UnitGroup("head" if width > 1 else "neuron", units, 1.0, compute=compute)
    inner = units * width
    up = Conv1D(inner * segments, hidden) if transposed_out else nn.Linear(hidden, inner * segments, bias=bias)
    down = nn.Linear(inner, hidden, bias=bias)
    producer = SparseLinear.from_linear(up, group, "out", width, segments)
    consumer = SparseLinear.from_linear(down, group, "in", width)
    return group, producer, consumer


def _run_pair(group, producer, consumer, x, segments):
    h = producer(x)
    if segments > 1:  # sum the fused segments (like q+k+v side by side), then consume
        h = sum(h.chunk(segments, dim=-1))
    return consumer(torch.tanh(h))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("mask", [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
def test_sparse_linear_pair_gather_equals_mask(transposed, segments, mask):
    mask = torch.tensor(mask, dtype=torch.float32)
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    results = []
    for compute in ("gather", "mask"):
        group, producer, consumer = _pair_layers(transposed_out=transposed, segments=segments, compute=compute)
        group.set_mask(mask)
        y = _run_pair(group, producer, consumer, x, segments)
        y.pow(2).sum().backward()
        results.append((y, producer, consumer))
    (yg, pg, cg), (ym, pm, cm) = results
    torch.testing.assert_close(yg, ym, rtol=1e-6, atol=1e-6)
    for a, b in ((pg.weight, pm.weight), (pg.bias, pm.bias), (cg.weight, cm.weight), (cg.bias, cm.bias)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    # a reference written without hf_sparse: zero the dropped units' activations by hand
    group, producer, consumer = _pair_layers(transposed_out=transposed, segments=segments)
    wu = producer.weight.t() if transposed else producer.weight
    h = F.linear(x, wu, producer.bias)
    if segments > 1:
        h = sum(h.chunk(segments, dim=-1))
    h = torch.tanh(h) * mask.repeat_interleave(2)
    torch.testing.assert_close(yg, F.linear(h, consumer.weight, consumer.bias), rtol=1e-6, atol=1e-6)


def test_unit_group_indices():
    group = UnitGroup("head", 4, 1.0)
    group.set_mask(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert group.num_kept == 2 and group.gathers and not group.all_kept
    assert group.index(3).tolist() == [3, 4, 5, 9, 10, 11]
    # fused q/k/v of 12 rows each (4 units x width 3): the same rows in every segment
    assert group.index(3, segments=3, segment_size=12).tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17, 21, 22, 23,
                                                                     27, 28, 29, 33, 34, 35]
    assert group.expanded_mask(2).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="shape"):
        group.set_mask(torch.ones(5))
    group.set_mask(torch.ones(4))
    assert group.all_kept and not group.gathers
    group.compute = "mask"
    group.set_mask(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert not group.gathers


def test_mask_loaded_from_state_dict_refreshes_indices():
    group = UnitGroup("neuron", 4, 1.0)
    other = UnitGroup("neuron", 4, 1.0)
    other.set_mask(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    group.load_state_dict(other.state_dict())
    assert group.num_kept == 2 and group.index(1).tolist() == [0, 3]


@pytest.mark.parametrize("transposed", [False, True])
def test_masked_weight_linear(transposed):
    torch.manual_seed(0)
    base = Conv1D(5, 4) if transposed else nn.Linear(4, 5)
    group = UnitGroup("weight", base.weight.numel(), 1.0, compute="mask")
    layer = MaskedWeightLinear.from_linear(base, group)
    mask = (torch.rand(base.weight.numel(), generator=torch.Generator().manual_seed(2)) < 0.5).float()
    group.set_mask(mask)
    x = torch.randn(3, 4)
    y = layer(x)
    wm = base.weight.detach() * mask.view_as(base.weight)
    expected = x @ wm + base.bias.detach() if transposed else F.linear(x, wm, base.bias.detach())
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert torch.all(layer.weight.grad.reshape(-1)[mask == 0] == 0)
    assert torch.all(layer.weight.grad.reshape(-1)[mask == 1] != 0)


def test_sparse_linear_rejects_other_layer_types():
    group = UnitGroup("neuron", 4, 1.0)
    for bad in (nn.Embedding(4, 4), nn.LayerNorm(4), nn.Conv1d(4, 4, 1)):
        with pytest.raises(TypeError, match=type(bad).__name__):
            SparseLinear.from_linear(bad, group, "out")


def test_to_linear_zeroes_dropped_units():
    group, producer, consumer = _pair_layers()
    group.set_mask(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))
    x = torch.randn(2, 6)
    with torch.no_grad():
        y = _run_pair(group, producer, consumer, x, 1)
        up, down = producer.to_linear(), consumer.to_linear()
        assert type(up) is nn.Linear and type(down) is nn.Linear
        torch.testing.assert_close(down(torch.tanh(up(x))), y, rtol=1e-6, atol=1e-6)
        assert torch.all(up.weight[2:4] == 0) and torch.all(up.bias[8:10] == 0) and torch.all(down.weight[:, 2:4] == 0)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gathered_linear_gradcheck(dim, transposed, bias):
    from hf_sparse.layers import gathered_linear

    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 6, 5
    weight = torch.randn((in_f, out_f) if transposed else (out_f, in_f), generator=gen, dtype=torch.float64,
                         requires_grad=True)
    b = torch.randn(out_f, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    idx = torch.tensor([4, 1, 2]) if dim == 0 else torch.tensor([0, 3, 4])
    x = torch.randn(2, 3, in_f if dim == 0 else 3, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = (x, weight, b) if bias else (x, weight)
    fn = (lambda x, w, b: gathered_linear(x, w, b, idx, dim, transposed)) if bias else \
        (lambda x, w: gathered_linear(x, w, None, idx, dim, transposed))
    assert torch.autograd.gradcheck(fn, inputs)
    # the same as autograd through index_select
    w = weight.t() if transposed else weight
    ref = F.linear(x, w.index_select(dim, idx), (b.index_select(0, idx) if dim == 0 else b) if bias else None)
    torch.testing.assert_close(fn(*inputs), ref)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_gather_under_bf16_autocast(arch):
    """Under autocast the gathered backward follows the lower-precision forward and still returns fp32
    gradients for fp32 weights; gather and mask compute agree to bf16 precision."""
    _, mg, mm, _, _ = _patched_pair(arch, seed=6)
    outs = []
    for model in (mg, mm):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**tiny_inputs(arch)).logits
        out.float().pow(2).sum().backward()
        outs.append(out.float())
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    for (name, pg), pm in zip(mg.named_parameters(), mm.parameters()):
        assert pg.grad.dtype == torch.float32, name
        assert (pg.grad - pm.grad).abs().max() <= 0.05 * pm.grad.abs().max() + 1e-6, name
    _assert_dropped_grads_zero(mg)
