"""Evaluation metrics of a CLT on held-out data (docs/design.md §2).

Definitions (per layer l, over the held-out tokens t; y the target hook, ŷ the CLT's reconstruction,
both in raw model space; the per-layer normalisation cancels in both ratios):

  EV_l   = 1 − Σ_t ‖y_t − ŷ_t‖² / Σ_t ‖y_t − ȳ‖²    ȳ = the held-out mean of y_l (per dimension)
  nMSE_l = Σ_t ‖y_t − ŷ_t‖² / Σ_t ‖y_t‖²
  L0_l   = mean over tokens of the number of active (≠ 0) features of layer l

So predicting the held-out mean gives EV 0, a perfect reconstruction EV 1 and nMSE 0, predicting 0
gives nMSE 1. The "total" variants pool the sums over all layers (not a mean of ratios). Sums are
accumulated in float64 across batches (Chan's parallel update for the centred sum of squares), so
the result does not depend on how tokens are split into batches.

Splice (CE / KL). In the *spliced* forward pass every layer's output hook (`hook_mlp_out`: the MLP
output, or Gemma's post-MLP norm; `mlp.hook_out`: the MLP output) is replaced by the CLT's
reconstruction, computed from the CLT inputs (input hook) of that same spliced pass: the input at
layer l already contains the replacement errors of layers < l, so errors compound as they would in
a replacement model. The *clean* pass is the unmodified model; the *zero-ablation* pass replaces the
same outputs by 0. Only positions the CLT trains on are replaced (`lm.keep_mask`): the first
real token of every window (BOS) and padding are left unspliced, there and in the zero ablation.
CE and KL are averaged over next-token predictions made at spliced positions whose next token is
real (a prediction at BOS depends on BOS alone, so it would be identical in every run):

  ΔCE = CE_spliced − CE_clean;   KL = mean_t KL(p_clean,t ‖ p_spliced,t)
  CE recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)   (1: as good as the model, 0: as
  bad as deleting the MLPs)

Reconstruction metrics (EV, nMSE, L0, features fired) come from the clean pass (teacher-forced
inputs, as in training), on the same positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clt_ray.config import HOOK_PAIRS
from clt_ray.data import heldout_windows
from clt_ray.lm import d_model, hook_module, keep_mask, load_model, n_layers
from clt_ray.lm.loading import check_device
from clt_ray.nn.clt import CrossLayerTranscoder, batchtopk_mask, sparse_rows_matmul, topk_mask
from clt_ray.train.checkpoint import CheckpointError, Log, load_checkpoint

SPARSE_DECODE_MAX_DENSITY = 0.05
"""At or below this fraction of active features, splice decoding gathers the active decoder rows
(exact either way; only faster)."""

# --- reconstruction metrics on tensors -----------------------------------------------------------


def _check_pair(y: Tensor, y_hat: Tensor) -> None:
    if y.shape != y_hat.shape or y.dim() != 3:
        raise ValueError(f"expected y and y_hat of the same shape [tokens, layers, d], "
                         f"got {list(y.shape)} and {list(y_hat.shape)}")


def explained_variance(y: Tensor, y_hat: Tensor) -> Tensor:
    """EV per layer [L] of y_hat for y (both [N, L, d]), ȳ the mean of y over these N tokens."""
    _check_pair(y, y_hat)
    y, y_hat = y.double(), y_hat.double()
    sse = (y - y_hat).square().sum(dim=(0, 2))
    sst = (y - y.mean(dim=0)).square().sum(dim=(0, 2))
    return 1 - sse / sst


def normalized_mse(y: Tensor, y_hat: Tensor) -> Tensor:
    """nMSE per layer [L]: Σ‖y − ŷ‖² / Σ‖y‖² over the N tokens of y, y_hat [N, L, d]."""
    _check_pair(y, y_hat)
    y, y_hat = y.double(), y_hat.double()
    return (y - y_hat).square().sum(dim=(0, 2)) / y.square().sum(dim=(0, 2))


def l0_per_layer(acts: Tensor) -> Tensor:
    """Mean number of active features per token, per layer [L], of acts [N, L, F]."""
    return (acts != 0).sum(dim=2).double().mean(dim=0)


class ReconstructionStats:
    """Streaming sums for EV / nMSE / L0 / fired counts over any number of batches.

    `update` takes raw y, ŷ [N, L, d] and acts [N, L, F]; `merge` adds another instance's sums
    (e.g. from data-parallel evaluators); `result` gives the metrics as plain Python numbers."""

    def __init__(self, n_layers: int, n_features: int) -> None:
        self.n = 0
        self.mean: Tensor | None = None  # [L, d] float64, running mean of y
        self.m2 = torch.zeros(n_layers, dtype=torch.float64)  # Σ‖y − ȳ‖² per layer
        self.sse = torch.zeros(n_layers, dtype=torch.float64)
        self.ss = torch.zeros(n_layers, dtype=torch.float64)
        self.active = torch.zeros(n_layers, dtype=torch.float64)  # Σ_t L0
        self.fire_counts = torch.zeros(n_layers, n_features, dtype=torch.int64)

    def _add_moments(self, nb: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if self.mean is None or self.n == 0:
            self.n, self.mean, self.m2 = nb, mean_b.clone(), self.m2 + m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2_b + delta.square().sum(-1) * (self.n * nb / n)
        self.n = n

    @torch.no_grad()
    def update(self, y: Tensor, y_hat: Tensor, acts: Tensor) -> None:
        _check_pair(y, y_hat)
        if y.shape[0] == 0:
            return
        y, y_hat = y.double().cpu(), y_hat.double().cpu()
        mean_b = y.mean(dim=0)
        self._add_moments(y.shape[0], mean_b, (y - mean_b).square().sum(dim=(0, 2)))
        self.sse += (y - y_hat).square().sum(dim=(0, 2))
        self.ss += y.square().sum(dim=(0, 2))
        fired = acts != 0
        self.active += fired.sum(dim=(0, 2)).double().cpu()
        self.fire_counts += fired.sum(dim=0).cpu()

    def merge(self, other: ReconstructionStats) -> None:
        if other.n == 0:
            return
        assert other.mean is not None
        self._add_moments(other.n, other.mean, other.m2)
        self.sse += other.sse
        self.ss += other.ss
        self.active += other.active
        self.fire_counts += other.fire_counts

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        ev = 1 - self.sse / self.m2
        return {
            "n_tokens": self.n,
            "explained_variance": _floats(ev),
            "explained_variance_total": float(1 - self.sse.sum() / self.m2.sum()),
            "nmse": _floats(self.sse / self.ss),
            "nmse_total": float(self.sse.sum() / self.ss.sum()),
            "l0": _floats(self.active / self.n),
            "l0_total": float(self.active.sum() / self.n),
        }


def _floats(t: Tensor) -> list[float]:
    return [float(v) for v in t.tolist()]


# --- dead features -------------------------------------------------------------------------------


def _join_counters(counters: Tensor | Sequence[Tensor] | Mapping[int, Tensor]) -> Tensor:
    """One [L, F] tensor from a whole-CLT tensor, shard tensors in feature order, or a mapping
    {shard start feature: [L, F_shard]} (any order; the ranges must tile [0, F) without gaps)."""
    if isinstance(counters, Tensor):
        parts = [counters]
    elif isinstance(counters, Mapping):
        pos, parts = 0, []
        for start in sorted(counters):
            if start != pos:
                raise ValueError(f"shard counters do not tile the features: expected a shard "
                                 f"starting at feature {pos}, got {start}")
            parts.append(counters[start])
            pos += counters[start].shape[-1]
    else:
        parts = list(counters)
    if not parts:
        raise ValueError("no counters given")
    if any(p.dim() != 2 or p.shape[0] != parts[0].shape[0] for p in parts):
        raise ValueError("counters must each be [n_layers, n_features_of_shard] with the same "
                         f"n_layers, got shapes {[list(p.shape) for p in parts]}")
    return torch.cat([p.detach().cpu() for p in parts], dim=1)


def dead_features(
    counters: Tensor | Sequence[Tensor] | Mapping[int, Tensor], *, window: int | None = None
) -> dict[str, Any]:
    """Global dead-feature counts from per-feature counters [L, F] — or one [L, F_s] per feature
    shard (a list in feature order, or a mapping shard-start → tensor): shards are joined first, so
    the counts are always global, never per shard.

    window=None: counters count how often each feature fired (tokens or steps); dead = never (0).
    window=W: counters are steps (or tokens) since each feature last fired; dead = ≥ W."""
    c = _join_counters(counters)
    dead = c == 0 if window is None else c >= window
    per_layer = dead.sum(dim=1)
    total = int(per_layer.sum())
    return {
        "dead": total,
        "dead_per_layer": [int(v) for v in per_layer.tolist()],
        "n_features": c.numel(),
        "dead_fraction": total / c.numel(),
    }


# --- splice: the CLT in the model's forward pass -------------------------------------------------


def _first_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _main_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output: Any, new: Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _register(module: nn.Module, side: str, fn) -> Any:
    """fn(tensor) on the input (pre-hook) or output (hook) of module; fn's return value, if not
    None, replaces the output."""
    if side == "input":
        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fn(_first_arg(args, kwargs))  # inputs are read, never replaced

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        new = fn(_main_output(output))
        return None if new is None else _replace_output(output, new)

    return module.register_forward_hook(hook)


@contextmanager
def _hooks(model: nn.Module, specs: list[tuple[int, str, Any]]) -> Iterator[None]:
    handles = []
    try:
        for layer, name, fn in specs:
            module, side = hook_module(model, layer, name)
            handles.append(_register(module, side, fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _encode_layer(clt: CrossLayerTranscoder, xn: Tensor, layer: int) -> Tensor:
    """Activations [N, F] of one layer from its normalised input [N, d]: clt.encode, one layer."""
    pre = torch.addmm(clt.b_enc[layer], xn, clt.W_enc[layer].T)
    act = clt.cfg.activation
    if act == "jumprelu":
        return pre * (pre > clt.log_threshold[layer].exp())
    if act == "relu":
        return F.relu(pre)
    mask_fn = topk_mask if act == "topk" else batchtopk_mask
    return F.relu(pre) * mask_fn(pre[:, None], clt.cfg.k)[:, 0]


class _Splice:
    """Per-forward state of the spliced pass: activations are decoded into every later layer's
    running reconstruction as soon as their layer's input hook fires."""

    def __init__(self, clt: CrossLayerTranscoder, mask: Tensor) -> None:
        self.clt, self.mask = clt, mask
        L, d = clt.cfg.n_layers, clt.cfg.d_model
        self.acc = torch.zeros(int(mask.sum()), L, d, device=clt.b_dec.device,
                               dtype=clt.b_dec.dtype)
        self.encoded = [False] * L

    def read(self, layer: int, x: Tensor) -> None:
        clt, L, d = self.clt, self.clt.cfg.n_layers, self.clt.cfg.d_model
        xn = x[self.mask].to(clt.b_dec.dtype) * clt.s_in[layer]
        a = _encode_layer(clt, xn, layer)
        W = clt.W_dec[layer].view(clt.n_local, (L - layer) * d)
        if (a != 0).sum() <= SPARSE_DECODE_MAX_DENSITY * a.numel():
            out = sparse_rows_matmul(a, W)
        else:
            out = a @ W
        self.acc[:, layer:] += out.view(-1, L - layer, d)
        self.encoded[layer] = True

    def write(self, layer: int, out: Tensor) -> Tensor:
        if not self.encoded[layer]:
            raise RuntimeError(f"layer {layer}'s output hook ran before its input hook: the "
                               "hook pair does not fit this architecture's forward pass")
        clt = self.clt
        y_hat = (self.acc[:, layer] + clt.b_dec[layer]) / clt.s_out[layer]
        out = out.clone()
        out[self.mask] = y_hat.to(out.dtype)
        return out


def _zero_write(mask: Tensor):
    def fn(out: Tensor) -> Tensor:
        out = out.clone()
        out[mask] = 0
        return out
    return fn


def _forward_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _token_losses(logits: Tensor, input_ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(log-probs [P, V] of the predictions at `valid` positions, their CE [P])."""
    logp = logits[:, :-1][valid].float().log_softmax(-1)
    target = input_ids[:, 1:][valid]
    return logp, -logp.gather(1, target[:, None])[:, 0]


def _kl(logp_p: Tensor, logp_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row, from log-probabilities [P, V]."""
    return (logp_p.exp() * (logp_p - logp_q)).sum(-1)


def _batches(
    windows: Tensor | Iterable[Any], attention_mask: Tensor | None, batch_size: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    if isinstance(windows, Tensor):
        if windows.dim() != 2:
            raise ValueError(f"windows must be token ids [n_windows, tokens], got "
                             f"{list(windows.shape)}")
        for i in range(0, windows.shape[0], batch_size):
            yield (windows[i : i + batch_size],
                   None if attention_mask is None else attention_mask[i : i + batch_size])
        return
    for batch in windows:
        if isinstance(batch, Tensor):
            yield batch, None
        elif isinstance(batch, Mapping):
            yield batch["input_ids"], batch.get("attention_mask")
        else:
            ids, mask = batch
            yield ids, mask


def check_compatible(clt: CrossLayerTranscoder, model: nn.Module) -> None:
    if not clt.is_whole:
        raise ValueError(f"evaluation needs the whole CLT, got the feature shard "
                         f"[{clt.start}, {clt.stop}) of {clt.cfg.n_features}")
    if (clt.cfg.n_layers, clt.cfg.d_model) != (n_layers(model), d_model(model)):
        raise ValueError(f"the CLT has {clt.cfg.n_layers} layers of width {clt.cfg.d_model}, the "
                         f"model {n_layers(model)} layers of width {d_model(model)}")


@torch.no_grad()
def evaluate(
    clt: CrossLayerTranscoder,
    model: nn.Module,
    windows: Tensor | Iterable[Any],
    *,
    attention_mask: Tensor | None = None,
    input_hook: str = "hook_resid_mid",
    output_hook: str | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    splice: bool = True,
    fired_counters: Tensor | Sequence[Tensor] | Mapping[int, Tensor] | None = None,
    dead_window: int | None = None,
) -> dict[str, Any]:
    """Every metric of the module docstring on held-out token windows, as a JSON-able dict.

    windows: token ids [N, T] (each window starting with BOS; `attention_mask` [N, T] for right
    padding), split into batches of `batch_size`; or an iterable of batches (a [B, T] tensor, an
    (ids, mask) pair or a dict with input_ids / attention_mask). At most `max_batches` batches.
    The model is a HF causal LM (eval mode) on the CLT's device. splice=False skips the three
    forward passes of the CE/KL part. `fired_counters` (the trainer's counters, per shard or whole)
    adds the training-time dead-feature counts (see `dead_features`; `dead_window` for
    steps-since-fired counters); "dead_heldout" counts features that never fired here.
    """
    output_hook = HOOK_PAIRS.get(input_hook, "") if output_hook is None else output_hook
    check_compatible(clt, model)
    L = clt.cfg.n_layers
    dev = clt.b_dec.device
    stats = ReconstructionStats(L, clt.cfg.n_features)
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero_ablation": 0.0,
            "kl_spliced": 0.0, "kl_zero_ablation": 0.0}
    n_pred = n_batches = 0
    for ids, amask in _batches(windows, attention_mask, batch_size):
        if max_batches is not None and n_batches >= max_batches:
            break
        n_batches += 1
        ids = ids.to(dev)
        amask = None if amask is None else amask.to(dev)
        keep = keep_mask(ids, amask)
        N = int(keep.sum())
        xs = torch.empty(N, L, clt.cfg.d_model, device=dev)
        ys = torch.empty_like(xs)

        def capture(store: Tensor, layer: int, keep: Tensor = keep):
            def fn(t: Tensor) -> None:
                store[:, layer] = t[keep].to(store.dtype)
            return fn

        specs = [(l, input_hook, capture(xs, l)) for l in range(L)]
        specs += [(l, output_hook, capture(ys, l)) for l in range(L)]
        with _hooks(model, specs):
            clean_logits = _forward_logits(model, ids, amask)
        xn, _ = clt.normalize(xs)
        _, acts = clt.encode(xn)
        y_hat = clt.decode(acts) / clt.s_out[:, None]
        stats.update(ys, y_hat, acts)
        del xs, xn, acts, y_hat

        if not splice:
            continue
        real = torch.ones_like(keep) if amask is None else amask.bool()
        valid = keep[:, :-1] & real[:, 1:]
        n_pred += int(valid.sum())
        logp_clean, ce = _token_losses(clean_logits, ids, valid)
        sums["ce_clean"] += float(ce.sum())
        del clean_logits

        state = _Splice(clt, keep)
        specs = [(l, input_hook, lambda t, l=l, s=state: s.read(l, t)) for l in range(L)]
        specs += [(l, output_hook, lambda t, l=l, s=state: s.write(l, t)) for l in range(L)]
        with _hooks(model, specs):
            logp, ce = _token_losses(_forward_logits(model, ids, amask), ids, valid)
        sums["ce_spliced"] += float(ce.sum())
        sums["kl_spliced"] += float(_kl(logp_clean, logp).sum())

        zero = _zero_write(keep)
        with _hooks(model, [(l, output_hook, zero) for l in range(L)]):
            logp, ce = _token_losses(_forward_logits(model, ids, amask), ids, valid)
        sums["ce_zero_ablation"] += float(ce.sum())
        sums["kl_zero_ablation"] += float(_kl(logp_clean, logp).sum())

    if n_batches == 0:
        raise ValueError("no held-out windows to evaluate")
    out: dict[str, Any] = {"n_batches": n_batches, **stats.result()}
    heldout = dead_features(stats.fire_counts)
    out["dead_heldout"] = heldout["dead"]
    out["dead_heldout_per_layer"] = heldout["dead_per_layer"]
    out["dead_heldout_fraction"] = heldout["dead_fraction"]
    if fired_counters is not None:
        train = dead_features(fired_counters, window=dead_window)
        out["dead_training"] = train["dead"]
        out["dead_training_per_layer"] = train["dead_per_layer"]
        out["dead_training_fraction"] = train["dead_fraction"]
    if splice:
        if n_pred == 0:
            raise ValueError("no next-token predictions at spliced positions (windows too short?)")
        m = {k: v / n_pred for k, v in sums.items()}
        gap = m["ce_zero_ablation"] - m["ce_clean"]
        out.update(m)
        out.update({
            "n_predictions": n_pred,
            "delta_ce": m["ce_spliced"] - m["ce_clean"],
            "ce_recovered": (m["ce_zero_ablation"] - m["ce_spliced"]) / gap if gap else math.nan,
            "bos_spliced": False,
        })
    out["input_hook"], out["output_hook"] = input_hook, output_hook
    return out


# --- a checkpoint on its run's held-out data -----------------------------------------------------


def evaluate_checkpoint(
    path: str,
    *,
    batches: int | None = None,
    tokens: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    splice: bool = True,
    log: Log | None = None,
) -> dict[str, Any]:
    """`evaluate` for a checkpoint (or run folder: its newest usable one) on held-out windows of
    the corpus in its run config (other documents than training), with the LM named there.
    tokens: held-out tokens to draw (default the config's data.heldout_tokens); batches: at most
    this many batches of batch_size windows (default data.lm_batch_size); device: for the LM and
    the CLT (default the config's model.device; checked first). Training dead-feature counters
    come from the checkpoint. log: where lines about skipped damaged checkpoints go (default:
    a logging warning)."""
    if device is not None:
        check_device(device)
    loaded = load_checkpoint(path, log=log)
    cfg = loaded.config
    if cfg is None:
        raise CheckpointError(f"{loaded.path}: saved without its run config, so the model and "
                              "held-out data are unknown")
    model_cfg = cfg.model.model_copy(update={"device": device}) if device else cfg.model
    check_device(model_cfg.device)
    clt = loaded.model.to(model_cfg.device)
    model, tokenizer = load_model(model_cfg)
    ids, mask = heldout_windows(tokenizer, cfg.data, tokens)
    since = loaded.state.tokens_since_fired
    result = evaluate(
        clt, model, ids, attention_mask=mask, input_hook=model_cfg.input_hook,
        output_hook=model_cfg.output_hook, batch_size=batch_size or cfg.data.lm_batch_size,
        max_batches=batches, splice=splice, fired_counters=since,
        dead_window=cfg.train.dead_after_tokens)
    return {"checkpoint": loaded.location, "step": loaded.state.step, "model": model_cfg.name,
            "activation": clt.cfg.activation, "n_features": clt.cfg.n_features, **result}


def format_report(r: dict[str, Any]) -> str:
    """A compact human-readable table of an `evaluate` / `evaluate_checkpoint` result."""
    lines = []
    if "checkpoint" in r:
        lines.append(f"checkpoint {r['checkpoint']} (step {r['step']}), model {r['model']}, "
                     f"{r['activation']} × {r['n_features']} features/layer")
    lines.append(f"held-out: {r['n_tokens']} tokens in {r['n_batches']} batches "
                 f"({r['input_hook']} -> {r['output_hook']})")
    train = "dead_training_per_layer" in r
    head = f"{'layer':>5} {'EV':>8} {'nMSE':>8} {'L0':>8} {'dead(held-out)':>15}"
    lines.append(head + (f" {'dead(training)':>15}" if train else ""))
    for l, (ev, nm, l0) in enumerate(zip(r["explained_variance"], r["nmse"], r["l0"])):
        row = f"{l:>5} {ev:>8.4f} {nm:>8.4f} {l0:>8.1f} {r['dead_heldout_per_layer'][l]:>15}"
        lines.append(row + (f" {r['dead_training_per_layer'][l]:>15}" if train else ""))
    row = (f"{'all':>5} {r['explained_variance_total']:>8.4f} {r['nmse_total']:>8.4f} "
           f"{r['l0_total']:>8.1f} {r['dead_heldout']:>15}")
    lines.append(row + (f" {r['dead_training']:>15}" if train else ""))
    lines.append("  (EV, nMSE: pooled over layers; L0: summed over layers)")
    if "delta_ce" in r:
        lines.append(f"CE clean {r['ce_clean']:.4f}  spliced {r['ce_spliced']:.4f} "
                     f"(ΔCE {r['delta_ce']:+.4f})  zero-ablation {r['ce_zero_ablation']:.4f}  "
                     f"recovered {100 * r['ce_recovered']:.1f}%")
        lines.append(f"KL(clean‖spliced) {r['kl_spliced']:.4f} nats/token "
                     f"(zero-ablation {r['kl_zero_ablation']:.4f}) over {r['n_predictions']} "
                     "predictions; BOS positions not spliced")
    return "\n".join(lines)
