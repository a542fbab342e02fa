"""The LLM-call layer of auto-interp: bounded-concurrency chat completions against any
OpenAI-compatible server, with a durable result cache, token/cost counts and a budget cap.

Retries are the `openai` client's own (`max_retries`): checked in openai's `_base_client.py`
(3.57), it retries connection errors, timeouts and the statuses 408, 409, 429 and >= 500 (or
whatever an `x-should-retry` header says), with exponential backoff 0.5 s * 2^n capped at 8 s and
up to 25 % jitter. It honours `retry-after-ms` / `retry-after` (seconds or an HTTP date) when
0 < delay <= 120 s; a larger delay is not retried at all, and `retry-after: 0` falls back to the
exponential backoff. This layer adds one thing on top: a reply that `parse` rejects is asked once
more, then recorded as failed with its raw text.

The API key is read only from the environment variable named by `LLMConfig.api_key_env`, when a
run starts, as a SecretStr (redacted repr) that reaches Ray actors as a constructor argument; only
that run's openai clients hold its value: never a config, a result, the cache or a log. Unset, the
requests carry the placeholder "EMPTY" and `check_endpoint` says so once.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import SecretStr
from typing_extensions import Self

from clt_ray.config import NO_KEY, LLMConfig
from clt_ray.errors import CltRayError

log = logging.getLogger(__name__)

BUDGET_EXHAUSTED = "budget exhausted"
POOL_SIZE = 8  # connections per httpx client (see LLMClient._open_clients)
PLATFORM_HEADERS = ("X-Stainless-Lang", "X-Stainless-Package-Version", "X-Stainless-OS",
                    "X-Stainless-Arch", "X-Stainless-Runtime", "X-Stainless-Runtime-Version")
"""openai's telemetry headers, left out (`Omit`): each header is re-encoded several times per
request, and at hundreds of requests/s per process that CPU is the limit."""


@dataclass
class LLMRequest:
    key: str
    """Identifies the request in the cache; see `request_key`."""
    messages: list[dict[str, Any]]


@dataclass
class LLMResult:
    key: str
    ok: bool
    text: Any | None
    """What `parse` returned (a string or another JSON-able value); None when not ok."""
    raw: str | None
    """The last raw reply, kept for failures too so a malformed one can be inspected."""
    error: str | None
    attempts: int
    """HTTP requests made for this key, the openai client's own retries included."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> LLMResult:
        data = json.loads(line)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def request_key(feature_id: str, messages: Sequence[dict[str, Any]], model: str) -> str:
    """A stable key for (feature, prompt, model): the same question is never paid for twice."""
    canonical = json.dumps(
        {"feature": feature_id, "messages": list(messages), "model": model},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResultCache:
    """Finished successful results in append-only JSONL files, one file per writer process.

    Separate files mean concurrent writers (actors, reruns) never interleave lines; every line is
    flushed and fsynced before `put` returns, so a killed run keeps what it finished. On open all
    files are read; a line that does not parse (a write cut off by a kill) is skipped. Failures are
    not cached: a rerun asks them again."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._results: dict[str, LLMResult] = {}
        self._file: IO[str] | None = None
        self._lock = threading.Lock()  # put_many runs in a worker thread
        for path in sorted(self.folder.glob("*.jsonl")):
            self._load(path)

    def _load(self, path: Path) -> None:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    result = LLMResult.from_json(line)
                except (ValueError, TypeError, KeyError):
                    log.warning("result cache: skipping unreadable line %s:%d", path, n)
                    continue
                if result.ok:
                    self._results[result.key] = result

    def __contains__(self, key: object) -> bool:
        return key in self._results

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._results))

    def get(self, key: str) -> LLMResult | None:
        return self._results.get(key)

    def put(self, result: LLMResult) -> None:
        self.put_many([result])

    def put_many(self, results: Sequence[LLMResult]) -> None:
        """Append the successful ones with one fsync (the client batches what finished meanwhile)."""
        results = [r for r in results if r.ok]
        if not results:
            return
        with self._lock:
            if self._file is None:
                name = f"results-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
                self._file = open(self.folder / name, "x", encoding="utf-8")  # noqa: SIM115
            self._file.write("".join(r.to_json() + "\n" for r in results))
            self._file.flush()
            os.fsync(self._file.fileno())
            for r in results:
                self._results[r.key] = r

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Budget:
    """USD spent against an optional cap. Checked before every request, so the overshoot is at
    most what the requests already in flight cost (up to `concurrency` of them)."""

    def __init__(self, limit_usd: float | None = None) -> None:
        self.limit_usd = limit_usd
        self.spent_usd = 0.0

    def charge(self, usd: float) -> None:
        self.spent_usd += usd

    @property
    def exhausted(self) -> bool:
        return self.limit_usd is not None and self.spent_usd >= self.limit_usd


@dataclass
class LLMStats:
    requests: int = 0
    """Calls made by this layer (a malformed reply's re-ask is a second call)."""
    http_attempts: int = 0
    """HTTP requests, the openai client's retries included."""
    cached: int = 0
    ok: int = 0
    failed: int = 0
    malformed: int = 0
    """Replies `parse` rejected."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


def describe_error(err: BaseException) -> str:
    """'<error class>: <message>', named for what happened. openai's aiohttp transport reports a
    refused connection as APITimeoutError (its exception map turns aiohttp's ClientConnectorError
    into httpx's ConnectTimeout), so the underlying OSError decides, and is appended."""
    import openai

    root = err
    while (inner := root.__cause__ or root.__context__) is not None:
        root = inner
    root = getattr(root, "os_error", None) or root  # aiohttp's ClientConnectorError wraps it
    name, message = type(err).__name__, getattr(err, "message", None) or str(err)
    if isinstance(root, OSError) and not isinstance(root, TimeoutError) and root is not err:
        if isinstance(err, openai.APITimeoutError):
            name, message = "APIConnectionError", "Connection error."
        return f"{name}: {message} ({type(root).__name__}: {root})"
    return f"{name}: {message}"


def check_endpoint(cfg: LLMConfig, api_key: SecretStr, log: Callable[[str], None]) -> None:
    """Before any expensive work: one GET /models (free; vLLM, SGLang and OpenAI serve it), so a
    server that is not there or refuses the key is a one-line CltRayError instead of a top-k job
    followed by every request failing. Says once when no key is set. A server that answers but
    lists no models passes; one whose list lacks llm.model gets a warning line."""
    import openai

    key = api_key.get_secret_value()
    if not key:
        log(f"llm: ${cfg.api_key_env} is not set, so requests to {cfg.base_url} go without an "
            "API key (normal for a local vLLM; set it for a hosted API)")
    client = openai.OpenAI(base_url=cfg.base_url, api_key=key or NO_KEY,
                           timeout=min(cfg.timeout_s, 10.0), max_retries=1)
    try:
        served = [getattr(m, "id", None) for m in client.models.list().data]
    except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
        which = f"the key in ${cfg.api_key_env}" if key else f"no key (${cfg.api_key_env} is unset)"
        raise CltRayError(f"llm: {cfg.base_url} refuses {which}: {describe_error(err)}") from None
    except openai.APIConnectionError as err:  # timeouts included
        raise CltRayError(f"llm.base_url: no server answers at {cfg.base_url} "
                          f"({describe_error(err)}); start it, or fix llm.base_url") from None
    except openai.APIError:
        return  # it answers; not every OpenAI-compatible server lists its models
    finally:
        client.close()
    if served and cfg.model not in served:
        shown = ", ".join(map(str, served[:5])) + (", …" if len(served) > 5 else "")
        log(f"llm.model: {cfg.model!r} is not among the models {cfg.base_url} lists ({shown}); "
            "its requests may fail")


class LLMClient:
    """Runs a list of chat requests: cache first, then at most `concurrency` in flight.
    api_key: the key as read by the caller (a Ray actor gets the driver's); default: read from
    this process's environment now."""

    def __init__(
        self, config: LLMConfig, cache: ResultCache | None = None, budget: Budget | None = None,
        api_key: SecretStr | None = None,
    ) -> None:
        self.config = config
        self.api_key = api_key if api_key is not None else config.api_key()
        self.cache = cache
        self.budget = budget if budget is not None else Budget(config.budget_usd)
        self.stats = LLMStats()
        self._budget_logged = False

    def run_sync(
        self, requests: Sequence[LLMRequest], parse: Callable[[str], Any]
    ) -> list[LLMResult]:
        """`run` from synchronous code (not from inside a running event loop)."""
        return asyncio.run(self.run(requests, parse))

    async def run(
        self, requests: Sequence[LLMRequest], parse: Callable[[str], Any]
    ) -> list[LLMResult]:
        """One result per request, in request order. `parse(raw)` turns a reply into the stored
        value and raises ValueError when the reply is malformed; other exceptions propagate.
        A key that is cached is answered from the cache; a key given twice is sent once."""
        results: list[LLMResult | None] = [None] * len(requests)
        positions: dict[str, list[int]] = {}  # key -> the requests it answers
        for i, req in enumerate(requests):
            hit = self.cache.get(req.key) if self.cache is not None else None
            if hit is not None:
                results[i] = hit
                self.stats.cached += 1
            else:
                positions.setdefault(req.key, []).append(i)
        if positions:
            todo = [requests[ix[0]] for ix in positions.values()]
            await self._send_all(todo, positions, results, parse)
        s = self.stats
        log.info(
            "LLM: %d asked, %d from cache, %d ok, %d failed (%d malformed replies); "
            "%d prompt + %d completion tokens, $%.4f",
            s.requests, s.cached, s.ok, s.failed, s.malformed,
            s.prompt_tokens, s.completion_tokens, s.cost_usd,
        )  # fmt: skip
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    async def _send_all(
        self,
        todo: list[LLMRequest],
        positions: dict[str, list[int]],
        results: list[LLMResult | None],
        parse: Callable[[str], Any],
    ) -> None:
        # A pool of `concurrency` workers rather than one task per request behind a semaphore:
        # the same bound, without a pending task for each of 100k requests.
        pending = iter(todo)
        n_workers = min(self.config.concurrency, len(todo))
        clients = self._open_clients(n_workers)
        queue: asyncio.Queue[LLMResult | None] = asyncio.Queue()
        writer = asyncio.ensure_future(self._write(queue)) if self.cache is not None else None

        async def worker(client: Any) -> None:
            for req in pending:
                result = await self._ask(client, req, parse)
                for i in positions[req.key]:
                    results[i] = result
                if result.ok:
                    self.stats.ok += 1
                    if writer is not None:
                        queue.put_nowait(result)
                else:
                    self.stats.failed += 1

        tasks = [asyncio.ensure_future(worker(clients[i % len(clients)])) for i in range(n_workers)]
        try:
            await asyncio.gather(*tasks)
            if writer is not None:
                queue.put_nowait(None)
                await writer  # everything finished is durable before run returns
        finally:  # also on cancellation (a killed run): stop the rest, close the connections
            if writer is not None:
                tasks.append(writer)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients:
                await client.close()

    def _open_clients(self, n_workers: int) -> list[Any]:
        """openai clients for n_workers concurrent requests. With the aiohttp transport (openai's
        `DefaultAioHttpClient`, the default) one client: 1.6 ms of CPU per request against 2.3 ms
        for httpx (bench/autointerp.py), the limit of one process's request rate. With httpx one
        client per POOL_SIZE workers: httpcore scans its whole pool on every request and
        release, which was the top CPU cost per request with 64 connections in one pool."""
        from openai import AsyncOpenAI, DefaultAioHttpClient, DefaultAsyncHttpxClient, Omit

        LEAN_HEADERS = {h: Omit() for h in PLATFORM_HEADERS}

        cfg = self.config
        tls = ssl.create_default_context()  # shared: loading the CA bundle costs ~20 ms each
        if cfg.http == "aiohttp":  # one pool: aiohttp's does not slow down with its size
            http, n_clients = DefaultAioHttpClient, 1
        else:
            http, n_clients = DefaultAsyncHttpxClient, -(-n_workers // POOL_SIZE)
        return [
            AsyncOpenAI(
                base_url=cfg.base_url,
                api_key=self.api_key.get_secret_value() or NO_KEY,
                timeout=cfg.timeout_s,
                max_retries=cfg.max_retries,
                http_client=http(verify=tls, event_hooks={"request": [_count_try]}),
                default_headers=LEAN_HEADERS,
            )
            for _ in range(n_clients)
        ]

    async def _write(self, queue: asyncio.Queue[LLMResult | None]) -> None:
        """Group commit: write whatever finished since the last fsync, in a thread."""
        assert self.cache is not None
        done = False
        while not done:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            done = batch[-1] is None
            batch = [r for r in batch if r is not None]
            if batch:
                await asyncio.to_thread(self.cache.put_many, batch)

    async def _ask(self, client: Any, req: LLMRequest, parse: Callable[[str], Any]) -> LLMResult:
        """Send, parse; a malformed reply is asked once more before it counts as failed."""
        import openai

        cfg = self.config
        payload = {
            "model": cfg.model,
            "messages": req.messages,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
        }
        res = LLMResult(req.key, ok=False, text=None, raw=None, error=None, attempts=0)
        for _ in range(2):
            if self.budget.exhausted:
                self._log_budget()
                res.error = BUDGET_EXHAUSTED
                return res
            self.stats.requests += 1
            counter = [0]
            token = _tries.set(counter)
            try:
                # `post` (openai's documented call for any endpoint, with the same retries) with
                # a plain dict: skips the typed-params transform and the response model, which
                # were a third of the CPU per request, the limit at high request rates.
                body = await client.post("/chat/completions", body=payload, cast_to=dict)
            except openai.APIError as err:
                body, res.error = None, describe_error(err)
            finally:
                _tries.reset(token)
                self._count_attempts(res, counter[0])
            if body is None:
                return res
            res.raw, prompt, comp = _reply(body)
            cost = cfg.cost_usd(prompt, comp)
            res.prompt_tokens += prompt
            res.completion_tokens += comp
            res.cost_usd += cost
            self.stats.prompt_tokens += prompt
            self.stats.completion_tokens += comp
            self.stats.cost_usd += cost
            self.budget.charge(cost)
            try:
                res.text = parse(res.raw)
            except ValueError as err:
                self.stats.malformed += 1
                res.error = f"malformed reply: {err}"
                continue
            res.ok, res.error = True, None
            return res
        return res

    def _count_attempts(self, res: LLMResult, n: int) -> None:
        res.attempts += n
        self.stats.http_attempts += n

    def _log_budget(self) -> None:
        if not self._budget_logged:
            self._budget_logged = True
            log.warning(
                "LLM budget exhausted: $%.4f spent of $%.4f; no further requests are sent, "
                "the rest are recorded as failed (%r)",
                self.budget.spent_usd, self.budget.limit_usd, BUDGET_EXHAUSTED,
            )  # fmt: skip


def _reply(body: Any) -> tuple[str, int, int]:
    """(content, prompt tokens, completion tokens) of a chat completion. Anything else gives its
    text as the content, for `parse` to reject as malformed, rather than failing the run."""
    if not isinstance(body, dict):
        return str(body), 0, 0
    usage = body.get("usage") or {}
    tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    return (content if isinstance(content, str) else json.dumps(body)), *tokens


# HTTP requests sent by the current task's call: the openai client retries inside one call, so
# they are counted by an httpx request hook, which runs in the calling task's context.
_tries: contextvars.ContextVar[list[int]] = contextvars.ContextVar("clt_ray_llm_tries")


async def _count_try(request: Any) -> None:
    counter = _tries.get(None)
    if counter is not None:
        counter[0] += 1
