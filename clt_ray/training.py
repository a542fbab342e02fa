"""The training step of DESIGN.md §3, written once for one process and for Ray shard actors.

A shard (features [start, stop) of every layer) computes its partial reconstruction ŷ⁽ˢ⁾ (no b_dec),
gets Σ_s ŷ⁽ˢ⁾ from `reduce_sum` (identity in one process, an all-reduce on Ray), adds the replicated
b_dec once, and computes g = ∂L_mse/∂ŷ locally. It then backpropagates g through its own ŷ⁽ˢ⁾ only:
no autograd crosses the collective, so every gradient is exact (never N× inflated). Sparsity and
pre-activation terms are sums over features, hence local. b_dec's gradient is ∂L_mse/∂ŷ summed over
tokens, computed identically on every shard, so b_dec stays identical everywhere without any
communication. A single small vector all-reduce then carries the squared gradient norm (b_dec
excluded there and added once after) and the loss statistics, so clipping uses the global norm
and every shard reports global numbers.

Optimizer: plain torch Adam over the shard's parameters, kept in fp32 (the master weights; the
Adam moments follow the parameters' dtype). `train_step` = schedules + `compute_grads` + Adam.

Below the step, for one process:
- `Trainer`: the loop around `train_step` for any iterator of (x, y) batches — initialisation from
  data, dead-feature counters, metrics.jsonl (+ optional TensorBoard), held-out evals,
  checkpoints (clt_ray.checkpoint) and exact resume, Ctrl-C → checkpoint;
- `train_from_config`: a whole run from a `config.Config` (what `clt-ray train` calls): checks
  the config against the model before any work, runs the LM in-process (clt_ray.data), trains,
  and evaluates on held-out data with clt_ray.metrics (EV, L0, dead features, spliced CE/KL).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import Field, PositiveFloat
from torch import Tensor
from tqdm.auto import tqdm

from clt_ray.checkpoint import (
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
from clt_ray.clt import CLTConfig, CrossLayerTranscoder, Gather
from clt_ray.config import StrictModel
from clt_ray.fsutil import atomic_write_text
from clt_ray.losses import (
    LossConfig,
    LRSchedule,
    mse_loss,
    mse_per_layer,
    preact_loss,
    tanh_sparsity,
)

if TYPE_CHECKING:
    from clt_ray.data import ActivationSource, BlockStream

ReduceSum = Callable[[Tensor], Tensor]
T = TypeVar("T")


def identity_reduce(t: Tensor) -> Tensor:
    """reduce_sum for a single shard holding the whole CLT."""
    return t


@dataclass(frozen=True)
class Collectives:
    """How one shard of a (possibly data-parallel) shard group talks to the others; the default
    is one process holding the whole CLT. DESIGN.md §3.

    reduce_sum: Σ over the shards of this replica (the all-reduce of the partial reconstruction).
    gather: concatenation over those shards along features (TopK/BatchTopK only).
    replica_mean: averages a list of tensors in place over the replicas of this shard (their
    gradients: R replicas of batch B equal one of batch R·B).
    replica_sum: Σ over the replicas of this shard (dead-feature firing, token counts).
    replicas: the number of replicas."""

    reduce_sum: ReduceSum = identity_reduce
    gather: Gather | None = None
    replica_mean: Callable[[list[Tensor]], None] | None = None
    replica_sum: ReduceSum = identity_reduce
    replicas: int = 1


LOCAL = Collectives()


class OptimConfig(StrictModel):
    lr: LRSchedule = LRSchedule()
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    max_grad_norm: PositiveFloat | None = Field(default=1.0)
    """Clip the GLOBAL gradient norm (over all shards) to this; None: no clipping."""


@dataclass
class StepResult:
    """One step's numbers. Everything is global (identical on every shard) except `fired`."""

    loss: float  # mse + λ·sparsity + λ_p·preact
    mse: float
    sparsity: float  # unweighted tanh sum (losses.py normalisation)
    preact: float  # unweighted
    lam: float  # λ(t) used
    grad_norm: float  # before clipping
    mse_per_layer: Tensor  # [L]
    l0_per_layer: Tensor  # [L]: active features per token, mean over tokens
    fired: Tensor  # [L, F_local] bool: this shard's features active on some token (dead counters)
    lr: float | None = None


def make_optimizer(model: CrossLayerTranscoder, cfg: OptimConfig) -> torch.optim.Adam:
    """Adam over the shard's (fp32) parameters with torch's fused kernel (CPU and CUDA): on CPU it
    is 8x faster than the foreach one at GPT-2 shape (0.10 s vs 0.83 s per update of 141 M
    parameters) and equal to it to 1e-17 in fp64."""
    fused = model.b_dec.device.type in ("cpu", "cuda") or None
    return torch.optim.Adam(model.parameters(), lr=cfg.lr.lr, betas=cfg.betas, eps=cfg.eps,
                            fused=fused)


def compute_grads(
    model: CrossLayerTranscoder,
    x: Tensor,
    y: Tensor,
    loss_cfg: LossConfig,
    lam: float,
    *,
    reduce_sum: ReduceSum = identity_reduce,
    gather: Gather | None = None,
    max_grad_norm: float | None = None,
    replica_mean: Callable[[list[Tensor]], None] | None = None,
) -> StepResult:
    """Set the shard's .grad to the exact gradient of the global loss, clipped by global norm.

    x, y: the raw batch [B, L, d] (every shard gets the same one); normalised here with the model's
    scales. reduce_sum(t) must return Σ over shards of t (it may modify t in place). gather is only
    needed for TopK/BatchTopK on a shard. replica_mean (data parallelism) averages the gradients
    over the replicas of this shard before the global norm is taken. Gradients are overwritten,
    not accumulated.
    """
    model.zero_grad(set_to_none=True)
    xn, yn = model.normalize(x, y)
    if yn.shape != xn.shape:
        raise ValueError(f"target shape {list(y.shape)} differs from input shape {list(x.shape)}")
    B = x.shape[0]

    pre, acts = model.encode(xn, gather)
    partial = model.decode(acts, bias=False)
    with torch.no_grad():
        summed = reduce_sum(partial.detach().clone())
    summed = summed.detach().requires_grad_(True)
    y_hat = summed + model.b_dec
    mse = mse_loss(y_hat, yn)
    g, g_b_dec = torch.autograd.grad(mse, [summed, model.b_dec])

    dec_norms = model.decoder_norms()
    sparsity = tanh_sparsity(acts, dec_norms, loss_cfg.tanh_c)
    preact = preact_loss(pre, dec_norms, model.threshold)
    local_aux = lam * sparsity + loss_cfg.preact_coef * preact
    torch.autograd.backward([partial, local_aux], [g, torch.ones_like(local_aux)])
    model.b_dec.grad = g_b_dec

    with torch.no_grad():
        grads = [p.grad for p in model.parameters() if p.grad is not None and p is not model.b_dec]
        if replica_mean is not None:
            replica_mean([*grads, g_b_dec])
        local_sq = torch.stack(torch._foreach_norm(grads)).double().square().sum()
        l0 = (acts > 0).sum(dim=(0, 2)).double() / B
        stats = torch.cat([torch.stack([local_sq, sparsity.double(), preact.double()]), l0])
        stats = reduce_sum(stats)  # the one scalar-sized collective: norm² + statistics
        grad_norm = math.sqrt(stats[0].item() + g_b_dec.double().square().sum().item())
        if max_grad_norm is not None and grad_norm > max_grad_norm:
            torch._foreach_mul_(grads + [model.b_dec.grad], max_grad_norm / (grad_norm + 1e-6))

    mse_f, sparsity_f, preact_f = mse.item(), stats[1].item(), stats[2].item()
    return StepResult(
        loss=mse_f + lam * sparsity_f + loss_cfg.preact_coef * preact_f,
        mse=mse_f,
        sparsity=sparsity_f,
        preact=preact_f,
        lam=lam,
        grad_norm=grad_norm,
        mse_per_layer=mse_per_layer(y_hat.detach(), yn),
        l0_per_layer=stats[3:].float(),
        fired=(acts > 0).any(dim=0),
    )


def train_step(
    model: CrossLayerTranscoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    step: int,
    total_steps: int,
    loss_cfg: LossConfig,
    optim_cfg: OptimConfig,
    collectives: Collectives = LOCAL,
) -> StepResult:
    """One full update at `step` (0-based): schedules → exact global gradients → Adam."""
    lr = optim_cfg.lr.at(step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    lam = loss_cfg.sparsity.at(step, total_steps)
    result = compute_grads(model, x, y, loss_cfg, lam, reduce_sum=collectives.reduce_sum,
                           gather=collectives.gather, max_grad_norm=optim_cfg.max_grad_norm,
                           replica_mean=collectives.replica_mean)
    optimizer.step()
    result.lr = lr
    return result


class LocalGroup:
    """N feature shards in N threads of one process, with the collectives the step needs: the
    in-process stand-in for an all-reduce group (tests; multi-shard runs without Ray).
    Sums run in rank order, so every rank gets bitwise the same result, as an all-reduce does."""

    def __init__(self, n: int, timeout: float = 120.0) -> None:
        self.n = n
        self._barrier = threading.Barrier(n, timeout=timeout)
        self._slots: list[Tensor | None] = [None] * n

    def _exchange(self, rank: int, t: Tensor) -> list[Tensor]:
        self._slots[rank] = t
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()  # all have read before anyone writes the next round
        return out  # type: ignore[return-value]

    def reduce_sum(self, rank: int) -> ReduceSum:
        def reduce(t: Tensor) -> Tensor:
            parts = self._exchange(rank, t)
            total = parts[0].clone()
            for p in parts[1:]:
                total += p
            return total

        return reduce

    def gather(self, rank: int) -> Gather:
        return lambda t: torch.cat(self._exchange(rank, t), dim=-1)

    def run(self, fn: Callable[[int], T]) -> list[T]:
        """fn(rank) in one thread per rank; results in rank order; the first error is re-raised
        (the barrier is broken so no other rank waits forever)."""
        results: list = [None] * self.n
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors.append(exc)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                       errors[0])
        return results


# =================================================================================================
# The single-process training loop: any iterator of (x, y) batches → a trained, checkpointed CLT.
# =================================================================================================

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
    return SummaryWriter(str(run_dir / "tensorboard"))


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
        train: Any,  # config.TrainConfig
        total_steps: int | None = None,
        heldout: Sequence[tuple[Tensor, Tensor]] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        config: Any = None,  # config.Config, saved with checkpoints
        state: TrainingState | None = None,
        log: Callable[[str], None] | None = None,
        collectives: Collectives = LOCAL,
        record_sink: Callable[[dict[str, Any]], None] | None = None,
        graph_scorer: Callable[[CrossLayerTranscoder], dict[str, Any]] | None = None,
    ) -> None:
        self.model, self.loss_cfg, self.optim_cfg, self.train_cfg = model, loss, optim, train
        self.collectives, self.record_sink = collectives, record_sink
        self.graph_scorer = graph_scorer  # attribution.GraphScorer: needs the whole CLT
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
    def resume(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
               total_steps: int | None = None, **kwargs: Any) -> Trainer:
        """A trainer continuing the checkpoint at `path` (a checkpoint or a run folder's latest):
        weights, Adam moments, step, dead counters, RNG states and data cursor (`state.data`)."""
        model, state, _ = load_checkpoint(path, device=device, optimizer=True)
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
    def initialized(self) -> bool:
        return bool(self.state.extra.get("initialized"))

    # --- initialisation ------------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, batches: Iterator[tuple[Tensor, Tensor]], *, n_tokens: int | None = None,
                   init_rate: float = 0.01, normalize: bool = True) -> None:
        """From the first n_tokens (default train.init_tokens) tokens of `batches`: the norm scales
        (E‖s·x‖ = √d per layer), b_dec = the mean normalised target, and b_enc so that every
        feature fires on `init_rate` of the tokens. The tokens are consumed from the stream."""
        from clt_ray.data import take_tokens

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
                                optim_cfg=self.optim_cfg, collectives=self.collectives)
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
        from clt_ray.metrics import dead_features

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
        from clt_ray.metrics import ReconstructionStats

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
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
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
                "tokens_per_s": tokens / max(seconds, 1e-9)}

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
                    bar.set_postfix(loss=f"{res.loss:.3g}", ev=f"{rec['ev_mean']:.3f}",
                                    l0=f"{rec['l0_mean']:.1f}",
                                    dead=f"{rec['dead_fraction']:.1%}", refresh=False)
                if not math.isfinite(res.loss):
                    raise FloatingPointError(f"loss is {res.loss} at step {step}: lower the "
                                             "learning rate or use float32")
                if cfg.eval_every and step % cfg.eval_every == 0 and step != stop_at:
                    self._eval()
                if (self.run_dir is not None and cfg.checkpoint_every
                        and step % cfg.checkpoint_every == 0 and step != stop_at):
                    self.save(source)
        bar.close()
        # the end (stop_at, data exhausted, or Ctrl-C): a final eval and checkpoint
        if self._eval_step != self.state.step:
            self._eval()
        if self.run_dir is not None and self._saved_step != self.state.step:
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


def truncate_metrics(run_dir: str | os.PathLike[str], step: int) -> None:
    """Drop metrics.jsonl records after `step` (written by a run that is now resumed from `step`)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# =================================================================================================
# A run from a config: check → load the LM → sources → init or resume → fit → final eval.
# =================================================================================================


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any]  # the final held-out evaluation (metrics.evaluate)
    seconds: float
    checkpoint: Path | None


def check_config(cfg: Any) -> CLTConfig:
    """Everything about a run config that can be checked without loading weights or data: the
    CLT against the model's layer count and width (read from the model's config file), the
    context size against its positions, the device, the corpus. Returns the full CLTConfig."""
    from clt_ray.config import ConfigError
    from clt_ray.data import make_documents, model_dims

    try:
        n_layers, d_model, max_pos = model_dims(cfg.model)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"model.name {cfg.model.name!r}: {exc}") from None
    clt_cfg = cfg.clt.resolve(n_layers, d_model)
    if max_pos is not None and cfg.data.context_size > max_pos:
        raise ConfigError(f"data.context_size {cfg.data.context_size} exceeds the model's "
                          f"{max_pos} positions")
    for key, dev in (("model.device", cfg.model.device), ("train.device", cfg.train.device)):
        if dev is None:
            continue
        try:
            d = torch.device(dev)
        except RuntimeError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{key}: {dev!r}, but CUDA is not available here")
    make_documents(cfg.data, heldout=False)  # a missing corpus file fails now
    if cfg.data.source == "cache":
        from clt_ray.cache.store import open_cache

        manifest = open_cache(cfg.data.cache)[2]
        manifest.check_matches(model=cfg.model.name, input_hook=cfg.model.input_hook,
                               output_hook=cfg.model.output_hook, layers=n_layers,
                               d_model=d_model)
        if not manifest.files:
            raise ConfigError(f"data.cache {cfg.data.cache}: the cache holds no files yet")
    return clt_cfg


def prepare_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume (None for a fresh run); refuses to start over a run's
    checkpoints, and to resume where there are none."""
    from clt_ray.checkpoint import list_checkpoints
    from clt_ray.config import CltRayError

    found = list_checkpoints(run_dir)
    if resume:
        if not found:
            raise CltRayError(f"--resume: {run_dir} has no checkpoint to resume from")
        return found[-1]
    if found:
        raise CltRayError(f"{run_dir} already holds checkpoints (up to {found[-1].name}): pass "
                          "--resume to continue that run, or choose another --run-dir")
    return None


def open_run(cfg: Any, run_dir: Path, resume: bool) -> tuple[CLTConfig, Path | None]:
    """Check the config, prepare the run folder (config.yaml) and find the checkpoint to resume
    (which must hold the CLT the config describes): (the CLT config, the checkpoint or None)."""
    from clt_ray.config import ConfigError, dump_config

    clt_cfg = check_config(cfg)
    ckpt = prepare_run_dir(run_dir, resume)
    if ckpt is not None:
        saved = CLTConfig.model_validate(json.loads((ckpt / "manifest.json").read_text())["clt"])
        if saved != clt_cfg:
            raise ConfigError(f"the checkpoint {ckpt} holds a CLT {saved.model_dump()}, but the "
                              f"config describes {clt_cfg.model_dump()}")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    return clt_cfg, ckpt


def train_from_config(
    cfg: Any,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    splice: bool = True,
    blocks: BlockStream | None = None,
) -> RunResult:
    """Train the CLT a config describes, in this process, into `run_dir` (config.yaml,
    metrics.jsonl, checkpoints/, summary.json). resume=True continues the run's latest checkpoint
    exactly (same floats as an uninterrupted run). Returns the final held-out metrics
    (metrics.evaluate; splice=True adds the CE/KL of the CLT spliced into the model).
    `blocks`: the training stream of `data.source: producers`, built by the Ray layer
    (actors.cache_producer.ProducerBlocks); closed when training ends."""
    from clt_ray.attribution import graph_scorer_for
    from clt_ray.config import ConfigError
    from clt_ray.data import heldout_set, training_source
    from clt_ray.models import load_model

    start_time = time.monotonic()
    run_dir = Path(run_dir)
    if (cfg.data.source == "producers") != (blocks is not None):
        raise ConfigError("data.source 'producers' streams from Ray actors: train it with "
                          "`clt-ray train` (or pass blocks=ProducerBlocks(...)); other sources "
                          "take no blocks")
    clt_cfg, ckpt = open_run(cfg, run_dir, resume)

    lm, tokenizer = load_model(cfg.model)
    device = torch.device(cfg.train.device or cfg.model.device)
    source = training_source(cfg, lm, tokenizer, blocks=blocks)
    ids, mask, heldout = heldout_set(cfg, lm, tokenizer)
    common: dict[str, Any] = {
        "loss": cfg.loss, "optim": cfg.optim, "train": cfg.train, "heldout": heldout,
        "run_dir": run_dir, "config": cfg, "log": log, "total_steps": cfg.train.steps,
        "graph_scorer": graph_scorer_for(cfg, lm, tokenizer)}
    if ckpt is None:
        torch.manual_seed(cfg.train.seed)
        model = CrossLayerTranscoder(clt_cfg, device=device)
        trainer = Trainer(model, **common)
        trainer.initialize(source, init_rate=cfg.clt.init_firing_rate,
                           normalize=cfg.clt.normalize)
    else:
        trainer = Trainer.resume(ckpt, device=device, **common)
        truncate_metrics(run_dir, trainer.step)
        log(f"resuming {ckpt} at step {trainer.step} of {trainer.total_steps}")
    try:
        trainer.fit(source)
    finally:
        source.close()

    return finish_run(cfg, run_dir, trainer.model, trainer.state, lm=lm, tokenizer=tokenizer,
                      start_time=start_time, splice=splice, interrupted=trainer.interrupted,
                      heldout=(ids, mask), graph_scorer=trainer.graph_scorer)


def finish_run(cfg: Any, run_dir: Path, clt: CrossLayerTranscoder, state: TrainingState, *,
               lm: Any, tokenizer: Any, start_time: float, splice: bool = True,
               interrupted: bool = False, heldout: tuple[Tensor, Tensor] | None = None,
               graph_scorer: Callable[[CrossLayerTranscoder], dict[str, Any]] | None = None
               ) -> RunResult:
    """The end of a run (one process or Ray): the final held-out evaluation of the whole CLT
    (with the splice CE/KL) on `heldout` windows (ids, mask; default: the config's),
    summary.json, and the RunResult. graph_scorer: the run's (default: built from the config)."""
    from clt_ray import metrics
    from clt_ray.attribution import graph_scorer_for
    from clt_ray.checkpoint import list_checkpoints
    from clt_ray.data import heldout_windows

    ids, mask = heldout if heldout is not None else heldout_windows(tokenizer, cfg.data)
    lm_device = next(lm.parameters()).device
    if clt.b_dec.device != lm_device:  # the splice needs the CLT beside the model
        clt = copy.deepcopy(clt).to(lm_device)
    final = metrics.evaluate(clt, lm, ids, attention_mask=mask,
                             input_hook=cfg.model.input_hook, output_hook=cfg.model.output_hook,
                             batch_size=cfg.data.lm_batch_size, splice=splice,
                             fired_counters=state.tokens_since_fired,
                             dead_window=cfg.train.dead_after_tokens)
    scorer = graph_scorer or graph_scorer_for(cfg, lm, tokenizer)
    if scorer is not None:
        final.update(scorer(clt))
    seconds = time.monotonic() - start_time
    summary = {"step": state.step, "total_steps": state.total_steps, "tokens": state.tokens,
               "seconds": round(seconds, 1), "interrupted": interrupted, **final}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    found = list_checkpoints(run_dir)
    return RunResult(run_dir, state.step, final, seconds, found[-1] if found else None)


def format_metrics(m: dict[str, Any], dead_after_tokens: int | None = None) -> str:
    """The headline numbers of a metrics.evaluate result, a few lines for people."""
    ev, l0 = m["explained_variance"], m["l0"]
    lines = [
        f"  held-out EV     {sum(ev) / len(ev):.3f} mean   per layer "
        + " ".join(f"{v:.3f}" for v in ev),
        f"  L0 per layer    {sum(l0) / len(l0):.1f} mean   per layer "
        + " ".join(f"{v:.1f}" for v in l0),
    ]
    if "dead_training" in m:
        window = (f"{dead_after_tokens:,}" if dead_after_tokens else "train.dead_after_tokens")
        lines.append(f"  dead features   {m['dead_training_fraction']:.1%} ({m['dead_training']} "
                     f"not fired in the last {window} training tokens); "
                     f"never fired on held-out: {m['dead_heldout_fraction']:.1%}")
    if "graph_replacement" in m:
        lines.append(f"  graphs          replacement {m['graph_replacement']:.3f}   "
                     f"completeness {m['graph_completeness']:.3f}   "
                     f"({len(m['graph_replacement_per_prompt'])} held-out prompts)")
    if "delta_ce" in m:
        lines.append(f"  spliced         ΔCE {m['delta_ce']:+.4f} nats   KL {m['kl_spliced']:.4f}   "
                     f"CE recovered {m['ce_recovered']:.3f}   (clean CE {m['ce_clean']:.3f})")
    return "\n".join(lines)
