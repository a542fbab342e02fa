"""Feature dashboards: top activating windows, quantile samples, activation histogram, firing
frequency and logit effects of chosen CLT features, and circuit-tracer's feature JSON.

The statistics are accumulated window by window (`FeatureStats.add`), so any encoder can feed them:
attribution graphs use the replacement model's own activations (the values the graph shows), the
auto-interp pass our CLT module over the cache. The JSON follows `circuit_tracer.frontend.
feature_models.Model`, which its frontend reads from `<scan>/<cantor(layer, feature)>.json`.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from clt_ray.fsutil import atomic_write_text

TOP_EXAMPLES = 10
QUANTILE_EXAMPLES = 5
N_QUANTILES = 4
HISTOGRAM_BINS = 30
EXAMPLE_BEFORE, EXAMPLE_AFTER = 24, 8
"""Tokens shown before / after an example's most activating token."""


def cantor_pair(layer: int, feature: int) -> int:
    """The frontend's feature index of (layer, feature) (its `util.cantorUnpair` inverts it)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


@dataclass
class FeatureStats:
    """Running statistics of one feature over windows of tokens."""

    layer: int
    feature: int
    top: list[tuple[float, int, int]] = field(default_factory=list)
    """Min-heap of (peak activation, window, peak position): the TOP_EXAMPLES best windows."""
    firing: list[tuple[float, int, int]] = field(default_factory=list)
    """(peak, window, position) of every window where the feature fired (for quantile samples)."""
    values: list[Tensor] = field(default_factory=list)
    """Nonzero activations, one tensor per window (for the histogram and quantiles)."""
    n_tokens: int = 0

    def add(self, window: int, acts: Tensor, valid: Tensor) -> None:
        """acts [T] of this feature on one window; valid [T] marks real tokens (not BOS/padding)."""
        acts = torch.where(valid, acts.float(), torch.zeros_like(acts, dtype=torch.float32))
        self.n_tokens += int(valid.sum())
        fired = acts[acts > 0]
        if fired.numel() == 0:
            return
        self.values.append(fired)
        peak, pos = acts.max(0)
        entry = (float(peak), window, int(pos))
        self.firing.append(entry)
        if len(self.top) < TOP_EXAMPLES:
            heapq.heappush(self.top, entry)
        elif entry > self.top[0]:
            heapq.heapreplace(self.top, entry)

    @property
    def all_values(self) -> Tensor:
        return torch.cat(self.values) if self.values else torch.zeros(0)


@dataclass
class ExamplesGroup:
    name: str
    entries: list[tuple[float, int, int]]


def _example(tokens: Sequence[str], acts: Tensor, position: int) -> dict:
    lo, hi = max(0, position - EXAMPLE_BEFORE), min(len(tokens), position + EXAMPLE_AFTER + 1)
    return {"tokens": list(tokens[lo:hi]),
            "tokens_acts_list": [round(float(a), 4) for a in acts[lo:hi]],
            "train_token_ind": position - lo, "is_repeated_datapoint": False}


def feature_json(stats: FeatureStats, transcoder_id: str, windows: Sequence[Sequence[str]],
                 window_acts: Mapping[int, Tensor], top_logits: list[str],
                 bottom_logits: list[str]) -> dict:
    """circuit-tracer's feature dashboard (frontend.feature_models.Model) of one feature.

    windows: the token strings of every window; window_acts[window]: this feature's acts [T]."""
    values = stats.all_values
    act_max = float(values.max()) if values.numel() else 0.0
    quantiles = [ExamplesGroup("Top activations", sorted(stats.top, reverse=True))]
    if len(stats.firing) > TOP_EXAMPLES:  # evenly spaced samples of lower peaks
        by_peak = sorted(stats.firing, reverse=True)[TOP_EXAMPLES:]
        for q in range(N_QUANTILES):
            part = by_peak[q * len(by_peak) // N_QUANTILES:(q + 1) * len(by_peak) // N_QUANTILES]
            step = max(1, len(part) // QUANTILE_EXAMPLES)
            if part:
                quantiles.append(ExamplesGroup(f"Quantile {q + 1}/{N_QUANTILES}",
                                               part[::step][:QUANTILE_EXAMPLES]))
    histogram = (torch.histc(values, HISTOGRAM_BINS, 0.0, act_max).tolist()
                 if values.numel() else [0.0] * HISTOGRAM_BINS)
    qs = (torch.quantile(values, torch.linspace(0, 1, 11)).tolist()
          if 0 < values.numel() <= 16_000_000 else [])
    return {
        "transcoder_id": transcoder_id,
        "index": cantor_pair(stats.layer, stats.feature),
        "examples_quantiles": [
            {"quantile_name": g.name,
             "examples": [_example(windows[w], window_acts[w], pos) for _, w, pos in g.entries]}
            for g in quantiles],
        "top_logits": top_logits,
        "bottom_logits": bottom_logits,
        "act_min": 0.0,
        "act_max": act_max,
        "quantile_values": [round(v, 5) for v in qs],
        "histogram": histogram,
        "activation_frequency": values.numel() / max(1, stats.n_tokens),
    }


def collect(features: Sequence[tuple[int, int]], n_windows: int, encode
            ) -> tuple[dict[tuple[int, int], FeatureStats], dict[tuple[int, int], dict[int, Tensor]]]:
    """Statistics of `features` [(layer, feature)] over windows 0..n_windows−1.

    encode(window) -> (acts [T, n_features] of the chosen features in order, valid [T] bool).
    Two passes over the windows would need encode twice; instead each window's activations are
    kept only while they can still be shown (the feature fired there)."""
    stats = {f: FeatureStats(*f) for f in features}
    kept: dict[tuple[int, int], dict[int, Tensor]] = {f: {} for f in features}
    for w in range(n_windows):
        acts, valid = encode(w)
        for j, f in enumerate(features):
            column = torch.where(valid, acts[:, j].float(), 0.0)
            stats[f].add(w, column, valid)
            if bool((column > 0).any()):
                kept[f][w] = column
    return stats, kept


def logit_effects(direction: Tensor, unembed: Tensor, token_strings: Sequence[str], k: int = 10
                  ) -> tuple[list[str], list[str]]:
    """Top and bottom tokens of a feature's output direction [d] through the unembedding [d, V]."""
    scores = direction.float() @ unembed.float()
    k = min(k, scores.numel())
    top = scores.topk(k).indices.tolist()
    bottom = (-scores).topk(k).indices.tolist()
    return [token_strings[i] for i in top], [token_strings[i] for i in bottom]


def write_feature_json(folder: str | os.PathLike[str], data: dict) -> Path:
    path = Path(folder) / f"{data['index']}.json"
    atomic_write_text(path, json.dumps(data))
    return path
