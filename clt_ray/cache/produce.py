"""Make activation blocks by running the LM over a token stream: the computation a CacheProducer
actor runs on its slice (actors/cache_producer.py), and `clt-ray cache` in one process.

A producer's slice is every n-th document (`SlicedDocuments`), so slices are disjoint and no
producer tokenises another's part. File k of a slice holds its windows [k·W, (k+1)·W) (W =
`windows_per_file`), so a cache is deterministic and a resumed run knows which windows each missing
file needs: finished files are skipped by tokenising only (the LM does not run again). The channel
pre-scales come from the first file of the whole stream, whatever the number of producers.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from clt_ray.cache.block import encode_block
from clt_ray.cache.store import CacheFile, CacheWriter, Manifest, load_manifest
from clt_ray.config import WINDOWS_PER_FILE, DataConfig, ModelConfig
from clt_ray.data import (
    SlicedDocuments,
    TokenWindows,
    make_documents,
    pad_id,
    pad_windows,
    trainable_activations,
)
from clt_ray.lm.loading import model_dims
from clt_ray.quant import channel_scales

Scales = tuple[list[list[float]], list[list[float]]]



def file_name(slice_index: int, k: int) -> str:
    return f"part-{slice_index:03d}-{k:06d}.arrows"


def slice_windows(data: DataConfig, tokenizer: Any, slice_index: int = 0, n_slices: int = 1,
                  part: tuple[int, int] = (0, 1)) -> TokenWindows:
    """The token windows of one producer's slice of the training documents; `part` (i, n) first
    keeps documents i, i + n, … (a data-parallel replica's share, which its producers slice)."""
    docs = SlicedDocuments(SlicedDocuments(make_documents(data, heldout=False), *part),
                           slice_index, n_slices)
    return TokenWindows(docs, tokenizer, data.context_size, prefetch=data.lm_batch_size)


def window_groups(windows: Iterator[list[int]], size: int
                  ) -> Iterator[tuple[int, list[list[int]]]]:
    """(k, windows [k·size, (k+1)·size)) until the windows run out."""
    for k in itertools.count():
        rows = list(itertools.islice(windows, size))
        if not rows:
            return
        yield k, rows


def window_block(lm: Any, rows: list[list[int]], pad_id: int, model_cfg: ModelConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [n], x, y [n, L, d]) of the trainable tokens of `rows`, on the CPU."""
    ids, mask = pad_windows(rows, pad_id)
    ids, x, y = trainable_activations(lm, ids, mask, model_cfg.input_hook, model_cfg.output_hook)
    return ids, x.cpu(), y.cpu()


def first_channel_scales(lm: Any, tokenizer: Any, data: DataConfig, model_cfg: ModelConfig,
                         windows_per_file: int) -> Scales:
    """Per-channel pre-scales (quant.channel_scales) of the stream's first `windows_per_file`
    windows: the same for any number of producers."""
    rows = list(itertools.islice(slice_windows(data, tokenizer), windows_per_file))
    if not rows:
        raise ValueError("the corpus gave no windows to cache")
    _, x, y = window_block(lm, rows, pad_id(tokenizer), model_cfg)
    return channel_scales(x).tolist(), channel_scales(y).tolist()


def produce_blocks(lm: Any, tokenizer: Any, data: DataConfig, model_cfg: ModelConfig, *,
                   bits: int, zstd_level: int | None, windows_per_file: int,
                   scales: Scales | None, slice_index: int = 0, n_slices: int = 1,
                   tokens: int | None = None, skip: Mapping[str, int] | None = None,
                   start_file: int = 0, part: tuple[int, int] = (0, 1)
                   ) -> Iterator[tuple[str, bytes]]:
    """(file name, encoded block) of one slice, in order, from file `start_file` on. Files named
    in `skip` (name → tokens, e.g. already cached) are passed over by tokenising only. Stops
    after the file that brings the slice to `tokens` trainable tokens (skipped ones included), or
    when the corpus ends (tokens None: only then)."""
    skip = skip or {}
    pad = pad_id(tokenizer)
    x_scale, y_scale = (None, None) if scales is None else (
        torch.tensor(scales[0]), torch.tensor(scales[1]))
    windows = slice_windows(data, tokenizer, slice_index, n_slices, part)
    done = 0
    for k, rows in window_groups(windows, windows_per_file):
        if tokens is not None and done >= tokens:
            return
        name = file_name(slice_index, k)
        if k < start_file:
            continue
        if name in skip:
            done += skip[name]
            continue
        ids, x, y = window_block(lm, rows, pad, model_cfg)
        done += ids.numel()
        yield name, encode_block(ids, x, y, bits, x_channel_scale=x_scale,
                                 y_channel_scale=y_scale, zstd_level=zstd_level)


def cache_manifest(data: DataConfig, model_cfg: ModelConfig, *, bits: int,
                   zstd_level: int | None, windows_per_file: int, slices: int) -> Manifest:
    """The manifest of a new cache of this config (no scales, no files yet)."""
    layers, d, _ = model_dims(model_cfg)
    return Manifest(model=model_cfg.name, revision=model_cfg.revision,
                    input_hook=model_cfg.input_hook, output_hook=model_cfg.output_hook,
                    layers=layers, d_model=d, bits=bits, zstd_level=zstd_level,
                    corpus=data.corpus, context_size=data.context_size, data_seed=data.seed,
                    slices=slices, windows_per_file=windows_per_file)


def open_writer(uri: str, manifest: Manifest, scales: Callable[[], Scales] | None) -> CacheWriter:
    """A writer for a new cache (channel scales from `scales()`, or none) or for resuming the one
    at `uri`, which must have been made the same way (CacheError naming what differs)."""
    existing = load_manifest(uri)
    if existing is not None:
        manifest.x_channel_scale = existing.x_channel_scale if scales else None
        manifest.y_channel_scale = existing.y_channel_scale if scales else None
    elif scales is not None:
        manifest.x_channel_scale, manifest.y_channel_scale = scales()
    return CacheWriter(uri, manifest)


def manifest_scales(m: Manifest) -> Scales | None:
    """A cache's channel pre-scales, as produce_blocks takes them."""
    return None if m.x_channel_scale is None else (m.x_channel_scale, m.y_channel_scale or [])


def finished(writer: CacheWriter) -> dict[str, int]:
    return {f.name: f.tokens for f in writer.manifest.files}


class CacheProgress:
    """The progress bar of a cache run (tokens, tokens/s, bytes/token) and its closing line."""

    def __init__(self, writer: CacheWriter, tokens: int, enabled: bool,
                 log: Callable[[str], None]) -> None:
        self.writer, self.log = writer, log
        self.bar = tqdm(total=max(tokens, writer.manifest.tokens), initial=writer.manifest.tokens,
                        unit="tok", unit_scale=True, desc="cache", disable=not enabled)
        self.start, self.tokens, self.bytes = time.perf_counter(), 0, 0

    def add(self, entry: CacheFile) -> None:
        self.tokens += entry.tokens
        self.bytes += entry.bytes
        self.bar.update(entry.tokens)
        self.bar.set_postfix(bytes_per_token=f"{self.bytes / self.tokens:.0f}")

    def close(self) -> None:
        self.bar.close()
        m, seconds = self.writer.manifest, time.perf_counter() - self.start
        if self.tokens:
            self.log(f"cached {self.tokens:,} new tokens in {seconds:.1f} s "
                     f"({self.tokens / seconds:,.0f} tokens/s, {self.bytes / self.tokens:.0f} "
                     f"bytes/token); the cache holds {m.tokens:,} tokens in {len(m.files)} files "
                     f"at {self.writer.uri}")
        else:
            self.log(f"nothing to do: the cache at {self.writer.uri} already holds {m.tokens:,} "
                     f"tokens in {len(m.files)} files")


def slice_budget(tokens: int, n_slices: int) -> int:
    return math.ceil(tokens / n_slices)


def write_cache(lm: Any, tokenizer: Any, data: DataConfig, model_cfg: ModelConfig, uri: str, *,
                tokens: int, bits: int = 8, zstd_level: int | None = 1,
                windows_per_file: int = WINDOWS_PER_FILE, channel_scale: bool = True,
                progress: bool = True,
                log: Callable[[str], None] = print) -> Manifest:
    """Cache about `tokens` trainable tokens (whole files; fewer if the corpus ends) at `uri` in
    this process, resuming whatever is already there."""
    manifest = cache_manifest(data, model_cfg, bits=bits, zstd_level=zstd_level,
                              windows_per_file=windows_per_file, slices=1)
    scales = (lambda: first_channel_scales(lm, tokenizer, data, model_cfg, windows_per_file)
              ) if channel_scale else None
    writer = open_writer(uri, manifest, scales)
    bar = CacheProgress(writer, tokens, progress, log)
    try:
        for name, block in produce_blocks(lm, tokenizer, data, model_cfg, bits=bits,
                                          zstd_level=zstd_level, scales=manifest_scales(writer.manifest),
                                          windows_per_file=windows_per_file, tokens=tokens,
                                          skip=finished(writer)):
            bar.add(writer.write(name, block))
    finally:
        bar.close()
    return writer.manifest
