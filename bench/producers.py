"""Cache producers on the local Ray, side by side in one run on the toy model: tokens/s of
writing a cache in this process, with 1 producer actor and with N; and of the live stream
(`data.source: producers`) against what the CLT trainer consumes at the toy shape.

    python bench/producers.py                   # toy GPT-2, 262 k tokens, N = 2
    python bench/producers.py --tokens 262144 --producers 4 --address auto
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import torch
from clt_ray.actors.cache_producer import ProducerBlocks, cache_on_ray, start_producers, stop
from clt_ray.actors.ray_session import ensure_ray

from clt_ray.cache.produce import write_cache
from clt_ray.config import toy_config
from clt_ray.lm import load_model
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.train.loop import Trainer
from clt_ray.train.run import check_config


def trainer_tokens_per_s(cfg, steps: int = 20) -> float:
    """Training steps of examples/toy.yaml's CLT on random data: the consumer's rate."""
    clt_cfg = check_config(cfg)
    model = CrossLayerTranscoder(clt_cfg)
    trainer = Trainer(model, loss=cfg.loss, optim=cfg.optim, train=cfg.train.model_copy(
        update={"progress": False}), total_steps=steps)
    B, L, d = cfg.train.batch_size, clt_cfg.n_layers, clt_cfg.d_model
    x, y = torch.randn(B, L, d), torch.randn(B, L, d)
    trainer.train_step(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
    return steps * B / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--address", default=None)
    args = p.parse_args()
    cfg = toy_config(args.arch)
    quiet = {"progress": False, "log": lambda s: None}
    ensure_ray(args.address)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lm, tok = load_model(cfg.model)
        t = time.perf_counter()
        m = write_cache(lm, tok, cfg.data, cfg.model, f"{tmp}/inproc", tokens=args.tokens, **quiet)
        rows.append(("cache, in this process", m.tokens / (time.perf_counter() - t),
                     sum(f.bytes for f in m.files) / m.tokens))
        for n in sorted({1, args.producers}):
            t = time.perf_counter()  # starting the actors and loading the model, measured apart
            actors = start_producers(cfg.model, cfg.data, n)
            ray.get([a.blocks_produced.remote() for a in actors])
            startup = time.perf_counter() - t
            stop(actors)
            t = time.perf_counter()
            m = cache_on_ray(cfg.model, cfg.data, f"{tmp}/ray{n}", tokens=args.tokens,
                             producers=n, **quiet)
            seconds = time.perf_counter() - t - startup
            rows.append((f"cache, {n} producer actor(s)", m.tokens / seconds,
                         sum(f.bytes for f in m.files) / m.tokens))
            print(f"{n} producer(s): actors started and the model loaded in {startup:.1f} s "
                  "(not counted)")
    for n in sorted({1, args.producers}):
        stream = ProducerBlocks(cfg.model, cfg.data, producers=n)
        try:
            next(stream)  # actors started, model loaded
            t, got = time.perf_counter(), 0
            while got < args.tokens:
                got += len(next(stream)[0])
            rows.append((f"stream int8, {n} producer(s)", got / (time.perf_counter() - t), None))
        finally:
            stream.close()
    consume = trainer_tokens_per_s(cfg)
    print(f"toy {args.arch}, {args.tokens:,} tokens, {torch.get_num_threads()} torch threads "
          f"in the driver")
    print(f"{'':34s} {'tokens/s':>10s} {'÷ trainer':>10s} {'bytes/token':>12s}")
    for name, rate, bpt in rows:
        print(f"{name:34s} {rate:10,.0f} {rate / consume:10.2f} "
              f"{'' if bpt is None else f'{bpt:12.0f}'}")
    print(f"{'CLT trainer consumes (toy.yaml)':34s} {consume:10,.0f} {1:10.2f}")


if __name__ == "__main__":
    main()
