"""Losses against plain loops (the normalisation in losses.py's docstring) and schedule values."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from clt_ray.config import LossConfig, LRSchedule, SparsitySchedule
from clt_ray.nn.losses import mse_loss, mse_per_layer, preact_loss, tanh_sparsity

DT = torch.float64


def test_losses_match_loops():
    torch.manual_seed(0)
    B, L, d, F = 5, 3, 4, 6
    y, y_hat = torch.randn(B, L, d, dtype=DT), torch.randn(B, L, d, dtype=DT)
    acts = torch.randn(B, L, F, dtype=DT).clamp_min(0)
    pre = torch.randn(B, L, F, dtype=DT)
    norms, theta, c = torch.rand(L, F, dtype=DT), torch.rand(L, F, dtype=DT), 2.5

    mse = sum(((y[b, k] - y_hat[b, k]) ** 2).sum() for b in range(B) for k in range(L)) / B
    tanh = sum(math.tanh(c * acts[b, l, i] * norms[l, i]) for b in range(B) for l in range(L)
               for i in range(F)) / B
    pre_t = sum(max(theta[l, i] - pre[b, l, i], 0) * norms[l, i] for b in range(B)
                for l in range(L) for i in range(F)) / B
    pre_0 = sum(max(-pre[b, l, i], 0) * norms[l, i] for b in range(B) for l in range(L)
                for i in range(F)) / B

    assert mse_loss(y_hat, y).item() == pytest.approx(mse.item())
    assert mse_per_layer(y_hat, y).sum().item() == pytest.approx(mse.item())
    assert mse_per_layer(y_hat, y)[1].item() == pytest.approx(
        ((y[:, 1] - y_hat[:, 1]) ** 2).sum().item() / B)
    assert tanh_sparsity(acts, norms, c).item() == pytest.approx(tanh)
    assert preact_loss(pre, norms, theta).item() == pytest.approx(float(pre_t))
    assert preact_loss(pre, norms).item() == pytest.approx(float(pre_0))


def test_sparsity_schedule_key_steps():
    lin = SparsitySchedule(final=2.0, wait_frac=0.2, ramp_frac=0.5)
    assert [lin.at(s, 100) for s in (0, 19, 20, 45, 70, 99)] == pytest.approx(
        [0, 0, 0, 1.0, 2.0, 2.0])
    cos = SparsitySchedule(final=2.0, ramp_frac=0.4, shape="cosine")
    assert [cos.at(s, 100) for s in (0, 10, 20, 40, 80)] == pytest.approx(
        [0, 2 * (1 - math.cos(math.pi / 4)) / 2, 1.0, 2.0, 2.0])
    assert SparsitySchedule(final=3.0, wait_frac=0.5, ramp_frac=0.0).at(50, 100) == 3.0
    assert SparsitySchedule(final=1.0).at(50, 100) == pytest.approx(0.5)  # default: whole-run ramp
    with pytest.raises(ValidationError, match="exceeds 1"):
        SparsitySchedule(wait_frac=0.6, ramp_frac=0.6)
    with pytest.raises(ValueError, match="total_steps"):
        lin.at(0, 0)


def test_lr_schedule_key_steps():
    s = LRSchedule(lr=1.0, warmup_frac=0.1, decay="linear", decay_start_frac=0.5, final_frac=0.1)
    assert [s.at(t, 100) for t in (0, 4, 9, 10, 49, 50, 75, 100)] == pytest.approx(
        [0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 0.55, 0.1])
    c = LRSchedule(lr=2.0, warmup_frac=0.0, decay="cosine", decay_start_frac=0.0)
    assert [c.at(t, 100) for t in (0, 50, 100)] == pytest.approx([2.0, 1.0, 0.0])
    assert LRSchedule(lr=3.0, warmup_frac=0.0, decay="constant").at(99, 100) == 3.0
    with pytest.raises(ValidationError, match="decay_start_frac"):
        LRSchedule(warmup_frac=0.5, decay_start_frac=0.2)
    with pytest.raises(ValidationError, match="warmup_frac"):
        LRSchedule(warmup_frac=1.5)
    with pytest.raises(ValidationError, match="lr"):
        LRSchedule(lr=0)


def test_loss_config_rejects_unknown_and_negative():
    with pytest.raises(ValidationError, match="preact_coef"):
        LossConfig(preact_coef=-1)
    with pytest.raises(ValidationError, match="lambda"):
        LossConfig(lambda_=1.0)
