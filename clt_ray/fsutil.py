"""Locations and atomic writes. A location a user gives (a cache, a run folder, an output folder)
is a local path or a URI; `filesystem` is the one place that turns it into a pyarrow filesystem,
so every store pyarrow or fsspec knows works alike, with that store's standard settings
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, … for S3 and S3-compatible stores such as
MinIO, R2 or Ceph). Local writes go under a temporary name, then rename, so a crash never leaves a
half-written file or folder where a finished one is expected."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

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
    """(filesystem, path, what is there) after one request to the store (two when nothing is
    there: is the bucket?): an endpoint that does not answer, refused credentials or a missing
    bucket is one LocationError here, before any work."""
    fs, path = filesystem(location)
    try:
        kind = fs.get_file_info(path).type
        bucket = path.split("/", 1)[0]
        if (kind == pafs.FileType.NotFound and fs.type_name in ("s3", "gcs") and bucket != path
                and fs.get_file_info(bucket).type == pafs.FileType.NotFound):
            raise LocationError(f"{location}: the bucket {bucket!r} does not exist (or these "
                                "credentials cannot see it)")
        return fs, path, kind
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
        raise LocationError(f"{what} {location}: this takes a local path, not a location in "
                            "a store")
    return Path(location)


# --- staging: a location in a store worked on through a node-local folder ----------------------


def scratch_root() -> Path:
    """Node-local scratch for locations in a store: $CLT_RAY_SCRATCH, else under the temp dir."""
    return Path(os.environ.get("CLT_RAY_SCRATCH") or
                Path(tempfile.gettempdir()) / "clt-ray-scratch")


COPY_THREADS = 8  # files copied at once to or from a store (each a stream of its own)


class Staged:
    """A location worked on through a local folder, so every reader and writer is one
    implementation with plain file calls. A local location is its own folder (`pull`/`push` do
    nothing). A URI gets a fresh folder in node-local scratch: `pull` copies entries from the
    store into it, `push` copies entries back as whole objects (stores have no append or rename:
    what must mark completeness goes in `last`, written after the rest), `close` removes it (also
    at exit). `what` names the location in errors."""

    def __init__(self, location: str | os.PathLike[str], what: str = "location") -> None:
        self.location, self.what = str(location), what
        self.remote = is_uri(location)
        if self.remote:
            self.fs, self.root = filesystem(self.location)
            scratch_root().mkdir(parents=True, exist_ok=True)
            self.local = Path(tempfile.mkdtemp(prefix="stage-", dir=scratch_root()))
            atexit.register(self.close)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), self.location
            self.local = Path(location)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return self.location

    def uri(self, name: str = "") -> str:
        """The location of entry `name` (a relative path) as the user would write it."""
        return f"{self.location.rstrip('/')}/{name}" if name else self.location

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}" if name else self.root

    def _store_error(self, exc: OSError) -> LocationError:
        return LocationError(f"{self.what} {self.location}: the store failed "
                             f"({' '.join(str(exc).split())})")

    def entries(self, name: str = "") -> list[str]:
        """Names directly under entry `name` (a folder) in the location; [] if it is not one."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._path(name),
                                                            allow_not_found=True))
        except OSError as exc:
            raise self._store_error(exc) from None
        return sorted(info.base_name for info in infos)

    def exists(self, name: str) -> bool:
        try:
            return self.fs.get_file_info(self._path(name)).type != pafs.FileType.NotFound
        except OSError as exc:
            raise self._store_error(exc) from None

    def _files(self, fs: pafs.FileSystem, path: str) -> list[str]:
        """Relative paths of the files under `path` (itself: [""] for a file)."""
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [""]
        if info.type != pafs.FileType.Directory:
            return []
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(i.path[len(path.rstrip("/")) + 1:] for i in found
                      if i.type == pafs.FileType.File)

    def _copy(self, pairs: Iterable[tuple[pafs.FileSystem, str, pafs.FileSystem, str]]) -> None:
        def one(pair: tuple[pafs.FileSystem, str, pafs.FileSystem, str]) -> None:
            src_fs, src, dst_fs, dst = pair
            if isinstance(dst_fs, pafs.LocalFileSystem):
                Path(dst).parent.mkdir(parents=True, exist_ok=True)
            with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(dst) as fout:
                while chunk := fin.read(1 << 24):
                    fout.write(chunk)

        try:
            with ThreadPoolExecutor(COPY_THREADS) as pool:
                list(pool.map(one, list(pairs)))
        except OSError as exc:
            raise self._store_error(exc) from None

    def pull(self, name: str = "") -> bool:
        """Copy entry `name` (a file or folder tree) from the store into the local folder;
        False if the store has no such entry."""
        if not self.remote:
            return (self.local / name).exists()
        src = self._path(name)
        try:
            files = self._files(self.fs, src)
        except OSError as exc:
            raise self._store_error(exc) from None
        local = pafs.LocalFileSystem()
        self._copy((self.fs, f"{src}/{f}" if f else src, local,
                    str(self.local / name / f) if f else str(self.local / name)) for f in files)
        return bool(files)

    def push(self, name: str = "", last: Iterable[str] = ()) -> None:
        """Copy local entry `name` (a file or folder tree) to the store; the files named in
        `last` (relative to it) after every other."""
        if not self.remote:
            return
        src = self.local / name
        local = pafs.LocalFileSystem()
        files = self._files(local, str(src))
        late = [f for f in files if f in set(last)]

        def pairs(names: list[str]) -> Iterator[tuple[pafs.FileSystem, str, pafs.FileSystem, str]]:
            for f in names:
                yield (local, str(src / f) if f else str(src), self.fs,
                       self._path(f"{name}/{f}".strip("/") if f else name))

        self._copy(pairs([f for f in files if f not in late]))
        self._copy(pairs(late))

    def remove(self, name: str, local: bool = True) -> None:
        """Delete entry `name` (a file or folder tree) in the store (and locally, unless
        local=False)."""
        if self.remote:
            try:
                info = self.fs.get_file_info(self._path(name))
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(self._path(name))
                elif info.type == pafs.FileType.File:
                    self.fs.delete_file(self._path(name))
            except OSError as exc:
                raise self._store_error(exc) from None
        if local:
            _remove(self.local / name)

    def close(self) -> None:
        """Remove the scratch folder of a URI (a local location is left as it is)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


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


def atomic_write_parquet(rows: Any, path: str | os.PathLike[str], schema: Any = None,
                         row_group_size: int | None = None) -> Path:
    """Rows (a list of dicts, or a pyarrow Table: large outputs stay in Arrow, since Python
    objects of 73,728 features' top-k rows took > 20 GB) as a Parquet file (with `schema`, a
    pyarrow schema, when given), written under a temporary name in the same folder, then renamed;
    row_group_size: rows per row group, so a reader of a few rows decodes only their groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    if schema is not None and isinstance(rows, pa.Table):
        table = table.select(schema.names).cast(schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


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
