"""A rehearsal at GPT-2 small's real shape (issue 17): every stage a user runs, as the CLI runs it,
on a model with GPT-2 small's shape and random weights (transformers' `GPT2Config()` defaults: 12
layers, d 768, 124 M parameters, built offline) and the toy tokenizer and corpus:

    cache       `clt-ray cache --producers 2` of ≥ 100 k tokens (int8 + zstd)
    train       `clt-ray train --shards 2`, a CLT of expansion 8 (6144 features a layer, 73,728 in
                all) from that cache; stopped with Ctrl-C (SIGINT) once its first checkpoint is
                written, as a user stops a run
    resume      `clt-ray train --resume --shards 2` to the end
    topk        `clt-ray autointerp --topk-only` over every feature
    attribute   `clt-ray attribute`: one attribution graph
    viewer      `clt-ray serve`: the feature list over all features (first page, sorted by
                density, the last page) and one feature's dashboard

Per stage: seconds, tokens/s, the peak resident memory of each process (the CLI's process tree
sampled every 0.25 s; Ray's workers grouped by their actor or task name) and, for the producers and
the training shards, `clt-ray plan`'s prediction of that memory next to the measured peak (goal:
within 20%). On a CPU the plan's device bytes are host bytes too, so the prediction compared is
device subtotal (no allocator slack, no CUDA reserve) + host memory.

    python bench/scale.py                       # the rehearsal, ~40 min on 2 cores
    python bench/scale.py --steps 40 --tokens 20000 --json   # a shorter pass
    python bench/scale.py --keep runs/scale     # keep the folders (default: a temp folder)

The last line with --json is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import yaml

from clt_ray.config import WINDOWS_PER_FILE, DataConfig, TrainConfig
from clt_ray.plan import lm_shape, producer_memory, shard_memory, trainer_host_memory

CLI = [str(Path(sys.executable).with_name("clt-ray"))]
STAGES = ["cache", "train", "resume", "topk", "attribute", "viewer"]
PROMPT = "the war lasted from the year 1732 to the year 17"


# --- memory of a process tree ----------------------------------------------------------------


def role(proc: psutil.Process, root: int) -> str:
    """What a process is: the CLI itself, a Ray worker by its actor/task name, or Ray's own."""
    if proc.pid == root:
        return "driver"
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    first = cmd[0] if cmd else proc.name()
    if first.startswith("ray::"):
        name = first[5:].split(" ")[0]
        return "ray::" + name.split(".")[0] if not name.startswith("IDLE") else "ray::IDLE"
    return "ray-system" if "ray" in " ".join(cmd[:3]) else Path(first).name


@dataclass
class TreeMemory:
    """Peak RSS of every process under `root` (and root), sampled every `every` seconds."""

    root: int
    every: float = 0.25
    peaks: dict[int, tuple[str, int]] = field(default_factory=dict)
    total_peak: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                top = psutil.Process(self.root)
                procs = [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                name, peak = self.peaks.get(p.pid, (None, 0))
                if name is None or not name.startswith("ray::") or name == "ray::IDLE":
                    name = role(p, self.root)  # a worker names itself once it runs a task
                self.peaks[p.pid] = (name, max(peak, rss))
            self.total_peak = max(self.total_peak, total)
            self._stop.wait(self.every)

    def stop(self) -> dict[str, list[int]]:
        """{role: [peak RSS of each process of that role, largest first]}."""
        self._stop.set()
        self._thread.join()
        out: dict[str, list[int]] = {}
        for name, peak in self.peaks.values():
            out.setdefault(name, []).append(peak)
        return {k: sorted(v, reverse=True) for k, v in sorted(out.items())}

    def descendants(self) -> list[int]:
        return [pid for pid in self.peaks if pid != self.root]


# --- running one stage -------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    seconds: float
    rc: int
    memory: dict[str, list[int]]
    total_peak: int
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)


def run_stage(name: str, args: list[str], logs: Path, env: dict[str, str],
              until: Callable[[], bool] | None = None, interrupt_when: Callable[[], bool] | None
              = None, timeout: float = 3600) -> Stage:
    """Run the CLI with `args`, its output to logs/<name>.log, sampling its memory; with
    `interrupt_when`, send SIGINT (Ctrl-C) once it holds, as a user stops a run."""
    log = logs / f"{name}.log"
    print(f"[{name}] clt-ray {' '.join(args)}", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        mem = TreeMemory(proc.pid)
        t0 = last = time.perf_counter()
        interrupted = False
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.perf_counter()
            if interrupt_when is not None and not interrupted and interrupt_when():
                print(f"[{name}] Ctrl-C at {now - t0:.0f} s", flush=True)
                proc.send_signal(signal.SIGINT)
                interrupted = True
            if until is not None and until():
                break
            if now - last > 30:
                print(f"[{name}] {now - t0:.0f} s, processes {mem.total_peak / 1e9:.1f} GB peak",
                      flush=True)
                last = now
            if now - t0 > timeout:
                print(f"[{name}] over {timeout:.0f} s: stopped", flush=True)
                proc.send_signal(signal.SIGINT)
                break
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        seconds = time.perf_counter() - t0
        memory = mem.stop()
    reap(mem.descendants())
    tail = log.read_text().strip().splitlines()[-3:]
    print(f"[{name}] rc {rc} in {seconds:.1f} s; " + " | ".join(tail)[-300:], flush=True)
    return Stage(name, seconds, rc, memory, mem.total_peak, log)


def reap(pids: list[int]) -> None:
    """Whatever a stopped stage left running (e.g. Ray's processes after a Ctrl-C)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


# --- the model, the configs ---------------------------------------------------------------------


def build_model(folder: Path) -> float:
    """GPT-2 small's shape with random weights and the toy tokenizer, saved as a HF folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from clt_ray.toy.tokenizer import build_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder, safe_serialization=True)
    build_tokenizer().save_pretrained(folder)
    return time.perf_counter() - t0


def run_config(model: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    half = max(1, args.steps // 2)
    return {
        "model": {"name": str(model), "input_hook": "hook_resid_mid",
                  "output_hook": "hook_mlp_out", "dtype": "float32", "device": "cpu"},
        "clt": {"expansion_factor": args.expansion, "activation": "jumprelu",
                "init_threshold": 0.1, "bandwidth": args.bandwidth, "init_firing_rate": 0.01},
        # λ ramps over the first quarter: L0 jumps from 1% to ~17% in the first steps (the MSE
        # term wins while λ is small) and the sparse step pays for what fires
        "loss": {"sparsity": {"final": 1.0, "ramp_frac": 0.25}, "tanh_c": 1.0,
                 "preact_coef": 1.0e-3},
        "optim": {"lr": {"lr": 1.0e-3, "warmup_frac": 0.02, "decay": "linear",
                         "decay_start_frac": 0.8, "final_frac": 0.0}, "max_grad_norm": 1.0},
        "train": {"steps": args.steps, "batch_size": args.batch, "init_tokens": 8192,
                  "log_every": 10, "eval_every": half, "checkpoint_every": half,
                  "keep_checkpoints": 2, "dead_after_tokens": 10**6, "decoder": args.decoder},
        "data": {"source": "cache", "cache": str(cache), "corpus": "toy", "context_size": 128,
                 "lm_batch_size": 32, "shuffle_buffer": args.shuffle_buffer,
                 "heldout_tokens": 4096},
    }


def topk_config(run: Path, out: Path, tokens: int) -> dict[str, Any]:
    return {"checkpoint": str(run), "out": str(out), "features": {"all": True},
            "topk": {"source": "cache", "tokens": tokens, "k": 20, "samples_per_bin": 4,
                     "range_size": 512, "chunk_windows": 32},
            "actors": 2, "cpus_per_actor": 0.5}


# --- reading results -------------------------------------------------------------------------


def train_records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1])
                  for p in (run / "checkpoints").glob("step_*/manifest.json"))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def get_json(url: str) -> tuple[float, Any]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as r:
        body = json.loads(r.read())
    return time.perf_counter() - t0, body


def viewer_stage(run: Path, logs: Path, env: dict[str, str]) -> Stage:
    """`clt-ray serve` on the run; the feature list over every feature, timed request by request."""
    log = logs / "viewer.log"
    print(f"[viewer] clt-ray serve {run} --port 0", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "serve", str(run), "--port", "0"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        mem = TreeMemory(proc.pid)
        t0 = time.perf_counter()
        url = None
        while url is None and proc.poll() is None and time.perf_counter() - t0 < 300:
            time.sleep(0.2)
            for line in log.read_text().splitlines():
                if " at http://" in line:
                    url = line.split(" at ", 1)[1].split()[0]
        extra: dict[str, Any] = {"start_s": time.perf_counter() - t0}
        try:
            if url is None:
                raise RuntimeError("the viewer printed no address")
            extra["first_page_s"], page = get_json(url + "api/features?limit=50")
            total = page.get("total")
            extra["features_listed"] = total
            extra["by_density_s"], _ = get_json(url + "api/features?sort=density&limit=50")
            extra["last_page_s"], _ = get_json(
                url + f"api/features?offset={max(0, (total or 50) - 50)}&limit=50")
            extra["dashboard_s"], _ = get_json(url + "api/feature/0/0")
            rc = 0
        except Exception as exc:  # noqa: BLE001 (the bench reports what broke and goes on)
            extra["error"] = f"{type(exc).__name__}: {exc}"
            rc = 1
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        seconds = time.perf_counter() - t0
        memory = mem.stop()
    print(f"[viewer] {extra}", flush=True)
    return Stage("viewer", seconds, rc, memory, mem.total_peak, log, extra)


# --- the planner's predictions ----------------------------------------------------------------


def predictions(model: Path, cfg: dict[str, Any], shards: int) -> dict[str, Any]:
    """What `clt-ray plan` says the producers and the shards hold, as bytes of host memory on a
    CPU (device parts without allocator slack or CUDA reserve, plus host parts)."""
    shape = lm_shape(str(model))
    L, d = shape.n_layers, shape.d_model
    F = round(cfg["clt"]["expansion_factor"] * d)
    data = DataConfig(**{k: v for k, v in cfg["data"].items() if k in DataConfig.model_fields})
    train = TrainConfig(**cfg["train"])
    prod = producer_memory(shape, "float32", WINDOWS_PER_FILE, data.context_size, 8)
    producer = prod["host_total"] + prod["weights"] + prod["buffers"] + prod["forward"]
    dev = shard_memory(L, d, F, shards, train.batch_size).subtotal
    host = trainer_host_memory(L, d, F, shards, shape.params, "float32", data, train)
    return {"producer": producer, "shard": dev + host["each_shard"],
            "shard_rank0": dev + host["rank0_total"], "n_features": F}


def compare(name: str, predicted: int, measured: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {"what": name, "predicted_bytes": predicted, "measured_bytes": measured}
    if measured:
        row["predicted_over_measured"] = round(predicted / measured, 3)
    return row


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=102_400, help="tokens to cache (≥ 100 k)")
    p.add_argument("--steps", type=int, default=200, help="training steps (stopped at half)")
    p.add_argument("--batch", type=int, default=256, help="tokens a step")
    p.add_argument("--expansion", type=float, default=8)
    p.add_argument("--bandwidth", type=float, default=0.01,
                   help="JumpReLU's ε: its window is part of the sparse step's work")
    p.add_argument("--decoder", choices=["auto", "dense", "sparse"], default="auto")
    p.add_argument("--shuffle-buffer", type=int, default=16384, help="tokens")
    p.add_argument("--topk-tokens", type=int, default=16384)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--keep", type=Path, help="work in this folder and keep it")
    p.add_argument("--only", nargs="+", choices=STAGES,
                   help="run only these stages in the --keep folder of an earlier run")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = p.parse_args()

    if args.only and not (args.keep and (args.keep / "run.yaml").is_file()):
        p.error("--only needs --keep with the folder of an earlier run")
    root = args.keep or Path(tempfile.mkdtemp(prefix="clt-ray-scale-"))
    if args.keep and not args.only and root.exists() and any(root.iterdir()):
        p.error(f"{root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    want = set(args.only or STAGES)
    model, cache, run = root / "gpt2-random", root / "cache", root / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CLT_RAY_SCRATCH": str(root / "scratch"),
           "PYTHONUNBUFFERED": "1"}
    t_start = time.perf_counter()
    stages: list[Stage] = []
    result: dict[str, Any] = {"cpu": f"{os.cpu_count()} cores",
                              "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)}

    build_s = 0.0
    if args.only:
        cfg = yaml.safe_load((root / "run.yaml").read_text())
    else:
        build_s = build_model(model)
        print(f"[build] GPT-2 small shape, random weights: {build_s:.1f} s", flush=True)
        cfg = run_config(model, cache, args)
        (root / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    pred = predictions(model, cfg, args.shards)
    result["shape"] = {"n_layers": 12, "d_model": 768, "n_features": pred["n_features"],
                       "features_all_layers": 12 * pred["n_features"], "batch": args.batch,
                       "steps": args.steps}

    if "cache" in want:
        s = run_stage("cache", ["cache", "--config", str(root / "run.yaml"), "--out", str(cache),
                                "--tokens", str(args.tokens), "--producers", str(args.producers),
                                "--address", "local"], logs, env)
        said = re.search(r"cached ([\d,]+) new tokens in ([\d.]+) s \(([\d,]+) tokens/s, (\d+) "
                         r"bytes/token\)", s.log.read_text())
        if said:  # the CLI's own figures: caching alone, after Ray started and the LM loaded
            tokens = int(said[1].replace(",", ""))
            s.extra = {"tokens": tokens, "tokens_per_s_wall": tokens / s.seconds,
                       "caching_s": float(said[2]), "tokens_per_s": int(said[3].replace(",", "")),
                       "bytes_per_token": int(said[4])}
        stages.append(s)

    if "train" in want:
        half = max(1, args.steps // 2)
        train_args = ["train", "--config", str(root / "run.yaml"), "--run-dir", str(run),
                      "--shards", str(args.shards), "--address", "local"]
        s = run_stage("train", train_args, logs, env,
                      interrupt_when=lambda: any(st >= half for st in checkpoint_steps(run)))
        recs = [r for r in train_records(run) if r.get("kind") == "train"]
        s.extra = {"checkpoint_steps": checkpoint_steps(run), "last_step": max(
            [r["step"] for r in recs], default=0)}
        stages.append(s)

    if "resume" in want:
        s = run_stage("resume", ["train", "--run-dir", str(run), "--resume", "--shards",
                                 str(args.shards), "--address", "local"], logs, env)
        stages.append(s)

    recs = [r for r in train_records(run) if r.get("kind") == "train"]
    evals = [r for r in train_records(run) if r.get("kind") == "eval"]
    if recs:
        rates = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
        decoders = [r.get("decoder") for r in recs]
        result["training"] = {
            "steps_done": recs[-1]["step"],
            "tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
            "sparse_decoder_share": decoders.count("sparse") / len(decoders),
            "l0_mean_last": recs[-1].get("l0_mean"), "ev_mean_last": recs[-1].get("ev_mean"),
            "eval_ev_mean": evals[-1].get("ev_mean") if evals else None,
            "checkpoint_bytes": folder_bytes(
                run / "checkpoints" / f"step_{checkpoint_steps(run)[-1]:09d}")
            if checkpoint_steps(run) else None}

    if "topk" in want:
        (root / "topk.yaml").write_text(yaml.safe_dump(topk_config(run, root / "autointerp",
                                                                   args.topk_tokens)))
        s = run_stage("topk", ["autointerp", "--config", str(root / "topk.yaml"),
                               "--topk-only", "--address", "local"], logs, env)
        s.extra = {"tokens": args.topk_tokens, "tokens_per_s": args.topk_tokens / s.seconds,
                   "features_parquet": (root / "autointerp" / "features.parquet").is_file()}
        stages.append(s)

    if "attribute" in want:
        s = run_stage("attribute", ["attribute", "--clt", str(run), "--prompt", PROMPT, "--out",
                                    str(run / "graphs"), "--model", str(model)], logs, env)
        graphs = run / "graphs"
        s.extra = {"graphs": len(list(graphs.glob("*.json"))) if graphs.exists() else 0}
        stages.append(s)

    if "viewer" in want:
        if (root / "autointerp").exists() and not (run / "autointerp").exists():
            os.symlink(root / "autointerp", run / "autointerp")
        stages.append(viewer_stage(run, logs, env))


    # the planner against what was measured
    prod = [v for st in stages if st.name == "cache" for k, vs in st.memory.items()
            if "CacheProducer" in k for v in vs]
    shard_peaks = sorted((v for st in stages if st.name in ("train", "resume")
                          for k, vs in st.memory.items() if "TrainWorker" in k for v in vs),
                         reverse=True)
    result["plan_vs_measured"] = [
        compare("producer", pred["producer"], max(prod) if prod else None),
        compare("shard rank 0", pred["shard_rank0"], shard_peaks[0] if shard_peaks else None),
        compare("shard (other)", pred["shard"],
                shard_peaks[-1] if len(shard_peaks) > 1 else None)]
    result["stages"] = [{"stage": st.name, "seconds": round(st.seconds, 1), "rc": st.rc,
                         "peak_rss_by_process": st.memory, "tree_peak_bytes": st.total_peak,
                         **st.extra} for st in stages]
    result["build_s"] = round(build_s, 1)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["folder"] = str(root)

    print("\nstage       seconds  rc  peak RSS by process (GB)")
    for st in stages:
        mem = ", ".join(f"{k} {'/'.join(f'{v / 1e9:.2f}' for v in vs[:3])}"
                        for k, vs in st.memory.items() if max(vs) > 2e8)
        print(f"{st.name:<11}{st.seconds:>8.1f}{st.rc:>4}  {mem}")
        if st.extra:
            print(f"{'':<23}{json.dumps(st.extra, default=str)}")
    if "training" in result:
        print(f"training: {json.dumps(result['training'])}")
    print("plan vs measured (peak RSS):")
    for row in result["plan_vs_measured"]:
        m = row["measured_bytes"]
        print(f"  {row['what']:<14} predicted {row['predicted_bytes'] / 1e9:6.2f} GB, measured "
              f"{'-' if not m else f'{m / 1e9:6.2f} GB'}  ratio {row.get('predicted_over_measured')}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
