"""Top-k feature statistics as a Ray Data job (DESIGN.md §6): placement and messaging only; every
computation is `clt_ray.autointerp.collect`'s / `topk`'s.

    chunks of windows ──map_batches(ChunkStates, actor pool)──▶ (range, partial state) rows
        ──groupby(range).map_groups(merge)──▶ one state per range
        ──map_batches(RangeRows, actor pool)──▶ feature rows ──▶ one Parquet file (driver)

Actors load the LM and the CLT once. The token windows are tokenised once by the driver and shared
through the object store. States travel as `.npz` bytes (numpy arrays, no pickle). The datasets are
built with `from_items`, and actors take fractional CPUs, so Ray Data's own tasks always find a
CPU (with every CPU held by actors it waits forever).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from clt_ray.actors.cache_producer import FORWARDED_ENV
from tqdm import tqdm

from clt_ray.autointerp.cache_source import CacheWindows, cache_windows, window_inputs
from clt_ray.autointerp.collect import (
    FEATURE_SCHEMA,
    TokenText,
    TopKSettings,
    chunk_states,
    clt_decoder_rows,
    feature_ranges,
    feature_rows,
    logit_effects,
    unembedding,
    window_activations,
    write_features,
)
from clt_ray.autointerp.config import AutoInterpConfig
from clt_ray.autointerp.llm import (
    BUDGET_EXHAUSTED,
    Budget,
    LLMClient,
    LLMConfig,
    LLMRequest,
    LLMResult,
    ResultCache,
)
from clt_ray.autointerp.tasks import parser
from clt_ray.autointerp.topk import TopKState, encode_range, merge_all
from clt_ray.config import DataConfig
from clt_ray.fsutil import atomic_write_parquet


def state_bytes(state: TopKState) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.to_row().items()})
    return buf.getvalue()


def state_from_bytes(data: bytes) -> TopKState:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        row = {k: z[k] for k in z.files}
    for k in ("start", "stop", "n_tokens"):
        row[k] = int(row[k])
    return TopKState.from_row(row)


class _Worker:
    """The LM, the CLT (features [start, stop) of a checkpoint) and the windows, loaded once.
    windows: [ref of (ids, mask)] or, for the cache source, [ref of a CacheWindows]."""

    def __init__(self, checkpoint: str, features: tuple[int, int] | None, windows: list,
                 settings: TopKSettings) -> None:
        from clt_ray.checkpoint import load_checkpoint
        from clt_ray.models import keep_mask, load_model

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        loaded = load_checkpoint(checkpoint)
        self.cfg, self.settings = loaded.config, settings
        self.clt = loaded.model if features is None else loaded.model.shard(*features)
        self.lm, self.tokenizer = load_model(self.cfg.model)
        source = ray.get(windows[0])
        self.cache = source if isinstance(source, CacheWindows) else None
        self.ids, self.mask = (source.ids, source.mask) if self.cache else source
        self.valid = keep_mask(self.ids, self.mask)

    def x(self, windows: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return window_inputs(self.cache, windows)
        return window_activations(self.lm, self.ids[windows], self.mask[windows],
                                  self.cfg.model.input_hook)


class ChunkStates(_Worker):
    """Pass 1: a chunk of windows → one partial state per feature range."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        s, out = self.settings, {"start": [], "state": []}
        ranges = feature_ranges(self.clt.start, self.clt.stop, s.range_size)
        for first, stop in zip(batch["first"].tolist(), batch["stop"].tolist()):
            windows = torch.arange(first, stop)
            for st in chunk_states(self.clt, self.x(windows), self.valid[windows], windows,
                                   ranges, s):
                out["start"].append(st.start)
                out["state"].append(state_bytes(st))
        return out


def merge_group(group: dict[str, np.ndarray]) -> dict[str, list]:
    """All partial states of one range → its state (order-independent merge)."""
    merged = merge_all([state_from_bytes(bytes(b)) for b in group["state"]])
    return {"start": [merged.start], "state": [state_bytes(merged)]}


class RangeRows(_Worker):
    """Pass 2: a range's merged state → its feature rows (examples read on the named windows)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.text, self.unembed = TokenText(self.tokenizer), unembedding(self.lm)
        self.decoder = clt_decoder_rows(self.clt)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = []
        for data in batch["state"]:
            state = state_from_bytes(bytes(data))

            def window_acts(windows: list[int], st: TopKState = state) -> torch.Tensor:
                w = torch.tensor(windows)
                return encode_range(self.clt, self.x(w), st.start, st.stop)

            effects = logit_effects(self.decoder, self.clt.cfg.n_layers, self.unembed, self.text,
                                    state.start, state.stop, self.settings.logits)
            rows += feature_rows(state, window_acts, self.ids, self.valid, self.text, effects,
                                 self.settings)
        return pa.Table.from_pylist(rows, schema=FEATURE_SCHEMA)


def collect_on_ray(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   data: DataConfig | None = None, tokens: int = 65536,
                   features: tuple[int, int] | None = None,
                   settings: TopKSettings | None = None, actors: int = 2,
                   cpus_per_actor: float = 0.5, log=print, extra: dict | None = None,
                   loaded: Any = None, cache: str | None = None) -> Path:
    """Feature statistics of a checkpoint's CLT over `tokens` held-out tokens of `data` (default:
    its run config's corpus) → Parquet at `out`, one row per feature (collect.FEATURE_SCHEMA).
    cache: read the CLT inputs of the first `tokens` tokens of this activation cache instead
    (a chunk per file; no LM passes). features: only [start, stop) of each layer. loaded: the
    checkpoint, if already loaded. Ray must be initialised (ensure_ray)."""
    from clt_ray.cache.store import open_cache
    from clt_ray.checkpoint import load_checkpoint
    from clt_ray.data import heldout_windows
    from clt_ray.models.loading import load_tokenizer

    s = settings or TopKSettings()
    loaded = loaded or load_checkpoint(checkpoint)
    cfg = loaded.config
    if cfg is None:
        raise ValueError(f"{checkpoint}: saved without its run config (model and corpus)")
    if loaded.model.cfg.activation not in ("jumprelu", "relu"):
        raise ValueError(f"feature statistics need a JumpReLU or ReLU CLT; this one is "
                         f"{loaded.model.cfg.activation}")
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision)
    if cache is None:
        ids, mask = heldout_windows(tokenizer, data or cfg.data, tokens)
        chunks = [(c, min(c + s.chunk_windows, len(ids))) for c in range(0, len(ids),
                                                                         s.chunk_windows)]
        source, where = ray.put((ids, mask)), "held-out text"
    else:
        open_cache(cache)[2].check_matches(
            model=cfg.model.name, input_hook=cfg.model.input_hook,
            output_hook=cfg.model.output_hook, layers=loaded.model.cfg.n_layers,
            d_model=loaded.model.cfg.d_model)
        src = cache_windows(cache, data or cfg.data, tokenizer, tokens)
        ids, mask, chunks = src.ids, src.mask, src.chunks()
        source, where = ray.put(src), f"{len(src.files)} files of the cache {cache}"
    log(f"top-k statistics of {'all' if features is None else features} features over "
        f"{len(ids)} windows ({tokens:,} tokens) of {where} with {actors} actors")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    args = (str(Path(checkpoint).resolve()), features, [source], s)
    pool = {"compute": ray.data.ActorPoolStrategy(size=actors), "num_cpus": cpus_per_actor,
            "batch_size": 1, "fn_constructor_args": args, "runtime_env": {"env_vars": env}}
    states = ray.data.from_items([{"first": a, "stop": b} for a, b in chunks]).map_batches(
        ChunkStates, **pool)
    start, stop = features or (0, loaded.model.cfg.n_features)
    n_ranges = len(feature_ranges(start, stop, s.range_size))
    merged = states.groupby("start", num_partitions=n_ranges).map_groups(
        merge_group, batch_format="numpy")
    tables = list(merged.map_batches(RangeRows, batch_format="numpy", **pool)
                  .iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(tables) if tables else FEATURE_SCHEMA.empty_table()
    rows = table.sort_by([("layer", "ascending"), ("feature", "ascending")]).to_pylist()
    return write_features(rows, out, {"checkpoint": str(loaded.path), "windows": len(ids),
                                      "tokens": int(mask.sum()), "settings": vars(s),
                                      **(extra or {})})


# --- LLM calls on an actor pool ----------------------------------------------------------------


@ray.remote(num_cpus=0)
class BudgetKeeper:
    """USD spent by every LLM actor of a run (explanations and scores), against the one cap."""

    def __init__(self) -> None:
        self.spent = 0.0

    def charge(self, usd: float) -> float:
        self.spent += usd
        return self.spent


class SharedBudget(Budget):
    """A Budget whose spending is the whole pool's. Charges add up here and are sent to the
    keeper, with the pool's total read back, at most every SYNC_S: a round trip per request
    would stall the actor's event loop (~1 ms each). Without a cap nothing is sent at all."""

    SYNC_S = 0.05

    def __init__(self, limit_usd: float | None, keeper: Any) -> None:
        super().__init__(limit_usd)
        self.keeper, self.pending, self.synced_at = keeper, 0.0, 0.0

    def charge(self, usd: float) -> None:
        self.pending += usd
        self.spent_usd += usd

    @property
    def exhausted(self) -> bool:
        if self.limit_usd is None:
            return False
        if time.monotonic() - self.synced_at > self.SYNC_S:
            self.spent_usd = ray.get(self.keeper.charge.remote(self.pending))
            self.pending, self.synced_at = 0.0, time.monotonic()
        return self.spent_usd >= self.limit_usd

    def flush(self) -> None:
        if self.pending:
            self.spent_usd = ray.get(self.keeper.charge.remote(self.pending))
            self.pending = 0.0


class LLMCaller:
    """One async OpenAI client set per actor; batches run one at a time so the actor keeps to its
    share of llm.concurrency. Results are written to the shared result cache as they finish."""

    def __init__(self, llm: LLMConfig, cache_dir: str, keeper: list) -> None:
        import asyncio

        self.cache = ResultCache(cache_dir)
        self.budget = SharedBudget(llm.budget_usd, keeper[0])
        self.client = LLMClient(llm, self.cache, self.budget)
        self.lock = asyncio.Lock()

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        async with self.lock:
            results: dict[str, LLMResult] = {}
            for name in sorted(set(batch["parser"].tolist())):
                idx = [i for i, p in enumerate(batch["parser"]) if p == name]
                requests = [LLMRequest(str(batch["key"][i]), json.loads(batch["messages"][i]))
                            for i in idx]
                for res in await self.client.run(requests, parser(name)):
                    results[res.key] = res
            self.budget.flush()  # the next stage's actors see this one's spending
        return {"result": [results[str(k)].to_json() for k in batch["key"]]}


def call_on_ray(requests: list[dict], llm: LLMConfig, cache_dir: str, *, actors: int = 2,
                cpus_per_actor: float = 0.25, keeper: Any = None, progress: bool = False,
                desc: str = "LLM", unit: str = "req") -> list[LLMResult]:
    """Results in request order, from `actors` LLMCaller actors (llm.concurrency split between
    them). A rerun with the same cache folder sends only what is missing. keeper: the run's
    BudgetKeeper, when several calls share one budget. progress: a bar with requests/s, failures
    and the cost so far (results arrive as each actor batch finishes)."""
    if not requests:
        return []
    share = llm.model_copy(update={"concurrency": max(1, -(-llm.concurrency // actors))})
    own_keeper = keeper is None
    keeper = BudgetKeeper.remote() if own_keeper else keeper
    env = {k: os.environ[k] for k in FORWARDED_ENV + (llm.api_key_env,) if k in os.environ}
    items = [{"key": r["key"], "parser": r["parser"], "messages": json.dumps(r["messages"])}
             for r in requests]
    per_batch = max(4 * share.concurrency, -(-len(items) // (4 * actors)))
    ds = ray.data.from_items(items).map_batches(
        LLMCaller, fn_constructor_args=(share, cache_dir, [keeper]), batch_size=per_batch,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
        runtime_env={"env_vars": env})
    by_key, cost, failed = {}, 0.0, 0
    with tqdm(total=len(requests), desc=desc, unit=unit, disable=not progress) as bar:
        for row in ds.iter_rows():
            res = LLMResult.from_json(row["result"])
            by_key[res.key] = res
            cost, failed = cost + res.cost_usd, failed + (not res.ok)
            bar.update()
            bar.set_postfix(failed=failed, cost=f"${cost:.4f}", refresh=False)
    if own_keeper:
        ray.kill(keeper)
    return [by_key[r["key"]] for r in requests]


# --- the whole run -----------------------------------------------------------------------------


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
    from clt_ray.attribution import METADATA_FILE

    folder = Path(folder)
    meta = folder / METADATA_FILE
    if not meta.is_file():
        raise ValueError(f"{folder}: no {METADATA_FILE}; make graphs with `clt-ray attribute`")
    out = set()
    for g in json.loads(meta.read_text())["graphs"]:
        graph = json.loads((folder / f"{g['slug']}.json").read_text())
        for node in graph["nodes"]:
            if node["feature_type"] == "cross layer transcoder":
                layer, feature, _ = node["node_id"].split("_")
                out.add((int(layer), int(feature)))
    return out


def run_autointerp(cfg: AutoInterpConfig, log=print, progress: bool = False,
                   address: str | None = None, topk_only: bool = False) -> dict[str, Any]:
    """Top-k statistics (reused when the folder already has them for these settings), then
    explanations, then scores (not with topk_only); Parquet files in cfg.out. The checkpoint is
    loaded (and checked) before Ray starts (ensure_ray(address)). Returns the run's summary."""
    import pyarrow.parquet as pq
    from clt_ray.actors.cache_producer import ensure_ray

    from clt_ray.autointerp.tasks import (
        explanation_requests,
        explanation_rows,
        score_rows,
        scoring_requests,
    )
    from clt_ray.cache.store import load_manifest
    from clt_ray.checkpoint import load_checkpoint

    loaded = load_checkpoint(cfg.checkpoint)
    t, cache = cfg.topk, None
    if t.source == "cache":
        cache = t.cache or loaded.config.data.cache
        if cache is None:
            raise ValueError("topk.source is cache, but neither topk.cache nor the run's "
                             "data.cache names one")
        if load_manifest(cache) is None:
            raise ValueError(f"topk.cache: no activation cache at {cache}")
    ensure_ray(address)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n_features = loaded.model.cfg.n_features
    (lo, hi), keep = chosen_features(cfg, n_features)
    settings = TopKSettings(k=t.k, samples_per_bin=t.samples_per_bin, range_size=t.range_size,
                            chunk_windows=t.chunk_windows)
    features_file = out / "features.parquet"
    wanted = topk_request(cfg.checkpoint, t.tokens, (lo, hi), settings, cache)
    if not features_file.is_file() or _metadata(features_file).get("request") != wanted:
        collect_on_ray(cfg.checkpoint, features_file, tokens=t.tokens, features=(lo, hi),
                       settings=settings, actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor,
                       log=log, extra={"request": wanted}, loaded=loaded, cache=cache)
    else:
        log(f"reusing {features_file}")
    rows = [r for r in pq.read_table(features_file).to_pylist() if keep(r["layer"], r["feature"])]
    if topk_only:
        return {"features": len(rows), "fired": sum(bool(r["top_examples"]) for r in rows)}
    cache = str(out / "llm-cache")
    asked = explanation_requests(rows, cfg.llm.model, cfg.explain_examples)
    log(f"explaining {len(asked)} features with {cfg.llm.model} at {cfg.llm.base_url}")
    keeper = BudgetKeeper.remote()  # one budget for explanations and scores
    results = call_on_ray(asked, cfg.llm, cache, actors=cfg.actors, keeper=keeper,
                          progress=progress, desc="explanations", unit="feature")
    explained = explanation_rows(asked, results)
    atomic_write_parquet(explained, out / "explanations.parquet")
    texts = {(r["layer"], r["feature"]): r["explanation"] for r in explained if r["ok"]}
    scored_q = scoring_requests(rows, texts, cfg.scorers, cfg.llm.model, cfg.score_examples)
    log(f"scoring {len(texts)} explanations: {len(scored_q)} questions ({', '.join(cfg.scorers)})")
    scored = score_rows(scored_q, call_on_ray(scored_q, cfg.llm, cache, actors=cfg.actors,
                                              keeper=keeper, progress=progress, desc="scores"))
    ray.kill(keeper)
    atomic_write_parquet(scored, out / "scores.parquet")
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
            "features": list(features), "settings": vars(settings), "cache": cache}


def _metadata(path: Path) -> dict:
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"clt_ray")
    return json.loads(raw) if raw else {}


