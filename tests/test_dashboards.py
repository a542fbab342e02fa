"""clt_ray.features.dashboards: circuit-tracer's feature JSON from a feature row of the top-k statistics."""

from __future__ import annotations

import pytest
import torch
from circuit_tracer.frontend.feature_models import Model

from clt_ray.features.dashboards import feature_json, histogram_quantiles, linear_histogram
from clt_ray.features.topk import bin_edges, value_bins
from clt_ray.layout import cantor_pair


def _row(values: torch.Tensor) -> dict:
    counts = torch.bincount(value_bins(values), minlength=len(bin_edges()) - 1)
    tokens = ["a", "b", "c", "d"]

    def example(peak: float, group: int) -> dict:
        return {"window": 0, "position": 2, "peak": peak, "group": group, "tokens": tokens,
                "acts": [0.0, 0.1, peak, 0.0]}

    return {"layer": 2, "feature": 7, "frequency": 0.25, "max_activation": float(values.max()),
            "histogram": counts.tolist(), "top_examples": [example(4.0, 0)],
            "quantile_examples": [example(2.0, 1), example(1.0, 2), example(0.9, 2)],
            "top_logits": ["x"], "bottom_logits": ["y"]}


def test_feature_json_is_circuit_tracers_model_with_the_rows_numbers():
    values = torch.linspace(0.05, 4.0, 1000)
    data = feature_json(_row(values), "clt", bin_edges().tolist())
    Model.model_validate(data)  # the frontend's own schema
    assert data["index"] == cantor_pair(2, 7)
    assert [q["quantile_name"] for q in data["examples_quantiles"]] == [
        "Top activations", "Quantile 1/2", "Quantile 2/2"]
    assert [len(q["examples"]) for q in data["examples_quantiles"]] == [1, 1, 2]
    top = data["examples_quantiles"][0]["examples"][0]
    assert top["tokens_acts_list"][top["train_token_ind"]] == 4.0
    assert sum(data["histogram"]) == 1000  # every activation lands in a linear bin
    qs = data["quantile_values"]
    assert qs == sorted(qs) and len(qs) == 11
    assert qs[5] == pytest.approx(float(values.median()), rel=0.1)  # log bins are ~15 % wide
    assert qs[-1] == pytest.approx(4.0, rel=1e-6)


def test_histogram_of_a_silent_feature_is_empty():
    counts = [0] * (len(bin_edges()) - 1)
    assert linear_histogram(counts, bin_edges().tolist(), 0.0) == [0.0] * 30
    assert histogram_quantiles(counts, bin_edges().tolist(), 0.0) == []
