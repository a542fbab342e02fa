"""Activation sources: batches of the right shape, BOS/padding dropped, windows inside documents,
held-out documents disjoint from training ones, and positions that restore exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clt_ray.config import DataConfig, ModelConfig, parse_config
from clt_ray.data import (
    FileDocuments,
    ShuffledSource,
    TensorBlocks,
    TensorSource,
    TokenWindows,
    ToyDocuments,
    heldout_windows,
    lm_blocks,
    lm_source,
    make_documents,
    window_activations,
)
from clt_ray.errors import ConfigError
from clt_ray.toy.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_lm(tok):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def drain(source, n):
    return [next(source) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_tensor_source_restores_exactly_across_epochs():
    x, y = torch.randn(50, 2, 4), torch.randn(50, 2, 4)
    src = TensorSource(x, y, batch_size=8, seed=3)
    drain(src, 9)  # into the second epoch
    state = json.loads(json.dumps(src.state()))  # JSON-able
    ahead = drain(src, 10)
    again = TensorSource(x, y, batch_size=8, seed=3)
    again.restore(state)
    assert_same(drain(again, 10), ahead)


def test_shuffle_buffer_permutes_each_chunk_and_restores_at_any_point():
    n, block, B, buf = 130, 7, 8, 40
    x = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 1, 2).clone()
    src = ShuffledSource(TensorBlocks(x, -x, block), B, buf, seed=1)
    batches = []
    with pytest.raises(StopIteration):
        while True:
            batches.append(next(src))
    ids = torch.cat([b[0][:, 0, 0] for b in batches]).long()
    assert len(set(ids.tolist())) == len(ids)  # no token twice
    assert not torch.equal(ids, torch.arange(len(ids)))  # shuffled
    assert all(torch.equal(b[1], -b[0]) for b in batches)  # x and y stay paired
    first_chunk = ids[: 42 // B * B]  # a chunk is the first ≥ 40 tokens in whole blocks: 42
    assert sorted(first_chunk.tolist()) == sorted(set(first_chunk.tolist()))
    assert max(first_chunk.tolist()) < 42
    for k in range(len(batches)):
        src = ShuffledSource(TensorBlocks(x, -x, block), B, buf, seed=1)
        drain(src, k)
        state = src.state()
        fresh = ShuffledSource(TensorBlocks(x, -x, block), B, buf, seed=1)
        fresh.restore(state)
        assert_same(drain(fresh, len(batches) - k), batches[k:])


def test_windows_start_with_bos_stay_inside_documents_and_restore(tmp_path: Path, tok):
    docs = ["The man walked to the river .", "", "zorp " * 23, "A cat sat ."]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    files = FileDocuments(path, "text", every=1000, heldout=False)  # raw doc 0 is held out
    w = TokenWindows(files, tok, context_size=10, prefetch=2)
    rows = list(w)
    assert all(r[0] == tok.bos_token_id and 2 <= len(r) <= 10 for r in rows)
    zorp = tok.convert_tokens_to_ids("zorp")
    assert [len(r) - 1 for r in rows] == [9, 9, 5, 4]  # 23 zorps in 9+9+5, then "A cat sat ."
    assert all(set(r[1:]) == {zorp} for r in rows[:3])
    w = TokenWindows(files, tok, context_size=10, prefetch=2)
    next(w)
    state = w.state()
    assert state == {"doc": 1, "window": 1}
    again = TokenWindows(files, tok, context_size=10)
    again.restore(state)
    assert list(again) == rows[1:]


def test_held_out_documents_are_disjoint_from_training(tmp_path: Path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(23)))
    train = list(FileDocuments(path, "text", every=5, heldout=False).iter_from(0))
    held = list(FileDocuments(path, "text", every=5, heldout=True).iter_from(0))
    assert held == [f"doc {i}" for i in (0, 5, 10, 15, 20)]
    assert sorted(train + held, key=lambda s: int(s.split()[1])) == [f"doc {i}" for i in range(23)]
    assert list(FileDocuments(path, "text", every=5, heldout=False).iter_from(6)) == train[6:]
    assert list(FileDocuments(path, "text", every=5, heldout=True).iter_from(2)) == held[2:]
    toy_train, toy_held = make_documents(DataConfig(), False), make_documents(DataConfig(), True)
    assert isinstance(toy_train, ToyDocuments) and toy_train.seed != toy_held.seed
    assert next(toy_train.iter_from(3)) == list(zip(range(4), toy_train.iter_from(0)))[3][1]


def test_parquet_rows_are_documents_like_jsonl_lines(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"doc {i}" for i in range(23)]
    (tmp_path / "a").mkdir()
    pq.write_table(pa.table({"id": list(range(10)), "body": texts[:10]}),
                   tmp_path / "a" / "0.parquet", row_group_size=3)
    pq.write_table(pa.table({"id": list(range(10, 23)), "body": texts[10:]}),
                   tmp_path / "a" / "1.parquet")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    for heldout in (False, True):
        for start in (0, 4):
            from_parquet = list(FileDocuments(tmp_path / "a", "body", 5, heldout).iter_from(start))
            assert from_parquet == list(FileDocuments(jsonl, "body", 5, heldout).iter_from(start))
    assert len(list(FileDocuments(tmp_path / "a", "body", 5, False).iter_from(0))) == 18
    with pytest.raises(ConfigError, match=r"0.parquet has no column 'text' \(data.text_field\); "
                                          "its columns: id, body"):
        FileDocuments(tmp_path / "a", "text", 5, False)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="bad.parquet is not a readable Parquet file"):
        FileDocuments(tmp_path / "bad.parquet", "text", 5, False)


def test_sliced_documents_are_disjoint_and_cover_every_document(tmp_path: Path):
    from clt_ray.data import SlicedDocuments

    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(23)))
    docs = FileDocuments(path, "text", every=1000, heldout=False)
    whole = list(docs.iter_from(0))
    slices = [list(SlicedDocuments(docs, i, 3).iter_from(0)) for i in range(3)]
    assert slices == [whole[i::3] for i in range(3)]
    assert list(SlicedDocuments(docs, 1, 3).iter_from(2)) == slices[1][2:]  # resumable
    with pytest.raises(ValueError, match="slice 3 is not in"):
        SlicedDocuments(docs, 3, 3)


def test_missing_corpus_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="neither"):
        make_documents(DataConfig(corpus=str(tmp_path / "nope")), False)


def test_lm_source_drops_bos_and_restores_exactly(tiny_lm, tok):
    data = DataConfig(context_size=17, lm_batch_size=3, shuffle_buffer=100)
    model_cfg = ModelConfig(name="unused")
    blocks = lm_blocks(tiny_lm, tok, data, model_cfg, heldout=False)
    x, y = next(blocks)
    assert x.shape == y.shape == (3 * 16, 2, 16)  # 3 windows of BOS + 16 tokens, BOS dropped
    src = lm_source(tiny_lm, tok, data, model_cfg, batch_size=32)
    drain(src, 5)  # crosses a buffer refill
    state = json.loads(json.dumps(src.state()))
    ahead = drain(src, 6)
    fresh = lm_source(tiny_lm, tok, data, model_cfg, batch_size=32)
    fresh.restore(state)
    assert_same(drain(fresh, 6), ahead)


def test_heldout_windows_and_activations(tiny_lm, tok):
    data = DataConfig(context_size=17, lm_batch_size=4)
    ids, mask = heldout_windows(tok, data, n_tokens=40)
    assert (ids[:, 0] == tok.bos_token_id).all() and mask.sum() - len(ids) >= 40
    x, _ = window_activations(tiny_lm, ids, mask, ModelConfig(name="unused"), data)
    assert x.shape == (int(mask.sum()) - len(ids), 2, 16)
    train_ids, _ = heldout_windows(tok, data.model_copy(update={"heldout_seed": data.seed}), 40)
    assert not torch.equal(train_ids, ids)


def test_data_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        parse_config({"data": {"shuffle_buffer": 100}, "train": {"batch_size": 512}})
    with pytest.raises(ConfigError, match="data.context_size"):
        parse_config({"data": {"context_size": 0}})
