"""fix_masks, the plain and shrunk exports, the trainable sparse checkpoint, and LoRA merges that stay sparse.

The four architectures of the issue run with a mask that drops every head of layer 0 and every neuron of
layer 1 (the zero-width paths) and part of the other groups.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CORE_ARCHS, edge_masks, tiny_inputs, tiny_model

import hf_sparse as hs
from hf_sparse.export import SHAPES_KEY, NoHeadsAttention, ZeroInputConv1D
from hf_sparse.layers import SparseLinear
from hf_sparse.structure import UnitGroup, sample_masks, topk_mask

ATOL = 1e-5


def _sparse(arch: str, seed: int = 0, **config) -> torch.nn.Module:
    model = tiny_model(arch, seed=seed)
    hs.sparsify_model(model, hs.SparseConfig(**{"sparsity": 0.5, **config}))
    structure = hs.SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed + 1)))
    hs.fix_masks(model)
    structure.set_masks(edge_masks(structure, seed))
    return model


@torch.no_grad()
def _logits(model, arch):
    return model(**tiny_inputs(arch)).logits


def _weights_bytes(folder) -> int:
    return os.path.getsize(os.path.join(folder, "model.safetensors"))


# --- fix_masks ----------------------------------------------------------------------------------------
def test_fix_masks_topk_fills_the_budget_and_is_saved():
    model = tiny_model("bert")
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.6))
    structure = hs.SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(3)))
    assert not hs.masks_fixed(model)
    mask = hs.fix_masks(model)
    costs = structure.costs("params")
    target = 0.4 * float(costs.sum())
    assert torch.equal(mask, topk_mask(structure.scores(), costs, target))
    assert torch.equal(structure.masks(), mask)
    assert hs.masks_fixed(model)
    kept = float((costs * mask).sum())
    assert kept <= target * (1 + 1e-9) and kept >= target - float(costs.max())
    # the flag is a state-dict entry: it survives a checkpoint into a fresh sparse model
    fresh = tiny_model("bert")
    hs.sparsify_model(fresh, hs.SparseConfig(sparsity=0.6))
    fresh.load_state_dict(model.state_dict())
    assert hs.masks_fixed(fresh) and torch.equal(hs.SparseStructure(fresh).masks(), mask)
    # an override of the sparsity
    assert float((costs * hs.fix_masks(model, sparsity=0.9)).sum()) <= 0.1 * float(costs.sum()) * (1 + 1e-9)


def test_fix_masks_sample_keeps_the_best_draw():
    model = tiny_model("llama")
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.5, score_init="budget"))
    structure = hs.SparseStructure(model)
    seen = []

    def score_fn(m):  # higher is better: prefer masks that keep few neurons of the first MLP
        current = hs.SparseStructure(m).masks().clone()
        seen.append(current)
        return -float(current[2:66].sum())

    mask = hs.fix_masks(model, method="sample", num_draws=5, score_fn=score_fn, seed=7)
    draws = sample_masks(structure.scores(), 5, 7, 0)
    assert len(seen) == 5 and all(torch.equal(a, b) for a, b in zip(seen, draws))
    best = max(range(5), key=lambda k: (-float(draws[k][2:66].sum()), -k))
    assert torch.equal(mask, draws[best]) and torch.equal(structure.masks(), draws[best])
    assert hs.masks_fixed(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "best"}, "method must be one of"),
        ({"method": "sample"}, "needs score_fn"),
        ({"method": "sample", "score_fn": lambda m: 0.0, "num_draws": 0}, "num_draws must be an integer >= 1"),
        ({"method": "sample", "score_fn": lambda m: 0.0, "num_draws": 2.5}, "num_draws must be an integer"),
        ({"method": "sample", "score_fn": "loss"}, "needs score_fn"),
        ({"score_fn": lambda m: 0.0}, "only used by method='sample'"),
        ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
    ],
)
def test_fix_masks_bad_arguments(kwargs, match):
    model = tiny_model("opt")
    hs.sparsify_model(model, hs.SparseConfig())
    with pytest.raises(ValueError, match=match):
        hs.fix_masks(model, **kwargs)
    assert not hs.masks_fixed(model)
    with pytest.raises(ValueError, match="sparsified model"):
        hs.fix_masks(tiny_model("opt"))


# --- plain and shrunk exports -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per architecture: the fixed-mask sparse model's logits, the report, and the plain / shrunk exports."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for arch in CORE_ARCHS:
        torch.manual_seed(0)
        model = _sparse(arch)
        expected = _logits(model, arch)
        report = hs.sparsity_report(model)
        plain_dir, shrunk_dir = root / f"{arch}-plain", root / f"{arch}-shrunk"
        plain = hs.unsparsify_model(copy.deepcopy(model))
        plain.save_pretrained(plain_dir)
        shrunk = hs.unsparsify_model(copy.deepcopy(model), shrink=True)
        shrunk.save_pretrained(shrunk_dir)
        torch.save(expected, root / f"{arch}-expected.pt")
        out[arch] = dict(model=model, expected=expected, report=report, plain=plain, shrunk=shrunk,
                         plain_dir=plain_dir, shrunk_dir=shrunk_dir, root=root)
    return out


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_plain_and_shrunk_exports_match_the_sparse_model(exported, arch):
    e = exported[arch]
    assert not any(isinstance(m, (SparseLinear, UnitGroup)) for m in e["plain"].modules())
    assert not hasattr(e["plain"], "hf_sparse_config")
    torch.testing.assert_close(_logits(e["plain"], arch), e["expected"], atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(e["shrunk"], arch), e["expected"], atol=ATOL, rtol=0)
    # the shrunk model has exactly the kept prunable parameters plus everything that was not prunable
    report = e["report"]
    n_shrunk = sum(p.numel() for p in e["shrunk"].parameters())
    assert n_shrunk == report.total_params - report.prunable_params + report.prunable_params_kept
    assert n_shrunk < report.total_params
    # the zero-width paths were taken: no head left in layer 0, no neuron in layer 1
    assert any(isinstance(m, NoHeadsAttention) for m in e["shrunk"].modules())
    shapes = getattr(e["shrunk"].config, SHAPES_KEY)
    assert len(shapes["no_heads"]) == 1 and any(0 in s.values() for s in shapes["modules"].values())
    if arch == "gpt2":
        assert isinstance(e["shrunk"].transformer.h[1].mlp.c_proj, ZeroInputConv1D)
    # and it reloads through hf_sparse, smaller on disk than the plain export
    reloaded = hs.load_sparse_model(e["shrunk_dir"])
    assert sum(p.numel() for p in reloaded.parameters()) == n_shrunk
    torch.testing.assert_close(_logits(reloaded, arch), e["expected"], atol=ATOL, rtol=0)
    assert _weights_bytes(e["shrunk_dir"]) < _weights_bytes(e["plain_dir"])


def test_plain_exports_load_without_hf_sparse(exported):
    """One fresh interpreter loads the four plain exports with AutoModel* and never imports hf_sparse."""
    root = next(iter(exported.values()))["root"]
    script = textwrap.dedent(
        """
        import sys, torch, transformers
        root, archs = sys.argv[1], sys.argv[2].split(",")
        gen = torch.Generator().manual_seed(0)
        for arch in archs:
            cls = transformers.AutoModelForMaskedLM if arch == "bert" else transformers.AutoModelForCausalLM
            model = cls.from_pretrained(f"{root}/{arch}-plain").eval()
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(3, 100, (2, 8), generator=gen)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            expected = torch.load(f"{root}/{arch}-expected.pt")
            err = (logits - expected).abs().max().item()
            assert err <= 1e-5, (arch, err)
            print(arch, type(model).__name__, err)
        assert not any(m == "hf_sparse" or m.startswith("hf_sparse.") for m in sys.modules), "hf_sparse imported"
        print("OK")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script, str(root), ",".join(CORE_ARCHS)],
        capture_output=True, text=True, env=env, cwd=str(root), timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")


def test_tiny_inputs_match_the_subprocess_inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 8), generator=gen)
    assert torch.equal(ids, tiny_inputs("bert")["input_ids"])


def test_shrunk_export_refused_by_plain_transformers(exported):
    import transformers

    with pytest.raises(RuntimeError, match="mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(exported["llama"]["shrunk_dir"])


def test_shrink_rejects_what_it_cannot_remove():
    model = tiny_model("opt")
    hs.sparsify_model(model, hs.SparseConfig(granularity="weight"))
    with pytest.raises(ValueError, match="cannot be removed physically"):
        hs.unsparsify_model(model, shrink=True)
    with pytest.raises(ValueError, match="sparsified model"):
        hs.shrink_model(tiny_model("opt"))


def test_export_model_leaves_the_model_alone(tmp_path):
    model = _sparse("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for export in ("plain", "shrink", "sparse"):
        folder = hs.export_model(model, tmp_path / export, export=export)
        assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert hs.is_sparsified(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(_logits(hs.load_sparse_model(tmp_path / "shrink"), "gpt2"), _logits(model, "gpt2"),
                               atol=ATOL, rtol=0)
    assert sorted(os.listdir(tmp_path)) == ["plain", "shrink", "sparse"]  # no temporary folders left
    with pytest.raises(ValueError, match="export must be one of"):
        hs.export_model(model, tmp_path / "x", export="onnx")


# --- the trainable sparse checkpoint ------------------------------------------------------------------
def _train_steps(model, arch, steps=3):
    """A few AdamW steps with the model's current (fixed) mask; returns the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_inputs(arch, seed=5)
    losses = []
    for _ in range(steps):
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    return losses


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_sparse_checkpoint_round_trip_is_bit_identical_and_trains_on(tmp_path, arch):
    model = _sparse(arch, compute="gather")
    folder = hs.save_sparse_pretrained(model, tmp_path / "ckpt")
    assert sorted(os.listdir(folder)) == sorted(
        ["config.json", "model.safetensors", "sparse_config.json", "hf_sparse_dropped.safetensors"]
        + (["generation_config.json"] if arch != "bert" else [])
    )
    loaded = hs.load_sparse_model(folder, attn_implementation="eager")
    assert type(loaded) is type(model) and hs.masks_fixed(loaded)
    assert hs.get_sparse_config(loaded).to_dict() == hs.get_sparse_config(model).to_dict()
    a, b = model.state_dict(keep_vars=True), loaded.state_dict(keep_vars=True)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].requires_grad == b[k].requires_grad, k
        assert torch.equal(a[k], b[k]), k
    # tied weights stay one tensor (BERT's decoder and GPT-2's lm_head share the input embeddings)
    out_emb, in_emb = loaded.get_output_embeddings(), loaded.get_input_embeddings()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (out_emb.weight is in_emb.weight) == tied
    torch.testing.assert_close(_logits(loaded, arch), _logits(model, arch), atol=0, rtol=0)
    # training continues exactly as it would have on the original
    losses_a, losses_b = _train_steps(model, arch), _train_steps(loaded, arch)
    assert losses_a == losses_b and losses_b[-1] < losses_b[0]
    for (ka, pa), (kb, pb) in zip(model.named_parameters(), loaded.named_parameters()):
        assert ka == kb and torch.equal(pa, pb), ka
    assert (out_emb.weight is in_emb.weight) == (arch != "llama")


def test_sparse_checkpoint_resaves_the_same_model_and_refuses_another(tmp_path):
    target = tmp_path / "ckpt"
    model = _sparse("opt")
    hs.save_sparse_pretrained(model, target)
    (target / "tokenizer.json").write_text("{}")  # a file the export does not own is carried over
    hs.fix_masks(model, sparsity=0.75)
    hs.save_sparse_pretrained(model, target)  # same model, new weights/mask: allowed
    assert (target / "tokenizer.json").exists()
    assert torch.equal(hs.SparseStructure(hs.load_sparse_model(target)).masks(), hs.SparseStructure(model).masks())
    before = {p: (target / p).read_bytes() for p in os.listdir(target)}
    other = _sparse("opt", granularity=["neuron"])
    with pytest.raises(FileExistsError, match="different model"):
        hs.save_sparse_pretrained(other, target)
    with pytest.raises(FileExistsError, match="different model"):
        hs.export_model(model, target, export="plain")  # a plain export is not the same folder either
    assert {p: (target / p).read_bytes() for p in os.listdir(target)} == before
    hs.save_sparse_pretrained(other, target, overwrite=True)
    assert hs.get_sparse_config(hs.load_sparse_model(target)).granularity == ["neuron"]
    # a folder with other things in it is refused before anything is written
    stuff = tmp_path / "notes"
    stuff.mkdir()
    (stuff / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no model"):
        hs.save_sparse_pretrained(model, stuff)
    assert os.listdir(stuff) == ["todo.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "notes"]  # no temporary folders left


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import hf_sparse.export as export

    model = _sparse("bert")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_config_files", boom)
    with pytest.raises(OSError, match="disk full"):
        hs.save_sparse_pretrained(model, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    hs.save_sparse_pretrained(model, tmp_path / "ckpt")
    monkeypatch.setattr(export, "save_config_files", boom)
    with pytest.raises(OSError, match="disk full"):  # the old checkpoint survives a failed re-save
        hs.save_sparse_pretrained(model, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == ["ckpt"]
    monkeypatch.undo()
    hs.load_sparse_model(tmp_path / "ckpt")


def test_sparse_checkpoint_bad_files(tmp_path):
    model = _sparse("llama")
    good = hs.save_sparse_pretrained(model, tmp_path / "good")

    def variant(name, edit):
        folder = tmp_path / name
        folder.mkdir()
        for f in os.listdir(good):
            (folder / f).write_bytes((tmp_path / "good" / f).read_bytes())
        edit(folder)
        return folder

    missing = variant("missing", lambda f: (f / "model.safetensors").unlink())
    with pytest.raises(FileNotFoundError, match="weights file is missing"):
        hs.load_sparse_model(missing)
    no_config = variant("no_config", lambda f: (f / "config.json").unlink())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hs.load_sparse_model(no_config)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        hs.load_sparse_model(tmp_path / "nowhere")

    def truncate(f):
        data = (f / "model.safetensors").read_bytes()
        (f / "model.safetensors").write_bytes(data[: len(data) // 2])

    with pytest.raises(ValueError, match="corrupt or truncated"):
        hs.load_sparse_model(variant("truncated", truncate))
    with pytest.raises(ValueError, match="not valid JSON"):
        hs.load_sparse_model(variant("bad_json", lambda f: (f / "sparse_config.json").write_text("{granularity")))

    def edit_sparse_config(**changes):
        def edit(f):
            data = json.loads((f / "sparse_config.json").read_text())
            data.update(changes)
            (f / "sparse_config.json").write_text(json.dumps(data))
        return edit

    # unit groups differ: only neurons, or only the first layer's blocks
    with pytest.raises(ValueError, match="does not fit"):
        hs.load_sparse_model(variant("neurons_only", edit_sparse_config(granularity=["neuron"])))
    with pytest.raises(ValueError, match="does not fit"):
        hs.load_sparse_model(variant("one_layer", edit_sparse_config(exclude_modules=r".*layers\.1\..*")))
    with pytest.raises(ValueError, match="unknown fields"):
        hs.load_sparse_model(variant("unknown_field", edit_sparse_config(colour="blue")))

    def resize(f):  # config.json says a wider MLP than the weights have
        data = json.loads((f / "config.json").read_text())
        data["intermediate_size"] = 96
        (f / "config.json").write_text(json.dumps(data))

    with pytest.raises(ValueError, match="does not fit"):
        hs.load_sparse_model(variant("resized", resize))


# --- PEFT LoRA merge ----------------------------------------------------------------------------------
def _lora_model(seed=0):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", seed=seed)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    )
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.5))
    structure = hs.SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


def _zero_patterns(model):
    return {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): (m.weight == 0).clone()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name and "lm_head" not in name
    }


@torch.no_grad()
def test_lora_merge_keeps_every_zero():
    model = _lora_model()
    # what the plain export of the sparse base would zero: the top-K mask's dropped rows / columns
    reference = copy.deepcopy(model)
    hs.fix_masks(reference)
    expected_logits = _logits(reference, "llama")
    unmerged = hs.unsparsify_model(reference)
    expected = _zero_patterns(unmerged)
    base_weights = {n.removeprefix("base_model.model.").replace(".base_layer", ""): m.weight.clone()
                    for n, m in unmerged.named_modules() if n.endswith("base_layer")}
    report = hs.sparsity_report(model)

    merged = hs.merge_lora_sparse(model)  # fixes the top-K mask itself
    assert not any(isinstance(m, (SparseLinear, UnitGroup)) or "lora" in type(m).__name__.lower()
                   for m in merged.modules())
    got = _zero_patterns(merged)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # the adapters did change the kept weights, and the pruned projections have whole zero rows/columns
    touched = [n for n in expected if n.endswith(("q_proj", "v_proj", "down_proj"))]
    assert len(touched) == 6 and any(expected[n].any() for n in touched)
    assert not any(expected[n].all() for n in touched)
    merged_modules = dict(merged.named_modules())
    assert base_weights.keys() == set(touched)
    assert all(not torch.equal(merged_modules[n].weight, w) for n, w in base_weights.items())
    torch.testing.assert_close(_logits(merged, "llama"), expected_logits, atol=ATOL, rtol=0)
    zeros = sum(int(z.sum()) for z in got.values())
    assert zeros == sum(int(z.sum()) for z in expected.values()) > 0
    assert report.prunable_params_kept_topk > 0


@torch.no_grad()
def test_lora_merge_then_shrink():
    model = _lora_model(seed=2)
    hs.fix_masks(model)
    expected = _logits(model, "llama")
    report = hs.sparsity_report(model)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    merged = hs.merge_lora_sparse(model, shrink=True)
    torch.testing.assert_close(_logits(merged, "llama"), expected, atol=ATOL, rtol=0)
    n = sum(p.numel() for p in merged.parameters())
    assert n == report.total_params - lora_params - report.prunable_params + report.prunable_params_kept


def test_lora_merge_bad_input():
    with pytest.raises(ValueError, match="sparsified PEFT model"):
        hs.merge_lora_sparse(tiny_model("llama"))
    plain = tiny_model("llama")
    hs.sparsify_model(plain, hs.SparseConfig())
    with pytest.raises(ValueError, match="PEFT LoRA model"):
        hs.merge_lora_sparse(plain)
    with pytest.raises(ValueError, match="merge the adapters first"):
        hs.shrink_model(_lora_model())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
@torch.no_grad()
def test_shrunk_decoders_generate_like_the_sparse_model(exported, arch):
    """Cached decoding through a layer with no head left (NoHeadsAttention feeds the cache empty keys)."""
    e = exported[arch]
    inputs = tiny_inputs(arch)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(e["shrunk"].generate(**inputs, **kwargs), e["model"].generate(**inputs, **kwargs))


@torch.no_grad()
def test_a_shrunk_model_sparsified_again_round_trips(tmp_path):
    """Shrink at 50%, sparsify the shrunk model again (per-layer sizes differ), save/load, shrink again."""
    model = tiny_model("llama")
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.5))
    structure = hs.SparseStructure(model)
    structure.set_masks(torch.cat([torch.tensor([1.0, 1.0]) if n == 2 else (torch.arange(n) % 2 == 0).float()
                                   for n in structure.sizes]))  # all heads, half the neurons
    once = hs.shrink_model(model)
    hs.sparsify_model(once, hs.SparseConfig(sparsity=0.3, granularity=["neuron"]))
    second = hs.SparseStructure(once)
    assert second.sizes == [32, 32]
    second.set_scores(torch.rand(second.num_units, generator=torch.Generator().manual_seed(0)))
    hs.fix_masks(once)
    folder = hs.save_sparse_pretrained(once, tmp_path / "again")
    loaded = hs.load_sparse_model(folder, attn_implementation="eager")
    a, b = once.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    expected = _logits(once, "llama")
    report = hs.sparsity_report(once)
    twice = hs.shrink_model(once)
    torch.testing.assert_close(_logits(twice, "llama"), expected, atol=ATOL, rtol=0)
    assert sum(p.numel() for p in twice.parameters()) == report.total_params - report.prunable_params + report.prunable_params_kept
    twice.save_pretrained(tmp_path / "twice")
    torch.testing.assert_close(_logits(hs.load_sparse_model(tmp_path / "twice"), "llama"), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["roberta", "mistral", "qwen2"])
def test_shrunk_export_of_the_other_families_under_mask_compute(tmp_path, arch):
    """The families that share a layout (Qwen2 adds q/k/v biases), with the reference mask compute."""
    model = _sparse(arch, compute="mask")
    expected = _logits(model, arch)
    report = hs.sparsity_report(model)
    hs.export_model(model, tmp_path / "shrunk", export="shrink")
    loaded = hs.load_sparse_model(tmp_path / "shrunk")
    torch.testing.assert_close(_logits(loaded, arch), expected, atol=ATOL, rtol=0)
    kept = report.total_params - report.prunable_params + report.prunable_params_kept
    assert sum(p.numel() for p in loaded.parameters()) == kept
