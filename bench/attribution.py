"""Attribution graphs, side by side in one run on the same replacement model and CLT: time and
peak memory per graph at 16/32/64 tokens with a node cap, through our wrapper
(`clt_ray.attribution.attribute_prompt`: length check, attribute, scores, pruning) and through
circuit-tracer called directly for the same work (`attribute`, `compute_graph_scores`,
`prune_graph`). Also the replacement/completeness scores of held-out mechanism prompts.

    python bench/attribution.py                      # toy GPT-2 + the examples/toy.yaml CLT
    python bench/attribution.py --clt runs/x/clt --model gpt2 --lengths 16 32 64 128
    python bench/attribution.py --pool               # graphs/s: one process, 1 and 2 Ray workers

`--pool` times many prompts end to end as `clt-ray attribute` runs them (graph JSON written and
indexed, dashboards excluded): in this process, and on a local Ray actor pool of 1 and 2 workers
(`clt_ray.actors.attribution.GraphPool`, one CPU and one torch thread each), after the workers
have loaded the model (their start-up is reported apart), with each worker's peak resident memory.

Peak memory is the process's resident set sampled every 2 ms during the call, minus its size
just before, after `malloc_trim` (torch's CPU allocations are invisible to tracemalloc).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch
from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.graph import compute_graph_scores, prune_graph

from clt_ray.attribution import attribute_prompt, load_replacement_model
from clt_ray.config import GraphSettings
from clt_ray.toy import MECHANISMS, mechanism_prompts

try:
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: peaks after the first call may read low
    LIBC = None


class PeakRSS:
    """Peak resident memory above the starting level while the block runs."""

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 (Self needs Python 3.11)
        gc.collect()
        if LIBC is not None:  # hand freed heap back, so a repeat must grow the process again
            LIBC.malloc_trim(0)
        self.proc, self.peak, self.running = psutil.Process(), 0, True
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def direct(rm, ids: torch.Tensor, s: GraphSettings) -> float:
    """circuit-tracer alone, the same work as attribute_prompt."""
    graph = attribute(ids, rm, max_n_logits=s.max_n_logits, desired_logit_prob=s.desired_logit_prob,
                      batch_size=s.batch_size, max_feature_nodes=s.max_feature_nodes)
    replacement, _ = compute_graph_scores(graph)
    prune_graph(graph, s.node_threshold, s.edge_threshold)
    return replacement


def prompt_of_length(rm, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """Token ids [n_tokens] (BOS first) of toy induction text, cut to length."""
    text = " ".join(p.text for p in mechanism_prompts("induction", 8, seed=seed, max_context=3))
    ids = rm.ensure_tokenized(text)
    if len(ids) < n_tokens:
        raise SystemExit(f"the toy text has only {len(ids)} tokens, fewer than {n_tokens}")
    return ids[:n_tokens]


def pool_bench(clt: str, model: str | None, n_prompts: int, workers: list[int],
               s: GraphSettings) -> None:
    """graphs/s of the same prompts in one process and on Ray pools of each size in `workers`."""
    import tempfile

    import ray
    from clt_ray.actors.attribution import GraphPool

    from clt_ray.attribution import Attributor, GraphStore, PromptSpec, read_clt_folder

    folder = read_clt_folder(clt)
    specs = [PromptSpec(p.text) for i in range(n_prompts)
             for p in mechanism_prompts(MECHANISMS[i % len(MECHANISMS)], 1, seed=100 + i)]
    print(f"{len(specs)} held-out mechanism prompts, node cap {s.max_feature_nodes}, "
          f"{os.cpu_count()} cores")
    print(f"{'run':<26} {'start s':>8} {'graphs/s':>9} {'peak MB/worker':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        start = time.perf_counter()
        attributor = Attributor(folder, model, settings=s)
        loaded = time.perf_counter() - start
        store = GraphStore(Path(tmp) / "one", folder.name, s)
        start = time.perf_counter()
        for spec in specs:
            store.record(attributor.run(spec))
        rate = len(specs) / (time.perf_counter() - start)
        print(f"{'one process, 1 thread':<26} {loaded:>8.1f} {rate:>9.2f} "
              f"{Attributor.peak_memory_mb():>15.0f}")
        torch.set_num_threads(threads)
        del attributor
        gc.collect()  # circuit-tracer's __del__ fails if it first runs at interpreter shutdown
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        rates = {}
        for n in workers:
            start = time.perf_counter()
            with GraphPool(str(folder.path), workers=n, model=model, settings=s,
                           cpus_per_worker=1.0, gpus_per_worker=0) as pool:
                pool.wait_started()
                loaded = time.perf_counter() - start
                store = GraphStore(Path(tmp) / f"pool{n}", folder.name, s)
                start = time.perf_counter()
                pool.run(specs, store)
                rates[n] = len(specs) / (time.perf_counter() - start)
                peaks = pool.peak_memory_mb()
            print(f"{f'Ray pool, {n} worker(s)':<26} {loaded:>8.1f} {rates[n]:>9.2f} "
                  f"{max(peaks):>15.0f}")
        ray.shutdown()
    if len(rates) > 1:
        a, b = min(rates), max(rates)
        print(f"{b} workers / {a}: {rates[b] / rates[a]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clt", default=None, help="exported CLT folder (default: the toy CLT)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts per mechanism")
    ap.add_argument("--pool", action="store_true", help="only graphs/s through Ray worker pools")
    ap.add_argument("--pool-prompts", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.clt is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from toy_clt import build_toy_clt  # the tests' toy CLT (trained once, then cached)

        args.clt = build_toy_clt("gpt2")
    if args.pool:
        pool_bench(str(args.clt), args.model, args.pool_prompts, args.workers,
                   GraphSettings(max_feature_nodes=args.max_feature_nodes))
        return
    rm = load_replacement_model(args.clt, args.model)
    s = GraphSettings(max_feature_nodes=args.max_feature_nodes)
    print(f"CLT {args.clt}, node cap {s.max_feature_nodes}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'tokens':>6} {'ours s':>8} {'direct s':>8} {'overhead':>9} {'ours MB':>8} "
          f"{'direct MB':>9}")
    for n in args.lengths:
        ids = prompt_of_length(rm, n)
        attribute_prompt(rm, ids.tolist(), s)  # warm-up
        times: dict[str, list[float]] = {"ours": [], "direct": []}
        peaks: dict[str, list[float]] = {"ours": [], "direct": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for name in ("ours", "direct"):
                with PeakRSS() as mem:
                    start = time.perf_counter()
                    if name == "ours":
                        attribute_prompt(rm, ids.tolist(), s)
                    else:
                        direct(rm, ids, s)
                    times[name].append(time.perf_counter() - start)
                peaks[name].append(mem.peak / 2**20)
        ours, base = statistics.median(times["ours"]), statistics.median(times["direct"])
        print(f"{n:>6} {ours:>8.3f} {base:>8.3f} {ours / base - 1:>+9.1%} "
              f"{statistics.median(peaks['ours']):>8.1f} {statistics.median(peaks['direct']):>9.1f}")

    print(f"\nheld-out mechanism prompts ({args.prompts} each, seed 7), node cap "
          f"{s.max_feature_nodes}:")
    print(f"{'mechanism':<13} {'replacement':>11} {'completeness':>12} {'nodes':>6} {'edges':>6}")
    everything = []
    for kind in MECHANISMS:
        rows = [attribute_prompt(rm, p.text, s) for p in mechanism_prompts(kind, args.prompts, 7)]
        everything += rows
        print(f"{kind:<13} {statistics.mean(r.replacement for r in rows):>11.3f} "
              f"{statistics.mean(r.completeness for r in rows):>12.3f} "
              f"{statistics.mean(r.n_nodes for r in rows):>6.0f} "
              f"{statistics.mean(r.n_edges for r in rows):>6.0f}")
    print(f"{'all':<13} {statistics.mean(r.replacement for r in everything):>11.3f} "
          f"{statistics.mean(r.completeness for r in everything):>12.3f}")
    del rm, everything
    gc.collect()  # circuit-tracer's __del__ fails if it first runs at interpreter shutdown


if __name__ == "__main__":
    main()
