"""Losing a node mid-run (docs/design.md §3): a 2-node `ray.cluster_utils.Cluster`, one shard per node;
the node of one shard is removed after a few checkpoints (with the run folder in the S3-protocol
store and a scratch folder per node, when a node comes back). The run continues from the last
registered checkpoint and reaches the configured step count — with 2 shards again when a node
comes back (then it ends with the uninterrupted run's weights), or resliced to 1 shard when none
does (no feature lost, the loss goes on from where it was). Each scenario runs in its own
process, with its own Ray (tests/node_loss_scenario.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cache_produce import config
from test_sharded import assert_same_checkpoint

from clt_ray.fsutil import filesystem
from clt_ray.train.checkpoint import load_checkpoint
from clt_ray.train.run import train_from_config

pytestmark = pytest.mark.slow
SCENARIO = Path(__file__).with_name("node_loss_scenario.py")


def lose_a_node(model_dir: Path, run_dir: Path | str, mode: str, *extra: str
                ) -> tuple[dict, list[dict]]:
    out = subprocess.run([sys.executable, str(SCENARIO), str(model_dir), str(run_dir), mode,
                          *extra], check=False, capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(lines[-1])
    assert "error" not in summary, summary
    assert summary["removed"] and summary["mid_run"], summary  # the node went while training
    fs, path = filesystem(str(run_dir))
    with fs.open_input_stream(f"{path}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f.read().decode().splitlines()]
    return summary, records


def test_node_loss_with_a_node_back_ends_like_an_uninterrupted_run(tiny_lm_dir, tmp_path: Path,
                                                                   s3_bucket: str):
    """The run folder is in the S3-protocol store and every node (and the driver) has its own
    scratch folder: no node reads another's disk; the restart reads the store."""
    run = f"{s3_bucket}/runs/node-loss"
    summary, records = lose_a_node(tiny_lm_dir, run, "keep", str(tmp_path / "scratch"))
    assert summary["step"] == 1500
    assert summary["scratch_left"] == []  # every node's scratch removed at the end
    restarts = [r for r in records if r["kind"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["after_failure"] and restarts[0]["shards"] == 2
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(10, 1501, 10))  # the lost attempt's later records were dropped

    cfg = config(tiny_lm_dir)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "steps": 1500, "checkpoint_every": 100, "keep_checkpoints": 30, "log_every": 10})})
    ref = train_from_config(cfg, tmp_path / "ref", log=lambda s: None, splice=False)
    # the same floats up to the 2-shard sum's round-off (JumpReLU thresholds amplify it: the
    # uninterrupted 2-shard run differs from one process by as much)
    assert_same_checkpoint(ref.checkpoint, f"{run}/checkpoints/step_000001500",
                           atol=1e-5, threshold_atol=2e-3, counters=False)


def test_node_loss_without_a_node_back_reslices_to_one_shard(tiny_lm_dir, tmp_path: Path):
    summary, records = lose_a_node(tiny_lm_dir, tmp_path / "run", "reslice")
    assert summary["step"] == 1500
    restart = next(r for r in records if r["kind"] == "restart")
    assert restart["after_failure"] and restart["shards"] == 1
    final = load_checkpoint(tmp_path / "run", optimizer=True)
    assert final.state.step == 1500 and final.model.is_whole  # every feature is still there
    assert final.state.tokens_since_fired.shape == (2, 32)
    mse = {r["step"]: r["mse"] for r in records if r["kind"] == "train"}
    s = restart["step"]
    early = max(mse[t] for t in range(10, 60, 10))
    # it goes on from where it was, not from the start
    assert mse[s + 10] < 1.5 * mse[s] and mse[s + 10] < 0.8 * early, (s, mse)
