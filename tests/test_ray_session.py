"""actors.ray_session: a local Ray that a command started goes with it, even when the command is
killed (SIGKILL: nothing of the driver's own code runs)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import yaml

EXE = Path(sys.executable).parent / "clt-ray"


def session_processes(ray_tmp: Path, marker: str) -> list[psutil.Process]:
    """The live processes of the Ray whose temp folder is `ray_tmp`: any with the marker in its
    environment (what the driver's children inherit) or a file open or named under the folder
    (Ray's agents rewrite their environment block with their process title, not their logs)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            ours = (p.environ().get("CLT_RAY_TEST_MARK") == marker
                    or any(f.path.startswith(str(ray_tmp)) for f in p.open_files())
                    or any(str(ray_tmp) in arg for arg in p.cmdline()))
        except psutil.Error:
            continue
        if ours:
            found.append(p)
    return found


def names(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(" ".join(p.cmdline())[:80] or p.name())
        except psutil.Error:
            pass
    return sorted(out)


def test_killed_driver_takes_the_ray_it_started_with_it(toy_clt, tmp_path):
    """`clt-ray autointerp` starts its own local Ray (no Ray runs under its temp folder), is
    SIGKILLed mid-job, and within 20 s nothing of that Ray runs any more (Ray's own agents
    outlived the driver by 60 s)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="crk", dir="/tmp"))  # short: Ray's socket paths
    marker = uuid.uuid4().hex
    cfg = {"checkpoint": str(toy_clt.parent / "run"), "out": str(tmp_path / "out"),
           "features": {"ranges": [[0, 64]]}, "topk": {"tokens": 4_000_000, "chunk_windows": 4},  # minutes: killed long before its end
           "actors": 1, "cpus_per_actor": 0.5}
    path = tmp_path / "autointerp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp),
           "CLT_RAY_TEST_MARK": marker}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([str(EXE), "autointerp", "--config", str(path), "--topk-only",
                               "--address", "local"],  # not the session's Ray (auto finds it)
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, ray_up = time.monotonic() + 180, None
        while True:  # until the job's actor runs (every kind of Ray process is up by then)
            running = names(session_processes(ray_tmp, marker))
            if ray_up is None and any("raylet" in n for n in running):
                ray_up = time.monotonic()
            if any("MapWorker" in n for n in running) or (
                    ray_up is not None and time.monotonic() - ray_up > 20):
                break
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, running
            time.sleep(0.5)
        assert any("raylet" in n for n in running) and any("Agent" in n for n in running), running
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        killed = time.monotonic()
        while (left := session_processes(ray_tmp, marker)) and time.monotonic() - killed < 20:
            time.sleep(0.5)
        assert names(left) == [], f"still running {time.monotonic() - killed:.0f} s after the kill"
    finally:
        if driver.poll() is None:
            driver.kill()
        for p in session_processes(ray_tmp, marker):
            try:
                p.kill()
            except psutil.Error:
                pass
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
