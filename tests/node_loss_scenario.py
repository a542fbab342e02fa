"""Node loss on a simulated 2-node Ray cluster (run by test_fault_tolerance.py in a subprocess, so
it gets its own Ray): train 2 shards, one per node, remove the node of one shard mid-run, and
either add a node back (the restart keeps 2 shards) or not (elastic: 1 shard, resliced).

    python tests/node_loss_scenario.py MODEL_DIR RUN_DIR keep|reslice
Prints one JSON line: the run's final step, the steps of its checkpoints, the restarts."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))


STEPS = 1500


def main() -> None:
    import ray
    from clt_ray.actors.trainer import train_on_ray
    from ray.cluster_utils import Cluster
    from test_cache_produce import config

    model_dir, run_dir, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cfg = config(model_dir)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "steps": STEPS, "checkpoint_every": 100, "keep_checkpoints": 30, "log_every": 10})})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    out: dict = {}

    def run() -> None:
        try:
            r = train_on_ray(cfg, run_dir, shards=2, max_failures=3,
                             min_shards=1 if mode == "reslice" else None, cpus_per_worker=1.0,
                             splice=False, log=lambda s: None)
            out["step"] = r.step
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out["error"] = repr(exc)

    thread = threading.Thread(target=run)
    thread.start()
    # step 200 on disk: step 100's report is surely registered (Ray Train copies a checkpoint
    # into the run folder before it registers it; a node lost mid-copy restarts from the one
    # before)
    first = run_dir / "checkpoints" / "step_000000200"
    deadline = time.monotonic() + 240
    while not first.exists() and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    removed_at, mid_run = None, False
    if first.exists() and thread.is_alive():
        mid_run = not (run_dir / "checkpoints" / f"step_{STEPS:09d}").exists()
        cluster.remove_node(node)
        removed_at = time.monotonic()
        if mode == "keep":
            cluster.add_node(num_cpus=1)
    thread.join(timeout=400)
    steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    print(json.dumps({**out, "removed": removed_at is not None, "mid_run": mid_run,
                      "checkpoints": steps}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
