"""Writing a cache from the LM: exactly the tokens of the source, resumable, disjoint slices; and
training from it through `data.source: cache`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pytest

from clt_ray.cache.produce import write_cache
from clt_ray.cache.store import CacheError, open_cache
from clt_ray.config import parse_config
from clt_ray.data import TokenWindows, make_documents
from clt_ray.errors import ConfigError
from clt_ray.lm import load_model
from clt_ray.train.run import check_config, train_from_config


def config(model_dir: Path, **data):
    return parse_config({
        "model": {"name": str(model_dir)},
        "clt": {"n_features": 32, "init_threshold": 0.05, "bandwidth": 0.5,
                "init_firing_rate": 0.05},
        "loss": {"sparsity": {"final": 0.3, "ramp_frac": 0.5}, "tanh_c": 1.0},
        "optim": {"lr": {"lr": 3e-3, "warmup_frac": 0.05}},
        "train": {"steps": 6, "batch_size": 64, "init_tokens": 128, "dead_after_tokens": 256,
                  "log_every": 2, "eval_every": 0, "checkpoint_every": 0, "progress": False},
        "data": {"context_size": 17, "lm_batch_size": 4, "shuffle_buffer": 128,
                 "heldout_tokens": 64, **data},
    })


def cached_token_ids(uri: str) -> list[int]:
    fs, root, manifest = open_cache(uri)
    out: list[int] = []
    for f in sorted(manifest.files, key=lambda f: f.name):
        with fs.open_input_stream(f"{root}/{f.name}") as s:
            out += pa.ipc.open_stream(s.read()).read_all().column("token_id").to_pylist()
    return out


def source_token_ids(cfg, tokenizer, n_windows: int) -> list[list[int]]:
    windows = TokenWindows(make_documents(cfg.data, heldout=False), tokenizer,
                           cfg.data.context_size)
    return [w[1:] for w in itertools.islice(windows, n_windows)]  # BOS dropped


def test_cache_holds_exactly_the_source_tokens_and_resumes(tiny_lm_dir, tmp_path: Path):
    cfg = config(tiny_lm_dir)
    lm, tok = load_model(cfg.model)
    one_shot, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    m = write_cache(lm, tok, cfg.data, cfg.model, one_shot, tokens=300, windows_per_file=5,
                    progress=False, log=lambda s: None)
    assert len(m.files) == 4 and m.tokens >= 300  # whole files of 5 windows × 16 tokens
    expected = [t for w in source_token_ids(cfg, tok, 20) for t in w]
    assert cached_token_ids(one_shot) == expected  # none missing, none twice, in order

    # an "interrupted" run (fewer tokens), then the same command again
    write_cache(lm, tok, cfg.data, cfg.model, resumed, tokens=100, windows_per_file=5,
                progress=False, log=lambda s: None)
    assert len(open_cache(resumed)[2].files) == 2
    logs: list[str] = []
    again = write_cache(lm, tok, cfg.data, cfg.model, resumed, tokens=300, windows_per_file=5,
                        progress=False, log=logs.append)
    assert [f.sha256 for f in again.files] == [f.sha256 for f in m.files]
    assert "cached 160 new tokens" in logs[0]  # only the two missing files were computed
    assert cached_token_ids(resumed) == expected


def test_slices_are_disjoint_and_cover_the_documents(tiny_lm_dir):
    """Slice i of n is documents i, i + n, …: no window in two slices, every window in one."""
    from clt_ray.cache.block import read_block_table
    from clt_ray.cache.produce import produce_blocks

    cfg = config(tiny_lm_dir)
    lm, tok = load_model(cfg.model)
    docs = make_documents(cfg.data, heldout=False)
    texts = list(itertools.islice(docs.iter_from(0), 12))
    expected = []
    for i in range(3):  # the windows of documents i, i + 3, …, in order
        mine = [t for j, t in enumerate(texts) if j % 3 == i]
        rows = [w[1:] for w in TokenWindows(_Listed(mine), tok, cfg.data.context_size)]
        expected.append([t for w in rows for t in w])
    for i in range(3):
        got = []
        for name, block in produce_blocks(lm, tok, cfg.data, cfg.model, bits=8, zstd_level=None,
                                          windows_per_file=3, scales=None, slice_index=i,
                                          n_slices=3, tokens=len(expected[i])):
            assert name.startswith(f"part-{i:03d}-")
            got += read_block_table(block)[0].column("token_id").to_pylist()
        assert got[: len(expected[i])] == expected[i]
    with pytest.raises(ValueError, match="slice 3 is not in"):
        next(produce_blocks(lm, tok, cfg.data, cfg.model, bits=8, zstd_level=None,
                            windows_per_file=3, scales=None, slice_index=3, n_slices=3))


class _Listed:
    def __init__(self, texts):
        self.texts = texts

    def iter_from(self, index):
        return iter(self.texts[index:])


def test_train_from_the_cache_and_refuse_a_mismatched_one(tiny_lm_dir, tmp_path: Path):
    uri = str(tmp_path / "cache")
    cfg = config(tiny_lm_dir)
    lm, tok = load_model(cfg.model)
    write_cache(lm, tok, cfg.data, cfg.model, uri, tokens=1200, windows_per_file=8, bits=8,
                progress=False, log=lambda s: None)
    cached = config(tiny_lm_dir, source="cache", cache=uri)
    runs = {}
    for name, c in (("cache", cached), ("lm", cfg)):
        c = c.model_copy(update={"train": c.train.model_copy(update={"steps": 60})})
        runs[name] = train_from_config(c, tmp_path / name, log=lambda s: None, splice=False)
        assert runs[name].step == 60 and (tmp_path / name / "summary.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "cache" / "metrics.jsonl").read_text()
               .splitlines()]
    mse = [r["mse"] for r in records if r["kind"] == "train"]
    assert mse[-1] < 0.7 * mse[0], mse  # it learns from the cached activations
    ev = {k: sum(r.metrics["explained_variance"]) / 2 for k, r in runs.items()}
    assert abs(ev["cache"] - ev["lm"]) < 0.05, ev  # as well as from live fp32 activations
    # and the cache really is what it read: a corrupt file stops a new run with the file's name
    victim = sorted(Path(uri).glob("part-*.arrows"))[1]
    victim.write_bytes(victim.read_bytes()[:-5] + b"xxxxx")
    with pytest.raises(CacheError, match=f"{victim.name}: sha256"):
        train_from_config(cached, tmp_path / "run2", log=lambda s: None, splice=False)

    other = cached.model_copy(update={"model": cached.model.model_copy(
        update={"input_hook": "mlp.hook_in", "output_hook": "mlp.hook_out"})})
    with pytest.raises(CacheError, match="input_hook: cache has 'hook_resid_mid', config has "
                                         "'mlp.hook_in'"):
        check_config(other)
    with pytest.raises(ConfigError, match="needs data.cache"):
        config(tiny_lm_dir, source="cache")
    with pytest.raises(CacheError, match="no activation cache here"):
        check_config(config(tiny_lm_dir, source="cache", cache=str(tmp_path / "none")))


def test_written_order_replays_the_live_stream(tiny_lm_dir, tmp_path: Path):
    from clt_ray.cache.store import CacheBlocks
    from clt_ray.data import ShuffledSource, lm_source

    uri = str(tmp_path / "cache")
    cfg = config(tiny_lm_dir)
    lm, tok = load_model(cfg.model)
    write_cache(lm, tok, cfg.data, cfg.model, uri, tokens=800, bits=8,
                windows_per_file=cfg.data.lm_batch_size, progress=False, log=lambda s: None)
    live = lm_source(lm, tok, cfg.data, cfg.model, 64)
    cached = ShuffledSource(CacheBlocks(uri, shuffle_files=False), 64, cfg.data.shuffle_buffer,
                            seed=cfg.data.seed)
    for _ in range(8):
        (x1, y1), (x2, y2) = next(live), next(cached)
        assert x1.shape == x2.shape
        rel = (x1 - x2).square().sum() / x1.square().sum()
        assert rel < 1e-3, rel  # the same tokens in the same order, up to int8 rounding
        assert (y1 - y2).square().sum() / y1.square().sum() < 1e-3
