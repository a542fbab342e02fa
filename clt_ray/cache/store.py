"""The on-disk activation cache: block files plus a JSON manifest, on any pyarrow filesystem.

    <root>/manifest.json          model, hooks, layers, d, quantisation, channel scales, files
    <root>/part-000000.arrows     one encoded block each (`clt_ray.cache.block`: Arrow IPC stream)

`root` is a local path or a URI: pyarrow's own filesystems (`s3://`, `gs://`, `file://`, …) and,
through pyarrow's fsspec bridge, any fsspec filesystem (`memory://`, …). Every file and every
manifest update is written under a temporary name and then moved into place, so a crash leaves
the last complete state. Each file's size and sha256 are in the manifest and checked on read: a
damaged file is an error naming it, never trained on.

`CacheBlocks` is the cache as a `BlockStream` (clt_ray.data): files in a seeded per-epoch order,
resumable at file boundaries; `ShuffledSource` on top shuffles within a token buffer.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from pydantic import Field

from clt_ray import layout
from clt_ray.cache.block import BlockError, decode_block, read_block_table
from clt_ray.config import StrictModel
from clt_ray.data import Batch, BlockStream, State
from clt_ray.errors import CltRayError
from clt_ray.fsutil import filesystem, reach

MANIFEST = layout.CACHE_MANIFEST


class CacheError(CltRayError):
    """A cache that is missing, damaged, or does not match what it is used for."""


class CacheFile(StrictModel):
    name: str
    tokens: int
    bytes: int
    sha256: str


class Manifest(StrictModel):
    """What a cache holds and how it was made; `files` grows as blocks are written."""

    format: Literal["clt-ray-cache"] = "clt-ray-cache"
    version: Literal[1] = 1
    model: str
    revision: str | None = None
    input_hook: str
    output_hook: str
    layers: int = Field(gt=0)
    d_model: int = Field(gt=0)
    bits: Literal[8, 4, 2]
    zstd_level: int | None = None
    corpus: str | None = None
    context_size: int | None = None
    data_seed: int | None = None
    slices: int = Field(default=1, gt=0)
    """Producers that wrote it: file part-SSS-KKKKKK holds file K of slice SSS (documents SSS,
    SSS + slices, …); a resumed cache keeps its slicing."""
    windows_per_file: int | None = None
    x_channel_scale: list[list[float]] | None = None
    y_channel_scale: list[list[float]] | None = None
    stats: dict[str, list[float]] = Field(default_factory=dict)
    """Normalisation statistics (e.g. mean squared norm per layer) for the trainer's init."""
    files: list[CacheFile] = Field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    def same_source(self, other: Manifest) -> list[str]:
        """The fields (other than files and stats) on which two manifests disagree."""
        skip = {"files", "stats"}
        a, b = self.model_dump(exclude=skip), other.model_dump(exclude=skip)
        return [k for k in a if a[k] != b[k]]

    def check_matches(self, *, model: str, input_hook: str, output_hook: str, layers: int,
                      d_model: int) -> None:
        """CacheError naming every field where the cache differs from the model/CLT config."""
        want = {"model": model, "input_hook": input_hook, "output_hook": output_hook,
                "layers": layers, "d_model": d_model}
        bad = [f"{k}: cache has {getattr(self, k)!r}, config has {v!r}"
               for k, v in want.items() if getattr(self, k) != v]
        if bad:
            raise CacheError("the activation cache does not match the run: " + "; ".join(bad))

    def channel_scale(self, which: Literal["x", "y"]) -> torch.Tensor | None:
        rows = self.x_channel_scale if which == "x" else self.y_channel_scale
        return None if rows is None else torch.tensor(rows, dtype=torch.float32)


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.tmp" if parent else f".{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


class CacheWriter:
    """Writes blocks into a cache, or resumes one: an existing manifest with the same source is
    kept with its finished files (`has` says which), a different one is an error."""

    def __init__(self, uri: str, manifest: Manifest) -> None:
        self.uri = uri
        self.fs, self.root = filesystem(uri)
        self.fs.create_dir(self.root, recursive=True)
        existing = _load_manifest(self.fs, self.root, uri, missing_ok=True)
        if existing is not None:
            if diff := existing.same_source(manifest):
                raise CacheError(f"{uri} already holds a cache made differently "
                                 f"({', '.join(diff)} differ); choose another directory")
            manifest = existing
        self.manifest = manifest
        self._save()

    def _save(self) -> None:
        _write_atomic(self.fs, f"{self.root}/{MANIFEST}",
                      json.dumps(self.manifest.model_dump(mode="json"), indent=1).encode())

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.manifest.files)

    def write(self, name: str, data: bytes) -> CacheFile:
        """Store one encoded block as file `name` and record it in the manifest (both atomic)."""
        if self.has(name):
            raise CacheError(f"{self.uri}/{name} is already in the cache")
        entry = write_block_file(self.fs, self.root, name, data, self.manifest)
        self.add(entry)
        return entry

    def add(self, entry: CacheFile) -> None:
        """Record a file another process wrote (`write_block_file`) in the manifest."""
        if self.has(entry.name):
            raise CacheError(f"{self.uri}/{entry.name} is already in the cache")
        self.manifest.files.append(entry)
        self._save()


def write_block_file(fs: pafs.FileSystem, root: str, name: str, data: bytes, manifest: Manifest
                     ) -> CacheFile:
    """Write one encoded block as cache file `name` (atomically) after checking it matches the
    cache; the returned entry goes into the manifest (`CacheWriter.add`). Producers on other
    processes call this, the one manifest writer records what they wrote."""
    if "/" in name or name == MANIFEST or name.startswith("."):
        raise ValueError(f"bad cache file name {name!r}")
    _, meta = read_block_table(data)
    if (meta["bits"], meta["layers"], meta["d"]) != (manifest.bits, manifest.layers,
                                                     manifest.d_model):
        raise CacheError(f"block {name} is bits={meta['bits']} layers={meta['layers']} "
                         f"d={meta['d']}; the cache is bits={manifest.bits} layers="
                         f"{manifest.layers} d={manifest.d_model}")
    _write_atomic(fs, f"{root}/{name}", data)
    return CacheFile(name=name, tokens=meta["tokens"], bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest())


def _load_manifest(fs: pafs.FileSystem, root: str, uri: str, missing_ok: bool = False
                   ) -> Manifest | None:
    path = f"{root}/{MANIFEST}"
    try:
        kind = fs.get_file_info(path).type
    except OSError as exc:
        raise CacheError(f"{uri}: the store cannot be reached ({' '.join(str(exc).split())}); "
                         "check its endpoint and credentials (e.g. AWS_ENDPOINT_URL, "
                         "AWS_ACCESS_KEY_ID / AWS_PROFILE)") from None
    if kind == pafs.FileType.NotFound:
        if missing_ok:
            return None
        raise CacheError(f"{uri}: no activation cache here ({MANIFEST} not found)")
    try:
        return Manifest.model_validate_json(_read(fs, path))
    except ValueError as exc:
        raise CacheError(f"{uri}/{MANIFEST}: not a valid clt-ray cache manifest: {exc}") from None


def load_manifest(uri: str) -> Manifest | None:
    """The manifest of the cache at `uri`, or None when there is no cache there yet."""
    fs, root = filesystem(uri)
    return _load_manifest(fs, root, uri, missing_ok=True)


def open_cache(uri: str) -> tuple[pafs.FileSystem, str, Manifest]:
    fs, root = filesystem(uri)
    manifest = _load_manifest(fs, root, uri)
    assert manifest is not None
    return fs, root, manifest


def check_files(uri: str) -> Manifest:
    """The manifest of the cache at `uri`, after checking that every file it lists is there with
    its recorded size: one listing, no file read, so damage is found before training starts
    rather than at the step that reaches the file (sha256 is checked as each file is read)."""
    fs, root, manifest = open_cache(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (OSError, pa.ArrowException) as exc:
        raise CacheError(f"{uri}: cannot list the cache's files ({exc})") from None
    sizes = {info.path.rpartition("/")[2]: info.size for info in infos
             if info.type == pafs.FileType.File}
    missing = [f.name for f in manifest.files if f.name not in sizes]
    wrong = [f"{f.name} ({sizes[f.name]} bytes, the manifest says {f.bytes})"
             for f in manifest.files if f.name in sizes and sizes[f.name] != f.bytes]
    problems = ([f"{len(missing)} missing: {', '.join(missing[:3])}"
                 + (", …" if len(missing) > 3 else "")] if missing else [])
    problems += ([f"{len(wrong)} of the wrong size: {', '.join(wrong[:3])}"
                  + (", …" if len(wrong) > 3 else "")] if wrong else [])
    if problems:
        raise CacheError(f"{uri}: the activation cache is damaged, of its {len(manifest.files)} "
                         f"files {'; '.join(problems)}")
    return manifest


def check_destination(uri: str) -> None:
    """Refuse a cache destination that is an existing file (a cache is a folder) or a store that
    does not answer (one request, before any producer starts)."""
    kind = reach(uri)[2]
    if kind == pafs.FileType.File:
        raise CacheError(f"{uri} is a file; the activation cache is a folder: pass another --out")


def read_file(fs: pafs.FileSystem, root: str, entry: CacheFile, uri: str = "") -> bytes:
    """A cache file's bytes, after checking its size and sha256 against the manifest."""
    where = f"{uri or root}/{entry.name}"
    try:
        data = _read(fs, f"{root}/{entry.name}")
    except (OSError, pa.ArrowException) as exc:
        raise CacheError(f"{where}: cannot be read ({exc})") from None
    if len(data) != entry.bytes:
        raise CacheError(f"{where}: {len(data)} bytes, the manifest says {entry.bytes} (truncated?)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise CacheError(f"{where}: sha256 {digest[:12]}… does not match the manifest's "
                         f"{entry.sha256[:12]}… (the file is corrupt)")
    return data


class CacheBlocks(BlockStream):
    """The cache's blocks as (x, y) [n, L, d] in `dtype`: every file once per epoch, in an order
    seeded by (seed, epoch), or with shuffle_files=False in the order they were written (then a
    cache whose files hold `lm_batch_size` windows replays the live LM stream block for block);
    endless unless `epochs` is given. Resumable at file boundaries. part (i, n): every n-th file
    from the i-th only (a data-parallel replica's share)."""

    def __init__(self, uri: str, *, seed: int = 0, epochs: int | None = None,
                 shuffle_files: bool = True, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", part: tuple[int, int] = (0, 1)) -> None:
        self.uri = uri
        self.fs, self.root, self.manifest = open_cache(uri)
        if not self.manifest.files:
            raise CacheError(f"{uri}: the cache holds no files yet")
        i, n = part
        if n > 1:  # a data-parallel replica reads every n-th file (in name order) only
            names = sorted(f.name for f in self.manifest.files)[i::n]
            if not names:
                raise CacheError(f"{uri}: {len(self.manifest.files)} files cannot be shared by "
                                 f"{n} replicas")
            keep = set(names)
            self.manifest = self.manifest.model_copy(
                update={"files": [f for f in self.manifest.files if f.name in keep]})
        self.seed, self.epochs, self.dtype, self.device = seed, epochs, dtype, device
        self.shuffle_files = shuffle_files
        self.x_scale = self.manifest.channel_scale("x")
        self.y_scale = self.manifest.channel_scale("y")
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> list[CacheFile]:
        files = sorted(self.manifest.files, key=lambda f: f.name)
        if self.shuffle_files:
            random.Random(f"cache/{self.seed}/{epoch}").shuffle(files)
        return files

    def __next__(self) -> Batch:
        if self.index == len(self.manifest.files):
            self.epoch, self.index = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        entry = self._order(self.epoch)[self.index]
        data = read_file(self.fs, self.root, entry, self.uri)
        try:
            block = decode_block(data, x_channel_scale=self.x_scale, y_channel_scale=self.y_scale,
                                 dtype=self.dtype, device=self.device)
        except BlockError as exc:
            raise CacheError(f"{self.uri}/{entry.name}: {exc}") from None
        self.index += 1
        return block.x, block.y

    def state(self) -> State:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: State) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
