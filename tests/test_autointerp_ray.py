"""actors.autointerp: the Ray Data job gives exactly the single-process feature rows."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from clt_ray.config import TopKSettings
from clt_ray.features.collect import collect_features

SETTINGS = TopKSettings(k=5, range_size=16, chunk_windows=5)


@pytest.mark.parametrize("source", ["heldout", "cache"])
def test_ray_data_job_equals_single_process(source, ray_local, toy_clt, tmp_path):
    """Held-out text through the LM, or the CLT inputs of an activation cache (a chunk per file)."""
    from clt_ray.actors.autointerp import collect_on_ray

    from clt_ray.autointerp.cache_source import cache_windows, window_inputs
    from clt_ray.cache.produce import write_cache
    from clt_ray.data import heldout_windows
    from clt_ray.lm import load_model
    from clt_ray.train.checkpoint import load_checkpoint

    run = toy_clt.parent / "run"
    loaded = load_checkpoint(run)
    cfg = loaded.config
    lm, tokenizer = load_model(cfg.model)
    cache, extra = None, {}
    if source == "cache":
        cache = str(tmp_path / "acts")
        write_cache(lm, tokenizer, cfg.data, cfg.model, cache, tokens=1500, windows_per_file=4,
                    progress=False)
    out = collect_on_ray(run, tmp_path / "features.parquet", tokens=1200, features=(8, 40),
                         settings=SETTINGS, actors=2, cpus_per_actor=0.5, log=lambda m: None,
                         cache=cache)
    got = pq.read_table(out).to_pylist()

    if cache is None:
        ids, mask = heldout_windows(tokenizer, cfg.data, 1200)
    else:
        src = cache_windows(cache, cfg.data, tokenizer, 1200)
        ids, mask = src.ids, src.mask
        extra = {"inputs": lambda w: window_inputs(src, w), "chunks": src.chunks()}
    expected = collect_features(loaded.model.shard(8, 40), lm, tokenizer, ids, mask,
                                cfg.model.input_hook, SETTINGS, **extra)
    expected.sort(key=lambda r: (r["layer"], r["feature"]))
    assert len(got) == len(expected) == 4 * 32
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for key in g:
            if key in ("top_examples", "quantile_examples"):
                assert [(x["window"], x["position"], x["group"], x["tokens"]) for x in g[key]] \
                    == [(x["window"], x["position"], x["group"], x["tokens"]) for x in e[key]]
                for x, y in zip(g[key], e[key]):
                    assert max(abs(a - b) for a, b in zip(x["acts"], y["acts"])) < 1e-5
            elif isinstance(g[key], float):
                assert abs(g[key] - e[key]) <= 1e-5 * max(1.0, abs(e[key])), key
            elif key.endswith("values") or key == "decoder_norms":
                assert max((abs(a - b) for a, b in zip(g[key], e[key])), default=0) < 1e-4, key
            else:
                assert g[key] == e[key], key
