"""Connecting to Ray, for every command: an address, a local Ray that already runs, or a new one;
the reaper that ends a new local Ray with its driver, however the driver ends; and the environment
a worker process needs from the driver's.

Ray ends the GCS and the raylet it starts with the driver (they die with it, even on SIGKILL), but
not at once everything under them: the raylet's agents (DashboardAgent, RuntimeEnvAgent) first
report the raylet's death to the GCS, which is dead too, and wait 60 s for the answer; idle
workers notice within seconds. Measured on a killed `clt-ray autointerp`: the agents outlived it
by 60 s. So a driver that starts a local Ray also starts a reaper (`python -m
clt_ray.actors.ray_session`, no Ray import: psutil only), which lists that Ray's processes every
second and ends them when the driver's pipe closes: within ~3 s of a SIGKILL. A worker the raylet
forked in the driver's last second, orphaned before it was listed, is found by the token every
process of that Ray inherits in its environment (`REAP_ENV`, set only while `ray.init` starts it).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import uuid

import psutil

from clt_ray.errors import CltRayError

# What a producer process needs from the driver's environment (the toy models' cache folder,
# offline hub flags).
FORWARDED_ENV = ("CLT_RAY_CACHE", "CLT_RAY_TOY_SEED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_HOME", "HF_DATASETS_OFFLINE")

REAP_ENV = "CLT_RAY_REAP_TOKEN"
"""Environment variable marking the processes of a local Ray this driver started."""
REAP_GRACE_S = 3.0
"""SIGTERM, then this long before SIGKILL."""

_reapers: list[subprocess.Popen] = []  # their stdin pipes stay open while this driver lives


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address`, or to a local Ray that already runs, or start one
    (which ends with this process: see the module's docstring); `address="local"` always starts
    a new one. An address that does not answer
    is a clear error within seconds (Ray itself retries for about a minute)."""
    import ray  # here, not above: the reaper runs this module without Ray

    if ray.is_initialized():
        return
    # Workers' logs (Ray Train's controller chatter included) reach the terminal only when
    # debugging; errors still come back as exceptions, metrics through the driver.
    quiet = {"log_to_driver": bool(os.environ.get("CLT_RAY_DEBUG")),
             "logging_level": "DEBUG" if os.environ.get("CLT_RAY_DEBUG") else "WARNING"}
    if address and address != "local":
        check_reachable(address)
        ray.init(address=address, **quiet)
        return
    if address != "local":  # "auto" finds any Ray running on this machine
        try:
            ray.init(address="auto", **quiet)
            return
        except ConnectionError:
            pass
    before = {p.pid for p in psutil.Process().children()}
    token = os.environ[REAP_ENV] = uuid.uuid4().hex  # inherited by all of Ray's processes
    try:
        ray.init(address="local", include_dashboard=False, **quiet)
    finally:
        del os.environ[REAP_ENV]  # not by this driver's later children
    started = [p.pid for p in psutil.Process().children() if p.pid not in before]
    start_reaper(token, started)


def start_reaper(token: str, roots: list[int]) -> None:
    """Have the processes `roots` (those ray.init started), all their descendants and every
    process whose environment holds `token` ended when this process ends, by whatever means."""
    _reapers.append(subprocess.Popen(
        [sys.executable, "-m", "clt_ray.actors.ray_session", token, *map(str, roots)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True))  # not in the terminal's process group: Ctrl-C is the driver's


def reap(token: str, roots: list[int]) -> None:
    """The reaper: while stdin (the driver's pipe) is open, record every second the processes of
    `roots` and their descendants; then end whichever of them still run, and any other process
    carrying `token` in its environment. psutil.Process objects know their start time, so a pid
    reused meanwhile is never signalled."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen: dict[int, psutil.Process] = {}
    for pid in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            seen[pid] = psutil.Process(pid)
    tops = list(seen.values())
    while True:
        for top in tops:
            try:
                for p in top.children(recursive=True):
                    seen.setdefault(p.pid, p)
            except psutil.Error:  # gone: its descendants are already recorded
                pass
        if select.select([sys.stdin], [], [], 1.0)[0]:  # readable: EOF, the driver has ended
            break
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and p.environ().get(REAP_ENV) == token:
                seen.setdefault(p.pid, p)
    alive = [p for p in seen.values() if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=REAP_GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """CltRayError unless host:port (or ray://host:port) accepts a TCP connection."""
    if address == "auto" or address.startswith("local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise CltRayError(f"Ray address {address!r} is not host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise CltRayError(f"no Ray cluster answers at {address} ({exc}); start one with "
                          "`ray up cluster.yaml` or `ray start --head`, or drop --address to use "
                          "a local Ray") from None


if __name__ == "__main__":
    reap(sys.argv[1], [int(pid) for pid in sys.argv[2:]])
