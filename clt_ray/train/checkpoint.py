"""Shard-independent checkpoints (docs/design.md §3): any feature range of a CLT loads from any of them.

Layout of one checkpoint folder (written under a temporary name, fsynced, then renamed):

    manifest.json                 format + version, step, total steps, tokens, the CLT config, the
                                  run config, data cursor, shapes, schedules at save time, files
    W_enc_{l}.safetensors         W_enc_{l} [F, d], b_enc_{l} [F], log_threshold_{l} [F] (JumpReLU),
                                  b_dec_{l} [d]                       (circuit-tracer's grouping)
    W_dec_{l}.safetensors         W_dec_{l} [F, L−l, d]
    norm.safetensors              s_in [L], s_out [L] (normalisation scales, not folded in)
    optimizer/W_enc_{l}.safetensors, optimizer/W_dec_{l}.safetensors
                                  Adam moments in the same layout: <key>.exp_avg, <key>.exp_avg_sq
    state.safetensors             tokens_since_fired_{l} [F] int64 (dead-feature counters),
                                  RNG states as uint8 tensors (rng.torch, rng.cuda.{i})

A sharded checkpoint (Ray shard workers write in parallel, `save_checkpoint_shard`) has the same
files inside `shard_SSS/` folders, each holding its feature rows, plus `sizes.json`; its manifest
lists the ranges under `shards`. The reader joins rows across folders, so both kinds load alike.

Weights are stored as trained (normalised space); export folds the scales in. Every per-feature
tensor has features on dim 0, so `load_checkpoint(path, start, stop)` reads rows [start, stop) of
each (safetensors slices: only those bytes are read) — a Ray trainer reslices a checkpoint for any
shard count. A run folder keeps its checkpoints in `checkpoints/step_<step>`; `resolve_checkpoint`
turns a run folder into its latest complete checkpoint. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from clt_ray import layout
from clt_ray.config import CLTConfig, parse_config
from clt_ray.errors import CltRayError
from clt_ray.fsutil import atomic_dir
from clt_ray.nn.clt import CrossLayerTranscoder

FORMAT = "clt-ray-checkpoint"
VERSION = 1
MANIFEST = layout.CHECKPOINT_MANIFEST
CHECKPOINTS = layout.CHECKPOINTS
MOMENTS = ("exp_avg", "exp_avg_sq")
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(CltRayError):
    """A checkpoint that is missing, incomplete or of another format."""


@dataclass
class TrainingState:
    """Everything besides the weights that an exact resume needs (features: the held range)."""

    step: int = 0
    """Updates done so far (the next update is made at this 0-based step)."""
    total_steps: int | None = None
    """The run's length: schedules are fractions of it."""
    tokens: int = 0
    data: dict[str, Any] | None = None
    """The activation source's cursor (`ActivationSource.state()`)."""
    tokens_since_fired: Tensor | None = None
    """[L, F_local] int64: training tokens since each feature last fired (dead-feature counters)."""
    rng: dict[str, Tensor] = field(default_factory=dict)
    """RNG states as uint8 tensors: "torch" (CPU), "cuda.{i}"."""
    adam_step: float | None = None
    moments: dict[str, dict[str, Tensor]] | None = None
    """Adam moments by parameter name ("W_enc", "W_dec.3", …): {"exp_avg": …, "exp_avg_sq": …}."""
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON-able notes (schedules at save time, last metrics)."""


class LoadedCheckpoint(NamedTuple):
    model: CrossLayerTranscoder
    state: TrainingState
    manifest: dict[str, Any]

    @property
    def path(self) -> Path:
        return Path(self.manifest["path"])

    @property
    def config(self) -> Any:
        """The run's `config.Config`, or None when the checkpoint was saved without one."""
        raw = self.manifest.get("config")
        return None if raw is None else parse_config(raw, source=f"{self.path}/{MANIFEST}")


# --- RNG ---------------------------------------------------------------------------------------


def rng_state() -> dict[str, Tensor]:
    """torch's global RNG states (CPU and every CUDA device) as uint8 tensors."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def set_rng_state(states: dict[str, Tensor]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    for key, s in states.items():
        if key.startswith("cuda.") and torch.cuda.is_available():
            torch.cuda.set_rng_state(s.cpu(), int(key.split(".")[1]))


# --- optimizer ---------------------------------------------------------------------------------


def adam_moments(model: CrossLayerTranscoder, optimizer: torch.optim.Optimizer
                 ) -> tuple[float | None, dict[str, dict[str, Tensor]] | None]:
    """(step, moments by parameter name) of a torch Adam over `model`; (None, None) before its
    first step."""
    steps, moments = set(), {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if not st:
            continue
        steps.add(float(st["step"]))
        moments[name] = {m: st[m] for m in MOMENTS}
    if not moments:
        return None, None
    if len(moments) != len(list(model.parameters())) or len(steps) != 1:
        raise ValueError("optimizer state is partial or its steps differ between parameters")
    return steps.pop(), moments


@torch.no_grad()
def load_adam_moments(optimizer: torch.optim.Optimizer, model: CrossLayerTranscoder,
                      step: float, moments: dict[str, dict[str, Tensor]]) -> None:
    """Put saved moments into a freshly built torch Adam over `model` (same parameter names)."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            saved = moments[name]
            optimizer.state[p] = {
                "step": torch.tensor(step, dtype=torch.float32,
                                     device=p.device if on_device else "cpu"),
                **{m: saved[m].to(device=p.device, dtype=p.dtype).clone() for m in MOMENTS},
            }


# --- layout ------------------------------------------------------------------------------------


def _per_layer(named: dict[str, Tensor], n_layers: int, suffix: str = "") -> dict[str, dict]:
    """Model-layout tensors ("W_enc" [L, F, d], "W_dec.l", …) → {file stem: {key: tensor}}."""
    files: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for l in range(n_layers):
        for name in ("W_enc", "b_enc", "log_threshold", "b_dec"):
            if name in named:
                files[f"W_enc_{l}"][f"{name}_{l}{suffix}"] = named[name][l]
        files[f"W_dec_{l}"][f"W_dec_{l}{suffix}"] = named[f"W_dec.{l}"]
    return files


def _save(path: Path, tensors: dict[str, Tensor]) -> None:
    # clone: slices of one parameter share storage, which safetensors refuses
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(path))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_files(root: Path, model: CrossLayerTranscoder, moments: Any, state: TrainingState,
                 rng: bool = True) -> dict[str, dict[str, Tensor]]:
    """The safetensors files of the features `model` holds (all of them or one shard's rows)."""
    L = model.cfg.n_layers
    files = _per_layer({n: p for n, p in model.named_parameters()}, L)
    extra_state: dict[str, Tensor] = {f"rng.{k}": v for k, v in state.rng.items()} if rng else {}
    if state.tokens_since_fired is not None:
        extra_state.update({f"tokens_since_fired_{l}": state.tokens_since_fired[l]
                            for l in range(L)})
    root.mkdir(parents=True, exist_ok=True)
    for stem, tensors in files.items():
        _save(root / f"{stem}.safetensors", tensors)
    _save(root / layout.CHECKPOINT_NORM, {"s_in": model.s_in, "s_out": model.s_out})
    if moments is not None:
        (root / "optimizer").mkdir()
        for stem in files:
            merged = {}
            for m in MOMENTS:
                named = {n: mo[m] for n, mo in moments.items()}
                merged.update(_per_layer(named, L, f".{m}")[stem])
            _save(root / "optimizer" / f"{stem}.safetensors", merged)
    if extra_state:
        _save(root / layout.CHECKPOINT_STATE, extra_state)
    return files


def _sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*.safetensors"))}


def _manifest(model: CrossLayerTranscoder, state: TrainingState, config: Any, adam_step: Any,
              has_moments: bool, shapes: dict[str, list[int]]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "step": state.step,
        "total_steps": state.total_steps,
        "tokens": state.tokens,
        "clt": model.cfg.model_dump(mode="json"),
        "config": None if config is None else config.model_dump(mode="json"),
        "data": state.data,
        "optimizer": {"type": "adam", "step": adam_step} if has_moments else None,
        "shapes": shapes,
        "extra": state.extra,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_checkpoint(
    path: str | os.PathLike[str],
    model: CrossLayerTranscoder,
    optimizer: torch.optim.Optimizer | None = None,
    state: TrainingState | None = None,
    config: Any = None,
) -> Path:
    """Write a checkpoint of a whole CLT (and optionally its Adam, training state and run config)
    to `path`, atomically: a crash or error leaves either the old folder or the new one."""
    if not model.is_whole:
        raise ValueError("save_checkpoint takes the whole CLT; shards use save_checkpoint_shard")
    path, state = Path(path), state or TrainingState()
    adam_step, moments = (adam_moments(model, optimizer) if optimizer is not None
                          else (state.adam_step, state.moments))
    with atomic_dir(path) as tmp:
        files = _write_files(tmp, model, moments, state)
        shapes = {k: list(v.shape) for t in files.values() for k, v in t.items()}
        manifest = _manifest(model, state, config, adam_step, moments is not None, shapes)
        sizes = _sizes(tmp)
        manifest.update(files=sorted(sizes), sizes=sizes)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)
    return path


def shard_dir(index: int) -> str:
    return layout.shard_name(index)


def save_checkpoint_shard(root: str | os.PathLike[str], model: CrossLayerTranscoder,
                          optimizer: torch.optim.Optimizer, state: TrainingState, config: Any,
                          shards: list[tuple[int, int]]) -> None:
    """Write one feature shard's part of a sharded checkpoint into `root`: `shard_SSS/` with its
    rows of every per-feature file (same names and keys as a whole checkpoint) and `sizes.json`,
    written last; shard 0 also writes the manifest (with `shards`, the feature ranges). Every shard
    writes in parallel — 4.0 s against 25.7 s for gathering to one writer at GPT-2 shape
    (bench/sharding.py) — and the folders of all shards, merged (Ray Train's upload, or a shared
    filesystem), are one checkpoint that `load_checkpoint` reads for any feature range."""
    index = shards.index((model.start, model.stop))
    root = Path(root)
    adam_step, moments = adam_moments(model, optimizer)
    part = root / shard_dir(index)
    files = _write_files(part, model, moments, state, rng=index == 0)
    (part / layout.SHARD_SIZES).write_text(json.dumps(_sizes(part)))
    if index == 0:
        F = model.cfg.n_features
        shapes = {k: [F if i == _row_dim(k) else n for i, n in enumerate(v.shape)]
                  for t in files.values() for k, v in t.items()}
        manifest = _manifest(model, state, config, adam_step, moments is not None, shapes)
        manifest["shards"] = [list(r) for r in shards]
        (root / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _row_dim(key: str) -> int | None:
    """Per-layer checkpoint keys have features on dim 0, except b_dec_{l}."""
    return None if key.startswith("b_dec") else 0


# --- finding checkpoints -----------------------------------------------------------------------


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / layout.checkpoint_name(step)


def is_complete(path: Path) -> bool:
    """A checkpoint folder whose manifest is there and every file it lists has its recorded size
    (a copy in progress — e.g. Ray Train persisting it into the run folder — is not complete)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if "shards" in manifest:  # every shard's folder, each with its sizes.json
            sizes = {}
            for i in range(len(manifest["shards"])):
                part = json.loads((path / shard_dir(i) / layout.SHARD_SIZES).read_text())
                sizes.update({f"{shard_dir(i)}/{name}": n for name, n in part.items()})
        else:
            sizes = manifest.get("sizes") or {f: None for f in manifest.get("files", [])}
    except (OSError, ValueError):
        return False
    for name, size in sizes.items():
        f = path / name
        if not f.is_file() or (size is not None and f.stat().st_size != size):
            return False
    return True


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """A run folder's complete checkpoints (those with a manifest), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder as is, or a run folder's latest checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    raise CheckpointError(f"{path} is neither a checkpoint (no {MANIFEST}) nor a run folder "
                          f"with complete checkpoints under {CHECKPOINTS}/")


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and stale temporary folders)."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/{MANIFEST}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clt-ray checkpoint (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {manifest.get('version')} is not "
                              f"supported (this clt-ray reads version {VERSION})")
    manifest["path"] = str(path)
    return manifest


# --- loading -----------------------------------------------------------------------------------


class _Uninitialised(CrossLayerTranscoder):
    def reset_parameters(self) -> None:  # the weights are about to be overwritten
        pass


class _Reader:
    """Reads keys of a checkpoint's safetensors files, features [start, stop) of per-feature ones."""

    def __init__(self, root: Path, start: int, stop: int,
                 shards: list[list[int]] | None = None) -> None:
        self.root, self.start, self.stop = root, start, stop
        self.shards = shards  # a sharded checkpoint's feature ranges, one folder each
        self._open: dict[str, Any] = {}

    def path(self, file: str, shard: int | None = None) -> Path:
        """Where `file` is: in the checkpoint folder, or in a shard's folder (shard 0 by default
        for the replicated tensors)."""
        if self.shards is None:
            return self.root / file
        return self.root / shard_dir(shard or 0) / file

    def _handle(self, file: str, shard: int | None = None) -> Any:
        path = self.path(file, shard)
        if path not in self._open:
            if not path.is_file():
                raise CheckpointError(f"{self.root}: missing {path.relative_to(self.root)}")
            self._open[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[path]

    def _tensor(self, file: str, key: str, shard: int | None = None) -> Any:
        f = self._handle(file, shard)
        if key not in f.keys():  # noqa: SIM118 - safe_open is not a dict
            raise CheckpointError(f"{self.path(file, shard)}: missing tensor {key}")
        return f

    def get(self, file: str, key: str, rows: bool = True) -> Tensor:
        if not rows:
            return self._tensor(file, key).get_tensor(key)
        if self.shards is None:
            return self._tensor(file, key).get_slice(key)[self.start : self.stop]
        parts = []
        for i, (a, b) in enumerate(self.shards):
            lo, hi = max(self.start, a), min(self.stop, b)
            if lo < hi:  # only the rows [start, stop) needs are read
                parts.append(self._tensor(file, key, i).get_slice(key)[lo - a : hi - a])
        return torch.cat(parts)

    def model_layout(self, prefix: str, n_layers: int, jumprelu: bool, suffix: str = ""
                     ) -> dict[str, Tensor]:
        """The per-layer tensors of one file family as model-layout tensors by parameter name."""
        out: dict[str, Tensor] = {}
        names = ["W_enc", "b_enc"] + (["log_threshold"] if jumprelu else [])
        for name in names:
            out[name] = torch.stack([self.get(f"{prefix}W_enc_{l}.safetensors",
                                              f"{name}_{l}{suffix}") for l in range(n_layers)])
        out["b_dec"] = torch.stack([self.get(f"{prefix}W_enc_{l}.safetensors",
                                             f"b_dec_{l}{suffix}", rows=False)
                                    for l in range(n_layers)])
        for l in range(n_layers):
            out[f"W_dec.{l}"] = self.get(f"{prefix}W_dec_{l}.safetensors", f"W_dec_{l}{suffix}")
        return out


def load_checkpoint(
    path: str | os.PathLike[str],
    start: int = 0,
    stop: int | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    optimizer: bool = False,
) -> LoadedCheckpoint:
    """(model, training state, manifest) from a checkpoint folder or a run folder (its latest).

    `start`/`stop` pick the feature range [start, stop) of every layer (default: the whole CLT);
    dead-feature counters and (with optimizer=True) Adam moments come for the same range."""
    manifest = read_manifest(path)
    root = Path(manifest["path"])
    cfg = CLTConfig.model_validate(manifest["clt"])
    stop = cfg.n_features if stop is None else stop
    if not 0 <= start < stop <= cfg.n_features:
        raise ValueError(f"feature range [{start}, {stop}) is not inside [0, {cfg.n_features})")
    L, jumprelu = cfg.n_layers, cfg.activation == "jumprelu"
    reader = _Reader(root, start, stop, manifest.get("shards"))

    model = _Uninitialised(cfg, start, stop, device=device, dtype=dtype)
    model.__class__ = CrossLayerTranscoder
    with torch.no_grad():
        for name, t in reader.model_layout("", L, jumprelu).items():
            model.get_parameter(name).copy_(t)
        model.s_in.copy_(reader.get(layout.CHECKPOINT_NORM, "s_in", rows=False))
        model.s_out.copy_(reader.get(layout.CHECKPOINT_NORM, "s_out", rows=False))

    state = TrainingState(step=manifest["step"], total_steps=manifest.get("total_steps"),
                          tokens=manifest.get("tokens", 0), data=manifest.get("data"),
                          extra=manifest.get("extra") or {})
    if reader.path(layout.CHECKPOINT_STATE).is_file():
        with safe_open(str(reader.path(layout.CHECKPOINT_STATE)), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            state.rng = {k[4:]: f.get_tensor(k) for k in keys if k.startswith("rng.")}
        if "tokens_since_fired_0" in keys:
            state.tokens_since_fired = torch.stack(
                [reader.get(layout.CHECKPOINT_STATE, f"tokens_since_fired_{l}") for l in range(L)])
    if optimizer:
        if manifest.get("optimizer") is None:
            raise CheckpointError(f"{root}: saved without optimizer state")
        state.adam_step = float(manifest["optimizer"]["step"])
        moments: dict[str, dict[str, Tensor]] = defaultdict(dict)
        for m in MOMENTS:
            for name, t in reader.model_layout("optimizer/", L, jumprelu, f".{m}").items():
                moments[name][m] = t.to(device)
        state.moments = dict(moments)
    return LoadedCheckpoint(model, state, manifest)
