"""The auto-interp LLM-call layer against the local fake server (tests/llm_server.py): every
request gets exactly one result under injected faults, malformed replies, the result cache across
reruns and kills, the concurrency bound, the budget, the API key, token and cost counts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time

import pytest

from clt_ray.autointerp.llm import (
    BUDGET_EXHAUSTED,
    Budget,
    LLMClient,
    LLMRequest,
    LLMResult,
    ResultCache,
    request_key,
)
from clt_ray.config import LLMConfig
from tests.llm_server import FakeLLMServer, echo, last_user_message, message_key, n_tokens

MODEL = "fake-model"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """openai's backoff starts at 0.5 s; tests would spend most of their time asleep."""
    import openai._base_client as base

    monkeypatch.setattr(base, "INITIAL_RETRY_DELAY", 0.005)
    monkeypatch.setattr(base, "MAX_RETRY_DELAY", 0.02)


def parse(raw: str) -> str:
    if not raw.startswith("echo: "):
        raise ValueError(f"not an echo: {raw[:30]!r}")
    return raw[len("echo: ") :]


def make_requests(n: int, tag: str = "f") -> list[LLMRequest]:
    out = []
    for i in range(n):
        messages = [
            {"role": "system", "content": "Say what the feature does."},
            {"role": "user", "content": f"{tag} feature {i} " + "tok " * (i % 5)},
        ]
        out.append(LLMRequest(request_key(f"{tag}/{i}", messages, MODEL), messages))
    return out


def config(server: FakeLLMServer, **kw) -> LLMConfig:
    return LLMConfig(base_url=server.url, model=MODEL, **kw)


def per_key(server: FakeLLMServer) -> collections.Counter[str]:
    return collections.Counter(e.key for e in server.entries())


def test_request_key_is_stable_and_discriminating():
    m = [{"role": "user", "content": "x", "name": "a"}]
    same = [{"name": "a", "content": "x", "role": "user"}]  # key order does not matter
    assert request_key("L0/1", m, "a") == request_key("L0/1", same, "a")
    assert len({request_key("L0/1", m, "a"), request_key("L0/2", m, "a")}) == 2
    assert request_key("L0/1", m, "a") != request_key("L0/1", m, "b")
    assert request_key("L0/1", m, "a") != request_key(
        "L0/1", [{"role": "user", "content": "y"}], "a"
    )


def test_every_request_ends_with_exactly_one_result_under_faults():
    faults = {"rate_429": 0.15, "rate_500": 0.15, "rate_timeout": 0.1, "rate_malformed": 0.15}
    requests = make_requests(150)
    with FakeLLMServer(**faults, hang_s=1.0, seed=1) as server:
        client = LLMClient(config(server, concurrency=16, timeout_s=0.3, max_retries=4))
        t0 = time.monotonic()
        results = client.run_sync(requests, parse)
        assert time.monotonic() - t0 < 15
        log = server.entries()

    assert [r.key for r in results] == [q.key for q in requests]  # all, once, in order
    statuses = collections.Counter(e.status for e in log)
    assert all(statuses[s] > 0 for s in ("ok", "429", "500", "timeout", "malformed")), statuses
    # the attempts each result reports are exactly the HTTP requests the server saw for it
    seen = per_key(server)
    for q, r in zip(requests, results):
        assert r.attempts == seen[message_key(q.messages)] >= 1
    assert client.stats.http_attempts == len(log) == sum(r.attempts for r in results)
    ok = [r for r in results if r.ok]
    assert len(ok) > 0.8 * len(results)
    for q, r in zip(requests, results):
        if r.ok:
            assert r.text == last_user_message(q.messages) and r.error is None
        else:
            assert r.text is None and r.error
    assert client.stats.ok + client.stats.failed == len(requests)


def test_server_retry_after_is_honoured():
    """Backoff is patched down to ms; a 429 saying retry-after-ms: 150 still waits 150 ms."""
    requests = make_requests(1)
    with FakeLLMServer(rate_429=1.0, retry_after_ms=150) as server:
        t0 = time.monotonic()
        (result,) = LLMClient(config(server, max_retries=2)).run_sync(requests, parse)
        elapsed = time.monotonic() - t0
    assert not result.ok and "RateLimitError" in result.error
    assert result.attempts == 3 and len(server.entries("429")) == 3
    assert elapsed >= 0.3


def test_client_errors_are_not_retried_and_parse_bugs_propagate():
    requests = make_requests(3)
    with FakeLLMServer() as server:
        cfg = LLMConfig(base_url=server.url.replace("/v1", "/v0"), model=MODEL)
        results = LLMClient(cfg).run_sync(requests, parse)
    assert all(not r.ok and r.attempts == 1 for r in results)
    assert results[0].error.startswith("NotFoundError")

    def buggy(raw: str) -> str:
        return {}[raw]  # a KeyError is a bug in the parser, not a malformed reply

    with FakeLLMServer() as server, pytest.raises(KeyError):
        LLMClient(config(server)).run_sync(requests, buggy)


def test_malformed_reply_is_asked_once_more_then_recorded_failed():
    flaky_seen = collections.Counter()
    lock = threading.Lock()

    def responder(messages):
        text = last_user_message(messages)
        with lock:
            flaky_seen[text] += 1
            first = flaky_seen[text] == 1
        if text.startswith("bad"):
            return "I'd rather not say"
        if text.startswith("flaky") and first:
            return "garbled"
        return echo(messages)

    requests = [LLMRequest(k, [{"role": "user", "content": k}]) for k in ("good", "bad", "flaky")]
    with FakeLLMServer(responder) as server:
        client = LLMClient(config(server))
        good, bad, flaky = client.run_sync(requests, parse)
        seen = per_key(server)
    assert good.ok and good.attempts == 1 and good.text == "good"
    assert not bad.ok and bad.attempts == 2 and bad.raw == "I'd rather not say"
    assert bad.error.startswith("malformed reply: ") and bad.text is None
    assert seen[message_key(requests[1].messages)] == 2
    assert flaky.ok and flaky.attempts == 2 and flaky.text == "flaky" and flaky.error is None
    assert client.stats.malformed == 3 and client.stats.requests == 5


def test_rerun_with_cache_asks_only_what_is_missing(tmp_path, monkeypatch):
    put_many = ResultCache.put_many

    def slow_put_many(self, results):  # a slow disk: run must still wait for every write
        time.sleep(0.05)
        put_many(self, results)

    monkeypatch.setattr(ResultCache, "put_many", slow_put_many)

    def responder(messages):
        text = last_user_message(messages)
        return "nonsense" if text.startswith("f feature 7 ") else echo(messages)

    requests = make_requests(30)
    with FakeLLMServer(responder) as server:
        with ResultCache(tmp_path) as cache:
            first = LLMClient(config(server), cache).run_sync(requests, parse)
        assert sum(not r.ok for r in first) == 1 and not first[7].ok
        n_first = len(server.entries())
        assert n_first == 31  # 29 + the malformed one twice

        with ResultCache(tmp_path) as cache:  # a new process would open it like this
            assert len(cache) == 29 and requests[7].key not in cache
            client = LLMClient(config(server), cache)
            again = client.run_sync(requests, parse)
        # successes come from the cache; only the failure is asked again (twice: malformed)
        new = server.entries()[n_first:]
        assert {e.key for e in new} == {message_key(requests[7].messages)} and len(new) == 2
        assert client.stats.cached == 29 and client.stats.requests == 2
    assert [r.text for r in again] == [r.text for r in first]


def test_killed_run_keeps_what_finished_and_rerun_asks_the_rest(tmp_path):
    requests = make_requests(60)

    async def run_then_kill(server: FakeLLMServer, cache: ResultCache) -> int:
        task = asyncio.ensure_future(
            LLMClient(config(server, concurrency=4), cache).run(requests, parse)
        )
        deadline = time.monotonic() + 10
        while len(cache) < 12:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.005)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return len(cache)

    killed = ResultCache(tmp_path)  # left open, as a killed process leaves it: not flushed on close
    with FakeLLMServer(latency_s=0.02) as server:
        written = asyncio.run(run_then_kill(server, killed))
        # a killed writer may also leave a cut-off last line: it must be skipped, not fatal
        (path,) = tmp_path.glob("*.jsonl")
        with open(path, "a") as f:
            f.write('{"key": "' + requests[-1].key + '", "ok": tr')
        time.sleep(0.05)  # let the requests in flight at the kill land in the log
        n_before = len(server.entries())

        cache = ResultCache(tmp_path)
        assert len(cache) >= written >= 12 and len(cache) < len(requests)
        missing = {message_key(q.messages) for q in requests if q.key not in cache}
        client = LLMClient(config(server, concurrency=4), cache)
        results = client.run_sync(requests, parse)
        cache.close()
        new = [e.key for e in server.entries()[n_before:]]
    assert sorted(new) == sorted(missing)  # each missing key once, nothing else
    assert all(r.ok for r in results) and client.stats.cached == len(requests) - len(missing)
    assert len(ResultCache(tmp_path)) == len(requests)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # one file per writer
    killed.close()


def test_cache_keeps_successes_only_and_one_file_per_writer(tmp_path):
    ok = LLMResult("a", True, "x", "echo: x", None, 1, 3, 2, 0.5)
    bad = LLMResult("b", False, None, "??", "malformed reply: ?", 2, 3, 2, 0.5)
    with ResultCache(tmp_path) as c1, ResultCache(tmp_path) as c2:
        c1.put(ok)
        c2.put(bad)
        c2.put(LLMResult("c", True, {"label": "y"}, "echo: y", None, 1, 1, 1, 0.0))
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) == 2  # one per writer
    lines = [json.loads(line) for p in files for line in p.read_text().splitlines()]
    assert sorted(d["key"] for d in lines) == ["a", "c"]  # the failure is not written
    reopened = ResultCache(tmp_path)
    assert (
        reopened.get("a") == ok and "b" not in reopened and reopened.get("c").text == {"label": "y"}
    )


def test_concurrency_is_bounded_and_used():
    requests = make_requests(64)
    with FakeLLMServer(latency_s=0.1) as server:
        LLMClient(config(server)).run_sync(make_requests(4, "warm"), parse)  # imports
        server.max_in_flight = 0
        t0 = time.monotonic()
        results = LLMClient(config(server, concurrency=16)).run_sync(requests, parse)
        wall = time.monotonic() - t0
        peak = server.max_in_flight
    assert all(r.ok for r in results)
    assert 12 <= peak <= 16  # bounded, and used (16 unless the CPU is very busy)
    assert 0.4 <= wall < 1.6, wall  # 64 / 16 rounds of 0.1 s; one at a time would be 6.4 s


def test_budget_stops_sending_and_says_so(caplog):
    requests = make_requests(20)
    with FakeLLMServer() as server:
        cfg = config(server, concurrency=1, prompt_price_per_mtok=1e6, completion_price_per_mtok=0)
        # each request costs its prompt tokens in dollars; stop after the sixth
        budget = sum(n_tokens(m["content"]) for q in requests[:6] for m in q.messages) - 0.5
        client = LLMClient(cfg.model_copy(update={"budget_usd": budget}))
        with caplog.at_level(logging.WARNING, logger="clt_ray.autointerp.llm"):
            results = client.run_sync(requests, parse)
        sent = len(server.entries())
    assert [r.ok for r in results] == [True] * 6 + [False] * 14
    assert all(r.error == BUDGET_EXHAUSTED and r.attempts == 0 for r in results[6:])
    assert sent == 6 and client.budget.exhausted and client.budget.spent_usd >= budget
    assert sum("budget exhausted" in r.getMessage() for r in caplog.records) == 1

    with FakeLLMServer(latency_s=0.01) as server:
        budget = Budget(limit_usd=10.0)
        cfg = config(server, concurrency=4, prompt_price_per_mtok=1e6)
        results = LLMClient(cfg, budget=budget).run_sync(requests, parse)
        sent = len(server.entries())
    # each costs >= 8 $: the cap is reached by the first two, with 4 in flight from the start
    assert 2 <= sent <= 5 and sum(r.ok for r in results) == sent
    assert sum(r.error == BUDGET_EXHAUSTED for r in results) == len(requests) - sent


def test_api_key_is_sent_but_never_kept(tmp_path, monkeypatch, caplog, capsys):
    secret = "sk-test-" + "7f3a9c1e5b" * 3
    monkeypatch.setenv("CLT_RAY_TEST_LLM_KEY", secret)
    requests = make_requests(40)
    with FakeLLMServer(rate_500=0.2, rate_malformed=0.2, seed=3) as server:
        cfg = config(server, api_key_env="CLT_RAY_TEST_LLM_KEY", max_retries=1)
        with caplog.at_level(logging.DEBUG), ResultCache(tmp_path) as cache:
            client = LLMClient(cfg, cache)
            results = client.run_sync(requests, parse)
        auth = {e.authorization for e in server.entries()}
    assert auth == {f"Bearer {secret}"}
    assert any(not r.ok for r in results) and any(r.ok for r in results)
    assert caplog.records  # debug logging was on, so a leak would show
    kept = [
        caplog.text,
        *capsys.readouterr(),
        *(repr(r) + r.to_json() for r in results),
        *(p.read_text() for p in tmp_path.iterdir()),
        cfg.model_dump_json(),
        repr(client.__dict__),
    ]
    assert not [k for k in kept if secret in k]

    monkeypatch.delenv("CLT_RAY_TEST_LLM_KEY")
    with FakeLLMServer() as server:
        LLMClient(config(server, api_key_env="CLT_RAY_TEST_LLM_KEY")).run_sync(requests[:1], parse)
        assert [e.authorization for e in server.entries()] == ["Bearer EMPTY"]


def test_tokens_and_cost_match_the_server_usage():
    requests = make_requests(25)
    prices = {"prompt_price_per_mtok": 2.5, "completion_price_per_mtok": 10.0}
    with FakeLLMServer(rate_malformed=0.3, seed=5) as server:
        client = LLMClient(config(server, concurrency=5, **prices))
        results = client.run_sync(requests, parse)
        log = server.entries()
    assert any(r.attempts == 2 for r in results)  # re-asked replies are billed too
    for q, r in zip(requests, results):
        mine = [e for e in log if e.key == message_key(q.messages)]
        assert r.prompt_tokens == sum(e.prompt_tokens for e in mine) > 0
        assert r.completion_tokens == sum(e.completion_tokens for e in mine) > 0
        assert r.cost_usd == pytest.approx((r.prompt_tokens * 2.5 + r.completion_tokens * 10) / 1e6)
    s = client.stats
    assert s.prompt_tokens == sum(e.prompt_tokens for e in log)
    assert s.completion_tokens == sum(e.completion_tokens for e in log)
    assert s.cost_usd == pytest.approx(sum(r.cost_usd for r in results))
    assert s.cost_usd == pytest.approx((s.prompt_tokens * 2.5 + s.completion_tokens * 10) / 1e6)


def test_duplicate_keys_are_sent_once_and_config_is_strict(tmp_path):
    requests = make_requests(3)
    with FakeLLMServer() as server:
        results = LLMClient(config(server)).run_sync([*requests, requests[0]], parse)
        assert len(server.entries()) == 3
    assert results[3] == results[0] and len(results) == 4
    with pytest.raises(ValueError, match="Extra inputs"):
        LLMConfig(model="m", api_key="sk-no")
    with pytest.raises(ValueError):
        LLMConfig(model="m", concurrency=0)
    assert json.loads(LLMConfig(model="m").model_dump_json())["api_key_env"] == "OPENAI_API_KEY"
