"""SparseConfig(uniform_layers=True): every layer keeps the same number of heads and of MLP neurons, in the
deterministic top-K mask (fix_masks, the trainer's fixed / evaluation mask, sparsity_report), and its shrunk
export is a standard config that loads without hf_sparse (checked in a subprocess that never imports it)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import hf_sparse as hs
from hf_sparse.structure import topk_mask

# --- the config -----------------------------------------------------------------------------------------------


def test_config_field_validates_and_round_trips(tmp_path):
    assert hs.SparseConfig().uniform_layers is False
    config = hs.SparseConfig(sparsity=0.4, uniform_layers=True)
    assert hs.SparseConfig.from_dict(json.loads(config.to_json_string())) == config
    config.save_pretrained(tmp_path)
    assert hs.SparseConfig.from_pretrained(tmp_path).uniform_layers is True
    with pytest.raises(ValueError, match="uniform_layers must be True or False"):
        hs.SparseConfig(uniform_layers="yes")
    with pytest.raises(ValueError, match="uniform_layers=True needs structured units"):
        hs.SparseConfig(granularity="weight", uniform_layers=True)


# --- the top-K mask -------------------------------------------------------------------------------------------


def _skewed_scores(structure, seed=0):
    """Scores whose free top-K empties the later layers (the earlier ones score higher), so a uniform mask
    differs from it: the later group of each kind scores below every unit of the earlier one."""
    gen = torch.Generator().manual_seed(seed)
    parts, seen = [], {}
    for g in structure:
        layer = seen.setdefault(g.kind, 0)
        seen[g.kind] += 1
        parts.append(0.9 / (1 + layer) - 0.3 * torch.rand(g.num_units, generator=gen))
    return torch.cat(parts).clamp(0.01, 1.0)


def _served_scores(structure, seed=0):
    """Skewed neuron scores; in every attention the better half of the heads (a different half in each layer)
    scores above every neuron, the other half below: half the heads and the neurons that fit are kept."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for g, s in zip(structure, structure.split(_skewed_scores(structure, seed))):
        if g.kind == "head":
            s = torch.where(torch.randperm(g.num_units, generator=gen) < g.num_units // 2, 0.95, 0.02)
        parts.append(s)
    return torch.cat(parts)


def _sparse(arch, head="lm", **config):
    return hs.sparsify_model(tiny_model(arch, head=head), hs.SparseConfig(**config))


def _level_cost(structure, costs, kind):
    """The cost of one more unit in every group of `kind` (equal unit costs within a group)."""
    return sum(float(c[0]) for g, c in zip(structure, structure.split(costs)) if g.kind == kind)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_topk_keeps_equal_counts_and_fills_the_budget(arch, sparsity):
    model = _sparse(arch, sparsity=sparsity, uniform_layers=True)
    structure = hs.SparseStructure(model)
    structure.set_scores(_skewed_scores(structure))
    costs = structure.costs("params")
    budget = (1 - sparsity) * float(costs.sum())
    free = structure.topk_mask(costs, budget)
    assert any(len(set(c)) > 1 for c in structure.kept_counts(free).values())  # the case is not trivially uniform

    mask = hs.fix_masks(model)
    counts = structure.kept_counts(mask)
    assert all(len(set(c)) == 1 for c in counts.values()), counts
    assert torch.equal(mask, structure.topk_mask(costs, budget, uniform=True))
    spent = float((mask.double() * costs.double()).sum())
    assert spent <= budget * (1 + 1e-9)
    # filled: no kind can keep one more unit in every layer within the budget
    for kind, c in counts.items():
        units = max(g.num_units for g in structure if g.kind == kind)
        assert c[0] == units or spent + _level_cost(structure, costs, kind) > budget, (kind, c, spent, budget)
    # each layer keeps its own best units
    for g, m, s in zip(structure, structure.split(mask), structure.split(structure.scores())):
        if 0 < m.sum() < g.num_units:
            assert s[m.bool()].min() >= s[~m.bool()].max()


def test_the_split_between_heads_and_neurons_follows_the_scores():
    # every head scores above every neuron: the heads are kept whole first, the neurons fill what is left; and
    # the other way round
    model = _sparse("llama", sparsity=0.5, uniform_layers=True)
    structure = hs.SparseStructure(model)
    costs = structure.costs("params")
    budget = 0.5 * float(costs.sum())
    rand = torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)) * 0.1
    kinds = torch.cat([torch.full((g.num_units,), float(g.kind == "head")) for g in structure])
    heads_first = structure.kept_counts(topk_mask(0.5 + 0.4 * kinds + rand, costs, budget, structure.sizes,
                                                  structure.kinds()))
    neurons_first = structure.kept_counts(topk_mask(0.9 - 0.4 * kinds + rand, costs, budget, structure.sizes,
                                                    structure.kinds()))
    assert heads_first["head"] == [2, 2] and heads_first["neuron"] == [16, 16]  # 6144 + 16*96*2 = 9216
    assert neurons_first["neuron"] == [48, 48] and neurons_first["head"] == [0, 0]  # 48*96*2 = 9216


def test_llama_keeps_only_head_counts_its_config_accepts():
    # LlamaConfig refuses num_attention_heads that does not divide hidden_size (32): of 4 key/value heads,
    # 3 is not admissible; Mistral's config takes any count
    import transformers as tf

    def build(cls):
        config = cls(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
        torch.manual_seed(0)
        return tf.AutoModelForCausalLM.from_config(config).eval()

    results = {}
    for name, cls in (("llama", tf.LlamaConfig), ("mistral", tf.MistralConfig)):
        model = hs.sparsify_model(build(cls), hs.SparseConfig(sparsity=0.66, uniform_layers=True))
        structure = hs.SparseStructure(model)
        heads = [g for g in structure if g.kind == "head"]
        # heads score far above neurons: the mask keeps as many heads as the budget allows. Budget 0.34 * 20480 =
        # 6963; a head in both layers costs 2048: 3 fit (6144), 4 do not (8192)
        structure.set_scores(torch.cat([torch.full((g.num_units,), 0.9 if g.kind == "head" else 0.2) -
                                        0.01 * torch.arange(g.num_units) / g.num_units for g in structure]))
        results[name] = (heads[0].admissible_counts, structure.kept_counts(hs.fix_masks(model))["head"])
    assert results["llama"] == ([1, 2, 4], [2, 2])
    assert results["mistral"] == (None, [3, 3])


def test_fix_masks_refuses_sampling_and_a_budget_below_one_level():
    model = _sparse("llama", sparsity=0.5, uniform_layers=True)
    structure = hs.SparseStructure(model)
    structure.set_scores(_skewed_scores(structure))
    with pytest.raises(ValueError, match="method='topk'"):
        hs.fix_masks(model, method="sample", score_fn=lambda m: 0.0)
    # one unit fits (a neuron costs 96; 0.008 * 18432 = 147), one neuron in each of the 2 layers (192) does not
    with pytest.raises(ValueError, match="same smallest number of units in every layer"):
        hs.fix_masks(model, sparsity=0.992)
    with pytest.raises(ValueError, match="same smallest number of units in every layer"):
        _sparse("llama", sparsity=0.992, uniform_layers=True)
    hs.fix_masks(model, sparsity=0.98)  # 368: one level fits


def test_sparsity_report_shows_the_uniform_counts():
    model = _sparse("bert", sparsity=0.5, uniform_layers=True)
    structure = hs.SparseStructure(model)
    structure.set_scores(_skewed_scores(structure))
    costs = structure.costs("params")
    free = structure.kept_counts(structure.topk_mask(costs, 0.5 * float(costs.sum())))
    before = hs.sparsity_report(model)  # its top-K column is the uniform mask fix_masks will keep, not the free one
    topk = {kind: [g.kept_topk for g in before.groups if g.kind == kind] for kind in ("head", "neuron")}
    assert all(len(set(c)) == 1 for c in topk.values()) and topk != free, (topk, free)
    assert "top-K" in before.uniform_counts()["neuron"]  # the current mask (all kept) is not it yet
    hs.fix_masks(model)
    report = hs.sparsity_report(model)
    assert report.uniform_layers is True and report.to_dict()["uniform_layers"] is True
    assert [g.kept for g in report.groups] == [g.kept_topk for g in before.groups]
    line = (f"uniform layers: head: {topk['head'][0]} of 4 in every layer | neuron: {topk['neuron'][0]} of 64 in "
            "every layer")
    assert line in str(report).splitlines()
    assert "uniform layers" not in str(hs.sparsity_report(_sparse("bert", sparsity=0.5)))


# --- the search ---------------------------------------------------------------------------------------------------


def _train(tmp_path, monkeypatch, **overrides):
    from trainer_helpers import arithmetic_sequences, search_args, tiny_llama

    import hf_sparse.trainer as trainer_module

    sampled = []
    real_sample = trainer_module.sample_masks

    def recording(*args, **kwargs):
        masks = real_sample(*args, **kwargs)
        sampled.append(masks.clone())
        return masks

    monkeypatch.setattr(trainer_module, "sample_masks", recording)
    args = search_args(tmp_path, max_steps=10, logging_steps=5, per_device_train_batch_size=4, **overrides)
    trainer = hs.SparseTrainer(model=tiny_llama(), args=args, train_dataset=arithmetic_sequences(64),
                               sparse_config=hs.SparseConfig(sparsity=0.5, uniform_layers=True))
    trainer.train()
    return trainer, sampled


def test_the_search_samples_freely_and_fixes_a_uniform_mask(tmp_path, monkeypatch):
    trainer, sampled = _train(tmp_path, monkeypatch, fix_masks_at=0.6)  # search steps 0-5, fixed from 6
    structure = trainer.structure
    assert hs.masks_fixed(trainer.model)
    counts = structure.kept_counts()
    assert all(len(set(c)) == 1 for c in counts.values()), counts
    assert torch.equal(structure.masks(), trainer.topk_mask())
    assert structure.kept_budget() <= trainer._target_budget * (1 + 1e-9)
    # the masks drawn while searching were not forced to equal counts
    draws = torch.cat(sampled)
    assert any(len(set(c)) > 1 for m in draws for c in structure.kept_counts(m).values())


def test_the_informed_start_ranks_within_layers(tmp_path, monkeypatch):
    import hf_sparse.trainer_importance as trainer_module

    seen = []
    real = trainer_module.scores_from_importance

    def recording(*args, **kwargs):
        seen.append(kwargs.get("group_sizes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "scores_from_importance", recording)
    trainer, _ = _train(tmp_path, monkeypatch, importance_warmup=0.5, budget_schedule_start=0.5,
                        budget_schedule_end=0.5, fix_masks_at=0.5, importance_ranking="global")
    assert seen == [trainer.structure.sizes]  # "global" is overridden: within each layer
    counts = trainer.structure.kept_counts()
    assert hs.masks_fixed(trainer.model) and all(len(set(c)) == 1 for c in counts.values()), counts


# --- the standard export, loaded without hf_sparse -------------------------------------------------------------

LOADER = r"""
import json, sys
import torch, transformers

jobs = json.loads(sys.argv[1])
out = {"logits": {}, "pipeline": {}}
for name, job in jobs.items():
    model = getattr(transformers, job["auto"]).from_pretrained(job["folder"]).eval()
    inputs = {k: torch.tensor(v) for k, v in job["inputs"].items()}
    with torch.no_grad():
        out["logits"][name] = model(**inputs).logits.tolist()
    out["parameters_" + name] = sum(p.numel() for p in model.parameters())
    if job.get("pipeline") == "text-classification":
        pipe = transformers.pipeline("text-classification", model=job["folder"], tokenizer=job["folder"])
        out["pipeline"][name] = pipe(job["text"], function_to_apply="none", top_k=None)
    elif job.get("pipeline") == "text-generation":
        pipe = transformers.pipeline("text-generation", model=job["folder"], tokenizer=job["folder"])
        out["pipeline"][name] = pipe(job["text"], max_new_tokens=4, do_sample=False, return_tensors=True)
out["hf_sparse_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "hf_sparse")
json.dump(out, open(sys.argv[2], "w"))
"""


def _word_tokenizer(pad_id: int):
    """A whitespace word-level tokenizer: "<5> <7>" -> [5, 7] (no special tokens added), vocabulary <0>..<99>
    (no word inside another: an added special token such as the pad token is matched inside words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(100)}, unk_token="<2>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<2>", pad_token=f"<{pad_id}>")


CASES = {  # name: (arch, head, Auto class, pipeline)
    "llama": ("llama", "lm", "AutoModelForCausalLM", "text-generation"),
    "qwen2": ("qwen2", "lm", "AutoModelForCausalLM", None),
    "bert": ("bert", "classification", "AutoModelForSequenceClassification", "text-classification"),
    "gpt2": ("gpt2", "lm", "AutoModelForCausalLM", None),
    "opt": ("opt", "lm", "AutoModelForCausalLM", None),
}
TEXT_IDS = [5, 17, 9, 33, 41, 8]
TEXT = " ".join(f"<{i}>" for i in TEXT_IDS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Each case trained-like (skewed scores), fixed, exported with export="shrink", and loaded in a subprocess
    with transformers alone. Returns (sparse models, their logits and greedy continuations, folders, configs,
    log records of the exports, the subprocess's results)."""
    root = tmp_path_factory.mktemp("served")
    jobs, expected, configs, models, records = {}, {}, {}, {}, {}
    ids = torch.tensor([TEXT_IDS])
    for name, (arch, head, auto, pipe) in CASES.items():
        model = _sparse(arch, head=head, sparsity=0.5, uniform_layers=True)
        structure = hs.SparseStructure(model)
        structure.set_scores(_served_scores(structure))
        hs.fix_masks(model)
        inputs = tiny_inputs(arch)
        with torch.no_grad():
            expected[name] = {"logits": model(**inputs).logits}
            if pipe == "text-classification":
                expected[name]["text"] = model(input_ids=ids).logits[0]
            elif pipe == "text-generation":
                expected[name]["text"] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                                        do_sample=False)[0].tolist()
        folder = root / name
        handler = _Records()
        logging.getLogger("hf_sparse.export").addHandler(handler)
        try:
            hs.export_model(model, folder, export="shrink")
        finally:
            logging.getLogger("hf_sparse.export").removeHandler(handler)
        records[name] = handler.messages
        if pipe is not None:
            _word_tokenizer(model.config.pad_token_id).save_pretrained(folder)
        configs[name] = json.loads((folder / "config.json").read_text())
        jobs[name] = {"auto": auto, "folder": str(folder), "pipeline": pipe, "text": TEXT,
                      "inputs": {k: v.tolist() for k, v in inputs.items()}}
        models[name] = model
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result_path = root / "result.json"
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(result_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return models, expected, configs, records, json.loads(result_path.read_text())


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_loader_process_never_imported_hf_sparse(served):
    assert served[4]["hf_sparse_imported"] == []


@pytest.mark.parametrize("name", list(CASES))
def test_plain_from_pretrained_gives_the_sparse_logits(served, name):
    _, expected, configs, _, result = served
    assert "hf_sparse_shapes" not in configs[name]
    torch.testing.assert_close(torch.tensor(result["logits"][name]), expected[name]["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_llama_family_config_has_fewer_heads_with_explicit_head_dim(served, name):
    _, _, configs, records, result = served
    config = configs[name]
    assert config["intermediate_size"] == 32 and config["num_key_value_heads"] == 1
    assert config["num_attention_heads"] == 2 and config["head_dim"] == 8  # the dense 4 heads of 8, 2 kv groups
    assert not any("keep their full size" in m for m in records[name])
    dense = sum(p.numel() for p in tiny_model(name).parameters())
    assert result["parameters_" + name] < dense


@pytest.mark.parametrize("name", ["bert", "gpt2", "opt"])
def test_derived_head_dim_families_keep_their_heads_zeroed_and_say_why(served, name):
    _, _, configs, records, _ = served
    config = configs[name]
    mlp = config[{"bert": "intermediate_size", "gpt2": "n_inner", "opt": "ffn_dim"}[name]]
    assert mlp == 32
    assert config.get("num_attention_heads", config.get("n_head")) == 4
    assert any("attention heads keep their full size" in m and "derives the head size" in m for m in records[name])


def test_pipelines_load_the_export(served):
    _, expected, _, _, result = served
    scores = {d["label"]: d["score"] for d in result["pipeline"]["bert"]}
    logits = expected["bert"]["text"]
    assert scores.keys() == {"LABEL_0", "LABEL_1", "LABEL_2"}
    torch.testing.assert_close(torch.tensor([scores[f"LABEL_{i}"] for i in range(3)]), logits, atol=1e-5, rtol=1e-5)
    assert result["pipeline"]["llama"][0]["generated_token_ids"] == expected["llama"]["text"]


# --- what stays on hf_sparse's loader -----------------------------------------------------------------------------


def test_an_unexpressible_layout_falls_back_to_zeroed_units(tmp_path, caplog):
    # one layer's MLP excluded from pruning: intermediate_size cannot say both sizes, so the MLPs stay whole
    model = hs.sparsify_model(tiny_model("llama"), hs.SparseConfig(
        sparsity=0.5, uniform_layers=True, exclude_modules=["model.layers.1.mlp.down_proj"]))
    structure = hs.SparseStructure(model)
    structure.set_scores(_skewed_scores(structure))
    hs.fix_masks(model)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = model(**inputs).logits
    with caplog.at_level(logging.WARNING, logger="hf_sparse.export"):
        hs.export_model(model, tmp_path / "m", export="shrink")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    heads = structure.kept_counts()["head"][0]
    assert "hf_sparse_shapes" not in config and config["intermediate_size"] == 64
    assert config["num_key_value_heads"] == (heads or 2)
    assert "1 of the model's 2 layers have prunable MLP neurons" in caplog.text
    import transformers as tf

    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ref, atol=1e-5, rtol=1e-5)


def test_heterogeneous_exports_keep_hf_sparse_shapes(tmp_path):
    model = _sparse("llama", sparsity=0.5)
    structure = hs.SparseStructure(model)
    structure.set_scores(_skewed_scores(structure))
    hs.fix_masks(model)
    hs.export_model(model, tmp_path / "m", export="shrink")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "hf_sparse_shapes" in config and "per_layer_config" not in config
    assert config["intermediate_size"] == 64


def test_no_family_in_the_table_builds_from_per_layer_config():
    """Transformers 5.25 reads `per_layer_config` only in a few families (Gemma 4, ...); for every family of the
    architecture table a per-layer intermediate_size makes the model's constructor raise
    AmbiguousGlobalPerLayerAttributeError. When one of them starts reading it, heterogeneous exports can write
    it (docs/export.md): this test then fails as the reminder."""
    import importlib.util

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    for model_type in hs.ARCHITECTURES:
        module = model_type_to_module_name(model_type)
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
        with open(spec.origin, encoding="utf-8") as f:
            assert "per_layer_config" not in f.read(), model_type
