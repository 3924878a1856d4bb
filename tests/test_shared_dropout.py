"""SharedDropout (common random numbers across a structure update's forwards): a dropout call's mask is drawn
once and reused by the later forwards, the functional dropout that follows draws alike whether the mask was drawn
or reused, dropout keeps its expectation, and a model left in train mode after a failed forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_sparse.shared_dropout import SharedDropout


class Toy(nn.Module):
    """A dropout module, then a functional dropout (as attention probabilities get inside Transformers)."""

    def __init__(self, p=0.5):
        super().__init__()
        self.drop = nn.Dropout(p)
        self.p = p

    def forward(self, x):
        h = self.drop(x)
        return h, F.dropout(torch.ones_like(x), self.p, self.training)


def test_a_mask_is_drawn_once_and_reused_by_the_later_forwards(monkeypatch):
    model = Toy().train()
    shared = SharedDropout(model)
    x = torch.ones(4, 64)
    draws = []
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: draws.append(a) or real_rand(*a, **k))
    with shared.active(123):
        shared.new_forward()
        h1, f1 = model(x)
        shared.new_forward()
        h2, f2 = model(x)
    assert len(draws) == 1  # the second forward reused the mask
    assert torch.equal(h1, h2) and torch.equal(f1, f2)  # the functional dropout after it drew alike too
    assert set(h1.unique().tolist()) == {0.0, 2.0}  # dropped, and kept ones scaled by 1 / (1 - p)
    with shared.active(124):  # another structure update: other bits
        h3, _ = model(x)
    assert not torch.equal(h1, h3)
    assert model.drop.training and not model.drop._forward_hooks and not model.drop._forward_pre_hooks


def test_dropout_keeps_its_expectation_and_its_gradient():
    model = Toy(p=0.25).train()
    x = torch.ones(200, 500, requires_grad=True)
    with SharedDropout(model).active(7):
        h, _ = model(x)
    assert abs(h.mean().item() - 1.0) < 0.01
    h.sum().backward()
    assert torch.equal(x.grad, h.detach())  # d(x * keep / (1 - p)) / dx with x = 1


def test_a_forward_that_raises_leaves_dropout_in_train_mode():
    model = Toy().train()

    class Boom(Exception):
        pass

    def fail(module, args):  # runs after SharedDropout's pre-hook (prepended) turned the module's forward off
        assert not module.training
        raise Boom

    model.drop.register_forward_pre_hook(fail)
    with pytest.raises(Boom), SharedDropout(model).active(1):
        model(torch.ones(2, 3))
    assert model.drop.training


def test_kept_values_are_scaled_as_dropout_scales_them_in_half_precision():
    """1 / (1 - p) multiplies as a scalar: folded into a bf16 mask it would be rounded first (1/0.9 -> 1.109)."""
    model = Toy(p=0.1).train()
    x = torch.randn(64, 256).to(torch.bfloat16)
    with SharedDropout(model).active(5):
        h, _ = model(x)
    kept = h != 0
    assert h.dtype == torch.bfloat16 and kept.float().mean() > 0.8
    torch.testing.assert_close(h[kept], (x * (1.0 / 0.9))[kept], rtol=0, atol=0)
