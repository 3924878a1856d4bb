"""Errors that name the file or field, the value and the fix, and leave nothing half done: exports to a path
under a file, a shrunk export that lost its shapes key, a model class of another model type, LoRA on
embeddings, and local training files that are empty, header-only or not valid JSON."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from trainer_helpers import arithmetic_sequences, tiny_llama

import hf_sparse as hs
from hf_sparse.export import SHAPES_KEY
from hf_sparse.recipe_utils import load_local_files


def _fixed_sparse_llama(seed: int = 0):
    model = hs.sparsify_model(tiny_llama(seed), hs.SparseConfig(sparsity=0.5))
    structure = hs.SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed)))
    hs.fix_masks(model)
    return model.eval()


def _batch(n: int = 4) -> dict:
    data = arithmetic_sequences(n)
    return {k: torch.tensor(data[:n][k]) for k in ("input_ids", "labels")}


# --- 1. an export path under a regular file -------------------------------------------------------------------
@pytest.mark.parametrize("export", ["plain", "shrink", "sparse"])
def test_export_under_a_file_names_the_file_and_writes_nothing(tmp_path, export):
    """makedirs said only `[Errno 17] File exists: .../afile`."""
    model = _fixed_sparse_llama()
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for target in (afile / "out", afile / "sub" / "out"):
        with pytest.raises(NotADirectoryError, match=rf"{afile}.* is a file, not a folder.*choose a folder path"):
            hs.export_model(model, target, export=export)
    assert os.listdir(tmp_path) == ["afile"] and afile.read_text() == "not a folder"


# --- 2. a shrunk export whose config.json lost hf_sparse_shapes ----------------------------------------------
def test_shrunk_export_without_its_shapes_key_says_so(tmp_path):
    """Transformers' `ignore_mismatched_sizes` message did not say the folder was a shrunk export."""
    folder = hs.export_model(_fixed_sparse_llama(), tmp_path / "shrunk", export="shrink")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config[SHAPES_KEY]
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=rf"{re.escape(path)} does not fit .*shrunk export.*lost `{SHAPES_KEY}`"
                                         r".*re-export.*restore") as e:
        hs.load_sparse_model(folder)
    assert "mlp" in str(e.value)  # names a tensor and its shapes
    plain = hs.export_model(_fixed_sparse_llama(), tmp_path / "plain", export="plain")
    assert isinstance(hs.load_sparse_model(plain), transformers.LlamaForCausalLM)  # no false alarm


# --- 3. model_class of another model type ---------------------------------------------------------------------
@pytest.mark.parametrize("export", ["plain", "sparse"])
def test_model_class_of_another_model_type_is_refused(tmp_path, export):
    """A sparse folder raised `AttributeError: type_vocab_size`; a plain one loaded a random BERT in silence."""
    folder = hs.export_model(_fixed_sparse_llama(), tmp_path / export, export=export)
    with pytest.raises(ValueError, match=r"BertForSequenceClassification .*BertConfig.*'bert'.*LlamaConfig.*'llama'"
                                         r".*Omit model_class to build LlamaForCausalLM.*"
                                         r"AutoModelForSequenceClassification \(it builds LlamaForSequenceClassification\)"):
        hs.load_sparse_model(folder, model_class=transformers.BertForSequenceClassification)
    model = hs.load_sparse_model(folder, model_class=transformers.AutoModelForCausalLM)
    assert isinstance(model, transformers.LlamaForCausalLM)


# --- 4. LoRA on the embeddings ----------------------------------------------------------------------------------
def test_lora_on_embeddings_beside_a_sparse_base_trains_and_merges_exactly():
    """Was refused as LoRA on a 'quantized or custom' layer; the sparse layers never touch the embeddings, so
    the adapter works as on a dense model and merges exactly."""
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj", "down_proj"], init_lora_weights=False)
    model = hs.sparsify_model(get_peft_model(tiny_llama(), config), hs.SparseConfig(sparsity=0.5))
    structure = hs.SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)))
    hs.fix_masks(model)
    batch = _batch()
    model.train()
    model(**batch).loss.backward()
    embedding_lora = [p for n, p in model.named_parameters() if "lora_embedding" in n]
    assert embedding_lora and all(p.grad is not None and p.grad.any() for p in embedding_lora)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        merged = hs.merge_lora_sparse(model)
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)


# --- 6. local training files ----------------------------------------------------------------------------------
ALL_FORMATS = ("txt", "csv", "tsv", "json", "jsonl")


@pytest.mark.parametrize("name, text, match", [
    ("train.csv", "", r"--train_file .*train\.csv is empty.*header line"),
    ("train.txt", "\n \n", r"--train_file .*train\.txt is empty.*one example per line"),
    ("train.jsonl", "", r"--train_file .*train\.jsonl is empty.*one JSON object per line"),
    ("train.csv", "text,label\n", r"--train_file .*train\.csv has a header row \(text,label\) but no data rows"),
    ("train.tsv", "text\tlabel\n\n", r"--train_file .*train\.tsv has a header row .* but no data rows"),
    ("train.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", label: 1}\n',
     r"--train_file .*train\.jsonl: line 3 is not valid JSON .*label: 1.*fix or remove"),
    ("train.json", '{"text": "a", "label": 0}\n{"text": "b" "label": 1}\n',
     r"--train_file .*train\.json: line 2 is not valid JSON"),
    ("train.json", '[{"text": "a", "label": 0},\n {"text": "b" "label": 1}]\n',
     r"--train_file .*train\.json: line 2 is not valid JSON"),
])
def test_bad_local_files_name_the_flag_the_file_and_the_fix(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_local_files(str(path), formats=ALL_FORMATS)


def test_bad_validation_file_names_its_flag_and_good_files_still_load(tmp_path):
    train, validation = tmp_path / "train.csv", tmp_path / "eval.csv"
    train.write_text("text,label\nhello,0\n")
    validation.write_text("text,label\n")
    with pytest.raises(ValueError, match=r"--validation_file .*eval\.csv has a header row"):
        load_local_files(str(train), str(validation))
    validation.write_text("text,label\nbye,1\n")
    assert load_local_files(str(train), str(validation))["validation"][0]["text"] == "bye"
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert load_local_files(str(jsonl))["train"]["text"] == ["a", "b"]
    array = tmp_path / "train.json"
    array.write_text('[{"text": "a"},\n {"text": "b"}]\n')
    assert load_local_files(str(array), formats=ALL_FORMATS)["train"]["text"] == ["a", "b"]


def test_causal_lm_recipe_names_an_empty_validation_file(tmp_path):
    """Through the recipe's command line: the data is read before any model or tokenizer is built."""
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("causal_lm", os.path.join(root, "recipes", "causal_lm.py"))
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["causal_lm"] = recipe  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(recipe)
    train, validation = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text("to be or not to be\n")
    validation.write_text("")
    with pytest.raises(ValueError, match=r"--validation_file .*eval\.txt is empty"):
        recipe.main(["--output_dir", str(tmp_path / "out"), "--train_file", str(train),
                     "--validation_file", str(validation)])
    assert not (tmp_path / "out" / "model").exists()


def test_lora_put_on_an_already_sparsified_model_names_the_order():
    # the supported order is get_peft_model first, then sparsify_model (README); the reverse fails inside PEFT,
    # whose message shows the layer's repr: the fix is named there
    from peft import LoraConfig, get_peft_model

    model = hs.sparsify_model(tiny_llama(), hs.SparseConfig(sparsity=0.5))
    with pytest.raises(ValueError, match=r"get_peft_model\(model, lora_config\); hf_sparse.sparsify_model.*is not supported"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["down_proj"]))
    assert "get_peft_model" not in repr(model)  # an ordinary print of the model stays as it was
