"""Auto-interp on Ray (docs/design.md §6): placement and messaging only. Top-k feature statistics as
a Ray Data job (every computation is `clt_ray.features.collect`'s / `topk`'s), LLM calls on an actor
pool under one budget, and `RayExecutor`, which runs `clt_ray.autointerp.pipeline` on them.

    chunks of windows ──map_batches(ChunkStates, actor pool)──▶ (range, partial state) rows
        ──groupby(range).map_groups(merge)──▶ one state per range
        ──map_batches(RangeRows, actor pool)──▶ feature rows ──▶ one Parquet file (driver)

Actors load the LM and the CLT once. The token windows are tokenised once by the driver and shared
through the object store. States travel as `.npz` bytes (numpy arrays, no pickle). The datasets are
built with `from_items`, and actors take fractional CPUs, so Ray Data's own tasks always find a
CPU (with every CPU held by actors it waits forever).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from clt_ray.actors.ray_session import FORWARDED_ENV, ensure_ray
from pydantic import SecretStr
from ray.exceptions import RayError
from tqdm import tqdm
from typing_extensions import Self

from clt_ray.autointerp.cache_source import CacheWindows, cache_windows, window_inputs
from clt_ray.autointerp.llm import (
    Budget,
    LLMClient,
    LLMRequest,
    LLMResult,
    ResultCache,
)
from clt_ray.autointerp.pipeline import run_autointerp
from clt_ray.autointerp.tasks import (
    parser,
)
from clt_ray.cache.store import open_cache
from clt_ray.config import AutoInterpConfig, DataConfig, LLMConfig, TopKSettings
from clt_ray.data import heldout_windows
from clt_ray.errors import CltRayError
from clt_ray.features.collect import (
    FEATURE_SCHEMA,
    TokenText,
    chunk_states,
    clt_decoder_rows,
    feature_ranges,
    feature_rows,
    lm_window_inputs,
    logit_effects,
    unembedding,
    write_features,
)
from clt_ray.features.topk import TopKState, encode_range, merge_all
from clt_ray.fsutil import is_uri
from clt_ray.lm import keep_mask, load_model
from clt_ray.lm.loading import load_tokenizer
from clt_ray.train.checkpoint import LoadedCheckpoint, load_checkpoint


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
        return lm_window_inputs(self.lm, self.ids[windows], self.mask[windows],
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
    s = settings or TopKSettings()
    loaded = loaded or load_checkpoint(checkpoint)
    cfg = loaded.config
    if cfg is None:
        raise CltRayError(f"{checkpoint}: saved without its run config (model and corpus)")
    if loaded.model.cfg.activation not in ("jumprelu", "relu"):
        raise CltRayError(f"feature statistics need a JumpReLU or ReLU CLT; this one is "
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
    start, stop = features or (0, loaded.model.cfg.n_features)
    n_ranges = len(feature_ranges(start, stop, s.range_size))
    where = loaded.location  # the exact checkpoint (a URI: each actor fetches it)
    args = (where if is_uri(where) else str(Path(where).resolve()), features, [source], s)
    with user_errors_unwrapped():
        tables = topk_tables(args, chunks, n_ranges, actors, cpus_per_actor)
    # Arrow all the way to the file: as Python objects, 73,728 features' rows took > 20 GB
    table = pa.concat_tables(tables) if tables else FEATURE_SCHEMA.empty_table()
    return write_features(table, out, {"checkpoint": where, "windows": len(ids),
                                      "tokens": int(mask.sum()), "settings": s.model_dump(),
                                      **(extra or {})})


def topk_tables(args: tuple, chunks: list[tuple[int, int]], n_ranges: int, actors: int,
                cpus_per_actor: float) -> list[pa.Table]:
    """The Ray Data job of the module's docstring: feature rows. args: the actors' constructor
    arguments. Its datasets live only in this frame, so that a failed job's actors (which Ray
    Data frees by refcount) go when its exception's traceback is cleared."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    pool = {"compute": ray.data.ActorPoolStrategy(size=actors), "num_cpus": cpus_per_actor,
            "batch_size": 1, "fn_constructor_args": args, "runtime_env": {"env_vars": env}}
    states = ray.data.from_items([{"first": a, "stop": b} for a, b in chunks]).map_batches(
        ChunkStates, **pool)
    merged = states.groupby("start", num_partitions=n_ranges).map_groups(
        merge_group, batch_format="numpy")
    return list(merged.map_batches(RangeRows, batch_format="numpy", **pool)
                .iter_batches(batch_format="pyarrow", batch_size=None))


@contextlib.contextmanager
def user_errors_unwrapped() -> Iterator[None]:
    """Re-raise a CltRayError that an actor raised (a damaged cache file) as itself, in one line:
    Ray delivers it as a RayTaskError whose message is the remote traceback (~100 lines)."""
    try:
        yield
    except Exception as exc:
        err = remote_user_error(exc)
        if err is None:
            raise
        # The tracebacks' frames hold the failed job's actors, which Ray Data frees by refcount
        # (and its executor's reference cycles by the collector).
        chain: BaseException | None = exc
        while chain is not None:
            chain.__traceback__ = None
            chain = chain.__cause__ or chain.__context__
        gc.collect()
        raise err from None


REMOTE_ERROR = re.compile(r"^(clt_ray(?:\.\w+)+)\.(\w+): (.*)$", re.MULTILINE)
"""The line of a remote traceback naming the error: "clt_ray.cache.store.CacheError: <message>"."""


def remote_user_error(exc: BaseException) -> CltRayError | None:
    """The CltRayError behind a Ray task's failure, or None. Ray Data wraps a UDF's exception in a
    UserCodeException whose cause does not survive pickling, so the error is rebuilt from the
    remote traceback in the RayTaskError's text."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, CltRayError) and not isinstance(cause, RayError):
            return cause
        matches = list(REMOTE_ERROR.finditer(str(cause))) if isinstance(cause, RayError) else []
        if matches:
            module, name, message = matches[-1].groups()
            try:
                cls = getattr(importlib.import_module(module), name, None)
            except ImportError:
                cls = None
            if isinstance(cls, type) and issubclass(cls, CltRayError):
                err = cls.__new__(cls)
                Exception.__init__(err, message.strip())
                return err
        cause = getattr(cause, "cause", None) or cause.__cause__
    return None


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
    share of llm.concurrency. Results are written to the shared result cache as they finish.
    api_key: the driver's (a constructor argument travels in Ray's memory; a runtime_env's
    env_vars would be written to Ray's session logs)."""

    def __init__(self, llm: LLMConfig, cache_dir: str, keeper: list, api_key: SecretStr) -> None:
        import asyncio

        self.cache = ResultCache(cache_dir)
        self.budget = SharedBudget(llm.budget_usd, keeper[0])
        self.client = LLMClient(llm, self.cache, self.budget, api_key)
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
    items = [{"key": r["key"], "parser": r["parser"], "messages": json.dumps(r["messages"])}
             for r in requests]
    per_batch = max(4 * share.concurrency, -(-len(items) // (4 * actors)))
    ds = ray.data.from_items(items).map_batches(
        LLMCaller, fn_constructor_args=(share, cache_dir, [keeper], llm.api_key()),
        batch_size=per_batch, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor)
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


# --- the executor of the auto-interp pipeline ---------------------------------------------------


class RayExecutor:
    """Runs the heavy steps of `clt_ray.autointerp.pipeline.run_autointerp` on Ray: top-k
    statistics as a Ray Data job (`collect_on_ray`) and LLM calls on an actor pool
    (`call_on_ray`) under one budget for the whole run. Connects on enter (ensure_ray)."""

    def __init__(self, *, address: str | None = None, actors: int = 2,
                 cpus_per_actor: float = 0.5, progress: bool = False) -> None:
        self.address, self.actors, self.cpus_per_actor = address, actors, cpus_per_actor
        self.progress, self.keeper = progress, None

    def __enter__(self) -> Self:
        ensure_ray(self.address)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.keeper is not None:
            ray.kill(self.keeper)
            self.keeper = None

    def collect(self, checkpoint: str, out: Path, *, loaded: LoadedCheckpoint, tokens: int,
                features: tuple[int, int], settings: TopKSettings, cache: str | None,
                extra: dict, log: Callable[[str], None]) -> Path:
        return collect_on_ray(checkpoint, out, tokens=tokens, features=features,
                              settings=settings, actors=self.actors,
                              cpus_per_actor=self.cpus_per_actor, log=log, extra=extra,
                              loaded=loaded, cache=cache)

    def call(self, requests: list[dict], llm: LLMConfig, cache_dir: str, *, desc: str,
             unit: str = "req") -> list[LLMResult]:
        if self.keeper is None:
            self.keeper = BudgetKeeper.remote()  # one budget for explanations and scores
        return call_on_ray(requests, llm, cache_dir, actors=self.actors, keeper=self.keeper,
                           progress=self.progress, desc=desc, unit=unit)


def run_autointerp_on_ray(cfg: AutoInterpConfig, log: Callable[[str], None] = print,
                          progress: bool = False, address: str | None = None,
                          topk_only: bool = False) -> dict[str, Any]:
    """`clt-ray autointerp`: the pipeline with the config's actors on the Ray at `address`."""
    return run_autointerp(cfg, RayExecutor(address=address, actors=cfg.actors,
                                           cpus_per_actor=cfg.cpus_per_actor,
                                           progress=progress),
                          log=log, topk_only=topk_only)
