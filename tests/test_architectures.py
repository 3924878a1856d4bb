"""Adding a model family is one entry in `hf_sparse.ARCHITECTURES`: patching, the gathered layers, the shrunk
export, its reload and the benchmarks' model builder all follow from that entry, nothing else.

Phi is not in the table: the test adds it through the public layout and runs the whole path on a tiny model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from transformers import PhiConfig, PhiForCausalLM

import hf_sparse as hs
from hf_sparse.architectures import BlockSpec, Member
from hf_sparse.export import NoHeadsAttention

PHI = hs.ArchitectureSpec(
    mlp=BlockSpec(r"layers\.\d+\.mlp", (Member("fc1", "out"), Member("fc2", "in"))),
    attention=BlockSpec(
        r"layers\.\d+\.self_attn",
        (Member("q_proj", "out", "group"), Member("k_proj", "out", "head"), Member("v_proj", "out", "head"),
         Member("dense", "in", "group")),
        # a made-up head count, to see shrink_model rename what the entry says and nothing else
        shrink_attrs=(("kept_kv_heads", "kv_heads"), ("kept_query_heads", "query_heads")),
    ),
    decoder=True,
)


def _tiny_phi(seed: int = 0) -> PhiForCausalLM:
    torch.manual_seed(seed)
    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                       resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    model = PhiForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.self_attn.kept_kv_heads, layer.self_attn.kept_query_heads = 2, 4
    return model


def test_a_family_not_in_the_table_is_refused_with_the_fix():
    assert "phi" not in hs.ARCHITECTURES
    with pytest.raises(ValueError, match="no unit layout for model_type='phi'.*SparseConfig\\(architecture="):
        hs.sparsify_model(_tiny_phi(), hs.SparseConfig(sparsity=0.5))


def test_one_table_entry_makes_a_new_family_train_shrink_and_reload(monkeypatch, tmp_path):
    monkeypatch.setitem(hs.ARCHITECTURES, "phi", PHI)
    model = _tiny_phi()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.5))
    structure = hs.SparseStructure(model)
    # module order: layer 0's two key/value groups, its 48 neurons, then layer 1's
    assert structure.names == [f"model.layers.{i}.{block}" for i in (0, 1)
                               for block in ("self_attn.sparse_heads", "mlp.sparse_neurons")]
    mask = torch.cat([torch.tensor([1.0, 0.0]), (torch.arange(48) % 2).float(), torch.zeros(2),
                      (torch.arange(48) % 3 == 0).float()])
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(1)))
    hs.fix_masks(model)
    structure.set_masks(mask)  # this mask: a layer without heads, and part of every other group

    # the gathered layers compute exactly the masked dense model
    with torch.no_grad():
        sparse = model(ids).logits
    reference = hs.unsparsify_model(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, sparse, atol=1e-5, rtol=0)

    # a training step reaches the kept weights only
    model.train()
    model(ids, labels=ids).loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.grad is not None and torch.isfinite(q.weight.grad).all()
    model.zero_grad(set_to_none=True)
    model.eval()

    # shrink: the entry's shrink_attrs are renamed to the kept counts; a layer with no head left is the identity
    folder = hs.export_model(model, tmp_path / "shrunk", export="shrink")
    reloaded = hs.load_sparse_model(folder)
    attn0, attn1 = reloaded.model.layers[0].self_attn, reloaded.model.layers[1].self_attn
    assert (attn0.kept_kv_heads, attn0.kept_query_heads) == (1, 2)
    assert isinstance(attn1, NoHeadsAttention)
    assert reloaded.model.layers[0].mlp.fc1.out_features == 24
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, sparse, atol=1e-5, rtol=0)


def test_the_benchmark_builder_reads_the_family_from_the_entry(monkeypatch, tmp_path):
    from hf_sparse import bench

    monkeypatch.setitem(hs.ARCHITECTURES, "phi", PHI)
    _tiny_phi().save_pretrained(tmp_path / "phi")
    model, task = bench.build_model(str(tmp_path / "phi"), torch.float32)
    assert task == "clm" and isinstance(model, PhiForCausalLM)
    monkeypatch.setitem(hs.ARCHITECTURES, "phi", hs.ArchitectureSpec(mlp=PHI.mlp, attention=PHI.attention))
    _, task = bench.build_model(str(tmp_path / "phi"), torch.float32)
    assert task == "cls"  # not a decoder by its entry: a sequence classifier


def test_the_benchmark_times_every_mode_at_the_asked_kept_fraction(tmp_path):
    """`hf-sparse bench` on a tiny local model: every row runs (the fixed row once failed on the trainer's
    refusal of an all-equal mask) and keeps about the asked fraction; speed itself is measured in benchmarks."""
    from hf_sparse import bench

    model = tiny_model("bert", head="classification")
    model.save_pretrained(tmp_path / "bert")
    rows = bench.run_benchmark(str(tmp_path / "bert"), batch=2, seq=8, kept=(0.5,), modes=("search", "fixed"),
                               warmup=1, steps=1, device="cpu", log=lambda s: None, memory=False)
    assert [r.mode for r in rows] == ["dense", "search", "fixed"]
    for row in rows[1:]:
        assert abs(row.kept - 0.5) < 0.1 and row.step_ms > 0 and row.bound > 0
