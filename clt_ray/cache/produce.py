"""Write an activation cache by running the LM over a token stream: the computation a
CacheProducer actor runs on its slice (actors/), and `clt-ray cache` in one process.

File k holds windows [k·W, (k+1)·W) of the slice's stream (W = `windows_per_file`), so the cache
is deterministic and a resumed run knows which windows each missing file needs: finished files are
kept, and their windows are skipped by tokenising only (the LM does not run again).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from clt_ray.cache.block import encode_block
from clt_ray.cache.store import CacheWriter, Manifest, load_manifest
from clt_ray.config import DataConfig, ModelConfig
from clt_ray.data import (
    TokenWindows,
    _pad_id,
    make_documents,
    pad_windows,
    trainable_activations,
)
from clt_ray.quant import channel_scales


def file_name(slice_index: int, k: int) -> str:
    return f"part-{slice_index:03d}-{k:06d}.arrows"


def window_block(lm: Any, rows: list[list[int]], pad_id: int, model_cfg: ModelConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [n], x, y [n, L, d]) of the trainable tokens of `rows`, on the CPU."""
    ids, mask = pad_windows(rows, pad_id)
    ids, x, y = trainable_activations(lm, ids, mask, model_cfg.input_hook, model_cfg.output_hook)
    return ids, x.cpu(), y.cpu()


def slice_windows(windows: TokenWindows, slice_index: int, n_slices: int,
                  windows_per_file: int) -> Iterator[tuple[int, list[list[int]]]]:
    """(file index k, its windows) of one producer's slice: the stream's groups of
    `windows_per_file` windows dealt round-robin to `n_slices` producers, so slices are disjoint
    and together cover the stream."""
    for group in itertools.count():
        rows = list(itertools.islice(windows, windows_per_file))
        if not rows:
            return
        if group % n_slices == slice_index:
            yield group // n_slices, rows


def write_cache(lm: Any, tokenizer: Any, data: DataConfig, model_cfg: ModelConfig, uri: str, *,
                tokens: int, bits: int = 8, zstd_level: int | None = 1,
                windows_per_file: int = 64, channel_scale: bool = True, slice_index: int = 0,
                n_slices: int = 1, progress: bool = True,
                log: Callable[[str], None] = print) -> Manifest:
    """Cache about `tokens` trainable tokens of this slice (whole files; fewer if the corpus ends)
    at `uri`, resuming whatever is already there."""
    from clt_ray.models import d_model, n_layers

    if not 0 <= slice_index < n_slices:
        raise ValueError(f"slice_index {slice_index} is not in [0, {n_slices})")
    pad = _pad_id(tokenizer)
    windows = TokenWindows(make_documents(data, heldout=False), tokenizer, data.context_size,
                           prefetch=data.lm_batch_size)
    manifest = Manifest(model=model_cfg.name, revision=model_cfg.revision,
                        input_hook=model_cfg.input_hook, output_hook=model_cfg.output_hook,
                        layers=n_layers(lm), d_model=d_model(lm), bits=bits,
                        zstd_level=zstd_level)
    existing = load_manifest(uri)
    writer = None
    if existing is not None:  # resuming: the channel scales are the cache's
        if channel_scale:
            manifest.x_channel_scale = existing.x_channel_scale
            manifest.y_channel_scale = existing.y_channel_scale
        writer = CacheWriter(uri, manifest)
    done = 0
    bar = tqdm(total=tokens, unit="tok", desc=f"cache slice {slice_index}", disable=not progress)
    start, written_bytes, written_tokens = time.perf_counter(), 0, 0
    for k, rows in slice_windows(windows, slice_index, n_slices, windows_per_file):
        if done >= tokens:
            break
        name = file_name(slice_index, k)
        if writer is not None and writer.has(name):
            entry = next(f for f in writer.manifest.files if f.name == name)
            done += entry.tokens
            bar.update(entry.tokens)
            continue
        ids, x, y = window_block(lm, rows, pad, model_cfg)
        if writer is None:  # a new cache: its first block fixes the channel scales
            if channel_scale:
                manifest.x_channel_scale = channel_scales(x).tolist()
                manifest.y_channel_scale = channel_scales(y).tolist()
            writer = CacheWriter(uri, manifest)
        data_bytes = encode_block(ids, x, y, bits, x_channel_scale=writer.manifest.channel_scale("x"),
                                  y_channel_scale=writer.manifest.channel_scale("y"),
                                  zstd_level=zstd_level)
        writer.write(name, data_bytes)
        done += ids.numel()
        written_bytes += len(data_bytes)
        written_tokens += ids.numel()
        bar.update(ids.numel())
        bar.set_postfix(bytes_per_token=f"{written_bytes / written_tokens:.0f}")
    bar.close()
    if writer is None:
        raise ValueError("the corpus gave no windows to cache")
    seconds = time.perf_counter() - start
    if written_tokens:
        log(f"cached {written_tokens:,} new tokens in {seconds:.1f} s "
            f"({written_tokens / seconds:,.0f} tokens/s, {written_bytes / written_tokens:.0f} "
            f"bytes/token); the cache holds {writer.manifest.tokens:,} tokens in "
            f"{len(writer.manifest.files)} files at {uri}")
    return writer.manifest
