"""Downstream effect of quantised caches: a CLT trained from an int8 / int4 / int2 cache against
the same CLT trained from live fp32 activations: same seed, same tokens in the same order.

The caches hold `lm_batch_size` windows per file and are read in written order
(`data.cache_order: written`), so they replay the live stream block for block and the runs differ
only by quantisation. Prints held-out EV (mean over layers, on live fp32 held-out activations), L0
and the EV change against fp32. Goal (issue 4): int8 within 0.002, int4 within 0.01; int2 reported.

    python bench/cache_ev.py                    # toy GPT-2, 300 steps
    python bench/cache_ev.py --arch llama --steps 600
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt_ray.cache.produce import write_cache
from clt_ray.config import toy_config
from clt_ray.lm import load_model
from clt_ray.train.run import train_from_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--zstd", type=int, default=1)
    p.add_argument("--workdir", default=None, help="Default: a temporary folder.")
    args = p.parse_args()

    base = toy_config(args.arch)
    base = base.model_copy(update={"train": base.train.model_copy(update={
        "steps": args.steps, "progress": False, "eval_every": 0, "checkpoint_every": 0})})
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clt-ray-cache-ev-"))
    lm, tokenizer = load_model(base.model)
    need = base.train.init_tokens + args.steps * base.train.batch_size + 2 * base.data.shuffle_buffer

    runs = {"fp32 (live)": base}
    for bits in args.bits:
        uri = str(work / f"int{bits}")
        t = time.perf_counter()
        write_cache(lm, tokenizer, base.data, base.model, uri, tokens=need, bits=bits,
                    zstd_level=args.zstd or None, windows_per_file=base.data.lm_batch_size,
                    progress=False, log=lambda s: None)
        print(f"int{bits} cache: {need:,}+ tokens in {time.perf_counter() - t:.0f} s at {uri}")
        runs[f"int{bits} cache"] = base.model_copy(update={"data": base.data.model_copy(
            update={"source": "cache", "cache": uri, "cache_order": "written"})})

    print(f"\ntoy {args.arch}, {args.steps} steps × {base.train.batch_size} tokens, "
          f"{base.clt.n_features} features a layer; held-out: live fp32 activations")
    print(f"{'source':<14}{'EV mean':>9}{'ΔEV vs fp32':>13}{'L0 mean':>9}{'seconds':>9}")
    reference = None
    for name, cfg in runs.items():
        result = train_from_config(cfg, work / f"run-{name.split()[0]}", log=lambda s: None,
                                   splice=False)
        ev = sum(result.metrics["explained_variance"]) / len(result.metrics["explained_variance"])
        l0 = sum(result.metrics["l0"]) / len(result.metrics["l0"])
        reference = ev if reference is None else reference
        print(f"{name:<14}{ev:>9.4f}{ev - reference:>+13.4f}{l0:>9.1f}{result.seconds:>9.0f}")


if __name__ == "__main__":
    main()
