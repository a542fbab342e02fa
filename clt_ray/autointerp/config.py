"""The `clt-ray autointerp` config (YAML): which CLT and features, top-k settings, the LLM
endpoint, scorers, Ray placement. examples/autointerp.yaml is the annotated example."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from clt_ray.autointerp.llm import LLMConfig
from clt_ray.config import StrictModel


class FeatureChoice(StrictModel):
    """Features to explain: every one, index ranges (of every layer, or of one), or the feature
    nodes of the attribution graphs in a `clt-ray attribute` output folder."""

    all: bool = False
    ranges: list[tuple[int, int]] = Field(default_factory=list)
    """[start, stop) feature indices."""
    layers: list[int] | None = None
    """Only these layers (default: all)."""
    graphs: str | None = None

    @model_validator(mode="after")
    def _one(self) -> FeatureChoice:
        chosen = sum([self.all, bool(self.ranges), self.graphs is not None])
        if chosen != 1:
            raise ValueError("features: give exactly one of `all: true`, `ranges: [[start, "
                             "stop], ...]` or `graphs: <attribute output folder>`")
        for a, b in self.ranges:
            if not 0 <= a < b:
                raise ValueError(f"features.ranges: [{a}, {b}) is not a range of feature indices")
        return self


class TopKSection(StrictModel):
    source: Literal["heldout", "cache"] = "heldout"
    """`heldout`: the LM over held-out text of the CLT's corpus; `cache`: the CLT inputs read
    from an activation cache (no LM passes; its windows are training text)."""
    cache: str | None = None
    """The cache when `source: cache` (default: the run's data.cache)."""
    tokens: PositiveInt = 65536
    """Tokens searched for examples."""
    k: PositiveInt = 20
    samples_per_bin: PositiveInt = 4
    range_size: PositiveInt = 512
    chunk_windows: PositiveInt = 32


class AutoInterpConfig(StrictModel):
    checkpoint: str
    """A training run folder or checkpoint (its config names the model and corpus)."""
    out: str
    """Output folder: features.parquet, explanations.parquet, scores.parquet, llm-cache/."""
    features: FeatureChoice = FeatureChoice(all=True)
    topk: TopKSection = TopKSection()
    explain_examples: PositiveInt = 10
    scorers: list[Literal["detection", "fuzzing"]] = Field(
        default_factory=lambda: ["detection", "fuzzing"])
    score_examples: PositiveInt = 5
    """Activating and non-activating (or mis-highlighted) examples per scorer question."""
    llm: LLMConfig
    actors: PositiveInt = 2
    """Ray actors for the top-k pass and for the LLM calls (each gets llm.concurrency / actors)."""
    cpus_per_actor: PositiveFloat = Field(0.5, le=64)
