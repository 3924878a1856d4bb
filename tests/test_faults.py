"""The probe list of silent faults (issue "nothing silently different"): each test fails on the code before its fix.

Each case is a fault that once passed without a word -- a resume, a load or a run that went on with another
model than the user asked for -- and now either gives the right model or stops with an error that names the
cause and the fix.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import hf_sparse as hs
from hf_sparse import SparseConfig, SparseTrainer, SparseTrainingArguments
from hf_sparse.dropped import DROPPED_WEIGHTS_NAME
from hf_sparse.trainer_checkpoint import STRUCTURE_STATE_NAME
from trainer_helpers import arithmetic_sequences, search_args, tiny_llama


def default_args(tmp_path, **kw):
    """The library's default schedule (dense warm-up, informed mask fixed at mid-run), quiet, on the CPU."""
    defaults = dict(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=3e-3,
                    logging_steps=2, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, use_cpu=True)
    defaults.update(kw)
    return SparseTrainingArguments(**defaults)


def dropped_values(model, keep):
    """{state-dict name: the values of the entries `keep` leaves out}."""
    from hf_sparse.dropped import take, unit_slices

    return {name: take(param.detach(), dim, idx).clone()
            for name, param, dim, idx in unit_slices(model, hs.SparseStructure(model), keep)}


# --- dropped weights are kept, not destroyed, once the mask is fixed (item 10) ---------------------------------
def test_a_fixed_mask_keeps_the_dropped_weights_through_training_saving_and_reloading(tmp_path):
    model = tiny_llama()
    hs.sparsify_model(model, SparseConfig(sparsity=0.5, score_init="magnitude"))
    mask = hs.fix_masks(model)
    before = dropped_values(model, mask)
    assert any(float(v.abs().sum()) > 0 for v in before.values())  # real weights, not zeros to begin with
    args = default_args(tmp_path, max_steps=4, weight_decay=0.1, save_strategy="steps", save_steps=2)
    trainer = SparseTrainer(model=model, args=args, train_dataset=arithmetic_sequences(64))
    seen_live = []
    from transformers import TrainerCallback

    class Live(TrainerCallback):  # what the model holds between steps of the fixed phase
        def on_step_end(self, args, state, control, **kw):
            seen_live.append(dropped_values(model, mask))

    trainer.add_callback(Live())
    trainer.train()
    # while training, the dropped entries cost nothing: zero in the live model ...
    assert all(float(v.abs().sum()) == 0 for v in seen_live[-1].values())
    # ... and afterwards the weights are the ones they were before training (weight decay did not touch them)
    after = dropped_values(model, mask)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    # every save wrote their real values: the checkpoint's dropped file and the final save
    from safetensors.torch import load_file

    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"):
        saved = load_file(str(folder / DROPPED_WEIGHTS_NAME))
        for name, value in before.items():
            assert torch.equal(saved[name], value), (folder, name)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = hs.load_sparse_model(str(tmp_path / "final"))
    for name, value in dropped_values(reloaded, mask).items():
        assert torch.equal(value, before[name]), name


# --- resume and reload refuse a folder that would give another model (items 1, 2, 3) -------------------------
@pytest.fixture(scope="module")
def searched_run(tmp_path_factory):
    """A run of the paper's schedule with checkpoints in the search (step 2) and after the fixing (step 4)."""
    out = tmp_path_factory.mktemp("searched")
    args = search_args(out, max_steps=4, save_strategy="steps", save_steps=2, budget_schedule_end=0.5,
                       fix_masks_at=0.75)
    SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                  train_dataset=arithmetic_sequences(64)).train()
    return out


def copy_checkpoint(run, step, tmp_path):
    import shutil

    target = tmp_path / f"checkpoint-{step}"
    shutil.copytree(run / f"checkpoint-{step}", target)
    return target


def resume(tmp_path, checkpoint, sparsity=0.5):
    model = tiny_llama()
    args = search_args(tmp_path / "resumed", max_steps=4, budget_schedule_end=0.5, fix_masks_at=0.75)
    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=sparsity),
                            train_dataset=arithmetic_sequences(64))
    return trainer, model, {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_without_structure_state_refuses_before_the_mask_is_fixed(searched_run, tmp_path):
    ckpt = copy_checkpoint(searched_run, 2, tmp_path)
    os.remove(ckpt / STRUCTURE_STATE_NAME)
    trainer, model, before = resume(tmp_path, ckpt)
    with pytest.raises(ValueError, match=f"no {STRUCTURE_STATE_NAME}.*not fixed yet"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    # refused before anything was loaded: the model is the one the user built
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_without_structure_state_checks_the_checkpoints_sparsity(searched_run, tmp_path):
    ckpt = copy_checkpoint(searched_run, 4, tmp_path)  # past the fixing: resuming without the state is allowed
    os.remove(ckpt / STRUCTURE_STATE_NAME)
    trainer, _, _ = resume(tmp_path, ckpt, sparsity=0.7)
    with pytest.raises(ValueError, match="sparsity: checkpoint 0.5, this run 0.7"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    trainer, model, _ = resume(tmp_path, ckpt, sparsity=0.5)
    trainer.train(resume_from_checkpoint=str(ckpt))  # the same config: it goes on, on the fixed mask
    assert hs.masks_fixed(model)


def test_a_missing_dropped_values_file_is_refused_on_load_and_on_resume(searched_run, tmp_path):
    ckpt = copy_checkpoint(searched_run, 4, tmp_path)
    os.remove(ckpt / DROPPED_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"no {DROPPED_WEIGHTS_NAME}, but its masks drop"):
        hs.load_sparse_model(str(ckpt))
    trainer, _, _ = resume(tmp_path, ckpt)
    with pytest.raises(ValueError, match=f"no {DROPPED_WEIGHTS_NAME}, but its masks drop"):
        trainer.train(resume_from_checkpoint=str(ckpt))


@pytest.mark.parametrize("saved_by", ["trainer", "save_sparse_pretrained"])
def test_an_edited_sparse_config_is_refused(searched_run, tmp_path, saved_by):
    if saved_by == "trainer":
        folder = copy_checkpoint(searched_run, 4, tmp_path)
    else:
        folder = tmp_path / "saved"
        hs.save_sparse_pretrained(hs.load_sparse_model(str(searched_run / "checkpoint-4")), folder)
    path = folder / hs.config.CONFIG_NAME
    data = json.loads(path.read_text())
    hs.load_sparse_model(str(folder))  # as saved, it loads
    data["sparsity"] = 0.8
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sparsity: saved 0.5, now 0.8"):
        hs.load_sparse_model(str(folder))
    if saved_by == "trainer":
        trainer, _, _ = resume(tmp_path, folder, sparsity=0.8)
        with pytest.raises(ValueError, match="sparsity: saved 0.5, now 0.8"):
            trainer.train(resume_from_checkpoint=str(folder))


# --- a diverged run stops and names the cause (items 4, 5) --------------------------------------------------
class PoisonAt:
    """A callback that sets one weight to NaN at the end of `step` (the weights the next step trains on)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Poison(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step == step:
                    with torch.no_grad():
                        next(p for n, p in model.named_parameters() if "up_proj" in n).view(-1)[0] = float("nan")

        return Poison()


def test_nan_during_the_default_warmup_stops_before_a_mask_is_fixed_from_it(tmp_path):
    model = tiny_llama()
    trainer = SparseTrainer(model=model, args=default_args(tmp_path, max_steps=8), train_dataset=arithmetic_sequences(64),
                            callbacks=[PoisonAt(2)])
    with pytest.raises(RuntimeError, match="non-finite since step 2 .*warm-up steps.*Lower --learning_rate"):
        trainer.train()
    assert not hs.masks_fixed(model)


def test_one_non_finite_warmup_step_is_left_out_and_the_run_goes_on(tmp_path):
    # an overflowing step whose update is skipped (fp16's grad scaler does that) leaves the weights finite: its
    # derivatives are left out of the importance, and the run goes on
    model = tiny_llama()
    trainer = SparseTrainer(model=model, args=default_args(tmp_path, max_steps=8), train_dataset=arithmetic_sequences(64))
    importance, calls = trainer._importance, {"n": 0}
    original = importance._add

    def overflow_once(group, values):
        calls["n"] += 1
        original(group, values * float("inf") if calls["n"] == 1 else values)

    importance._add = overflow_once
    trainer.train()
    assert importance.nonfinite_steps == 1 and importance.steps == 3
    assert torch.isfinite(trainer.structure.scores()).all() and hs.masks_fixed(model)


def test_divergence_under_the_search_names_the_non_finite_losses(tmp_path):
    model = tiny_llama()
    args = search_args(tmp_path, max_steps=12, learning_rate=1e6, budget_schedule_end=0.5, fix_masks_at=0.75)
    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(64))
    with pytest.raises(RuntimeError, match=r"non-finite since step \d .*structure updates in a row.*learning_rate=1000000"):
        trainer.train()
    assert not hs.masks_fixed(model)


# --- a failed push leaves the model as it was (item 6) ---------------------------------------------------------
def test_a_failed_push_to_hub_leaves_the_search_masks_unfixed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_llama()
    args = search_args(tmp_path, max_steps=4, budget_schedule_end=0.5, fix_masks_at=1.0)
    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(64))
    trainer.train()
    structure = trainer.structure
    scores, masks = structure.scores().clone(), structure.masks().clone()
    assert not hs.masks_fixed(model)
    with pytest.raises(hs.hub.HubOfflineError):
        trainer.push_to_hub()
    assert not hs.masks_fixed(model)
    assert torch.equal(structure.scores(), scores) and torch.equal(structure.masks(), masks)


# --- a save killed between its two renames is recovered, and said so (item 7) ----------------------------------
def test_a_save_killed_between_its_renames_is_recovered_not_deleted(tmp_path, caplog):
    from trainer_helpers import tiny_llama as build

    target = tmp_path / "out"
    first = hs.sparsify_model(build(0), SparseConfig(sparsity=0.5, score_init="magnitude"))
    second = hs.sparsify_model(build(1), SparseConfig(sparsity=0.5, score_init="magnitude"))
    hs.save_sparse_pretrained(first, target)
    hs.save_sparse_pretrained(second, tmp_path / "second")
    # the state a kill between `rename(target, old)` and `rename(tmp, target)` leaves (pid of no running process)
    os.rename(target, tmp_path / ".out.old-999999999-abcd1234")
    os.rename(tmp_path / "second", tmp_path / ".out.tmp-999999999-xyz")
    with pytest.raises(FileNotFoundError, match=r"killed between its two renames.*\.out\.tmp-999999999-xyz"):
        hs.load_sparse_model(str(target))
    # the next save puts the complete folder back first: here a different model, which must not replace it
    other = hs.sparsify_model(build(2), SparseConfig(sparsity=0.5, granularity=["neuron"], score_init="magnitude"))
    with caplog.at_level(logging.WARNING, logger="hf_sparse.export"):
        with pytest.raises(FileExistsError, match="different model"):
            hs.save_sparse_pretrained(other, target)
    assert "moved it back into place" in caplog.text and ".out.old-999999999-abcd1234" in caplog.text
    reloaded = hs.load_sparse_model(str(target))
    for name, value in second.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name  # the newer, complete save
    assert sorted(os.listdir(tmp_path)) == ["out"]


# --- a sparsity that keeps nothing is refused (item 8) ---------------------------------------------------------
@pytest.mark.parametrize("score_init", ["magnitude", "ones"])
def test_a_sparsity_whose_budget_keeps_no_unit_is_refused_before_patching(score_init):
    model = tiny_llama()
    with pytest.raises(ValueError, match="sparsity=0.9999 .*every unit would be dropped.*at most 0.9"):
        hs.sparsify_model(model, SparseConfig(sparsity=0.9999, score_init=score_init))
    assert not hs.is_sparsified(model)
    hs.sparsify_model(model, SparseConfig(sparsity=0.5, score_init="magnitude"))
    with pytest.raises(ValueError, match="fix_masks: sparsity=0.9999 .*every unit would be dropped"):
        hs.fix_masks(model, sparsity=0.9999)
    assert not hs.masks_fixed(model)


# --- a run too short to fix its mask says so (item 9) ----------------------------------------------------------
@pytest.mark.parametrize("schedule", ["default", "paper"])
def test_a_run_that_ends_before_its_mask_is_fixed_warns(tmp_path, caplog, schedule):
    if schedule == "default":
        args, steps = default_args(tmp_path, max_steps=1), 1
    else:
        args, steps = search_args(tmp_path, max_steps=2), 2
    model = tiny_llama()
    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(32))
    with caplog.at_level(logging.WARNING, logger="hf_sparse.trainer"):
        trainer.train()
    assert not hs.masks_fixed(model)
    assert f"ended at step {steps}, before its mask is fixed" in caplog.text
    caplog.clear()
    trainer = SparseTrainer(model=tiny_llama(), args=default_args(tmp_path, max_steps=4),
                            train_dataset=arithmetic_sequences(32))
    with caplog.at_level(logging.WARNING, logger="hf_sparse.trainer"):
        trainer.train()
    assert "before its mask is fixed" not in caplog.text  # a run long enough fixes it, without the warning
