"""Activation sources: where a trainer's (x, y) batches come from.

An `ActivationSource` is an iterator of (x, y) batches, each [B, L, d] (tokens × layers × d_model),
x the input hook and y the output hook of every layer, with a resumable position: `state()` is a
small JSON-able dict, and `restore(state)` makes the next batch exactly the one that would have
come next. Checkpoints store that dict as the data cursor.

Built from two smaller parts, so later sources (the on-disk cache, Ray-streamed producers) only
have to provide the first:
- a `BlockStream`: blocks of activations [n, L, d] (n varies) in a fixed order, resumable at
  block boundaries (`LMBlocks` runs the LM in this process over a stream of token windows);
- `ShuffledSource`: a block shuffle buffer. It fills `buffer_tokens` tokens from the stream,
  permutes them with a generator seeded by (seed, chunk index), and serves fixed-size batches
  until fewer than one batch is left (that remainder is dropped), then refills. Its state is the
  stream position where the current chunk started, the chunk index and the offset in the chunk,
  so a restore recomputes at most one buffer of activations and then yields the same floats.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from typing_extensions import Self

from clt_ray.errors import ConfigError
from clt_ray.seeding import mix_seed

Batch = tuple[Tensor, Tensor]
State = dict[str, Any]




# --- interfaces --------------------------------------------------------------------------------


class Resumable(ABC):
    """An iterator of (x, y) activations with a resumable position: `state()` is a JSON-able
    position, and `restore(state)` makes the next item the one that comes next now."""

    def __iter__(self) -> Self:
        return self

    @abstractmethod
    def __next__(self) -> Batch: ...

    @abstractmethod
    def state(self) -> State: ...

    @abstractmethod
    def restore(self, state: State) -> None: ...

    def close(self) -> None:
        """Release resources (threads, files, actors); the default has none."""


class ActivationSource(Resumable):
    """Batches (x, y) [B, L, d] with a resumable position. Endless or finite (StopIteration)."""


class BlockStream(Resumable):
    """Blocks (x, y) [n, L, d] (n may vary) in a fixed order, resumable at block boundaries."""


# --- in-memory ---------------------------------------------------------------------------------


class TensorSource(ActivationSource):
    """Batches from in-memory x, y [N, L, d]: epochs over a permutation seeded by (seed, epoch)
    (or in order with shuffle=False). Endless unless `epochs` is given. For tests and small data."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, epochs: int | None = None) -> None:
        if x.shape != y.shape or x.dim() != 3:
            raise ValueError(f"x and y must both be [N, L, d], got {list(x.shape)}, {list(y.shape)}")
        if not 0 < batch_size <= len(x):
            raise ValueError(f"batch_size {batch_size} must be in [1, {len(x)}]")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.n_layers, self.d_model = x.shape[1], x.shape[2]
        self._epoch, self._offset = 0, 0
        self._perm: Tensor | None = None

    def _order(self) -> Tensor:
        if self._perm is None:
            if self.shuffle:
                gen = torch.Generator().manual_seed(mix_seed(self.seed, self._epoch))
                self._perm = torch.randperm(len(self.x), generator=gen)
            else:
                self._perm = torch.arange(len(self.x))
        return self._perm

    def __next__(self) -> Batch:
        if self._offset + self.batch_size > len(self.x):
            self._epoch, self._offset, self._perm = self._epoch + 1, 0, None
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        idx = self._order()[self._offset : self._offset + self.batch_size].to(self.x.device)
        self._offset += self.batch_size
        return self.x[idx], self.y[idx]

    def state(self) -> State:
        return {"epoch": self._epoch, "offset": self._offset}

    def restore(self, state: State) -> None:
        self._epoch, self._offset, self._perm = int(state["epoch"]), int(state["offset"]), None


class TensorBlocks(BlockStream):
    """A BlockStream over in-memory x, y [N, L, d] in blocks of `block` tokens (tests)."""

    def __init__(self, x: Tensor, y: Tensor, block: int) -> None:
        self.x, self.y, self.block, self._pos = x, y, block, 0
        self.n_layers, self.d_model = x.shape[1], x.shape[2]

    def __next__(self) -> Batch:
        if self._pos >= len(self.x):
            raise StopIteration
        sl = slice(self._pos, self._pos + self.block)
        self._pos += self.block
        return self.x[sl], self.y[sl]

    def state(self) -> State:
        return {"pos": self._pos}

    def restore(self, state: State) -> None:
        self._pos = int(state["pos"])


# --- the shuffle buffer ------------------------------------------------------------------------


class ShuffledSource(ActivationSource):
    """Fixed-size shuffled batches from a BlockStream through a block shuffle buffer (module doc)."""

    def __init__(self, blocks: BlockStream, batch_size: int, buffer_tokens: int,
                 seed: int = 0) -> None:
        if buffer_tokens < batch_size:
            raise ValueError(f"shuffle buffer ({buffer_tokens} tokens) is smaller than one batch "
                             f"({batch_size})")
        self.blocks, self.batch_size = blocks, batch_size
        self.buffer_tokens, self.seed = buffer_tokens, seed
        self.n_layers = getattr(blocks, "n_layers", None)
        self.d_model = getattr(blocks, "d_model", None)
        self._next_chunk = 0
        self._chunk: tuple[int, State] | None = None  # (index, stream position at its start)
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._offset = 0

    def _fill(self) -> None:
        """The next chunk: buffer_tokens (or what is left) shuffled. Peak memory is about one
        buffer plus a block: the old chunk is dropped first, and each block is copied straight
        to its shuffled rows and freed (cat-then-permute held three buffers at once)."""
        start = self.blocks.state()
        self._x = self._y = None
        xs, ys, n = [], [], 0
        while n < self.buffer_tokens:
            try:
                x, y = next(self.blocks)
            except StopIteration:
                break
            xs.append(x)
            ys.append(y)
            n += len(x)
        if n < self.batch_size:
            self._x = self._y = None
            raise StopIteration
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self._next_chunk))
        perm = torch.randperm(n, generator=gen).to(xs[0].device)
        dest = torch.argsort(perm)  # row k of the blocks' concatenation goes to row dest[k]
        x = xs[0].new_empty((n, *xs[0].shape[1:]))
        y = ys[0].new_empty((n, *ys[0].shape[1:]))
        at = 0
        while xs:
            bx, by = xs.pop(0), ys.pop(0)
            rows = dest[at: at + len(bx)]
            x[rows], y[rows] = bx, by
            at += len(bx)
            del bx, by
        self._x, self._y = x, y
        self._chunk = (self._next_chunk, start)
        self._next_chunk += 1
        self._offset = 0

    def __next__(self) -> Batch:
        if self._x is None or self._offset + self.batch_size > len(self._x):
            self._fill()
        assert self._x is not None and self._y is not None
        sl = slice(self._offset, self._offset + self.batch_size)
        self._offset += self.batch_size
        return self._x[sl], self._y[sl]

    def state(self) -> State:
        if self._x is None or self._chunk is None:
            return {"chunk": self._next_chunk, "start": self.blocks.state(), "offset": 0}
        index, start = self._chunk
        return {"chunk": index, "start": start, "offset": self._offset}

    def close(self) -> None:
        self.blocks.close()

    def restore(self, state: State) -> None:
        if "replicas" in state:
            n = len(state["replicas"])
            raise ConfigError(f"the checkpoint was written by {n} data-parallel replicas; resume "
                              f"it with `clt-ray train --replicas {n}`")
        self.blocks.restore(state["start"])
        self._next_chunk, self._chunk = int(state["chunk"]), None
        self._x = self._y = None
        if int(state["offset"]) > 0:
            self._fill()
            self._offset = int(state["offset"])




def take_tokens(stream: Iterator[Batch], n_tokens: int) -> Batch:
    """The first n_tokens tokens of a stream of blocks or batches, concatenated."""
    xs, ys, n = [], [], 0
    while n < n_tokens:
        try:
            x, y = next(stream)
        except StopIteration:
            break
        xs.append(x)
        ys.append(y)
        n += len(x)
    if n == 0:
        raise ValueError("the activation stream is empty")
    return torch.cat(xs)[:n_tokens], torch.cat(ys)[:n_tokens]


def split_batches(x: Tensor, y: Tensor, batch_size: int) -> list[Batch]:
    """x, y cut into batches that own their memory: a slice would pickle (ray.put) with its whole
    parent storage, so k batches of held-out data sent to the shards would weigh k × all of it
    (5.3 GB for 4096 tokens at GPT-2 small's shape; bench/scale.py)."""
    return [(x[i : i + batch_size].clone(), y[i : i + batch_size].clone())
            for i in range(0, len(x), batch_size)]
