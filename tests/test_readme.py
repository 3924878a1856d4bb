"""The README's Python example runs unchanged, and its two set-up commands are the Makefile's targets."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def run_readme_example(heading: str, tmp_path, monkeypatch) -> dict:
    """Run the first Python block under `heading` in `tmp_path`; returns its namespace."""
    section = readme().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    namespace = run_readme_example("## In Python", tmp_path, monkeypatch)
    model = namespace["model"]
    report = namespace["sparsity_report"](model)
    assert str(report) in capsys.readouterr().out  # what it prints is the trained model's report
    assert 0 < report.prunable_params_kept < report.prunable_params
    # the shrunk export is the trained model with exactly the units its mask drops removed: the parameters it lost
    # are the ones the report counts as dropped, and it computes the same logits
    import torch
    from transformers import DataCollatorWithPadding

    import hf_sparse as hs

    exported = hs.load_sparse_model(tmp_path / "outputs" / "example" / "model")
    assert sum(p.numel() for p in exported.parameters()) == (
        report.total_params - (report.prunable_params - report.prunable_params_kept))
    test = namespace["data"]["test"]
    columns = ("input_ids", "token_type_ids", "attention_mask")
    batch = DataCollatorWithPadding(namespace["tokenizer"])([{c: test[i][c] for c in columns} for i in range(8)])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_readme_setup_commands_match_ci():
    text = readme()
    assert "make run" in text and "make test" in text
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "make test" in f.read()
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "recipes/text_classification.py" in makefile


def test_readme_prune_example_runs(tmp_path, monkeypatch):
    namespace = run_readme_example("## Prune a trained model from forward passes only", tmp_path, monkeypatch)
    import torch

    import hf_sparse as hs

    model = namespace["model"]
    assert hs.masks_fixed(model)
    structure = hs.SparseStructure(model)
    assert structure.kept_budget() <= 0.7 * structure.total_budget() + 1e-6
    # the recovery trained the kept units only: the mask it ends with is the mask prune_model fixed, and the
    # shrunk export written before it still loads (with fewer parameters than the dense model)
    exported = hs.load_sparse_model(tmp_path / "outputs" / "pruned")
    dense = namespace["dense"]
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in dense.parameters())
    neurons = [layer.intermediate.dense.out_features for layer in exported.bert.encoder.layer]
    assert neurons == structure.kept_counts()["neuron"]  # the mask after the recovery is the one exported before it
    classifier_before = dict(exported.named_parameters())["classifier.weight"]
    assert not torch.equal(classifier_before, dict(model.named_parameters())["classifier.weight"])  # recovery trained
