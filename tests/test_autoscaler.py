"""Elastic training on Ray's fake-node autoscaler (docs/design.md §3, issue 16): a cluster that
starts with no worker nodes, its head with no CPUs, so every shard worker needs a node the
autoscaler adds. `clt-ray train --shards 2` (the CLI, in a subprocess) makes it add two and
finishes; with `--min-shards 1`, a node taken away mid-run leaves a 1-shard run that finishes.

A node is taken away as an operator shrinks a cluster: the worker type's `max_workers` lowered to
1 in the live autoscaling config. The autoscaler then terminates one node itself (the fake
provider kills its raylet and everything under it) and, held to one node, cannot add it back.
Which node each shard worker ran on is read from the processes themselves: the fake provider
puts its node id in the environment of everything a worker node runs (tests/fake_cluster.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fake_cluster import FakeCluster
from test_cache_produce import config

from clt_ray.train.checkpoint import load_checkpoint, read_manifest

pytestmark = pytest.mark.slow
TRAIN_WORKER = "RayTrainWorker"  # Ray Train's actor class: one per shard


@pytest.fixture(scope="module")
def cluster():
    """The cluster: a head with no CPUs, up to 2 worker nodes of 1 CPU (one shard each)."""
    c = FakeCluster({"CPU": 1}, max_workers=2)
    try:
        yield c.start()
    finally:
        c.shutdown()
    assert not c.processes(), "processes of the fake cluster outlived it"


def train(cluster: FakeCluster, model_dir: Path, run_dir: Path, *args: str, steps: int,
          checkpoint_every: int, log_every: int,
          watch: Callable[[set[str], dict[int, str]], None] = lambda nodes, workers: None,
          env: dict[str, str] | None = None) -> str:
    """`clt-ray train … --address <cluster>` in a subprocess; while it runs, `watch` is called
    every 0.5 s with the worker nodes up and the shard workers (pid → node). Its output."""
    cfg = config(model_dir)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "steps": steps, "checkpoint_every": checkpoint_every, "keep_checkpoints": 100,
        "log_every": log_every})})
    cfg_path = run_dir.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    log = run_dir.with_suffix(".log")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clt_ray.cli", "train", "--config", str(cfg_path),
             "--run-dir", str(run_dir), "--address", cluster.address, *args],
            env={**cluster.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            while proc.poll() is None and time.monotonic() < deadline:
                watch(*cluster.snapshot(TRAIN_WORKER))
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text(errors="replace")
    assert proc.wait() == 0, text[-4000:] + cluster.logs()
    assert f"finished at step {steps}" in text, text[-4000:]
    return text


def test_two_shards_make_the_autoscaler_add_two_nodes(cluster, tiny_lm_dir, tmp_path: Path):
    assert cluster.worker_nodes() == set()  # no worker node yet
    ran_on: set[str] = set()
    t0 = time.monotonic()
    train(cluster, tiny_lm_dir, tmp_path / "run", "--shards", "2", steps=8, checkpoint_every=4,
          log_every=2, watch=lambda nodes, workers: ran_on.update(workers.values()))
    print(f"2-shard run on an empty autoscaling cluster: {time.monotonic() - t0:.1f} s")
    added = cluster.worker_nodes()
    assert len(added) == 2, cluster.logs()  # the autoscaler added one node per shard
    assert ran_on == added  # each shard worker ran on a node the autoscaler added, none on the head
    final = load_checkpoint(tmp_path / "run")
    assert final.state.step == 8 and final.model.is_whole
    manifest = read_manifest(tmp_path / "run" / "checkpoints" / "step_000000008")
    assert manifest["shards"] == [[0, 16], [16, 32]]  # written by two shards


def test_an_elastic_run_that_loses_a_node_finishes_on_one_shard(cluster, tiny_lm_dir,
                                                                 tmp_path: Path):
    steps, every = 200, 20
    cluster.set_workers(2, 2)  # two nodes before the run (the test above leaves them up)
    deadline = time.monotonic() + 90
    while len(two := cluster.worker_nodes()) < 2:
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.3)
    run = tmp_path / "run"
    # a checkpoint surely complete: the next one has begun (Ray Train merges the shards' parts)
    trigger = run / "checkpoints" / f"step_{2 * every:09d}"
    before: set[str] = set()
    after: set[str] = set()
    nodes_after: set[str] = set()
    event: dict[str, float | bool] = {}

    def watch(nodes: set[str], workers: dict[int, str]) -> None:
        """Once the run has 2 shard workers and a checkpoint, hold the worker type to one node:
        the autoscaler terminates one. Then record which nodes are up and where workers run."""
        if "removed" not in event:
            before.update(workers.values())
            if "shrunk" not in event and len(workers) == 2 and trigger.exists():
                cluster.set_workers(0, 1)
                event["shrunk"] = time.monotonic()
            elif "shrunk" in event and len(nodes) < 2 and len(cluster.worker_nodes()) < 2:
                event["removed"] = time.monotonic()  # its raylet has ended (two scans agree)
                event["mid_run"] = not (run / "checkpoints" / f"step_{steps:09d}").exists()
        else:
            after.update(workers.values())
            nodes_after.update(nodes)

    t0 = time.monotonic()
    train(cluster, tiny_lm_dir, run, "--shards", "2", "--min-shards", "1", steps=steps,
          checkpoint_every=every, log_every=5, watch=watch,
          # a restart first tries both shards again on Ray Train's stale view of the cluster
          # (refreshed every 20 s), until the worker group's start times out
          env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"})
    print(f"elastic run that lost a node: {time.monotonic() - t0:.1f} s; the node went "
          f"{event.get('removed', 0) - event.get('shrunk', 0):.1f} s after the shrink")
    assert event.get("mid_run"), (event, cluster.logs())  # the node went while it trained
    # the autoscaler took it away, for the new maximum
    assert "Terminating the node" in cluster.autoscaler_log()
    assert "(max_workers_per_type)" in cluster.autoscaler_log()
    assert before == two, (before, two)  # 2 shards, one on each node
    left = cluster.worker_nodes()
    assert len(left) == 1 and left < two, (left, two)
    assert nodes_after == left, nodes_after  # none was added back
    assert after == left, after  # the restarted shard ran on the node that was left

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    restarts = [r for r in records if r["kind"] == "restart"]
    assert restarts and restarts[-1]["after_failure"] and restarts[-1]["shards"] == 1, restarts
    resumed = read_manifest(run / "checkpoints" / f"step_{restarts[0]['step']:09d}")
    assert resumed["shards"] == [[0, 16], [16, 32]]  # it went on from a 2-shard checkpoint
    assert read_manifest(run / "checkpoints" / f"step_{steps:09d}")["shards"] == [[0, 32]]
    final = load_checkpoint(run)
    assert final.state.step == steps and final.model.is_whole
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(5, steps + 1, 5))
