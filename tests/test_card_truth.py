"""The model card says which structure method actually ran, from what `SparseTrainer` counted (or what the caller
says, or, failing both, what the training arguments plan); and the `sparse/` logs report the sparsity the steps
computed (0 while the warm-up trains dense), with the target under its own key. Tiny Llama runs of 8 steps."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model
from trainer_helpers import arithmetic_sequences, tiny_llama

import hf_sparse as hs
from hf_sparse import SparseConfig, SparseTrainer, SparseTrainingArguments
from hf_sparse.training_args import PAPER_SCHEDULE

# the default schedule, and one with a search: informed start for 2 of 8 steps, search to step 6, fixed after
SEARCH = {"importance_warmup": 0.25, "budget_schedule_start": 0.25, "budget_schedule_end": 0.25, "fix_masks_at": 0.75}


def _args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
            "logging_steps": 1, "save_strategy": "no", "report_to": [], "disable_tqdm": True, "seed": 0,
            "use_cpu": True}
    return SparseTrainingArguments(**{**base, **kw})


def _train(tmp_path, **kw):
    model = tiny_llama()
    trainer = SparseTrainer(model=model, args=_args(tmp_path, **kw), sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(64))
    trainer.train()
    hs.fix_masks(model)
    return trainer, model


def _method_section(text: str) -> str:
    return text.split("## How the structure was chosen", 1)[1].split("## Citation", 1)[0]


def test_a_default_run_card_names_the_forward_only_allocation_search(tmp_path):
    trainer, model = _train(tmp_path)  # the defaults: dense half, the allocation search, the searched mask fixed
    run = trainer.structure_run()
    assert (run["importance_warmup_steps"], run["search_steps"], run["fixed_steps"]) == (4, 0, 4)
    assert run["forward_search"] == "allocation" and run["forward_search_steps"] == 16
    card = hs.render_model_card(model, "someone/base", training_args=trainer.args)
    assert {"taylor-importance", "vr-pge", "forward-only-search"} <= set(card.data.tags)
    method = _method_section(card.content)
    assert "16 steps of a\nforward-only search" in method
    assert "pairs of masks that keep more or fewer of each group's" in method and "each group's share of the one budget" in method
    assert "VR-PGE policy-gradient estimator" in method and "| forward-only search at the end of the warm-up (masked forwards, weights frozen) | 16 |" in method
    # the forward-only search is VR-PGE whatever the training-time search's estimator is set to
    other = _method_section(hs.render_model_card(model, structure_run={**run, "estimator": "disarm"}).content)
    assert "VR-PGE policy-gradient estimator" in other and "DisARM" not in other


def test_a_taylor_only_run_card_says_taylor_and_claims_no_vrpge(tmp_path):
    trainer, model = _train(tmp_path, forward_search_steps=0)  # dense half, then the informed mask fixed at once
    run = trainer.structure_run()
    assert (run["importance_warmup_steps"], run["search_steps"], run["fixed_steps"]) == (4, 0, 4)
    assert run["structure_updates"] == 0
    card = hs.render_model_card(model, "someone/base", training_args=trainer.args)  # nothing said about the method
    text = card.content
    assert "taylor-importance" in card.data.tags and "vr-pge" not in card.data.tags
    assert "chosen by the Taylor importance read in a dense warm-up" in text
    assert "counted by SparseTrainer during training" in text
    method = _method_section(text)
    assert "No policy-gradient (VR-PGE) step ran" in method
    assert "policy-gradient estimator" not in text and "VR-PGE search" not in text
    assert "| dense warm-up (every unit trained; Taylor importance read from the backward) | 4 |" in method
    assert "VR-PGE updates of them) | 0 |" in method and "| fixed mask (the kept units trained alone) | 4 |" in method
    assert "did not come from that paper's policy-gradient search" in text
    assert "{{" not in text and "None" not in text


def test_a_run_with_a_search_card_says_vrpge(tmp_path):
    trainer, model = _train(tmp_path, **SEARCH)
    run = trainer.structure_run()
    assert (run["importance_warmup_steps"], run["search_steps"], run["fixed_steps"]) == (2, 4, 2)
    assert run["structure_updates"] == 4 and run["skipped_updates"] == 0
    card = hs.render_model_card(model, eval_results={"perplexity": 51.5},
                                speed={"setting": "training step", "dense_ms": 4.0, "sparse_ms": 2.0})
    text = card.content
    assert "vr-pge" in card.data.tags and "taylor-importance" in card.data.tags
    assert "chosen by the VR-PGE search, after an informed start from the Taylor importance" in text
    method = _method_section(text)
    assert "with the VR-PGE policy-gradient estimator" in method and "(4 updates)" in method
    assert "VR-PGE updates of them) | 4 |" in method and "No policy-gradient" not in method
    # measured quality and speed are named at the top of the card
    assert "Measured: perplexity 51.5; 2.00x the dense speed (training step)" in text
    # DisARM is named as such, never as VR-PGE
    disarm = hs.render_model_card(model, structure_run={**run, "estimator": "disarm"})
    assert "disarm" in disarm.data.tags and "vr-pge" not in disarm.data.tags
    assert "with the DisARM policy-gradient estimator" in disarm.content


def test_the_counts_survive_a_resume(tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    kw = dict(save_strategy="steps", save_steps=3, **SEARCH)
    model = tiny_llama()
    first = SparseTrainer(model=model, args=_args(tmp_path, **kw), sparse_config=SparseConfig(sparsity=0.5),
                          train_dataset=arithmetic_sequences(64), callbacks=[StopAt()])
    first.train()
    again = SparseTrainer(model=tiny_llama(), args=_args(tmp_path, **kw), sparse_config=SparseConfig(sparsity=0.5),
                          train_dataset=arithmetic_sequences(64))
    again.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-3"))
    run = again.structure_run()
    assert (run["importance_warmup_steps"], run["search_steps"], run["fixed_steps"], run["structure_updates"]) == (
        2, 4, 2, 4)


def test_outside_a_trainer_the_card_says_what_the_caller_passes(monkeypatch):
    model = tiny_model("bert")
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.5))
    structure = hs.SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)))
    hs.fix_masks(model)
    # nothing known: no method claimed, no method tag
    card = hs.render_model_card(model)
    assert card.data.tags == ["hf_sparse", "sparse", "pruning"]
    assert "chosen by not recorded" not in card.content and "This card claims no method" in card.content
    assert "did not come from" not in card.content  # not known either way
    # a string: said as given; a method it names is tagged
    card = hs.render_model_card(model, structure_run="magnitude pruning, one shot")
    assert "As stated by whoever rendered this card: magnitude pruning, one shot." in card.content
    assert card.data.tags == ["hf_sparse", "sparse", "pruning"]
    assert "vr-pge" in hs.render_model_card(model, structure_run="VR-PGE, 300 steps").data.tags
    # counts from the caller
    card = hs.render_model_card(model, structure_run={"importance_warmup_steps": 10, "fixed_steps": 10})
    assert "taylor-importance" in card.data.tags and "as stated by the caller" in card.content
    # only the training arguments: their schedule, marked as planned
    card = hs.render_model_card(model, training_args=SparseTrainingArguments(output_dir="x", report_to=[]))
    assert {"taylor-importance", "vr-pge", "forward-only-search"} <= set(card.data.tags)  # the defaults search
    assert "planned by the training arguments" in card.content and "| 50% of the steps |" in card.content
    assert "(masked forwards, weights frozen) | 16 |" in card.content
    card = hs.render_model_card(model, training_args=SparseTrainingArguments(output_dir="x", report_to=[],
                                                                              forward_search_steps=0))
    assert "taylor-importance" in card.data.tags and "vr-pge" not in card.data.tags
    card = hs.render_model_card(model, training_args=SparseTrainingArguments(output_dir="x", report_to=[],
                                                                              **PAPER_SCHEDULE))
    assert "vr-pge" in card.data.tags and "taylor-importance" not in card.data.tags
    # push_sparse_to_hub passes it on to the card it uploads (offline: the staged folder is kept)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hs.HubOfflineError) as info:
        hs.push_sparse_to_hub(model, "someone/x", structure_run={"search_steps": 5, "estimator": "vrpge"})
    with open(os.path.join(info.value.folder, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "- vr-pge" in readme and "chosen by the VR-PGE search (as stated by the caller)" in readme
    with pytest.raises(TypeError, match="structure_run must be"):
        hs.render_model_card(model, structure_run=3)


def test_warmup_logs_the_sparsity_computed_and_the_target_apart(tmp_path):
    for kw, kinds in (({}, ["warmup"] * 4 + ["fixed"] * 4), (SEARCH, ["warmup"] * 2 + ["search"] * 4 + ["fixed"] * 2)):
        trainer, _ = _train(tmp_path / str(len(kw)), **kw)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 8
        for log, kind in zip(logs, kinds):
            assert log["sparse/target_sparsity"] == 0.5
            if kind == "warmup":  # every unit computed
                assert log["sparse/sparsity"] == 0.0, log
            elif kind == "search":  # the sampled masks: near the budget, not exactly it
                assert 0.3 < log["sparse/sparsity"] < 0.7, log
            else:  # the fixed top-K mask at the target
                assert abs(log["sparse/sparsity"] - 0.5) < 0.02 and log["sparse/fixed"] == 1.0, log


def test_the_record_on_the_model_counts_every_step_when_the_last_log_came_earlier(tmp_path):
    # 8 steps, a log every 3: the record left on the model must count steps 7 and 8 too (published at the end)
    trainer, model = _train(tmp_path, logging_steps=3)
    card = hs.render_model_card(model, "someone/base")
    assert "| fixed mask (the kept units trained alone) | 4 |" in _method_section(card.content)
