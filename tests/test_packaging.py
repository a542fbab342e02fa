"""Packaging: actors/ installs as clt_ray.actors, every package folder is listed, the core never
imports Ray, and the console script runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_actors_is_the_clt_ray_actors_subpackage() -> None:
    import clt_ray.actors

    assert Path(clt_ray.actors.__file__).resolve().parent == ROOT / "actors"


def test_every_package_folder_is_listed_in_pyproject() -> None:
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "clt_ray").rglob("__init__.py")
    } | {
        "clt_ray.actors" + "".join("." + s for s in p.parent.relative_to(ROOT / "actors").parts)
        for p in (ROOT / "actors").rglob("__init__.py")
    }
    assert found == listed, f"pyproject packages differ: missing {found - listed}, extra {listed - found}"


def test_console_script_lists_commands() -> None:
    exe = Path(sys.executable).parent / "clt-ray"
    out = subprocess.run([str(exe), "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("toy", "demo"):
        assert command in out.stdout


def test_console_script_reports_user_errors_in_one_line() -> None:
    exe = Path(sys.executable).parent / "clt-ray"
    out = subprocess.run([str(exe), "toy", "build", "--arch", "bert"], check=False,
                         capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "'bert' is not one of" in out.stderr and "Traceback" not in out.stderr
