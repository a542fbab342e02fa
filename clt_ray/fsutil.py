"""Atomic local writes: write under a temporary name, then rename, so a crash never leaves a
half-written file or folder where a finished one is expected."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_parquet(rows: list[dict], path: str | os.PathLike[str], schema=None,
                         row_group_size: int | None = None) -> Path:
    """Rows as a Parquet file (with `schema`, a pyarrow schema, when given), atomically;
    row_group_size: rows per row group, so a reader of a few rows decodes only their groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, row_group_size=row_group_size)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes `path` only if the block succeeds.

    An existing `path` is replaced (the old one is removed after the new one is in place). On any
    failure — in the block or in the renames — the temporary folder is removed and `path` is
    left as it was. Callers decide whether replacing `path` is safe (export refuses folders that
    are not its own)."""
    path = Path(os.path.abspath(path))  # "." or "x/..": a real name and parent to rename within
    if path.parent == path:
        raise ValueError(f"atomic_dir: {path} has no parent folder to write next to")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        if os.path.lexists(path):
            old = tmp.with_suffix(".old")  # unique, as tmp is
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree, whatever is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) while the block runs: one builder at a
    time across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
