"""A local OpenAI-compatible chat server for tests and benchmarks (aiohttp, 127.0.0.1 only).

    with FakeLLMServer(latency_s=0.05, rate_429=0.1, seed=0) as server:
        LLMConfig(base_url=server.url, model="fake", ...)

Replies come from a pluggable `responder(messages) -> str`; faults (429, 500, a hang longer than
the client's timeout, a garbage reply) are injected at configured rates. Whether a request
faults is drawn from an RNG seeded by (seed, message key, how often that key was seen), so a run
is reproducible whatever order the threads serve requests in. Every request is logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from typing_extensions import Self

Responder = Callable[[list[dict[str, Any]]], str]


def last_user_message(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def message_key(messages: list[dict[str, Any]]) -> str:
    """What the server log calls a request: a hash of its last user message."""
    return hashlib.sha256(last_user_message(messages).encode()).hexdigest()[:16]


def echo(messages: list[dict[str, Any]]) -> str:
    return "echo: " + last_user_message(messages)


def n_tokens(text: str) -> int:
    """The server's usage counts: whitespace-separated words (deterministic, easy to check)."""
    return len(text.split())


@dataclass
class LogEntry:
    """One request, logged when it arrives; the usage is filled in when it is answered."""

    t: float
    """time.monotonic() when the request arrived."""
    key: str
    status: str
    """"ok", "malformed", "429", "500" or "timeout"."""
    authorization: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class FakeLLMServer:
    """POST /v1/chat/completions and GET /v1/models (listing `models`) on 127.0.0.1:<free port>,
    served from a background thread. require_key: answer 401 to any other Authorization."""

    def __init__(
        self,
        responder: Responder = echo,
        *,
        latency_s: float = 0.0,
        rate_429: float = 0.0,
        rate_500: float = 0.0,
        rate_timeout: float = 0.0,
        rate_malformed: float = 0.0,
        hang_s: float = 5.0,
        retry_after_ms: int = 1,
        seed: int = 0,
        models: tuple[str, ...] = ("fake",),
        require_key: str | None = None,
    ) -> None:
        self.responder = responder
        self.models = models
        self.require_key = require_key
        self.models_listed: list[str | None] = []
        """The Authorization header of each GET /v1/models (not in `log`: not a chat request)."""
        self.latency_s = latency_s
        self.rates = {"429": rate_429, "500": rate_500, "timeout": rate_timeout}
        self.rate_malformed = rate_malformed
        self.hang_s = hang_s
        """How long a "timeout" fault hangs before closing without a reply."""
        self.retry_after_ms = retry_after_ms
        self.seed = seed
        self.log: list[LogEntry] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._port is not None, "server not started"
        return f"http://127.0.0.1:{self._port}/v1"

    def start(self) -> Self:
        """Serve from an asyncio loop in a background thread (aiohttp: a real async server,
        cheap per request, so a benchmark measures the client rather than this double)."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._handle)
            app.router.add_get("/v1/models", self._list_models)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
            await site.start()
            self._port = site._server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake LLM server did not start")
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping on latency or a hang
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def entries(self, status: str | None = None) -> list[LogEntry]:
        with self._lock:
            return [dataclasses.replace(e) for e in self.log if status in (None, e.status)]

    def keys_requested(self) -> list[str]:
        return [e.key for e in self.entries()]

    # -- called on the server's loop ------------------------------------------------------------

    def _decide(self, key: str) -> str:
        with self._lock:
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
        rng = random.Random(f"{self.seed}:{key}:{n}")
        u = rng.random()
        for status, rate in self.rates.items():
            if u < rate:
                return status
            u -= rate
        return "malformed" if rng.random() < self.rate_malformed else "ok"

    def _enter(self, entry: LogEntry) -> None:
        with self._lock:
            self.log.append(entry)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0 and not self._stopping.is_set():
            await asyncio.sleep(seconds)

    def _refused(self, req: web.Request) -> web.Response | None:
        if self.require_key is None or req.headers.get("authorization") == \
                f"Bearer {self.require_key}":
            return None
        error = {"message": "Incorrect API key provided", "type": "invalid_request_error",
                 "code": "invalid_api_key"}
        return web.json_response({"error": error}, status=401)

    async def _list_models(self, req: web.Request) -> web.StreamResponse:
        with self._lock:
            self.models_listed.append(req.headers.get("authorization"))
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                for m in self.models]
        return self._refused(req) or web.json_response({"object": "list", "data": data})

    async def _handle(self, req: web.Request) -> web.StreamResponse:
        if (refused := self._refused(req)) is not None:
            return refused
        request = await req.json()
        messages = request.get("messages", [])
        key = message_key(messages)
        status = self._decide(key)
        entry = LogEntry(time.monotonic(), key, status, req.headers.get("authorization"))
        self._enter(entry)
        try:
            await self._sleep(self.latency_s)
            if status == "timeout":
                await self._sleep(self.hang_s)
                if req.transport is not None:
                    req.transport.close()  # hang up without a reply
                return web.Response(status=499)
            if status in ("429", "500"):
                headers = {"retry-after": "0", "retry-after-ms": str(self.retry_after_ms)}
                kind = "rate_limit_error" if status == "429" else "server_error"
                return web.json_response({"error": {"message": kind, "type": kind}},
                                         status=int(status), headers=headers)
            text = self.responder(messages)
            if status == "malformed":
                text = "%%garbage " + hashlib.md5(text.encode()).hexdigest()[:8]
            reply = _completion(request, messages, text)
            with self._lock:
                entry.prompt_tokens = reply["usage"]["prompt_tokens"]
                entry.completion_tokens = reply["usage"]["completion_tokens"]
            return web.json_response(reply)
        finally:
            self._leave()


def _completion(request: dict[str, Any], messages: list[dict[str, Any]], text: str) -> dict:
    prompt = sum(n_tokens(str(m.get("content", ""))) for m in messages)
    completion = n_tokens(text)
    return {
        "id": "chatcmpl-" + hashlib.md5(f"{time.time_ns()}{text}".encode()).hexdigest()[:12],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
