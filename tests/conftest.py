"""Shared fixtures: offline Hugging Face, one lazy local Ray per session, the toy models.

docs/design.md §7: one Ray instance for the whole session (started only by tests that need it),
fractional CPUs, every test leaves all CPUs free again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

# Nothing in the suite may reach the hub; set before transformers is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3-protocol server of the object-storage tests (moto's server mode, started on first use by
# `s3_bucket`). Its endpoint and throw-away credentials are in the environment from the start, the
# standard AWS settings pyarrow's S3 client reads, so the session's Ray workers inherit them (they
# never travel in a runtime_env, which Ray logs).
S3_PORT = _free_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"
os.environ["AWS_ACCESS_KEY_ID"] = "clt-ray-test"
os.environ["AWS_SECRET_ACCESS_KEY"] = "clt-ray-test-secret"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

import pytest

RAY_CPUS = 2


def start_s3_server(port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """moto's S3-protocol server on 127.0.0.1:port (env: its environment, e.g. authentication
    on), once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None, "moto's S3 server did not start"
            assert time.monotonic() < deadline, "moto's S3 server did not answer in 60 s"
            time.sleep(0.2)


FARTHEST_CLT_NODE_JS = """() => {
    const all = Array.from(document.querySelectorAll('text.node')).map(el => d3.select(el).datum())
    let best = -1, bestGap = -1
    all.forEach((d, i) => {
      if (d.feature_type !== 'cross layer transcoder') return
      const gap = Math.min(...all.filter(e => e !== d).map(e =>
        Math.hypot(e.pos[0] - d.pos[0], e.pos[1] - d.pos[1])))
      if (gap > bestGap) { best = i; bestGap = gap }
    })
    return best }"""
"""The index among the graph frontend's `text.node`s of the CLT feature node farthest from any
other node (-1 if none): hovering or clicking it reaches that node, not a neighbour."""


def interrupt_cli(args: list[str], ready, timeout: float = 240) -> tuple[int, str, str]:
    """Run `clt-ray ARGS` (one torch thread), send it Ctrl-C (SIGINT) once ready() holds, as a
    user stops a run; (exit code, stdout, stderr)."""
    import signal

    exe = os.path.join(os.path.dirname(sys.executable), "clt-ray")
    proc = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server on 127.0.0.1 (moto's server mode) for the session; stopped at
    the end. Yields its endpoint URL."""
    proc = start_s3_server(S3_PORT)
    yield os.environ["AWS_ENDPOINT_URL"]
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server: its `s3://name` URI."""
    import pyarrow.fs as pafs

    name = f"clt-ray-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session():
    """The session's one local Ray, started on first use and shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """Ray for one test; afterwards every CPU must be free again (no leaked actors)."""
    yield ray_session
    deadline = time.monotonic() + 20
    while True:
        free = ray_session.available_resources().get("CPU", 0.0)
        if free >= RAY_CPUS - 1e-6:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"test left Ray CPUs in use: {free} of {RAY_CPUS} free after 20 s")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def toy_gpt2():
    """The toy GPT-2 (built once, then reused from the cache dir)."""
    from clt_ray.toy import build_toy_model

    return build_toy_model("gpt2")


@pytest.fixture(scope="session")
def toy_llama():
    """The toy Llama (built once, then reused from the cache dir)."""
    from clt_ray.toy import build_toy_model

    return build_toy_model("llama")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A random 2-layer GPT-2 (d 16) with the toy tokenizer, saved as a local HF folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from clt_ray.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16,
                                        n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0))
    path = tmp_path_factory.mktemp("tiny-gpt2")
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and on a shared 2-core machine much faster
    (OpenMP threads spin while waiting for a core). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_clt():
    """The exported CLT trained with examples/toy.yaml on the toy GPT-2 (trained once, ~2.5 min,
    then reused from the cache dir)."""
    from toy_clt import build_toy_clt

    return build_toy_clt("gpt2")


@pytest.fixture(scope="session")
def viewer_run(toy_clt, tmp_path_factory):
    """A run folder with graphs/ and autointerp/ made by the real functions, for the viewer
    tests (tests/viewer_run.py; ~15 s once the toy CLT exists)."""
    from viewer_run import build_viewer_run

    return build_viewer_run(toy_clt, tmp_path_factory.mktemp("viewer"))
