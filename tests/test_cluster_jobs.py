"""The README's cluster commands, run as written on this machine (issue 16): `ray start --head`,
`ray job submit --working-dir . -- clt-ray train … --shards 2 --address auto --run-dir RUN`,
`ray job logs --follow`, `ray job stop` once the first checkpoint is in the run folder, then the
same submit with `--resume`, which completes the run with an uninterrupted run's weights.

Ray 2.60's token authentication is on, as a user has it (README, On a cluster): the token in a
file (`RAY_AUTH_TOKEN_PATH` here stands in for `~/.ray/auth_token`) and `RAY_AUTH_MODE=token` in the
environment of `ray start` and of every `ray job` command. The head is this test's own: free
ports, its own temp dir (so no other Ray on this machine finds it through `auto`), its own process
group, ended at the end. The job's driver and workers inherit `ray start`'s environment: the S3
server's endpoint and keys (conftest.py), the offline hub flags, the venv's `clt-ray` on PATH."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest
import yaml
from test_cache_produce import config
from test_sharded import assert_same_checkpoint

from clt_ray import layout
from clt_ray.fsutil import filesystem
from clt_ray.train.run import train_from_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS, EVERY = 120, 10  # a checkpoint takes seconds here: ~8 of them leave room for the stop
MARKER = "CLT_RAY_TEST_HEAD"  # in the environment of every process of the test's Ray
PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
         "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
         "node-manager-port", "object-manager-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    url: str
    env: dict[str, str]

    def ray(self, *args: str, timeout: float = 300) -> str:
        """`ray ARGS --address URL …` run from the repo root as a user would; its output."""
        command, rest = args[:2], args[2:]
        out = subprocess.run([str(BIN / "ray"), *command, "--address", self.url, *rest],
                             cwd=ROOT, env=self.env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        assert out.returncode == 0, (f"ray {' '.join(args)}:\n"
                                     f"{out.stdout[-3000:]}{out.stderr[-3000:]}")
        return out.stdout + out.stderr

    def follow(self, job: str, log: Path) -> subprocess.Popen:
        """`ray job logs --follow JOB`, its output into `log`: ends when the job does."""
        with log.open("w") as out:  # the child keeps its own copy
            return subprocess.Popen([str(BIN / "ray"), "job", "logs", "--address", self.url,
                                     "--follow", job], cwd=ROOT, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT)

    def status(self, job: str) -> str:
        """`ray job status JOB`: SUCCEEDED, STOPPED, FAILED, or the word it prints for others."""
        out = self.ray("job", "status", job)
        for words, status in (("succeeded", "SUCCEEDED"), ("was stopped", "STOPPED"),
                              ("failed", "FAILED")):
            if f"'{job}' {words}" in out:
                return status
        return re.search(rf"Status for job '{job}': (\w+)", out).group(1)


def _end(proc: subprocess.Popen, marker: str) -> None:
    """End the head's process group, then every process of its Ray left outside it (workers get
    process groups of their own): all of them inherited `marker` in their environment."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):  # SIGTERM drains for up to 30 s
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    left = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(MARKER) == marker:
                p.kill()
                left.append(p)
    psutil.wait_procs(left, timeout=10)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    """`ray start --head` with the dashboard (job server) and token authentication."""
    auth = tmp_path_factory.mktemp("auth") / "auth_token"
    auth.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    auth.chmod(0o600)
    marker = uuid.uuid4().hex
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(auth), MARKER: marker}
    temp_dir = tempfile.mkdtemp(prefix="clt-ray-head-", dir="/tmp")  # short: socket paths
    ports = {name: free_port() for name in PORTS}
    log = Path(temp_dir) / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--temp-dir",
             temp_dir, "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
             *(f"--{name}={port}" for name, port in ports.items())],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                request = urllib.request.Request(f"{url}/api/version", headers={
                    "Authorization": f"Bearer {auth.read_text()}"})
                urllib.request.urlopen(request, timeout=5).close()
                break
            except (urllib.error.URLError, OSError):
                assert proc.poll() is None, f"ray start ended:\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"no dashboard:\n{log.read_text()[-4000:]}"
                time.sleep(0.5)
        yield Head(url, env)
    finally:
        _end(proc, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def complete_checkpoints(run: str) -> list[int]:
    """Steps of the run folder's checkpoints that have their manifest (written last), in a local
    folder or a store alike."""
    fs, root = filesystem(run)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{layout.CHECKPOINTS}",
                                               allow_not_found=True))
    steps = []
    for info in infos:
        name = info.path.rsplit("/", 1)[-1]
        manifest = f"{info.path}/{layout.CHECKPOINT_MANIFEST}"
        if name.startswith("step_") and fs.get_file_info(manifest).type == pafs.FileType.File:
            steps.append(int(name.removeprefix("step_")))
    return sorted(steps)


def test_readme_job_flow_stop_then_resume_ends_like_an_uninterrupted_run(
        head: Head, s3_bucket: str, tiny_lm_dir, tmp_path: Path):
    started = time.monotonic()
    cfg = config(tiny_lm_dir)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": 3, "log_every": EVERY})})
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = f"{s3_bucket}/runs/toy"  # no node's disk: the run folder is in the store
    submit = ["job", "submit", "--working-dir", ".", "--no-wait", "--", "clt-ray", "train",
              "--config", str(cfg_path), "--shards", "2", "--address", "auto", "--run-dir", run]

    job = re.search(r"raysubmit_\w+", head.ray(*submit)).group(0)
    logs = head.follow(job, tmp_path / "first.log")
    deadline = time.monotonic() + 300
    while not complete_checkpoints(run):
        assert logs.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-4000:]
        time.sleep(0.2)
    first_checkpoint_s = time.monotonic() - started
    head.ray("job", "stop", job)
    logs.wait(timeout=60)  # --follow ends with the job
    assert head.status(job) == "STOPPED"
    at_stop = complete_checkpoints(run)
    assert at_stop and at_stop[-1] < STEPS, at_stop  # stopped partway
    first = (tmp_path / "first.log").read_text()
    assert "run dir:" in first and "finished at step" not in first, first[-3000:]
    stopped_s = time.monotonic() - started

    job = re.search(r"raysubmit_\w+", head.ray(*submit, "--resume")).group(0)
    logs = head.follow(job, tmp_path / "resumed.log")
    logs.wait(timeout=600)
    resumed = (tmp_path / "resumed.log").read_text()
    assert head.status(job) == "SUCCEEDED", resumed[-4000:]
    assert "resuming" in resumed and f"finished at step {STEPS} of {STEPS}" in resumed, \
        resumed[-3000:]
    resumed_s = time.monotonic() - started

    ref = train_from_config(cfg, tmp_path / "uninterrupted", log=lambda s: None, splice=False)
    final = f"{run}/{layout.CHECKPOINTS}/{layout.checkpoint_name(STEPS)}"
    # the same floats up to the 2-shard sum's round-off (as tests/test_fault_tolerance.py)
    assert_same_checkpoint(ref.checkpoint, final, atol=1e-5, threshold_atol=2e-3,
                           counters=False)
    print(json.dumps({"stopped_with": at_stop, "first_checkpoint_s": round(first_checkpoint_s),
                      "stopped_s": round(stopped_s), "resumed_s": round(resumed_s),
                      "total_s": round(time.monotonic() - started)}))
