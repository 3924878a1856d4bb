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
