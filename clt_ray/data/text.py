"""Text corpora and token windows (docs/design.md §4): the toy corpus, local .txt/.jsonl/.parquet
files and Hugging Face datasets as documents, split into training and held-out; token windows
that never cross documents: BOS then the next context_size − 1 tokens, the last one right-padded."""

from __future__ import annotations

import itertools
import json
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from clt_ray.config import DataConfig
from clt_ray.data.sources import State
from clt_ray.errors import ConfigError
from clt_ray.toy.corpus import iter_documents

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase



class Documents(ABC):
    """A fixed, ordered sequence of documents (texts) that can be re-read from any index."""

    @abstractmethod
    def iter_from(self, index: int) -> Iterator[str]: ...


class ToyDocuments(Documents):
    """The toy corpus (`clt_ray.toy.corpus.iter_documents`), `n_tokens` tokens a document."""

    def __init__(self, seed: int, n_tokens: int) -> None:
        self.seed, self.n_tokens = seed, n_tokens

    def iter_from(self, index: int) -> Iterator[str]:
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
                yield _text(path.read_bytes(), str(path))
                continue
            if path.suffix == ".parquet":
                yield from _parquet_texts(path, self.text_field)
                continue
            with path.open("rb") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield _json_text(_text(line, f"{path}:{n}"), self.text_field,
                                         f"{path}:{n}")

    def iter_from(self, index: int) -> Iterator[str]:
        raw_index = _split_index(index, self.every, self.heldout)
        raw = self._raw()
        for _ in range(raw_index):
            next(raw, None)
        return _split_filter(raw, raw_index, self.every, self.heldout)


def _text(data: bytes, where: str) -> str:
    """UTF-8 text, or a ConfigError naming the file: a binary file is not a corpus."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data.corpus: {where} is not UTF-8 text (byte {exc.start}: "
                          f"{exc.reason}); is it a binary file?") from None
    if "\x00" in text:
        raise ConfigError(f"data.corpus: {where} holds NUL bytes; is it a binary file?")
    return text


def _json_text(line: str, text_field: str, where: str) -> str:
    try:
        text = json.loads(line)[text_field]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"data.corpus: {where}: not a JSON object with a {text_field!r} field "
                          f"(data.text_field) ({type(exc).__name__}: {exc})") from None
    if not isinstance(text, str):
        raise ConfigError(f"data.corpus: {where}: {text_field!r} is a "
                          f"{type(text).__name__}, not text")
    return text


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


def check_corpus(cfg: DataConfig) -> None:
    """Read the corpus up to its first non-empty training and held-out documents, so a corpus
    that cannot give both (empty, binary, a missing .jsonl field, too few documents for the
    held-out split, a Hugging Face dataset out of reach) is one ConfigError before any model
    loads. Later documents are checked as they are read."""
    if cfg.corpus == "toy":
        return
    for heldout in (False, True):
        split = "held-out" if heldout else "training"
        try:
            first = next((t for t in make_documents(cfg, heldout).iter_from(0) if t.strip()),
                         None)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets/hub errors share no base class
            raise ConfigError(f"data.corpus {cfg.corpus!r}: cannot read its {split} documents "
                              f"({type(exc).__name__}: {exc})") from None
        if first is None:
            raise ConfigError(
                f"data.corpus {cfg.corpus!r} has no non-empty {split} document: every "
                f"data.heldout_every-th ({cfg.heldout_every}) document, the first included, is "
                "held out, so a corpus needs at least 2 (a .txt file is one document; a .jsonl "
                "line or a Parquet row is one)")


def bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start windows with")


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
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
    return pad_windows(rows, pad_id(tokenizer))
