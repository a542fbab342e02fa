"""Benchmark: an activation cache in object storage against the same cache on local disk, side by
side in one run (issue 16).

A GPT-2-small-shape cache (12 layers, d 768, int8 + zstd 1, synthetic activations with outlier
dimensions as in bench/cache.py) is written through `clt_ray.cache.store.CacheWriter` to a local
folder and to an S3-protocol server on 127.0.0.1 (moto's server mode, what the tests use; a real
bucket is reached the same way through pyarrow's S3 client), then read back by `CacheBlocks`, the
trainer's reader (fetch, sha256 check, decode). Printed: write and read tokens/s for each and the
store ÷ local ratios; `--json` ends with one JSON object.

    python bench/object_store.py                 # 8 files × 2048 tokens
    python bench/object_store.py --files 16 --tokens-per-file 4096 --json

moto keeps objects in its own process's memory and serves them over HTTP on loopback: the figures
measure the client path (HTTP, copies, the manifest written last), not a cloud network.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--tokens-per-file", type=int, default=2048)
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
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
