"""Benchmark: feature-sharded training steps on Ray against the single-process trainer, side by
side in one run, at a GPT-2-small-shaped CLT (12 layers, d 768).

Both run `clt_ray.train.loop.train_step` (schedules, exact gradients, clipping, Adam) on the same
total features and batch. The single process uses all `--threads` threads; each of the N shard
workers of a Ray Train TorchTrainer holds F/N features with threads/N threads and sums the partial
reconstructions with the gloo (or NCCL) all-reduce, exactly as `clt-ray train --shards N` does.
Prints step times, the overhead t_N / t_1 − 1 (goal ≤ 15% at N = 2 on CPU) and the share of the
sharded step spent in the collectives (the reconstruction all-reduce plus the statistics one),
and the time to checkpoint weights + Adam moments the way clt-ray does (the shards gather to
rank 0, which writes the whole CLT's per-layer layout) against every shard writing its own slice.

    python bench/sharding.py                          # N = 2, F = 2048 a layer, B = 256, CPU
    python bench/sharding.py --shards 2 4 --features 8192 --batch 1024 --gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import torch
from clt_ray.actors.shard_trainer import feature_range
from torch import Tensor

from clt_ray.config import CLTConfig, LossConfig, OptimConfig
from clt_ray.nn.clt import CrossLayerTranscoder, feature_dim
from clt_ray.nn.step import Collectives, make_optimizer, train_step
from clt_ray.train.checkpoint import (
    MOMENTS,
    TrainingState,
    _Uninitialised,
    adam_moments,
    save_checkpoint,
    save_checkpoint_shard,
)


def run_steps(model: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, steps: int,
              collectives: Collectives, sync: Any = None, opt_out: list | None = None
              ) -> list[float]:
    loss, optim = LossConfig(preact_coef=1e-3), OptimConfig()
    opt = make_optimizer(model, optim)
    times = []
    for t in range(steps + 2):  # two warm-up steps
        if sync:
            sync()
        start = time.perf_counter()
        train_step(model, opt, x, y, step=t, total_steps=steps + 2, loss_cfg=loss,
                   optim_cfg=optim, collectives=collectives)
        if x.is_cuda:
            torch.cuda.synchronize()
        if t >= 2:
            times.append(time.perf_counter() - start)
    if opt_out is not None:
        opt_out.append(opt)
    return times


def batch(cfg: CLTConfig, B: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (B, cfg.n_layers, cfg.d_model)
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)


def shard_worker(config: dict[str, Any]) -> None:
    import torch.distributed as dist
    from clt_ray.actors.shard_trainer import feature_range, make_collectives

    ctx = ray.train.get_context()
    rank, n = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["gpu"] else torch.device("cpu")
    cfg = CLTConfig(**config["clt"])
    start, stop = feature_range(rank, n, cfg.n_features)
    torch.manual_seed(0)
    model = CrossLayerTranscoder(cfg, start, stop, device=device)
    base = make_collectives(rank, n, 1, device)
    spent = [0.0]

    def timed_sum(t: torch.Tensor) -> torch.Tensor:
        s = time.perf_counter()
        out = base.reduce_sum(t)
        if t.is_cuda:
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - s
        return out

    x, y = batch(cfg, config["batch"], device)
    times = run_steps(model, x, y, 2, Collectives(reduce_sum=timed_sum), sync=dist.barrier)
    spent[0] = 0.0
    opts: list = []
    times = run_steps(model, x, y, config["steps"], Collectives(reduce_sum=timed_sum),
                      sync=dist.barrier, opt_out=opts)
    gather_s, each_s = checkpoint_times(model, opts[0], rank, n)
    if rank == 0:  # Ray Train V2 keeps only checkpointed metrics: hand them over in a file
        Path(config["out"]).write_text(json.dumps({
            "step_s": statistics.median(times), "collective_share": spent[0] / sum(times),
            "ckpt_gather_s": gather_s, "ckpt_each_s": each_s}))


# --- the gather-to-one-writer variant, measured against clt-ray's per-shard writes ---

def shard_tensors(model: CrossLayerTranscoder, optimizer: torch.optim.Optimizer,
                  tokens_since_fired: Tensor) -> dict[str, Tensor]:
    """A shard's per-feature tensors (parameters, Adam moments, dead counters) by key, in a fixed
    order: what each shard sends for `join_shards` to build the whole CLT's checkpoint."""
    _, moments = adam_moments(model, optimizer)
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if feature_dim(name) is None:
            continue
        out[f"param/{name}"] = p.detach()
        for m in MOMENTS if moments is not None else ():
            out[f"{m}/{name}"] = moments[name][m]
    out["counters/tokens_since_fired"] = tokens_since_fired
    return out


def _key_dim(key: str) -> int:
    kind, name = key.split("/", 1)
    return 1 if kind == "counters" else feature_dim(name) or 0


@torch.no_grad()
def join_shards(first: CrossLayerTranscoder, optimizer: torch.optim.Optimizer,
                parts: list[dict[str, Tensor]], state: TrainingState
                ) -> tuple[CrossLayerTranscoder, TrainingState]:
    """The whole CLT and its training state from every shard's `shard_tensors` (in feature
    order) plus the first shard's module and optimizer (replicated b_dec, scales, Adam step)."""
    joined = {k: torch.cat([p[k] for p in parts], dim=_key_dim(k)) for k in parts[0]}
    whole = _Uninitialised(first.cfg, device=first.b_dec.device, dtype=first.b_dec.dtype)
    whole.__class__ = CrossLayerTranscoder  # every tensor is copied in below
    adam_step, first_moments = adam_moments(first, optimizer)
    moments: dict[str, dict[str, Tensor]] | None = None if first_moments is None else {}
    for name, p in whole.named_parameters():
        if feature_dim(name) is None:
            p.copy_(first.get_parameter(name))
            if moments is not None and first_moments is not None:
                moments[name] = dict(first_moments[name])
            continue
        p.copy_(joined[f"param/{name}"])
        if moments is not None:
            moments[name] = {m: joined[f"{m}/{name}"] for m in MOMENTS}
    whole.s_in.copy_(first.s_in)
    whole.s_out.copy_(first.s_out)
    whole_state = TrainingState(
        step=state.step, total_steps=state.total_steps, tokens=state.tokens, data=state.data,
        tokens_since_fired=joined["counters/tokens_since_fired"], rng=state.rng,
        adam_step=adam_step, moments=moments, extra=state.extra)
    return whole, whole_state


def _gather_to_rank0(mine: dict[str, torch.Tensor], rank: int, shards: int
                     ) -> list[dict[str, torch.Tensor]] | None:
    """Every shard sends its tensors to rank 0 (the gather-to-one-writer variant)."""
    import torch.distributed as dist

    parts: list[dict[str, torch.Tensor]] | None = (
        [{} for _ in range(shards)] if rank == 0 else None)
    for key in sorted(mine):
        t = mine[key].contiguous()
        bufs = [torch.empty_like(t) for _ in range(shards)] if rank == 0 else None
        dist.gather(t, bufs, dst=0)
        if parts is not None and bufs is not None:
            for s in range(shards):
                parts[s][key] = bufs[s]
    return parts


def checkpoint_times(model: CrossLayerTranscoder, opt: Any, rank: int, n: int
                     ) -> tuple[float, float]:
    """Seconds to checkpoint weights + Adam moments + counters (a) gathering the shards to rank
    0, which writes the whole CLT's layout; (b) as clt-ray does: every shard writes its own slice
    in parallel (checkpoint.save_checkpoint_shard)."""
    import torch.distributed as dist

    counters = torch.zeros(model.cfg.n_layers, model.n_local, dtype=torch.int64)
    with tempfile.TemporaryDirectory() as tmp:
        dist.barrier()
        start = time.perf_counter()
        parts = _gather_to_rank0(shard_tensors(model, opt, counters), rank, n)
        if parts is not None:
            whole, state = join_shards(model, opt, parts, TrainingState(step=1))
            save_checkpoint(Path(tmp) / "whole", whole, None, state)
        dist.barrier()
        gather_s = time.perf_counter() - start
        start = time.perf_counter()
        ranges = [feature_range(s, n, model.cfg.n_features) for s in range(n)]
        save_checkpoint_shard(Path(tmp) / "sharded", model, opt,
                              TrainingState(step=1, tokens_since_fired=counters), None, ranges)
        dist.barrier()
        return gather_s, time.perf_counter() - start


def sharded(cfg: CLTConfig, n: int, args: argparse.Namespace) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    threads = max(1, args.threads // n) if not args.gpu else 1
    out = Path(tempfile.mkdtemp()) / "metrics.json"
    trainer = TorchTrainer(
        shard_worker,
        train_loop_config={"clt": cfg.model_dump(), "threads": threads, "gpu": args.gpu,
                           "batch": args.batch, "steps": args.steps, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=n, use_gpu=args.gpu,
                                     resources_per_worker={"CPU": args.threads / n}),
        run_config=RunConfig(storage_path="/tmp/clt-ray-bench-sharding"))
    trainer.fit()
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--features", type=int, default=2048, help="per layer, whole CLT")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--shards", type=int, nargs="+", default=[2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    cfg = CLTConfig(n_layers=args.layers, d_model=args.d_model, n_features=args.features,
                    init_threshold=0.03)
    ray.init(num_cpus=args.threads if not args.gpu else None, include_dashboard=False,
             log_to_driver=False)
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = batch(cfg, args.batch, device)
    single = statistics.median(run_steps(CrossLayerTranscoder(cfg, device=device), x, y,
                                         args.steps, Collectives()))
    print(f"CLT L {args.layers}, d {args.d_model}, F {args.features} a layer, batch "
          f"{args.batch}, {'GPU' if args.gpu else f'{args.threads} CPU threads'}; "
          f"median of {args.steps} steps")
    print(f"{'':26s} {'step s':>8s} {'overhead':>9s} {'collectives':>12s} "
          f"{'ckpt gather+1 writer s':>23s} {'ckpt each shard s':>18s}")
    print(f"{'one process':26s} {single:8.3f}")
    for n in args.shards:
        m = sharded(cfg, n, args)
        print(f"{f'{n} shards on Ray':26s} {m['step_s']:8.3f} "
              f"{m['step_s'] / single - 1:+9.1%} {m['collective_share']:12.1%} "
              f"{m['ckpt_gather_s']:23.2f} {m['ckpt_each_s']:18.2f}")


if __name__ == "__main__":
    main()
