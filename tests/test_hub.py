"""The model card (numbers from the model, no placeholders) and the push (the exact files uploaded, offline
errors that name the way out), with the upload calls stood in for: no network."""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import hf_sparse as hs
from hf_sparse.hub import CITATION

TOKEN = "hf_NotARealTokenButSecretAnyway123"


def _fixed(arch: str = "bert", sparsity: float = 0.5) -> torch.nn.Module:
    model = tiny_model(arch)
    hs.sparsify_model(model, hs.SparseConfig(sparsity=sparsity))
    structure = hs.SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(4)))
    hs.fix_masks(model)
    return model


def test_card_content_comes_from_the_model(tmp_path):
    from transformers import TrainingArguments

    model = _fixed("bert", sparsity=0.6)
    report = hs.sparsity_report(model)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, max_steps=17, hub_token=TOKEN, report_to=[])
    card = hs.render_model_card(
        model, "google-bert/bert-base-uncased", training_args=args,
        eval_results={"eval_accuracy": 0.8125, "eval_loss": 0.43210987},
        speed=[{"setting": "batch 8 x 128, forward", "dense_ms": 10.0, "sparse_ms": 4.0}], hardware="Test CPU 9000",
        dataset="glue", license="apache-2.0", export="shrink", repo_id="someone/sparse-bert",
    )
    text = card.content
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.library_name == "transformers" and "hf_sparse" in card.data.tags
    assert card.data.datasets == ["glue"] and card.data.license == "apache-2.0"
    # overall sparsity, and one table row per unit group with its numbers
    assert f"{100 * report.sparsity:.1f}% of the prunable parameters" in text
    assert f"({report.prunable_params - report.prunable_params_kept:,} of {report.prunable_params:,})" in text
    kept_total = report.total_params - report.prunable_params + report.prunable_params_kept
    assert f"{kept_total:,} of {report.total_params:,} parameters" in text
    assert f"{100 * report.forward_flops_fraction:.1f}% of the dense model's matmul FLOPs" in text
    for g in report.groups:
        owner = g.name.rpartition(".")[0]
        row = rf"\| `{re.escape(owner)}` \| {g.kind} \| {g.kept} / {g.units} \| {g.params_kept:,} / {g.params:,} \|"
        assert re.search(row, text), g
    assert "Target sparsity: 60.0%" in text and "MLP neurons" in text and "attention heads" in text
    assert "kept parameters" in text  # the budget
    # training arguments: the chosen values, never the token
    assert "| `learning_rate` | `0.0003` |" in text and "| `max_steps` | `17` |" in text
    assert TOKEN not in text and "hub_token" not in text and "output_dir" not in text
    # evaluation, speed with the hardware, usage for the export, citation
    assert "| eval_accuracy | 0.8125 |" in text and "| eval_loss | 0.4321 |" in text
    assert "Measured on Test CPU 9000." in text and "| 10.00 ms | 4.00 ms | 2.50x |" in text
    assert 'hf_sparse.load_sparse_model(snapshot_download("someone/sparse-bert"))' in text
    assert CITATION in text and "2111.05685" in text and "Zhou, Xiao" in text and "NeurIPS" in text
    # no placeholders left
    assert "{{" not in text and "{%" not in text and "None" not in text and "nan" not in text.lower()
    # save_model_card writes README.md that reads back the same
    path = hs.save_model_card(model, tmp_path / "card", base_model="google-bert/bert-base-uncased")
    assert os.path.basename(path) == "README.md" and "## Sparsity" in open(path, encoding="utf-8").read()


def test_card_without_optional_parts():
    model = _fixed("llama")
    text = hs.render_model_card(model).content
    for section in ("## Training", "## Evaluation", "## Speed"):
        assert section not in text
    assert "LlamaForCausalLM.from_pretrained" in text  # plain export usage by default
    assert "base checkpoint was not recorded" in text and "{{" not in text and "None" not in text


def test_card_default_hardware_is_this_machine():
    text = hs.render_model_card(_fixed("opt"), speed={"dense_ms": 3.0, "sparse_ms": 2.0}).content
    assert f"Measured on {hs.describe_hardware()}." in text and "1.50x" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"speed": {"dense_ms": 1.0}}, "'dense_ms' and 'sparse_ms'"),
        ({"speed": {"dense_ms": 1.0, "sparse_ms": 0.0}}, "must be positive"),
        ({"export": "onnx"}, "export must be one of"),
        ({"training_args": 3}, "training_args must be"),
    ],
)
def test_card_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hs.render_model_card(_fixed("opt"), **kwargs)


def test_card_needs_the_sparse_model_or_a_report():
    model = _fixed("opt")
    report = hs.sparsity_report(model)
    plain = hs.unsparsify_model(model)
    with pytest.raises(ValueError, match="sparsified model"):
        hs.render_model_card(plain)
    assert f"{100 * report.sparsity:.1f}%" in hs.render_model_card(plain, report=report).content


class _Upload:
    """Stands in for HfApi.create_repo / upload_folder and records what would be sent."""

    def __init__(self, monkeypatch, fail_with: BaseException | None = None):
        from huggingface_hub import HfApi, constants

        self.calls = []
        self.files = None
        self.readme = None
        self.folder = None
        self.loaded_logits = None
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        recorder = self

        def create_repo(api_self, repo_id, **kwargs):
            recorder.calls.append(("create_repo", repo_id, kwargs))
            if fail_with is not None:
                raise fail_with
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api_self, **kwargs):
            recorder.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            folder = kwargs["folder_path"]
            recorder.folder = folder
            recorder.files = sorted(os.listdir(folder))
            with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
                recorder.readme = f.read()
            return "commit-info"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


@pytest.mark.parametrize(
    "arch, export, expected",
    [
        ("bert", "plain", ["README.md", "config.json", "model.safetensors"]),
        ("bert", "sparse", ["README.md", "config.json", "hf_sparse_dropped.safetensors", "model.safetensors",
                            "sparse_config.json"]),
        ("gpt2", "shrink", ["README.md", "config.json", "generation_config.json", "model.safetensors"]),
    ],
)
def test_push_uploads_exactly_the_export_and_its_card(monkeypatch, caplog, capsys, arch, export, expected):
    upload = _Upload(monkeypatch)
    model = _fixed(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = hs.sparsity_report(model)
    with caplog.at_level(logging.DEBUG):
        info = hs.push_sparse_to_hub(
            model, "someone/tiny-sparse", export=export, token=TOKEN, private=True,
            base_model="someone/tiny-dense", eval_results={"eval_loss": 1.25},
        )
    assert info == "commit-info"
    (name1, repo1, kw1), (name2, repo2, kw2) = upload.calls
    assert (name1, name2) == ("create_repo", "upload_folder") and repo1 == repo2 == "someone/tiny-sparse"
    assert kw1["token"] == TOKEN and kw1["private"] is True and kw1["exist_ok"] is True
    assert kw2["token"] == TOKEN and export in kw2["commit_message"]
    assert upload.files == expected
    assert f"{100 * report.sparsity:.1f}% of the prunable parameters" in upload.readme
    assert "someone/tiny-dense" in upload.readme and "| eval_loss | 1.25 |" in upload.readme
    # the staging folder is gone after the upload, the model in memory is unchanged, the token never shown
    assert not os.path.exists(upload.folder)
    assert hs.is_sparsified(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = capsys.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in out.out and TOKEN not in out.err


def test_push_keeps_a_local_dir_and_it_loads(monkeypatch, tmp_path):
    upload = _Upload(monkeypatch)
    model = _fixed("llama")
    hs.push_sparse_to_hub(model, "someone/tiny-llama", export="shrink", local_dir=tmp_path / "staged")
    assert upload.folder == str(tmp_path / "staged") and os.path.isdir(upload.folder)
    with torch.no_grad():
        got = hs.load_sparse_model(upload.folder)(**tiny_inputs("llama")).logits
        expected = model(**tiny_inputs("llama")).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_push_offline_says_so_and_names_the_way_out(monkeypatch):
    upload = _Upload(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hs.HubOfflineError) as info:
        hs.push_sparse_to_hub(_fixed("opt"), "someone/tiny-opt", token=TOKEN)
    message = str(info.value)
    assert "needs network access" in message and "HF_HUB_OFFLINE" in message
    folder = info.value.folder
    assert folder in message and f"hf upload someone/tiny-opt {folder}" in message
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert TOKEN not in message and upload.calls == []


def _http_client():
    for name in ("httpx2", "httpx"):  # whichever client this huggingface_hub uses
        try:
            return __import__(name)
        except ImportError:
            pass
    pytest.skip("no httpx client installed")


@pytest.mark.parametrize("error", ["transport", "builtin"])
def test_push_connection_error_says_so(monkeypatch, error):
    client = _http_client()
    fail = client.ConnectError("Name or service not known") if error == "transport" else ConnectionRefusedError()
    upload = _Upload(monkeypatch, fail_with=fail)
    with pytest.raises(hs.HubOfflineError, match="connection failed") as info:
        hs.push_sparse_to_hub(_fixed("opt"), "someone/tiny-opt", token=TOKEN)
    assert os.path.isdir(info.value.folder) and "save_sparse_pretrained" in str(info.value)
    assert [c[0] for c in upload.calls] == ["create_repo"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"repo_id": "a/b/c"}, "repo_id must look like"),
        ({"export": "gguf"}, "export must be one of"),
    ],
)
def test_push_bad_arguments(monkeypatch, kwargs, match):
    upload = _Upload(monkeypatch)
    args = {"repo_id": "someone/x", **kwargs}
    with pytest.raises(ValueError, match=match):
        hs.push_sparse_to_hub(_fixed("opt"), **args)
    with pytest.raises(ValueError, match="sparsified model"):
        hs.push_sparse_to_hub(tiny_model("opt"), "someone/x")
    assert upload.calls == []
