"""benchmarks/quality.py end to end in quick mode: the LM task, one seed, dense and hf_sparse (seconds on 2 CPU cores),
and the three baselines."""

import importlib.util
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_quality():
    spec = importlib.util.spec_from_file_location("quality", os.path.join(ROOT, "benchmarks", "quality.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_quality_quick_lm(tmp_path):
    quality = load_quality()
    out = tmp_path / "study"
    argv = ["--quick", "--tasks", "lm", "--seeds", "0", "--methods", "dense", "hf_sparse", "--sparsities", "0.5",
            "--skip_estimator", "--skip_ablations", "--out", str(out)]
    results = quality.main(argv)

    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"meta", "summary", "targets", "runs", "estimator", "ablations"}
    assert saved["meta"]["quick"] is True and saved["meta"]["hardware"]
    runs = saved["runs"]
    expected = {("dense", "main"), ("hf_sparse", "main"), ("hf_sparse", "equal_time")}
    assert {(r["method"], r["tag"]) for r in runs} == expected
    for r in runs:
        for key in ("metric", "eval_loss", "train_seconds", "step_seconds", "flops_vs_dense", "param_sparsity"):
            assert math.isfinite(r[key]), (r["method"], key, r[key])
        assert r["metric_name"] == "perplexity" and r["metric"] > 1.0
    sparse = next(r for r in runs if r["method"] == "hf_sparse" and r["tag"] == "main")
    assert abs(sparse["param_sparsity"] - 0.5) < 0.02
    assert 0.0 < sparse["flops_vs_dense"] < 1.0
    assert set(saved["summary"]["lm"]) == {"dense@0", "hf_sparse@0.5", "hf_sparse@0.5@equal_time"}
    for row in saved["summary"]["lm"].values():
        assert math.isfinite(row["metric_mean"]) and row["n"] == 1
    # the targets are computed, never hand-written: the LM one is decided, the classification ones say why not
    status = {t["target"]: t["status"] for t in saved["targets"]}
    lm = [s for name, s in status.items() if name.startswith("Causal LM at 50%")]
    assert lm and lm[0] in ("MET", "MISSED")
    assert all(s == "NOT EVALUATED" for name, s in status.items() if name.startswith("Classification"))
    report = (out / "results.md").read_text()
    assert "## Targets" in report and "python benchmarks/quality.py --quick" in report
    assert (out / "img" / "quality_lm.png").stat().st_size > 0
    assert results["summary"] == saved["summary"]

    # resumable: a rerun finds every run in the cache and trains nothing
    cached = len(os.listdir(out / "quality_cache"))
    again = quality.main(argv)
    assert len(os.listdir(out / "quality_cache")) == cached
    assert [r["metric"] for r in again["runs"]] == [r["metric"] for r in runs]


def test_quality_quick_lm_baselines(tmp_path):
    """The three baselines' trainers (they lean on SparseTrainer internals): each reaches its sparsity and reports
    the FLOPs proxy of its kind."""
    quality = load_quality()
    out = tmp_path / "baselines"
    results = quality.main(["--quick", "--tasks", "lm", "--seeds", "0", "--methods", "random", "magnitude", "movement",
                            "--sparsities", "0.5", "--skip_estimator", "--skip_ablations", "--no-equal_time",
                            "--out", str(out)])
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"random", "magnitude", "movement"}
    for r in runs.values():
        assert abs(r["param_sparsity"] - 0.5) < 0.02 and math.isfinite(r["metric"]) and r["metric"] > 1.0
    assert runs["movement"]["flops_vs_dense"] == 1.0  # dense backward
    assert runs["random"]["flops_vs_dense"] < runs["magnitude"]["flops_vs_dense"] < 1.0  # magnitude starts dense
    assert all(t["status"] == "NOT EVALUATED" for t in results["targets"])  # no dense runs
