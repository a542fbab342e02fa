"""Losses and schedules of docs/design.md §2.

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

import torch
import torch.nn.functional as F
from torch import Tensor


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
