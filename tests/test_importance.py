"""The informed start: Taylor importance of every unit and the keep probabilities built from it."""

import logging

import pytest
import torch

import hf_sparse as hs
from hf_sparse import SparseConfig, SparseTrainer, SparseTrainingArguments
from hf_sparse.importance import TaylorImportance, scores_from_importance
from hf_sparse.layers import SparseLinear
from trainer_helpers import arithmetic_sequences, tiny_llama


def _gate_gradients(model, batch):
    """d loss / d gate for a gate of 1 on every unit, by autograd through explicit gates at the consumers."""
    structure = hs.SparseStructure(model)
    gates = {id(g): torch.ones(g.num_units, requires_grad=True) for g in structure}
    handles = []
    for layer in model.modules():
        if isinstance(layer, SparseLinear) and layer.role == "in":
            def pre(mod, args, gate=gates[id(layer.group)], width=layer.width):
                return (args[0] * gate.repeat_interleave(width),)
            handles.append(layer.register_forward_pre_hook(pre))
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, [gates[id(g)] for g in structure])
    for h in handles:
        h.remove()
    return torch.cat(grads).double()


def test_data_parallel_importance_squares_the_mean_of_the_ranks_derivatives():
    """Two ranks, each with half of a step's batch: the importance of the step is the square of the mean of their
    gate derivatives (the whole batch's derivative, as one process computes it), not the mean of their squares.
    `reduce` stands in for the all-reduce (mean) with the other rank's derivatives."""
    model = hs.sparsify_model(tiny_llama(), SparseConfig(sparsity=0.5))
    data = arithmetic_sequences(16)
    halves = [{k: torch.tensor(data[i * 4:(i + 1) * 4][k]) for k in ("input_ids", "labels")} for i in range(2)]
    whole = {k: torch.cat([h[k] for h in halves]) for k in ("input_ids", "labels")}
    derivatives = [_gate_gradients(model, h) for h in halves]  # each rank's (its half's mean loss)
    imp = TaylorImportance(model)
    with imp.track():
        model(**halves[0]).loss.backward()  # this rank's half
    imp.end_step(reduce=lambda d: (d + derivatives[1]) / 2)
    torch.testing.assert_close(imp.flat(), _gate_gradients(model, whole) ** 2, rtol=1e-4, atol=0)
    mean_of_squares = (derivatives[0] ** 2 + derivatives[1] ** 2) / 2
    assert not torch.allclose(imp.flat(), mean_of_squares, rtol=1e-2)  # what the ranks averaged before


def test_taylor_importance_is_the_squared_gate_derivative_averaged_over_steps():
    model = hs.sparsify_model(tiny_llama(), SparseConfig(sparsity=0.5))  # heads (GQA groups) and neurons
    data = arithmetic_sequences(16)
    batches = [{k: torch.tensor(data[i * 8:(i + 1) * 8][k]) for k in ("input_ids", "labels")} for i in range(2)]
    expected = torch.stack([_gate_gradients(model, b) ** 2 for b in batches]).mean(0)

    imp = TaylorImportance(model)
    for b in batches:
        model.zero_grad()
        with imp.track():
            model(**b).loss.backward()
        imp.end_step()
    got = imp.flat()
    assert imp.steps == 2
    assert got.shape == (hs.SparseStructure(model).num_units,)
    assert bool((expected > 0).all())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    # hooks are gone after the block: a further backward adds nothing
    model(**batches[0]).loss.backward()
    imp.end_step()
    torch.testing.assert_close(imp.flat() * 3 / 2, expected, rtol=1e-4, atol=0)


def test_scores_from_importance_fill_the_budget_in_importance_order():
    torch.manual_seed(0)
    n = 200
    costs = torch.where(torch.arange(n) < 20, torch.tensor(16.0), torch.tensor(1.0))  # "heads" and "neurons"
    importance = torch.rand(n) * costs  # per unit of cost: uniform
    budget = 0.5 * float(costs.sum())
    for band in (0.1, 0.25, 1.0):
        s = scores_from_importance(importance, costs, budget, band=band)
        assert float((s * costs).sum()) == pytest.approx(budget, rel=1e-4)
        ratio = importance / costs
        order = torch.argsort(ratio)
        assert bool((s[order][1:] >= s[order][:-1] - 1e-6).all())  # monotone in importance per cost
        uncertain = float((costs * ((s > 0) & (s < 1))).sum() / costs.sum())
        assert uncertain <= band + 16 / float(costs.sum()) + 1e-6
    s = scores_from_importance(importance, costs, budget, band=0.25)
    assert float(s[torch.argmax(importance / costs)]) == 1.0 and float(s[torch.argmin(importance / costs)]) == 0.0
    with pytest.raises(ValueError, match="band"):
        scores_from_importance(importance, costs, budget, band=0.0)


def test_group_ranking_keeps_every_group_near_the_budget_fraction():
    torch.manual_seed(0)
    costs = torch.ones(300)
    importance = torch.rand(300) * torch.repeat_interleave(torch.tensor([1e4, 1.0, 1e-4]), 100)  # scales per layer
    budget = 0.5 * 300
    flat = scores_from_importance(importance, costs, budget, band=0.2)
    assert float(flat[:100].mean()) > 0.99 and float(flat[200:].mean()) < 0.01  # one ranking empties a layer
    s = scores_from_importance(importance, costs, budget, band=0.2, group_sizes=[100, 100, 100])
    assert float(s.sum()) == pytest.approx(budget, rel=1e-4)
    for part in s.split(100):
        assert float(part.mean()) == pytest.approx(0.5, abs=0.01)
    for part, imp in zip(s.split(100), importance.split(100)):  # within a group: the importance order
        order = torch.argsort(imp)
        assert bool((part[order][1:] >= part[order][:-1] - 1e-6).all())
    explored = scores_from_importance(importance, costs, budget, band=0.2, group_sizes=[100, 100, 100], explore=0.2)
    assert float(explored.sum()) == pytest.approx(budget, rel=1e-4)  # the same budget
    assert float(explored.min()) == pytest.approx(0.1) and float(explored.max()) == pytest.approx(0.9)
    torch.testing.assert_close(explored, 0.8 * s + 0.2 * 0.5)
    with pytest.raises(ValueError, match="explore"):
        scores_from_importance(importance, costs, budget, explore=1.0)
    with pytest.raises(ValueError, match="group_sizes"):
        scores_from_importance(importance, costs, budget, group_sizes=[100, 100])


def test_importance_warmup_trains_dense_then_starts_from_the_importance(tmp_path):
    model = tiny_llama()
    args = SparseTrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, learning_rate=3e-3, report_to=[],
        disable_tqdm=True, save_strategy="no", use_cpu=True, seed=0, logging_steps=5,
        importance_warmup=0.25, budget_schedule_start=0.25, budget_schedule_end=0.25, fix_masks_at=0.8, forward_search_steps=0,
    )
    seen = {}

    class Spy(SparseTrainer):
        def _informed_start(self, step):
            seen["masks_before"] = self.structure.masks().clone()
            seen["step"] = step
            seen["importance"] = self._importance.flat().clone()
            super()._informed_start(step)
            seen["scores"] = self.structure.scores().clone()

    trainer = Spy(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5), train_dataset=arithmetic_sequences(160))
    trainer.train()
    assert seen["step"] == 5 and trainer._importance.steps == 5
    assert bool((seen["masks_before"] == 1).all())  # the warm-up computed every unit
    costs = trainer.structure.costs("params")
    sizes = [g.num_units for g in trainer.structure]
    expected = scores_from_importance(seen["importance"].float(), costs, trainer._target_budget, band=0.25,
                                      group_sizes=sizes)
    torch.testing.assert_close(seen["scores"], expected)
    assert float((seen["scores"] * costs).sum()) == pytest.approx(trainer._target_budget, rel=1e-4)
    assert abs(hs.sparsity_report(model).sparsity_topk - 0.5) <= 0.02
    logs = [h for h in trainer.state.log_history if "sparse/train_flops_vs_dense" in h]
    assert logs[0]["sparse/train_flops_vs_dense"] == pytest.approx(1.0)  # the first 5 steps were dense


@pytest.mark.parametrize(
    "bad, field",
    [(dict(importance_warmup=1.0), "importance_warmup"), (dict(importance_warmup=-0.1), "importance_warmup"),
     (dict(importance_band=0.0), "importance_band"), (dict(importance_ranking="layer"), "importance_ranking"),
     (dict(importance_explore=1.0), "importance_explore"), (dict(warmup_loss_drop=1.0), "warmup_loss_drop"),
     (dict(warmup_extend_until=1.5), "warmup_extend_until"),
     (dict(importance_warmup=0.3, budget_schedule_start=0.0, budget_schedule_end=0.0, fix_masks_at=0.2), "importance_warmup=0.3"),
     (dict(importance_warmup=0.1, budget_schedule_end=0.5), "budget_schedule_end")],
)
def test_importance_arguments_are_checked(tmp_path, bad, field):
    with pytest.raises(ValueError, match=field):
        SparseTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **bad)


def _warmup_run(tmp_path, data, **kw):
    """The defaults' schedule (warm-up to 0.5, then the Taylor mask fixed) over 24 steps, the extension on."""
    args = SparseTrainingArguments(**{
        **dict(output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=8, learning_rate=3e-3,
               report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=True, seed=0, logging_steps=4,
               forward_search_steps=0), **kw})
    seen = {}

    class Spy(SparseTrainer):
        def _informed_start(self, step):
            seen["step"] = step
            super()._informed_start(step)

    trainer = Spy(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5), train_dataset=data)
    trainer.train()
    return trainer, seen


def _constant_sequences(n: int = 192):
    """Every token the same random draw per row: nothing to learn past the unigram, the loss stays flat."""
    g = torch.Generator().manual_seed(0)
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": ids, "labels": ids}
                              for ids in torch.randint(0, 64, (n, 16), generator=g).tolist()])


def test_warmup_goes_on_while_the_loss_is_at_its_starting_level(tmp_path, caplog):
    # random tokens: the loss never falls 2% below where it started, so the warm-up runs to warmup_extend_until
    # (0.75 of 24 steps = 18), the fixing with it, and the run says so
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        trainer, seen = _warmup_run(tmp_path / "flat", _constant_sequences(), warmup_loss_drop=0.5,
                                    warmup_extend_until=0.75)
    assert seen["step"] == 18 and trainer.warmup_extension() == 6 and trainer.fix_step() == 18
    run = trainer.structure_run()
    assert run["importance_warmup_steps"] == 18 and run["fixed_steps"] == 6 and run["warmup_extension_steps"] == 6
    assert "still at its starting level at step 18" in caplog.text
    card = hs.render_model_card(trainer.model, "someone/base", training_args=trainer.args).content
    assert "| ... of which past importance_warmup (the loss was still at its starting level) | 6 |" in card
    # a learnable task leaves its level in the planned warm-up: nothing moves
    trainer, seen = _warmup_run(tmp_path / "learned", arithmetic_sequences(192), warmup_loss_drop=0.02)
    assert seen["step"] == 12 and trainer.warmup_extension() == 0 and trainer.structure_run()["fixed_steps"] == 12


def test_warmup_extension_ends_when_the_loss_falls(tmp_path):
    # a drop the task reaches a few steps after the planned end: the warm-up ends there, before the latest step
    trainer, seen = _warmup_run(tmp_path, arithmetic_sequences(192), warmup_loss_drop=0.12, warmup_extend_until=1.0)
    start, now = trainer._warmup_loss.levels()
    assert 12 < seen["step"] < 24 and trainer.warmup_extension() == seen["step"] - 12
    assert now <= 0.88 * start
    assert trainer.structure_run()["fixed_steps"] == 24 - seen["step"]


def test_warmup_loss_windows():
    from hf_sparse.warmup_loss import WarmupLoss, still_at_start

    w = WarmupLoss(2)
    for x in (4.0, 2.0, 9.0, 1.0, 3.0):
        w.add(x)
    assert w.levels() == (3.0, 2.0)  # the first two steps, the latest two
    w2 = WarmupLoss.from_state_dict(w.state_dict())
    assert w2.levels() == (3.0, 2.0) and w2.window == 2
    assert still_at_start(1.0, 0.99, 0.02) and not still_at_start(1.0, 0.97, 0.02)
    assert not still_at_start(-1.0, -0.5, 0.02) and not still_at_start(1.0, float("nan"), 0.02)


def test_a_resume_without_the_saved_levels_does_not_extend_the_warmup(tmp_path):
    # a checkpoint written before the levels were saved (simulated: the key removed), resumed inside the warm-up:
    # the resumed run has no starting level, so it must not take its latest steps for one and extend the warm-up
    from transformers import TrainerCallback

    from hf_sparse.trainer_checkpoint import STRUCTURE_STATE_NAME

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 6

    kw = dict(save_strategy="steps", save_steps=6, warmup_loss_drop=0.5, warmup_extend_until=0.75)
    full, _ = _warmup_run(tmp_path / "full", _constant_sequences(), **kw)
    assert full.warmup_extension() == 6  # uninterrupted, with its levels: extended to the cap
    args = SparseTrainingArguments(
        output_dir=str(tmp_path / "part"), max_steps=24, per_device_train_batch_size=8, learning_rate=3e-3,
        report_to=[], disable_tqdm=True, use_cpu=True, seed=0, forward_search_steps=0, **kw)
    SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                  train_dataset=_constant_sequences(), callbacks=[StopAt()]).train()
    path = tmp_path / "part" / "checkpoint-6" / STRUCTURE_STATE_NAME
    state = torch.load(path, weights_only=True)
    assert state["warmup_loss"]["start_step"] == 0 and len(state["warmup_loss"]["first"]) == 2
    del state["warmup_loss"]
    torch.save(state, path)
    resumed = SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=_constant_sequences())
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-6"))
    # (its first level is read at step 10, the window before the planned end: steps 6-9 are never read)
    assert resumed.warmup_extension() == 0 and resumed._warmup_loss.start_step == 12 - 2
    assert resumed.structure_run()["importance_warmup_steps"] == 12
