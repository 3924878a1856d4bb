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


@pytest.mark.parametrize("start", ["plain", "informed"])
def test_two_processes_agree_on_masks_scores_and_weights(tmp_path, start):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           os.path.join(HERE, "scripts", "ddp_train.py"), str(tmp_path), "gather", start]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    assert torch.equal(r0["scores"], r1["scores"])
    assert torch.equal(r0["masks"], r1["masks"])
    assert r0["params"].keys() == r1["params"].keys()
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    # the structure really moved and reached the target under DDP
    assert 0.0 < float(r0["masks"].mean()) < 1.0
    fixed = [h["sparse/fixed"] for h in r0["log_history"] if "sparse/fixed" in h]
    assert fixed[-1] == 1.0
    sparsity = [h["sparse/sparsity"] for h in r0["log_history"] if "sparse/sparsity" in h]
    assert abs(sparsity[-1] - 0.5) < 0.01
    if start == "informed":
        # each rank measured the importance on its own batches; the start was built from their mean
        assert not torch.equal(r0["local_importance"], r1["local_importance"])
        assert r0["log_history"][0]["sparse/train_flops_vs_dense"] == 1.0  # the warm-up steps were dense


def test_fsdp2_sharded_weights_give_the_single_process_gradients_and_identical_scores(tmp_path):
    """FSDP2 (`fully_shard`, 2 processes over gloo) under the gathered layers: each rank's half batch, the
    gradient reduce-scattered by FSDP equals the whole batch's gradient in one process (tolerance 1e-6, float32
    reductions in another order), dropped units get exactly zero, and a structure step (shared-seed masks, losses
    all-reduced, VR-PGE, Adam, projection) leaves identical masks and scores on both ranks. The SparseTrainer
    path under FSDP2 is not covered (issue 15); handed a sharded model outside an FSDP set-up it refuses it."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(HERE, "scripts", "fsdp2_step.py"),
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
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
    assert not torch.equal(r0["scores"], torch.full_like(r0["scores"], 0.5))  # the scores moved
    # handed to SparseTrainer without an FSDP set-up, the sharded model is refused up front with the fix
    assert r0["refusal"] is not None and "already sharded" in r0["refusal"] and "fsdp.yaml" in r0["refusal"]
