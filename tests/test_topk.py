"""clt_ray.features.topk: chunked, merged partial states equal a plain per-feature loop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from clt_ray.features.topk import (
    EMPTY,
    N_BINS,
    NO_KEY,
    QUIET,
    chunk_state,
    merge_all,
    value_bins,
    window_hash,
)

K, M = 4, 2


def brute_force(acts: torch.Tensor, valid: torch.Tensor, window_ids: list[int], start: int):
    """Per feature, in plain Python: the top windows, the per-bin min-hash samples, counts."""
    W, T, L, n = acts.shape
    out = {}
    for layer in range(L):
        for i in range(n):
            peaks = []
            fired = 0
            hist = [0] * N_BINS
            for w in range(W):
                values = [float(acts[w, t, layer, i]) if valid[w, t] else 0.0 for t in range(T)]
                for v in values:
                    if v > 0:
                        fired += 1
                        hist[int(value_bins(torch.tensor([v]))[0])] += 1
                best = max(values)
                if best > 0:
                    peaks.append((best, window_ids[w], values.index(best)))
            top = sorted(peaks, key=lambda e: (-e[0], e[1]))[:K]
            by_bin: dict[int, list] = {}
            for p, w, pos in peaks:
                b = int(value_bins(torch.tensor([p]))[0])
                h = int(window_hash(torch.tensor(w), torch.tensor(layer),
                                    torch.tensor(start + i)))
                by_bin.setdefault(b, []).append(((b << 32) | h, p, w, pos))
            samples = sorted(e for b in by_bin for e in sorted(by_bin[b])[:M])
            fired_windows = {w for _, w, _ in peaks}
            quiet = sorted(
                (int(window_hash(torch.tensor(w), torch.tensor(layer), torch.tensor(start + i)))
                 << 32 | w, w) for w in window_ids
                if w not in fired_windows and bool(valid[window_ids.index(w)].any()))[:QUIET]
            out[layer, i] = (top, samples, quiet, fired, hist)
    return out


def check(state, expected, n_tokens):
    assert state.n_tokens == n_tokens
    for (layer, i), (top, samples, quiet, fired, hist) in expected.items():
        got_top = [(float(p), int(w), int(q)) for p, w, q in zip(
            state.top_peak[layer, i], state.top_window[layer, i], state.top_pos[layer, i])
            if w != EMPTY]
        assert got_top == [(pytest.approx(p), w, q) for p, w, q in top]
        keys = state.sample_key[layer, i]
        got = [(int(k), int(w), int(q)) for k, w, q in zip(
            keys, state.sample_window[layer, i], state.sample_pos[layer, i]) if k != NO_KEY]
        assert got == [(k, w, q) for k, _, w, q in samples]
        got_quiet = [(int(k), int(w)) for k, w in zip(state.quiet_key[layer, i],
                                                      state.quiet_window[layer, i]) if k != NO_KEY]
        assert got_quiet == quiet
        assert int(state.fired[layer, i]) == fired
        assert state.histogram[layer, i].tolist() == hist


def sparse_acts(W=37, T=9, L=3, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(W, T, L, n, generator=g) * 3 - 3)  # sparse, spread over bins
    acts[3, 2, 0, 1] = acts[5, 4, 0, 1] = acts.max() + 1  # a tie across windows
    acts[:, :, 2, 4] = 0  # a feature that never fires
    acts[:, :, 1, 2] *= torch.rand(W, 1, generator=g) < 0.6  # quiet in ~40% of windows
    valid = torch.rand(W, T, generator=g) > 0.15
    valid[:, 0] = False  # BOS
    return acts, valid


def test_one_chunk_equals_brute_force():
    acts, valid = sparse_acts()
    ids = list(range(100, 100 + len(acts)))
    state = chunk_state(acts, valid, torch.tensor(ids), 7, K, M)
    check(state, brute_force(acts, valid, ids, 7), int(valid.sum()))
    assert state.top_peak.shape == (3, 5, K) and state.sample_key.shape == (3, 5, N_BINS * M)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunks_merged_in_any_order_equal_brute_force(seed):
    acts, valid = sparse_acts(seed=seed)
    rng = random.Random(seed)
    ids = rng.sample(range(1000), len(acts))  # global window ids need not be contiguous
    cuts = sorted(rng.sample(range(1, len(acts)), 5))
    states = [chunk_state(acts[a:b], valid[a:b], torch.tensor(ids[a:b]), 0, K, M)
              for a, b in zip([0, *cuts], [*cuts, len(acts)])]
    rng.shuffle(states)
    merged = merge_all(states)
    check(merged, brute_force(acts, valid, ids, 0), int(valid.sum()))
    whole = chunk_state(acts, valid, torch.tensor(ids), 0, K, M)
    for name in ("top_peak", "top_window", "sample_key", "quiet_key", "fired", "histogram"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name


def test_merging_different_ranges_is_refused():
    acts, valid = sparse_acts(W=8)
    a = chunk_state(acts, valid, torch.arange(8), 0, K, M)
    b = chunk_state(acts, valid, torch.arange(8, 16), 5, K, M)
    with pytest.raises(ValueError, match="cannot merge"):
        merge_all([a, b])
