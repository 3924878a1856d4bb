"""sparsity_report against numbers computed by hand for a tiny BERT with a known mask."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import hf_sparse as hs

# tiny BERT: hidden 32, 4 heads of 8, intermediate 64, 2 layers, vocab 100 (see conftest)
HEAD_COST = 3 * (8 * 32 + 8) + 8 * 32  # q, k, v rows with bias + o columns = 1048
NEURON_COST = 32 + 1 + 32  # up row + bias + down column = 65


def _model_with_known_mask(sparsity=0.5):
    model = tiny_model("bert")
    total_params = sum(p.numel() for p in model.parameters())
    hs.sparsify_model(model, hs.SparseConfig(sparsity=sparsity))
    structure = hs.SparseStructure(model)
    assert structure.names == ["bert.encoder.layer.0.attention.sparse_heads", "bert.encoder.layer.0.sparse_neurons",
                               "bert.encoder.layer.1.attention.sparse_heads", "bert.encoder.layer.1.sparse_neurons"]
    heads0, neurons0, heads1, neurons1 = structure.groups
    heads0.set_mask(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    neurons0.set_mask((torch.arange(64) < 16).float())
    heads1.set_mask(torch.zeros(4))
    neurons1.set_mask(torch.ones(64))
    with torch.no_grad():
        heads0.scores.fill_(0.9)
        neurons0.scores.fill_(0.8)
        heads1.scores.fill_(0.1)
        neurons1.scores.fill_(0.3)
    return model, total_params


def test_report_numbers_by_hand():
    model, total_params = _model_with_known_mask()
    r = hs.sparsity_report(model, seq_len=128)
    prunable = 2 * (4 * HEAD_COST + 64 * NEURON_COST)
    assert prunable == 16704
    kept = 3 * HEAD_COST + 16 * NEURON_COST + 0 + 64 * NEURON_COST
    assert r.prunable_params == prunable and r.prunable_params_kept == kept
    assert r.sparsity == pytest.approx(1 - kept / prunable, abs=1e-12)
    assert r.target_sparsity == 0.5 and r.total_params == total_params

    assert [(g.kind, g.units, g.kept, g.params, g.params_kept) for g in r.groups] == [
        ("head", 4, 3, 4 * HEAD_COST, 3 * HEAD_COST),
        ("neuron", 64, 16, 64 * NEURON_COST, 16 * NEURON_COST),
        ("head", 4, 0, 4 * HEAD_COST, 0),
        ("neuron", 64, 64, 64 * NEURON_COST, 64 * NEURON_COST),
    ]
    # expected kept under the scores
    assert [g.expected_kept for g in r.groups] == pytest.approx([3.6, 51.2, 0.4, 19.2])
    expected_params = 0.9 * 4 * HEAD_COST + 0.8 * 64 * NEURON_COST + 0.1 * 4 * HEAD_COST + 0.3 * 64 * NEURON_COST
    assert r.expected_params_kept == pytest.approx(expected_params)
    assert r.expected_sparsity == pytest.approx(1 - expected_params / prunable)
    # top-K at the target (half of 16704 = 8352): layer-0 heads (4192) then layer-0 neurons (4160) fill it exactly
    assert [g.kept_topk for g in r.groups] == [4, 64, 0, 0]
    assert r.prunable_params_kept_topk == 8352 and r.sparsity_topk == pytest.approx(0.5)

    # forward matmul FLOPs per token: 2*in*out per linear, attention core 4*seq*width, scaled by the kept share
    attn, core, mlp = 4 * 2 * 32 * 32, 4 * 128 * 32, 2 * (2 * 32 * 64)
    mlm_head = 2 * 32 * 32 + 2 * 32 * 100  # transform.dense + decoder: never pruned
    dense = 2 * (attn + core + mlp) + mlm_head
    kept_flops = (attn + core) * 3 / 4 + mlp * 16 / 64 + 0 + mlp + mlm_head
    assert r.forward_flops_fraction == pytest.approx(kept_flops / dense, rel=1e-12)

    d = r.to_dict()
    assert d["sparsity"] == r.sparsity and len(d["groups"]) == 4
    text = str(r)
    assert "bert.encoder.layer.1.attention.sparse_heads" in text and f"{kept}/{prunable}" in text


def test_report_dense_model():
    model = hs.sparsify_model(tiny_model("llama"), hs.SparseConfig(sparsity=0.3))
    r = hs.sparsity_report(model)
    assert r.sparsity == 0 and r.forward_flops_fraction == 1.0
    assert r.expected_sparsity == pytest.approx(0.0)
    assert r.prunable_params == 2 * (2 * 1536 + 64 * 96)
    # all scores 1: top-K takes the units in order until 70% of the budget is spent
    assert r.sparsity_topk >= 0.3 and r.prunable_params_kept_topk <= 0.7 * r.prunable_params


def test_report_weight_granularity_saves_no_flops():
    model = hs.sparsify_model(tiny_model("gpt2"), hs.SparseConfig(granularity="weight"))
    structure = hs.SparseStructure(model)
    mask = torch.zeros(structure.num_units)
    mask[: structure.num_units // 4] = 1
    structure.set_masks(mask)
    r = hs.sparsity_report(model)
    assert r.prunable_params == structure.num_units
    assert r.prunable_params_kept == structure.num_units // 4
    assert r.sparsity == pytest.approx(0.75, abs=1e-9)
    assert r.forward_flops_fraction == 1.0


def test_report_needs_a_sparse_model():
    with pytest.raises(ValueError, match="not sparsified"):
        hs.sparsity_report(tiny_model("bert"))
