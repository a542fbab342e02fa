"""Node loss on a simulated 2-node Ray cluster (run by test_fault_tolerance.py in a subprocess, so
it gets its own Ray): train 2 shards, one per node, remove the node of one shard mid-run, and
either add a node back (the restart keeps 2 shards) or not (elastic: 1 shard, resliced).

    python tests/node_loss_scenario.py MODEL_DIR RUN keep|reslice [SCRATCH]
RUN: a local folder or a URI in a store. SCRATCH: a folder in which the driver and each node get a
node-local scratch folder of their own (CLT_RAY_SCRATCH), so no node sees another's files.
Prints one JSON line: the run's final step, the steps of its checkpoints, the restarts, and the
files left in the scratch folders."""

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

    from clt_ray.fsutil import Staged

    model_dir, run_dir, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    scratch = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    folder = Staged(run_dir)  # reads the store's listing (a local folder: itself)
    cfg = config(model_dir)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "steps": STEPS, "checkpoint_every": 100, "keep_checkpoints": 30, "log_every": 10})})

    def node_env(name: str) -> dict:
        if scratch is None:
            return {}
        return {"env_vars": {"CLT_RAY_SCRATCH": str(scratch / name)}}

    if scratch is not None:
        os.environ["CLT_RAY_SCRATCH"] = str(scratch / "driver")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                            "include_dashboard": False,
                                                            **node_env("head")})
    node = cluster.add_node(num_cpus=1, **node_env("node-1"))
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
    first = "checkpoints/step_000000200"
    deadline = time.monotonic() + 240
    while not folder.exists(first) and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    removed_at, mid_run = None, False
    if folder.exists(first) and thread.is_alive():
        mid_run = not folder.exists(f"checkpoints/step_{STEPS:09d}")
        cluster.remove_node(node)
        removed_at = time.monotonic()
        if mode == "keep":
            cluster.add_node(num_cpus=1, **node_env("node-2"))
    thread.join(timeout=400)
    steps = sorted(int(n.split("_")[1]) for n in folder.entries("checkpoints")
                   if n.startswith("step_"))
    left = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")
                  if p.is_file()) if scratch is not None else []
    print(json.dumps({**out, "removed": removed_at is not None, "mid_run": mid_run,
                      "checkpoints": steps, "scratch_left": left}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
