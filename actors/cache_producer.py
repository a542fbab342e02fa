"""CacheProducer actors: each runs the LM over its own slice of the documents and either writes
cache files or streams encoded blocks through the object store (docs/design.md §4).

Placement and messaging only; every computation is `clt_ray.cache.produce`'s. One process — the
driver — writes the manifest: producers write their data files and yield the entries, the driver
records each as it arrives, so an interrupted run loses at most the files in flight.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch
from clt_ray.actors.ray_session import FORWARDED_ENV

from clt_ray.cache.block import Block, decode_block
from clt_ray.cache.produce import (
    CacheProgress,
    Scales,
    cache_manifest,
    finished,
    first_channel_scales,
    manifest_scales,
    open_writer,
    produce_blocks,
    slice_budget,
)
from clt_ray.cache.store import (
    CacheError,
    CacheFile,
    Manifest,
    filesystem,
    load_manifest,
    write_block_file,
)
from clt_ray.config import WINDOWS_PER_FILE, DataConfig, ModelConfig
from clt_ray.data import BlockStream, State
from clt_ray.lm import load_model
from clt_ray.lm.loading import model_dims


class CacheProducer:
    """One slice of the token stream: the LM, loaded once, and its slice's blocks on request."""

    def __init__(self, model_cfg: ModelConfig, data: DataConfig, slice_index: int,
                 n_slices: int, part: tuple[int, int] = (0, 1)) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model_cfg, self.data = model_cfg, data
        self.slice_index, self.n_slices, self.part = slice_index, n_slices, part
        self.lm, self.tokenizer = load_model(model_cfg)
        self.produced = 0
        # Two methods may run at once (max_concurrency=2, for blocks_produced), and a cancelled
        # stream can still be finishing a block when its replacement starts: one forward pass
        # at a time (the extraction hooks are per module), and only the newest stream goes on.
        self._lm_lock = threading.Lock()
        self._stream = 0

    def channel_scales(self, windows_per_file: int) -> Scales:
        return first_channel_scales(self.lm, self.tokenizer, self.data, self.model_cfg,
                                    windows_per_file)

    def _blocks(self, stream: int | None = None, **kw: Any) -> Iterator[tuple[str, bytes]]:
        blocks = produce_blocks(self.lm, self.tokenizer, self.data, self.model_cfg,
                                slice_index=self.slice_index, n_slices=self.n_slices,
                                part=self.part, **kw)
        while stream is None or stream == self._stream:
            with self._lm_lock:
                item = next(blocks, None)
            if item is None:
                return
            self.produced += 1
            yield item

    def write_files(self, uri: str, manifest: Manifest, tokens: int, skip: dict[str, int]
                    ) -> Iterator[dict]:
        """Write this slice's missing files; yields each one's manifest entry once it is stored."""
        fs, root = filesystem(uri)
        for name, block in self._blocks(bits=manifest.bits, zstd_level=manifest.zstd_level,
                                        windows_per_file=manifest.windows_per_file or 1,
                                        scales=manifest_scales(manifest), tokens=tokens, skip=skip):
            yield write_block_file(fs, root, name, block, manifest).model_dump()

    def stream(self, bits: int, zstd_level: int | None, windows_per_block: int,
               scales: Scales | None, start_block: int = 0) -> Iterator[bytes]:
        """This slice's blocks from block `start_block` on, until the corpus ends (or a newer
        stream starts)."""
        self._stream += 1
        for _, block in self._blocks(self._stream, bits=bits, zstd_level=zstd_level,
                                     windows_per_file=windows_per_block, scales=scales,
                                     start_file=start_block):
            yield block

    def blocks_produced(self) -> int:
        return self.produced


def start_producers(model_cfg: ModelConfig, data: DataConfig, n: int, *,
                    cpus: float | None = None, gpus: float | None = None,
                    part: tuple[int, int] = (0, 1)) -> list[Any]:
    """N CacheProducer actors, slice i of n each: one GPU each when the cluster has a GPU for
    every producer (and the model is not pinned to the CPU), else `cpus` CPUs each (default: an
    equal share of the cluster's CPUs, at least 1 when there are enough)."""
    if n < 1:
        raise ValueError(f"producers must be at least 1, got {n}")
    resources = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= n and model_cfg.device != "cpu" else 0.0
    if cpus is None:
        share = resources.get("CPU", 1.0) / n
        cpus = math.floor(share) if share >= 1 else share
    if gpus > 0:
        model_cfg = model_cfg.model_copy(update={"device": "cuda"})
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["OMP_NUM_THREADS"] = str(max(1, int(cpus)))
    actor = ray.remote(CacheProducer).options(
        num_cpus=cpus, num_gpus=gpus, max_concurrency=2,  # blocks_produced() beside a stream
        runtime_env={"env_vars": env})
    return [actor.remote(model_cfg, data, i, n, part) for i in range(n)]


def stop(actors: list[Any]) -> None:
    for a in actors:
        ray.kill(a)


def cache_on_ray(model_cfg: ModelConfig, data: DataConfig, uri: str, *, tokens: int,
                 producers: int = 1, bits: int = 8, zstd_level: int | None = 1,
                 windows_per_file: int = WINDOWS_PER_FILE, channel_scale: bool = True,
                 cpus: float | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> Manifest:
    """`clt-ray cache` on Ray: `producers` actors write about `tokens` tokens (whole files) at
    `uri` between them, each from its own slice; resumes a half-finished cache made the same way.
    """
    existing = load_manifest(uri)
    if existing is not None and existing.slices != producers:
        raise CacheError(f"{uri} was made by {existing.slices} producer(s) (its files are their "
                         f"slices); resume it with --producers {existing.slices}")
    manifest = cache_manifest(data, model_cfg, bits=bits, zstd_level=zstd_level,
                              windows_per_file=windows_per_file, slices=producers)
    actors = start_producers(model_cfg, data, producers, cpus=cpus)
    try:
        scales = (lambda: ray.get(actors[0].channel_scales.remote(windows_per_file))
                  ) if channel_scale else None
        writer = open_writer(uri, manifest, scales)
        skip, budget = finished(writer), slice_budget(tokens, producers)
        bar = CacheProgress(writer, tokens, progress, log)
        try:
            gens = [a.write_files.remote(uri, writer.manifest, budget, skip) for a in actors]
            while gens:
                ready, _ = ray.wait(gens, num_returns=1)
                gen = ready[0]
                try:
                    entry = ray.get(next(gen))
                except StopIteration:
                    gens.remove(gen)
                    continue
                entry = CacheFile.model_validate(entry)
                writer.add(entry)
                bar.add(entry)
        finally:
            bar.close()
        return writer.manifest
    finally:
        stop(actors)


class ProducerBlocks(BlockStream):
    """The live stream for training (`data.source: producers`): blocks of `lm_batch_size`
    windows from N producers through the object store, decoded into `dtype`. The order is fixed —
    round robin over the producers, each in its slice's order — so it is resumable: the state is
    the next block of every producer and whose turn it is. Each producer runs at most
    `backpressure` blocks ahead of the consumer. `part` (i, n): only documents i, i + n, … (a
    data-parallel replica's share)."""

    def __init__(self, model_cfg: ModelConfig, data: DataConfig, *, producers: int | None = None,
                 bits: int | None = None, backpressure: int | None = None,
                 zstd_level: int | None = None, channel_scale: bool = True,
                 cpus: float | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", part: tuple[int, int] = (0, 1)) -> None:
        self.n_layers, self.d_model, _ = model_dims(model_cfg)
        self.n = producers or data.producers
        self.bits = bits or data.stream_bits
        self.backpressure = backpressure or data.backpressure
        self.zstd_level, self.windows = zstd_level, data.lm_batch_size
        self.dtype, self.device = dtype, device
        self.actors = start_producers(model_cfg, data, self.n, part=part,
                                      cpus=cpus if cpus is not None else data.producer_cpus)
        self.scales = ray.get(self.actors[0].channel_scales.remote(self.windows)
                              ) if channel_scale else None
        self._x_scale, self._y_scale = (None, None) if self.scales is None else (
            torch.tensor(self.scales[0]), torch.tensor(self.scales[1]))
        self.next_block, self.ended, self.turn = [0] * self.n, [False] * self.n, 0
        self._gens: list[Any] | None = None

    def _start(self) -> list[Any]:
        return [None if self.ended[i] else a.stream.options(
                    _generator_backpressure_num_objects=self.backpressure).remote(
                    self.bits, self.zstd_level, self.windows, self.scales, self.next_block[i])
                for i, a in enumerate(self.actors)]

    def next_block_of(self) -> tuple[int, Block]:
        """(producer, decoded block with its token ids) — the stream itself."""
        if self._gens is None:
            self._gens = self._start()
        while not all(self.ended):
            i = self.turn
            self.turn = (i + 1) % self.n
            if self.ended[i]:
                continue
            try:
                ref = next(self._gens[i])
            except StopIteration:
                self.ended[i] = True
                continue
            block = decode_block(ray.get(ref), x_channel_scale=self._x_scale,
                                 y_channel_scale=self._y_scale, dtype=self.dtype,
                                 device=self.device)
            self.next_block[i] += 1
            return i, block
        raise StopIteration

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, block = self.next_block_of()
        return block.x, block.y

    def state(self) -> State:
        return {"next_block": list(self.next_block), "ended": list(self.ended), "turn": self.turn}

    def restore(self, state: State) -> None:
        self._cancel()
        self.next_block = [int(b) for b in state["next_block"]]
        self.ended = [bool(e) for e in state["ended"]]
        self.turn = int(state["turn"])

    def _cancel(self) -> None:
        for g in self._gens or []:
            if g is not None:
                ray.cancel(g)
        self._gens = None

    def close(self) -> None:
        self._cancel()
        stop(self.actors)
        self.actors = []
