"""Distillation: the teacher runs once per micro-batch and is shared by every mask's forward, the loss is the
stated mix, the warm-up teacher is the dense model at the end of the warm-up, and its cost is counted."""

import pytest
import torch
from transformers import TrainerCallback

import hf_sparse as hs
from hf_sparse import SparseConfig, SparseTrainer
from hf_sparse.distill import logit_kl
from trainer_helpers import arithmetic_sequences, search_args, tiny_llama


def make_args(tmp_path, **kw):
    return search_args(tmp_path, **{"max_steps": 6, "logging_steps": 3, "fix_masks_at": 0.5, "budget_schedule_end": 0.0,
                                    **kw})


def test_teacher_runs_once_per_micro_batch_and_every_mask_sees_the_same_teacher(tmp_path):
    teacher = tiny_llama(seed=1)
    calls = []
    teacher.register_forward_hook(lambda m, a, out: calls.append(out.logits.detach().clone()))
    args = make_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer = SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5, score_init="budget"),
                            train_dataset=arithmetic_sequences(64), teacher_model=teacher)
    assert trainer.args.distill_from == "model"
    trainer.train()
    assert len(calls) == 6 * 2  # steps x micro-batches, though the search steps run two masks each
    logs = [h for h in trainer.state.log_history if "sparse/train_flops_vs_dense" in h]
    assert logs[-1]["sparse/train_flops_vs_dense"] > 1.0 / 3.0  # the teacher's forward is counted


def test_distillation_loss_is_the_stated_mix(tmp_path):
    data = arithmetic_sequences(8)
    batch = {k: torch.tensor(data[:8][k]) for k in ("input_ids", "labels")}
    teacher = tiny_llama(seed=1)
    model = hs.sparsify_model(tiny_llama(), SparseConfig(sparsity=0.5))
    args = make_args(tmp_path, distill_alpha=0.3, distill_temperature=2.0)
    trainer = SparseTrainer(model=model, args=args, teacher_model=teacher, train_dataset=data)
    model.train()
    got = trainer.compute_loss(model, dict(batch))
    out = model(**batch)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits
    weights = torch.zeros(batch["labels"].shape)
    weights[:, :-1] = 1.0
    expected = 0.7 * out.loss + 0.3 * logit_kl(out.logits, t_logits, 2.0, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # by hand: T^2 KL per position, averaged over the positions that predict a label
    s_log = torch.log_softmax(out.logits / 2.0, -1)
    t_prob = torch.softmax(t_logits / 2.0, -1)
    by_hand = (t_prob * (t_prob.log() - s_log)).sum(-1)[:, :-1].mean() * 4.0
    torch.testing.assert_close(logit_kl(out.logits, t_logits, 2.0, weights), by_hand, atol=1e-5, rtol=1e-5)


def test_warmup_teacher_is_the_dense_model_at_the_end_of_the_warmup(tmp_path):
    model = tiny_llama()
    args = make_args(tmp_path, max_steps=10, importance_warmup=0.2, budget_schedule_start=0.2, budget_schedule_end=0.2,
                     fix_masks_at=0.5, distill_from="warmup", save_strategy="steps", save_steps=10)
    captured = {}

    class AtWarmupEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                captured["w"] = model.model.layers[0].mlp.up_proj.weight.detach().clone()

    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(64), callbacks=[AtWarmupEnd()])
    trainer.train()
    teacher = trainer._distiller.teacher  # the warm-up is steps 0 and 1: taken after step 1's update
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert bool((hs.SparseStructure(teacher).masks() == 1).all())  # dense
    # the teacher froze the weights of the end of the warm-up step (before the search changed them)
    w_teacher = teacher.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w_teacher, captured["w"])
    assert not torch.equal(w_teacher, model.model.layers[0].mlp.up_proj.weight.detach())
    assert (tmp_path / "checkpoint-10" / "hf_sparse_warmup_teacher.pt").is_file()


@pytest.mark.parametrize("bad, field", [
    (dict(distill_from="warmup"), "importance_warmup"),
    (dict(distill_alpha=1.5), "distill_alpha"),
    (dict(distill_temperature=0.0), "distill_temperature"),
    (dict(distill_from="nope"), "distill_from"),
])
def test_bad_distillation_arguments_name_the_field(tmp_path, bad, field):
    with pytest.raises(ValueError, match=field):
        make_args(tmp_path, **bad)


def test_distill_from_model_needs_a_teacher(tmp_path):
    with pytest.raises(ValueError, match="teacher_model"):
        SparseTrainer(model=tiny_llama(), args=make_args(tmp_path, distill_from="model"),
                      sparse_config=SparseConfig(sparsity=0.5), train_dataset=arithmetic_sequences(16))
