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

Token windows (`TokenWindows`) never cross documents: each is BOS followed by the next
context_size − 1 tokens of one document; a document's last, shorter window is right-padded.
`models.keep_mask` drops BOS and padding, so the trainer sees only real tokens.
"""

from __future__ import annotations

import itertools
import json
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from clt_ray.config import ConfigError, DataConfig, ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

Batch = tuple[Tensor, Tensor]
State = dict[str, Any]


def _mix_seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B97F4A7C15) % (2**63 - 1)
    return h


# --- interfaces --------------------------------------------------------------------------------


class ActivationSource(ABC):
    """Batches (x, y) [B, L, d] with a resumable position. Endless or finite (StopIteration)."""

    def __iter__(self) -> ActivationSource:
        return self

    @abstractmethod
    def __next__(self) -> Batch: ...

    @abstractmethod
    def state(self) -> State:
        """A JSON-able position: restore(state) makes the next batch the one that comes next now."""

    @abstractmethod
    def restore(self, state: State) -> None: ...

    def close(self) -> None:
        """Release resources (threads, files, actors); the default has none."""


class BlockStream(ABC):
    """Blocks (x, y) [n, L, d] (n may vary) in a fixed order, resumable at block boundaries."""

    def close(self) -> None:
        """Release resources (files, actors); the default has none."""

    def __iter__(self) -> BlockStream:
        return self

    @abstractmethod
    def __next__(self) -> Batch: ...

    @abstractmethod
    def state(self) -> State:
        """The position of the next block."""

    @abstractmethod
    def restore(self, state: State) -> None: ...


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
                gen = torch.Generator().manual_seed(_mix_seed(self.seed, self._epoch))
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
        start = self.blocks.state()
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
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, self._next_chunk))
        perm = torch.randperm(n, generator=gen).to(xs[0].device)
        self._x, self._y = torch.cat(xs)[perm], torch.cat(ys)[perm]
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


# --- documents and token windows ---------------------------------------------------------------


class Documents(ABC):
    """A fixed, ordered sequence of documents (texts) that can be re-read from any index."""

    @abstractmethod
    def iter_from(self, index: int) -> Iterator[str]: ...


class ToyDocuments(Documents):
    """The toy corpus (`clt_ray.toy.corpus.iter_documents`), `n_tokens` tokens a document."""

    def __init__(self, seed: int, n_tokens: int) -> None:
        self.seed, self.n_tokens = seed, n_tokens

    def iter_from(self, index: int) -> Iterator[str]:
        from clt_ray.toy.corpus import iter_documents

        it = iter_documents(self.seed, self.n_tokens)
        for _ in range(index):  # regenerated, not stored: ~0.2 ms a document
            next(it)
        return it


def _split_index(index: int, every: int, heldout: bool) -> int:
    """Raw document index of the index-th document of a split: every `every`-th raw document
    (0, every, 2·every, …) is held out, the rest are training documents."""
    if heldout:
        return index * every
    return (index // (every - 1)) * every + index % (every - 1) + 1


def _split_filter(raw: Iterator[str], first_raw: int, every: int, heldout: bool) -> Iterator[str]:
    for i, doc in enumerate(raw, start=first_raw):
        if (i % every == 0) == heldout:
            yield doc


TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


class FileDocuments(Documents):
    """Local text: a .txt file is one document, a .jsonl line or a Parquet row is one (its
    `text_field`); a folder means every such file under it, in sorted order. Every `every`-th
    document is held out."""

    def __init__(self, path: str | Path, text_field: str, every: int, heldout: bool) -> None:
        root = Path(path).expanduser()
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES)
        elif root.is_file():
            files = [root]
        else:
            raise ConfigError(f"data.corpus: {root} is neither 'toy', 'hf:<name>' nor an existing "
                              "file or folder")
        if not files or any(p.suffix not in TEXT_SUFFIXES for p in files):
            raise ConfigError(f"data.corpus: {root} holds no .txt, .jsonl or .parquet files")
        for p in files:
            if p.suffix == ".parquet":
                _check_parquet_column(p, text_field)
        self.files, self.text_field, self.every, self.heldout = files, text_field, every, heldout

    def _raw(self) -> Iterator[str]:
        for path in self.files:
            if path.suffix == ".txt":
                yield path.read_text()
                continue
            if path.suffix == ".parquet":
                yield from _parquet_texts(path, self.text_field)
                continue
            with path.open() as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[self.text_field]
                        except (json.JSONDecodeError, KeyError, TypeError) as exc:
                            raise ValueError(f"{path}:{n}: not a JSON object with a "
                                             f"{self.text_field!r} field ({exc})") from None

    def iter_from(self, index: int) -> Iterator[str]:
        raw_index = _split_index(index, self.every, self.heldout)
        raw = self._raw()
        for _ in range(raw_index):
            next(raw, None)
        return _split_filter(raw, raw_index, self.every, self.heldout)


def _check_parquet_column(path: Path, text_field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"data.corpus: {path} is not a readable Parquet file ({exc})") from None
    if text_field not in schema.names:
        raise ConfigError(f"data.corpus: {path} has no column {text_field!r} (data.text_field); "
                          f"its columns: {', '.join(schema.names)}")


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[text_field]):
        yield from (t or "" for t in batch.column(0).to_pylist())  # null: an empty document


class SlicedDocuments(Documents):
    """Documents i, i + n, i + 2n, … of another sequence: one producer's slice. Windows never
    cross documents, so slices by document are disjoint and together cover every window."""

    def __init__(self, docs: Documents, slice_index: int, n_slices: int) -> None:
        if not 0 <= slice_index < n_slices:
            raise ValueError(f"slice {slice_index} is not in [0, {n_slices})")
        self.docs, self.slice_index, self.n_slices = docs, slice_index, n_slices

    def iter_from(self, index: int) -> Iterator[str]:
        if self.n_slices == 1:
            return self.docs.iter_from(index)
        start = index * self.n_slices + self.slice_index
        return itertools.islice(self.docs.iter_from(start), 0, None, self.n_slices)


class HFDocuments(Documents):
    """A Hugging Face dataset, streamed (`hf:<name>` or `hf:<name>:<config>`); every `every`-th
    document of `split` is held out."""

    def __init__(self, spec: str, split: str, text_field: str, every: int, heldout: bool) -> None:
        name, _, config = spec.partition(":")
        self.name, self.config = name, config or None
        self.split, self.text_field, self.every, self.heldout = split, text_field, every, heldout

    def iter_from(self, index: int) -> Iterator[str]:
        try:
            import datasets
        except ImportError as exc:
            raise ConfigError("data.corpus hf:… needs the `datasets` package") from exc
        raw_index = _split_index(index, self.every, self.heldout)
        ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        texts = (row[self.text_field] for row in ds.skip(raw_index))
        return _split_filter(texts, raw_index, self.every, self.heldout)


def make_documents(cfg: DataConfig, heldout: bool) -> Documents:
    """The training or held-out documents of a data config."""
    if cfg.corpus == "toy":
        return ToyDocuments(cfg.heldout_seed if heldout else cfg.seed, cfg.context_size - 1)
    if cfg.corpus.startswith("hf:"):
        return HFDocuments(cfg.corpus[3:], cfg.split, cfg.text_field, cfg.heldout_every, heldout)
    return FileDocuments(cfg.corpus, cfg.text_field, cfg.heldout_every, heldout)


def bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start windows with")


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any id works (padding is masked and on the right); the tokenizer's own if it has one."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


class TokenWindows:
    """Windows [BOS, up to context_size − 1 tokens of one document], in order; position
    {"doc": i, "window": j} = window j of document i comes next."""

    def __init__(self, docs: Documents, tokenizer: PreTrainedTokenizerBase, context_size: int,
                 prefetch: int = 32) -> None:
        self.docs, self.tokenizer, self.prefetch = docs, tokenizer, prefetch
        self.bos, self.span = bos_id(tokenizer), context_size - 1
        self.restore({"doc": 0, "window": 0})

    def state(self) -> State:
        return {"doc": self._doc, "window": self._window}

    def restore(self, state: State) -> None:
        self._doc, self._window = int(state["doc"]), int(state["window"])
        self._iter = self.docs.iter_from(self._doc)
        self._pending: deque[list[int]] = deque()  # tokenised docs, the head is self._doc

    def _head(self) -> list[int] | None:
        if not self._pending:
            texts = [t for _, t in zip(range(self.prefetch), self._iter)]
            if not texts:
                return None
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            self._pending.extend(list(map(int, t)) for t in ids)
        return self._pending[0]

    def __iter__(self) -> TokenWindows:
        return self

    def __next__(self) -> list[int]:
        while True:
            head = self._head()
            if head is None:
                raise StopIteration
            chunk = head[self._window * self.span : (self._window + 1) * self.span]
            if chunk:
                self._window += 1
                return [self.bos, *chunk]
            self._pending.popleft()
            self._doc, self._window = self._doc + 1, 0


def pad_windows(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token windows of varying length → (ids, attention mask) [N, T], right-padded."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def trainable_activations(model: PreTrainedModel, ids: Tensor, mask: Tensor, input_hook: str,
                          output_hook: str, dtype: torch.dtype = torch.float32
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(token ids [n], x, y [n, L, d]) of the trainable tokens of windows ids/mask [N, T]: one
    forward pass, BOS and padding dropped (models.keep_mask)."""
    from clt_ray.models import extract_activations, keep_mask

    x, y = extract_activations(model, ids, mask, input_hook=input_hook, output_hook=output_hook,
                               dtype=dtype)
    keep = keep_mask(ids, mask)
    return ids[keep], x[keep.to(x.device)], y[keep.to(y.device)]


class LMBlocks(BlockStream):
    """Runs the LM in this process over token windows; each block is the activations of
    `lm_batch_size` windows with BOS and padding dropped (models.keep_mask)."""

    def __init__(self, model: PreTrainedModel, windows: TokenWindows, *, input_hook: str,
                 output_hook: str, lm_batch_size: int, dtype: torch.dtype = torch.float32,
                 pad_id: int = 0) -> None:
        from clt_ray.models import d_model, n_layers

        self.model, self.windows, self.lm_batch_size = model, windows, lm_batch_size
        self.input_hook, self.output_hook, self.dtype, self.pad_id = (
            input_hook, output_hook, dtype, pad_id)
        self.n_layers, self.d_model = n_layers(model), d_model(model)

    def __next__(self) -> Batch:
        rows = [w for _, w in zip(range(self.lm_batch_size), self.windows)]
        if not rows:
            raise StopIteration
        ids, mask = pad_windows(rows, self.pad_id)
        _, x, y = trainable_activations(self.model, ids, mask, self.input_hook, self.output_hook,
                                        self.dtype)
        return x, y

    def state(self) -> State:
        return self.windows.state()

    def restore(self, state: State) -> None:
        self.windows.restore(state)


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
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


# --- building the sources of a run -------------------------------------------------------------


def lm_blocks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
              model_cfg: ModelConfig, heldout: bool, part: tuple[int, int] = (0, 1)) -> LMBlocks:
    """The LM over the training (or held-out) documents; part (i, n): only documents i, i + n, …
    (a data-parallel replica's share)."""
    from clt_ray.models.loading import to_dtype

    docs = SlicedDocuments(make_documents(data, heldout), *part)
    windows = TokenWindows(docs, tokenizer, data.context_size, prefetch=data.lm_batch_size)
    return LMBlocks(model, windows, input_hook=model_cfg.input_hook,
                    output_hook=model_cfg.output_hook, lm_batch_size=data.lm_batch_size,
                    dtype=to_dtype(data.dtype), pad_id=_pad_id(tokenizer))


def lm_source(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
              model_cfg: ModelConfig, batch_size: int) -> ShuffledSource:
    """The training source of a `data.source: lm` config: the LM over the training documents,
    through the shuffle buffer."""
    blocks = lm_blocks(model, tokenizer, data, model_cfg, heldout=False)
    return ShuffledSource(blocks, batch_size, data.shuffle_buffer, seed=data.seed)


def training_source(cfg: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                    part: tuple[int, int] = (0, 1), blocks: BlockStream | None = None
                    ) -> ShuffledSource:
    """The training stream of a run config, or data-parallel replica i's part (i, n) of it:
    `blocks` built by the caller (Ray producers), else the activation cache (every n-th file) or
    the LM in this process (every n-th document), through the shuffle buffer seeded data.seed + i.
    The one place the single-process and the sharded trainer build it."""
    if blocks is None and cfg.data.source == "cache":
        from clt_ray.cache.store import CacheBlocks

        blocks = CacheBlocks(cfg.data.cache, seed=cfg.data.seed,
                             shuffle_files=cfg.data.cache_order == "shuffled", part=part)
    elif blocks is None:
        blocks = lm_blocks(model, tokenizer, cfg.data, cfg.model, heldout=False, part=part)
    return ShuffledSource(blocks, cfg.train.batch_size, cfg.data.shuffle_buffer,
                          seed=cfg.data.seed + part[0])


def heldout_set(cfg: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
                ) -> tuple[Tensor, Tensor, list[Batch]]:
    """A run's held-out windows (ids, mask) and their activations in train.batch_size batches."""
    ids, mask = heldout_windows(tokenizer, cfg.data)
    hx, hy = window_activations(model, ids, mask, cfg.model, cfg.data)
    return ids, mask, split_batches(hx, hy, cfg.train.batch_size)


def heldout_windows(tokenizer: PreTrainedTokenizerBase, data: DataConfig,
                    n_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """Held-out token windows (ids, attention mask) [N, T], right-padded, holding at least
    n_tokens (default data.heldout_tokens) trainable tokens: other documents than training (a
    separate toy seed, or the held-out 1-in-N documents of other corpora)."""
    windows = TokenWindows(make_documents(data, heldout=True), tokenizer, data.context_size,
                           prefetch=data.lm_batch_size)
    need, rows = n_tokens or data.heldout_tokens, []
    for row in windows:
        rows.append(row)
        need -= len(row) - 1
        if need <= 0:
            break
    if not rows:
        raise ValueError("the held-out corpus is empty")
    return pad_windows(rows, _pad_id(tokenizer))


def window_activations(model: PreTrainedModel, ids: Tensor, mask: Tensor, model_cfg: ModelConfig,
                       data: DataConfig) -> Batch:
    """(x, y) [n, L, d] of the trainable tokens (models.keep_mask) of windows ids/mask [N, T]."""
    from clt_ray.models.loading import to_dtype

    xs, ys = [], []
    for i in range(0, len(ids), data.lm_batch_size):
        _, x, y = trainable_activations(model, ids[i : i + data.lm_batch_size],
                                        mask[i : i + data.lm_batch_size], model_cfg.input_hook,
                                        model_cfg.output_hook, to_dtype(data.dtype))
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def model_dims(model_cfg: ModelConfig) -> tuple[int, int, int | None]:
    """(n_layers, d_model, max positions or None) from the model's config file alone (toy models:
    from their recipe, before they are built) — no weights are loaded, so a config can be checked
    against the model before any expensive work."""
    from transformers import AutoConfig

    from clt_ray.models import arch_of
    from clt_ray.models.loading import TOY_PREFIX, _hub_error, resolve_model_path

    if model_cfg.name.startswith(TOY_PREFIX):  # from the recipe: no need to build the model yet
        from clt_ray.toy.recipe import check_arch, default_recipe

        arch = model_cfg.name[len(TOY_PREFIX):]
        check_arch(arch)
        recipe = default_recipe(arch)
        return recipe.n_layer, recipe.d_model, recipe.n_ctx
    path = resolve_model_path(model_cfg.name)
    try:
        hf = AutoConfig.from_pretrained(path, revision=model_cfg.revision)
    except OSError as exc:
        raise _hub_error(model_cfg.name, model_cfg.revision, exc) from exc
    arch_of(hf)
    hf = getattr(hf, "text_config", None) or hf
    return (int(hf.num_hidden_layers), int(hf.hidden_size),
            getattr(hf, "max_position_embeddings", None))


__all__: Sequence[str] = (
    "ActivationSource", "BlockStream", "Documents", "FileDocuments", "HFDocuments", "LMBlocks",
    "ShuffledSource", "TensorBlocks", "TensorSource", "TokenWindows", "ToyDocuments",
    "heldout_set", "heldout_windows", "lm_blocks", "lm_source", "make_documents", "model_dims",
    "split_batches", "take_tokens", "training_source", "window_activations",
)
