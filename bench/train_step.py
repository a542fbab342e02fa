"""Benchmark: how close the CLT training step gets to raw matmul speed, what the sparse decoder
buys, and how the step grows with depth. Everything is measured side by side in one run, on one
device, through the code training runs (`clt_ray.nn.step`).

(a) Achieved FLOP/s of the dense training step's forward + backward (`compute_grads`) divided by
    this device's torch matmul FLOP/s on the same matmuls (same shapes, same layouts, run back
    to back with nothing else). FLOPs are counted from shapes (multiply-add = 2):
      encoder forward   2·B·L·F·d            h = W_enc x + b_enc
      encoder backward  2·B·L·F·d            ∂W_enc (x needs no gradient)
      decoder forward   2·B·F·d·L(L+1)/2     ŷ_k = Σ_{l≤k} W_dec,l→k a_l
      decoder backward  2 × the forward      ∂W_dec and ∂a
    Everything else (activation, losses, norms, the Adam update) counts as zero FLOPs, so
    ratio = t_matmuls / t_step: 1 means the step is nothing but its matmuls.
    "+Adam" is the whole `train_step` (schedules + grads + torch Adam), for reference.
(b) Decoder alone at a given L0: dense (`decode`) against `decode(sparse=True)` (one
    embedding_bag per source layer), forward and forward + backward, activations with exactly
    L0 active features per token and layer; "step" rows: compute_grads dense vs sparse.
(c) Crossover: the whole train_step (grads + Adam) dense vs sparse over support densities (the
    share of [B, L, F] entries whose ∂L/∂a the step needs, `grad_support`; here L0/F, JumpReLU's
    window made negligible by a small bandwidth). Where sparse stops being faster is what
    `clt_ray.nn.step.SPARSE_MAX_DENSITY` holds for this device.
(d) Depth: train_step time dense and sparse for L ∈ {4, 8, 12, 16} at fixed d, F per layer, B
    and L0/F; p fitted in time ∝ L^p (dense ≈ 2: the decoder has L(L+1)/2 blocks).
(e) GPT-2 small's shape (L 12, d 768, F 6144 a layer, B 1024, L0 ≈ 1% of F): tokens/s of the
    sparse train_step ÷ the dense one.
The train_step rows use lr 1e-9 (the weights barely move, so L0 stays where b_enc put it; Adam's
work is the same at any lr) and a JumpReLU bandwidth of --bandwidth (default 0.01: support ≈ L0;
the support density printed is what the sparse step pays for — the default config's bandwidth
1.0 puts ~50% of pre-activations in the window at init, where `auto` decodes densely).

    python bench/train_step.py                      # (a), (b): gpt2-small shape and toy shape
    python bench/train_step.py --json               # (a) gpt2, (d), (e); last line: JSON
    python bench/train_step.py --sections c --shapes gpt2 toy --batch 256
    python bench/train_step.py --shapes gpt2 --device cuda --batch 4096 --features 24576
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt_ray.config import CLTConfig, LossConfig, LRSchedule, OptimConfig
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.nn.step import compute_grads, make_optimizer, train_step
from clt_ray.plan import step_flops


@dataclass
class Shape:
    name: str
    layers: int
    d_model: int
    features: int
    batch: int


PRESETS = {
    # GPT-2 small's L and d; F and B sized for a 2-core CPU (use --features/--batch on a GPU)
    "gpt2": Shape("gpt2", 12, 768, 2048, 256),
    # the toy models' shape (clt_ray.toy: 4 layers, d 96), expansion factor 8, the default batch
    "toy": Shape("toy", 4, 96, 768, 1024),
}
LOSS = LossConfig()
STILL = OptimConfig(lr=LRSchedule(lr=1e-9, warmup_frac=0.0, decay="constant"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of fn() over reps runs after warmup runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(runs: dict[Any, Callable[[], object]], device: torch.device, reps: int,
                warmup: int) -> dict[Any, float]:
    """Median seconds of each run, the runs taking turns (a, b, a, b, …) after warmup turns."""
    times: dict[Any, list[float]] = {name: [] for name in runs}
    for i in range(warmup + reps):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_clt(s: Shape, device: torch.device, rate: float | None = None,
             bandwidth: float = 1.0) -> tuple:
    """(CLT, raw x, raw y); with `rate`, b_enc is set from data so features fire at that rate."""
    cfg = CLTConfig(n_layers=s.layers, d_model=s.d_model, n_features=s.features,
                    bandwidth=bandwidth)
    clt = CrossLayerTranscoder(cfg, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s.batch, s.layers, s.d_model, device=device, generator=gen) * 3
    y = torch.randn(s.batch, s.layers, s.d_model, device=device, generator=gen) * 2
    clt.set_norm_scales(x, y)
    if rate is not None:
        clt.init_b_enc_from_data(clt.normalize(x)[0], rate)
    return clt, x, y


def matmul_baseline(s: Shape, device: torch.device) -> Callable[[], None]:
    """The step's matmuls alone, on fresh tensors of the same shapes and layouts."""
    L, d, F, B = s.layers, s.d_model, s.features, s.batch
    g = torch.Generator(device=device).manual_seed(1)
    r = lambda *shape: torch.randn(*shape, device=device, generator=g)
    xT, W_encT, b = r(L, B, d), r(L, d, F), r(L, 1, F)
    g_pre = r(L, B, F)
    acts = [r(B, F) for _ in range(L)]
    W = [r(F, (L - l) * d) for l in range(L)]
    gy = [r(B, (L - l) * d) for l in range(L)]

    def run() -> None:
        torch.baddbmm(b, xT, W_encT)  # encoder forward
        torch.bmm(g_pre.transpose(1, 2), xT)  # ∂W_enc
        for l in range(L):
            acts[l] @ W[l]  # decoder forward
            acts[l].T @ gy[l]  # ∂W_dec
            gy[l] @ W[l].T  # ∂a

    return run


def bench_step(s: Shape, device: torch.device, reps: int, warmup: int) -> dict:
    clt, x, y = make_clt(s, device, rate=0.01)
    step = lambda: compute_grads(clt, x, y, LOSS, 1e-3, decoder="dense")
    t = interleaved({"step": step, "mm": matmul_baseline(s, device)}, device, reps, warmup)
    t_step, t_mm = t["step"], t["mm"]
    opt_cfg = OptimConfig()
    opt = make_optimizer(clt, opt_cfg)
    counter = iter(range(10**9))
    full = lambda: train_step(clt, opt, x, y, step=next(counter), total_steps=10**9,
                              loss_cfg=LOSS, optim_cfg=opt_cfg, decoder="dense")
    t_full = timeit(full, device, reps, warmup)
    flops = step_flops(s.layers, s.d_model, s.features, s.batch)
    return {"flops": flops, "t_step": t_step, "t_mm": t_mm, "t_full": t_full,
            "ratio": t_mm / t_step}


def sparse_acts(s: Shape, frac: float, device: torch.device) -> torch.Tensor:
    """[B, L, F] with exactly round(frac·F) positive entries per token and layer, random places."""
    k = max(1, round(frac * s.features))
    g = torch.Generator(device=device).manual_seed(2)
    scores = torch.rand(s.batch, s.layers, s.features, device=device, generator=g)
    idx = scores.topk(k, dim=-1).indices
    vals = torch.rand(s.batch, s.layers, k, device=device, generator=g) + 0.1
    return torch.zeros_like(scores).scatter_(-1, idx, vals)


def bench_sparse(s: Shape, frac: float, device: torch.device, reps: int, warmup: int,
                 with_step: bool, bandwidth: float) -> dict:
    clt, x, y = make_clt(s, device, rate=frac if with_step else None, bandwidth=bandwidth)
    acts = sparse_acts(s, frac, device)
    out: dict = {"l0": round(frac * s.features)}
    ref = clt.decode(acts.detach())
    err = (clt.decode(acts.detach(), sparse=True) - ref).abs().max().item()
    out["max_err"] = err / ref.abs().max().item()
    for sparse in (False, True):
        with torch.no_grad():
            out[("fwd", sparse)] = timeit(lambda sp=sparse: clt.decode(acts, sparse=sp), device,
                                          reps, warmup)
        a = acts.clone().requires_grad_(True)
        g = torch.randn_like(ref)

        def fwd_bwd(a: torch.Tensor = a, g: torch.Tensor = g, sparse: bool = sparse) -> None:
            clt.zero_grad(set_to_none=True)
            a.grad = None
            clt.decode(a, sparse=sparse).backward(g)

        out[("fwdbwd", sparse)] = timeit(fwd_bwd, device, reps, warmup)
    if with_step:
        for mode in ("dense", "sparse"):
            step = lambda m=mode: compute_grads(clt, x, y, LOSS, 1e-3, decoder=m)
            out[("step", mode == "sparse")] = timeit(step, device, reps, warmup)
    return out


def support_of(clt: CrossLayerTranscoder, x: torch.Tensor) -> tuple[float, float]:
    """(L0/F, support density) of the batch x: what the sparse step pays for."""
    with torch.no_grad():
        pre, acts = clt.encode(clt.normalize(x)[0])
        return (acts != 0).float().mean().item(), clt.grad_support(pre, acts).float().mean().item()


def train_steps(s: Shape, device: torch.device, rate: float,
                bandwidth: float) -> tuple[dict, dict[str, Callable[[], object]], Callable]:
    """(L0/F and support of the batch, {dense, sparse: one whole train_step (grads + Adam)},
    the batch's L0/F now) on one CLT and batch."""
    clt, x, y = make_clt(s, device, rate=rate, bandwidth=bandwidth)
    l0, support = support_of(clt, x)
    opt = make_optimizer(clt, STILL)
    counter = iter(range(10**9))
    runs = {m: lambda m=m: train_step(clt, opt, x, y, step=next(counter), total_steps=10**9,
                                      loss_cfg=LOSS, optim_cfg=STILL, decoder=m)
            for m in ("dense", "sparse")}
    return {"l0_frac": l0, "support_frac": support}, runs, lambda: support_of(clt, x)[0]


def bench_train_steps(s: Shape, device: torch.device, rate: float, bandwidth: float, reps: int,
                      warmup: int) -> dict:
    """The whole train_step, dense and sparse, taking turns (a burst of load elsewhere on the
    machine hits both alike)."""
    out, runs, l0_now = train_steps(s, device, rate, bandwidth)
    out.update({f"t_{m}": t for m, t in interleaved(runs, device, reps, warmup).items()})
    out["speedup"] = out["t_dense"] / out["t_sparse"]
    out["l0_frac_after"] = l0_now()
    return out


def bench_depth(layers: list[int], d: int, F: int, B: int, device: torch.device, rate: float,
                bandwidth: float, reps: int, warmup: int) -> list[dict]:
    """bench_train_steps for each L, all taking turns in every round (L 4 dense, L 4 sparse,
    L 8 dense, …), so a change of load during the run does not bend the fitted exponent."""
    setups = [train_steps(Shape("depth", L, d, F, B), device, rate, bandwidth) for L in layers]
    runs = {(i, m): fn for i, (_, r, _) in enumerate(setups) for m, fn in r.items()}
    times = interleaved(runs, device, reps, warmup)
    rows = []
    for i, (out, _, _) in enumerate(setups):
        out.update({f"t_{m}": times[(i, m)] for m in ("dense", "sparse")})
        out["speedup"] = out["t_dense"] / out["t_sparse"]
        rows.append(out)
    return rows


def fit_exponent(layers: list[int], times: list[float]) -> float:
    """p of the least-squares fit log t = p·log L + c."""
    lx = [math.log(v) for v in layers]
    ly = [math.log(v) for v in times]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return (sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
            / sum((a - mx) ** 2 for a in lx))


def main() -> None:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", choices=list("abcde"), nargs="+",
                   help="what to run (default: a b; with --json: a d e)")
    p.add_argument("--json", action="store_true",
                   help="end with one JSON object: sparse_speedup_gpt2, depth_exponent_dense/"
                        "_sparse, flop_ratio_gpt2_dense and the figures behind them")
    p.add_argument("--shapes", nargs="+", default=None, choices=[*PRESETS, "custom"],
                   help="shapes of (a), (b), (c) (default: gpt2 toy; with --json: gpt2)")
    p.add_argument("--layers", type=int, help="override L (custom: required)")
    p.add_argument("--d-model", type=int, help="override d")
    p.add_argument("--features", type=int, help="override F (features per layer)")
    p.add_argument("--batch", type=int, help="override B (tokens per step)")
    p.add_argument("--l0-fracs", type=float, nargs="+", default=[0.005, 0.01, 0.05],
                   help="L0/F values for (b)")
    p.add_argument("--support-fracs", type=float, nargs="+",
                   default=[0.01, 0.02, 0.04, 0.08, 0.16], help="support densities for (c)")
    p.add_argument("--l0-frac", type=float, default=0.01, help="L0/F of (d) and (e)")
    p.add_argument("--bandwidth", type=float, default=0.01,
                   help="JumpReLU bandwidth ε of the step rows of (b)–(e)")
    p.add_argument("--gpt2-features", type=int, default=6144, help="F of (e)")
    p.add_argument("--gpt2-batch", type=int, default=1024, help="B of (e)")
    p.add_argument("--depth-layers", type=int, nargs="+", default=[4, 8, 12, 16])
    p.add_argument("--depth-shape", type=int, nargs=3, default=[256, 2048, 512],
                   metavar=("D", "F", "B"), help="d, F per layer and B of (d)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (both sides)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    sections = set(args.sections or (["a", "d", "e"] if args.json else ["a", "b"]))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    shapes = []
    for name in args.shapes or (["gpt2"] if args.json else ["gpt2", "toy"]):
        base = PRESETS.get(name, Shape("custom", 0, 0, 0, 0))
        s = Shape(name, args.layers or base.layers, args.d_model or base.d_model,
                  args.features or base.features, args.batch or base.batch)
        if min(s.layers, s.d_model, s.features, s.batch) <= 0:
            p.error("custom needs --layers, --d-model, --features and --batch")
        shapes.append(s)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        where += f" (load average {load:.1f} on {cores} cores)"
        if load > cores and torch.get_num_threads() > 1:
            print(f"warning: load {load:.1f} > {cores} cores: multi-threaded timings are erratic "
                  "on a busy machine; --threads 1 gives steadier ratios", file=sys.stderr)
    print(f"device: {where}; torch {torch.__version__}; fp32; median of {args.reps} "
          f"(after {args.warmup} warm-up)")
    result: dict = {"device": where, "torch": torch.__version__, "reps": args.reps}
    if "a" in sections:
        print("\n(a) dense training step (compute_grads: forward + backward) vs torch matmuls")
        print(f"{'shape':<7}{'L':>4}{'d':>6}{'F':>7}{'B':>6}{'GFLOP':>8}{'step ms':>10}"
              f"{'mm ms':>9}{'step GF/s':>11}{'mm GF/s':>9}{'ratio':>7}{'+Adam ms':>10}")
        for s in shapes:
            r = bench_step(s, device, args.reps, args.warmup)
            gf = r["flops"] / 1e9
            print(f"{s.name:<7}{s.layers:>4}{s.d_model:>6}{s.features:>7}{s.batch:>6}{gf:>8.1f}"
                  f"{1e3 * r['t_step']:>10.1f}{1e3 * r['t_mm']:>9.1f}{gf / r['t_step']:>11.1f}"
                  f"{gf / r['t_mm']:>9.1f}{r['ratio']:>7.2f}{1e3 * r['t_full']:>10.1f}",
                  flush=True)
            if s.name == "gpt2":
                result["flop_ratio_gpt2_dense"] = round(r["ratio"], 3)
                # the profile `clt-ray plan --profile` reads: FLOP/s of the dense step and matmuls
                result["achieved_flop_s"] = round(r["flops"] / r["t_step"])
                result["matmul_flop_s"] = round(r["flops"] / r["t_mm"])
                result["flop_ratio_shape"] = {"L": s.layers, "d": s.d_model, "F": s.features,
                                              "B": s.batch}
    if "b" in sections:
        print("\n(b) decoder, dense vs decode(sparse=True) at the same L0; ms and speed-up; "
              "step: compute_grads")
        print(f"{'shape':<7}{'L0/F':>7}{'L0':>6}{'fwd dense':>11}{'sparse':>9}{'×':>6}"
              f"{'f+b dense':>11}{'sparse':>9}{'×':>6}{'step dense':>12}{'sparse':>9}{'×':>6}"
              f"{'rel err':>9}")
        for s in shapes:
            for frac in args.l0_fracs:
                r = bench_sparse(s, frac, device, args.reps, args.warmup, True, args.bandwidth)
                print(f"{s.name:<7}{100 * frac:>6.1f}%{r['l0']:>6}"
                      f"{1e3 * r[('fwd', False)]:>11.1f}{1e3 * r[('fwd', True)]:>9.1f}"
                      f"{r[('fwd', False)] / r[('fwd', True)]:>6.1f}"
                      f"{1e3 * r[('fwdbwd', False)]:>11.1f}{1e3 * r[('fwdbwd', True)]:>9.1f}"
                      f"{r[('fwdbwd', False)] / r[('fwdbwd', True)]:>6.1f}"
                      f"{1e3 * r[('step', False)]:>12.1f}{1e3 * r[('step', True)]:>9.1f}"
                      f"{r[('step', False)] / r[('step', True)]:>6.1f}{r['max_err']:>9.1e}",
                      flush=True)
    if "c" in sections:
        print("\n(c) crossover: train_step (grads + Adam) dense vs sparse by support density")
        print(f"{'shape':<7}{'L':>4}{'d':>6}{'F':>7}{'B':>6}{'L0/F':>8}{'support':>9}"
              f"{'dense ms':>10}{'sparse ms':>11}{'×':>6}")
        result["crossover"] = []
        for s in shapes:
            for frac in args.support_fracs:
                r = bench_train_steps(s, device, frac, args.bandwidth, args.reps, args.warmup)
                print(f"{s.name:<7}{s.layers:>4}{s.d_model:>6}{s.features:>7}{s.batch:>6}"
                      f"{100 * r['l0_frac']:>7.2f}%{100 * r['support_frac']:>8.2f}%"
                      f"{1e3 * r['t_dense']:>10.1f}{1e3 * r['t_sparse']:>11.1f}"
                      f"{r['speedup']:>6.2f}", flush=True)
                result["crossover"].append({"shape": s.name, **r})
    if "d" in sections:
        d, F, B = args.depth_shape
        print(f"\n(d) depth: train_step at d {d}, F {F} a layer, B {B}, L0/F "
              f"{100 * args.l0_frac:.1f}%")
        print(f"{'L':>4}{'L0/F':>8}{'support':>9}{'dense ms':>10}{'sparse ms':>11}{'×':>6}")
        rows = bench_depth(args.depth_layers, d, F, B, device, args.l0_frac, args.bandwidth,
                           args.reps, args.warmup)
        for L, r in zip(args.depth_layers, rows, strict=True):
            print(f"{L:>4}{100 * r['l0_frac']:>7.2f}%{100 * r['support_frac']:>8.2f}%"
                  f"{1e3 * r['t_dense']:>10.1f}{1e3 * r['t_sparse']:>11.1f}{r['speedup']:>6.2f}",
                  flush=True)
        for mode in ("dense", "sparse"):
            times = [r[f"t_{mode}"] for r in rows]
            result[f"depth_exponent_{mode}"] = round(fit_exponent(args.depth_layers, times), 3)
        result["depth"] = {"d": d, "F": F, "B": B, "layers": args.depth_layers,
                           "t_dense": [r["t_dense"] for r in rows],
                           "t_sparse": [r["t_sparse"] for r in rows]}
        print(f"  p (time ∝ L^p): dense {result['depth_exponent_dense']}, "
              f"sparse {result['depth_exponent_sparse']}")
    if "e" in sections:
        s = replace(PRESETS["gpt2"], features=args.gpt2_features, batch=args.gpt2_batch)
        print(f"\n(e) GPT-2 small's shape: L {s.layers}, d {s.d_model}, F {s.features} a layer, "
              f"B {s.batch}; train_step dense vs sparse")
        r = bench_train_steps(s, device, args.l0_frac, args.bandwidth, args.reps, args.warmup)
        print(f"  L0/F {100 * r['l0_frac']:.2f}% (after: {100 * r['l0_frac_after']:.2f}%), "
              f"support {100 * r['support_frac']:.2f}%: dense {r['t_dense']:.2f} s "
              f"({s.batch / r['t_dense']:.0f} tokens/s), sparse {r['t_sparse']:.2f} s "
              f"({s.batch / r['t_sparse']:.0f} tokens/s): {r['speedup']:.2f}×", flush=True)
        result["sparse_speedup_gpt2"] = round(r["speedup"], 3)
        result["gpt2"] = {"L": s.layers, "d": s.d_model, "F": s.features, "B": s.batch,
                          "bandwidth": args.bandwidth, **r,
                          "tokens_per_s_dense": s.batch / r["t_dense"],
                          "tokens_per_s_sparse": s.batch / r["t_sparse"]}
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
