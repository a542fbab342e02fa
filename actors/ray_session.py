"""Connecting to Ray, for every command: an address, a local Ray that already runs, or a new one;
and the environment a worker process needs from the driver's."""

from __future__ import annotations

import os
import socket

import ray

from clt_ray.errors import CltRayError

# What a producer process needs from the driver's environment (the toy models' cache folder,
# offline hub flags).
FORWARDED_ENV = ("CLT_RAY_CACHE", "CLT_RAY_TOY_SEED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_HOME", "HF_DATASETS_OFFLINE")


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address`, or to a local Ray that already runs, or start one.
    An address that does not answer is a clear error within seconds (Ray itself retries for
    about a minute)."""
    if ray.is_initialized():
        return
    # Workers' logs (Ray Train's controller chatter included) reach the terminal only when
    # debugging; errors still come back as exceptions, metrics through the driver.
    quiet = {"log_to_driver": bool(os.environ.get("CLT_RAY_DEBUG")),
             "logging_level": "DEBUG" if os.environ.get("CLT_RAY_DEBUG") else "WARNING"}
    if address:
        check_reachable(address)
        ray.init(address=address, **quiet)
        return
    try:
        ray.init(address="auto", **quiet)
    except ConnectionError:
        ray.init(include_dashboard=False, **quiet)


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
