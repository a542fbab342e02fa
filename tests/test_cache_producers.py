"""CacheProducer actors on the session's Ray: disjoint slices written by several producers, an
interrupted `clt-ray cache` that resumes to exactly the source's tokens, and the live stream —
every block once, in order per producer, never more than the backpressure bound ahead."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_cache_produce import cached_token_ids, config

from clt_ray.cache.store import CacheError, load_manifest, open_cache
from clt_ray.data import SlicedDocuments, TokenWindows, make_documents
from clt_ray.lm import load_model

pytestmark = pytest.mark.slow


def slice_tokens(cfg, tokenizer, slice_index: int, n_slices: int, n_windows: int) -> list[int]:
    docs = SlicedDocuments(make_documents(cfg.data, heldout=False), slice_index, n_slices)
    windows = TokenWindows(docs, tokenizer, cfg.data.context_size)
    return [t for w in itertools.islice(windows, n_windows) for t in w[1:]]  # BOS dropped


def tokens_of_slice(uri: str, slice_index: int) -> list[int]:
    from clt_ray.cache.block import read_block_table

    fs, root, manifest = open_cache(uri)
    out: list[int] = []
    for f in sorted(manifest.files, key=lambda f: f.name):
        if f.name.startswith(f"part-{slice_index:03d}-"):
            with fs.open_input_stream(f"{root}/{f.name}") as s:
                out += read_block_table(s.read())[0].column("token_id").to_pylist()
    return out


def test_two_producers_cache_disjoint_slices_and_resume(ray_local, tiny_lm_dir, tmp_path: Path):
    from clt_ray.actors.cache_producer import cache_on_ray

    cfg = config(tiny_lm_dir)
    _, tok = load_model(cfg.model)
    logs: list[str] = []
    uri = str(tmp_path / "c")
    kw = {"producers": 2, "windows_per_file": 5, "cpus": 0.5, "progress": False}
    m = cache_on_ray(cfg.model, cfg.data, uri, tokens=300, log=logs.append, **kw)
    assert m.slices == 2 and len(m.files) == 4  # 150 tokens a slice: two files of 80
    for i in range(2):  # each slice is exactly its documents' windows, in order
        assert tokens_of_slice(uri, i) == slice_tokens(cfg, tok, i, 2, 10)
    assert "cached 320 new tokens" in logs[-1]

    # resume: an "interrupted" cache of fewer tokens, then the full command
    part = str(tmp_path / "p")
    cache_on_ray(cfg.model, cfg.data, part, tokens=100, log=logs.append, **kw)
    assert len(load_manifest(part).files) == 2
    again = cache_on_ray(cfg.model, cfg.data, part, tokens=300, log=logs.append, **kw)
    assert "cached 160 new tokens" in logs[-1]  # only the missing files ran the model
    assert sorted((f.name, f.sha256) for f in again.files) == sorted(
        (f.name, f.sha256) for f in m.files)
    # the same producer count is required to resume
    with pytest.raises(CacheError, match="made by 2 producer"):
        cache_on_ray(cfg.model, cfg.data, part, tokens=300, **{**kw, "producers": 1})


def test_killed_cache_command_resumes_to_exactly_the_source(ray_local, tiny_lm_dir,
                                                           tmp_path: Path):
    """SIGKILL the CLI mid-run (files in flight, manifest half-written), run it again: the cache
    holds every token of the source once."""
    cfg = config(tiny_lm_dir)
    _, tok = load_model(cfg.model)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    uri = tmp_path / "c"
    cmd = [sys.executable, "-m", "clt_ray.cli", "cache", "--config", str(cfg_path), "--out",
           str(uri), "--tokens", "3000", "--windows-per-file", "2", "--producers", "2",
           "--cpus-per-producer", "0.5", "--zstd", "3"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        m = load_manifest(str(uri)) if (uri / "manifest.json").exists() else None
        if m is not None and len(m.files) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = load_manifest(str(uri))
    assert 4 <= len(partial.files) < 3000 // 32  # really interrupted
    time.sleep(1)  # the dead driver's actors go
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    final = load_manifest(str(uri))
    assert {f.name for f in partial.files} <= {f.name for f in final.files}
    assert 3000 <= final.tokens < 3000 + 2 * 32
    for i in range(2):
        got = tokens_of_slice(str(uri), i)
        assert got == slice_tokens(cfg, tok, i, 2, len(got) // 16)
    assert sorted(cached_token_ids(str(uri))) == sorted(
        tokens_of_slice(str(uri), 0) + tokens_of_slice(str(uri), 1))


def test_stream_delivers_every_block_once_in_order_within_backpressure(ray_local, tiny_lm_dir):
    from clt_ray.actors.cache_producer import ProducerBlocks

    from clt_ray.cache.produce import window_block
    from clt_ray.data import pad_id

    cfg = config(tiny_lm_dir)
    lm, tok = load_model(cfg.model)
    bound = 2
    stream = ProducerBlocks(cfg.model, cfg.data, producers=2, backpressure=bound, cpus=0.5)
    try:
        taken = [0, 0]
        for _ in range(4):
            i, block = stream.next_block_of()
            taken[i] += 1
        assert taken == [2, 2]  # round robin
        time.sleep(2.0)  # give the producers every chance to run ahead
        produced = [ray_local.get(a.blocks_produced.remote()) for a in stream.actors]
        assert all(taken[i] < produced[i] <= taken[i] + bound for i in range(2)), (taken, produced)

        state = stream.state()
        ids: list[list[list[int]]] = [[], []]
        after = []
        for _ in range(6):
            i, block = stream.next_block_of()
            ids[i].append(block.token_ids.tolist())
            after.append((block.x, block.y))
        per_block = cfg.data.lm_batch_size * (cfg.data.context_size - 1)
        for i in range(2):  # blocks 2..4 of each slice: its windows, in order, none twice
            want = slice_tokens(cfg, tok, i, 2, 5 * cfg.data.lm_batch_size)[2 * per_block:]
            assert [t for b in ids[i] for t in b] == want
        # and the blocks carry the activations of those tokens (int8: ~1e-4 relative error)
        rows = list(itertools.islice(TokenWindows(
            SlicedDocuments(make_documents(cfg.data, False), 0, 2), tok, cfg.data.context_size),
            2 * cfg.data.lm_batch_size, 3 * cfg.data.lm_batch_size))
        _, x, y = window_block(lm, rows, pad_id(tok), cfg.model)
        assert (after[0][0] - x).square().sum() / x.square().sum() < 1e-3
        assert (after[0][1] - y).square().sum() / y.square().sum() < 1e-3

        stream.restore(state)  # resumable: the same blocks again, bit for bit
        for want_x, want_y in after:
            x, y = next(stream)
            assert torch.equal(x, want_x) and torch.equal(y, want_y)
    finally:
        stream.close()


def test_train_from_the_producers_stream(ray_local, tiny_lm_dir, tmp_path: Path):
    from clt_ray.actors.cache_producer import ProducerBlocks

    from clt_ray.errors import ConfigError
    from clt_ray.train.run import train_from_config

    cfg = config(tiny_lm_dir, source="producers", producers=2)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 60})})
    with pytest.raises(ConfigError, match="streams from Ray actors"):
        train_from_config(cfg, tmp_path / "x", log=lambda s: None, splice=False)
    blocks = ProducerBlocks(cfg.model, cfg.data, cpus=0.5)
    run = train_from_config(cfg, tmp_path / "run", log=lambda s: None, splice=False,
                            blocks=blocks)
    assert run.step == 60 and not blocks.actors  # closed: the producers are gone
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    mse = [r["mse"] for r in records if r["kind"] == "train"]
    assert mse[-1] < 0.7 * mse[0], mse  # it learns from the streamed blocks
    live = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "lm"})})
    ref = train_from_config(live, tmp_path / "live", log=lambda s: None, splice=False)
    ev = [sum(r.metrics["explained_variance"]) / 2 for r in (run, ref)]
    assert abs(ev[0] - ev[1]) < 0.05, ev  # as well as from the LM in this process
