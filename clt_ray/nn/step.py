"""The training step of docs/design.md §3, written once for one process and for Ray shard actors.

A shard (features [start, stop) of every layer) computes its partial reconstruction ŷ⁽ˢ⁾ (no b_dec),
gets Σ_s ŷ⁽ˢ⁾ from `reduce_sum` (identity in one process, an all-reduce on Ray), adds the replicated
b_dec once, and computes g = ∂L_mse/∂ŷ locally. It then backpropagates g through its own ŷ⁽ˢ⁾ only:
no autograd crosses the collective, so every gradient is exact (never N× inflated). Sparsity and
pre-activation terms are sums over features, hence local. b_dec's gradient is ∂L_mse/∂ŷ summed over
tokens, computed identically on every shard, so b_dec stays identical everywhere without any
communication. A single small vector all-reduce then carries the squared gradient norm (b_dec
excluded there and added once after) and the loss statistics, so clipping uses the global norm
and every shard reports global numbers.

The decoder runs dense (one matmul per source layer) or sparse (`SparseDecode`: only the active
(token, feature) pairs, forward and backward), chosen per step by `use_sparse_decoder` from the
density of the entries the backward needs (`CrossLayerTranscoder.grad_support`: L0/F, plus
JumpReLU's in-window share). Both give the same gradients to round-off (JumpReLU's θ included);
the sparse decoder's cost grows with L0·L²·d, the dense one's with F·L²·d. The sparse step
writes W_dec's gradient itself (decoder term + decoder-norm term) into the previous step's
gradient tensors, overwritten in place, not reallocated. The encoder stays dense. JumpReLU/ReLU
and both penalties run as one autograd node (`losses.activation_with_losses`).

Optimizer: plain torch Adam over the shard's parameters, kept in fp32 (the master weights; the
Adam moments follow the parameters' dtype). `train_step` = schedules + `compute_grads` + Adam.
The limit of an exact sparse step: W_dec's gradient is dense anyway (the penalties' ∂/∂‖W_dec,i‖
reaches every row: the pre-activation term charges every feature below its threshold), and Adam
moves every row every step even where a gradient is 0 (its moments decay, the weights follow), so
the step still makes ~13 passes over all of W_dec (norms, the norm term, the global norm,
clipping, Adam's fused update of weights and moments), ∝ F·d·L², whatever L0 is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from clt_ray.config import LossConfig, OptimConfig
from clt_ray.nn.clt import CrossLayerTranscoder, Gather, SparseDecode
from clt_ray.nn.losses import (
    activation_with_losses,
    mse_loss,
    mse_per_layer,
    preact_loss,
    tanh_sparsity,
)

ReduceSum = Callable[[Tensor], Tensor]
Decoder = Literal["auto", "dense", "sparse"]

SPARSE_MAX_DENSITY: dict[str, float] = {"cpu": 0.03}
"""Per device type, the support density (`grad_support`'s share of the [B, L, F] entries) up to
which `auto` decodes sparsely. CPU (bench/train_step.py --sections c, whole train_step, 2
cores): sparse ÷ dense step time crosses 1 at ~4% on the toy shape (L 4, d 96, F 768, B 1024:
1.13× faster at 1%, 0.99× at 4.3%, 0.60× at 8.4%) and at ~9% on GPT-2 small's (L 12, d 768,
F 6144, B 256: 2.8× at 1.3%, 1.5× at 4.3%, 1.1× at 8.3%, 0.61× at 16.8%); 3% is below both.
Devices not listed (CUDA: not measured yet) decode densely under `auto`."""


def use_sparse_decoder(decoder: Decoder, density: float, device_type: str) -> bool:
    """Whether the step decodes sparsely: `sparse`/`dense` as told; `auto` when the density of the
    entries the backward needs is at most this device's measured crossover (SPARSE_MAX_DENSITY),
    since below it the sparse products cost less than the dense matmuls and above it they cost
    more (their per-entry cost is a gather, not a cache-blocked matmul)."""
    if decoder not in ("auto", "dense", "sparse"):
        raise ValueError(f"decoder must be auto, dense or sparse, got {decoder!r}")
    if decoder != "auto":
        return decoder == "sparse"
    return density <= SPARSE_MAX_DENSITY.get(device_type, -1.0)


def identity_reduce(t: Tensor) -> Tensor:
    """reduce_sum for a single shard holding the whole CLT."""
    return t


@dataclass(frozen=True)
class Collectives:
    """How one shard of a (possibly data-parallel) shard group talks to the others; the default
    is one process holding the whole CLT. docs/design.md §3.

    reduce_sum: Σ over the shards of this replica (the all-reduce of the partial reconstruction).
    gather: concatenation over those shards along features (TopK/BatchTopK only).
    replica_mean: averages a list of tensors in place over the replicas of this shard (their
    gradients: R replicas of batch B equal one of batch R·B).
    replica_sum: Σ over the replicas of this shard (dead-feature firing, token counts).
    replicas: the number of replicas."""

    reduce_sum: ReduceSum = identity_reduce
    gather: Gather | None = None
    replica_mean: Callable[[list[Tensor]], None] | None = None
    replica_sum: ReduceSum = identity_reduce
    replicas: int = 1


LOCAL = Collectives()


@dataclass
class StepResult:
    """One step's numbers. Everything is global (identical on every shard) except `fired`."""

    loss: float  # mse + λ·sparsity + λ_p·preact
    mse: float
    sparsity: float  # unweighted tanh sum (losses.py normalisation)
    preact: float  # unweighted
    lam: float  # λ(t) used
    grad_norm: float  # before clipping
    mse_per_layer: Tensor  # [L]
    l0_per_layer: Tensor  # [L]: active features per token, mean over tokens
    fired: Tensor  # [L, F_local] bool: this shard's features active on some token (dead counters)
    lr: float | None = None
    sparse_decoder: bool = False  # this shard's step decoded sparsely (`use_sparse_decoder`)


def make_optimizer(model: CrossLayerTranscoder, cfg: OptimConfig) -> torch.optim.Adam:
    """Adam over the shard's (fp32) parameters with torch's fused kernel (CPU and CUDA): on CPU it
    is 8x faster than the foreach one at GPT-2 shape (0.10 s vs 0.83 s per update of 141 M
    parameters) and equal to it to 1e-17 in fp64."""
    fused = model.b_dec.device.type in ("cpu", "cuda") or None
    return torch.optim.Adam(model.parameters(), lr=cfg.lr.lr, betas=cfg.betas, eps=cfg.eps,
                            fused=fused)


def compute_grads(
    model: CrossLayerTranscoder,
    x: Tensor,
    y: Tensor,
    loss_cfg: LossConfig,
    lam: float,
    *,
    reduce_sum: ReduceSum = identity_reduce,
    gather: Gather | None = None,
    max_grad_norm: float | None = None,
    replica_mean: Callable[[list[Tensor]], None] | None = None,
    decoder: Decoder = "auto",
) -> StepResult:
    """Set the shard's .grad to the exact gradient of the global loss, clipped by global norm.

    x, y: the raw batch [B, L, d] (every shard gets the same one); normalised here with the model's
    scales. reduce_sum(t) must return Σ over shards of t (it may modify t in place). gather is only
    needed for TopK/BatchTopK on a shard. replica_mean (data parallelism) averages the gradients
    over the replicas of this shard before the global norm is taken. decoder: dense, sparse, or
    auto (`use_sparse_decoder`; each shard chooses for itself, both are exact). Gradients are
    overwritten, not accumulated (W_dec's in place when sparse: module doc).
    """
    reuse = [w.grad for w in model.W_dec]  # the sparse step writes W_dec's gradient into these
    model.zero_grad(set_to_none=True)
    xn, yn = model.normalize(x, y)
    if yn.shape != xn.shape:
        raise ValueError(f"target shape {list(y.shape)} differs from input shape {list(x.shape)}")
    B = x.shape[0]

    # JumpReLU/ReLU: the activation and both penalties in one autograd node (losses.py)
    fused = model.cfg.activation in ("jumprelu", "relu")
    if fused:
        pre, acts = model.preactivations(xn), None
    else:
        pre, acts = model.encode(xn, gather)
    support = None
    if decoder != "dense":
        support = model.grad_support(pre, acts)
        density = torch.count_nonzero(support).item() / support.numel() if decoder == "auto" else 0.0
        if not use_sparse_decoder(decoder, density, xn.device.type):
            support = None
    if support is None:
        reuse.clear()  # autograd makes new ones; holding the old would add a W_dec to the peak
        dec_norms = model.decoder_norms()
    else:  # W_dec gets no autograd edge: _write_decoder_grads writes its gradient
        dec_norms = torch.stack([torch.linalg.vector_norm(w.detach(), dim=(1, 2))
                                 for w in model.W_dec]).requires_grad_(True)
    if fused:
        acts, sparsity, preact = activation_with_losses(
            pre, model.threshold, dec_norms, loss_cfg.tanh_c, model.cfg.bandwidth)
    else:
        sparsity = tanh_sparsity(acts, dec_norms, loss_cfg.tanh_c)
        preact = preact_loss(pre, dec_norms, model.threshold)
    sparse = None if support is None else SparseDecode(model, acts, support)
    partial = model.decode(acts, bias=False) if sparse is None else sparse.decode(acts)

    with torch.no_grad():
        summed = reduce_sum(partial.detach().clone())
    summed = summed.detach().requires_grad_(True)
    y_hat = summed + model.b_dec
    mse = mse_loss(y_hat, yn)
    g, g_b_dec = torch.autograd.grad(mse, [summed, model.b_dec])

    local_aux = lam * sparsity + loss_cfg.preact_coef * preact
    torch.autograd.backward([partial, local_aux], [g, torch.ones_like(local_aux)])
    model.b_dec.grad = g_b_dec
    if sparse is not None:
        _write_decoder_grads(model, sparse, g, dec_norms, reuse)
    active = acts.detach() > 0

    with torch.no_grad():
        grads = [p.grad for p in model.parameters() if p.grad is not None and p is not model.b_dec]
        if replica_mean is not None:
            replica_mean([*grads, g_b_dec])
        local_sq = torch.stack(torch._foreach_norm(grads)).double().square().sum()
        # count_nonzero over whole tensors: a bool .sum() would first copy them to int64
        l0 = torch.stack([torch.count_nonzero(a) for a in active.unbind(1)]).double() / B
        stats = torch.cat([torch.stack([local_sq, sparsity.double(), preact.double()]), l0])
        stats = reduce_sum(stats)  # the one scalar-sized collective: norm² + statistics
        grad_norm = math.sqrt(stats[0].item() + g_b_dec.double().square().sum().item())
        if max_grad_norm is not None and grad_norm > max_grad_norm:
            torch._foreach_mul_(grads + [model.b_dec.grad], max_grad_norm / (grad_norm + 1e-6))

    mse_f, sparsity_f, preact_f = mse.item(), stats[1].item(), stats[2].item()
    return StepResult(
        loss=mse_f + lam * sparsity_f + loss_cfg.preact_coef * preact_f,
        mse=mse_f,
        sparsity=sparsity_f,
        preact=preact_f,
        lam=lam,
        grad_norm=grad_norm,
        mse_per_layer=mse_per_layer(y_hat.detach(), yn),
        l0_per_layer=stats[3:].float(),
        fired=active.any(dim=0),
        sparse_decoder=sparse is not None,
    )


@torch.no_grad()
def _write_decoder_grads(model: CrossLayerTranscoder, sparse: SparseDecode, g: Tensor,
                         norms: Tensor, reuse: list[Tensor | None]) -> None:
    """W_dec[l].grad = (∂L/∂‖W_i‖ / ‖W_i‖)·W_i (the norm term, as RowNormsFn's backward) + A_lᵀ g_l
    (the decoder term), written into last step's gradient tensors where they fit."""
    scale = norms.grad if norms.grad is not None else torch.zeros_like(norms)
    scale = torch.where(norms > 0, scale / norms, torch.zeros_like(scale))
    out = []
    for l, w in enumerate(model.W_dec):
        buf = reuse[l]
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
            buf = torch.empty_like(w)
        out.append(torch.mul(w, scale[l].to(w.dtype).view(-1, 1, 1), out=buf))
    sparse.weight_grads(g, out)
    for w, grad in zip(model.W_dec, out, strict=True):
        w.grad = grad


def train_step(
    model: CrossLayerTranscoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    step: int,
    total_steps: int,
    loss_cfg: LossConfig,
    optim_cfg: OptimConfig,
    collectives: Collectives = LOCAL,
    decoder: Decoder = "auto",
) -> StepResult:
    """One full update at `step` (0-based): schedules → exact global gradients → Adam."""
    lr = optim_cfg.lr.at(step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    lam = loss_cfg.sparsity.at(step, total_steps)
    result = compute_grads(model, x, y, loss_cfg, lam, reduce_sum=collectives.reduce_sum,
                           gather=collectives.gather, max_grad_norm=optim_cfg.max_grad_norm,
                           replica_mean=collectives.replica_mean, decoder=decoder)
    optimizer.step()
    result.lr = lr
    return result
