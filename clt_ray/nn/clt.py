"""The cross-layer transcoder (docs/design.md §2), holding a feature range [start, stop) of every layer.

One class serves the whole CLT ([0, F)) and a feature shard of it (docs/design.md §3): a shard's
`decode(..., bias=False)` is its partial reconstruction, and the partials of all shards sum to the
whole CLT's feature term exactly; b_dec is replicated and added once, after the sum (see
`training.compute_grads`).

Parameters use circuit-tracer's in-memory layout, so export only folds in normalisation:
  W_enc [L, F, d] (W_enc[l] is W_enc_l), b_enc [L, F], log_threshold [L, F] (JumpReLU only),
  W_dec[l] [F, L-l, d] (a ParameterList, one per source layer), b_dec [L, d].
The module works in normalised space: x and y are multiplied by per-layer scalars s_in, s_out
(buffers, 1 until estimated) before they meet the weights; `folded_weights` undoes that for export.

Collectives are callbacks, never imports: TopK/BatchTopK on a shard need the global k-th value,
so they take `gather(t) -> concatenation of every shard's t along the last dim`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clt_ray.config import CLTConfig
from clt_ray.seeding import mix_seed

Gather = Callable[[Tensor], Tensor]
INIT_BLOCK = 1024  # features per random block at init: a shard's init is the slice of the whole's


class JumpReLUFn(torch.autograd.Function):
    """a = h·1[h > θ] with the straight-through estimator of Rajamanoharan et al.:
    ∂a/∂h = 1[h > θ];  ∂a/∂θ = −(θ/ε)·K((h − θ)/ε), K the rectangle on (−½, ½).
    θ is passed in (as exp(log θ)), so autograd adds the factor θ for log θ itself."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth
        return torch.where(h > theta, h, 0)  # where, not h·mask: no bool→float pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h = torch.where(h > theta, grad, 0) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:  # K((h − θ)/ε) = 1[|h − θ| < ε/2]; θ/ε applied after the sum
            in_window = (h - theta).abs() < eps / 2
            grad_theta = -(theta / eps) * torch.where(in_window, grad, 0).sum_to_size(theta.shape)
        return grad_h, grad_theta, None


class EncoderFn(torch.autograd.Function):
    """h = W_enc x + b_enc for every layer in one batched matmul: xT [L, B, d], W [L, F, d],
    b [L, F] → [L, B, F]. Its backward computes ∂W_enc = gᵀx straight in W_enc's layout; autograd's
    own (for baddbmm with Wᵀ) produced it transposed and then copied it into place, ~9% of a
    GPT-2-sized CPU step (bench/train_step.py). Under autocast the matmul runs in the autocast
    dtype, as baddbmm would; gradients are returned in the inputs' dtypes."""

    @staticmethod
    def forward(ctx: Any, xT: Tensor, W: Tensor, b: Tensor) -> Tensor:
        dtypes = (xT.dtype, W.dtype, b.dtype)
        dev = xT.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            xT, W, b = xT.to(dt), W.to(dt), b.to(dt)
        ctx.save_for_backward(xT, W)
        ctx.dtypes = dtypes
        with torch.autocast(dev, enabled=False):
            return torch.baddbmm(b[:, None, :], xT, W.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        xT, W = ctx.saved_tensors
        g = g.to(W.dtype)
        dx, dW, db = ctx.dtypes
        gx = torch.bmm(g, W).to(dx) if ctx.needs_input_grad[0] else None
        gW = None
        if ctx.needs_input_grad[1]:  # per layer: g_l is a strided slice of [B, L, F]; bmm would
            gW = torch.empty_like(W)  # first copy all of g into a bmm-friendly layout
            for l in range(W.shape[0]):
                torch.mm(g[l].T, xT[l], out=gW[l])
            gW = gW.to(dW)
        gb = g.sum(1).to(db) if ctx.needs_input_grad[2] else None
        return gx, gW, gb


class RowNormsFn(torch.autograd.Function):
    """‖W_i‖ over all but the first dim of W, per i, with a one-pass backward
    ∂/∂W_i = (g_i/‖W_i‖)·W_i (0 for zero rows). torch's own norm backward makes ~4 passes over W
    (div, mul, masked_fill, …), and reading W through a view made autograd sum this gradient
    with the decoder's out of place: ~15% of a GPT-2-sized CPU training step
    (bench/train_step.py). W itself goes in (no view), so the sum happens in place."""

    @staticmethod
    def forward(ctx: Any, W: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(W, dim=tuple(range(1, W.dim())))
        ctx.save_for_backward(W, norms)
        return norms

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        W, norms = ctx.saved_tensors
        scale = torch.where(norms > 0, grad / norms, torch.zeros_like(grad)).to(W.dtype)
        return W * scale.view(-1, *[1] * (W.dim() - 1))


def row_norms(W: Tensor) -> Tensor:
    """‖W_i‖ over all but W's first dim, for each i (RowNormsFn)."""
    return RowNormsFn.apply(W)


def jumprelu(h: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    return JumpReLUFn.apply(h, theta, bandwidth)


def _kth_largest(local: Tensor, k: int, gather: Gather | None) -> Tensor:
    """The k-th largest value along the last dim over all shards (local: this shard's top ≥ k)."""
    if gather is not None:
        local = gather(local.contiguous())
    return local.topk(k, dim=-1).values[..., -1:]


def topk_mask(h: Tensor, k: int, gather: Gather | None = None) -> Tensor:
    """Per token and layer, which of h [B, L, F_local] are among the k largest of all F features."""
    local = h.topk(min(k, h.shape[-1]), dim=-1).values
    return h >= _kth_largest(local, k, gather)


def batchtopk_mask(h: Tensor, k: int, gather: Gather | None = None) -> Tensor:
    """Per layer, which of h [B, L, F_local] are among the k·B largest over the batch and all F."""
    B, L, Fl = h.shape
    flat = h.detach().transpose(0, 1).reshape(L, B * Fl)
    local = flat.topk(min(k * B, B * Fl), dim=-1).values
    return h >= _kth_largest(local, k * B, gather).view(1, L, 1)


@dataclass
class CLTOutput:
    recon: Tensor  # ŷ [B, L, d] (normalised space)
    acts: Tensor  # a [B, L, F_local]
    pre: Tensor  # h [B, L, F_local]
    dec_norms: Tensor  # ‖W_dec,l,i‖ over all target layers [L, F_local]


def feature_dim(param_name: str) -> int | None:
    """The features' dimension of a parameter: dim 0 of W_dec[l] [F, L − l, d], dim 1 (after
    layers) of W_enc, b_enc, log_threshold; None for b_dec, which every shard replicates."""
    if param_name == "b_dec":
        return None
    return 0 if param_name.startswith("W_dec") else 1


class CrossLayerTranscoder(nn.Module):
    """Features [start, stop) of every layer of a CLT (the whole CLT is [0, n_features))."""

    def __init__(
        self,
        cfg: CLTConfig,
        start: int = 0,
        stop: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        stop = cfg.n_features if stop is None else stop
        if not 0 <= start < stop <= cfg.n_features:
            raise ValueError(f"feature range [{start}, {stop}) is not inside [0, {cfg.n_features})")
        self.cfg, self.start, self.stop = cfg, start, stop
        L, d, Fl = cfg.n_layers, cfg.d_model, stop - start
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(L, Fl, d, **kw))
        self.b_enc = nn.Parameter(torch.zeros(L, Fl, **kw))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(Fl, L - l, d, **kw)) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d, **kw))
        if cfg.activation == "jumprelu":
            theta0 = math.log(cfg.init_threshold)
            self.log_threshold = nn.Parameter(torch.full((L, Fl), theta0, **kw))
        self.register_buffer("s_in", torch.ones(L, **kw))
        self.register_buffer("s_out", torch.ones(L, **kw))
        self.reset_parameters()

    # --- shape and init -------------------------------------------------------------------------

    @property
    def n_local(self) -> int:
        return self.stop - self.start

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.stop == self.cfg.n_features

    @property
    def threshold(self) -> Tensor | None:
        """θ [L, F_local] for JumpReLU, else None."""
        return self.log_threshold.exp() if self.cfg.activation == "jumprelu" else None

    def _uniform_slice(self, tag: int, layer: int, shape: tuple[int, ...], bound: float) -> Tensor:
        """U(−bound, bound) rows [start, stop) of a whole-CLT tensor [F, *shape], generated in fixed
        blocks of INIT_BLOCK features with their own seeds: any sharding gets the same numbers, and
        no shard materialises more than one block beyond its own rows."""
        rows = []
        for b in range(self.start // INIT_BLOCK, (self.stop - 1) // INIT_BLOCK + 1):
            lo, hi = b * INIT_BLOCK, min((b + 1) * INIT_BLOCK, self.cfg.n_features)
            gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, tag, layer, b))
            block = torch.rand((hi - lo, *shape), generator=gen, dtype=torch.float64)
            rows.append(block[max(self.start, lo) - lo : min(self.stop, hi) - lo])
        return ((torch.cat(rows) * 2 - 1) * bound).to(self.b_enc.dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W_enc ~ U(±1/√F), W_dec ~ U(±1/√(L·d)) (Anthropic's CLT init); biases 0; θ = init θ."""
        L, d, F_ = self.cfg.n_layers, self.cfg.d_model, self.cfg.n_features
        for l in range(L):
            self.W_enc[l].copy_(self._uniform_slice(0, l, (d,), 1 / math.sqrt(F_)))
            self.W_dec[l].copy_(self._uniform_slice(1, l, (L - l, d), 1 / math.sqrt(L * d)))
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.activation == "jumprelu":
            self.log_threshold.fill_(math.log(self.cfg.init_threshold))

    @torch.no_grad()
    def shard(self, start: int, stop: int) -> CrossLayerTranscoder:
        """A copy of features [start, stop) (whole-CLT indices, inside this module's range), with
        b_dec and the normalisation scales replicated."""
        if not self.start <= start < stop <= self.stop:
            raise ValueError(f"[{start}, {stop}) is not inside this module's range "
                             f"[{self.start}, {self.stop})")
        part = CrossLayerTranscoder(self.cfg, start, stop, device=self.b_dec.device,
                                    dtype=self.b_dec.dtype)
        rows = slice(start - self.start, stop - self.start)
        for name, p in part.named_parameters():
            src = self.get_parameter(name)
            dim = feature_dim(name)
            p.copy_(src if dim is None else src.narrow(dim, rows.start, rows.stop - rows.start))
        part.s_in.copy_(self.s_in)
        part.s_out.copy_(self.s_out)
        return part

    # --- normalisation --------------------------------------------------------------------------

    @torch.no_grad()
    def set_norm_scales(self, x: Tensor, y: Tensor) -> None:
        """s_in, s_out from a data sample (raw x, y [N, L, d]) so that E‖s·x‖ = √d per layer."""
        self.s_in.copy_(estimate_norm_scale(x))
        self.s_out.copy_(estimate_norm_scale(y))

    def normalize(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Raw [B, L, d] (any float dtype, e.g. fp16 from a cache) → normalised space in the
        parameters' dtype: where the weights live and the losses are computed."""
        self._check_input(x)
        dtype = self.b_dec.dtype
        xn = x.to(dtype) * self.s_in[:, None]
        yn = None if y is None else y.to(dtype) * self.s_out[:, None]
        return xn, yn

    # --- model ----------------------------------------------------------------------------------

    def _pre_layer_major(self, x: Tensor) -> Tensor:
        """h = W_enc x + b_enc as [L, B, F_local]: one batched matmul over layers."""
        return EncoderFn.apply(x.transpose(0, 1), self.W_enc, self.b_enc)

    def _check_input(self, x: Tensor) -> None:
        L, d = self.cfg.n_layers, self.cfg.d_model
        if x.dim() != 3 or x.shape[1:] != (L, d):
            raise ValueError(f"expected activations of shape [batch, {L}, {d}] "
                             f"(n_layers, d_model), got {list(x.shape)}")

    def preactivations(self, x: Tensor) -> Tensor:
        """Normalised x [B, L, d] → h = W_enc x + b_enc [B, L, F_local], contiguous per layer."""
        self._check_input(x)
        return self._pre_layer_major(x).transpose(0, 1)

    def encode(self, x: Tensor, gather: Gather | None = None) -> tuple[Tensor, Tensor]:
        """Normalised x [B, L, d] → (pre-activations h, activations a), each [B, L, F_local].
        TopK/BatchTopK on a shard need `gather` (module doc)."""
        pre = self.preactivations(x)
        act = self.cfg.activation
        if act == "jumprelu":
            return pre, jumprelu(pre, self.log_threshold.exp(), self.cfg.bandwidth)
        if act == "relu":
            return pre, F.relu(pre)
        if not self.is_whole and gather is None:
            raise ValueError(f"{act} on a feature shard needs a gather callback (global top-k)")
        mask_fn = topk_mask if act == "topk" else batchtopk_mask
        return pre, F.relu(pre) * mask_fn(pre.detach(), self.cfg.k, gather)

    def decode(self, acts: Tensor, bias: bool = True, sparse: bool = False,
               support: Tensor | None = None) -> Tensor:
        """ŷ_k = Σ_{l≤k} W_dec,l→k a_l (+ b_dec,k if bias): one matmul per source layer writes all
        its target layers at once. bias=False is a shard's partial reconstruction.

        sparse=True reads only the decoder rows of active (token, feature) pairs: per source layer
        one fused gather-multiply-sum (`F.embedding_bag` with the activations as per-sample
        weights), so the cost scales with L0, not F. Same result and same W_dec/b_dec gradients
        as dense. The gradient w.r.t. acts is computed only on `support` (default: acts != 0) and
        is 0 elsewhere; dense gives g·W_decᵀ everywhere. That only matters for JumpReLU's
        θ-gradient, which uses ∂L/∂a at inactive pre-activations inside the bandwidth window:
        pass support = (acts != 0) | (|h − θ| < ε/2) to make it exact. Measured on CPU
        (bench/train_step.py); not yet on a GPU, where an earlier torch.sparse version was slower
        than dense TF32 (H200, L0 30-90 of 8192)."""
        B, L, d = acts.shape[0], self.cfg.n_layers, self.cfg.d_model
        y = torch.zeros(B, L, d, device=acts.device, dtype=acts.dtype)
        for l, a_l in enumerate(acts.unbind(1)):  # unbind: one backward, not L zero-filled copies
            W = self.W_dec[l].view(self.n_local, (L - l) * d)
            if sparse:
                out = sparse_rows_matmul(a_l, W, None if support is None else support[:, l])
            else:
                out = a_l @ W
            y[:, l:] += out.view(B, L - l, d)
        return y + self.b_dec if bias else y

    def decoder_norms(self) -> Tensor:
        """‖W_dec,l,i‖ over all target layers and d, [L, F_local]."""
        return torch.stack([row_norms(w) for w in self.W_dec])

    def grad_support(self, pre: Tensor, acts: Tensor | None = None) -> Tensor:
        """[B, L, F_local] bool: the entries whose ∂L/∂a reaches a parameter, so the only ones a
        sparse decoder's backward must compute (`decode(support=…)`, `SparseDecode`). ReLU, TopK
        and BatchTopK pass ∂L/∂a on through active entries only (a ≠ 0; TopK/BatchTopK need
        `acts` for that, ReLU's are h > 0). JumpReLU also passes it to θ from inactive entries
        inside the STE window |h − θ| < ε/2 (JumpReLUFn, losses.ActivationLossesFn); their union
        with the active ones (h > θ) is exactly h − θ > −ε/2, with h − θ computed as those
        compute it. Its density is the sparse step's cost: with the window, L0/F + the share of
        pre-activations within ε/2 of θ."""
        act = self.cfg.activation
        if act == "jumprelu":  # a layer at a time: small temporaries (no fresh pages on CPU)
            pre, theta = pre.detach(), self.log_threshold.detach().exp()
            out = torch.empty(pre.shape, dtype=torch.bool, device=pre.device)
            for l in range(pre.shape[1]):
                torch.gt(pre[:, l] - theta[l], -self.cfg.bandwidth / 2, out=out[:, l])
            return out
        if act == "relu":
            return pre.detach() > 0
        if acts is None:
            raise ValueError(f"grad_support of a {act} CLT needs its activations")
        return acts.detach() != 0

    def forward(self, x: Tensor, gather: Gather | None = None, bias: bool = True) -> CLTOutput:
        """Normalised x [B, L, d] → ŷ (normalised), activations, and what the losses need."""
        pre, acts = self.encode(x, gather)
        return CLTOutput(self.decode(acts, bias=bias), acts, pre, self.decoder_norms())

    # --- data-driven setup ----------------------------------------------------------------------

    @torch.no_grad()
    def init_b_enc_from_data(
        self, x: Tensor, target_rate: float, max_elements: int = 2**24
    ) -> None:
        """Set b_enc so each feature fires (h > θ; θ = 0 unless JumpReLU) on `target_rate` of the
        tokens of normalised x [N, L, d]: b = θ − q with q midway between the two pre-activations
        around the (1 − rate) quantile. Vectorised over features in chunks of ≤ max_elements
        pre-activations, so memory is bounded for any N and F."""
        self._check_input(x)
        N = x.shape[0]
        if not 0 < target_rate < 1:
            raise ValueError(f"target_rate must be in (0, 1), got {target_rate}")
        if N < 2:
            raise ValueError("need at least 2 tokens to set encoder biases from data")
        m = min(max(round(target_rate * N), 1), N - 1)  # tokens that should fire
        chunk = max(1, max_elements // N)
        theta = self.threshold
        for l in range(self.cfg.n_layers):
            for f0 in range(0, self.n_local, chunk):
                w = self.W_enc[l, f0 : f0 + chunk]
                top = (x[:, l] @ w.T).topk(m + 1, dim=0).values  # [m+1, chunk]
                q = (top[m - 1] + top[m]) / 2
                base = 0.0 if theta is None else theta[l, f0 : f0 + chunk]
                self.b_enc[l, f0 : f0 + chunk] = base - q

    @torch.no_grad()
    def to_jumprelu(
        self, x: Tensor, gather: Gather | None = None, max_elements: int = 2**24
    ) -> None:
        """Convert a trained TopK/BatchTopK CLT to JumpReLU in place. θ_l (one per layer) is set so
        that, on normalised calibration data x [N, L, d], exactly k·N pre-activations of layer l
        exceed it, as BatchTopK selects: L0 per layer is kept (on new data up to sampling noise).
        Tokens go through in chunks of ≤ max_elements pre-activations, keeping a running top
        k·N+1 per layer; on a shard, `gather` makes θ_l global. The module gains a log_threshold
        parameter: rebuild its optimizer."""
        if self.cfg.activation not in ("topk", "batchtopk"):
            raise ValueError(f"to_jumprelu converts topk/batchtopk CLTs, "
                             f"not '{self.cfg.activation}'")
        self._check_input(x)
        if not self.is_whole and gather is None:
            raise ValueError("to_jumprelu on a feature shard needs a gather callback (θ is global)")
        N, L = x.shape[0], self.cfg.n_layers
        keep = self.cfg.k * N + 1
        if keep > N * self.cfg.n_features:
            raise ValueError("calibration data too small: need more tokens than k (k·N < N·F)")
        best = torch.full((L, 0), -torch.inf, dtype=self.b_enc.dtype, device=self.b_enc.device)
        chunk = max(1, max_elements // (L * self.n_local))
        for t0 in range(0, N, chunk):
            pre = self._pre_layer_major(x[t0 : t0 + chunk])  # [L, chunk, F]
            best = torch.cat([best, pre.flatten(1)], dim=1)
            best = best.topk(min(keep, best.shape[1]), dim=1).values
        if gather is not None:
            best = gather(best.contiguous()).topk(keep, dim=1).values
        theta = ((best[:, keep - 2] + best[:, keep - 1]) / 2).clamp_min(1e-6)  # [L]
        self.cfg = self.cfg.model_copy(update={"activation": "jumprelu", "k": None})
        self.log_threshold = nn.Parameter(theta.log()[:, None].expand(L, self.n_local).clone())

    # --- export ---------------------------------------------------------------------------------

    @torch.no_grad()
    def folded_weights(self, layers: Iterable[int] | None = None) -> dict[str, Tensor]:
        """This range's weights in raw (un-normalised) space under circuit-tracer's names:
        W_enc_l = W_enc,l·s_in,l;  W_dec_l[:, j] = W_dec,l→l+j / s_out,l+j;
        b_dec_l = b_dec,l / s_out,l;  b_enc_l and threshold_l unchanged (h is unchanged).
        `layers`: only those source layers (export folds one at a time to bound memory)."""
        out: dict[str, Tensor] = {}
        theta = self.threshold
        for l in range(self.cfg.n_layers) if layers is None else layers:
            out[f"W_enc_{l}"] = self.W_enc[l] * self.s_in[l]
            out[f"b_enc_{l}"] = self.b_enc[l].clone()
            out[f"b_dec_{l}"] = self.b_dec[l] / self.s_out[l]
            if theta is not None:
                out[f"threshold_{l}"] = theta[l].clone()
            out[f"W_dec_{l}"] = self.W_dec[l] / self.s_out[l:, None]
        return out


def sparse_rows_matmul(a: Tensor, W: Tensor, support: Tensor | None = None) -> Tensor:
    """a [B, F] @ W [F, n] touching only W's rows where a is active: out[b] = Σ_f a[b,f]·W[f] over
    the (b, f) in support (default a != 0), as one `embedding_bag` (no [nnz, n] intermediate)."""
    rows, feats = (a.detach() != 0 if support is None else support).nonzero(as_tuple=True)
    offsets = torch.searchsorted(rows, torch.arange(a.shape[0], device=a.device))
    return F.embedding_bag(feats, W, offsets, mode="sum", per_sample_weights=a[rows, feats])


# torch warns once that CSR support is "in beta"; the kernels used here are tested
# (tests/test_clt_fast_paths.py). A filter set once, as catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta",
                        category=UserWarning)


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from (row, col, value) triples sorted by row (indices built here: valid)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0, out=crow[1:])
    return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class SparseDecode:
    """The training step's decoder over the active (token, feature) pairs only, forward and
    backward, with the dense decoder's results to round-off (docs/design.md §3).

    Per source layer l, the activations a_l [B, F] become a CSR matrix A_l of their nonzeros, and
    torch's sparse-dense kernels (MKL on CPU, cuSPARSE on CUDA) do the three products, so each
    costs ~ nnz·(L − l)·d instead of B·F·(L − l)·d:
      ŷ[:, l:] += A_l W_l            `decode`: addmm into ŷ's slice in place; autograd to a only
      ∂L/∂a_l = (g_l W_lᵀ) on `support`, 0 elsewhere   (sampled_addmm; `grad_support`)
      ∂L/∂W_l += A_lᵀ g_l            `weight_grads`: accumulated into the gradient buffers
    W_l = W_dec[l] viewed [F, (L − l)·d], g_l = ∂L/∂ŷ[:, l:]. W_dec gets no autograd edge: the
    step writes its gradient (decoder term + the decoder-norm term) into reused buffers: on CPU a
    fresh W_dec-sized tensor a step costs ~1 s at GPT-2 small's shape (F 6144) in first-touch
    page faults alone. The products run in the parameters' dtype, also under autocast."""

    def __init__(self, model: CrossLayerTranscoder, acts: Tensor,
                 support: Tensor | None = None) -> None:
        self.model = model
        self.dtype = model.b_dec.dtype
        self.acts_dtype = acts.dtype
        B, L, Fl = acts.shape
        self.A, self.AT, self.S = [], [], []
        with torch.no_grad():
            for l in range(L):
                a_l = acts[:, l].detach()
                rows, feats = (a_l != 0).nonzero(as_tuple=True)
                vals = a_l[rows, feats].to(self.dtype)
                self.A.append(_csr(rows, feats, vals, (B, Fl)))
                order = torch.argsort(feats, stable=True)
                self.AT.append(_csr(feats[order], rows[order], vals[order], (Fl, B)))
                if support is not None:
                    rows, feats = support[:, l].nonzero(as_tuple=True)
                pattern = _csr(rows, feats, torch.zeros_like(feats, dtype=self.dtype), (B, Fl))
                self.S.append((pattern, rows, feats))

    def _W(self, l: int) -> Tensor:
        return self.model.W_dec[l].detach().view(self.model.n_local, -1)

    def decode(self, acts: Tensor) -> Tensor:
        """The partial reconstruction ŷ [B, L, d] (no b_dec), differentiable w.r.t. `acts` (the
        tensor this was built from)."""
        return _SparseDecodeFn.apply(acts, self)

    def _forward(self, B: int) -> Tensor:
        L, d = self.model.cfg.n_layers, self.model.cfg.d_model
        y = torch.zeros(B, L * d, dtype=self.dtype, device=self.model.b_dec.device)
        with torch.autocast(y.device.type, enabled=False):
            for l, A in enumerate(self.A):
                y[:, l * d:].addmm_(A, self._W(l))
        return y.view(B, L, d)

    def _acts_grad(self, g: Tensor) -> Tensor:
        B, L, d = g.shape
        g = g.to(self.dtype).reshape(B, L * d)
        ga = torch.zeros(B, L, self.model.n_local, dtype=self.dtype, device=g.device)
        with torch.autocast(g.device.type, enabled=False):
            for l, (pattern, rows, feats) in enumerate(self.S):
                if len(rows):
                    r = torch.sparse.sampled_addmm(pattern, g[:, l * d:], self._W(l).T, beta=0.0)
                    ga[:, l][rows, feats] = r.values()
        return ga.to(self.acts_dtype)

    @torch.no_grad()
    def weight_grads(self, g: Tensor, out: list[Tensor]) -> None:
        """out[l] [F, L − l, d] += A_lᵀ g_l: the decoder term of W_dec's gradient, where g is
        ∂L/∂ŷ [B, L, d]; out holds the rest of the gradient (the decoder-norm term) already."""
        B, L, d = g.shape
        g = g.to(self.dtype).reshape(B, L * d)
        with torch.autocast(g.device.type, enabled=False):
            for l, AT in enumerate(self.AT):
                out[l].view(self.model.n_local, -1).addmm_(AT, g[:, l * d:])


class _SparseDecodeFn(torch.autograd.Function):
    """ŷ = SparseDecode's forward, with ∂L/∂a on its support (W_dec's gradient: weight_grads)."""

    @staticmethod
    def forward(ctx: Any, acts: Tensor, dec: SparseDecode) -> Tensor:
        ctx.dec = dec
        return dec._forward(acts.shape[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return ctx.dec._acts_grad(g), None


def estimate_norm_scale(acts: Tensor) -> Tensor:
    """Per-layer scalar s [L] with E‖s·acts_l‖ = √d over the tokens of acts [N, L, d]."""
    d = acts.shape[-1]
    mean_norm = acts.double().norm(dim=-1).mean(dim=0)
    if (mean_norm == 0).any():
        raise ValueError("a layer's activations are all zero: cannot normalise it")
    return math.sqrt(d) / mean_norm  # float64; the buffers cast
