"""Activation caches in object storage (issue 16), against a real S3-protocol server on 127.0.0.1
(moto's server mode, `s3_bucket` in conftest.py) reached through pyarrow's own S3 client: two Ray
producers write the same cache into a bucket as onto local disk, training reads it there, and a
damaged object is named — before training when its size is wrong, when read when its bytes are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_cache_produce import cached_token_ids, config

from clt_ray.cache.store import CacheError, check_files, open_cache
from clt_ray.fsutil import filesystem
from clt_ray.train.run import check_config, train_from_config

EXE = Path(sys.executable).parent / "clt-ray"

pytestmark = pytest.mark.usefixtures("one_thread")


def entries(uri: str) -> list[tuple[str, int, str]]:
    return sorted((f.name, f.tokens, f.sha256) for f in open_cache(uri)[2].files)


@pytest.fixture
def caches(ray_local, tiny_lm_dir, tmp_path: Path, s3_bucket: str) -> tuple[str, str]:
    """The same cache written by 2 Ray producers into the bucket and onto local disk."""
    from clt_ray.actors.cache_producer import cache_on_ray

    cfg = config(tiny_lm_dir)
    remote, local = f"{s3_bucket}/caches/tiny", str(tmp_path / "local")
    for uri in (remote, local):
        cache_on_ray(cfg.model, cfg.data, uri, tokens=300, producers=2, windows_per_file=5,
                     cpus=0.5, progress=False, log=lambda m: None)
    return remote, local


def test_two_producers_write_the_same_cache_to_the_store_and_training_reads_it(
        caches, tiny_lm_dir, tmp_path: Path):
    remote, local = caches
    assert entries(remote) == entries(local) and len(entries(remote)) == 4
    assert cached_token_ids(remote) == cached_token_ids(local)
    fs, root = filesystem(remote)
    names = {i.path.rsplit("/", 1)[1] for i in fs.get_file_info(pafs_selector(root))}
    assert "manifest.json" in names and not any(n.endswith(".tmp") for n in names)
    weights = []
    for uri, name in ((remote, "run-s3"), (local, "run-local")):
        cfg = config(tiny_lm_dir, source="cache", cache=uri, cache_order="written")
        res = train_from_config(cfg, tmp_path / name, log=lambda m: None, splice=False)
        assert res.step == cfg.train.steps
        from clt_ray.train.checkpoint import load_checkpoint

        weights.append(load_checkpoint(tmp_path / name).model.state_dict())
    for key, value in weights[0].items():  # the same bytes in, the same weights out
        assert torch.equal(value, weights[1][key]), key


def pafs_selector(root: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(root, recursive=False)


def test_a_damaged_object_in_the_store_is_named_and_never_trained_on(caches, tiny_lm_dir,
                                                                      tmp_path: Path):
    remote, _ = caches
    fs, root, manifest = open_cache(remote)
    first, second = sorted(manifest.files, key=lambda f: f.name)[:2]
    with fs.open_input_stream(f"{root}/{first.name}") as f:
        data = f.read()
    with fs.open_output_stream(f"{root}/{first.name}") as f:  # truncated: found before training
        f.write(data[:-7])
    cfg = config(tiny_lm_dir, source="cache", cache=remote, cache_order="written")
    with pytest.raises(CacheError, match=f"1 of the wrong size: {first.name}"):
        check_config(cfg)
    with pytest.raises(CacheError, match=first.name):
        train_from_config(cfg, tmp_path / "run-truncated", log=lambda m: None)
    assert not (tmp_path / "run-truncated").exists()

    with fs.open_output_stream(f"{root}/{first.name}") as f:  # back, then a flipped byte
        f.write(data)
    with fs.open_input_stream(f"{root}/{second.name}") as f:
        flipped = bytearray(f.read())
    flipped[len(flipped) // 2] ^= 0xFF
    with fs.open_output_stream(f"{root}/{second.name}") as f:
        f.write(bytes(flipped))
    check_files(remote)  # sizes agree: only reading finds it
    with pytest.raises(CacheError, match=f"{second.name}: sha256 .* does not match"):
        train_from_config(cfg, tmp_path / "run-corrupt", log=lambda m: None)
    assert not list((tmp_path / "run-corrupt").glob("checkpoints/step_*"))


def test_cache_into_an_unreachable_store_is_one_line_before_any_work(tiny_lm_dir,
                                                                     tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tiny_lm_dir).model_dump(mode="json")))
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens there
    out = subprocess.run([str(EXE), "cache", "--config", str(path), "--out",
                          "s3://bucket/cache", "--tokens", "100"], capture_output=True,
                         text=True, timeout=120, env=env, check=False)
    assert out.returncode == 2, out.stderr
    assert "s3://bucket/cache: the store cannot be reached" in out.stderr
    assert "127.0.0.1:9" in out.stderr and "Traceback" not in out.stderr
