"""The Trainer contract: what Transformers users do (save, evaluate, resume, bf16, dropout, other optimizers)
keeps the sparse model intact, and the step's losses, masks and optimizer updates are the ones the method
specifies. Each test names the behaviour it guards; see the issue-11 note for which break it catches."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import hf_sparse as hs
from hf_sparse import SparseConfig, SparseTrainer
from trainer_helpers import arithmetic_sequences, search_args, tiny_llama


def make_args(tmp_path, **kw):
    return search_args(tmp_path, **{"max_steps": 10, "logging_steps": 5, **kw})


def batch_of(data, n=8):
    return {k: torch.tensor(data[:n][k]) for k in ("input_ids", "labels")}


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


# --- 0: the informed start must not keep activations alive ------------------------------------------------
def test_importance_warmup_holds_no_activation_across_steps(tmp_path):
    counts = {}

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counts[state.global_step] = live_tensors()

    args = make_args(tmp_path, max_steps=12, importance_warmup=0.9, budget_schedule_start=0.0,
                     budget_schedule_end=0.5, fix_masks_at=0.9, logging_steps=100)
    trainer = SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(128), callbacks=[Count()])
    trainer.train()
    # steps 3..10 are all warm-up steps: the number of live tensors does not grow with the step count (the leak
    # kept 6 tensors a step alive here; allow 2 for Python's own bookkeeping)
    assert counts[10] <= counts[3] + 2, counts


# --- 1: save_model, checkpoints and push keep the sparse model ------------------------------------------
def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("fixed", [False, True])
def test_save_model_reloads_as_the_trained_sparse_model(tmp_path, fixed):
    data = arithmetic_sequences(64)
    batch = batch_of(data)
    args = make_args(tmp_path / "run", max_steps=8, fix_masks_at=0.5 if fixed else 1.0, budget_schedule_end=0.5)
    model = tiny_llama()
    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5), train_dataset=data)
    trainer.train()
    trained = _logits(model, batch)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.save_model(str(tmp_path / "saved"))
    # saving does not change the model in memory
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense_state[k]), k
    assert os.path.isfile(tmp_path / "saved" / "sparse_config.json")
    reloaded = hs.load_sparse_model(str(tmp_path / "saved"))
    torch.testing.assert_close(_logits(reloaded, batch), trained, atol=1e-5, rtol=0)
    # the dropped units' weights are kept (for training on), bit for bit
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, dense_state[k]), k
    # plain from_pretrained: the same sparse model (zeros explicit), never the dense one
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    torch.testing.assert_close(_logits(plain, batch), trained, atol=1e-5, rtol=0)


def test_checkpoints_reload_as_the_sparse_model_and_resume_keeps_dropped_weights(tmp_path):
    data = arithmetic_sequences(64)
    batch = batch_of(data)
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=6, fix_masks_at=1.0,
                     budget_schedule_end=0.5)
    model = tiny_llama()
    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5), train_dataset=data)
    trainer.train()
    folder = tmp_path / "checkpoint-6"
    assert os.path.isfile(folder / "sparse_config.json")
    expected = _logits(model, batch)
    torch.testing.assert_close(_logits(hs.load_sparse_model(str(folder)), batch), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(folder)), batch), expected,
                               atol=1e-5, rtol=0)
    # resuming restores the dropped units' weights, not the zeros written for plain loaders
    resumed = tiny_llama(seed=1)
    t2 = SparseTrainer(model=resumed, args=make_args(tmp_path, max_steps=6, fix_masks_at=1.0,
                                                     budget_schedule_end=0.5),
                       sparse_config=SparseConfig(sparsity=0.5), train_dataset=data)
    t2._load_from_checkpoint(str(folder))
    for k, v in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_push_from_checkpoint_uploads_the_sparse_config(tmp_path, monkeypatch):
    uploaded = []

    class FakeApi:
        def upload_folder(self, folder_path, **kw):
            uploaded.append(sorted(os.listdir(folder_path)))

            class Done:
                def done(self):
                    return True
            return Done()

    import transformers.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi(), raising=False)
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4, fix_masks_at=1.0,
                     budget_schedule_end=0.5)
    trainer = SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(32))
    trainer.hub_model_id = "me/x"
    trainer.push_in_progress = None
    trainer.train()
    trainer.args.push_to_hub = True
    trainer._push_from_checkpoint(str(tmp_path / "checkpoint-4"))
    assert "sparse_config.json" in uploaded[-1]


# --- 2: evaluation before any structure is learned is the dense model ----------------------------------
def test_evaluate_before_train_is_the_dense_model(tmp_path):
    data = arithmetic_sequences(32)
    model = tiny_llama()
    args = make_args(tmp_path)
    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5), train_dataset=data,
                            eval_dataset=data)
    trainer.evaluate()
    assert bool((trainer.structure.masks() == 1).all())


def test_tied_scores_never_drop_a_whole_group():
    from hf_sparse.structure import topk_mask

    sizes = [4, 64, 4, 64, 4, 64]
    costs = torch.cat([torch.full((n,), 100.0 if n == 4 else 3.0) for n in sizes])
    mask = topk_mask(torch.ones(costs.numel()), costs, 0.5 * float(costs.sum()), group_sizes=sizes)
    kept = [int(m.sum()) for m in torch.split(mask, sizes)]
    assert all(k > 0 for k in kept), kept
    assert float((mask * costs).sum()) <= 0.5 * float(costs.sum()) + 1e-6


def test_fixing_untrained_scores_is_refused(tmp_path):
    model = hs.sparsify_model(tiny_llama(), SparseConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="never trained"):
        hs.fix_masks(model)
    args = make_args(tmp_path, fix_masks_at=0.0, budget_schedule_end=0.0)
    trainer = SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(32))
    with pytest.raises(ValueError, match="fix_masks_at"):
        trainer.train()


# --- 3: every loss of one structure update is taken on the same weights --------------------------------
def test_all_forwards_of_a_step_see_the_same_weights_even_if_backward_steps(tmp_path):
    """A stand-in for DeepSpeed: the engine steps the optimizer inside backward when gradients sync."""
    data = arithmetic_sequences(32)
    model = tiny_llama()
    args = make_args(tmp_path, max_steps=3, fix_masks_at=1.0, budget_schedule_end=0.5)
    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5, score_init="budget"),
                            train_dataset=data)
    seen = []
    weight = model.model.layers[0].mlp.up_proj.weight
    model.register_forward_pre_hook(lambda m, a, k: seen.append((trainer.state.global_step, weight.detach().clone())),
                                    with_kwargs=True)
    original = trainer.accelerator.backward

    def backward_that_steps(loss, **kw):
        original(loss, **kw)
        if trainer.accelerator.sync_gradients:
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-1.0)

    trainer.accelerator.backward = backward_that_steps
    trainer.train()
    by_step = {}
    for step, w in seen:
        by_step.setdefault(step, []).append(w)
    for step, ws in by_step.items():
        assert len(ws) == 2
        assert torch.equal(ws[0], ws[1]), f"step {step}: the forwards of one structure update saw different weights"


def test_deepspeed_with_several_backward_passes_is_refused(tmp_path):
    args = make_args(tmp_path, weight_grad_samples=2)
    trainer = SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(32))
    trainer.is_deepspeed_enabled = True
    with pytest.raises(ValueError, match="DeepSpeed"):
        trainer._check_backend()


# --- 4: common random numbers under dropout --------------------------------------------------------------
def _dropout_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, num_labels=2, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    config._attn_implementation = "eager"
    return BertForSequenceClassification(config)


def test_dropout_is_the_same_in_every_forward_of_a_step(tmp_path):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 50, (8, 12), generator=g).tolist(),
                              "labels": torch.randint(0, 2, (8,), generator=g).tolist()})
    model = hs.sparsify_model(_dropout_bert(), SparseConfig(sparsity=0.5, score_init="budget"))
    args = make_args(tmp_path, max_steps=1, fix_masks_at=1.0)
    trainer = SparseTrainer(model=model, args=args, train_dataset=data)
    drops = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda m, a, out, name=name: drops.append((name, a[0].shape, out == 0)))
    trainer.train()
    masks = trainer._step_masks[0]
    assert not torch.equal(masks[0], masks[1])
    half = len(drops) // 2
    first, second = drops[:half], drops[half:]
    compared = 0
    for (n1, s1, z1), (n2, s2, z2) in zip(first, second):
        assert n1 == n2
        if s1 == s2:
            assert torch.equal(z1, z2), f"{n1}: different dropout in the two forwards"
            compared += 1
    assert compared >= 4  # the embedding and each block's hidden-state dropouts


# --- 5: units not computed in a step do not move ----------------------------------------------------------
@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch", "sgd"])
def test_units_not_computed_keep_their_weights_and_optimizer_state(tmp_path, optim):
    data = arithmetic_sequences(32)
    model = tiny_llama()
    args = make_args(tmp_path, max_steps=4, optim=optim, weight_decay=0.1, fix_masks_at=0.5, budget_schedule_end=0.0,
                     learning_rate=1e-2)
    if optim == "sgd":
        args.optim_args = None
    trainer = SparseTrainer(model=model, args=args, sparse_config=SparseConfig(sparsity=0.5, score_init="budget"),
                            train_dataset=data)
    layer = model.model.layers[1].mlp.down_proj  # a consumer: a dropped neuron is a column
    group = layer.group
    records = []

    class Snap(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            opt = trainer.optimizer
            st = opt.state.get(layer.weight, {})
            records.append((layer.weight.detach().clone(), {k: v.clone() for k, v in st.items() if torch.is_tensor(v) and v.shape == layer.weight.shape},
                            trainer._computed_units().clone()))

        def on_optimizer_step(self, args, state, control, **kwargs):
            st = trainer.optimizer.state.get(layer.weight, {})
            w0, s0, computed = records[-1]
            offset = sum(g.num_units for g in trainer.structure.groups[: trainer.structure.groups.index(group)])
            dropped = (computed[offset: offset + group.num_units] == 0).nonzero().squeeze(1)
            assert dropped.numel() > 0
            assert torch.equal(layer.weight.detach()[:, dropped], w0[:, dropped]), "a dropped unit's weight moved"
            for k, v in s0.items():
                assert torch.equal(st[k][:, dropped], v[:, dropped]), f"a dropped unit's optimizer state {k} moved"
            kept = (computed[offset: offset + group.num_units] == 1).nonzero().squeeze(1)
            assert not torch.equal(layer.weight.detach()[:, kept], w0[:, kept])

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:  # the last search step: the weights the mask is fixed on
                at_fixing.append(layer.weight.detach().clone())

    at_fixing = []
    trainer.add_callback(Snap())
    trainer.train()
    assert len(records) == 4  # two search steps, two fixed steps
    # In the fixed steps the dropped entries are set aside and zero in the live model (the checks above then compare
    # zeros, which is what makes that phase free); what matters is that their real values come back afterwards:
    # the fixed mask's dropped columns hold exactly the weights they had when the mask was fixed.
    dropped = (group.mask == 0).nonzero().squeeze(1)
    assert float(at_fixing[0][:, dropped].abs().sum()) > 0
    assert torch.equal(layer.weight.detach()[:, dropped], at_fixing[0][:, dropped])


# --- 6: the structure state stays float32 -----------------------------------------------------------------
def test_structure_state_stays_float32_under_any_model_dtype():
    model = hs.sparsify_model(tiny_llama(), SparseConfig(sparsity=0.5))
    model.to(torch.bfloat16)
    for g in hs.SparseStructure(model):
        assert g.scores.dtype == torch.float32 and g.params_per_unit.dtype == torch.float32
        assert g.mask.dtype == torch.float32
    model.half()
    assert all(g.scores.dtype == torch.float32 for g in hs.SparseStructure(model))
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float16


def _classification_data(n=32):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(0, 50, (n, 12), generator=g).tolist(),
                              "labels": torch.randint(0, 2, (n,), generator=g).tolist()})


@pytest.mark.parametrize("mode", ["pure", "autocast"])
@pytest.mark.parametrize("task", ["clm", "cls"])
def test_bf16_training_keeps_the_loss_difference_in_float32(tmp_path, mode, task):
    data = arithmetic_sequences(32) if task == "clm" else _classification_data()
    base = tiny_llama() if task == "clm" else _dropout_bert()
    model = hs.sparsify_model(base, SparseConfig(sparsity=0.5, score_init="budget"))
    if mode == "pure":
        model.to(torch.bfloat16)
    args = make_args(tmp_path, max_steps=2, fix_masks_at=1.0, bf16=mode == "autocast")
    trainer = SparseTrainer(model=model, args=args, train_dataset=data)
    costs_before = trainer._costs.clone()
    trainer.train()
    assert trainer._costs.dtype == torch.float32 and torch.equal(trainer._costs, costs_before)
    losses = trainer._step_losses.flatten()
    assert torch.isfinite(losses).all()
    # float32 losses: not on the bf16 grid (a bf16 loss of ~4 has steps of 1/32)
    assert any(float(v) != float(torch.tensor(float(v)).to(torch.bfloat16).float()) for v in losses)


# --- 7: mask_groups on a short last batch -----------------------------------------------------------------
def test_mask_groups_survive_a_last_batch_smaller_than_the_groups(tmp_path):
    data = arithmetic_sequences(10)  # batches of 8 and 2
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=1, mask_groups=4, fix_masks_at=1.0)
    trainer = SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5, score_init="budget"),
                            train_dataset=data)
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))


# --- 8: top-K on a 7B-sized structure is vectorised -------------------------------------------------------
def test_topk_mask_is_exact_against_the_reference_greedy():
    from hf_sparse.structure import topk_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 200
        costs = torch.where(torch.rand(n, generator=g) < 0.2, torch.tensor(50.0), torch.tensor(3.0))
        scores = torch.rand(n, generator=g).round(decimals=1)  # many ties
        budget = float(costs.sum()) * float(torch.rand(1, generator=g))
        sizes = [50, 50, 100]
        got = topk_mask(scores, costs, budget, group_sizes=sizes)
        # reference: sort by (score desc, position in group asc), then greedy in that order
        pos = torch.cat([(torch.arange(s) + 0.5) / s for s in sizes]).double()
        order = sorted(range(n), key=lambda i: (-float(scores[i]), float(pos[i]), i))
        left, ref = budget, torch.zeros(n)
        for i in order:
            if costs[i] <= left + 1e-9 * max(budget, 1.0):
                ref[i] = 1
                left -= float(costs[i])
        assert torch.equal(got, ref), trial


# --- silent cases of the probe: clear errors --------------------------------------------------------------
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_structure_learning_rate_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="structure_learning_rate"):
        make_args(tmp_path, structure_learning_rate=value)


def test_scores_that_turn_non_finite_stop_training_with_a_clear_error(tmp_path, monkeypatch):
    trainer = SparseTrainer(model=tiny_llama(), args=make_args(tmp_path, max_steps=3, fix_masks_at=1.0),
                            sparse_config=SparseConfig(sparsity=0.5, score_init="budget"),
                            train_dataset=arithmetic_sequences(32))
    create = trainer._create_structure_optimizer

    def blow_up():  # what an infinite learning rate did before it was refused in the arguments
        create()
        trainer.structure_optimizer.param_groups[0]["lr"] = float("inf")

    monkeypatch.setattr(trainer, "_create_structure_optimizer", blow_up)
    with pytest.raises(RuntimeError, match="non-finite"):
        trainer.train()


def test_importance_warmup_that_rounds_to_zero_steps_still_warms_up_one_step(tmp_path):
    args = make_args(tmp_path, max_steps=10, importance_warmup=0.01, budget_schedule_start=0.0,
                     budget_schedule_end=0.0, fix_masks_at=0.8)
    trainer = SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(32))
    trainer.train()
    assert trainer._importance.steps == 1  # the informed start ran (it was skipped silently before)
    assert not trainer.structure.scores_tied()


def test_a_mask_fixed_where_the_warmup_ends_waits_for_the_rounded_up_warmup(tmp_path):
    # 0.08 of 4 steps rounds to 0 for both: the warm-up takes its one step, and the mask is fixed after it
    # (it was fixed at step 0 before, from tied scores, and the run stopped)
    schedule = dict(importance_warmup=0.08, budget_schedule_start=0.08, budget_schedule_end=0.08, fix_masks_at=0.08)
    args = make_args(tmp_path, max_steps=4, **schedule)
    trainer = SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                            train_dataset=arithmetic_sequences(32))
    assert trainer.is_fixed(1) and not trainer.is_fixed(0) and trainer.in_importance_warmup(0)
    trainer.train()
    assert trainer._importance.steps == 1 and all(bool(g.fixed) for g in trainer.structure)


def test_truncated_structure_state_names_the_file(tmp_path):
    data = arithmetic_sequences(64)
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, fix_masks_at=1.0)
    SparseTrainer(model=tiny_llama(), args=args, sparse_config=SparseConfig(sparsity=0.5),
                  train_dataset=data, callbacks=[]).train()
    path = tmp_path / "checkpoint-2" / "sparse_structure_state.pt"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    trainer = SparseTrainer(model=tiny_llama(), args=make_args(tmp_path, max_steps=4, fix_masks_at=1.0),
                            sparse_config=SparseConfig(sparsity=0.5), train_dataset=data)
    with pytest.raises(ValueError, match="sparse_structure_state.pt"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_meta_device_model_is_refused_before_patching():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="meta"):
        hs.sparsify_model(model, SparseConfig(sparsity=0.5))
    assert not hs.is_sparsified(model)


def test_a_killed_save_leaves_no_temporary_folder_behind(tmp_path):
    model = hs.sparsify_model(tiny_llama(), SparseConfig(sparsity=0.5))
    target = tmp_path / "out"
    # what a save killed midway leaves: a temporary folder of a process that no longer runs
    stale = tmp_path / ".out.tmp-999999999-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    hs.save_sparse_pretrained(model, str(target))
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 11: a planted structure is found ---------------------------------------------------------------------
def plant_harmful_neurons(model, fraction=0.25, scale=3.0, seed=0):
    """Make a fixed `fraction` of each MLP's neurons harmful: when computed, their activation is replaced by noise
    of a large scale. Returns {group: harmful unit indices}."""
    g = torch.Generator().manual_seed(seed)
    harmful = {}
    for layer in model.model.layers:
        down = layer.mlp.down_proj
        group = down.group
        bad = torch.randperm(group.num_units, generator=g)[: int(fraction * group.num_units)].sort().values
        harmful[group] = bad

        def pre_hook(module, args, group=group, bad=bad):
            x = args[0]
            computed = group.kept if group.gathers else torch.arange(group.num_units)
            positions = torch.isin(computed, bad).nonzero().squeeze(1)
            if group.none_kept or positions.numel() == 0:
                return None
            x = x.clone()
            x[..., positions] = scale * torch.randn(x[..., positions].shape)
            return (x,)

        down.register_forward_pre_hook(pre_hook)
    return harmful


def trained_tiny_llama(steps=150):
    """The tiny Llama after a short dense fit of the toy task: its loss then depends on what the MLPs compute."""
    model = tiny_llama()
    data = arithmetic_sequences(256)
    ids = torch.tensor(data["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = ids[torch.randint(0, ids.shape[0], (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_the_structure_update_drops_planted_harmful_units(tmp_path):
    """16 of the 64 neurons of each MLP are made harmful (noise of scale 1 where they are computed) and the budget
    keeps 75%: the 32 harmful units are what should go. A random choice keeps 24 of them (expected), a search
    with the estimator's sign flipped or the two losses swapped keeps ~all 32; the search keeps at most 9 (6
    measured on the AMD EPYC here; 10 before VR-PGE gave units drawn alike in both samples an exact 0, so the bound
    also guards that fix; units that reach a score of 0 or 1 early stay there, the known limit of the plain
    search)."""
    model = hs.sparsify_model(trained_tiny_llama(), SparseConfig(sparsity=0.25, granularity=["neuron"]))
    harmful = plant_harmful_neurons(model, scale=1.0)
    args = make_args(tmp_path, max_steps=150, learning_rate=0.0, fix_masks_at=1.0, budget_schedule_end=0.5,
                     structure_learning_rate=0.02, mask_groups=4, logging_steps=50)
    trainer = SparseTrainer(model=model, args=args, train_dataset=arithmetic_sequences(256))
    trainer.train()
    mask = dict(zip(trainer.structure.groups, trainer.structure.split(trainer.topk_mask())))
    kept_bad = sum(int(mask[g][bad].sum()) for g, bad in harmful.items())
    bad_scores = torch.cat([g.scores[bad] for g, bad in harmful.items()])
    good_scores = torch.cat([g.scores[torch.ones(g.num_units, dtype=torch.bool).index_fill(0, bad, False)]
                             for g, bad in harmful.items()])
    assert kept_bad <= 9, f"{kept_bad} of 32 harmful units kept (a random choice keeps 24)"
    assert float(good_scores.mean()) - float(bad_scores.mean()) > 0.3


def test_mask_group_chunks_follow_the_trainers_token_count_across_micro_batches(tmp_path):
    """With gradient accumulation the Trainer normalises by the tokens of the whole step (and, with
    average_tokens_across_devices, of every rank): the chunks must add up to that, not to a mean of means."""
    from datasets import Dataset

    rows = arithmetic_sequences(16)
    ids = rows["input_ids"]
    labels = [[-100] * (2 + 10 * (i >= 8)) + row[2 + 10 * (i >= 8):] for i, row in enumerate(ids)]  # 2nd half: few
    data = Dataset.from_dict({"input_ids": ids, "labels": labels})
    model = hs.sparsify_model(tiny_llama(), SparseConfig(sparsity=0.5, score_init="budget"))
    args = make_args(tmp_path, max_steps=1, mask_groups=2, gradient_accumulation_steps=2, per_device_train_batch_size=8,
                     learning_rate=0.0, max_grad_norm=0.0)
    args.dataloader_drop_last = True
    trainer = SparseTrainer(model=model, args=args, train_dataset=data)
    seen, batches = {}, []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen["grad"] = model.model.layers[1].mlp.down_proj.weight.grad.clone()

    trainer.add_callback(Grab())
    original = trainer.compute_loss

    def record(model_, inputs, *a, **k):
        if torch.is_grad_enabled():
            batches.append({k_: v.clone() for k_, v in inputs.items() if k_ in ("input_ids", "labels")})
        return original(model_, inputs, *a, **k)

    trainer.compute_loss = record
    trainer.train()
    masks = trainer._step_masks
    structure = hs.SparseStructure(model)
    total = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    model.zero_grad()
    for i, b in enumerate(batches):  # micro-batch, chunk alternate: chunk g = i % 2
        structure.set_masks(masks[i % 2, 0])
        out = model(input_ids=b["input_ids"], labels=b["labels"], num_items_in_batch=total)
        out.loss.backward()
    torch.testing.assert_close(seen["grad"], model.model.layers[1].mlp.down_proj.weight.grad, atol=1e-6, rtol=1e-5)
