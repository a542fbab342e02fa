"""Packaging: actors/ installs as clt_ray.actors, every package folder is listed, the core never
imports Ray, the console script runs, and the locks (requirements.lock, requirements-test.lock)
match pyproject.toml and the environment they were installed into."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = ["requirements.lock", "requirements-test.lock"]
EXACT = ["ray", "circuit-tracer", "nnsight"]  # client = cluster; circuit-tracer needs nnsight 0.7


def read_lock(name: str) -> list[tuple[Requirement, list[str]]]:
    """The lock's entries as (requirement with its marker, hashes): backslash lines joined,
    comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req, *hashes = line.split("--hash=")
        entries.append((Requirement(req), [h.strip() for h in hashes]))
    return entries


def locked_here(name: str) -> dict[str, str]:
    """name -> pinned version of the lock's entries whose marker holds on this Python/platform."""
    pins = {}
    for req, _ in read_lock(name):
        if req.marker is None or req.marker.evaluate():
            pins[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return pins


def declared(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    deps = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return [Requirement(d) for d in deps]


def makefile_torch_version() -> str:
    makefile = (ROOT / "Makefile").read_text()
    spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.MULTILINE)
    assert spec, "Makefile: TORCH_SPEC ?= torch==VERSION"
    return spec.group(1)


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


@pytest.mark.parametrize("lock", LOCKS)
def test_every_lock_entry_is_pinned_with_hashes_and_torch_is_left_out(lock: str) -> None:
    entries = read_lock(lock)
    assert entries
    for req, hashes in entries:
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", req
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), req
    # torch is the user's build (TORCH_SPEC), installed after the lock
    assert "torch" not in {canonicalize_name(r.name) for r, _ in entries}


@pytest.mark.parametrize(("lock", "extras"), [(LOCKS[0], [None]), (LOCKS[1], [None, "test"])])
def test_lock_holds_every_declared_dependency_within_its_range(lock: str, extras) -> None:
    versions: dict[str, list[str]] = {}
    for req, _ in read_lock(lock):
        versions.setdefault(canonicalize_name(req.name), []).append(
            str(req.specifier).removeprefix("=="))
    for extra in extras:
        for dep in declared(extra):
            name = canonicalize_name(dep.name)
            if name == "torch":
                continue
            assert name in versions, f"{dep} is not in {lock}: run `make lock`"
            for version in versions[name]:  # every Python/platform fork of the lock
                assert dep.specifier.contains(version, prereleases=True), (
                    f"{lock} pins {name}=={version} outside pyproject's {dep}: run `make lock`")


def test_test_lock_has_the_runtime_locks_pins() -> None:
    def pins(lock: str) -> set[tuple[str, str, str]]:
        return {(canonicalize_name(r.name), str(r.specifier), str(r.marker))
                for r, _ in read_lock(lock)}

    runtime, test = pins(LOCKS[0]), pins(LOCKS[1])
    assert runtime <= test, f"pins differ: {sorted(runtime - test)}"


@pytest.mark.parametrize("name", EXACT)
def test_ray_circuit_tracer_and_nnsight_are_pinned_exactly(name: str) -> None:
    (dep,) = [d for d in declared() if canonicalize_name(d.name) == name]
    (spec,) = dep.specifier
    assert spec.operator == "==", dep
    for lock in LOCKS:
        assert locked_here(lock)[name] == spec.version


def test_this_environment_is_the_test_lock() -> None:
    """`make test` installs requirements-test.lock; a package at another version means the
    environment was not made from it (`make .venv/.installed-test` reinstalls)."""
    differ = {}
    for name, version in locked_here(LOCKS[1]).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            differ[name] = (version, have)
    assert not differ, f"locked vs installed: {differ}"


def test_torch_fits_the_lock() -> None:
    """torch is outside the lock, so its dependencies must be locked at versions it accepts:
    the lock's stand-in metadata for torch (pyproject [tool.uv]) names the Makefile's torch, and the
    installed torch (any build: its CUDA wheels come with it) accepts every locked version."""
    stand_ins = PYPROJECT["tool"]["uv"]["dependency-metadata"]
    (stand_in,) = [m for m in stand_ins if m["name"] == "torch"]
    assert stand_in["version"] == makefile_torch_version()
    stand_in_names = {canonicalize_name(Requirement(r).name) for r in stand_in["requires-dist"]}
    pins = locked_here(LOCKS[1])
    needed = [Requirement(r) for r in metadata.requires("torch") or []]
    needed = [r for r in needed if r.marker is None or r.marker.evaluate({"extra": ""})]
    for req in needed:
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
        else:  # only a GPU build's own wheels (nvidia-*, triton, cuda-*) may be outside the lock
            assert re.match(r"(nvidia|triton|cuda)", name), f"torch needs {req}, not in the lock"
            assert name not in stand_in_names


def test_ray_has_the_job_server_and_dashboard() -> None:
    """`ray[default]`: `ray start --head` starts the dashboard and the job server that `ray job`
    talks to (without it: "Cannot include dashboard with missing packages"; the job flow runs in
    tests/test_cluster_jobs.py)."""
    (dep,) = [d for d in declared() if canonicalize_name(d.name) == "ray"]
    assert "default" in dep.extras
    import ray.dashboard.optional_deps  # noqa: F401 - what the dashboard imports, or it is left out
