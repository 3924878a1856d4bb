"""The allocation search (hf_sparse/allocation.py): one learned share of the budget per group, moved by the
policy gradient from forward losses alone, the importance's ranking kept inside each group."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_model

import hf_sparse as hs
from hf_sparse.allocation import GroupAllocation, search_allocation
from hf_sparse.forward_importance import spread_logits
from hf_sparse.training_args import DEFAULT_FORWARD_SEARCH_STEPS, PAPER_SCHEDULE


def _setup(sparsity=0.5):
    config = hs.SparseConfig(sparsity=sparsity)
    structure = hs.SparseStructure(hs.sparsify_model(tiny_model("llama"), config))
    costs = structure.costs(config.budget)
    importance = torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)) + 0.1
    z = spread_logits(importance, costs, structure.sizes, temperature=3.0)
    budget = (1.0 - sparsity) * float(costs.double().sum())
    return structure, costs, z, budget


def _policy(policy, structure, costs, budget):
    """search_allocation's policy arguments: "shares" ranks with the top-K mask of the perturbed shares."""
    def mask_of(scores):
        structure.set_scores(scores)
        return structure.topk_mask(costs, budget)

    return {"policy": policy, "mask_of": mask_of if policy == "shares" else None}


@pytest.mark.parametrize("policy", ["sampled", "shares"])
def test_the_losses_move_budget_towards_the_group_that_lowers_them_and_the_budget_holds(policy):
    structure, costs, z, budget = _setup()
    allocation = GroupAllocation(z, costs, structure.sizes, budget, margin=0.02)
    start = [a["kept"] for a in allocation.kept_shares(structure)]
    target = 1  # the loss falls with every kept unit of group 1 and ignores the others
    sel = torch.cat([torch.full((n,), i == target) for i, n in enumerate(structure.sizes)])

    def loss_of(batch):
        return -float(structure.masks().cpu()[sel].sum()) + 0.1 * float(torch.randn(()))

    search_allocation(structure, allocation, itertools.repeat({}), loss_of, steps=40, num_samples=4,
                      learning_rate=0.1, seed=0, **_policy(policy, structure, costs, budget))
    end = [a["kept"] for a in allocation.kept_shares(structure)]
    assert end[target] > start[target] + 0.1, (start, end)
    others = [e - s for i, (s, e) in enumerate(zip(start, end)) if i != target]
    assert sum(others) < 0  # paid for by the other groups: one budget
    s = allocation.probabilities()  # what the masks are drawn from: on the budget, off the absorbing bounds
    assert abs(float((costs.double() * s).sum()) - budget) < 1e-3 * budget
    assert bool(((s >= 0.02 - 1e-9) & (s <= 0.98 + 1e-9)).all())
    # the structure's scores rank like the probabilities (unclamped: no ties at the bounds)
    assert torch.equal(torch.argsort(structure.scores().cpu().double(), stable=True),
                       torch.argsort(allocation.ranking_scores().float().double(), stable=True))


@pytest.mark.parametrize("policy", ["sampled", "shares"])
def test_budget_goes_where_a_unit_of_cost_lowers_the_loss_most_not_to_every_group_that_lowers_it(policy):
    """Every kept unit of every group lowers the loss, but a unit of group 1 (64 neurons) by 3x as much per unit
    of cost: the search moves budget from the others to group 1. (Without the budget's share in the gradient every group was
    pushed up alike and the re-centring cancelled the push.)"""
    structure, costs, z, budget = _setup()
    allocation = GroupAllocation(z, costs, structure.sizes, budget, margin=0.02)
    start = [a["kept"] for a in allocation.kept_shares(structure)]
    value = torch.cat([torch.full((n,), 3.0 if i == 1 else 1.0) for i, n in enumerate(structure.sizes)])
    value = value * costs.double().cpu() / float(costs.double().mean())

    def loss_of(batch):
        return -float((structure.masks().cpu().double() * value).sum())

    search_allocation(structure, allocation, itertools.repeat({}), loss_of, steps=40, num_samples=4,
                      learning_rate=0.1, seed=1, **_policy(policy, structure, costs, budget))
    end = [a["kept"] for a in allocation.kept_shares(structure)]
    gains = [e - s for s, e in zip(start, end)]
    assert gains[1] > 0.1 and gains[1] == max(gains), (start, end)
    assert gains[3] < 0, (start, end)  # the other layer's neurons paid for it


def _train(tmp_path, name, sparse_config=None, **search):
    from conftest import tiny_inputs

    model = tiny_model("llama")
    data = []
    for i in range(4):
        inputs = tiny_inputs("llama", batch=4, seq=8, seed=i)
        inputs["labels"] = inputs["input_ids"].clone()
        data += [{k: v[j] for k, v in inputs.items()} for j in range(4)]
    args = hs.SparseTrainingArguments(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4,
                                      report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                                      importance_warmup=0.5, budget_schedule_start=0.5, budget_schedule_end=0.5,
                                      fix_masks_at=0.5, **search)
    trainer = hs.SparseTrainer(model=model, args=args, train_dataset=data,
                               sparse_config=sparse_config or hs.SparseConfig(sparsity=0.5))
    trainer.train()
    return model, trainer


def test_the_trainer_s_allocation_search_moves_shares_between_groups_but_keeps_the_taylor_ranking_inside(tmp_path):
    plain, _ = _train(tmp_path, "plain", forward_search_steps=0)
    searched, trainer = _train(tmp_path, "alloc", forward_search_steps=8, forward_search="allocation",
                               forward_search_lr=0.3)
    taylor = hs.SparseStructure(plain).scores().cpu()  # the informed start of the same warm-up (same seed)
    scores = hs.SparseStructure(searched).scores().cpu()
    sizes = hs.SparseStructure(searched).sizes
    for t, s in zip(torch.split(taylor, sizes), torch.split(scores, sizes)):
        above = t[:, None] > t[None, :]  # u ranked above v by the Taylor importance
        assert bool((s[:, None] >= s[None, :] - 1e-6)[above].all())
    plain_counts = hs.SparseStructure(plain).kept_counts()
    assert hs.SparseStructure(searched).kept_counts() != plain_counts  # the search moved budget between groups
    run = trainer.structure_run()
    assert run["forward_search"] == "allocation" and run["forward_search_steps"] == 8
    card = hs.render_model_card(searched, base_model="tiny-llama").content
    assert "share of the budget" in card


def test_the_hidden_objective_is_zero_for_the_dense_mask_and_reads_one_dense_target_per_batch(tmp_path):
    _, trainer = _train(tmp_path, "hidden", forward_search_steps=3, forward_search_objective="hidden")
    loss_fn = trainer._hidden_match_loss()
    model, structure = trainer.model.eval(), trainer.structure
    batch = {k: v[:2] for k, v in next(iter(trainer.get_train_dataloader())).items()}
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        structure.set_masks(hs.sample_masks(torch.full((structure.num_units,), 0.5), 1, 0, 0)[0])
        first = float(loss_fn(model, batch))  # the target is read with every unit kept, whatever the mask
        second = float(loss_fn(model, batch))
        structure.set_masks(torch.ones(structure.num_units))
        assert float(loss_fn(model, batch)) < 1e-10  # the dense mask is the target
    handle.remove()
    assert first > 1e-3 and first == second
    assert len(calls) == 4  # one dense target for the batch, then one forward per call
    assert trainer.structure_run()["forward_search_objective"] == "hidden"


def test_the_default_run_searches_the_allocation_and_logs_what_it_did(tmp_path):
    args = hs.SparseTrainingArguments(output_dir=str(tmp_path))
    assert (args.forward_search_steps, args.forward_search) == (DEFAULT_FORWARD_SEARCH_STEPS, "allocation")
    assert hs.SparseTrainingArguments(output_dir=str(tmp_path), **PAPER_SCHEDULE).forward_search_steps == 0
    lm = dict(importance_warmup=0.1, budget_schedule_start=0.1, budget_schedule_end=0.1, fix_masks_at=0.3)
    assert hs.SparseTrainingArguments(output_dir=str(tmp_path), **lm).forward_search_steps == 0  # (VR-PGE follows)
    _, trainer = _train(tmp_path, "default", logging_steps=1)  # the defaults' search (only the schedule is set)
    assert trainer.structure_run()["forward_search_steps"] == DEFAULT_FORWARD_SEARCH_STEPS
    logged = [row for row in trainer.state.log_history if "sparse/search_loss_end" in row]
    assert len(logged) == 1, trainer.state.log_history  # once, at the first training log after the search
    row = logged[0]
    assert row["sparse/search_loss_difference"] > 0 and 0 < row["sparse/search_mask_entropy"] <= 1
    assert 0 <= row["sparse/search_share_at_bounds"] < 1 and 0 <= row["sparse/search_budget_moved"] < 1
    kept = {k: v for k, v in row.items() if k.startswith("sparse/kept_")}
    assert len(kept) == len(trainer.structure.groups) and all(0 < v <= 1 for v in kept.values())
    for share in hs.SparseStructure(trainer.model).kept_counts()["neuron"]:  # what the fixed mask keeps
        assert f"{share / 64:.6f}" in {f"{v:.6f}" for k, v in kept.items() if "neuron" in k}


@pytest.mark.parametrize("sparsity", [0.0, 0.99])
def test_a_default_run_with_no_budget_to_split_fixes_the_taylor_mask_with_a_warning(tmp_path, caplog, sparsity):
    """A dense control (sparsity 0) or a budget beyond the margins: the default search has nothing to choose, so
    the run fixes the Taylor mask and says why, instead of failing at the end of the warm-up."""
    import logging

    with caplog.at_level(logging.WARNING, logger="hf_sparse.trainer"):
        _, trainer = _train(tmp_path, f"s{sparsity}", sparse_config=hs.SparseConfig(sparsity=sparsity))
    assert trainer.structure_run()["forward_search_steps"] == 0 and trainer.structure_run()["fixed_steps"] == 2
    assert f"no forward-only search at sparsity {sparsity:g}" in caplog.text


def test_with_uniform_layers_the_allocation_learns_the_split_between_heads_and_neurons_only(tmp_path):
    """`uniform_layers` keeps the same count in every layer: one offset per kind, and the fixed mask obeys it."""
    config = hs.SparseConfig(sparsity=0.5, uniform_layers=True)
    model, trainer = _train(tmp_path, "uniform", sparse_config=config, forward_search_lr=0.3)
    assert trainer.structure_run()["forward_search_steps"] == DEFAULT_FORWARD_SEARCH_STEPS
    structure = hs.SparseStructure(model)
    by_kind = structure.kept_counts()
    assert all(len(set(counts)) == 1 for counts in by_kind.values()), by_kind
    # the scores are sigmoid(z + offset - shift): one offset for every layer's heads, one for the neurons
    z = spread_logits(trainer._importance.flat().float(), trainer._costs.cpu(), structure.sizes, temperature=3.0)
    offset = torch.logit(structure.scores().cpu().double().clamp(1e-6, 1 - 1e-6)) - z.double()
    for kind in ("head", "neuron"):
        sel = torch.cat([torch.full((n,), g.kind == kind) for g, n in zip(structure.groups, structure.sizes)])
        free = sel & (z.abs() < 5)
        assert float(offset[free].max() - offset[free].min()) < 1e-3, kind
    structure_, costs, z, budget = _setup()
    kinds = [0 if g.kind == "head" else 1 for g in structure_.groups]
    allocation = GroupAllocation(z, costs, structure_.sizes, budget, margin=0.02, shared=kinds)
    assert allocation.offsets.numel() == 2
    with pytest.raises(ValueError, match="offset index"):
        GroupAllocation(z, costs, structure_.sizes, budget, margin=0.02, shared=[0, 2] * (len(kinds) // 2))


def test_allocation_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ValueError, match="runs only with forward_search_steps > 0"):
        hs.SparseTrainingArguments(output_dir=str(tmp_path), forward_search_steps=0, forward_search_lr=0.1)
    with pytest.raises(ValueError, match="set importance_warmup > 0"):
        hs.SparseTrainingArguments(output_dir=str(tmp_path), forward_search_steps=4, importance_warmup=0.0,
                                   budget_schedule_start=0.0, budget_schedule_end=0.0)
    structure, costs, z, _ = _setup()
    with pytest.raises(ValueError, match="cannot be met"):
        GroupAllocation(z, costs, structure.sizes, 0.01 * float(costs.double().sum()), margin=0.02)
