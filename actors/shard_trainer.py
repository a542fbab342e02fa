"""FeatureShard: one Ray Train worker holding features [start, stop) of every layer (docs/design.md §3).

Messaging only: the step, the checkpoint layout and the metrics are `clt_ray.nn.step`'s,
`clt_ray.train`'s and `clt_ray.train.checkpoint`'s. Workers are `replicas × shards`: rank = replica · shards + shard. Each
replica's shards sum their partial reconstructions with one all-reduce; each shard's replicas
average their gradients. Global rank 0 owns the data: it pulls one batch per replica (each replica
reads its own part of the corpus or cache) and broadcasts them through the process group; every
worker keeps its replica's batch. Checkpoints: each shard writes its slice of the shard-independent
layout in parallel and Ray Train merges them, so a restart — with any number of workers — reslices
it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from clt_ray.actors.cache_producer import ProducerBlocks
from ray.train import Checkpoint
from ray.train.collective import broadcast_from_rank_zero

from clt_ray.config import Config, parse_config
from clt_ray.data import ShuffledSource, State, take_tokens
from clt_ray.errors import ConfigError
from clt_ray.fsutil import is_uri
from clt_ray.lm import load_model
from clt_ray.nn.step import Collectives
from clt_ray.train.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    checkpoint_path,
    fetch_checkpoint,
    latest_checkpoint,
    read_manifest,
    release_fetched,
    save_checkpoint_shard,
)
from clt_ray.train.loop import Trainer
from clt_ray.train.run import build_trainer, check_config, heldout_set, training_source


def feature_range(shard: int, shards: int, n_features: int) -> tuple[int, int]:
    """Shard `shard` of `shards` equal feature ranges (docs/design.md §3)."""
    check_shards(shards, n_features)
    per = n_features // shards
    return shard * per, (shard + 1) * per


def check_shards(shards: int, n_features: int) -> None:
    if shards < 1:
        raise ConfigError(f"shards must be at least 1, got {shards}")
    if shards > n_features:
        raise ConfigError(f"{shards} shards for {n_features} features a layer: at most one shard "
                          "per feature")
    if n_features % shards:
        raise ConfigError(f"{shards} shards do not divide clt.n_features {n_features}: choose a "
                          "shard count that divides it (equal shards keep the all-reduce uniform)")


def make_collectives(rank: int, shards: int, replicas: int, device: torch.device) -> Collectives:
    """Process groups: the shards of each replica (ranks r·S … r·S + S − 1) and the replicas of
    each shard (ranks s, s + S, …). Every rank creates every group, as torch.distributed needs."""
    shard_groups = [dist.new_group(list(range(r * shards, (r + 1) * shards)))
                    for r in range(replicas)]
    replica_groups = [dist.new_group(list(range(s, shards * replicas, shards)))
                      for s in range(shards)]
    sg, rg = shard_groups[rank // shards], replica_groups[rank % shards]

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        if shards > 1:
            dist.all_reduce(t, group=sg)
        return t

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(shards)]
        dist.all_gather(parts, t.contiguous(), group=sg)
        return torch.cat(parts, dim=-1)

    def replica_mean(ts: list[torch.Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in ts])  # one collective for all gradients
        dist.all_reduce(flat, group=rg)
        flat /= replicas
        offset = 0
        for t in ts:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    def replica_sum(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=rg)
        return t

    if replicas == 1:
        return Collectives(reduce_sum=reduce_sum, gather=gather)
    return Collectives(reduce_sum=reduce_sum, gather=gather, replica_mean=replica_mean,
                       replica_sum=replica_sum, replicas=replicas)


class BroadcastSource:
    """Rank 0 pulls one batch per replica from its sources and broadcasts them with the process
    group (gloo or NCCL); each worker keeps its replica's batch. Its state is the sources' cursors
    (rank 0's). Measured here: a 1.5 MB batch takes 3 ms by gloo broadcast but 27 ms through
    `ray.train.collective.broadcast_from_rank_zero` of an ObjectRef, and per-step refs made the
    object store grow until it spilled (2 s a step) — so the batch itself goes through the group."""

    def __init__(self, sources: list[ShuffledSource] | None, replica: int, replicas: int,
                 shape: tuple[int, int], device: torch.device) -> None:
        self.sources, self.replica, self.replicas = sources, replica, replicas
        self.shape, self.device = shape, device

    def __iter__(self) -> BroadcastSource:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = torch.full((self.replicas,), -1, dtype=torch.int64, device=self.device)
        batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.sources is not None:
            try:
                batches = [next(s) for s in self.sources]
                sizes = torch.tensor([len(x) for x, _ in batches], device=self.device)
            except StopIteration:
                batches = []
        dist.broadcast(sizes, src=0)
        if int(sizes.min()) < 0:
            raise StopIteration
        mine = None
        for r, n in enumerate(sizes.tolist()):
            if batches:
                x, y = batches[r]
                buf = torch.stack([x, y]).to(self.device, torch.float32)
            else:
                buf = torch.empty((2, n, *self.shape), dtype=torch.float32, device=self.device)
            dist.broadcast(buf, src=0)
            if r == self.replica:
                mine = buf
        assert mine is not None
        return mine[0], mine[1]

    def state(self) -> State | None:
        """One replica: its source's cursor, as in one process (either resumes the other)."""
        if self.sources is None:
            return None
        if len(self.sources) == 1:
            return self.sources[0].state()
        return {"replicas": [s.state() for s in self.sources]}

    def restore(self, state: State | None) -> None:
        if self.sources is not None and state is not None:
            saved = state.get("replicas", [state])
            if len(saved) != len(self.sources):
                raise ConfigError(f"the checkpoint's data cursor has {len(saved)} replica(s); "
                                  f"this run has {len(self.sources)}")
            for s, st in zip(self.sources, saved):
                s.restore(st)

    def close(self) -> None:
        for s in self.sources or []:
            s.close()


class ShardTrainer(Trainer):
    """The core Trainer on one shard; `save` writes this shard's part of the checkpoint
    (checkpoint.save_checkpoint_shard) and reports it to Ray Train, which merges the parts into
    the run folder's step_N (every rank reports, as Ray Train requires)."""

    def __init__(self, *args: Any, rank: int, shards: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.shards = rank, shards

    @property
    def checkpoints(self) -> bool:
        return True

    def save(self, source: Any = None, path: Any = None) -> Path:
        st = self.state_to_save(source)  # the cursor is rank 0's (BroadcastSource.state)
        name = checkpoint_path("", st.step).name
        metrics = {"step": st.step}
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank < self.shards:  # replica 0's shards; the other replicas hold the same
                ranges = [feature_range(s, self.shards, self.model.cfg.n_features)
                          for s in range(self.shards)]
                save_checkpoint_shard(tmp, self.model, self.optimizer, st, self.config, ranges)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=name)  # Ray merges the shards' folders
            else:
                ray.train.report(metrics)
        self._saved_step = st.step
        return Path(name)


def shard_loop(config: dict[str, Any]) -> None:
    """The train_loop_per_worker of the shard group's TorchTrainer."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    replicas = config["replicas"]
    if world % replicas:
        raise ConfigError(f"{world} workers are not a multiple of {replicas} replicas")
    shards = world // replicas
    shard, replica = rank % shards, rank // shards
    torch.set_num_threads(max(1, int(config.get("threads") or 1)))
    cfg = parse_config(config["run"])
    clt_cfg = check_config(cfg)
    start, stop = feature_range(shard, shards, clt_cfg.n_features)
    device = (ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu"))
    collectives = make_collectives(rank, shards, replicas, device)

    sink: Callable[[dict[str, Any]], None] | None = None
    attempt = 1
    if rank == 0 and config.get("progress") is not None:
        progress = config["progress"]
        sink = progress.record.remote
        attempt = ray.get(progress.attempt.remote())

    restart = ray.train.get_checkpoint()
    sources, heldout_refs, ckpt = None, None, None
    if rank == 0:
        sources, heldout_refs = _rank0_data(cfg, replicas)
        ckpt = _checkpoint_to_start_from(config["run_dir"], restart)
    heldout_refs, ckpt = broadcast_from_rank_zero([heldout_refs, ckpt])
    # in a store: every worker takes its own verified copy to node-local scratch (no node reads
    # another's disk), removed once loaded
    ckpt_dir = fetch_checkpoint(ckpt) if ckpt is not None and is_uri(ckpt) else ckpt

    def init_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rank 0's first init_tokens of its stream, for every shard (init is shard-invariant)."""
        init = [ray.put(take_tokens(sources[0], cfg.train.init_tokens))] if rank == 0 else None
        return iter([ray.get(broadcast_from_rank_zero([init])[0][0])])

    trainer = build_trainer(
        cfg, clt_cfg, ckpt_dir, device=device, heldout=ray.get(heldout_refs),
        init_batches=init_batches, start=start, stop=stop, trainer_cls=ShardTrainer,
        log=(lambda m: print(m, flush=True)) if rank == 0 else None,
        train=cfg.train.model_copy(update={"progress": False}),  # the driver shows progress
        collectives=collectives, record_sink=sink, rank=rank, shards=shards)
    release_fetched()  # a store's checkpoint copied to this node: loaded, so removed
    if ckpt_dir is not None and sink is not None:  # the driver drops the lost attempt's records
        sink({"kind": "restart", "step": trainer.step, "tokens": trainer.state.tokens,
              "shards": shards, "replicas": replicas, "after_failure": attempt > 1})
    source = BroadcastSource(sources, replica, replicas, (clt_cfg.n_layers, clt_cfg.d_model),
                             device)
    try:
        trainer.fit(source)
    finally:
        source.close()


def _checkpoint_to_start_from(run_dir: str, restart: Checkpoint | None) -> str | None:
    """The newest usable checkpoint (every file of its recorded sha256): in the run folder (a
    `--resume`, or one a failed attempt wrote — Ray Train registers checkpoints a poll interval
    after they land, so its own may lag) or Ray Train's. Damaged newer ones are said and skipped.
    A run folder in a store: the URI of its newest usable checkpoint (Ray Train's are in it)."""
    if is_uri(run_dir):
        try:
            local = fetch_checkpoint(run_dir, log=lambda line: print(line, flush=True))
        except CheckpointError:
            return None  # none yet (a fresh run), or none usable
        return f"{run_dir.rstrip('/')}/{CHECKPOINTS}/{local.name}"
    latest, skipped = latest_checkpoint(run_dir, verify=True)
    for line in skipped:
        print(line, flush=True)
    found = [str(latest)] if latest is not None else []
    if restart is not None:
        found.append(restart.to_directory())
    if not found:
        return None
    return max(found, key=lambda p: read_manifest(p)["step"])


def _rank0_data(cfg: Config, replicas: int) -> tuple[list[ShuffledSource], Any]:
    """One training source per replica (disjoint parts of the data) and the held-out batches
    (their object ref), built on rank 0 with the LM loaded once."""

    lm, tokenizer = load_model(cfg.model)
    sources = []
    for r in range(replicas):
        blocks = None
        if cfg.data.source == "producers":  # rank 0 owns them: they go and restart with it

            blocks = ProducerBlocks(cfg.model, cfg.data, part=(r, replicas))
        sources.append(training_source(cfg, lm, tokenizer, part=(r, replicas), blocks=blocks))
    _, _, heldout = heldout_set(cfg, lm, tokenizer)
    return sources, ray.put(heldout)


__all__ = ["BroadcastSource", "ShardTrainer", "check_shards", "feature_range", "shard_loop"]
