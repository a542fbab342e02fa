"""The training loop around the step (clt_ray.nn.step): any iterator of (x, y) batches -> a
trained, checkpointed CLT. `Trainer` does initialisation from data, dead-feature counters,
metrics.jsonl (+ optional TensorBoard), held-out evals, checkpoints (train.checkpoint) and exact
resume, Ctrl-C -> checkpoint. One process and each Ray shard run this same loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clt_ray import layout
from clt_ray.config import Config, LossConfig, OptimConfig, TrainConfig
from clt_ray.data import ActivationSource, take_tokens
from clt_ray.errors import CltRayError
from clt_ray.eval.metrics import ReconstructionStats, dead_features
from clt_ray.fsutil import atomic_write_text
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.nn.step import LOCAL, Collectives, StepResult, make_optimizer, train_step
from clt_ray.train.checkpoint import (
    CHECKPOINTS,
    TrainingState,
    checkpoint_path,
    load_adam_moments,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA fp32 matmuls in TF32 inside the block when `enabled`; the caller's setting after."""
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or was
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def _sink_tensorboard(run_dir: Path) -> Any:
    """A TensorBoard SummaryWriter if the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / layout.TENSORBOARD))


class MetricsFile:
    """run_dir/metrics.jsonl, the one writer of it: the single process's trainer and the Ray
    driver (which receives rank 0's records) append here; a resumed or restarted run first drops
    the records a lost attempt wrote after its checkpoint.

    A crash can leave the last line half-written: `truncate_after` drops such a torn tail and
    says so (to `log`, default a logging warning); an unreadable line before the last is an error
    naming the file and line, since dropping it would lose records silently."""

    def __init__(self, run_dir: str | os.PathLike[str],
                 log: Callable[[str], None] | None = None) -> None:
        self.path = Path(run_dir) / layout.METRICS
        self.log = log or logging.getLogger(__name__).warning

    def append(self, *records: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, record) of every line, a torn last line dropped (and said)."""
        lines = [(n, line) for n, line in enumerate(self.path.read_text().splitlines(), 1)
                 if line.strip()]
        out = []
        for i, (n, line) in enumerate(lines):
            try:
                rec = json.loads(line)
                why = "" if isinstance(rec, dict) else "not a JSON object"
            except ValueError as exc:
                why = str(exc)
            if not why:
                out.append((line, rec))
            elif i == len(lines) - 1:
                self.log(f"{self.path}: dropped its torn last line {n} (a write cut short by a "
                         f"crash): {line[:60]!r}")
            else:
                raise CltRayError(f"{self.path}, line {n}: not a JSON record ({why}); fix or "
                                  "remove that line")
        return out

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = [line for line, rec in self.records() if rec.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def progress_postfix(rec: dict[str, Any]) -> dict[str, str]:
    """The progress bar's numbers from a train record (one process and the Ray driver)."""
    return {"loss": f"{rec['loss']:.3g}", "ev": f"{rec['ev_mean']:.3f}",
            "l0": f"{rec['l0_mean']:.1f}", "dead": f"{rec['dead_fraction']:.1%}"}


def _floats(t: Tensor) -> list[float]:
    return [round(float(v), 6) for v in t.tolist()]


class Trainer:
    """The loop around `train_step`: init from data, schedules, fp32 Adam (optional bf16/fp16
    autocast), global-norm clipping, dead-feature counters, metrics.jsonl (+ TensorBoard),
    held-out evals, checkpoints and exact resume.

    Dead features: `state.tokens_since_fired` [L, F] counts training tokens since each feature last
    fired; a feature is dead when the count reaches `train.dead_after_tokens` (global counts: this
    trainer holds every feature).

    Usage: `t = Trainer(model, loss=…, optim=…, train=…, run_dir=…); t.initialize(source);
    t.fit(source)`. `Trainer.resume(path, …)` continues a checkpoint; its first `fit(source)`
    restores the source to the saved data cursor (sources with `restore`, e.g. data.py's).
    """

    def __init__(
        self,
        model: CrossLayerTranscoder,
        *,
        loss: LossConfig,
        optim: OptimConfig,
        train: TrainConfig,
        total_steps: int | None = None,
        heldout: Sequence[tuple[Tensor, Tensor]] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        config: Config | None = None,  # saved with checkpoints
        state: TrainingState | None = None,
        log: Callable[[str], None] | None = None,
        collectives: Collectives = LOCAL,
        record_sink: Callable[[dict[str, Any]], None] | None = None,
        graph_scorer: Callable[[CrossLayerTranscoder], dict[str, Any]] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
    ) -> None:
        self.model, self.loss_cfg, self.optim_cfg, self.train_cfg = model, loss, optim, train
        self.collectives, self.record_sink = collectives, record_sink
        self.graph_scorer = graph_scorer  # attribution.GraphScorer: needs the whole CLT
        self.on_checkpoint = on_checkpoint  # after each run checkpoint (run.publish_checkpoint)
        self.heldout = list(heldout or [])
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.config = config
        self.log = log or (lambda msg: None)
        self.device = model.b_dec.device
        self.optimizer = make_optimizer(model, optim)
        self.state = state or TrainingState()
        self.state.total_steps = total_steps or self.state.total_steps or train.steps
        if self.state.tokens_since_fired is None:
            self.state.tokens_since_fired = torch.zeros(
                model.cfg.n_layers, model.n_local, dtype=torch.int64, device=self.device)
        else:
            self.state.tokens_since_fired = self.state.tokens_since_fired.to(self.device)
        if self.state.moments is not None:
            load_adam_moments(self.optimizer, model, self.state.adam_step or 0.0,
                              self.state.moments)
            self.state.moments = None  # the optimizer owns them now
        if self.state.rng:
            set_rng_state(self.state.rng)
        self.interrupted = False
        self.last_eval: dict[str, Any] | None = None
        self._tb = None
        self._restore_pending = self.state.data is not None  # a resumed run's data cursor
        self._saved_step: int | None = None
        self._eval_step: int | None = None

    # --- construction from a checkpoint --------------------------------------------------------

    @classmethod
    def resume(cls, path: str | os.PathLike[str], *, start: int = 0, stop: int | None = None,
               device: torch.device | str = "cpu", total_steps: int | None = None,
               **kwargs: Any) -> Trainer:
        """A trainer continuing the checkpoint at `path` (a checkpoint or a run folder's latest)
        for features [start, stop) (default: all; any checkpoint reslices to any range): weights,
        Adam moments, step, dead counters, RNG states and data cursor (`state.data`)."""
        model, state, _ = load_checkpoint(path, start, stop, device=device, optimizer=True)
        return cls(model, state=state, total_steps=total_steps or state.total_steps, **kwargs)

    # --- properties ----------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def total_steps(self) -> int:
        assert self.state.total_steps is not None
        return self.state.total_steps

    @property
    def checkpoints(self) -> bool:
        """Whether `fit` writes checkpoints (at checkpoint_every and at the end): with a run
        folder; a Ray shard writes its slice through Ray Train instead."""
        return self.run_dir is not None

    @property
    def initialized(self) -> bool:
        return bool(self.state.extra.get("initialized"))

    # --- initialisation ------------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, batches: Iterator[tuple[Tensor, Tensor]], *, n_tokens: int | None = None,
                   init_rate: float = 0.01, normalize: bool = True) -> None:
        """From the first n_tokens (default train.init_tokens) tokens of `batches`: the norm scales
        (E‖s·x‖ = √d per layer), b_dec = the mean normalised target, and b_enc so that every
        feature fires on `init_rate` of the tokens. The tokens are consumed from the stream."""
        try:
            x, y = take_tokens(batches, n_tokens or self.train_cfg.init_tokens)
        except ValueError:
            x = torch.empty(0)
        if len(x) < 2:
            raise ValueError("not enough data to initialise the CLT")
        x, y = x.to(self.device, torch.float32), y.to(self.device, torch.float32)
        model = self.model
        if normalize:
            model.set_norm_scales(x, y)
        xn, yn = model.normalize(x, y)
        model.b_dec.copy_(yn.mean(dim=0))
        model.init_b_enc_from_data(xn, init_rate)
        self.state.extra["initialized"] = True
        self.state.extra["init_tokens"] = len(x)
        self.log(f"initialised from {len(x)} tokens: s_in {_floats(model.s_in)}, "
                 f"s_out {_floats(model.s_out)}")

    # --- one step ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        dtype = AUTOCAST_DTYPES.get(self.train_cfg.precision)
        with tf32_matmuls(self.train_cfg.tf32), (
                contextlib.nullcontext() if dtype is None
                else torch.autocast(self.device.type, dtype=dtype)):
            yield

    def train_step(self, x: Tensor, y: Tensor) -> StepResult:
        """One update at the current step; advances step, tokens and the dead counters."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self._autocast():
            result = train_step(self.model, self.optimizer, x, y, step=self.state.step,
                                total_steps=self.total_steps, loss_cfg=self.loss_cfg,
                                optim_cfg=self.optim_cfg, collectives=self.collectives,
                                decoder=self.train_cfg.decoder)
        c = self.collectives
        fired = result.fired if c.replicas == 1 else c.replica_sum(result.fired.to(torch.int32)) > 0
        tokens = x.shape[0] * c.replicas
        counters = self.state.tokens_since_fired
        assert counters is not None
        counters += tokens
        counters.masked_fill_(fired, 0)
        self.state.step += 1
        self.state.tokens += tokens
        return result

    def dead(self) -> dict[str, Any]:
        assert self.state.tokens_since_fired is not None
        local = dead_features(self.state.tokens_since_fired,
                              window=self.train_cfg.dead_after_tokens)
        if self.model.is_whole:
            return local
        counts = self.collectives.reduce_sum(torch.tensor(
            [local["n_features"], *local["dead_per_layer"]], dtype=torch.float64,
            device=self.device))
        per_layer = [int(v) for v in counts[1:].tolist()]
        return {"dead": sum(per_layer), "dead_per_layer": per_layer,
                "n_features": int(counts[0]), "dead_fraction": sum(per_layer) / float(counts[0])}

    # --- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: Sequence[tuple[Tensor, Tensor]] | None = None) -> dict[str, Any]:
        """Held-out reconstruction metrics (metrics.ReconstructionStats: EV, nMSE, L0 per layer)
        and the training dead-feature counts."""
        batches = self.heldout if batches is None else batches
        model = self.model
        out: dict[str, Any] = {}
        if batches:
            reduce_sum = self.collectives.reduce_sum
            stats = ReconstructionStats(model.cfg.n_layers, model.n_local)
            for x, y in batches:
                x, y = x.to(self.device, torch.float32), y.to(self.device, torch.float32)
                xn, _ = model.normalize(x)
                _, acts = model.encode(xn, self.collectives.gather)
                y_hat = reduce_sum(model.decode(acts, bias=False)) + model.b_dec
                stats.update(y, y_hat / model.s_out[:, None], acts)
            res = stats.result()
            if not model.is_whole:  # L0 counts this shard's features: sum over shards
                res["l0"] = reduce_sum(torch.tensor(res["l0"], dtype=torch.float64)).tolist()
                res["l0_total"] = sum(res["l0"])
            out = {"explained_variance": res["explained_variance"],
                   "ev_mean": sum(res["explained_variance"]) / model.cfg.n_layers,
                   "nmse": res["nmse"], "l0": res["l0"],
                   "l0_mean": res["l0_total"] / model.cfg.n_layers,
                   "n_tokens": res["n_tokens"]}
        dead = self.dead()
        out.update(dead=dead["dead"], dead_fraction=dead["dead_fraction"],
                   dead_per_layer=dead["dead_per_layer"])
        return out

    # --- logging -------------------------------------------------------------------------------

    def _record(self, kind: str, values: dict[str, Any]) -> None:
        rec = {"kind": kind, "step": self.state.step, "tokens": self.state.tokens, **values}
        if self.record_sink is not None:  # e.g. a Ray shard: the driver writes metrics.jsonl
            self.record_sink(rec)
        elif self.run_dir is not None:
            MetricsFile(self.run_dir).append(rec)
        if self._tb is not None:
            for key, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{key}", v, self.state.step)
                elif isinstance(v, list) and v and isinstance(v[0], (int, float)):
                    for l, vl in enumerate(v):
                        self._tb.add_scalar(f"{kind}/{key}/{l}", vl, self.state.step)

    def _train_record(self, res: StepResult, x: Tensor, y: Tensor, seconds: float,
                      tokens: int) -> dict[str, Any]:
        with torch.no_grad():  # the batch's EV per layer, from the step's own errors
            _, yn = self.model.normalize(x.to(self.device), y.to(self.device))
            var = (yn - yn.mean(dim=0)).square().sum(-1).mean(0)
            ev = 1 - res.mse_per_layer / var
        dead = self.dead()
        return {"loss": res.loss, "mse": res.mse, "sparsity": res.sparsity,
                "preact": res.preact, "lambda": res.lam, "lr": res.lr,
                "grad_norm": res.grad_norm, "l0": _floats(res.l0_per_layer),
                "l0_mean": float(res.l0_per_layer.mean()), "ev": _floats(ev),
                "ev_mean": float(ev.mean()), "dead_fraction": dead["dead_fraction"],
                "tokens_per_s": tokens / max(seconds, 1e-9),
                "decoder": "sparse" if res.sparse_decoder else "dense"}

    # --- checkpoints ---------------------------------------------------------------------------

    def state_to_save(self, source: Any = None) -> TrainingState:
        """The training state as a checkpoint stores it: RNG, the source's cursor (if it has
        `state()`), the schedules at this step and the last eval."""
        st = self.state
        st.rng = rng_state()
        if source is not None and hasattr(source, "state"):
            st.data = source.state()
        st.extra["lr"] = self.optim_cfg.lr.at(min(st.step, self.total_steps - 1), self.total_steps)
        st.extra["lambda"] = self.loss_cfg.sparsity.at(min(st.step, self.total_steps - 1),
                                                       self.total_steps)
        if self.last_eval is not None:
            st.extra["eval"] = self.last_eval
        return st

    def save(self, source: ActivationSource | Iterator[Any] | None = None,
             path: str | os.PathLike[str] | None = None) -> Path:
        """Checkpoint to `path` (default: run_dir/checkpoints/step_<step>), then keep only the
        newest train.keep_checkpoints of the run. `source`'s position (if it has `state()`) is the
        saved data cursor."""
        if path is None:
            if self.run_dir is None:
                raise ValueError("no run_dir: pass a checkpoint path")
            path = checkpoint_path(self.run_dir, self.state.step)
        st = self.state_to_save(source)
        out = save_checkpoint(path, self.model, self.optimizer, st, self.config)
        self._saved_step = st.step
        if self.run_dir is not None and Path(path).parent == self.run_dir / CHECKPOINTS:
            prune_checkpoints(self.run_dir, self.train_cfg.keep_checkpoints)
            if self.on_checkpoint is not None:
                self.on_checkpoint(out)
        return out

    # --- the loop ------------------------------------------------------------------------------

    def fit(self, source: Iterator[tuple[Tensor, Tensor]], *, stop_at: int | None = None,
            restore_data: bool = True) -> dict[str, Any]:
        """Train until step `stop_at` (default: the run's total steps), the data ends, or Ctrl-C
        (the step in flight finishes, a checkpoint is written; a second Ctrl-C aborts). Returns
        the last held-out eval. A resumed trainer first restores the source's position
        (restore_data) if the source supports it."""
        cfg = self.train_cfg
        stop_at = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        if restore_data and self._restore_pending and hasattr(source, "restore"):
            source.restore(self.state.data)
        self._restore_pending = False
        if not self.initialized and self.state.step == 0:
            raise RuntimeError("call initialize() before fit() on a fresh trainer")
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard and self._tb is None:
                self._tb = _sink_tensorboard(self.run_dir)
                if self._tb is None:
                    self.log("tensorboard is not installed: logging to metrics.jsonl only")
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not cfg.progress,
                   desc="train", unit="step", dynamic_ncols=True, leave=False)
        window_t, window_tok = time.perf_counter(), 0
        with _graceful_interrupt(self):
            while self.state.step < stop_at and not self.interrupted:
                try:
                    x, y = next(source)
                except StopIteration:
                    self.log(f"data exhausted at step {self.state.step}")
                    break
                res = self.train_step(x, y)
                window_tok += x.shape[0]
                bar.update(1)
                step = self.state.step
                if step % cfg.log_every == 0 or step == stop_at:
                    rec = self._train_record(res, x, y, time.perf_counter() - window_t,
                                             window_tok)
                    window_t, window_tok = time.perf_counter(), 0
                    self._record("train", rec)
                    bar.set_postfix(progress_postfix(rec), refresh=False)
                if not math.isfinite(res.loss):
                    raise FloatingPointError(f"loss is {res.loss} at step {step}: lower the "
                                             "learning rate or use float32")
                if cfg.eval_every and step % cfg.eval_every == 0 and step != stop_at:
                    self._eval()
                if (self.checkpoints and cfg.checkpoint_every
                        and step % cfg.checkpoint_every == 0 and step != stop_at):
                    self.save(source)
        bar.close()
        # the end (stop_at, data exhausted, or Ctrl-C): a final eval and checkpoint
        if self._eval_step != self.state.step:
            self._eval()
        if self.checkpoints and self._saved_step != self.state.step:
            path = self.save(source)
            if self.interrupted:
                self.log(f"interrupted at step {self.state.step}: checkpoint {path}")
        if self._tb is not None:
            self._tb.flush()
        return self.last_eval or {}

    def _eval(self) -> None:
        self._eval_step = self.state.step
        if self.heldout:
            self.last_eval = self.evaluate()
            if self.graph_scorer is not None and self.model.is_whole:
                self.last_eval.update(self.graph_scorer(self.model))
            self._record("eval", self.last_eval)


@contextlib.contextmanager
def _graceful_interrupt(trainer: Trainer) -> Iterator[None]:
    """First Ctrl-C: finish the step, checkpoint, stop. Second: KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if trainer.interrupted:
            raise KeyboardInterrupt
        trainer.interrupted = True
        trainer.log("\ninterrupt: finishing the current step, then checkpointing "
                    "(Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
