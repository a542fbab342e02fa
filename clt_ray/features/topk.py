"""Per-feature activation statistics over many windows, computed in mergeable partial states.

A partial state covers some windows and one feature range [start, stop) of every layer; two states
of the same range merge into the state of their windows together, with a result independent of the
order (ties in activation are broken by window id). That is what lets a Ray Data job compute chunks
of windows in parallel and reduce them per range (actors/autointerp.py), and what the exactness test
checks against a plain per-feature loop. Kept per feature (layer l, feature i):

- the `k` windows with the highest peak activation (peak, window, position of the peak);
- samples for quantile examples: per bin of the peak's value (log-spaced fixed bins) the `m`
  windows with the smallest hash of (window, layer, feature) — min-hash samples merge exactly;
- the `z` windows where it never fired with the smallest hash (negatives for the scorers);
- tokens seen, tokens where it fired, a histogram of its nonzero activations on the same bins.

Windows are given as activations x [W, T, L, d] with a validity mask [W, T] (BOS and padding off)
and global window ids [W]; the encoder is our CLT module (`CrossLayerTranscoder.encode`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

N_BINS = 48
BIN_LOW, BIN_HIGH = 1e-3, 1e3
"""Fixed log-spaced bin edges over activation values (values outside go to the end bins)."""
EMPTY = -1
"""Window id of an empty slot."""
NO_KEY = np.iinfo(np.int64).max
QUIET = 8
"""Windows where a feature never fired kept per feature (negatives for the scorers)."""


def bin_edges() -> Tensor:
    return torch.logspace(np.log10(BIN_LOW), np.log10(BIN_HIGH), N_BINS + 1, dtype=torch.float64)


def value_bins(values: Tensor) -> Tensor:
    """Bin index in [0, N_BINS) of each positive value."""
    inner = bin_edges()[1:-1].to(values.device, torch.float32)
    return torch.bucketize(values.float().contiguous(), inner)


def window_hash(window: Tensor, layer: Tensor, feature: Tensor) -> Tensor:
    """A deterministic 31-bit hash of (window, layer, feature) (splitmix-style mixing)."""
    h = (window.long() * 0x9E3779B1 + layer.long() * 0x85EBCA77 + feature.long() * 0xC2B2AE3D)
    h = h & 0x7FFFFFFF
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
    h = ((h ^ (h >> 12)) * 0x297A2D39) & 0x7FFFFFFF
    return h ^ (h >> 15)


@dataclass
class TopKState:
    """Partial statistics of features [start, stop) of each of L layers (n = stop − start).

    Arrays are numpy so a state is a Ray Data row as is; shapes in the field comments."""

    start: int
    stop: int
    top_peak: np.ndarray      # [L, n, k] float32, descending
    top_window: np.ndarray    # [L, n, k] int64 (EMPTY: no window)
    top_pos: np.ndarray       # [L, n, k] int32
    sample_key: np.ndarray    # [L, n, S] int64: bin·2^32 + hash, ascending (NO_KEY: empty)
    sample_peak: np.ndarray   # [L, n, S] float32
    sample_window: np.ndarray  # [L, n, S] int64
    sample_pos: np.ndarray    # [L, n, S] int32
    quiet_key: np.ndarray     # [L, n, Z] int64: hash·2^32 + window, ascending (NO_KEY: empty)
    quiet_window: np.ndarray  # [L, n, Z] int64: windows where the feature never fired
    fired: np.ndarray         # [L, n] int64: tokens where the feature's activation > 0
    histogram: np.ndarray     # [L, n, N_BINS] int64 of its nonzero activations
    n_tokens: int             # valid tokens seen

    def to_row(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: dict) -> TopKState:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def _select_top(peak: Tensor, window: Tensor, pos: Tensor, k: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Along the last axis: the k largest peaks, ties to the smaller window id; empty slots last
    (and added when fewer than k are given)."""
    if peak.shape[-1] < k:
        pad = (*peak.shape[:-1], k - peak.shape[-1])
        peak = torch.cat([peak, peak.new_zeros(pad)], -1)
        window = torch.cat([window, window.new_full(pad, EMPTY)], -1)
        pos = torch.cat([pos, pos.new_zeros(pad)], -1)
    big = torch.iinfo(torch.int64).max
    order = torch.argsort(torch.where(window == EMPTY, big, window), dim=-1, stable=True)
    peak, window, pos = (t.gather(-1, order) for t in (peak, window, pos))
    order = torch.argsort(torch.where(window == EMPTY, -torch.inf, peak), dim=-1,
                          descending=True, stable=True)[..., :k]
    return tuple(t.gather(-1, order) for t in (peak, window, pos))  # type: ignore[return-value]


def _select_samples(key: Tensor, peak: Tensor, window: Tensor, pos: Tensor, m: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Along the last axis: per bin (key >> 32) the m smallest keys, as N_BINS·m slots ascending."""
    order = torch.argsort(key, dim=-1, stable=True)
    key, peak, window, pos = (t.gather(-1, order) for t in (key, peak, window, pos))
    bins = torch.arange(N_BINS, device=key.device, dtype=torch.int64) << 32
    first = torch.searchsorted(key, bins.expand(*key.shape[:-1], N_BINS).contiguous())
    last = torch.searchsorted(key, (bins + (1 << 32)).expand(*key.shape[:-1], N_BINS)
                              .contiguous())
    idx = first[..., :, None] + torch.arange(m, device=key.device)  # [..., N_BINS, m]
    ok = idx < last[..., :, None]
    idx = idx.clamp(max=key.shape[-1] - 1).flatten(-2)
    ok = ok.flatten(-2)
    out_key = torch.where(ok, key.gather(-1, idx), NO_KEY)
    out = [torch.where(ok, t.gather(-1, idx), fill)
           for t, fill in ((peak, 0.0), (window, EMPTY), (pos, 0))]
    order = torch.argsort(out_key, dim=-1, stable=True)
    return (out_key.gather(-1, order), *(t.gather(-1, order) for t in out))


def _select_quiet(key: Tensor, window: Tensor, z: int) -> tuple[Tensor, Tensor]:
    """Along the last axis: the z smallest keys (padded with empty slots)."""
    if key.shape[-1] < z:
        pad = (*key.shape[:-1], z - key.shape[-1])
        key = torch.cat([key, key.new_full(pad, NO_KEY)], -1)
        window = torch.cat([window, window.new_full(pad, EMPTY)], -1)
    order = torch.argsort(key, dim=-1, stable=True)[..., :z]
    return key.gather(-1, order), window.gather(-1, order)


def chunk_state(acts: Tensor, valid: Tensor, window_ids: Tensor, start: int, k: int, m: int,
                z: int = QUIET) -> TopKState:
    """The state of one chunk: acts [W, T, L, n] of features [start, start + n); k top windows,
    m samples per bin, z quiet windows (where the feature never fired) per feature."""
    W, T, L, n = acts.shape
    acts = torch.where(valid[:, :, None, None], acts.float(), 0.0)
    peak, pos = acts.max(dim=1)  # [W, L, n]
    windows = window_ids.long().view(W, 1, 1).expand(W, L, n)
    fired_window = peak > 0
    peak_t, win_t, pos_t = (t.permute(1, 2, 0) for t in (peak, windows, pos))  # [L, n, W]
    win_t = torch.where(fired_window.permute(1, 2, 0), win_t, EMPTY)
    top = _select_top(peak_t, win_t, pos_t.long(), k)
    layer = torch.arange(L).view(L, 1, 1)
    feature = torch.arange(start, start + n).view(1, n, 1)
    key = (value_bins(peak_t).long() << 32) | window_hash(win_t, layer, feature)
    key = torch.where(win_t == EMPTY, NO_KEY, key)
    samples = _select_samples(key, peak_t, win_t, pos_t.long(), m)
    all_windows = window_ids.long().view(1, 1, W).expand(L, n, W)
    quiet = (~fired_window.permute(1, 2, 0)) & valid.any(1).view(1, 1, W)
    quiet_key = torch.where(quiet, (window_hash(all_windows, layer, feature) << 32)
                            | all_windows, NO_KEY)  # the window id breaks hash ties
    quiet_sel = _select_quiet(quiet_key, torch.where(quiet, all_windows, EMPTY), z)
    nonzero = acts > 0
    fired = nonzero.sum(dim=(0, 1))
    bins = value_bins(acts[nonzero])
    flat = (torch.arange(L).view(1, 1, L, 1) * n + torch.arange(n).view(1, 1, 1, n))
    flat = flat.expand(W, T, L, n)[nonzero] * N_BINS + bins
    hist = torch.bincount(flat, minlength=L * n * N_BINS).view(L, n, N_BINS)
    return _state(start, start + n, top, samples, quiet_sel, fired, hist, int(valid.sum()))


def _state(start: int, stop: int, top, samples, quiet, fired: Tensor, hist: Tensor,
           n_tokens: int) -> TopKState:
    def np_(t: Tensor, dtype) -> np.ndarray:
        return t.cpu().numpy().astype(dtype, copy=False)

    return TopKState(start, stop, np_(top[0], np.float32), np_(top[1], np.int64),
                     np_(top[2], np.int32), np_(samples[0], np.int64),
                     np_(samples[1], np.float32), np_(samples[2], np.int64),
                     np_(samples[3], np.int32), np_(quiet[0], np.int64), np_(quiet[1], np.int64),
                     np_(fired, np.int64), np_(hist, np.int64), n_tokens)


def merge(a: TopKState, b: TopKState) -> TopKState:
    """The state of both states' windows (same feature range, disjoint windows)."""
    if (a.start, a.stop) != (b.start, b.stop):
        raise ValueError(f"cannot merge features [{a.start}, {a.stop}) with [{b.start}, {b.stop})")
    k, s = a.top_peak.shape[-1], a.sample_key.shape[-1]

    def cat(name: str) -> Tensor:
        return torch.from_numpy(np.concatenate([getattr(a, name), getattr(b, name)], axis=-1))

    top = _select_top(cat("top_peak"), cat("top_window"), cat("top_pos").long(), k)
    samples = _select_samples(cat("sample_key"), cat("sample_peak"), cat("sample_window"),
                              cat("sample_pos").long(), s // N_BINS)
    quiet = _select_quiet(cat("quiet_key"), cat("quiet_window"), a.quiet_key.shape[-1])
    return _state(a.start, a.stop, top, samples, quiet, torch.from_numpy(a.fired + b.fired),
                  torch.from_numpy(a.histogram + b.histogram), a.n_tokens + b.n_tokens)


def merge_all(states: list[TopKState]) -> TopKState:
    """Pairwise tree merge (the result does not depend on the order)."""
    if not states:
        raise ValueError("no states to merge")
    while len(states) > 1:
        states = [merge(states[i], states[i + 1]) if i + 1 < len(states) else states[i]
                  for i in range(0, len(states), 2)]
    return states[0]


@torch.no_grad()
def encode_range(clt, x: Tensor, start: int, stop: int) -> Tensor:
    """Activations [W, T, L, stop − start] of features [start, stop) of a CLT holding them, on
    raw inputs x [W, T, L, d] (normalised as in training). JumpReLU/ReLU only: a TopK feature's
    activation depends on the others (convert with `to_jumprelu`, as export does)."""
    if clt.cfg.activation not in ("jumprelu", "relu"):
        raise ValueError(f"feature statistics need a JumpReLU or ReLU CLT, this one is "
                         f"{clt.cfg.activation}: convert it first (CrossLayerTranscoder."
                         "to_jumprelu, which `clt-ray export` applies)")
    part = clt.shard(start, stop) if (start, stop) != (clt.start, clt.stop) else clt
    W, T, L, d = x.shape
    xn, _ = part.normalize(x.reshape(W * T, L, d).to(part.b_dec.device, torch.float32))
    _, acts = part.encode(xn)
    return acts.reshape(W, T, L, stop - start).cpu()


def quantile_examples(state: TopKState, layer: int, i: int, n_groups: int = 4, per_group: int = 5
                      ) -> list[list[tuple[float, int, int]]]:
    """Sampled (peak, window, position) of feature i (index within the range) of `layer`, in up
    to n_groups groups of adjacent bins of the peak that held samples (highest first); the top
    windows are left out."""
    keys = state.sample_key[layer, i]
    ok = keys != NO_KEY
    top = set(state.top_window[layer, i].tolist())
    entries = [(int(key >> 32), float(p), int(w), int(q)) for key, p, w, q in zip(
        keys[ok], state.sample_peak[layer, i][ok], state.sample_window[layer, i][ok],
        state.sample_pos[layer, i][ok]) if int(w) not in top]
    if not entries:
        return []
    bins = sorted({e[0] for e in entries}, reverse=True)
    groups: list[list[tuple[float, int, int]]] = []
    size = max(1, -(-len(bins) // n_groups))
    for g in range(0, len(bins), size):
        chosen = set(bins[g:g + size])
        group = sorted(((p, w, q) for b, p, w, q in entries if b in chosen), reverse=True)
        groups.append(group[:per_group])
    return groups
