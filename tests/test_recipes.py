"""The recipes end to end on tiny settings: in process, and a 2-process `accelerate launch`."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def removed_params(model_dir, sparse_config: dict):
    """(parameters a shrunk export no longer holds against the dense model of its config, the prunable ones under
    the run's SparseConfig)."""
    import hf_sparse as hs
    from transformers import AutoConfig, AutoModelForCausalLM

    shrunk = hs.load_sparse_model(model_dir)
    dense = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    n_shrunk, n_dense = (sum(p.numel() for p in m.parameters()) for m in (shrunk, dense))
    prunable = hs.sparsity_report(hs.sparsify_model(dense, hs.SparseConfig.from_dict(sparse_config))).prunable_params
    return n_dense - n_shrunk, prunable


TINY_LM = ["--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
           "--num_key_value_heads", "2", "--vocab_size", "512", "--block_size", "32", "--max_train_samples", "64",
           "--max_eval_samples", "16", "--per_device_train_batch_size", "8", "--logging_steps", "2"]


def test_text_classification_recipe_runs_and_exports(tmp_path):
    recipe = load_recipe("text_classification")
    out = tmp_path / "tc"
    results = recipe.main(["--output_dir", str(out), "--max_steps", "4", "--max_train_samples", "64",
                           "--max_eval_samples", "32", "--per_device_train_batch_size", "8", "--logging_steps", "2",
                           "--passage_words", "32", "--compare_dense"])
    assert set(os.listdir(out / "model")) >= {"config.json", "model.safetensors", "README.md", "tokenizer.json"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["sparse"]["accuracy"] == results["sparse"]["accuracy"]
    # the reported speed-up is the ratio of the reported training times; each step time is its run's time per step
    sparse, dense = saved["sparse"], saved["dense"]
    assert saved["speedup_vs_dense"] == pytest.approx(dense["train_seconds"] / sparse["train_seconds"], rel=1e-12)
    for run in (sparse, dense):
        assert run["step_seconds"] == pytest.approx(run["train_seconds"] / saved["steps"], rel=1e-12)
    assert saved["steps"] == 4
    card = (out / "model" / "README.md").read_text()
    assert "50.0%" in card and "Shakespeare" in card
    # the plain export loads with Transformers alone and its zeros are the dropped units
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    import hf_sparse as hs

    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    dropped_rows = (w.abs().sum(1) == 0).sum().item()
    assert 0 < dropped_rows < w.shape[0]
    # the reported accuracy is the exported model's on the 32 evaluation examples (rebuilt here as the recipe
    # builds them), and the dense run's is a count out of the same 32
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    ds, _, _, _ = recipe.load_data(recipe.DataArguments(passage_words=32), tokenizer)
    test = ds["test"].shuffle(seed=0).select(range(32))
    batch = DataCollatorWithPadding(tokenizer)(
        [{k: test[i][k] for k in ("input_ids", "token_type_ids", "attention_mask")} for i in range(32)])
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    assert sparse["accuracy"] == float((predictions == torch.tensor(test["label"])).float().mean())
    assert dense["accuracy"] * 32 == round(dense["accuracy"] * 32)
    # the reported sparsity is the export's: its all-zero units, counted by hf_sparse's own report
    probe = hs.sparsify_model(model, hs.SparseConfig.from_dict(saved["sparse_config"]))
    hs.SparseStructure(probe).set_masks((hs.unit_magnitudes(probe) > 0).float())
    assert hs.sparsity_report(probe).sparsity == sparse["sparsity"]


def test_causal_lm_recipe_from_scratch(tmp_path):
    recipe = load_recipe("causal_lm")
    out = tmp_path / "clm"
    results = recipe.main(["--output_dir", str(out), "--max_steps", "6", "--export", "shrink", *TINY_LM])
    sparse = results["sparse"]
    assert sparse["perplexity"] == pytest.approx(math.exp(sparse["eval_loss"]), rel=1e-12)
    import hf_sparse
    from transformers import AutoTokenizer

    from hf_sparse import tasks as embedded

    # dropped units are physically gone: exactly the reported sparsity of the prunable parameters
    removed, prunable = removed_params(out / "model", results["sparse_config"])
    assert 0 < removed < prunable and removed == pytest.approx(sparse["sparsity"] * prunable, abs=0.5)
    shrunk = hf_sparse.load_sparse_model(out / "model").eval()
    # the reported evaluation loss is the export's on the 16 validation blocks (rebuilt here as the recipe builds
    # them; they come from the first batch of 1000 texts that group_texts packs)
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    raw, _ = recipe.load_text(recipe.DataArguments())
    texts = raw["validation"].select(range(1000))
    blocks = embedded.group_texts(texts, tokenizer, 32, text_column="text", batch_size=1000).select(range(16))
    ids = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        loss = float(shrunk(input_ids=ids, labels=torch.tensor(blocks["labels"])).loss)
    assert loss == pytest.approx(sparse["eval_loss"], rel=1e-5)
    assert os.path.isfile(out / "model" / "README.md")


def test_causal_lm_code_corpus_offline():
    """--code_corpus: an installed package's sources as the text, split by file; a package that is not there is
    refused naming the flag."""
    recipe = load_recipe("causal_lm")
    raw, described = recipe.load_text(recipe.DataArguments(code_corpus="accelerate"))
    assert raw["train"].column_names == ["text"] and len(raw["validation"]) > 0
    assert described.startswith("Python sources of accelerate ")
    from hf_sparse.tasks import load_code_corpus

    assert raw["validation"]["text"] == load_code_corpus("accelerate")["validation"]["text"]  # split by file
    with pytest.raises(SystemExit, match="--code_corpus 'no_such_pkg'.*not installed"):
        recipe.load_text(recipe.DataArguments(code_corpus="no_such_pkg"))


def test_recipe_help_and_bad_input(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", "causal_lm.py"), "--help"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "--structure_learning_rate" in proc.stdout and "--compare_dense" in proc.stdout
    recipe = load_recipe("causal_lm")
    with pytest.raises(ValueError, match="structure_learning_rate"):
        recipe.main(["--output_dir", str(tmp_path), "--structure_learning_rate", "0", *TINY_LM])


@pytest.mark.parametrize("config, engine, extra", [
    ("cpu_2proc", "MULTI_CPU", []),
    ("fsdp_cpu_2proc", "FSDP", ["--compare_dense"]),  # the dense baseline must not undo the sparse run's FSDP
    ("deepspeed_cpu_2proc", "DEEPSPEED", ["--fix_masks_at", "0.1"]),  # no search under DeepSpeed (refused)
])
def test_two_process_accelerate_launch_of_a_recipe(tmp_path, config, engine, extra):
    """The documented launches of a recipe on 2 CPU processes: data parallel, FSDP2 and DeepSpeed ZeRO-3 (the GPU
    configs' set-ups without GPUs): trains with that engine, evaluates, gathers the model and writes the shrunk
    export with its card, which reloads."""
    import hf_sparse as hs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--config_file", os.path.join(ROOT, "recipes", "accelerate", f"{config}.yaml"),
           "--main_process_port", str(port), os.path.join(ROOT, "recipes", "causal_lm.py"),
           "--output_dir", str(tmp_path), "--max_steps", "4", "--disable_tqdm", "true", "--export", "shrink", *TINY_LM, *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 4
    # the export gathered from the ranks lost exactly the reported sparsity of the prunable parameters
    removed, prunable = removed_params(tmp_path / "model", results["sparse_config"])
    assert 0 < removed < prunable and removed == pytest.approx(results["sparse"]["sparsity"] * prunable, abs=0.5)
    assert "| hf_sparse |" in proc.stdout
    assert results["distributed_type"] == engine
    assert ("dense" in results) == ("--compare_dense" in extra)
    model = hs.load_sparse_model(tmp_path / "model")  # the shrunk export, gathered from the shards under FSDP
    kept = [layer.out_features for name, layer in model.named_modules() if name.endswith("mlp.up_proj")]
    assert len(kept) == 2 and sum(kept) < 2 * 64  # intermediate_size 64: neurons were removed
    assert model(torch.arange(8)[None]).logits.shape == (1, 8, 512)
    assert "50.0% of the prunable parameters" in (tmp_path / "model" / "README.md").read_text()


def test_recipe_push_to_hub_uploads_export_and_card(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: uploaded.setdefault("repo", repo_id))

    def fake_upload(self, repo_id, folder_path, **kw):
        uploaded["files"] = sorted(os.listdir(folder_path))
        return "commit"

    monkeypatch.setattr(HfApi, "upload_folder", fake_upload)
    recipe = load_recipe("causal_lm")
    argv = ["--output_dir", str(tmp_path), "--max_steps", "2", "--push_to_hub", "--hub_model_id", "me/tiny-clm",
            "--export", "shrink", *TINY_LM]
    import hf_sparse

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hf_sparse.HubOfflineError, match="hf upload me/tiny-clm"):  # offline: a clear way out
        recipe.main(argv)
    assert "repo" not in uploaded
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    recipe.main(argv)
    assert uploaded["repo"] == "me/tiny-clm"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(uploaded["files"])


def test_local_training_files_load_or_fail_naming_the_flag(tmp_path):
    from hf_sparse.recipe_utils import load_local_files

    tsv = tmp_path / "train.tsv"
    tsv.write_text("text\tlabel\nhello there\t0\ngood bye\t1\n")
    ds = load_local_files(str(tsv))
    assert ds["train"].column_names == ["text", "label"] and ds["train"][1]["text"] == "good bye"
    with pytest.raises(FileNotFoundError, match="--train_file .*missing.csv"):
        load_local_files(str(tmp_path / "missing.csv"))
    parquet = tmp_path / "train.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"--train_file .*\.parquet are not read; use one of \.csv, \.tsv"):
        load_local_files(str(parquet))
    with pytest.raises(ValueError, match="same format"):
        csv = tmp_path / "eval.csv"
        csv.write_text("text,label\na,0\n")
        load_local_files(str(tsv), str(csv))
