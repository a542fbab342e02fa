"""Run folders in object storage (issue 16), against the real S3-protocol server on 127.0.0.1
(`s3_bucket` in conftest.py) through pyarrow's S3 client: a run trained into `s3://…` holds what a
local run folder holds, with the same weights; `--resume` continues from the store after a lost
run; an incomplete or damaged checkpoint in the store is skipped, saying so; eval and export read
the store; the node-local scratch is gone at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cache_produce import config

from clt_ray import layout
from clt_ray.fsutil import LocationError, Staged, filesystem
from clt_ray.train.checkpoint import load_checkpoint
from clt_ray.train.run import train_from_config

EXE = Path(sys.executable).parent / "clt-ray"

pytestmark = pytest.mark.usefixtures("one_thread")


def run_config(model_dir: Path, steps: int = 6):
    cfg = config(model_dir)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "steps": steps, "checkpoint_every": 2, "keep_checkpoints": 2})})


def store_names(uri: str) -> set[str]:
    """Every object under a location, relative to it."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File}


def same_weights(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "scratch"
    monkeypatch.setenv("CLT_RAY_SCRATCH", str(path))
    return path


def test_a_run_in_the_store_holds_what_a_local_run_holds_with_the_same_weights(
        tiny_lm_dir, tmp_path: Path, s3_bucket: str, scratch: Path):
    cfg = run_config(tiny_lm_dir)
    uri = f"{s3_bucket}/runs/one"
    res = train_from_config(cfg, uri, log=lambda m: None, splice=False)
    assert not any(scratch.iterdir())  # the node-local scratch is removed at the end
    ref = train_from_config(cfg, tmp_path / "local", log=lambda m: None, splice=False)
    assert res.run_dir == uri and res.checkpoint == f"{uri}/checkpoints/step_000000006"
    names = store_names(uri)
    local = {str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*")
             if p.is_file()}
    assert names == local  # config, metrics, summary, the 2 kept checkpoints: nothing else
    assert {n.split("/")[1] for n in names if n.startswith("checkpoints/")} == {
        "step_000000004", "step_000000006"}
    same_weights(load_checkpoint(uri), load_checkpoint(tmp_path / "local"))
    fs, root = filesystem(uri)
    with fs.open_input_stream(f"{root}/{layout.METRICS}") as f:
        remote_metrics = f.read().decode()
    local_metrics = (tmp_path / "local" / layout.METRICS).read_text()
    strip = [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
             for x in remote_metrics.splitlines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
                     for x in local_metrics.splitlines()]
    assert ref.step == res.step == 6


def test_resume_from_the_store_after_a_lost_run_skips_an_incomplete_checkpoint(
        tiny_lm_dir, tmp_path: Path, s3_bucket: str, scratch: Path):
    cfg = run_config(tiny_lm_dir)
    uri = f"{s3_bucket}/runs/resumed"
    full = train_from_config(cfg, tmp_path / "full", log=lambda m: None, splice=False)
    # a run lost at step 4: its step-6 upload cut short (a weight object missing), no summary
    short = cfg.model_copy(update={"train": cfg.train.model_copy(update={"keep_checkpoints": 5})})
    train_from_config(short, uri, log=lambda m: None, splice=False)
    fs, root = filesystem(uri)
    fs.delete_file(f"{root}/checkpoints/step_000000006/W_dec_1.safetensors")
    fs.delete_file(f"{root}/{layout.VIEWER_SUMMARY}")
    out = subprocess.run(  # noqa: PLW1510 - the exit status is asserted
        [str(EXE), "train", "--run-dir", uri, "--resume"], capture_output=True,
                         text=True, timeout=600,
                         env={**os.environ, "CLT_RAY_DEBUG": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "skipping checkpoint" in said and "step_000000006" in said and "W_dec_1" in said
    assert "resuming" in said and "step_000000004" in said
    same_weights(load_checkpoint(uri), load_checkpoint(tmp_path / "full"))
    assert full.step == load_checkpoint(uri).state.step == 6
    assert layout.VIEWER_SUMMARY in store_names(uri)
    steps = [(r["kind"], r["step"]) for r in map(json.loads, fs.open_input_stream(
        f"{root}/{layout.METRICS}").read().decode().splitlines())]
    full_steps = [(r["kind"], r["step"]) for r in map(json.loads, (
        tmp_path / "full" / layout.METRICS).read_text().splitlines())]
    assert steps == full_steps  # the lost run's records after step 4 were dropped


def test_a_new_run_refuses_a_store_folder_with_checkpoints_and_eval_export_read_it(
        tiny_lm_dir, tmp_path: Path, s3_bucket: str, scratch: Path):
    cfg = run_config(tiny_lm_dir, steps=2)
    uri = f"{s3_bucket}/runs/taken"
    train_from_config(cfg, uri, log=lambda m: None, splice=False)
    with pytest.raises(Exception, match="already holds checkpoints"):
        train_from_config(cfg, uri, log=lambda m: None, splice=False)
    out = subprocess.run(  # noqa: PLW1510 - the exit status is asserted
        [str(EXE), "eval", uri, "--no-splice", "--json"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(json.loads(out.stdout[out.stdout.index("{"):])["explained_variance"]) == 2
    export = f"{s3_bucket}/exports/taken"
    out = subprocess.run(  # noqa: PLW1510 - the exit status is asserted
        [str(EXE), "export", uri, export], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {"config.yaml"} <= store_names(export)
    assert any(n.endswith(".safetensors") for n in store_names(export))


def test_refused_credentials_are_one_line_before_any_actor_starts(tiny_lm_dir, tmp_path: Path):
    """A second S3-protocol server that checks credentials (moto with authentication on from
    the first request): the throw-away keys are refused; `train --shards 2` says so in one line
    and no Ray is started."""
    import socket

    import yaml
    from conftest import start_s3_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_s3_server(port, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(run_config(tiny_lm_dir).model_dump(mode="json")))
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
               "RAY_ADDRESS": "", "RAY_TMPDIR": str(tmp_path / "raytmp")}
        out = subprocess.run(  # noqa: PLW1510 - the exit status is asserted
            [str(EXE), "train", "--config", str(cfg), "--shards", "2", "--run-dir",
             "s3://some-bucket/run"], capture_output=True, text=True, timeout=120, env=env)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "ACCESS_DENIED" in out.stderr, out.stderr
    assert "s3://some-bucket/run" in out.stderr and "credentials" in out.stderr
    assert not (tmp_path / "raytmp").exists()  # no Ray was started


def test_an_unreachable_store_is_one_line_before_any_work(tiny_lm_dir, tmp_path: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_MAX_ATTEMPTS": "1"}
    cfg = tmp_path / "cfg.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(run_config(tiny_lm_dir).model_dump(mode="json")))
    out = subprocess.run(  # noqa: PLW1510 - the exit status is asserted
        [str(EXE), "train", "--config", str(cfg), "--run-dir",
                          "s3://nowhere/run"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "s3://nowhere/run" in out.stderr, out.stderr
    with pytest.raises(LocationError):
        Staged("nope://x/y")


def test_the_whole_pipeline_with_every_location_in_the_store(ray_local, tiny_lm_dir,
                                                             tmp_path: Path, s3_bucket: str):
    """cache (2 Ray producers) → 2-shard training → eval → export → top-k → attribute → serve,
    every location an s3:// URI: each stage reads what the one before wrote in the store."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner
    from clt_ray.actors.autointerp import run_autointerp_on_ray
    from clt_ray.actors.cache_producer import cache_on_ray
    from clt_ray.actors.trainer import train_on_ray
    from test_viewer import raw_get, start_cli

    from clt_ray.cli import cli
    from clt_ray.config import AutoInterpConfig
    from clt_ray.eval.metrics import evaluate_checkpoint

    base = f"{s3_bucket}/pipeline"
    cfg = config(tiny_lm_dir)
    cache_on_ray(cfg.model, cfg.data, f"{base}/cache", tokens=700, producers=2,
                 windows_per_file=5, cpus=0.5, progress=False, log=lambda m: None)
    cfg = config(tiny_lm_dir, source="cache", cache=f"{base}/cache", cache_order="written")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_every": 3})})
    res = train_on_ray(cfg, f"{base}/run", shards=2, cpus_per_worker=0.5, splice=False,
                       log=lambda m: None)
    assert res.step == 6 and res.checkpoint == f"{base}/run/checkpoints/step_000000006"
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= store_names(f"{base}/run")
    shard_files = {n for n in store_names(f"{base}/run/checkpoints/step_000000006")
                   if n.startswith("shard_")}
    assert {n.split("/")[0] for n in shard_files} == {"shard_000", "shard_001"}  # each shard's

    result = evaluate_checkpoint(f"{base}/run", splice=False)
    assert result["checkpoint"] == res.checkpoint and len(result["explained_variance"]) == 2

    runner = CliRunner()
    out = runner.invoke(cli, ["export", f"{base}/run", f"{base}/export"])
    assert out.exit_code == 0, out.output
    assert "config.yaml" in store_names(f"{base}/export")

    ai = AutoInterpConfig.model_validate({
        "checkpoint": f"{base}/run", "out": f"{base}/run/autointerp",
        "topk": {"tokens": 512, "k": 5, "range_size": 16, "chunk_windows": 4},
        "actors": 2, "cpus_per_actor": 0.25})
    summary = run_autointerp_on_ray(ai, log=lambda m: None, topk_only=True)
    assert summary["features"] == 2 * 32 and "features.parquet" in store_names(
        f"{base}/run/autointerp")

    out = runner.invoke(cli, ["attribute", "--clt", f"{base}/export", "--prompt",
                              "the cat sat on the", "--out", f"{base}/run/graphs",
                              "--example-tokens", "256"])
    assert out.exit_code == 0, out.output
    graphs = store_names(f"{base}/run/graphs")
    assert {"graph-metadata.json", "graphs.parquet"} <= graphs

    proc, server = start_cli("serve", f"{base}/run", "--port", "0")
    try:
        status, body = raw_get(server, "/api/features?limit=100")
        assert status == 200 and json.loads(body)["total"] == 2 * 32
        status, body = raw_get(server, "/api/graphs")
        assert status == 200 and json.loads(body)["total"] == 1
        status, body = raw_get(server, "/api/metrics")
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    fs, root = filesystem(f"{base}/run/autointerp/features.parquet")
    with fs.open_input_file(root) as f:
        assert pq.read_table(f).num_rows == 2 * 32


def test_a_corrupt_checkpoint_object_is_named_and_never_loaded(tiny_lm_dir, s3_bucket: str,
                                                               scratch: Path):
    from clt_ray.train.checkpoint import DamagedCheckpoint

    uri = f"{s3_bucket}/runs/corrupt"
    train_from_config(run_config(tiny_lm_dir, steps=4), uri, log=lambda m: None, splice=False)
    fs, root = filesystem(uri)
    name = f"{root}/checkpoints/step_000000004/W_enc_0.safetensors"
    with fs.open_input_stream(name) as f:
        data = bytearray(f.read())
    data[-3] ^= 0xFF  # same size, one byte changed: only the sha256 tells
    with fs.open_output_stream(name) as f:
        f.write(bytes(data))
    step = f"{uri}/checkpoints/step_000000004"
    with pytest.raises(DamagedCheckpoint, match=f"{step}/W_enc_0.safetensors: sha256"):
        load_checkpoint(step)
    said: list[str] = []
    loaded = load_checkpoint(uri, log=said.append)  # the run folder: the older one, saying why
    assert loaded.state.step == 2 and loaded.location == f"{uri}/checkpoints/step_000000002"
    assert any("step_000000004" in line and "sha256" in line for line in said), said
