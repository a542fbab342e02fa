"""What `clt-ray autointerp` checks before any Ray work, and how it fails: the feature choice
against the checkpoint, the LLM endpoint (one cheap request), the API key note, a damaged
activation cache (one line, also when an actor finds the damage), errors named as they are."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from llm_server import FakeLLMServer

from clt_ray.autointerp.pipeline import run_autointerp
from clt_ray.config import AutoInterpConfig, LLMConfig
from clt_ray.errors import CltRayError, ConfigError
from clt_ray.train.checkpoint import read_manifest

EXE = Path(sys.executable).parent / "clt-ray"


class NoExecutor:
    """The pipeline's executor for runs that must be refused before any work starts."""

    def __enter__(self):
        raise AssertionError("the executor (Ray) was started")

    def __exit__(self, *exc: object) -> None:
        pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(toy_clt: Path, out: Path, features: dict, url: str | None = None,
           **topk) -> AutoInterpConfig:
    llm = {"llm": {"base_url": url, "model": "fake", "max_retries": 0,
                   "api_key_env": "CLT_RAY_TEST_UNSET_KEY"}} if url else {}
    return AutoInterpConfig.model_validate({
        "checkpoint": str(toy_clt.parent / "run"), "out": str(out), "features": features,
        "topk": {"tokens": 1024, "k": 5, "range_size": 16, "chunk_windows": 4, **topk},
        "actors": 2, "cpus_per_actor": 0.25, **llm})


def shape(toy_clt: Path) -> tuple[int, int]:
    clt = read_manifest(toy_clt.parent / "run")["clt"]
    return clt["n_layers"], clt["n_features"]


def run_cli(tmp_path: Path, cfg: AutoInterpConfig, *args: str) -> subprocess.CompletedProcess:
    """`clt-ray autointerp` in a subprocess whose Ray (if it started one) would live under its own
    temp folder, which the caller can check for."""
    path = tmp_path / "autointerp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(tmp_path / "raytmp")}
    env.pop("CLT_RAY_TEST_UNSET_KEY", None)
    return subprocess.run([str(EXE), "autointerp", "--config", str(path), *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


# --- the feature choice, against the checkpoint's manifest ---------------------------------------


def test_layers_past_the_clt_are_refused_before_ray(toy_clt, tmp_path):
    n_layers, _ = shape(toy_clt)
    cfg = config(toy_clt, tmp_path / "out", {"all": True, "layers": [0, n_layers + 3, -1]})
    with pytest.raises(ConfigError) as err:
        run_autointerp(cfg, NoExecutor(), topk_only=True)
    allowed = f"is not a layer of this CLT (0 to {n_layers - 1})"
    assert str(err.value).splitlines()[1:] == [f"  features.layers: {n_layers + 3} {allowed}",
                                               f"  features.layers: -1 {allowed}"]
    with pytest.raises(ConfigError, match=r"features.layers: empty"):
        run_autointerp(config(toy_clt, tmp_path / "out", {"all": True, "layers": []}),
                       NoExecutor(), topk_only=True)
    assert not (tmp_path / "out").exists()


def test_ranges_past_the_features_are_refused_before_ray(toy_clt, tmp_path):
    _, n_features = shape(toy_clt)
    cfg = config(toy_clt, tmp_path / "out", {"ranges": [[0, 4], [n_features - 2, n_features + 5]]})
    with pytest.raises(ConfigError) as err:
        run_autointerp(cfg, NoExecutor(), topk_only=True)
    expected = (f"  features.ranges: [{n_features - 2}, {n_features + 5}) goes past the CLT's "
                f"{n_features} features per layer (allowed: 0 <= start < stop <= {n_features})")
    assert str(err.value).splitlines()[1:] == [expected]


def test_a_missing_or_foreign_graphs_folder_is_one_line(toy_clt, tmp_path):
    missing = tmp_path / "no-graphs"
    with pytest.raises(ConfigError, match=r"^features.graphs: .*no-graphs is not a folder"):
        run_autointerp(config(toy_clt, tmp_path / "out", {"graphs": str(missing)}),
                       NoExecutor(), topk_only=True)
    missing.mkdir()
    with pytest.raises(ConfigError, match=r"^features.graphs: .* has no graph-metadata.json"):
        run_autointerp(config(toy_clt, tmp_path / "out", {"graphs": str(missing)}),
                       NoExecutor(), topk_only=True)
    (missing / "graph-metadata.json").write_text('{"graphs": [{"slug": "g"}]}')
    (missing / "g.json").write_text(
        '{"nodes": [{"feature_type": "cross layer transcoder", "node_id": "99_3_1"}]}')
    with pytest.raises(ConfigError, match=r"^features.graphs: .* feature 3 of layer 99, outside"):
        run_autointerp(config(toy_clt, tmp_path / "out", {"graphs": str(missing)}),
                       NoExecutor(), topk_only=True)
    (missing / "g.json").write_text("{")
    with pytest.raises(ConfigError, match=r"^features.graphs: .*g.json is not readable"):
        run_autointerp(config(toy_clt, tmp_path / "out", {"graphs": str(missing)}),
                       NoExecutor(), topk_only=True)
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_feature_problems_and_starts_no_ray(toy_clt, tmp_path):
    n_layers, _ = shape(toy_clt)
    cfg = config(toy_clt, tmp_path / "out", {"all": True, "layers": [n_layers]})
    done = run_cli(tmp_path, cfg, "--topk-only")  # and no llm section: not needed for top-k
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("Error: features do not fit the checkpoint's CLT")
    assert f"features.layers: {n_layers} is not a layer of this CLT" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "raytmp").exists() and not (tmp_path / "out").exists()


def test_an_llm_section_is_needed_only_beyond_topk(toy_clt, tmp_path):
    cfg = config(toy_clt, tmp_path / "out", {"ranges": [[0, 4]]})
    assert cfg.llm is None
    with pytest.raises(ConfigError, match="no llm section .* --topk-only"):
        run_autointerp(cfg, NoExecutor())


# --- the endpoint, checked before any expensive work ---------------------------------------------


def test_a_closed_port_fails_at_once_naming_the_refused_connection(toy_clt, tmp_path):
    port = closed_port()
    cfg = config(toy_clt, tmp_path / "out", {"ranges": [[0, 4]]}, f"http://127.0.0.1:{port}/v1")
    t0 = time.monotonic()
    done = run_cli(tmp_path, cfg)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: llm.base_url: no server answers at "
                                               f"http://127.0.0.1:{port}/v1")
    assert "APIConnectionError" in err[0] and "ConnectionRefusedError" in err[0]
    assert "Timeout" not in err[0]
    # nothing expensive ran: no top-k job, no Ray, no output
    assert "top-k" not in done.stdout and not (tmp_path / "raytmp").exists()
    assert not (tmp_path / "out").exists()
    # no key is set: said once, before the request
    assert done.stdout.count("$CLT_RAY_TEST_UNSET_KEY is not set") == 1
    assert time.monotonic() - t0 < 60


def test_endpoint_check_is_one_cheap_request_and_says_once_that_no_key_is_set(monkeypatch):
    monkeypatch.delenv("CLT_RAY_TEST_UNSET_KEY", raising=False)
    from clt_ray.autointerp.llm import check_endpoint

    with FakeLLMServer() as server:
        said: list[str] = []
        cfg = LLMConfig(base_url=server.url, model="fake", api_key_env="CLT_RAY_TEST_UNSET_KEY")
        check_endpoint(cfg, cfg.api_key(), said.append)
        assert server.entries() == [] and server.models_listed == ["Bearer EMPTY"]
        assert said == [(f"llm: $CLT_RAY_TEST_UNSET_KEY is not set, so requests to {server.url} "
                         "go without an API key (normal for a local vLLM; set it for a hosted API)")]
        said.clear()
        monkeypatch.setenv("CLT_RAY_TEST_UNSET_KEY", "sk-abc")
        other = cfg.model_copy(update={"model": "not-served"})
        check_endpoint(other, other.api_key(), said.append)
        assert server.models_listed[-1] == "Bearer sk-abc"
        assert said == [(f"llm.model: 'not-served' is not among the models {server.url} lists "
                         "(fake); its requests may fail")]


def test_a_refused_key_is_one_line():
    from clt_ray.autointerp.llm import check_endpoint

    with FakeLLMServer(require_key="sk-right") as server:
        cfg = LLMConfig(base_url=server.url, model="fake", api_key_env="CLT_RAY_TEST_UNSET_KEY")
        with pytest.raises(CltRayError, match=r"refuses no key \(\$CLT_RAY_TEST_UNSET_KEY is "
                                              r"unset\): AuthenticationError"):
            check_endpoint(cfg, cfg.api_key(), print)


def test_a_refused_connection_is_named_as_such_not_a_timeout():
    """openai's aiohttp transport calls it APITimeoutError; the result says what happened."""
    from clt_ray.autointerp.llm import LLMClient, LLMRequest

    request = [LLMRequest("k", [{"role": "user", "content": "hi"}])]
    for http in ("aiohttp", "httpx"):
        cfg = LLMConfig(base_url=f"http://127.0.0.1:{closed_port()}/v1", model="m",
                        max_retries=0, http=http)
        (result,) = LLMClient(cfg).run_sync(request, str)
        assert not result.ok
        assert result.error.startswith("APIConnectionError: Connection error. "
                                       "(ConnectionRefusedError: "), (http, result.error)
    with FakeLLMServer(rate_timeout=1.0, hang_s=2.0) as server:  # a real timeout stays one
        cfg = LLMConfig(base_url=server.url, model="m", max_retries=0, timeout_s=0.3)
        (result,) = LLMClient(cfg).run_sync(request, str)
    assert result.error.startswith("APITimeoutError"), result.error


# --- a damaged activation cache: one line ------------------------------------------------------


@pytest.fixture(scope="module")
def toy_cache(toy_clt, tmp_path_factory):
    """A small activation cache of the toy CLT's model (a few files of 4 windows)."""
    from clt_ray.cache.produce import write_cache
    from clt_ray.lm import load_model
    from clt_ray.train.checkpoint import load_checkpoint

    cfg = load_checkpoint(toy_clt.parent / "run").config
    lm, tokenizer = load_model(cfg.model)
    cache = tmp_path_factory.mktemp("acts") / "cache"
    write_cache(lm, tokenizer, cfg.data, cfg.model, str(cache), tokens=1200,
                windows_per_file=4, progress=False, log=lambda m: None)
    return cache


def damaged(toy_cache: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(toy_cache, copy)
    part = min(copy.glob("part-*.arrows"))
    data = part.read_bytes()
    if how == "truncated":
        part.write_bytes(data[: len(data) // 2])
    else:  # same size, other bytes: only reading the file shows it
        part.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:])
    return copy


def test_a_truncated_cache_file_is_one_line_before_ray(toy_clt, toy_cache, tmp_path):
    cache = damaged(toy_cache, tmp_path, "truncated")
    cfg = config(toy_clt, tmp_path / "out", {"ranges": [[0, 16]]}, source="cache",
                 cache=str(cache))
    from clt_ray.cache.store import CacheError

    with pytest.raises(CacheError, match="damaged.* of the wrong size") as err:
        run_autointerp(cfg, NoExecutor(), topk_only=True)
    assert "\n" not in str(err.value)


def test_a_corrupt_cache_file_found_by_an_actor_is_one_line(ray_local, toy_clt, toy_cache,
                                                            tmp_path):
    """The damage only reading shows (sha256) is found inside the Ray Data job: the error that
    comes out is the actor's CacheError itself, not Ray's wrapper with the remote traceback."""
    from clt_ray.actors.autointerp import run_autointerp_on_ray
    from ray.exceptions import RayError

    from clt_ray.cache.store import CacheError

    cache = damaged(toy_cache, tmp_path, "corrupt")
    cfg = config(toy_clt, tmp_path / "out", {"ranges": [[0, 16]]}, source="cache",
                 cache=str(cache))
    with pytest.raises(CacheError) as err:
        run_autointerp_on_ray(cfg, log=lambda m: None, topk_only=True)
    assert not isinstance(err.value, RayError)
    message = str(err.value)
    assert "\n" not in message and "does not match the manifest" in message
    assert "part-" in message and "Traceback" not in message
