"""clt_ray.fsutil.atomic_dir: a folder appears whole or not at all, and a failure anywhere —
in the block or in the renames — leaves the old folder and no temporary one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clt_ray import fsutil
from clt_ray.fsutil import atomic_dir


def test_replaces_an_existing_folder_only_on_success(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["old"]
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["new"]


def test_a_failed_rename_restores_the_old_folder(tmp_path: Path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    real, calls = os.replace, []

    def failing(src, dst):
        calls.append(src)
        if len(calls) == 2:  # moving the new folder into place
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["old"]


def test_dot_is_the_current_folder_by_its_real_name(tmp_path: Path, monkeypatch):
    """`atomic_dir(".")` once made `./..xxxx.tmp` inside the folder and then failed to rename
    "." — leaving the temporary folder behind."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with atomic_dir(".") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".work.")
        (tmp / "f").write_text("x")
    assert os.listdir(tmp_path) == ["work"] and os.listdir(work) == ["f"]
    monkeypatch.chdir(work)  # the folder the process was in was replaced
    with atomic_dir("sub/../other") as tmp:  # a normalised name too
        assert tmp.parent == work
    assert sorted(os.listdir(work)) == ["f", "other"]
