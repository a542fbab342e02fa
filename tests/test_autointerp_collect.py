"""clt_ray.features.collect on the toy model: every statistic equals a brute-force computation
over all windows at once, with the CLT inputs from the LM or from an activation cache."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from clt_ray.config import TopKSettings
from clt_ray.features.collect import (
    TokenText,
    collect_features,
    lm_window_inputs,
    unembedding,
    write_features,
)

N_FEATURES = 40
SETTINGS = TopKSettings(k=5, range_size=16, chunk_windows=6)


def _brute_force_acts(clt, x, ids, valid):
    with torch.no_grad():
        xn, _ = clt.normalize(x.flatten(0, 1))
        acts = clt.encode(xn)[1].reshape(*ids.shape, x.shape[2], N_FEATURES)
    return torch.where(valid[:, :, None, None], acts, 0.0)  # [W, T, L, n]


@pytest.fixture(scope="module")
def toy_run(toy_clt):
    from clt_ray.data import heldout_windows
    from clt_ray.lm import keep_mask, load_model
    from clt_ray.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(toy_clt.parent / "run")
    cfg = loaded.config
    lm, tokenizer = load_model(cfg.model)
    ids, mask = heldout_windows(tokenizer, cfg.data, 2048)
    clt = loaded.model.shard(0, N_FEATURES)
    x = lm_window_inputs(lm, ids, mask, cfg.model.input_hook)
    valid = keep_mask(ids, mask)
    acts = _brute_force_acts(clt, x, ids, valid)
    rows = collect_features(clt, lm, tokenizer, ids, mask, cfg.model.input_hook, SETTINGS)
    return clt, lm, tokenizer, ids, valid, acts, rows


@pytest.fixture(scope="module")
def toy_cache_run(toy_run, toy_clt, tmp_path_factory):
    """The same statistics with the CLT inputs read from an int8 activation cache of the run's
    training corpus (a chunk per file), against brute force over the decoded cache."""
    from clt_ray.autointerp.cache_source import cache_windows, file_inputs, window_inputs
    from clt_ray.cache.produce import write_cache
    from clt_ray.lm import keep_mask
    from clt_ray.train.checkpoint import load_checkpoint

    clt, lm, tokenizer, *_ = toy_run
    cfg = load_checkpoint(toy_clt.parent / "run").config
    uri = str(tmp_path_factory.mktemp("cache") / "acts")
    write_cache(lm, tokenizer, cfg.data, cfg.model, uri, tokens=1500, windows_per_file=3,
                progress=False)
    src = cache_windows(uri, cfg.data, tokenizer, tokens=1100)
    assert len(src.files) > 2 and len(src.files) < len(load_manifest_files(uri))
    x = torch.cat([file_inputs(src, i) for i in range(len(src.files))])
    valid = keep_mask(src.ids, src.mask)
    assert int(valid.sum()) == sum(f.tokens for f in src.files)
    acts = _brute_force_acts(clt, x, src.ids, valid)
    rows = collect_features(clt, lm, tokenizer, src.ids, src.mask, cfg.model.input_hook,
                            SETTINGS, inputs=lambda w: window_inputs(src, w),
                            chunks=src.chunks())
    return clt, lm, tokenizer, src.ids, valid, acts, rows


def load_manifest_files(uri):
    from clt_ray.cache.store import load_manifest

    return load_manifest(uri).files


@pytest.mark.parametrize("source", ["lm", "cache"])
def test_rows_equal_brute_force(source, request):
    _, _, tokenizer, ids, valid, acts, rows = request.getfixturevalue(
        {"lm": "toy_run", "cache": "toy_cache_run"}[source])
    L = acts.shape[2]
    assert [(r["layer"], r["feature"]) for r in rows] == [
        (l, f) for a in range(0, N_FEATURES, 16) for l in range(L)
        for f in range(a, min(a + 16, N_FEATURES))]
    assert sum(r["fired"] > 0 for r in rows) > N_FEATURES  # a real mix of live features
    for r in rows:
        a = acts[:, :, r["layer"], r["feature"]]  # [W, T]
        assert r["n_tokens"] == int(valid.sum())
        assert r["fired"] == int((a > 0).sum())
        assert sum(r["histogram"]) == r["fired"]
        peaks, _ = a.max(1)
        expected = sorted(((-float(p), w) for w, p in enumerate(peaks) if p > 0))[:SETTINGS.k]
        got = r["top_examples"]
        assert [e["window"] for e in got] == [w for _, w in expected]
        assert [e["peak"] for e in got] == pytest.approx([-p for p, _ in expected], rel=1e-5)
        for e in got + r["quantile_examples"]:
            w = e["window"]
            kept = valid[w]
            assert e["acts"] == pytest.approx(a[w][kept].tolist(), abs=1e-5)
            assert e["tokens"] == TokenText(tokenizer)(ids[w][kept].tolist())
            assert e["acts"][e["position"]] == pytest.approx(e["peak"], rel=1e-5)
        for e in r["quiet_examples"]:  # negatives: windows where the feature never fired
            assert float(peaks[e["window"]]) == 0 and not any(e["acts"])
            w = e["window"]
            assert e["tokens"] == TokenText(tokenizer)(ids[w][valid[w]].tolist())
        assert len(r["quiet_examples"]) == min(8, int((peaks == 0).sum()))
        quantile_windows = [e["window"] for e in r["quantile_examples"]]
        assert not set(quantile_windows) & {e["window"] for e in got}
        assert all((peaks[w] > 0) for w in quantile_windows)
        if got:
            assert r["max_activation"] == pytest.approx(float(peaks.max()), rel=1e-5)


def test_decoder_norms_and_logit_effects(toy_run):
    clt, lm, tokenizer, *_, rows = toy_run
    unembed = unembedding(lm)
    for r in rows[::7]:
        l, f = r["layer"], r["feature"]
        w = (clt.W_dec[l][f] / clt.s_out[l:, None]).detach()  # raw space [L − l, d]
        assert r["decoder_norms"] == pytest.approx(w.norm(dim=-1).tolist(), rel=1e-5)
        scores = w.sum(0) @ unembed
        best = scores.topk(SETTINGS.logits).indices
        assert r["top_logits"] == TokenText(tokenizer)(best.tolist())
        assert r["bottom_logit_values"][0] == pytest.approx(float(scores.min()), rel=1e-5)


def test_parquet_round_trip(toy_run, tmp_path):
    *_, rows = toy_run
    path = write_features(rows, tmp_path / "features.parquet", {"clt": "toy"})
    table = pq.read_table(path)
    assert table.num_rows == len(rows)
    assert table.slice(0, 1).to_pylist()[0]["top_examples"] == rows[0]["top_examples"]
    assert b"histogram_edges" in table.schema.metadata[b"clt_ray"]
    assert not list(tmp_path.glob(".*tmp"))


def test_topk_clts_are_refused(toy_run):
    import copy

    clt, lm, tokenizer, ids, *_ = toy_run
    topk = copy.deepcopy(clt)
    topk.cfg = topk.cfg.model_copy(update={"activation": "topk", "k": 4})
    with pytest.raises(ValueError, match="JumpReLU or ReLU"):
        collect_features(topk, lm, tokenizer, ids[:2], torch.ones_like(ids[:2]), "hook_resid_mid")


def test_cache_that_does_not_match_its_recorded_corpus_is_refused(toy_run, toy_clt, tmp_path):
    import json

    from clt_ray.autointerp.cache_source import cache_windows, file_inputs
    from clt_ray.cache.produce import write_cache
    from clt_ray.cache.store import CacheError
    from clt_ray.train.checkpoint import load_checkpoint

    _, lm, tokenizer, *_ = toy_run
    cfg = load_checkpoint(toy_clt.parent / "run").config
    uri = tmp_path / "acts"
    write_cache(lm, tokenizer, cfg.data, cfg.model, str(uri), tokens=200, windows_per_file=2,
                progress=False)
    assert file_inputs(cache_windows(str(uri), cfg.data, tokenizer, 200), 0).shape[0] == 2
    manifest = json.loads((uri / "manifest.json").read_text())
    manifest["data_seed"] += 1  # the recorded corpus now gives other windows
    (uri / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="recorded corpus"):
        file_inputs(cache_windows(str(uri), cfg.data, tokenizer, 200), 0)
    del manifest["windows_per_file"]
    (uri / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="does not record its corpus"):
        cache_windows(str(uri), cfg.data, tokenizer, 200)
