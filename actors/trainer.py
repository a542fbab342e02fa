"""The driver of feature-sharded training on Ray (docs/design.md §3): placement of the shard group (a
Ray Train `TorchTrainer`, one FeatureShard per worker), progress and metrics on the driver,
checkpoints in the run folder, failure recovery and elastic restarts. Every computation is in
`clt_ray`; the workers run `actors.shard_trainer.shard_loop`.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from clt_ray.actors.ray_session import ensure_ray
from clt_ray.actors.shard_trainer import check_shards, shard_loop
from tqdm.auto import tqdm

from clt_ray import layout
from clt_ray.config import Config
from clt_ray.errors import ConfigError
from clt_ray.fsutil import Staged
from clt_ray.lm import load_model
from clt_ray.train.checkpoint import load_checkpoint, release_fetched
from clt_ray.train.loop import MetricsFile, progress_postfix
from clt_ray.train.run import (
    GraphScorerFactory,
    RunLocation,
    RunResult,
    check_config,
    check_graph_scorer,
    finish_run,
    open_run,
    stage_run,
)

METRICS_PUSH_S = 10.0  # how often the driver copies metrics.jsonl to a run folder in a store

# Ray Train waits this long for a worker group to start; its 60 s default made elastic restarts
# take ~70 s on a stale resource view (docs/design.md §3).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")


class Progress:
    """Rank 0 sends its metric records here; the driver drains them into metrics.jsonl."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.attempts = 0

    def attempt(self) -> int:
        """Called by rank 0 as a worker group starts: 1, then 2, … after each failure."""
        self.attempts += 1
        return self.attempts

    def record(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)

    def take(self) -> list[dict[str, Any]]:
        out, self.records = self.records, []
        return out


def with_absolute_paths(cfg: Config) -> Config:
    """The config with local paths (model folder, corpus, cache) made absolute: Ray Train workers
    run in their own working directory."""

    def absolute(p: str | None) -> str | None:
        if p is None or "://" in p or p == "toy" or p.startswith(("hf:", "toy:")):
            return p
        return str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p

    model = cfg.model.model_copy(update={"name": absolute(cfg.model.name)})
    data = cfg.data.model_copy(update={"corpus": absolute(cfg.data.corpus),
                                       "cache": absolute(cfg.data.cache)})
    return cfg.model_copy(update={"model": model, "data": data})


def _wants_gpu(cfg: Config) -> bool:
    device = cfg.train.device or cfg.model.device
    return str(device).startswith("cuda")


def train_on_ray(cfg: Config, run_dir: RunLocation, *, shards: int = 1,
                 replicas: int = 1, resume: bool = False, address: str | None = None,
                 max_failures: int = 0, min_shards: int | None = None,
                 cpus_per_worker: float | None = None, splice: bool = True,
                 log: Callable[[str], None] = print,
                 graph_scorer: GraphScorerFactory | None = None) -> RunResult:
    """Train the config's CLT with `shards` feature shards × `replicas` data-parallel replicas on
    Ray into `run_dir` (the same folder layout as `train_from_config`). `max_failures`: restarts
    from the last checkpoint after a worker or node is lost; `min_shards`: elastic, restart with as
    few as this many shards per replica when fewer workers can be placed (the checkpoint is
    resliced). `graph_scorer`: as in `train_from_config` (graphs are scored on the whole CLT,
    at the end)."""
    start_time = time.monotonic()
    clt_cfg = check_config(cfg)  # everything checkable before any actor starts
    check_graph_scorer(cfg, graph_scorer)
    if replicas < 1:
        raise ConfigError(f"replicas must be at least 1, got {replicas}")
    check_shards(shards, clt_cfg.n_features)
    if min_shards is not None:
        if not 1 <= min_shards <= shards:
            raise ConfigError(f"min_shards {min_shards} is not in [1, {shards}]")
        for n in range(min_shards, shards + 1):
            check_shards(n, clt_cfg.n_features)
    use_gpu = _wants_gpu(cfg)
    run = stage_run(run_dir, resume, log)  # an unreachable store fails before Ray
    try:
        open_run(cfg, run, resume, clt_cfg=clt_cfg, log=log)  # a bad run folder too
        return _train_shard_group(cfg, run, shards=shards, replicas=replicas, address=address,
                                  max_failures=max_failures, min_shards=min_shards,
                                  cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
                                  splice=splice, log=log, graph_scorer=graph_scorer,
                                  start_time=start_time)
    finally:
        run.close()


def _train_shard_group(cfg: Config, run: Staged, *, shards: int, replicas: int,
                       address: str | None, max_failures: int, min_shards: int | None,
                       cpus_per_worker: float | None, use_gpu: bool, splice: bool,
                       log: Callable[[str], None], graph_scorer: GraphScorerFactory | None,
                       start_time: float) -> RunResult:
    """train_on_ray after its checks: the shard group on Ray, the driver's progress and metrics,
    the final evaluation."""
    ensure_ray(address)
    if not run.remote and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        log(f"warning: the run folder {run} is local: every node of this cluster must see it "
            "(a shared filesystem), or give --run-dir an object-store URI (s3://…, gs://…)")
    workers = shards * replicas
    resources = ray.cluster_resources()
    if use_gpu and resources.get("GPU", 0) < workers:
        raise ConfigError(f"the config puts the CLT on {cfg.train.device or cfg.model.device} but "
                          f"the Ray cluster has {resources.get('GPU', 0):g} GPUs for {workers} "
                          "shard workers")
    if cpus_per_worker is None:
        cpus_per_worker = max(1.0, math.floor(resources.get("CPU", 1) / workers)) if not use_gpu \
            else 1.0

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = ray.remote(Progress).options(num_cpus=0, scheduling_strategy=here).remote()
    num_workers: int | tuple[int, int] = workers
    if min_shards is not None and min_shards < shards:
        num_workers = (min_shards * replicas, workers)
    trainer = TorchTrainer(
        shard_loop,
        train_loop_config={"run": with_absolute_paths(cfg).model_dump(mode="json"),
                           "replicas": replicas,
                           "threads": int(cpus_per_worker), "use_gpu": use_gpu,
                           "progress": progress,
                           "run_dir": run.location if run.remote else str(run.local.resolve())},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(  # each shard uploads its slice from its own node
            storage_path=run.root if run.remote else str(run.local.resolve()),
            storage_filesystem=run.fs if run.remote else None, name=layout.CHECKPOINTS,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
    )
    log(f"shard group: {shards} shard(s) × {replicas} replica(s) = {workers} workers, "
        f"{'1 GPU' if use_gpu else f'{cpus_per_worker:g} CPU'} each")
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the driver's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    bar = tqdm(total=cfg.train.steps, desc="train", unit="step", dynamic_ncols=True,
               leave=False, disable=not cfg.train.progress)
    metrics = MetricsFile(run.local, log=log)  # a torn last line is dropped, and said
    pushed = time.monotonic()
    # Ctrl-C stops the run (the shards are killed with the driver; --resume goes on from the last
    # checkpoint). A handler of our own: a KeyboardInterrupt raised inside ray.get was lost, and
    # the run went on to the end (bench/scale.py at GPT-2 shape).
    interrupted = threading.Event()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set()) if on_main else None
    try:
        while True:
            if interrupted.is_set():
                log("interrupted: the shards stop; `clt-ray train --resume` goes on from the "
                    "last checkpoint")
                raise KeyboardInterrupt
            alive = thread.is_alive()
            if _drain(progress, metrics, bar) and time.monotonic() - pushed > METRICS_PUSH_S:
                run.push(layout.METRICS)  # a store has no append: the whole file, now and then
                pushed = time.monotonic()
            if not alive:
                break
            time.sleep(0.5)
    finally:
        if on_main:
            signal.signal(signal.SIGINT, previous)
        bar.close()
        ray.kill(progress)
    if "error" in outcome:
        raise outcome["error"]
    # the newest usable checkpoint (damaged ones said), from the store for a URI run folder
    clt, state, _ = load_checkpoint(run.location if run.remote else run.local, log=log)
    release_fetched()  # the local copy of a store's checkpoint: loaded, so no longer needed
    lm, tokenizer = load_model(cfg.model)
    return finish_run(cfg, run, clt, state, lm=lm, tokenizer=tokenizer,
                      start_time=start_time, splice=splice,
                      graph_scorer=graph_scorer(cfg, lm, tokenizer) if graph_scorer else None)


def _drain(progress: Any, metrics: MetricsFile, bar: Any) -> bool:
    """Append rank 0's records to metrics.jsonl (True if there were any); a restart record (the
    group restarted from a checkpoint after a failure) first drops what the lost attempt logged
    after that step."""
    records = ray.get(progress.take.remote())
    if not records:
        return False
    for rec in records:
        if rec["kind"] == "restart":
            metrics.truncate_after(rec["step"])
        metrics.append(rec)
    last = records[-1]
    bar.n = last["step"]
    if last["kind"] == "train":
        bar.set_postfix(progress_postfix(last), refresh=False)
    bar.refresh()
    return True
