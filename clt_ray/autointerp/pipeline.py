"""The auto-interp run (docs/design.md §6): which features, top-k statistics (reused when the output
folder already holds them for the same request), explanations, scores, the summary. The heavy
steps run on an `Executor` passed in — `clt_ray.actors.autointerp.RayExecutor` puts them on Ray
Data actor pools — so this module holds the pipeline and no placement.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from typing_extensions import Self

from clt_ray import layout
from clt_ray.autointerp.llm import BUDGET_EXHAUSTED, LLMResult, check_endpoint
from clt_ray.autointerp.tasks import (
    explanation_requests,
    explanation_rows,
    score_rows,
    scoring_requests,
)
from clt_ray.cache.store import check_files, load_manifest
from clt_ray.config import AutoInterpConfig, LLMConfig, TopKSettings
from clt_ray.errors import CltRayError, ConfigError
from clt_ray.fsutil import Staged, atomic_write_parquet, is_uri
from clt_ray.train.checkpoint import LoadedCheckpoint, load_checkpoint, read_manifest


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


def chosen_features(cfg: AutoInterpConfig, n_layers: int,
                    n_features: int) -> tuple[tuple[int, int], Any]:
    """(the feature range to collect, a filter on (layer, feature)) of the config's choice, after
    checking it against a CLT of n_layers × n_features: ConfigError naming each problem."""
    choice = cfg.features
    problems = choice.problems(n_layers, n_features)
    if problems:
        raise ConfigError(f"features do not fit the checkpoint's CLT ({n_layers} layers of "
                          f"{n_features} features):\n  " + "\n  ".join(problems))
    layers = None if choice.layers is None else set(choice.layers)
    if choice.graphs is not None:
        nodes = graph_features(choice.graphs)
        outside = sorted((l, f) for l, f in nodes
                         if not (0 <= l < n_layers and 0 <= f < n_features))
        if outside:
            raise ConfigError(f"features.graphs: {choice.graphs} holds feature {outside[0][1]} of "
                              f"layer {outside[0][0]}, outside this CLT's {n_layers} layers of "
                              f"{n_features} features (graphs of another CLT?)")
        nodes = {(l, f) for l, f in nodes if layers is None or l in layers}
        if not nodes:
            raise ConfigError(f"features.graphs: {choice.graphs} holds no feature nodes"
                              + ("" if layers is None else f" in features.layers {sorted(layers)}"))
        lo, hi = min(f for _, f in nodes), max(f for _, f in nodes) + 1
        return (lo, hi), lambda l, f: (l, f) in nodes
    if choice.all:
        return (0, n_features), lambda l, f: layers is None or l in layers
    lo, hi = min(a for a, _ in choice.ranges), max(b for _, b in choice.ranges)
    return (lo, hi), lambda l, f: (any(a <= f < b for a, b in choice.ranges)
                                   and (layers is None or l in layers))


def graph_features(folder: str | os.PathLike[str]) -> set[tuple[int, int]]:
    """(layer, feature) of every feature node in the graph JSON files of an attribute folder."""

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"features.graphs: {folder} is not a folder; give the output folder of "
                          "`clt-ray attribute`")
    meta = folder / layout.GRAPH_METADATA
    if not meta.is_file():
        raise ConfigError(f"features.graphs: {folder} has no {layout.GRAPH_METADATA}; make graphs "
                          "with `clt-ray attribute`")
    out, path = set(), meta
    try:
        for g in json.loads(meta.read_text())["graphs"]:
            path = folder / f"{g['slug']}.json"
            for node in json.loads(path.read_text())["nodes"]:
                if node["feature_type"] == "cross layer transcoder":
                    layer, feature, _ = node["node_id"].split("_")
                    out.add((int(layer), int(feature)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"features.graphs: {path} is not readable as an attribution graph "
                          f"({type(exc).__name__}: {exc})") from None
    return out


def run_autointerp(cfg: AutoInterpConfig, executor: Executor,
                   log: Callable[[str], None] = print, topk_only: bool = False) -> dict[str, Any]:
    """Top-k statistics (reused when the folder already has them for these settings), then
    explanations, then scores (not with topk_only); Parquet files in cfg.out. Everything that can
    be checked is, before the executor starts (minutes of Ray work): the feature choice against
    the checkpoint's manifest, the checkpoint, the activation cache's files, the LLM endpoint.
    A stage whose every request failed is a CltRayError. Returns the run's summary."""
    clt = read_manifest(cfg.checkpoint)["clt"]
    chosen = chosen_features(cfg, clt["n_layers"], clt["n_features"])
    if cfg.llm is None and not topk_only:
        raise ConfigError("the config has no llm section (the endpoint that explains and "
                          "scores); add one, or run with --topk-only")
    loaded = load_checkpoint(cfg.checkpoint)
    t, cache = cfg.topk, None
    if t.source == "cache":
        cache = t.cache or loaded.config.data.cache
        if cache is None:
            raise ConfigError("topk.source is cache, but neither topk.cache nor the run's "
                              "data.cache names one")
        if load_manifest(cache) is None:
            raise ConfigError(f"topk.cache: no activation cache at {cache}")
        check_files(cache)  # a missing or truncated file: one line now, not inside the Ray job
    if not topk_only:
        check_endpoint(cfg.llm, cfg.llm.api_key(), log)
    # an output folder in a store: worked on in node-local scratch holding what is there (reused
    # as locally), pushed back at the end — also after a failure, so a rerun reuses the replies
    with Staged(cfg.out, "out") as out, executor:
        out.pull()
        try:
            return _run(cfg.model_copy(update={"out": str(out.local)}), executor, loaded,
                        cache, chosen, log, topk_only)
        finally:
            if out.local.is_dir():
                out.push()


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
    # which features: from three columns (73,728 features' whole rows as Python objects took
    # > 20 GB); the rows themselves only for the features explained
    index = pq.read_table(features_file, columns=["layer", "feature", "fired"])
    chosen_rows = [keep(layer, feature) for layer, feature in
                   zip(index["layer"].to_pylist(), index["feature"].to_pylist(), strict=True)]
    if topk_only:
        return {"features": sum(chosen_rows),
                "fired": sum(c and f > 0 for c, f in zip(chosen_rows, index["fired"].to_pylist(),
                                                          strict=True))}
    rows = pq.read_table(features_file).filter(pa.array(chosen_rows)).to_pylist()
    llm = cfg.llm
    assert llm is not None  # run_autointerp checked
    llm_cache = str(out / layout.LLM_CACHE)
    asked = explanation_requests(rows, llm.model, cfg.explain_examples)
    log(f"explaining {len(asked)} features with {llm.model} at {llm.base_url}")
    results = executor.call(asked, llm, llm_cache, desc="explanations", unit="feature")
    explained = explanation_rows(asked, results)
    atomic_write_parquet(explained, out / layout.EXPLANATIONS)
    _some_succeeded(results, "explanation", llm)
    texts = {(r["layer"], r["feature"]): r["explanation"] for r in explained if r["ok"]}
    scored_q = scoring_requests(rows, texts, cfg.scorers, llm.model, cfg.score_examples)
    log(f"scoring {len(texts)} explanations: {len(scored_q)} questions ({', '.join(cfg.scorers)})")
    score_results = executor.call(scored_q, llm, llm_cache, desc="scores")
    scored = score_rows(scored_q, score_results)
    atomic_write_parquet(scored, out / layout.SCORES)
    _some_succeeded(score_results, "scoring", llm)
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


def _some_succeeded(results: list[LLMResult], what: str, llm: LLMConfig) -> None:
    """A stage whose every request sent failed is an error, not a summary of zeros (its table is
    written first: each failure is recorded there, and a rerun asks only for those). Requests
    the budget stopped were not sent: the summary says the budget was reached."""
    sent = [r for r in results if r.error != BUDGET_EXHAUSTED]
    if not sent or any(r.ok for r in sent):
        return
    (error, n), *_ = Counter(" ".join(str(r.error).split()) for r in sent).most_common(1)
    raise CltRayError(f"all {len(sent)} {what} requests to {llm.base_url} ({llm.model}) "
                      f"failed; {'all' if n == len(sent) else f'{n} of them'}: {error[:300]}")


def topk_request(checkpoint: str | os.PathLike[str], tokens: int, features: tuple[int, int],
                 settings: TopKSettings, cache: str | None) -> dict:
    """What a features.parquet was made from (kept in its metadata): a rerun with the same
    request reuses the file."""
    where = str(checkpoint) if is_uri(checkpoint) else str(Path(checkpoint).resolve())
    return {"checkpoint": where, "tokens": tokens,
            "features": list(features), "settings": settings.model_dump(), "cache": cache}


def _metadata(path: Path) -> dict:
    raw = (pq.read_schema(path).metadata or {}).get(b"clt_ray")
    return json.loads(raw) if raw else {}
