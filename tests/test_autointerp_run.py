"""The whole auto-interp run on Ray against a local OpenAI-compatible server: every feature ends
explained or recorded as failed under injected faults, a killed run resumes asking only for what is
missing, the budget cap stops sending, a run whose every request fails is an error, and the API
key reaches the server but no Ray log."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from llm_server import FakeLLMServer, last_user_message, message_key

from clt_ray.autointerp.prompts import CLOSE, OPEN
from clt_ray.config import AutoInterpConfig

FEATURES = (0, 12)
TOKENS = 2048
EXE = Path(sys.executable).parent / "clt-ray"


def responder(messages: list[dict]) -> str:
    """A deterministic 'LLM': explains a feature by its first highlighted token; answers a scorer
    with the examples that contain that token (highlighted, for fuzzing)."""
    system, body = messages[0]["content"], last_user_message(messages)
    if system.startswith("You are studying"):
        m = re.search(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), body)
        return f"Explanation: the token '{m.group(1).strip() if m else 'none'}'"
    word = re.search(r"the token '(.*?)'", system).group(1)
    lines = body.splitlines()
    fuzz = "wrapped" in system
    hits = [i + 1 for i, line in enumerate(lines)
            if (f"{OPEN} {word}{CLOSE}" in line or f"{OPEN}{word}{CLOSE}" in line if fuzz
                else f" {word}" in line)]
    return f"Answer: {hits}"


@pytest.fixture(scope="module")
def features_file(toy_clt, tmp_path_factory, ray_session):
    """features.parquet of the toy CLT's features [0, 12), made once by the Ray Data job."""
    from clt_ray.actors.autointerp import run_autointerp_on_ray as run_autointerp

    out = tmp_path_factory.mktemp("autointerp-base")
    cfg = config(toy_clt, out, "http://127.0.0.1:9/v1")  # nothing listens there
    summary = run_autointerp(cfg, log=lambda m: None, topk_only=True)
    assert summary["features"] == 4 * (FEATURES[1] - FEATURES[0]) and summary["fired"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["features.parquet"]  # no LLM stage ran
    return out / "features.parquet"


def config(toy_clt: Path, out: Path, url: str, **llm) -> AutoInterpConfig:
    budget = llm.pop("budget", None)
    return AutoInterpConfig.model_validate({
        "checkpoint": str(toy_clt.parent / "run"), "out": str(out),
        "features": {"ranges": [list(FEATURES)]},
        "topk": {"tokens": TOKENS, "k": 5, "range_size": 12, "chunk_windows": 8},
        "llm": {"base_url": url, "model": "fake", "concurrency": 8, "timeout_s": 1.0,
                "max_retries": 4, "budget_usd": budget, **llm},
        "actors": 2, "cpus_per_actor": 0.25})


def fresh_out(tmp_path: Path, features_file: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(features_file, out / "features.parquet")  # same settings: the run reuses it
    return out


def live_features(features_file: Path) -> set[tuple[int, int]]:
    return {(r["layer"], r["feature"]) for r in pq.read_table(features_file).to_pylist()
            if r["top_examples"]}


def test_every_feature_ends_explained_or_failed_under_faults(ray_local, toy_clt, tmp_path,
                                                             features_file):
    from clt_ray.actors.autointerp import run_autointerp_on_ray as run_autointerp

    out = fresh_out(tmp_path, features_file)
    with FakeLLMServer(responder, rate_429=0.1, rate_500=0.1, rate_timeout=0.03,
                       rate_malformed=0.1, hang_s=1.5, seed=3) as server:
        summary = run_autointerp(config(toy_clt, out, server.url), log=lambda m: None)
        log = server.entries()
    explained = pq.read_table(out / "explanations.parquet").to_pylist()
    keys = [(r["layer"], r["feature"]) for r in explained]
    assert len(keys) == len(set(keys))  # none twice
    assert set(keys) == live_features(features_file)  # none missing
    assert {e.status for e in log} >= {"429", "500", "malformed", "ok"}  # faults were injected
    for r in explained:
        assert r["ok"] == (r["explanation"] is not None)
        if not r["ok"]:
            assert r["raw"] or r["error"]
    assert sum(r["ok"] for r in explained) >= 0.8 * len(explained)
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    pairs = [(r["layer"], r["feature"], r["scorer"]) for r in scores]
    assert len(pairs) == len(set(pairs)) and {p[2] for p in pairs} == {"detection", "fuzzing"}
    ok = [r for r in scores if r["ok"]]
    assert ok and all(0 <= r["auc"] <= 1 for r in ok)
    # each score is the fake LLM's answer to that very question, scored against its labels
    from clt_ray.autointerp.prompts import parse_answer, score
    from clt_ray.autointerp.tasks import scoring_requests

    rows = [r for r in pq.read_table(features_file).to_pylist()]
    texts = {(r["layer"], r["feature"]): r["explanation"] for r in explained if r["ok"]}
    questions = {(q["layer"], q["feature"], q["task"]): q
                 for q in scoring_requests(rows, texts, ["detection", "fuzzing"], "fake")}
    assert set(questions) == set(pairs)
    for r in ok:
        q = questions[r["layer"], r["feature"], r["scorer"]]
        expected = score(q["labels"], parse_answer(responder(q["messages"]), len(q["labels"])))
        assert (r["accuracy"], r["f1"], r["auc"]) == pytest.approx(
            (expected["accuracy"], expected["f1"], expected["auc"]))
    assert summary["explained"] == sum(r["ok"] for r in explained)
    assert summary["prompt_tokens"] == sum(r["prompt_tokens"] for r in explained + scores)


def test_killed_run_resumes_asking_only_for_what_is_missing(ray_local, toy_clt, tmp_path,
                                                             features_file):
    from clt_ray.actors.autointerp import run_autointerp_on_ray as run_autointerp

    from clt_ray.autointerp.llm import ResultCache
    from clt_ray.autointerp.tasks import explanation_requests

    out = fresh_out(tmp_path, features_file)
    rows = pq.read_table(out / "features.parquet").to_pylist()
    asked = explanation_requests(rows, "fake")
    by_key = {q["key"]: message_key(q["messages"]) for q in asked}
    with FakeLLMServer(responder, latency_s=0.3, seed=4) as server:
        cfg = config(toy_clt, out, server.url, concurrency=2)
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        env = {**os.environ, "RAY_ADDRESS": ""}
        proc = subprocess.Popen([str(EXE), "autointerp", "--config", str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while len(server.entries("ok")) < 6 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=30)
        time.sleep(1.0)  # let the killed run's actors go
        with ResultCache(out / "llm-cache") as cache:
            done = {by_key[k] for k in by_key if k in cache}
        first_run = len(server.entries())
        assert 0 < len(done) < len(asked)
        run_autointerp(cfg, log=lambda m: None)
        second = [e.key for e in server.entries()[first_run:]]
    explain_keys = set(by_key.values())
    resent = {k for k in second if k in explain_keys}
    assert not resent & done  # nothing finished before the kill is asked again
    assert resent | done == explain_keys  # and everything else is
    explained = pq.read_table(out / "explanations.parquet").to_pylist()
    assert len(explained) == len(asked) and all(r["ok"] for r in explained)


def test_budget_cap_stops_sending_and_says_so(ray_local, toy_clt, tmp_path, features_file):
    from clt_ray.actors.autointerp import run_autointerp_on_ray as run_autointerp

    out = fresh_out(tmp_path, features_file)
    with FakeLLMServer(responder, seed=5) as server:
        # about $1 per request: the cap allows a handful, plus what is already in flight
        cfg = config(toy_clt, out, server.url, prompt_price_per_mtok=1e6 / 300,
                     completion_price_per_mtok=0.0, budget=4.0)
        summary = run_autointerp(cfg, log=lambda m: None)
        sent = len(server.entries())
    explained = pq.read_table(out / "explanations.parquet").to_pylist()
    assert summary["budget_exhausted"]
    assert sum(r["error"] == "budget exhausted" for r in explained) > 0
    assert sent <= 4 + cfg.llm.concurrency * 2  # the cap, plus at most what was in flight
    assert summary["cost_usd"] >= 4.0


def test_cache_source_without_a_cache_is_refused_before_any_work(toy_clt, tmp_path):
    from clt_ray.actors.autointerp import run_autointerp_on_ray as run_autointerp

    cfg = config(toy_clt, tmp_path / "out", "http://127.0.0.1:9/v1")
    missing = cfg.model_copy(update={"topk": cfg.topk.model_copy(
        update={"source": "cache", "cache": str(tmp_path / "no-cache")})})
    with pytest.raises(ValueError, match="no activation cache at"):
        run_autointerp(missing, log=lambda m: None)
    assert not (tmp_path / "out").exists()  # nothing was started or written


def test_api_key_reaches_the_server_but_no_ray_log_or_output(ray_local, toy_clt, tmp_path,
                                                            features_file, monkeypatch):
    """The key goes from the driver's environment to the actors' clients, and nowhere that Ray or
    the run writes down (Ray records a runtime_env's env_vars in its session logs)."""
    from clt_ray.actors.autointerp import run_autointerp_on_ray as run_autointerp

    key = "sk-clt-ray-test-" + secrets.token_hex(20)
    monkeypatch.setenv("CLT_RAY_TEST_LLM_KEY", key)
    out = fresh_out(tmp_path, features_file)
    with FakeLLMServer(responder, seed=6) as server:
        run_autointerp(config(toy_clt, out, server.url, api_key_env="CLT_RAY_TEST_LLM_KEY"),
                       log=lambda m: None)
        sent = {e.authorization for e in server.entries()}
    assert sent == {f"Bearer {key}"}  # the actors had it (Ray's workers never had it in env)
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    files = [p for root in (session, out) for p in root.rglob("*") if p.is_file()]
    assert any(p.name.startswith("runtime_env_agent") for p in files)  # the logs are there
    assert [str(p) for p in files if key.encode() in p.read_bytes()] == []


def test_a_run_whose_every_request_fails_is_an_error(ray_local, toy_clt, tmp_path, features_file):
    """The server answers the endpoint check but fails every chat request: one line naming the
    error, not "0 of N features explained" and exit 0; the failures are recorded for a rerun."""
    from clt_ray.actors.autointerp import run_autointerp_on_ray as run_autointerp

    from clt_ray.errors import CltRayError

    out = fresh_out(tmp_path, features_file)
    n = len(live_features(features_file))
    with FakeLLMServer(responder, rate_500=1.0, seed=7) as server, \
            pytest.raises(CltRayError) as err:
        run_autointerp(config(toy_clt, out, server.url, max_retries=0), log=lambda m: None)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"all {n} explanation requests to {server.url} (fake) failed; "
                              "all: InternalServerError"), message
    explained = pq.read_table(out / "explanations.parquet").to_pylist()
    assert len(explained) == n and not any(r["ok"] for r in explained)
    assert not (out / "scores.parquet").exists()
