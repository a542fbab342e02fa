"""One way to name a location (issue 16, item 1): a local path or a URI through
`fsutil.filesystem`; a URI no filesystem understands, or one given where only a local folder works
yet, is one error naming it — never a local folder named `s3:/…`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from clt_ray.config import toy_config
from clt_ray.fsutil import LocationError, filesystem, local_path, reach
from clt_ray.train.run import train_from_config

EXE = Path(sys.executable).parent / "clt-ray"
ROOT = Path(__file__).resolve().parents[1]


def test_local_paths_and_known_uris_resolve():
    fs, path = filesystem("runs/a")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "runs/a"
    fs, path = filesystem("memory://bucket/cache")  # fsspec's, through pyarrow's bridge
    fs.create_dir(path)
    assert fs.get_file_info(path).type == pafs.FileType.Directory


def test_an_unknown_scheme_is_named():
    with pytest.raises(LocationError, match=r"foo://bar/x: no filesystem understands"):
        filesystem("foo://bar/x")
    with pytest.raises(LocationError, match=r"no filesystem understands the scheme 'foo'"):
        local_path("foo://bar/x", "--run-dir")


def test_an_unreachable_store_is_one_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(LocationError, match="s3://bucket/x: the store cannot be reached.*"
                                            "127.0.0.1:9"):
        reach("s3://bucket/x")


def test_a_missing_bucket_is_one_error_and_never_a_local_folder(tmp_path: Path, s3_server):
    with pytest.raises(LocationError, match="s3://no-such-bucket/run: the bucket "
                                            "'no-such-bucket' does not exist"):
        train_from_config(toy_config("gpt2"), "s3://no-such-bucket/run")
    for args in (["train", "--config", str(ROOT / "examples" / "toy.yaml"), "--run-dir",
                  "s3://no-such-bucket/run"],
                 ["eval", "s3://no-such-bucket/run"],
                 ["export", "s3://no-such-bucket/run/checkpoints/step_000000010",
                  str(tmp_path / "x")],
                 ["serve", "s3://no-such-bucket/run"]):
        out = subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, check=False)
        assert out.returncode == 2, (args, out.stderr)
        assert "'no-such-bucket' does not exist" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "s3:").exists()


def test_a_uri_where_only_a_local_path_works_is_refused_not_made_local(tmp_path: Path):
    out = subprocess.run([str(EXE), "attribute", "--clt", str(tmp_path), "--out",
                          str(tmp_path / "g"), "--prompts-file", "s3://bucket/prompts.txt"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert out.returncode == 2 and "takes a local path" in out.stderr, out.stderr
    assert not (tmp_path / "s3:").exists()
