"""circuit-tracer's feature JSON (`circuit_tracer.frontend.feature_models.Model`, read by its
frontend from `<scan>/<cantor(layer, feature)>.json`) from a feature row of the top-k statistics
(`features.collect.FEATURE_SCHEMA`): one implementation of examples, histogram and frequency
for graph dashboards, auto-interp and the viewer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clt_ray.fsutil import atomic_write_text
from clt_ray.layout import cantor_pair

HISTOGRAM_BINS = 30
EXAMPLE_BEFORE, EXAMPLE_AFTER = 24, 8
"""Tokens shown before / after an example's most activating token."""


def _example(e: Mapping) -> dict:
    tokens, acts, position = e["tokens"], e["acts"], e["position"]
    lo, hi = max(0, position - EXAMPLE_BEFORE), min(len(tokens), position + EXAMPLE_AFTER + 1)
    return {"tokens": list(tokens[lo:hi]),
            "tokens_acts_list": [round(float(a), 4) for a in acts[lo:hi]],
            "train_token_ind": position - lo, "is_repeated_datapoint": False}


def linear_histogram(counts: Sequence[int], edges: Sequence[float], act_max: float,
                     bins: int = HISTOGRAM_BINS) -> list[float]:
    """The log-binned counts of the statistics on the frontend's `bins` equal bins of
    [0, act_max]; each log bin's count goes where its geometric centre falls."""
    out = np.zeros(bins)
    if act_max <= 0:
        return out.tolist()
    e = np.asarray(edges, dtype=np.float64)
    centres = np.minimum(np.sqrt(e[:-1] * e[1:]), act_max)
    idx = np.minimum((centres / act_max * bins).astype(int), bins - 1)
    np.add.at(out, idx, np.asarray(counts, dtype=np.float64))
    return out.tolist()


def histogram_quantiles(counts: Sequence[int], edges: Sequence[float], act_max: float
                        ) -> list[float]:
    """Deciles of the nonzero activations (0 %, 10 %, …, 100 %), read off the log bins (each
    bin's geometric centre, clipped to the maximum, which is the 100 % one)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() == 0:
        return []
    e = np.asarray(edges, dtype=np.float64)
    centres = np.minimum(np.sqrt(e[:-1] * e[1:]), act_max)
    cumulative = np.cumsum(c) / c.sum()
    picks = np.searchsorted(cumulative, np.linspace(0, 1, 11), side="left")
    out = [round(float(centres[min(i, len(centres) - 1)]), 5) for i in picks]
    out[-1] = round(float(act_max), 5)
    return out


def feature_json(row: Mapping, transcoder_id: str, histogram_edges: Sequence[float]) -> dict:
    """circuit-tracer's feature dashboard of one feature row."""
    groups = sorted({e["group"] for e in row["quantile_examples"]})
    quantiles = [{"quantile_name": "Top activations",
                  "examples": [_example(e) for e in row["top_examples"]]}]
    quantiles += [{"quantile_name": f"Quantile {g}/{len(groups)}",
                   "examples": [_example(e) for e in row["quantile_examples"] if e["group"] == g]}
                  for g in groups]
    act_max = float(row["max_activation"])
    return {
        "transcoder_id": transcoder_id,
        "index": cantor_pair(row["layer"], row["feature"]),
        "examples_quantiles": quantiles,
        "top_logits": list(row["top_logits"]),
        "bottom_logits": list(row["bottom_logits"]),
        "act_min": 0.0,
        "act_max": act_max,
        "quantile_values": histogram_quantiles(row["histogram"], histogram_edges, act_max),
        "histogram": linear_histogram(row["histogram"], histogram_edges, act_max),
        "activation_frequency": float(row["frequency"]),
    }


def write_feature_json(folder: str | os.PathLike[str], data: dict) -> Path:
    path = Path(folder) / f"{data['index']}.json"
    atomic_write_text(path, json.dumps(data))
    return path
