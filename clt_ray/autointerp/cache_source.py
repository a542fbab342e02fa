"""Feature statistics over an activation cache instead of the LM: the CLT inputs come from the
cache's blocks (no forward passes), the windows' context from re-tokenising the corpus the cache
records — cheap next to the LM, and a block stores only its trainable tokens, not where one
window ends and the next begins.

File part-SSS-KKKKKK holds windows [K·W, (K+1)·W) of slice SSS (cache/produce.py), so the windows
of any file are known without reading it; every file's token ids are checked against them when it
is read, so a cache that does not match its record fails with a clear error, not wrong examples.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from clt_ray.cache.block import decode_block
from clt_ray.cache.produce import slice_windows, window_groups
from clt_ray.cache.store import CacheError, CacheFile, Manifest, open_cache, read_file
from clt_ray.config import DataConfig
from clt_ray.data import pad_id, pad_windows
from clt_ray.lm import keep_mask

FILE_NAME = re.compile(r"part-(\d{3})-(\d{6})\.arrows$")


@dataclass
class CacheWindows:
    """The first files of a cache (up to a token budget) and their windows, in file order."""

    uri: str
    manifest: Manifest
    files: list[CacheFile]
    first_window: list[int]
    """Global index of each file's first window (and the total at the end)."""
    ids: Tensor
    """[N, T] every window: BOS, its tokens, right padding."""
    mask: Tensor

    def file_of(self, window: int) -> int:
        return bisect.bisect_right(self.first_window, window) - 1

    def chunks(self) -> list[tuple[int, int]]:
        """[first, stop) windows of each file: the unit of the top-k pass."""
        return list(zip(self.first_window[:-1], self.first_window[1:]))


def cache_windows(uri: str, data: DataConfig, tokenizer, tokens: int) -> CacheWindows:
    """The cache's files in manifest order until `tokens` trainable tokens, with their windows.
    data: the run's data config; the corpus, context size and seed are the cache's own."""
    _, _, m = open_cache(uri)
    if m.corpus is None or m.context_size is None or m.windows_per_file is None:
        raise CacheError(f"{uri}: the manifest does not record its corpus, context size and "
                         "windows per file, so its windows cannot be shown; use the held-out "
                         "text source (topk.source: heldout)")
    data = data.model_copy(update={"corpus": m.corpus, "context_size": m.context_size,
                                   "seed": m.data_seed if m.data_seed is not None else data.seed})
    files, total = [], 0
    for entry in m.files:
        if total >= tokens:
            break
        files.append(entry)
        total += entry.tokens
    if not files:
        raise CacheError(f"{uri}: the cache holds no files")
    wanted: dict[int, set[int]] = {}
    for entry in files:
        match = FILE_NAME.search(entry.name)
        if match is None:
            raise CacheError(f"{uri}: file name {entry.name!r} is not part-SSS-KKKKKK.arrows")
        wanted.setdefault(int(match[1]), set()).add(int(match[2]))
    rows_of: dict[str, list[list[int]]] = {}
    for s, ks in wanted.items():
        last = max(ks)
        for k, rows in window_groups(slice_windows(data, tokenizer, s, m.slices),
                                     m.windows_per_file):
            if k in ks:
                rows_of[f"part-{s:03d}-{k:06d}.arrows"] = rows
            if k >= last:
                break
    rows, first = [], [0]
    for entry in files:
        got = rows_of.get(entry.name, [])
        if sum(len(r) - 1 for r in got) != entry.tokens:
            raise CacheError(f"{uri}/{entry.name}: holds {entry.tokens} tokens, but its windows of "
                             f"the recorded corpus {m.corpus!r} have {sum(len(r) - 1 for r in got)}"
                             " (was the cache made from another corpus or tokenizer?)")
        rows += got
        first.append(len(rows))
    ids, mask = pad_windows(rows, pad_id(tokenizer))
    return CacheWindows(uri, m, files, first, ids, mask)


def file_inputs(src: CacheWindows, index: int) -> Tensor:
    """CLT inputs x [W, T, L, d] of file `index`'s windows (zero at BOS and padding)."""
    fs, root, _ = open_cache(src.uri)
    entry, m = src.files[index], src.manifest
    block = decode_block(read_file(fs, root, entry, src.uri),
                         x_channel_scale=m.channel_scale("x"), y_channel_scale=None)
    a, b = src.first_window[index], src.first_window[index + 1]
    valid = keep_mask(src.ids[a:b], src.mask[a:b])
    if not torch.equal(block.token_ids, src.ids[a:b][valid]):
        raise CacheError(f"{src.uri}/{entry.name}: its token ids differ from the windows of the "
                         f"recorded corpus {m.corpus!r}")
    x = torch.zeros(b - a, src.ids.shape[1], *block.x.shape[1:])
    x[valid] = block.x.float()
    return x


def window_inputs(src: CacheWindows, windows: Tensor) -> Tensor:
    """x [len(windows), T, L, d] of any windows, reading each file they are in once."""
    out: Tensor | None = None
    by_file: dict[int, list[int]] = {}
    for j, w in enumerate(windows.tolist()):
        by_file.setdefault(src.file_of(w), []).append(j)
    for f, slots in by_file.items():
        x = file_inputs(src, f)
        if out is None:
            out = torch.zeros(len(windows), *x.shape[1:])
        out[slots] = x[windows[slots] - src.first_window[f]]
    assert out is not None
    return out
