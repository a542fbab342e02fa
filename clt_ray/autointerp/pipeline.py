"""The auto-interp run (docs/design.md §6): which features, top-k statistics (reused when the output
folder already holds them for the same request), explanations, scores, the summary. The heavy
steps run on an `Executor` passed in — `clt_ray.actors.autointerp.RayExecutor` puts them on Ray
Data actor pools — so this module holds the pipeline and no placement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq
from typing_extensions import Self

from clt_ray import layout
from clt_ray.autointerp.llm import BUDGET_EXHAUSTED, LLMResult
from clt_ray.autointerp.tasks import (
    explanation_requests,
    explanation_rows,
    score_rows,
    scoring_requests,
)
from clt_ray.cache.store import load_manifest
from clt_ray.config import AutoInterpConfig, LLMConfig, TopKSettings
from clt_ray.fsutil import atomic_write_parquet
from clt_ray.train.checkpoint import LoadedCheckpoint, load_checkpoint


class Executor(Protocol):
    """Where the pipeline's heavy steps run; entered once around them."""

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def collect(self, checkpoint: str, out: Path, *, loaded: LoadedCheckpoint, tokens: int,
                features: tuple[int, int], settings: TopKSettings, cache: str | None,
                extra: dict, log: Callable[[str], None]) -> Path:
        """Top-k statistics of features [start, stop) of every layer into `out` (Parquet)."""
        ...

    def call(self, requests: list[dict], llm: LLMConfig, cache_dir: str, *, desc: str,
             unit: str = "req") -> list[LLMResult]:
        """LLM results in request order, every call of a run under the one budget."""
        ...


def chosen_features(cfg: AutoInterpConfig, n_features: int) -> tuple[tuple[int, int], Any]:
    """(the feature range to collect, a filter on (layer, feature)) of the config's choice."""
    choice = cfg.features
    layers = None if choice.layers is None else set(choice.layers)
    if choice.graphs is not None:
        nodes = graph_features(choice.graphs)
        if not nodes:
            raise ValueError(f"{choice.graphs}: its graphs hold no feature nodes")
        lo, hi = min(f for _, f in nodes), max(f for _, f in nodes) + 1
        return (lo, hi), lambda l, f: (l, f) in nodes and (layers is None or l in layers)
    if choice.all:
        return (0, n_features), lambda l, f: layers is None or l in layers
    if max(b for _, b in choice.ranges) > n_features:
        raise ValueError(f"features.ranges go past the CLT's {n_features} features per layer")
    lo, hi = min(a for a, _ in choice.ranges), max(b for _, b in choice.ranges)
    return (lo, hi), lambda l, f: (any(a <= f < b for a, b in choice.ranges)
                                   and (layers is None or l in layers))


def graph_features(folder: str | os.PathLike[str]) -> set[tuple[int, int]]:
    """(layer, feature) of every feature node in the graph JSON files of an attribute folder."""

    folder = Path(folder)
    meta = folder / layout.GRAPH_METADATA
    if not meta.is_file():
        raise ValueError(f"{folder}: no {layout.GRAPH_METADATA}; make graphs with `clt-ray attribute`")
    out = set()
    for g in json.loads(meta.read_text())["graphs"]:
        graph = json.loads((folder / f"{g['slug']}.json").read_text())
        for node in graph["nodes"]:
            if node["feature_type"] == "cross layer transcoder":
                layer, feature, _ = node["node_id"].split("_")
                out.add((int(layer), int(feature)))
    return out


def run_autointerp(cfg: AutoInterpConfig, executor: Executor,
                   log: Callable[[str], None] = print, topk_only: bool = False) -> dict[str, Any]:
    """Top-k statistics (reused when the folder already has them for these settings), then
    explanations, then scores (not with topk_only); Parquet files in cfg.out. The checkpoint is
    loaded and checked before the executor starts. Returns the run's summary."""
    loaded = load_checkpoint(cfg.checkpoint)
    t, cache = cfg.topk, None
    if t.source == "cache":
        cache = t.cache or loaded.config.data.cache
        if cache is None:
            raise ValueError("topk.source is cache, but neither topk.cache nor the run's "
                             "data.cache names one")
        if load_manifest(cache) is None:
            raise ValueError(f"topk.cache: no activation cache at {cache}")
    chosen = chosen_features(cfg, loaded.model.cfg.n_features)
    with executor:
        return _run(cfg, executor, loaded, cache, chosen, log, topk_only)


def _run(cfg: AutoInterpConfig, executor: Executor, loaded: LoadedCheckpoint,
         cache: str | None, chosen: tuple[tuple[int, int], Any], log: Callable[[str], None],
         topk_only: bool) -> dict[str, Any]:
    t = cfg.topk
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (lo, hi), keep = chosen
    settings = t.settings()
    features_file = out / layout.TOPK_FEATURES
    wanted = topk_request(cfg.checkpoint, t.tokens, (lo, hi), settings, cache)
    if not features_file.is_file() or _metadata(features_file).get("request") != wanted:
        executor.collect(cfg.checkpoint, features_file, loaded=loaded, tokens=t.tokens,
                         features=(lo, hi), settings=settings, cache=cache,
                         extra={"request": wanted}, log=log)
    else:
        log(f"reusing {features_file}")
    rows = [r for r in pq.read_table(features_file).to_pylist() if keep(r["layer"], r["feature"])]
    if topk_only:
        return {"features": len(rows), "fired": sum(bool(r["top_examples"]) for r in rows)}
    llm_cache = str(out / layout.LLM_CACHE)
    asked = explanation_requests(rows, cfg.llm.model, cfg.explain_examples)
    log(f"explaining {len(asked)} features with {cfg.llm.model} at {cfg.llm.base_url}")
    results = executor.call(asked, cfg.llm, llm_cache, desc="explanations", unit="feature")
    explained = explanation_rows(asked, results)
    atomic_write_parquet(explained, out / layout.EXPLANATIONS)
    texts = {(r["layer"], r["feature"]): r["explanation"] for r in explained if r["ok"]}
    scored_q = scoring_requests(rows, texts, cfg.scorers, cfg.llm.model, cfg.score_examples)
    log(f"scoring {len(texts)} explanations: {len(scored_q)} questions ({', '.join(cfg.scorers)})")
    scored = score_rows(scored_q, executor.call(scored_q, cfg.llm, llm_cache, desc="scores"))
    atomic_write_parquet(scored, out / layout.SCORES)
    every = explained + scored
    summary = {
        "features": len(rows), "explained": len(texts),
        "explain_failed": sum(not r["ok"] for r in explained),
        "scored": sum(r["ok"] for r in scored), "score_failed": sum(not r["ok"] for r in scored),
        "budget_exhausted": any(r["error"] == BUDGET_EXHAUSTED for r in every),
        "prompt_tokens": sum(r["prompt_tokens"] for r in every),
        "completion_tokens": sum(r["completion_tokens"] for r in every),
        "cost_usd": round(sum(r["cost_usd"] for r in every), 6)}
    for name in cfg.scorers:
        ok = [r for r in scored if r["scorer"] == name and r["ok"]]
        if ok:
            summary[f"{name}_auc_mean"] = round(sum(r["auc"] for r in ok) / len(ok), 4)
    return summary


def topk_request(checkpoint: str | os.PathLike[str], tokens: int, features: tuple[int, int],
                 settings: TopKSettings, cache: str | None) -> dict:
    """What a features.parquet was made from (kept in its metadata): a rerun with the same
    request reuses the file."""
    return {"checkpoint": str(Path(checkpoint).resolve()), "tokens": tokens,
            "features": list(features), "settings": settings.model_dump(), "cache": cache}


def _metadata(path: Path) -> dict:
    raw = (pq.read_schema(path).metadata or {}).get(b"clt_ray")
    return json.loads(raw) if raw else {}
