"""Ray's fake-node autoscaler as a test cluster (docs/design.md §3, issue 16): `ray start --head`
with an autoscaling config whose provider is `fake_multinode`, a head with no CPUs, and a worker
node type the autoscaler starts and stops as a cloud provider would start VMs — each "node" a
raylet on this machine that the autoscaler's monitor process starts (`ray._private.node.Node`, in
the fake provider's `create_node_with_resources_and_labels`) and kills on termination.

Not `ray.cluster_utils.AutoscalingCluster`: in Ray 2.60 its base config is not in the wheel, and
its start() and shutdown() run `ray stop --force`, which ends every Ray on the machine. This one
lives apart from any other Ray here:
- its own ports: the GCS on a free port (the fake provider's `gcs_address`; without it the
  provider assumes 6379), the client server and the dashboard on free ports too;
- its own temp dir (`RAY_TMPDIR`), so its `ray_current_cluster` file never points another
  process's `ray.init()` at it, not even after it is gone;
- its own processes, ended exactly: `ray start --block` runs in a process group of its own, and
  every process of the cluster (the fake nodes' raylets, which the monitor starts, and the
  workers they fork into groups of their own) inherits a token in its environment; teardown
  signals that group, then the project's reaper (`clt_ray.actors.ray_session`) ends whatever still
  carries the token — and does so too if the test process itself is killed.
Token authentication (on by default in Ray 2.60) is off for it: `RAY_AUTH_MODE=disabled`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import yaml
from clt_ray.actors.ray_session import REAP_ENV
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

NODE_ID_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"
"""In the environment of each node's processes: the node's id (the fake provider sets it)."""
WORKER_TYPE = "ray.worker.shard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class FakeCluster:
    """A fake-node autoscaling cluster: no worker nodes at first, up to `max_workers` nodes of
    `worker_resources` each, added when tasks, actors or placement groups ask for them."""

    def __init__(self, worker_resources: dict[str, float], max_workers: int) -> None:
        from ray.util import get_node_ip_address

        self.worker_resources, self.max_workers = worker_resources, max_workers
        self.dir = Path(tempfile.mkdtemp(prefix="clt-ray-fake-", dir="/tmp"))  # short: sockets
        self.config_path = self.dir / "autoscaling.yaml"
        self.address = f"{get_node_ip_address()}:{free_port()}"
        self.token = uuid.uuid4().hex
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(self.dir),
                    "RAY_ADDRESS": self.address, REAP_ENV: self.token}
        """The environment of the cluster's processes and of a driver that uses it: Ray's own
        address lookups ("auto", the state API) find this cluster and no other; the token
        marks the process as this cluster's, to be ended with it."""
        self.head: subprocess.Popen | None = None
        self.reaper: subprocess.Popen | None = None

    def config(self, min_workers: int, max_workers: int) -> dict[str, Any]:
        return {
            "cluster_name": "clt-ray-fake",
            "max_workers": max_workers,
            "upscaling_speed": 2.0,
            "idle_timeout_minutes": 5,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "gcs_address": self.address,
                         "launch_multiple": True},  # all the nodes asked for at once
            "head_node_type": "ray.head.default",
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {},
                                     "max_workers": 0},
                WORKER_TYPE: {"resources": {**self.worker_resources,
                                            "object_store_memory": 100_000_000},
                              "node_config": {}, "min_workers": min_workers,
                              "max_workers": max_workers}},
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def set_workers(self, min_workers: int, max_workers: int) -> None:
        """Change the worker type's bounds as an operator would, in the live config file (the
        autoscaler rereads it every update): above the new maximum it terminates nodes, below the
        new minimum it adds them."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config(min_workers, max_workers)))
        os.replace(tmp, self.config_path)

    def start(self, timeout: float = 90.0) -> FakeCluster:
        self.set_workers(0, self.max_workers)
        self.head_log = (self.dir / "head.log").open("w")
        ray = Path(sys.executable).with_name("ray")
        self.head = subprocess.Popen(
            [str(ray), "start", "--head", "--block", f"--port={self.address.rsplit(':', 1)[1]}",
             "--num-cpus=0", "--object-store-memory=100000000", "--include-dashboard=false",
             f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
             "--dashboard-agent-listen-port=0", f"--autoscaling-config={self.config_path}"],
            env={**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
            stdin=subprocess.DEVNULL, stdout=self.head_log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.reaper = subprocess.Popen(
            [sys.executable, "-m", "clt_ray.actors.ray_session", self.token, str(self.head.pid)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        host, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection((host, int(port)), timeout=1).close()
                if self.log_has("Ray runtime started"):
                    return self
            if self.head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fake cluster's head did not start:\n{self.logs()}")
            time.sleep(0.2)

    def log_has(self, text: str) -> bool:
        return text in (self.dir / "head.log").read_text(errors="replace")

    def autoscaler_log(self) -> str:
        path = self.dir / "ray" / "session_latest" / "logs" / "monitor.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, chars: int = 3000) -> str:
        """The tails of the head's output and of the autoscaler's log, for failure messages."""
        out = []
        for path in (self.dir / "head.log",
                     self.dir / "ray" / "session_latest" / "logs" / "monitor.log"):
            if path.exists():
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (those carrying its token), drivers included."""
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get(REAP_ENV) == self.token:
                    found.append(p)
        return found

    def snapshot(self, actor_class: str = "") -> tuple[set[str], dict[int, str]]:
        """In one pass over the processes: the ids of the worker nodes whose raylet runs, and
        the workers now running an actor of class `actor_class` (Ray titles them
        `ray::<class>…`): pid → the id of the node it runs on ("head" on the head)."""
        nodes, actors = set(), {}
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                node = p.environ().get(NODE_ID_ENV, FAKE_HEAD_NODE_ID)
                if p.name() == "raylet":
                    if node != FAKE_HEAD_NODE_ID:
                        nodes.add(node)
                elif actor_class and " ".join(p.cmdline()).startswith(f"ray::{actor_class}"):
                    actors[p.pid] = "head" if node == FAKE_HEAD_NODE_ID else node
        return nodes, actors

    def worker_nodes(self) -> set[str]:
        return self.snapshot()[0]

    def shutdown(self) -> None:
        """End every process of this cluster and remove its temp dir."""
        if self.head is not None:  # SIGKILL: on SIGTERM `ray start --block` lingered 30 s
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.head.pid, signal.SIGKILL)  # its own group: ray start's processes
            self.head.wait()
            self.head_log.close()
        if self.reaper is not None:  # EOF: it ends what still carries the token, and exits
            assert self.reaper.stdin is not None
            self.reaper.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.reaper.wait(timeout=15)
        for p in self.processes():  # a reaper that failed to start, or was too slow
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
