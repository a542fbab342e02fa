"""Benchmark: an activation cache in object storage against the same cache on local disk, side by
side in one run (issue 16).

A GPT-2-small-shape cache (12 layers, d 768, int8 + zstd 1, synthetic activations with outlier
dimensions as in bench/cache.py) is written through `clt_ray.cache.store.CacheWriter` to a local
folder and to an S3-protocol server on 127.0.0.1 (moto's server mode, what the tests use; a real
bucket is reached the same way through pyarrow's S3 client), then read back by `CacheBlocks`, the
trainer's reader (fetch, sha256 check, decode). Printed: write and read tokens/s for each and the
store ÷ local ratios, next to the training step's tokens/s at the same shape on this machine (what
the reader must keep up with). Then a GPT-2-shape checkpoint (weights + Adam moments, features per
layer = `--ckpt-expansion` × 768) written and restored the way a run does it: locally
(`save_checkpoint`, `load_checkpoint`) and through the store (the same save into node-local
scratch, then `push_checkpoint`: files, manifest last; restore = `fetch_checkpoint`: download and
sha256 check, then the same load). `--json` ends with one JSON object.

    python bench/object_store.py                 # 8 files × 2048 tokens, expansion-1 checkpoint
    python bench/object_store.py --files 16 --tokens-per-file 4096 --ckpt-expansion 4 --json

moto keeps objects in its own process's memory and serves them over HTTP on loopback: the figures
measure the client path (HTTP, copies, the manifest written last), not a cloud network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache import synthetic  # bench/cache.py

from clt_ray.cache import encode_block
from clt_ray.cache.store import CacheBlocks, CacheWriter, Manifest
from clt_ray.fsutil import COPY_THREADS


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("moto's S3 server did not start (pip install 'moto[server]')")
            time.sleep(0.2)


def write(uri: str, blocks: list[bytes], tokens_per_file: int) -> float:
    """Seconds to write every block file and the manifest after each (what producers do)."""
    manifest = Manifest(model="bench", input_hook="hook_resid_mid", output_hook="hook_mlp_out",
                        layers=12, d_model=768, bits=8, zstd_level=1)
    start = time.perf_counter()
    writer = CacheWriter(uri, manifest)
    for i, data in enumerate(blocks):
        writer.write(f"part-000-{i:06d}.arrows", data)
    return time.perf_counter() - start


def read(uri: str) -> tuple[float, int]:
    """Seconds for the trainer's reader to fetch, check and decode one epoch; tokens read."""
    start, tokens = time.perf_counter(), 0
    for x, _ in CacheBlocks(uri, epochs=1):
        tokens += x.shape[0]
    return time.perf_counter() - start, tokens


def trainer_rate(features: int, batch: int = 256, steps: int = 3) -> float:
    """Tokens/s of the training step (`Trainer.train_step`: forward, backward, Adam) of a
    GPT-2-shape CLT with `features` a layer, on this machine."""
    from clt_ray.config import CLTConfig, LossConfig, OptimConfig, TrainConfig
    from clt_ray.nn.clt import CrossLayerTranscoder
    from clt_ray.train.loop import Trainer

    clt = CrossLayerTranscoder(CLTConfig(n_layers=12, d_model=768, n_features=features))
    trainer = Trainer(clt, loss=LossConfig(), optim=OptimConfig(),
                      train=TrainConfig(steps=100, batch_size=batch, progress=False))
    x, y = torch.randn(batch, 12, 768), torch.randn(batch, 12, 768)
    trainer.train_step(x, y)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
    return steps * batch / (time.perf_counter() - start)


def checkpoint_times(expansion: int, local_dir: Path, uri: str) -> dict[str, float]:
    """Seconds to write and restore a GPT-2-shape checkpoint (with Adam moments) locally and
    through the store, as a run does; its size in MB."""
    from clt_ray.config import CLTConfig, OptimConfig
    from clt_ray.fsutil import Staged
    from clt_ray.nn.clt import CrossLayerTranscoder
    from clt_ray.nn.step import make_optimizer
    from clt_ray.train.checkpoint import (
        TrainingState,
        fetch_checkpoint,
        load_checkpoint,
        push_checkpoint,
        release_fetched,
        save_checkpoint,
    )

    clt = CrossLayerTranscoder(CLTConfig(n_layers=12, d_model=768, n_features=expansion * 768))
    optimizer = make_optimizer(clt, OptimConfig())
    for p in clt.parameters():  # Adam moments exist after one step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = TrainingState(step=1, total_steps=1)
    out: dict[str, float] = {}
    start = time.perf_counter()
    path = save_checkpoint(local_dir / "checkpoints" / "step_000000001", clt, optimizer, state)
    out["local_write_s"] = time.perf_counter() - start
    out["checkpoint_mb"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    start = time.perf_counter()
    load_checkpoint(path, optimizer=True)
    out["local_restore_s"] = time.perf_counter() - start
    with Staged(uri, "bench run") as run:
        start = time.perf_counter()
        local = save_checkpoint(run.local / "checkpoints" / "step_000000001", clt, optimizer,
                                state)
        push_checkpoint(run, local)
        out["s3_write_s"] = time.perf_counter() - start
    start = time.perf_counter()
    load_checkpoint(fetch_checkpoint(uri), optimizer=True)
    out["s3_restore_s"] = time.perf_counter() - start
    release_fetched()
    # the upload alone, ours against Ray Train's (what storage_path/storage_filesystem runs for
    # each shard's report): the same local folder to two fresh prefixes
    from ray.train.v2._internal.execution.storage import _upload_to_fs_path

    with Staged(f"{uri}-push", "bench run") as run:
        start = time.perf_counter()
        shutil.copytree(path, run.local / "checkpoints" / path.name)
        push_checkpoint(run, run.local / "checkpoints" / path.name)
        out["s3_upload_clt_ray_s"] = time.perf_counter() - start
        start = time.perf_counter()
        _upload_to_fs_path(str(path), run.fs, f"{run.root}-ray/{path.name}")
        out["s3_upload_ray_train_s"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--tokens-per-file", type=int, default=2048)
    parser.add_argument("--ckpt-expansion", type=int, default=1,
                        help="checkpoint features per layer ÷ 768 (8: issue 17's 4.8 GB)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    x, y = synthetic(args.tokens_per_file)
    ids = torch.arange(args.tokens_per_file)
    blocks = [encode_block(ids, x, y, 8, zstd_level=1) for _ in range(args.files)]
    tokens = args.files * args.tokens_per_file
    mb = sum(map(len, blocks)) / 1e6
    proc, endpoint = start_s3()
    try:
        import pyarrow.fs as pafs

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(bucket)
        with tempfile.TemporaryDirectory() as tmp:
            where = {"local": str(Path(tmp) / "cache"), "s3": f"s3://{bucket}/cache"}
            result: dict[str, float] = {"tokens": tokens, "cache_mb": round(mb, 1)}
            for name, uri in where.items():
                seconds = write(uri, blocks, args.tokens_per_file)
                result[f"{name}_write_tokens_per_s"] = round(tokens / seconds)
                seconds, n = read(uri)
                assert n == tokens, (name, n, tokens)
                result[f"{name}_read_tokens_per_s"] = round(tokens / seconds)
            ckpt = checkpoint_times(args.ckpt_expansion, Path(tmp) / "run",
                                    f"s3://{bucket}/run")
            result.update({f"checkpoint_{k}": round(v, 2) for k, v in ckpt.items()})
        result["trainer_tokens_per_s"] = round(trainer_rate(args.ckpt_expansion * 768))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    for op in ("write", "read"):
        result[f"{op}_ratio_s3_over_local"] = round(
            result[f"s3_{op}_tokens_per_s"] / result[f"local_{op}_tokens_per_s"], 3)
    print(f"GPT-2 shape (12 × 768), int8 + zstd 1: {args.files} files, {tokens:,} tokens, "
          f"{mb:.1f} MB")
    for name in ("local", "s3"):
        print(f"  {name:<6} write {result[f'{name}_write_tokens_per_s']:>10,} tokens/s   "
              f"read (fetch + sha256 + decode) {result[f'{name}_read_tokens_per_s']:>10,} tokens/s")
    print(f"  store ÷ local: write {result['write_ratio_s3_over_local']:.2f}, "
          f"read {result['read_ratio_s3_over_local']:.2f}")
    result["read_s3_over_trainer"] = round(
        result["s3_read_tokens_per_s"] / result["trainer_tokens_per_s"], 1)
    print(f"  the training step here (F {args.ckpt_expansion * 768} a layer, batch 256): "
          f"{result['trainer_tokens_per_s']:,} tokens/s; the store's reader is "
          f"{result['read_s3_over_trainer']}× that")
    print(f"checkpoint, GPT-2 shape, F {args.ckpt_expansion * 768} a layer, with Adam moments: "
          f"{result['checkpoint_checkpoint_mb']:,.0f} MB")
    for name in ("local", "s3"):
        print(f"  {name:<6} write {result[f'checkpoint_{name}_write_s']:>7.2f} s   restore "
              f"{result[f'checkpoint_{name}_restore_s']:>7.2f} s")
    for op in ("write", "restore"):
        result[f"checkpoint_{op}_ratio_s3_over_local"] = round(
            result[f"checkpoint_s3_{op}_s"] / result[f"checkpoint_local_{op}_s"], 2)
    print(f"  store ÷ local time: write {result['checkpoint_write_ratio_s3_over_local']:.2f}, "
          f"restore {result['checkpoint_restore_ratio_s3_over_local']:.2f}")
    print(f"  upload alone: clt-ray's push ({COPY_THREADS} files at once) "
          f"{result['checkpoint_s3_upload_clt_ray_s']:.2f} s, Ray Train's "
          f"(pyarrow copy_files, one thread) {result['checkpoint_s3_upload_ray_train_s']:.2f} s")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
