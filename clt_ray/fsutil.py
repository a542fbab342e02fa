"""Locations and atomic writes. A location a user gives (a cache, a run folder, an output folder)
is a local path or a URI; `filesystem` is the one place that turns it into a pyarrow filesystem,
so every store pyarrow or fsspec knows works alike, with that store's standard settings
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, … for S3 and S3-compatible stores such as
MinIO, R2 or Ceph). Local writes go under a temporary name, then rename, so a crash never leaves a
half-written file or folder where a finished one is expected."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from clt_ray.errors import CltRayError


class LocationError(CltRayError):
    """A location no filesystem understands, or one that cannot be used where it was given."""


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether a location names a filesystem (`s3://…`, `gs://…`, `memory://…`) rather than a
    local path."""
    return "://" in str(location)


def filesystem(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a local path or a URI: pyarrow's own filesystems
    (`s3://`, `gs://`, `hdfs://`, `file://`), then any fsspec filesystem through pyarrow's bridge.
    A URI neither understands is a LocationError naming it — never a local folder named after
    it."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    try:
        return pafs.FileSystem.from_uri(location)
    except OSError as exc:  # S3 resolves the bucket's region: the store answered badly or not
        raise LocationError(f"{location}: the store cannot be reached ({exc}); check its "
                            "endpoint and credentials (e.g. AWS_ENDPOINT_URL, "
                            "AWS_ACCESS_KEY_ID / AWS_PROFILE)") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as arrow_error:
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(location)
        except (ImportError, ValueError) as exc:
            raise LocationError(f"{location}: no filesystem understands this location "
                                f"(pyarrow: {arrow_error}; fsspec: {exc})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def reach(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str, pafs.FileType]:
    """(filesystem, path, what is there) after one request to the store: an endpoint that does not
    answer, refused credentials or a missing bucket is one LocationError here, before any
    work."""
    fs, path = filesystem(location)
    try:
        return fs, path, fs.get_file_info(path).type
    except OSError as exc:
        raise LocationError(f"{location}: the store cannot be reached ({' '.join(str(exc).split())})"
                            "; check its endpoint and credentials (e.g. AWS_ENDPOINT_URL, "
                            "AWS_ACCESS_KEY_ID / AWS_PROFILE)") from None


ARROW_SCHEMES = frozenset({"s3", "gs", "gcs", "hdfs", "viewfs", "file", "abfs", "abfss"})


def check_scheme(location: str) -> None:
    """LocationError unless pyarrow or fsspec knows the URI's scheme (no connection made)."""
    from fsspec.registry import available_protocols

    scheme = location.split("://", 1)[0].lower()
    if scheme not in ARROW_SCHEMES and scheme not in available_protocols():
        raise LocationError(f"{location}: no filesystem understands the scheme {scheme!r}://")


def local_path(location: str | os.PathLike[str], what: str) -> Path:
    """A location that must be local (a folder this command reads or writes with plain file
    calls): a Path, or a LocationError saying that `what` takes no URI — never a local folder
    named `s3:/…`."""
    if is_uri(location):
        check_scheme(str(location))
        raise LocationError(f"{what} {location}: object-storage locations are not supported here "
                            "yet; give a local path (activation caches, `cache --out` and "
                            "`data.cache`, may be URIs)")
    return Path(location)


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
