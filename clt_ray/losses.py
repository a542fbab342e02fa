"""Losses and schedules of DESIGN.md §2.

Normalisation, exactly: every loss is a SUM over layers, features and d, and a MEAN over the B
tokens of the batch, in normalised space (x, y scaled by s_in, s_out). So
  mse      = (1/B) Σ_b Σ_k ‖y_bk − ŷ_bk‖²
  sparsity = (1/B) Σ_b Σ_l Σ_i tanh(c · a_bli · ‖W_dec,l,i‖)
  preact   = (1/B) Σ_b Σ_l Σ_i ReLU(θ_li − h_bli) · ‖W_dec,l,i‖
and the training loss is mse + λ(t)·sparsity + λ_p·preact. Sparsity and preact are sums over
features, so on a feature shard they are exactly that shard's share; shards' shares add up.

Schedules are in fractions of the run's total steps, so one config fits any run length.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator
from torch import Tensor

from clt_ray.config import StrictModel


def _fraction(default: float) -> float:
    """A config field in [0, 1] (a fraction of the run's total steps or of a value)."""
    return Field(default=default, ge=0.0, le=1.0)


def mse_loss(y_hat: Tensor, y: Tensor) -> Tensor:
    """Σ over layers and d of the squared error, mean over tokens (y, ŷ [B, L, d])."""
    return (y_hat - y).square().sum() / y.shape[0]


def mse_per_layer(y_hat: Tensor, y: Tensor) -> Tensor:
    """[L]: the mean over tokens of ‖y_k − ŷ_k‖²; sums to mse_loss."""
    return (y_hat - y).square().sum(-1).mean(0)


def tanh_sparsity(acts: Tensor, dec_norms: Tensor, c: float) -> Tensor:
    """(1/B) Σ tanh(c·a·‖W_dec‖): a smooth L0 that also charges for decoder norm, so a feature
    cannot dodge the penalty by shrinking a and growing W_dec. acts [B, L, F], dec_norms [L, F]."""
    return torch.tanh(c * acts * dec_norms).sum() / acts.shape[0]


def preact_loss(pre: Tensor, dec_norms: Tensor, threshold: Tensor | None = None) -> Tensor:
    """(1/B) Σ ReLU(θ − h)·‖W_dec‖ (θ = 0 when None): pushes features that never reach their
    threshold back up, so they do not die. pre [B, L, F], dec_norms and threshold [L, F]."""
    gap = -pre if threshold is None else threshold - pre
    return (F.relu(gap) * dec_norms).sum() / pre.shape[0]


def _check_step(step: int, total_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")


class SparsitySchedule(StrictModel):
    """λ(t): 0 for the first wait_frac of the run, then a ramp over ramp_frac to `final`."""

    final: NonNegativeFloat = 1.0
    wait_frac: float = _fraction(0.0)
    ramp_frac: float = _fraction(1.0)
    shape: Literal["linear", "cosine"] = "linear"

    @model_validator(mode="after")
    def _fits(self) -> SparsitySchedule:
        if self.wait_frac + self.ramp_frac > 1 + 1e-9:
            raise ValueError(f"wait_frac + ramp_frac = {self.wait_frac + self.ramp_frac} exceeds 1")
        return self

    def at(self, step: int, total_steps: int) -> float:
        _check_step(step, total_steps)
        wait, ramp = self.wait_frac * total_steps, self.ramp_frac * total_steps
        if step < wait:
            return 0.0
        frac = 1.0 if ramp == 0 else min(1.0, (step - wait) / ramp)
        if self.shape == "cosine":
            frac = (1 - math.cos(math.pi * frac)) / 2
        return self.final * frac


class LRSchedule(StrictModel):
    """Linear warm-up over warmup_frac, constant, then decay from decay_start_frac to the end,
    down to final_frac·lr."""

    lr: PositiveFloat = 2e-4
    warmup_frac: float = _fraction(0.01)
    decay: Literal["constant", "linear", "cosine"] = "linear"
    decay_start_frac: float = _fraction(0.8)
    final_frac: float = _fraction(0.0)

    @model_validator(mode="after")
    def _ordered(self) -> LRSchedule:
        if self.decay != "constant" and self.decay_start_frac < self.warmup_frac:
            raise ValueError("decay_start_frac must not come before the end of warm-up")
        return self

    def at(self, step: int, total_steps: int) -> float:
        """The learning rate of the update made at `step` (0-based); step 0 already gets
        lr/warmup_steps, so no update is wasted at lr 0."""
        _check_step(step, total_steps)
        warmup = self.warmup_frac * total_steps
        if step < warmup:
            return self.lr * min(1.0, (step + 1) / warmup)
        start = self.decay_start_frac * total_steps
        if self.decay == "constant" or step < start:
            return self.lr
        frac = min(1.0, (step - start) / max(total_steps - start, 1e-12))
        shape = frac if self.decay == "linear" else (1 - math.cos(math.pi * frac)) / 2
        return self.lr * (1 - (1 - self.final_frac) * shape)


class LossConfig(StrictModel):
    """Coefficients of mse + λ(t)·sparsity + λ_p·preact."""

    sparsity: SparsitySchedule = SparsitySchedule()
    tanh_c: PositiveFloat = 1.0
    """c in tanh(c·a·‖W_dec‖)."""
    preact_coef: NonNegativeFloat = 3e-6
    """λ_p."""
