"""Benchmark: how close the CLT training step gets to raw matmul speed, and what the sparse
decoder buys. Everything is measured side by side in one run, on one device.

(a) Achieved FLOP/s of the training step's forward + backward (`clt_ray.train.loop.compute_grads`,
    the code training runs) divided by this device's torch matmul FLOP/s on the same matmuls
    (same shapes, same layouts, run back to back with nothing else). FLOPs are counted from
    shapes (multiply-add = 2):
      encoder forward   2·B·L·F·d            h = W_enc x + b_enc
      encoder backward  2·B·L·F·d            ∂W_enc (x needs no gradient)
      decoder forward   2·B·F·d·L(L+1)/2     ŷ_k = Σ_{l≤k} W_dec,l→k a_l
      decoder backward  2 × the forward      ∂W_dec and ∂a
    Everything else (activation, losses, norms, the Adam update) counts as zero FLOPs, so
    ratio = t_matmuls / t_step: 1 means the step is nothing but its matmuls. Goal ≥ 0.6.
    "+Adam" is the whole `train_step` (schedules + grads + torch Adam), for reference.
(b) Decoder at a given L0: dense (`decode`) against sparse (`decode(sparse=True)`, one
    embedding_bag per source layer over the active rows), forward and forward + backward (W_dec
    gradients and ∂a on the active entries), activations with exactly L0 active features per token
    and layer. Goal ≥ 3× at L0/F ≤ 1%. "step" rows: the whole compute_grads with the dense
    decoder vs with the sparse one swapped in (b_enc set from data so the CLT fires at that rate);
    note the sparse step then leaves out JumpReLU's θ-gradient from inactive in-window entries
    unless `decode(..., support=...)` is given them (see CrossLayerTranscoder.decode).

    python bench/train_step.py                      # gpt2-small shape and the toy shape, CPU
    python bench/train_step.py --shapes gpt2 --device cuda --batch 4096 --features 24576
    python bench/train_step.py --shapes custom --layers 16 --d-model 2048 --features 8192
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt_ray.config import CLTConfig, LossConfig, OptimConfig
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.nn.step import compute_grads, make_optimizer, train_step


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


def step_flops(L: int, d: int, F: int, B: int) -> int:
    enc = 2 * B * L * F * d
    dec = 2 * B * F * d * L * (L + 1) // 2
    return 2 * enc + 3 * dec


def make_clt(s: Shape, device: torch.device, rate: float | None = None) -> tuple:
    """(CLT, raw x, raw y); with `rate`, b_enc is set from data so features fire at that rate."""
    cfg = CLTConfig(n_layers=s.layers, d_model=s.d_model, n_features=s.features)
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
    loss_cfg = LossConfig()
    step = lambda: compute_grads(clt, x, y, loss_cfg, 1e-3)
    t_step = timeit(step, device, reps, warmup)
    t_mm = timeit(matmul_baseline(s, device), device, reps, warmup)
    opt_cfg = OptimConfig()
    opt = make_optimizer(clt, opt_cfg)
    counter = iter(range(10**9))
    full = lambda: train_step(clt, opt, x, y, step=next(counter), total_steps=10**9,
                              loss_cfg=loss_cfg, optim_cfg=opt_cfg)
    t_full = timeit(full, device, reps, warmup)
    flops = step_flops(s.layers, s.d_model, s.features, s.batch)
    return {"flops": flops, "t_step": t_step, "t_mm": t_mm, "t_full": t_full}


def sparse_acts(s: Shape, frac: float, device: torch.device) -> torch.Tensor:
    """[B, L, F] with exactly round(frac·F) positive entries per token and layer, random places."""
    k = max(1, round(frac * s.features))
    g = torch.Generator(device=device).manual_seed(2)
    scores = torch.rand(s.batch, s.layers, s.features, device=device, generator=g)
    idx = scores.topk(k, dim=-1).indices
    vals = torch.rand(s.batch, s.layers, k, device=device, generator=g) + 0.1
    return torch.zeros_like(scores).scatter_(-1, idx, vals)


def bench_sparse(s: Shape, frac: float, device: torch.device, reps: int, warmup: int,
                 with_step: bool) -> dict:
    clt, x, y = make_clt(s, device, rate=frac if with_step else None)
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
        loss_cfg = LossConfig()
        step = lambda: compute_grads(clt, x, y, loss_cfg, 1e-3)
        res = compute_grads(clt, x, y, loss_cfg, 1e-3)
        out["step_l0"] = float(res.l0_per_layer.mean())
        out[("step", False)] = timeit(step, device, reps, warmup)
        clt.decode = lambda acts, bias=True: CrossLayerTranscoder.decode(  # type: ignore
            clt, acts, bias=bias, sparse=True)
        out[("step", True)] = timeit(step, device, reps, warmup)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["gpt2", "toy"],
                   choices=[*PRESETS, "custom"])
    p.add_argument("--layers", type=int, help="override L (custom: required)")
    p.add_argument("--d-model", type=int, help="override d")
    p.add_argument("--features", type=int, help="override F (features per layer)")
    p.add_argument("--batch", type=int, help="override B (tokens per step)")
    p.add_argument("--l0-fracs", type=float, nargs="+", default=[0.005, 0.01, 0.05],
                   help="L0/F values for (b)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (both sides)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip", choices=["a", "b"], nargs="*", default=[])
    p.add_argument("--no-step-sparse", action="store_true",
                   help="(b): skip the whole-step rows")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    shapes = []
    for name in args.shapes:
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
    if "a" not in args.skip:
        print("\n(a) training step (compute_grads: forward + backward) vs torch matmuls, same shapes")
        print(f"{'shape':<7}{'L':>4}{'d':>6}{'F':>7}{'B':>6}{'GFLOP':>8}{'step ms':>10}"
              f"{'mm ms':>9}{'step GF/s':>11}{'mm GF/s':>9}{'ratio':>7}{'+Adam ms':>10}")
        for s in shapes:
            r = bench_step(s, device, args.reps, args.warmup)
            gf = r["flops"] / 1e9
            print(f"{s.name:<7}{s.layers:>4}{s.d_model:>6}{s.features:>7}{s.batch:>6}{gf:>8.1f}"
                  f"{1e3 * r['t_step']:>10.1f}{1e3 * r['t_mm']:>9.1f}{gf / r['t_step']:>11.1f}"
                  f"{gf / r['t_mm']:>9.1f}{r['t_mm'] / r['t_step']:>7.2f}"
                  f"{1e3 * r['t_full']:>10.1f}", flush=True)
    if "b" not in args.skip:
        print("\n(b) decoder, dense vs sparse (embedding_bag over active rows) at the same L0; "
              "ms and speed-up")
        print(f"{'shape':<7}{'L0/F':>7}{'L0':>6}{'fwd dense':>11}{'sparse':>9}{'×':>6}"
              f"{'f+b dense':>11}{'sparse':>9}{'×':>6}{'step dense':>12}{'sparse':>9}{'×':>6}"
              f"{'rel err':>9}")
        for s in shapes:
            for frac in args.l0_fracs:
                r = bench_sparse(s, frac, device, args.reps, args.warmup,
                                 with_step=not args.no_step_sparse)
                row = (f"{s.name:<7}{100 * frac:>6.1f}%{r['l0']:>6}"
                       f"{1e3 * r[('fwd', False)]:>11.1f}{1e3 * r[('fwd', True)]:>9.1f}"
                       f"{r[('fwd', False)] / r[('fwd', True)]:>6.1f}"
                       f"{1e3 * r[('fwdbwd', False)]:>11.1f}{1e3 * r[('fwdbwd', True)]:>9.1f}"
                       f"{r[('fwdbwd', False)] / r[('fwdbwd', True)]:>6.1f}")
                if ("step", True) in r:
                    row += (f"{1e3 * r[('step', False)]:>12.1f}{1e3 * r[('step', True)]:>9.1f}"
                            f"{r[('step', False)] / r[('step', True)]:>6.1f}")
                else:
                    row += f"{'':>27}"
                print(row + f"{r['max_err']:>9.1e}", flush=True)
        if not args.no_step_sparse:
            print("  step rows: b_enc set from data for that firing rate (actual L0 differs a "
                  "little); sparse step omits θ-gradients of inactive in-window entries")


if __name__ == "__main__":
    main()
