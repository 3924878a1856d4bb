"""Data parallel on CPU: 2 real processes under `accelerate launch --multi_gpu` (gloo)."""

import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two(script: str, *args: str, timeout: int = 600, **env) -> tuple[dict, dict]:
    """Run tests/scripts/`script` on 2 processes (torchrun, gloo, one thread each); the ranks' result files."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = args[0]
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(HERE, "scripts", script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (torch.load(os.path.join(out, "rank0.pt"), weights_only=False),
            torch.load(os.path.join(out, "rank1.pt"), weights_only=False))


@pytest.mark.parametrize("start", ["plain", "informed", "forward_search", "forward_search_units", "extended"])
def test_two_processes_agree_on_masks_scores_and_weights(tmp_path, start):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           os.path.join(HERE, "scripts", "ddp_train.py"), str(tmp_path), "gather", start]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # (each run: ~15 s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    assert torch.equal(r0["scores"], r1["scores"])
    assert torch.equal(r0["masks"], r1["masks"])
    assert r0["params"].keys() == r1["params"].keys()
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    # the run ends in the fixed phase on the top-K, at the target, of the scores both ranks hold (computed here
    # with the public topk_mask), not on a mask drawn or fixed from other scores. (Whether the search finds the
    # units that matter is test_trainer.py's planted-units test: 12 search steps are too few to tell here.)
    fixed = [h["sparse/fixed"] for h in r0["log_history"] if "sparse/fixed" in h]
    assert fixed[-1] == 1.0
    from trainer_helpers import tiny_llama

    import hf_sparse as hs

    structure = hs.SparseStructure(hs.sparsify_model(tiny_llama(), hs.SparseConfig(sparsity=0.5)))
    costs = structure.costs("params")
    topk = hs.topk_mask(r0["scores"], costs, 0.5 * float(costs.double().sum()), group_sizes=structure.sizes)
    assert torch.equal(r0["masks"], topk) and 0 < int(topk.sum()) < topk.numel()
    if start.startswith("forward_search"):
        # each rank ran the forward-only search on its own batches; the losses were averaged over the ranks, so the
        # scores above agree bit for bit (without the average they part at the first step)
        assert r0["structure_run"]["forward_search_steps"] == 3 == r1["structure_run"]["forward_search_steps"]
        assert r0["structure_run"]["forward_search"] == ("units" if start.endswith("units") else "allocation")
    if start == "extended":
        # rank 1's loss is 2 higher (1 per micro-batch): by its own levels rank 0 would end the warm-up at step 12
        # and rank 1 later (and wait there forever for rank 0's next collective); each step's loss is averaged
        # over the ranks before it enters the levels, so both hold the same levels and end it at step 16
        runs = r0["structure_run"], r1["structure_run"]
        assert runs[0]["warmup_extension_steps"] == runs[1]["warmup_extension_steps"] == 4
        assert runs[0]["fixed_steps"] == runs[1]["fixed_steps"] == 8
        assert r0["warmup_levels"] == r1["warmup_levels"]
        first_level, last_level = r0["warmup_levels"]
        assert 5.0 < first_level < 5.3 and last_level <= 0.88 * first_level  # the ranks' mean (about 4.1 and 6.1)
    if start != "plain":
        # each rank saw its own batches, but every step's gate derivatives were averaged over the ranks before
        # they were squared: both hold the importance of the whole step's batch, bit for bit
        assert torch.equal(r0["importance"], r1["importance"]) and float(r0["importance"].sum()) > 0
        first = r0["log_history"][0]["sparse/train_flops_vs_dense"]
        if start in ("informed", "extended"):
            assert first == 1.0  # the warm-up steps were dense
        else:  # the forward-only search's forwards are counted with the warm-up's last step: 4 dense steps + 3 x 4
            assert 1.0 < first < 2.0  # forwards of half the units (1/3 of a step each): about 1.5


def test_fsdp2_sharded_weights_give_the_single_process_gradients_and_identical_scores(tmp_path):
    """FSDP2 (`fully_shard`, 2 processes over gloo) under the gathered layers: each rank's half batch, the
    gradient reduce-scattered by FSDP equals the whole batch's gradient in one process (tolerance 1e-6, float32
    reductions in another order), dropped units get exactly zero, and a structure step (shared-seed masks, losses
    all-reduced, VR-PGE, Adam, projection) leaves identical masks and scores on both ranks. Handed a sharded
    model outside an FSDP set-up, SparseTrainer refuses it (the Trainer path is the next test)."""
    r0, r1 = torchrun_two("fsdp2_step.py", str(tmp_path))
    assert r0["world"] == r1["world"] == 2
    assert r0["grads"].keys() == r0["ref_grads"].keys() and len(r0["grads"]) > 10
    for name, grad in r0["grads"].items():
        torch.testing.assert_close(grad, r0["ref_grads"][name], atol=1e-6, rtol=1e-5, msg=name)
        assert torch.equal(grad, r1["grads"][name]), name
    # the neurons of layer 0's MLP the mask drops: their rows of up_proj get no gradient at all. Groups in module
    # order: [heads 0, neurons 0, heads 1, neurons 1], neurons = up_proj's rows
    names, mask = r0["names"], r0["fixed_mask"]
    up = r0["grads"]["model.layers.0.mlp.up_proj.weight"]
    heads = (mask.numel() - 2 * up.shape[0]) // 2
    neurons0 = mask[heads: heads + up.shape[0]]
    assert names[1] == "model.layers.0.mlp.sparse_neurons" and 0 < int(neurons0.sum()) < up.shape[0]
    assert torch.all(up[neurons0 == 0] == 0) and torch.all(up[neurons0 == 1].abs().sum(1) > 0)
    assert torch.equal(r0["masks"], r1["masks"]) and torch.equal(r0["scores"], r1["scores"])
    # the known answer: the three steps replayed in one process on the unsharded model and the whole batch draw the
    # same masks and end on the same scores (float32 losses summed in another order: within 1e-6)
    assert torch.equal(r0["masks"], r0["replay_masks"])
    torch.testing.assert_close(r0["scores"], r0["replay_scores"], atol=1e-6, rtol=0)
    assert not torch.equal(r0["scores"], torch.full_like(r0["scores"], 0.5))  # (not trivially: both at the start)
    # handed to SparseTrainer without an FSDP set-up, the sharded model is refused up front with the fix
    assert r0["refusal"] is not None and "already sharded" in r0["refusal"] and "fsdp.yaml" in r0["refusal"]


def test_sparse_trainer_under_fsdp2_matches_one_process_resumes_exactly_and_exports(tmp_path):
    """`SparseTrainer` through the Trainer's own FSDP2 path (`fsdp="full_shard"`, version 2) on 2 CPU processes
    (gloo; `hf_sparse.backends.fsdp_on_cpu` keeps Accelerate from dropping FSDP for CPU processes): the weights are
    DTensors, both ranks hold the same scores and masks, and against one process on the same 8 batches of 8 the
    masks are identical, the scores within 1e-6 (measured identical) and every weight within 1e-5 (measured 3e-6:
    float32 reductions in another order). A run resumed from checkpoint-4 ends bit for bit where the uninterrupted one did; `save_model` and
    `unsharded_model` gather one sparse checkpoint that reloads with exactly the trained weights, and its shrunk
    export (with its card) computes the same logits."""
    from trainer_helpers import FSDP_ARGS, arithmetic_sequences, tiny_llama

    import hf_sparse as hs

    r0, r1 = torchrun_two("fsdp2_train.py", str(tmp_path))
    assert r0["world"] == 2 and r0["fsdp"] and r0["first"]["sharded"]  # really sharded, not DDP
    first = r0["first"]
    for key in ("scores", "masks"):
        assert torch.equal(first[key], r1["first"][key]), key
        assert torch.equal(first[key], r0["resumed"][key]), key
    assert 0 < float(first["masks"].mean()) < 1 and first["log_history"][-2]["sparse/fixed"] == 1.0
    # the informed start, gradient accumulation and two mask groups under FSDP2: the ranks still agree
    chunked = r0["chunked"]
    assert torch.equal(chunked["scores"], r1["chunked"]["scores"]) and torch.equal(chunked["masks"], r1["chunked"]["masks"])
    assert chunked["log_history"][-2]["sparse/fixed"] == 1.0
    # the forward-only allocation search (the defaults') ran at the end of the warm-up, on both ranks' losses
    assert sum("sparse/search_loss_end" in h for h in chunked["log_history"]) == 1
    assert r0["refusal"] is not None and "teacher_model" in r0["refusal"]  # no warm-up teacher copy under FSDP
    for name, value in first["params"].items():
        assert torch.equal(value, r0["resumed"]["params"][name]), name  # resume is exact
        assert torch.equal(value, r0["reloaded_params"][name]), name  # the gathered checkpoint is the model

    # one process, the same data: per_device 8 = the two ranks' batches of 4 (Accelerate hands batch 2k to rank 0
    # and 2k + 1 to rank 1 from the same seeded order)
    args = hs.SparseTrainingArguments(output_dir=str(tmp_path / "single"), per_device_train_batch_size=8,
                                      use_cpu=True, **FSDP_ARGS)
    trainer = hs.SparseTrainer(model=tiny_llama(), args=args, sparse_config=hs.SparseConfig(sparsity=0.5),
                               train_dataset=arithmetic_sequences(256))
    trainer.train()
    # the two ranks' mean loss and one process's differ in float rounding, which Adam's normalised step carries into
    # the scores (1.1e-5 measured); the masks, chosen from them, must agree exactly
    torch.testing.assert_close(trainer.structure.scores(), first["scores"], atol=1e-4, rtol=0)
    assert torch.equal(trainer.structure.masks(), first["masks"])
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), first["params"][name], atol=1e-5, rtol=0, msg=name)

    torch.testing.assert_close(r0["gathered_logits"], r0["reloaded_logits"], atol=0, rtol=0)
    torch.testing.assert_close(r0["shrunk_logits"], r0["gathered_logits"], atol=1e-5, rtol=1e-5)
    assert r0["shrunk_params"] < r0["dense_params"]
    assert "50.0% of the prunable parameters" in r0["card"]


@pytest.fixture(scope="module")
def one_process_defaults(tmp_path_factory):
    """The DeepSpeed test's run in one process: the defaults' schedule, per_device 8 = the two ranks' batches."""
    from trainer_helpers import DEEPSPEED_ARGS, arithmetic_sequences, tiny_llama

    import hf_sparse as hs

    args = hs.SparseTrainingArguments(output_dir=str(tmp_path_factory.mktemp("single")), per_device_train_batch_size=8,
                                      use_cpu=True, **DEEPSPEED_ARGS)
    trainer = hs.SparseTrainer(model=tiny_llama(), args=args, sparse_config=hs.SparseConfig(sparsity=0.5),
                               train_dataset=arithmetic_sequences(256))
    trainer.train()
    logits = trainer.model.eval()(torch.arange(16)[None] % 64).logits.detach()
    return {"scores": trainer.structure.scores(), "masks": trainer.structure.masks(), "logits": logits,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


@pytest.mark.parametrize("stage", [2, 3])
def test_sparse_trainer_under_deepspeed_zero_matches_one_process_and_resumes_exactly(tmp_path, stage, one_process_defaults):
    """DeepSpeed ZeRO-2 / ZeRO-3 through the Trainer on 2 CPU processes (DeepSpeed's CPU accelerator over gloo,
    `use_cpu=True`), the library's default schedule without its forward search (dense warm-up with the Taylor
    importance, then the informed mask fixed): the same masks and scores as one process on the same data (the
    importance of each step's whole batch: the ranks' gate derivatives are averaged before they are squared), the same losses, the gathered model's
    logits within 1e-5 (measured 3e-7); resuming from checkpoint-6 ends where the uninterrupted run did; with the
    defaults' forward-only allocation search both ranks keep the same mask; a schedule with a training-time search
    is refused (DeepSpeed steps its own fp32 partitions, so hf_sparse cannot hold dropped units still)."""
    import deepspeed  # noqa: F401  (the dev set-up installs it: Makefile; the test is not skipped without it)
    r0, r1 = torchrun_two("deepspeed_train.py", str(tmp_path), str(stage), timeout=300, DS_ACCELERATOR="cpu")
    assert r0["world"] == 2 and r0["deepspeed"] and r0["stage"] == stage
    first, single = r0["first"], one_process_defaults
    for key in ("scores", "masks"):
        assert torch.equal(first[key], r1["first"][key]), key
        assert torch.equal(first[key], r0["resumed"][key]), key
        assert torch.equal(first[key], single[key]), key
    # with the defaults' forward-only allocation search: both ranks step on the mean of their losses and keep the
    # same mask, at the budget (against one process the mean of two half-batch losses differs in the last bits,
    # and the top-K of the shares can differ by a boundary unit, so that comparison runs without the search)
    forward = r0["forward"]
    assert forward["run"]["forward_search_steps"] == 3 and forward["run"]["forward_search"] == "allocation"
    for key in ("scores", "masks"):
        assert torch.equal(forward[key], r1["forward"][key]), key
    assert 0.45 < float(forward["masks"].mean()) < 0.55
    assert 0 < float(first["masks"].mean()) < 1 and first["log_history"][-2]["sparse/fixed"] == 1.0
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(single["losses"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(first["logits"], single["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(r0["resumed"]["logits"], first["logits"], atol=0, rtol=0)
    assert r1["first"]["logits"] is None  # the gathered model lives on the main process only
    assert r0["refusal"] is not None and "DeepSpeed" in r0["refusal"] and "fix_masks_at" in r0["refusal"]
