"""Losses and schedules of docs/design.md §2.

Normalisation, exactly: every loss is a SUM over layers, features and d, and a MEAN over the B
tokens of the batch, in normalised space (x, y scaled by s_in, s_out). So
  mse      = (1/B) Σ_b Σ_k ‖y_bk − ŷ_bk‖²
  sparsity = (1/B) Σ_b Σ_l Σ_i tanh(c · a_bli · ‖W_dec,l,i‖)
  preact   = (1/B) Σ_b Σ_l Σ_i ReLU(θ_li − h_bli) · ‖W_dec,l,i‖
and the training loss is mse + λ(t)·sparsity + λ_p·preact. Sparsity and preact are sums over
features, so on a feature shard they are exactly that shard's share; shards' shares add up.

Schedules are in fractions of the run's total steps, so one config fits any run length.

The training step computes JumpReLU (or ReLU) and both penalties in one autograd node,
`activation_with_losses`: the same values and gradients as `jumprelu` + `tanh_sparsity` +
`preact_loss` (to round-off), with a third of the [B, L, F]-sized temporaries, which on CPU cost
more to allocate (first-touch page faults) than to compute.
"""

from __future__ import annotations

from typing import Any

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


class ActivationLossesFn(torch.autograd.Function):
    """(a, Σ tanh(c·a·n), Σ ReLU(θ − h)·n) for a = JumpReLU_θ(h) (θ None: ReLU, θ = 0 and no
    θ-gradient), sums over everything, h [B, L, F], θ and n = ‖W_dec‖ [L, F]. The backward is
    JumpReLUFn's straight-through estimator (bandwidth ε) applied to the total ∂L/∂a (decoder's
    + the sparsity term's), plus the penalties' own gradients to h, θ and n. It reuses its saved
    buffers in place, so it runs once per graph (no retain_graph)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor | None, norms: Tensor, c: float,
                bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
        th = 0 if theta is None else theta
        mask = pre > th
        acts = torch.where(mask, pre, 0)
        t = torch.mul(acts, c * norms).tanh_()  # kept for the backward: 1 − t²
        r = torch.sub(th, pre).relu_()
        rsum = r.sum(0)
        del r
        ctx.save_for_backward(pre, theta, norms, acts, t, rsum, mask)
        ctx.c, ctx.bandwidth = c, bandwidth
        return acts, t.sum(), (rsum * norms).sum()

    @staticmethod
    def backward(ctx: Any, g_acts: Tensor | None, g_s: Tensor, g_p: Tensor) -> tuple:
        pre, theta, norms, acts, t, rsum, mask = ctx.saved_tensors
        th = 0 if theta is None else theta
        u = t.square_().neg_().add_(1)  # 1 − tanh², in t's buffer
        buf = torch.mul(acts, u)  # one [B, L, F] scratch buffer, reused below
        g_norms = (g_s * ctx.c) * buf.sum(0) + g_p * rsum
        G = u.mul_(g_s * ctx.c * norms)  # ∂(sparsity)/∂a; + the decoder's: the total ∂L/∂a
        if g_acts is not None:
            G.add_(g_acts)
        zero = G.new_zeros(())
        g_theta = None
        if theta is not None and ctx.needs_input_grad[1]:  # the STE: θ-gradient in the window
            window = torch.sub(pre, theta, out=buf).abs_() < ctx.bandwidth / 2
            g_theta = -(theta / ctx.bandwidth) * torch.where(window, G, zero, out=buf).sum(0)
        # ∂(preact)/∂h = −λ_p·n where ReLU(θ − h) > 0; ∂(preact)/∂θ is minus its sum over tokens
        g_pre = torch.where(pre < th, -g_p * norms, zero, out=buf)
        if g_theta is not None:
            g_theta -= g_pre.sum(0)
        g_pre = torch.where(mask, G, g_pre, out=G)  # ∂a/∂h = 1[h > θ] (disjoint from h < θ)
        return g_pre.to(pre.dtype), g_theta, g_norms, None, None


def activation_with_losses(pre: Tensor, theta: Tensor | None, dec_norms: Tensor, c: float,
                           bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
    """(acts, sparsity, preact) for JumpReLU_θ (θ None: ReLU) as the step needs them, in one
    autograd node (ActivationLossesFn): acts as `jumprelu(pre, θ, ε)` or `relu(pre)`, sparsity
    = tanh_sparsity(acts, dec_norms, c), preact = preact_loss(pre, dec_norms, θ)."""
    B = pre.shape[0]
    acts, s, p = ActivationLossesFn.apply(pre, theta, dec_norms, c, bandwidth)
    return acts, s / B, p / B
