"""Shared fixtures: offline Hugging Face, one lazy local Ray per session, the toy models.

docs/design.md §7: one Ray instance for the whole session (started only by tests that need it),
fractional CPUs, every test leaves all CPUs free again.
"""

from __future__ import annotations

import os
import time

# Nothing in the suite may reach the hub; set before transformers is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest

RAY_CPUS = 2


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
