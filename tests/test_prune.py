"""`hf_sparse.prune_model`: structure learned from forward passes only, on every family, exported and reloaded."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ARCHS, VOCAB, assert_same_state, state_snapshot, tiny_inputs, tiny_model

import hf_sparse as hs
from hf_sparse.forward_importance import spread_scores


def _lm_batches(arch: str, n: int = 3, batch: int = 4, seq: int = 8) -> list[dict]:
    out = []
    for i in range(n):
        inputs = tiny_inputs(arch, batch=batch, seq=seq, seed=i)
        out.append(dict(inputs, labels=inputs["input_ids"].clone()))
    return out


def _logits(model, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(arch, batch=2, seq=8, seed=99)).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_model_on_every_family_exports_a_shrunk_model_with_the_same_logits(arch, tmp_path):
    model = tiny_model(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, result = hs.prune_model(model, _lm_batches(arch), hs.SparseConfig(sparsity=0.5), steps=6,
                                    calibration_batches=2, progress=False, return_result=True)
    assert pruned is model and hs.masks_fixed(model)
    structure = hs.SparseStructure(model)
    kept, total = structure.kept_budget(), structure.total_budget()
    assert 0.4 * total < kept <= 0.5 * total + 1e-6  # the top-K fills the budget as closely as the costs allow
    for k, v in weights.items():  # the search never changes a weight
        assert torch.equal(model.state_dict()[k], v), k
    assert result.forward_passes == 2 + 2 + 6 * 4 + 2  # calibration, start check, 6 steps x 4 samples, final check
    assert [row["step"] for row in result.log] == [6]
    expected = _logits(model, arch)
    hs.export_model(model, tmp_path / "shrunk", export="shrink")
    reloaded = hs.load_sparse_model(tmp_path / "shrunk")
    torch.testing.assert_close(_logits(reloaded, arch), expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(v.numel() for v in weights.values())


def test_no_backward_is_ever_called(monkeypatch):
    def refuse(name):
        def refused(*args, **kwargs):
            raise AssertionError(f"prune_model called {name}")
        return refused

    monkeypatch.setattr(torch.Tensor, "backward", refuse("Tensor.backward"))
    monkeypatch.setattr(torch.autograd, "backward", refuse("torch.autograd.backward"))
    monkeypatch.setattr(torch.autograd, "grad", refuse("torch.autograd.grad"))
    model = tiny_model("llama")
    hs.prune_model(model, _lm_batches("llama"), hs.SparseConfig(sparsity=0.5), steps=4, calibration_batches=1,
                   progress=False)
    assert hs.masks_fixed(model)
    assert all(p.grad is None for p in model.parameters())


def _planted_model():
    """A tiny Llama in which 8 of each MLP's 64 neurons carry most of the output (their down_proj columns x40:
    dropping them raises the loss by 0.07, dropping half of the rest by < 0.001): the
    units whose removal costs the loss most. The activation x weight start would see them (weight norms), so the
    test starts the search blind (start="uniform": every unit at the kept fraction) and asks the losses alone."""
    model = tiny_model("llama")
    planted = torch.arange(0, 64, 8)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, planted] *= 40.0
    return model, planted


def _own_predictions(model, arch: str, n: int, batch: int, seq: int) -> list[dict]:
    """Batches labelled with the dense model's own greedy next tokens: the loss the units are needed for (a random
    model's loss on random tokens is lowest with flat logits, so there every large unit would be a harmful one)."""
    out = []
    for i in range(n):
        inputs = tiny_inputs(arch, batch=batch, seq=seq, seed=i)
        with torch.no_grad():
            predicted = model(**inputs).logits.argmax(-1)
        labels = torch.full_like(predicted, -100)
        labels[:, 1:] = predicted[:, :-1]  # the model shifts labels by one: position t is scored on token t + 1
        out.append(dict(inputs, labels=labels))
    return out


def test_the_forward_only_search_finds_the_units_the_loss_needs():
    model, planted = _planted_model()
    batches = _own_predictions(model, "llama", n=4, batch=8, seq=16)
    hs.prune_model(model, batches, hs.SparseConfig(sparsity=0.5, granularity=["neuron"]), steps=150,
                   learning_rate=0.05, start="uniform", calibration_batches=1, progress=False)
    structure = hs.SparseStructure(model)
    for g in structure:
        kept = g.mask.bool()
        assert bool(kept[planted].all()), g.mask  # 8 of 64 at random: half of them kept
        # the learned probabilities rank them at the top, not just above the cut (measured: 0.45 to 0.6 higher)
        assert g.scores[planted].mean() > g.scores[~torch.isin(torch.arange(64), planted)].mean() + 0.3


def test_spread_scores_keep_every_unit_off_0_and_1_and_follow_the_importance():
    costs = torch.tensor([1.0] * 6 + [4.0] * 3)
    importance = torch.tensor([1.0, 2, 3, 4, 5, 6, 10, 1, 40])
    budget = 0.5 * float(costs.sum())
    s = spread_scores(importance, costs, budget, group_sizes=[6, 3], margin=0.05, temperature=5.0)
    assert float((s * costs).sum()) == pytest.approx(budget, rel=1e-5)
    assert s.min() >= 0.05 - 1e-6 and s.max() <= 0.95 + 1e-6
    assert s.min() < 0.06 and s.max() > 0.94  # so sharp a start would reach 0 and 1 without the margin
    assert torch.equal(torch.argsort(s[:6]), torch.arange(6))  # the order within a group is the importance's
    assert torch.equal(torch.argsort(s[6:]), torch.tensor([1, 0, 2]))


def test_a_model_without_a_loss_is_refused_and_left_unpatched():
    model = tiny_model("gpt2")
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="returned no loss.*loss_fn="):
        hs.prune_model(model, [tiny_inputs("gpt2", batch=2, seq=4)], hs.SparseConfig(), steps=2, progress=False)
    assert not hs.is_sparsified(model)
    assert_same_state(model, before)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 1}, "num_samples must be an integer >= 2"),
    ({"learning_rate": 0.0}, "learning_rate must be a number > 0"),
    ({"score_margin": 0.5}, r"score_margin must be in \[0, 0.5\)"),
    ({"start": "taylor"}, "start must be one of"),
])
def test_bad_arguments_are_refused_before_anything_is_patched(kwargs, message):
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match=message):
        hs.prune_model(model, _lm_batches("gpt2"), hs.SparseConfig(), steps=2, progress=False, **kwargs)
    assert not hs.is_sparsified(model)


def test_a_loss_fn_and_a_card_that_says_forward_only(tmp_path):
    model = tiny_model("bert", head="classification")
    labels = torch.tensor([0, 1, 2, 1])
    batches = [tiny_inputs("bert", batch=4, seq=8, seed=i) for i in range(2)]
    calls = []

    def loss_fn(m, batch):
        calls.append(torch.is_grad_enabled() or m.training)  # no graph kept, no dropout: plain inference
        return torch.nn.functional.cross_entropy(m(**batch).logits, labels)

    model.train()  # a model handed over in training mode is pruned in eval mode and handed back as it came
    hs.prune_model(model, batches, hs.SparseConfig(sparsity=0.3), steps=3, loss_fn=loss_fn, calibration_batches=1,
                   progress=False)
    assert model.training
    assert len(calls) == 1 + 1 + 3 * 4 + 1 and not any(calls)
    card = hs.render_model_card(model, base_model="tiny-bert").content
    assert "forward passes alone" in card and "3 steps" in card and "activation x weight" in card
    assert "forward-only-pruning" in card and "vr-pge" in card
    assert "did not come from that paper's policy-gradient search" not in card


@pytest.mark.parametrize("start, steps, says", [
    ("magnitude", 2, "each unit's weight norm"),
    ("activation", 0, "fixed without a search (0 steps)"),
])
def test_the_card_names_the_start_and_a_search_of_no_steps(start, steps, says):
    model = tiny_model("llama")
    hs.prune_model(model, _lm_batches("llama"), hs.SparseConfig(sparsity=0.5, budget="units"), steps=steps,
                   start=start, calibration_batches=1, progress=False)
    card = hs.render_model_card(model, base_model="tiny-llama").content
    assert says in card
    assert ("one global budget of kept units" in card) == (steps > 0)  # SparseConfig(budget="units")
    assert ("activation x weight" in card) == (start == "activation")
    assert ("did not come from that paper's policy-gradient search" in card) == (steps == 0)
    assert ("vr-pge" in card) == (steps > 0)


def test_a_recovery_run_keeps_the_pruning_record_on_the_card(tmp_path):
    model = tiny_model("llama")
    batches = _lm_batches("llama", n=4)
    hs.prune_model(model, batches, hs.SparseConfig(sparsity=0.5), steps=2, calibration_batches=1, progress=False)
    args = hs.SparseTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                      report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    data = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    hs.SparseTrainer(model=model, args=args, train_dataset=data).train()
    card = hs.render_model_card(model, base_model="tiny-llama").content
    assert "forward passes alone" in card and "2 training steps" in card and "recovery" in card


def test_the_cli_prunes_a_saved_classifier_from_a_csv(tmp_path):
    from transformers import BertTokenizerFast

    from hf_sparse.cli import main

    model = tiny_model("bert", head="classification", num_labels=2)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(tmp_path / "model")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "model")
    rows = ["text,label"] + [f"w{i} w{i + 1} w{i + 2},{i % 2}" for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = main(["prune", "--model", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.csv"),
                 "--sparsity", "0.5", "--steps", "3", "--batch_size", "4", "--calibration_batches", "2",
                 "--output_dir", str(out), "--export", "shrink"])
    assert code == 0
    assert {"README.md", "prune_result.json", "config.json"} <= set(os.listdir(out))
    result = json.loads((out / "prune_result.json").read_text())
    assert result["steps"] == 3 and result["arguments"]["sparsity"] == 0.5
    assert "forward passes alone" in (out / "README.md").read_text()
    shrunk = hs.load_sparse_model(out)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="--label_column 'missing' is not a column"):
        main(["prune", "--model", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.csv"),
              "--label_column", "missing", "--output_dir", str(tmp_path / "out2")])


def test_the_search_keeps_the_expected_kept_cost_at_the_budget_from_below_too():
    from hf_sparse.prune import _onto_budget

    costs = torch.tensor([1.0, 1.0, 4.0, 4.0])
    budget = 5.0
    below = torch.tensor([0.1, 0.2, 0.3, 0.2])  # kept cost 2.3: the capped simplex would leave it there
    s = _onto_budget(below, costs, budget, margin=0.02)
    assert float((s * costs).sum()) == pytest.approx(budget, rel=1e-6)
    assert torch.allclose(s - below, (s - below)[0].expand(4))  # one shift for every unit: the order is kept
    above = torch.tensor([0.9, 0.9, 0.9, 0.9])
    s = _onto_budget(above, costs, budget, margin=0.02)
    assert float((s * costs).sum()) == pytest.approx(budget, rel=1e-6)


def test_the_cli_prunes_a_causal_lm_from_a_text_file(tmp_path):
    import transformers as tf

    from hf_sparse.cli import main
    from hf_sparse.tasks.lm import train_bpe_tokenizer

    lines = [f"line {i} of the play, spoken by the {i % 3}rd player" for i in range(60)]
    tokenizer = train_bpe_tokenizer(lines, vocab_size=300)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                            tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    model = tf.LlamaForCausalLM(config)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    code = main(["prune", "--model", str(tmp_path / "lm"), "--train_file", str(tmp_path / "train.txt"),
                 "--sparsity", "0.5", "--steps", "2", "--batch_size", "4", "--calibration_batches", "1",
                 "--max_length", "16", "--output_dir", str(tmp_path / "out"), "--export", "plain"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "prune_result.json").read_text())
    assert result["forward_passes"] == 1 + 1 + 2 * 4 + 1 and result["dense_loss"] > 0
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a plain export: no hf_sparse needed
    zero_columns = (plain.model.layers[0].mlp.down_proj.weight.abs().sum(0) == 0).sum()
    assert 0 < int(zero_columns) < 64  # the dropped neurons are explicit zeros


def test_a_dead_unit_does_not_flatten_the_start_of_the_live_ones():
    costs = torch.ones(64)
    importance = torch.linspace(1.0, 10.0, 64)
    live = spread_scores(importance, costs, 32.0, group_sizes=[64], temperature=3.0)
    importance[:2] = 0.0  # two neurons never active
    with_dead = spread_scores(importance, costs, 32.0, group_sizes=[64], temperature=3.0)
    assert float(with_dead[2:].max() - with_dead[2:].min()) > 0.8 * float(live.max() - live.min())
    assert float(with_dead[:2].max()) <= float(with_dead[2:].min()) + 1e-6  # dead units at the bottom


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activation_x_weight_importance_matches_a_hand_computation(arch):
    from hf_sparse.forward_importance import ActivationImportance
    from hf_sparse.layers import SparseLinear

    for granularity in (["neuron", "head"], ["weight"]):
        model = tiny_model(arch)
        hs.sparsify_model(model, hs.SparseConfig(granularity=granularity))
        structure = hs.SparseStructure(model)
        reader = ActivationImportance(model, structure)
        seen = {}
        layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
        hooks = [m.register_forward_pre_hook(lambda m, a: seen.setdefault(id(m), []).append(a[0].detach()))
                 for m in layers]
        inputs = tiny_inputs(arch, batch=3, seq=5)
        with torch.no_grad(), reader.track():
            model(**inputs)
        for h in hooks:
            h.remove()
        got = dict(zip([id(g) for g in structure], structure.split(reader.flat())))
        for layer in layers:
            if granularity == ["weight"] or layer.role == "in":
                x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[id(layer)]]).double()
                x_norm = x.pow(2).sum(0).sqrt()
                w = layer.weight.detach().double()
                if granularity == ["weight"]:  # |W_ij| * ||X_j||, one unit per stored weight
                    expected = (w.abs() * (x_norm[:, None] if layer.transposed else x_norm[None, :])).reshape(-1)
                else:  # sum over a unit's input columns of ||X_col|| * ||W[:, col]||
                    w = w.t() if layer.transposed else w
                    expected = (w.pow(2).sum(0).sqrt() * x_norm).view(layer.group.num_units, -1).sum(1)
                torch.testing.assert_close(got[id(layer.group)], expected, rtol=1e-6, atol=1e-9)  # (x^2 summed in float32)


def _bpe_classifier(tmp_path, arch: str = "gpt2", num_labels: int = 2, label_names=None):
    import transformers as tf

    from hf_sparse.tasks.lm import train_bpe_tokenizer

    lines = [f"verse {i} spoken by the {i % 3}rd player" for i in range(40)]
    tokenizer = train_bpe_tokenizer(lines, vocab_size=300)
    config = tf.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                           num_labels=num_labels, pad_token_id=None)
    if label_names:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    model = tf.GPT2ForSequenceClassification(config)
    model.config.architectures = ["GPT2ForSequenceClassification"]
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    return lines


def test_the_cli_prunes_a_gpt2_classifier_whose_config_has_no_pad_token(tmp_path, monkeypatch):
    from hf_sparse.cli import main

    lines = _bpe_classifier(tmp_path)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(lines)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # "clf": a relative local folder, spelled like a Hub id
    assert main(["prune", "--model", "clf", "--train_file", str(tmp_path / "train.jsonl"),
                 "--steps", "2", "--batch_size", "4", "--calibration_batches", "1", "--output_dir", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "pruned with hf_sparse from forward passes only" in card
    assert "base_model:" not in card.split("---")[1]  # a local folder is not a Hub id in the card's metadata
    rows[3]["label"] = 5
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="label 5 .* is not a class id of a model with 2 labels"):
        main(["prune", "--model", str(tmp_path / "clf"), "--train_file", str(tmp_path / "bad.jsonl"),
              "--output_dir", str(tmp_path / "out2")])


def test_class_names_of_the_data_are_mapped_to_the_model_s_ids():
    import datasets

    from hf_sparse.prune_cli import _class_label_map

    data = datasets.Dataset.from_dict({"label": [0, 1, 2]}, features=datasets.Features(
        {"label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])}))
    model_labels = {"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2}
    assert _class_label_map(data, "label", model_labels) == {0: 2, 1: 1, 2: 0}
    assert _class_label_map(data, "label", {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}) is None  # unnamed: ids
    with pytest.raises(ValueError, match="have no match"):
        _class_label_map(data, "label", {"yes": 0, "no": 1, "maybe": 2})


def _examples(n: int, seq: int = 6) -> list[dict]:
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (seq,), generator=torch.Generator().manual_seed(i))
        out.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids.clone()})
    return out


def test_the_search_never_sees_the_calibration_examples_even_after_an_epoch():
    model = tiny_model("llama")
    calls = []

    def loss_fn(m, batch):
        calls.append({tuple(row.tolist()) for row in batch["input_ids"]})
        return m(**batch).loss

    hs.prune_model(model, _examples(16), hs.SparseConfig(sparsity=0.5), steps=5, num_samples=2, batch_size=4,
                   calibration_batches=2, loss_fn=loss_fn, progress=False)
    calibration = calls[0] | calls[1]
    searched = set().union(*calls[4:-2])  # after 2 dense and 2 start-check forwards, before the final check
    assert len(calibration) == 8 and len(searched) == 8  # 5 steps of 4 examples: the 8 others, twice and more
    assert not calibration & searched
    assert calls[-2] | calls[-1] == calibration  # the final mask is compared on the calibration batches


def test_an_iterable_dataset_of_examples_is_batched_and_a_dict_of_splits_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(_examples(12))

    model = tiny_model("llama")
    shapes = []

    def loss_fn(m, batch):
        shapes.append(tuple(batch["input_ids"].shape))
        return m(**batch).loss

    hs.prune_model(model, Stream(), hs.SparseConfig(sparsity=0.5), steps=4, batch_size=4, calibration_batches=1,
                   loss_fn=loss_fn, progress=False)
    assert set(shapes) == {(4, 6)}  # batches of 4 examples, read again from the start when the stream ended
    with pytest.raises(ValueError, match=r"dict of splits \['test', 'train'\]; pass one split"):
        hs.prune_model(tiny_model("llama"), {"train": _examples(4), "test": _examples(4)}, steps=1, progress=False)


def test_the_trainer_can_choose_its_mask_by_a_forward_only_search_at_the_end_of_its_warmup(tmp_path):
    def run(search_steps: int):
        model = tiny_model("llama")
        batches = _lm_batches("llama", n=4)
        data = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
        args = hs.SparseTrainingArguments(output_dir=str(tmp_path / str(search_steps)), max_steps=4,
                                          per_device_train_batch_size=4, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, seed=0, importance_warmup=0.5,
                                          budget_schedule_start=0.5, budget_schedule_end=0.5, fix_masks_at=0.5,
                                          forward_search_steps=search_steps)
        trainer = hs.SparseTrainer(model=model, args=args, train_dataset=data,
                                   sparse_config=hs.SparseConfig(sparsity=0.5))
        trainer.train()
        return model, trainer

    plain, _ = run(0)
    searched, trainer = run(6)
    assert trainer.structure_run()["forward_search_steps"] == 6
    moved = hs.SparseStructure(searched).scores()
    assert not torch.equal(moved, hs.SparseStructure(plain).scores())  # the search chose the probabilities
    assert bool(((moved > 0) & (moved < 1)).all())  # spread off 0 and 1 (the ramp start leaves most at the bounds)
    card = hs.render_model_card(searched, base_model="tiny-llama").content
    assert "6 steps of a" in card and "forward-only" in card and "vr-pge" in card
    with pytest.raises(ValueError, match="forward_search_steps searches from the Taylor importance"):
        hs.SparseTrainingArguments(output_dir=str(tmp_path), importance_warmup=0.0, budget_schedule_start=0.0,
                                   budget_schedule_end=0.0, fix_masks_at=0.0, forward_search_steps=3)
