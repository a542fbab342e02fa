"""clt_ray.autointerp.collect on the toy model: every statistic equals a brute-force computation
over all windows at once."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from clt_ray.autointerp.collect import (
    TopKSettings,
    collect_features,
    unembedding,
    window_activations,
    write_features,
)

N_FEATURES = 40
SETTINGS = TopKSettings(k=5, range_size=16, chunk_windows=6)


@pytest.fixture(scope="module")
def toy_run(toy_clt):
    from clt_ray.checkpoint import load_checkpoint
    from clt_ray.data import heldout_windows
    from clt_ray.models import keep_mask, load_model

    loaded = load_checkpoint(toy_clt.parent / "run")
    cfg = loaded.config
    lm, tokenizer = load_model(cfg.model)
    ids, mask = heldout_windows(tokenizer, cfg.data, 2048)
    clt = loaded.model.shard(0, N_FEATURES)
    x = window_activations(lm, ids, mask, cfg.model.input_hook)
    with torch.no_grad():
        xn, _ = clt.normalize(x.flatten(0, 1))
        acts = clt.encode(xn)[1].reshape(*ids.shape, x.shape[2], N_FEATURES)
    valid = keep_mask(ids, mask)
    acts = torch.where(valid[:, :, None, None], acts, 0.0)  # [W, T, L, n]
    rows = collect_features(clt, lm, tokenizer, ids, mask, cfg.model.input_hook, SETTINGS)
    return clt, lm, tokenizer, ids, valid, acts, rows


def test_rows_equal_brute_force(toy_run):
    _, _, tokenizer, ids, valid, acts, rows = toy_run
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
            assert e["tokens"] == [tokenizer.decode([int(t)]) for t in ids[w][kept]]
            assert e["acts"][e["position"]] == pytest.approx(e["peak"], rel=1e-5)
        for e in r["quiet_examples"]:  # negatives: windows where the feature never fired
            assert float(peaks[e["window"]]) == 0 and not any(e["acts"])
            w = e["window"]
            assert e["tokens"] == [tokenizer.decode([int(t)]) for t in ids[w][valid[w]]]
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
        assert r["top_logits"] == [tokenizer.decode([int(i)]) for i in best]
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
