"""A one-shot GPU check (issue 17), under 8 minutes on one GPU, every figure measured side by side in
one run:

    equal      the sparse step equals the dense one on this device: 5 train_steps (fp32, TF32
               off) from the same CLT and batches, max relative difference of weights and Adam
               moments
    step       the training step at GPT-2 small's shape (L 12, d 768, F 6144 a layer, B 4096,
               L0/F 1%), dense and sparse, in fp32, TF32 and bf16 autocast: tokens/s, achieved
               FLOP/s (the dense step's matmul FLOPs ÷ its time) against the same matmuls alone
               in the same precision
    crossover  sparse ÷ dense step time by support density at that shape (fp32): where `auto`
               should switch (clt_ray.nn.step.SPARSE_MAX_DENSITY)
    producer   the cache producer's tokens/s on the GPU: `write_cache` with a GPT-2-small-shaped
               LM (random weights, built offline) over the toy corpus
    ray        a 1-shard Ray Train run on the GPU (`train_on_ray`, the LM streaming in rank 0)

    python bench/gpu.py --json            # on a machine with CUDA
    python bench/gpu.py --device cpu --quick   # the same code on a small shape (a smoke run)

The last line with --json is one JSON object; `clt-ray plan --profile` reads it (achieved_flop_s
by precision, sparse_speedup_gpt2, device).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from train_step import LOSS, STILL, Shape, interleaved, make_clt, matmul_baseline, support_of

from clt_ray.nn.step import make_optimizer, train_step
from clt_ray.plan import step_flops

PRECISIONS = ("float32", "tf32", "bfloat16")


@contextlib.contextmanager
def precision(device: torch.device, name: str) -> Iterator[None]:
    """fp32 (TF32 off), TF32 matmuls, or bf16 autocast, as the trainer runs them."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if name == "bfloat16"
           else contextlib.nullcontext())
    try:
        with ctx:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def steps_of(clt: Any, x: torch.Tensor, y: torch.Tensor, decoder: str) -> Callable[[], None]:
    opt = make_optimizer(clt, STILL)
    counter = iter(range(10**9))
    return lambda: train_step(clt, opt, x, y, step=next(counter), total_steps=10**9,
                              loss_cfg=LOSS, optim_cfg=STILL, decoder=decoder)


# --- equal -----------------------------------------------------------------------------------


def check_equal(device: torch.device, steps: int = 5) -> dict[str, Any]:
    """Max relative difference (per tensor, over weights and both Adam moments) after `steps`
    dense vs sparse train_steps from the same start, fp32 with TF32 off."""
    s = Shape("small", 4, 64, 256, 256)
    worst = 0.0
    states = {}
    for decoder in ("dense", "sparse"):
        clt, x, y = make_clt(s, device, rate=0.02, bandwidth=0.01)
        opt = make_optimizer(clt, STILL.model_copy(update={"lr": STILL.lr.model_copy(
            update={"lr": 1e-3})}))
        with precision(device, "float32"):
            for i in range(steps):
                train_step(clt, opt, x, y, step=i, total_steps=100, loss_cfg=LOSS,
                           optim_cfg=STILL, decoder=decoder)
        states[decoder] = {n: [p.detach().clone(), *(opt.state[p][k].clone() for k in
                                                     ("exp_avg", "exp_avg_sq"))]
                           for n, p in clt.named_parameters() if p in opt.state}
    for name, tensors in states["dense"].items():
        for a, b in zip(tensors, states["sparse"][name], strict=True):
            scale = max(float(a.abs().max()), 1e-12)
            worst = max(worst, float((a - b).abs().max()) / scale)
    return {"steps": steps, "max_rel_diff": worst, "sparse_equals_dense": worst < 1e-4}


# --- step ------------------------------------------------------------------------------------


def bench_precisions(s: Shape, device: torch.device, reps: int, warmup: int) -> dict[str, Any]:
    """Dense and sparse train_step and the matmul baseline per precision, taking turns."""
    clt, x, y = make_clt(s, device, rate=0.01, bandwidth=0.01)
    l0, support = support_of(clt, x)
    flops = step_flops(s.layers, s.d_model, s.features, s.batch)
    out: dict[str, Any] = {"shape": vars(s), "l0_frac": l0, "support_frac": support,
                           "flops_per_step": flops}
    for name in PRECISIONS:
        mm = matmul_baseline(s, device)  # under bf16 autocast its matmuls run in bf16, too
        runs = {"dense": steps_of(clt, x, y, "dense"), "sparse": steps_of(clt, x, y, "sparse"),
                "matmuls": mm}
        with precision(device, name):
            t = interleaved(runs, device, reps, warmup)
        out[name] = {"t_dense": t["dense"], "t_sparse": t["sparse"], "t_matmuls": t["matmuls"],
                     "tokens_per_s_dense": s.batch / t["dense"],
                     "tokens_per_s_sparse": s.batch / t["sparse"],
                     "achieved_flop_s": flops / t["dense"], "matmul_flop_s": flops / t["matmuls"],
                     "flop_ratio": t["matmuls"] / t["dense"],
                     "sparse_speedup": t["dense"] / t["sparse"]}
        print(f"  {name:<9} dense {1e3 * t['dense']:8.1f} ms ({s.batch / t['dense']:9,.0f} tok/s, "
              f"{flops / t['dense'] / 1e12:6.1f} TFLOP/s; matmuls alone "
              f"{flops / t['matmuls'] / 1e12:6.1f}), sparse {1e3 * t['sparse']:8.1f} ms "
              f"({s.batch / t['sparse']:9,.0f} tok/s): {t['dense'] / t['sparse']:.2f}×",
              flush=True)
    return out


def bench_crossover(s: Shape, device: torch.device, reps: int, warmup: int,
                    rates: list[float]) -> list[dict[str, Any]]:
    rows = []
    for rate in rates:
        clt, x, y = make_clt(s, device, rate=rate, bandwidth=0.01)
        l0, support = support_of(clt, x)
        with precision(device, "float32"):
            t = interleaved({"dense": steps_of(clt, x, y, "dense"),
                             "sparse": steps_of(clt, x, y, "sparse")}, device, reps, warmup)
        rows.append({"rate": rate, "l0_frac": l0, "support_frac": support, **t,
                     "speedup": t["dense"] / t["sparse"]})
        print(f"  support {100 * support:6.2f}%: dense {1e3 * t['dense']:8.1f} ms, sparse "
              f"{1e3 * t['sparse']:8.1f} ms: {t['dense'] / t['sparse']:.2f}×", flush=True)
        del clt, x, y
    return rows


# --- producer, ray ---------------------------------------------------------------------------


def random_gpt2(folder: Path, layers: int, d: int) -> None:
    """GPT-2 small's shape (or a smaller one) with random weights and the toy tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from clt_ray.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=max(1, d // 64))
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    build_tokenizer().save_pretrained(folder)


def bench_producer(folder: Path, device: torch.device, tokens: int) -> dict[str, Any]:
    from clt_ray.cache.produce import write_cache
    from clt_ray.config import DataConfig, ModelConfig
    from clt_ray.lm import load_model

    model_cfg = ModelConfig(name=str(folder), device=str(device))
    data = DataConfig(lm_batch_size=64)
    lm, tok = load_model(model_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        m = write_cache(lm, tok, data, model_cfg, f"{tmp}/cache", tokens=tokens, progress=False,
                        log=lambda s: None)
        seconds = time.perf_counter() - t0
    out = {"tokens": m.tokens, "seconds": seconds, "tokens_per_s": m.tokens / seconds,
           "bytes_per_token": sum(f.bytes for f in m.files) / m.tokens}
    print(f"  {m.tokens:,} tokens in {seconds:.1f} s: {out['tokens_per_s']:,.0f} tokens/s "
          f"({out['bytes_per_token']:,.0f} bytes/token)", flush=True)
    return out


def bench_ray(folder: Path, device: torch.device, steps: int, batch: int,
              expansion: float) -> dict[str, Any]:
    from clt_ray.actors.ray_session import ensure_ray
    from clt_ray.actors.trainer import train_on_ray

    from clt_ray.config import parse_config

    cfg = parse_config({
        "model": {"name": str(folder), "device": str(device), "dtype": "float32"},
        "clt": {"expansion_factor": expansion, "bandwidth": 0.01, "init_firing_rate": 0.01},
        "train": {"steps": steps, "batch_size": batch, "log_every": 5, "eval_every": steps,
                  "checkpoint_every": steps, "init_tokens": batch, "progress": False},
        "data": {"source": "lm", "corpus": "toy", "shuffle_buffer": 4 * batch,
                 "heldout_tokens": batch, "lm_batch_size": 64},
    })
    ensure_ray("local")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_on_ray(cfg, Path(tmp) / "run", shards=1, splice=False, log=lambda s: None)
        seconds = time.perf_counter() - t0
        recs = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text()
                .splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in recs if r.get("kind") == "train"]
    out = {"steps": result.step, "seconds": seconds, "tokens_per_s_last": rates[-1] if rates
           else None, "decoders": sorted({r.get("decoder") for r in recs if r.get("kind")
                                          == "train"} - {None}),
           "ev_mean": (sum(ev) / len(ev) if (ev := (result.metrics or {}).get(
               "explained_variance")) else None)}
    print(f"  {out['steps']} steps in {seconds:.1f} s (Ray start, LM load and checkpoint "
          f"included); last logged {out['tokens_per_s_last']} tokens/s", flush=True)
    return out


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run (e.g. on CPU)")
    p.add_argument("--sections", nargs="+", default=["equal", "step", "crossover", "producer",
                                                     "ray"],
                   choices=["equal", "step", "crossover", "producer", "ray"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here (torch.cuda.is_available() is False); --device cpu --quick "
                "runs the same code on a small shape")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gpt2 = Shape("gpt2", 12, 768, 6144, 4096) if not args.quick else Shape("quick", 4, 128,
                                                                            512, 256)
    lm_layers, lm_d = (12, 768) if not args.quick else (2, 128)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__,
                              "cuda": torch.version.cuda, "quick": args.quick}
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)

    def equal() -> None:
        print("(equal) sparse vs dense train_step, fp32, 5 steps", flush=True)
        result["equal"] = check_equal(device)
        print(f"  max relative difference {result['equal']['max_rel_diff']:.2e}", flush=True)

    def step() -> None:
        print(f"(step) L {gpt2.layers}, d {gpt2.d_model}, F {gpt2.features}, B {gpt2.batch}",
              flush=True)
        r = bench_precisions(gpt2, device, args.reps, args.warmup)
        result["step"] = r
        result["achieved_flop_s"] = {k: round(r[k]["achieved_flop_s"]) for k in PRECISIONS}
        result["matmul_flop_s"] = {k: round(r[k]["matmul_flop_s"]) for k in PRECISIONS}
        result["flop_ratio_gpt2_dense"] = round(r["float32"]["flop_ratio"], 3)
        result["sparse_speedup_gpt2"] = round(r["float32"]["sparse_speedup"], 3)
        result["sparse_speedup_by_precision"] = {k: round(r[k]["sparse_speedup"], 3)
                                                 for k in PRECISIONS}

    def crossover() -> None:
        print("(crossover) fp32 train_step by support density", flush=True)
        rows = bench_crossover(gpt2, device, max(2, args.reps // 2), 1,
                               [0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
        result["crossover"] = rows
        faster = 0.0  # the densest support before the first one where sparse is not faster
        for r in sorted(rows, key=lambda r: r["support_frac"]):
            if r["speedup"] <= 1:
                break
            faster = r["support_frac"]
        result["sparse_max_density"] = round(faster, 4)
        print(f"  sparse is faster up to a support density of {result['sparse_max_density']}",
              flush=True)

    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name) / "gpt2-random"

    def producer() -> None:
        print("(producer) write_cache on the device", flush=True)
        if not folder.exists():
            random_gpt2(folder, lm_layers, lm_d)
        result["producer"] = bench_producer(folder, device, 16384 if args.quick else 262144)

    def ray_run() -> None:
        print("(ray) a 1-shard Ray Train run on the device", flush=True)
        if not folder.exists():
            random_gpt2(folder, lm_layers, lm_d)
        result["ray"] = bench_ray(folder, device, 10 if args.quick else 40,
                                  256 if args.quick else 4096, 2 if args.quick else 8)

    sections = {"equal": equal, "step": step, "crossover": crossover, "producer": producer,
                "ray": ray_run}
    for name in args.sections:  # one section failing (e.g. a kernel missing) does not stop the rest
        try:
            sections[name]()
        except Exception as exc:  # noqa: BLE001
            print(f"  ({name}) failed: {type(exc).__name__}: {exc}", flush=True)
            result.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tmp.cleanup()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"wall {result['wall_s']} s", flush=True)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
