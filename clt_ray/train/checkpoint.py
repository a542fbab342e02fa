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
files inside `shard_SSS/` folders, each holding its feature rows, plus `sha256.json` and
`sizes.json` (written last); its manifest lists the ranges under `shards`. The reader joins rows
across folders, so both kinds load alike.

Integrity: the manifest (a shard: its sizes.json / sha256.json) records every file's size and
sha256. Listing a run's checkpoints checks sizes only (cheap); loading checks the sha256 of each
file whose data it reads and every tensor's shape against the manifest's CLT config, so a truncated,
missing, changed or mislabelled file is a `DamagedCheckpoint` naming it — never a silently
different CLT. Checkpoints written before sha256 was recorded load with the size check alone.

Weights are stored as trained (normalised space); export folds the scales in. Every per-feature
tensor has features on dim 0, so `load_checkpoint(path, start, stop)` reads rows [start, stop) of
each (safetensors slices: only those bytes are read) — a Ray trainer reslices a checkpoint for any
shard count. A run folder keeps its checkpoints in `checkpoints/step_<step>`; `resolve_checkpoint`
turns a run folder into its latest usable checkpoint, saying which newer ones it skipped and
why (`latest_checkpoint` gives both to callers with their own log). Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from clt_ray import layout
from clt_ray.config import CLTConfig, parse_config
from clt_ray.errors import CltRayError
from clt_ray.fsutil import Staged, atomic_dir, is_uri
from clt_ray.nn.clt import CrossLayerTranscoder

FORMAT = "clt-ray-checkpoint"
VERSION = 1
MANIFEST = layout.CHECKPOINT_MANIFEST
CHECKPOINTS = layout.CHECKPOINTS
SHARD_SHA256 = "sha256.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PER_LAYER_KEY = re.compile(r"^(W_enc|b_enc|log_threshold|b_dec|W_dec|tokens_since_fired)_(\d+)$")

logger = logging.getLogger(__name__)
Log = Callable[[str], None]


class CheckpointError(CltRayError):
    """A checkpoint that is missing, incomplete or of another format."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files disagree with its manifest (missing, truncated, changed, of other
    shapes) or whose manifest is unreadable: a run folder's loaders skip it for an older one."""


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
    def location(self) -> str:
        """Where the checkpoint is: its URI when read from a store (`path` is then the local
        copy), else its path."""
        return self.manifest.get("location") or self.manifest["path"]

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


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(root: Path) -> tuple[dict[str, int], dict[str, str]]:
    """(size, sha256) of every safetensors file under root by relative path; hashed in threads
    (hashlib releases the GIL), from the page cache the files were just written through."""
    files = sorted(root.rglob("*.safetensors"))
    names = [str(p.relative_to(root)) for p in files]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(_sha256, files))
    return ({n: p.stat().st_size for n, p in zip(names, files)}, dict(zip(names, hashes)))


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
        sizes, hashes = _digests(tmp)
        manifest.update(files=sorted(sizes), sizes=sizes, sha256=hashes)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)
    return path


def shard_dir(index: int) -> str:
    return layout.shard_name(index)


def save_checkpoint_shard(root: str | os.PathLike[str], model: CrossLayerTranscoder,
                          optimizer: torch.optim.Optimizer, state: TrainingState, config: Any,
                          shards: list[tuple[int, int]]) -> None:
    """Write one feature shard's part of a sharded checkpoint into `root`: `shard_SSS/` with its
    rows of every per-feature file (same names and keys as a whole checkpoint), `sha256.json`,
    and `sizes.json` written last; shard 0 also writes the manifest (with `shards`, the feature
    ranges). Every shard writes in parallel — 4.0 s against 25.7 s for gathering to one writer
    at GPT-2 shape (bench/sharding.py) — and the folders of all shards, merged (Ray Train's upload, or a shared
    filesystem), are one checkpoint that `load_checkpoint` reads for any feature range."""
    index = shards.index((model.start, model.stop))
    root = Path(root)
    adam_step, moments = adam_moments(model, optimizer)
    part = root / shard_dir(index)
    files = _write_files(part, model, moments, state, rng=index == 0)
    sizes, hashes = _digests(part)
    (part / SHARD_SHA256).write_text(json.dumps(hashes))
    (part / layout.SHARD_SIZES).write_text(json.dumps(sizes))
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


# --- integrity ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object of a checkpoint (manifest, a shard's sizes.json), or DamagedCheckpoint."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise DamagedCheckpoint(f"{path}: not a JSON object")
    return data


def _recorded(root: Path, manifest: dict[str, Any]) -> dict[str, tuple[int | None, str | None]]:
    """(size, sha256) recorded for each file of a checkpoint, by path relative to it; None where
    not recorded (checkpoints written before sha256, or before sizes, were recorded)."""
    if "shards" not in manifest:
        sizes = manifest.get("sizes") or dict.fromkeys(manifest.get("files", []))
        hashes = manifest.get("sha256") or {}
        return {name: (size, hashes.get(name)) for name, size in sizes.items()}
    out = {}
    for i in range(len(manifest["shards"])):
        part = root / shard_dir(i)
        sizes = _read_json(part / layout.SHARD_SIZES)
        hashes = _read_json(part / SHARD_SHA256) if (part / SHARD_SHA256).is_file() else {}
        out.update({f"{shard_dir(i)}/{name}": (size, hashes.get(name))
                    for name, size in sizes.items()})
    return out


def _check_file(path: Path, size: int | None, sha256: str | None) -> None:
    """DamagedCheckpoint unless `path` is a file of the recorded size (and sha256, when given)."""
    if not path.is_file():
        raise DamagedCheckpoint(f"{path}: missing")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DamagedCheckpoint(f"{path}: {actual} bytes, but {size} were recorded when it was "
                                "saved (truncated or rewritten)")
    if sha256 is not None and (digest := _sha256(path)) != sha256:
        raise DamagedCheckpoint(f"{path}: sha256 {digest[:12]}… differs from the {sha256[:12]}… "
                                "recorded when it was saved (its bytes changed)")


def check_checkpoint(path: str | os.PathLike[str], *, verify: bool = False) -> dict[str, Any]:
    """The manifest of a checkpoint folder whose listed files are all there with their recorded
    sizes (verify=True: and sha256, which reads every file); else DamagedCheckpoint naming the file
    and what is wrong."""
    path = Path(path)
    manifest = _read_json(path / MANIFEST)
    for name, (size, digest) in _recorded(path, manifest).items():
        _check_file(path / name, size, digest if verify else None)
    return manifest


def is_complete(path: Path) -> bool:
    """A checkpoint folder whose manifest is there and every file it lists has its recorded size
    (a copy in progress — e.g. Ray Train persisting it into the run folder — is not complete)."""
    try:
        check_checkpoint(path)
    except DamagedCheckpoint:
        return False
    return True


# --- finding checkpoints -----------------------------------------------------------------------


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / layout.checkpoint_name(step)


def _step_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Every `checkpoints/step_*` folder of a run, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """A run folder's complete checkpoints (manifest, every file of its recorded size), oldest
    first."""
    return [p for p in _step_dirs(run_dir) if is_complete(p)]


def latest_checkpoint(run_dir: str | os.PathLike[str], *, verify: bool = False
                      ) -> tuple[Path | None, list[str]]:
    """(the newest usable checkpoint of a run folder or None, one line per newer one skipped
    saying why). Usable: its manifest reads and every file has its recorded size — and with
    verify=True its sha256 (reads every file once: what a resume wants before training on it)."""
    skipped = []
    for path in reversed(_step_dirs(run_dir)):
        try:
            check_checkpoint(path, verify=verify)
        except DamagedCheckpoint as exc:
            skipped.append(_skip_line(path, exc))
            continue
        return path, skipped
    return None, skipped


def _skip_line(path: Path, exc: Exception) -> str:
    return f"skipping checkpoint {path.name}: {exc}"


def _report(skipped: list[str], used: Path | str | None, log: Log | None) -> None:
    """Say which newer checkpoints were skipped and which one is used (nothing when none was)."""
    if not skipped:
        return
    log = log or logger.warning
    for line in skipped:
        log(line)
    if used is not None:
        log(f"using {used}, the newest usable checkpoint")


def _no_checkpoint(path: Path, skipped: list[str]) -> CheckpointError:
    if not path.exists():
        return CheckpointError(f"{path} does not exist")
    if skipped:
        return CheckpointError(f"{path} has no usable checkpoint under {CHECKPOINTS}/ (every one "
                               f"is damaged; newest: {skipped[0]})")
    return CheckpointError(f"{path} is neither a checkpoint (no {MANIFEST}) nor a run folder "
                           f"with complete checkpoints under {CHECKPOINTS}/")


def resolve_checkpoint(path: str | os.PathLike[str], *, log: Log | None = None) -> Path:
    """A checkpoint folder as is, or a run folder's newest usable checkpoint (`latest_checkpoint`;
    each newer one skipped is a line to `log`, default a logging warning). A URI is fetched
    into node-local scratch (`fetch_checkpoint`) and its local copy returned."""
    if is_uri(path):
        return fetch_checkpoint(str(path), log=log)
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    found, skipped = latest_checkpoint(path)
    _report(skipped, found, log)
    if found is None:
        raise _no_checkpoint(path, skipped)
    return found


# --- checkpoints in a store --------------------------------------------------------------------

_FETCHED: dict[str, Path] = {}  # checkpoint URI -> its verified local copy (checkpoints never change)
_ORIGIN: dict[str, str] = {}  # local copy -> the URI it was fetched from (what messages name)
_STAGED: list[Staged] = []  # the scratch folders of those copies


def release_fetched() -> None:
    """Remove every local copy `fetch_checkpoint` made (they are also removed at exit): what a
    long-lived process calls once it has loaded what it needed."""
    for staged in _STAGED:
        staged.close()
    _STAGED.clear()
    _FETCHED.clear()


def store_checkpoints(run: Staged) -> list[str]:
    """Names (step_…) of the checkpoint folders of a run folder in a store, complete or not,
    oldest first (one listing)."""
    found = [(int(m.group(1)), name) for name in run.entries(CHECKPOINTS)
             if (m := _STEP_DIR.match(name))]
    return [name for _, name in sorted(found)]


def fetch_checkpoint(location: str, *, log: Log | None = None) -> Path:
    """A verified local copy (node-local scratch, removed at exit) of a checkpoint in a store: a
    checkpoint URI as is, or a run folder URI's newest usable checkpoint — each newer one whose
    copy is incomplete or damaged (an upload cut short, a changed object) is said to `log` and
    skipped. The copy's every file is checked against its recorded size and sha256."""
    if location in _FETCHED and _FETCHED[location].is_dir():
        return _FETCHED[location]
    store = Staged(location, "checkpoint")
    _STAGED.append(store)
    named = store.exists(MANIFEST)
    candidates = [""] if named else [f"{CHECKPOINTS}/{n}" for n in
                                     reversed(store_checkpoints(store))]
    skipped: list[str] = []
    for name in candidates:
        uri = store.uri(name)
        if uri in _FETCHED and _FETCHED[uri].is_dir():
            _report(skipped, uri, log)
            return _FETCHED[uri]
        store.pull(name)
        local = store.local / name
        try:
            check_checkpoint(local, verify=True)
        except DamagedCheckpoint as exc:
            exc = DamagedCheckpoint(str(exc).replace(str(local), uri))
            if named:
                raise exc from None
            skipped.append(f"skipping checkpoint {uri}: {exc}")
            shutil.rmtree(local, ignore_errors=True)
            continue
        _FETCHED[uri] = local
        _ORIGIN[str(local)] = uri
        _report(skipped, uri, log)
        return local
    _report(skipped, None, log)
    if skipped:
        raise CheckpointError(f"{location} has no usable checkpoint under {CHECKPOINTS}/ (every "
                              f"one is damaged; newest: {skipped[0]})")
    raise CheckpointError(f"{location} is neither a checkpoint (no {MANIFEST}) nor a run folder "
                          f"with checkpoints under {CHECKPOINTS}/")


def push_checkpoint(run: Staged, path: Path) -> None:
    """Copy a local checkpoint of `run` (a folder under its local checkpoints/) to the store:
    its files first, the manifest last (a checkpoint in a store is complete once its manifest
    and every file of the recorded size are there; restarts skip the rest). Then the store keeps
    only the checkpoints the local folder kept (pruning)."""
    if not run.remote:
        return
    run.push(f"{CHECKPOINTS}/{path.name}", last=[MANIFEST])
    kept = {p.name for p in _step_dirs(run.local)}
    for name in store_checkpoints(run):
        if name not in kept:
            run.remove(f"{CHECKPOINTS}/{name}")


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and stale temporary folders)."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | os.PathLike[str], *, log: Log | None = None) -> dict[str, Any]:
    path = resolve_checkpoint(path, log=log)
    manifest = _read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clt-ray checkpoint (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {manifest.get('version')} is not "
                              f"supported (this clt-ray reads version {VERSION})")
    manifest["path"] = str(path)
    manifest["location"] = _ORIGIN.get(str(path), str(path))  # a URI for a copy from a store
    return manifest


# --- loading -----------------------------------------------------------------------------------


class _Uninitialised(CrossLayerTranscoder):
    def reset_parameters(self) -> None:  # the weights are about to be overwritten
        pass


def _expected_shape(cfg: CLTConfig, key: str) -> list[int] | None:
    """The whole CLT's shape of a checkpoint tensor by its key (Adam moments: their parameter's);
    None for keys without one (RNG states)."""
    base = key.split(".")[0]
    if base in ("s_in", "s_out"):
        return [cfg.n_layers]
    m = _PER_LAYER_KEY.match(base)
    if m is None:
        return None
    F, d, L, name = cfg.n_features, cfg.d_model, cfg.n_layers, m.group(1)
    return {"W_enc": [F, d], "W_dec": [F, L - int(m.group(2)), d], "b_dec": [d]}.get(name, [F])


class _Reader:
    """Reads keys of a checkpoint's safetensors files, features [start, stop) of per-feature ones.

    Each file is checked against its recorded size when opened and its sha256 before its data is
    first read (a shard whose rows are not needed is not hashed), and each tensor's shape (rows
    joined across shards) against the manifest's CLT config and recorded shapes before it is read:
    slicing rows of a tensor of another shape would silently give another CLT."""

    def __init__(self, root: Path, manifest: dict[str, Any], cfg: CLTConfig, start: int,
                 stop: int) -> None:
        self.root, self.cfg, self.start, self.stop = root, cfg, start, stop
        self.shards = manifest.get("shards")  # a sharded checkpoint's ranges, one folder each
        self.recorded = _recorded(root, manifest)
        self.shapes = manifest.get("shapes") or {}
        self._open: dict[Path, Any] = {}
        self._hashed: set[Path] = set()
        self._checked: set[tuple[str, str]] = set()

    def path(self, file: str, shard: int | None = None) -> Path:
        """Where `file` is: in the checkpoint folder, or in a shard's folder (shard 0 by default
        for the replicated tensors)."""
        if self.shards is None:
            return self.root / file
        return self.root / shard_dir(shard or 0) / file

    def has(self, file: str) -> bool:
        """Whether the checkpoint has `file` (recorded in its manifest, or there)."""
        path = self.path(file)
        return str(path.relative_to(self.root)) in self.recorded or path.is_file()

    def _record(self, path: Path) -> tuple[int | None, str | None]:
        return self.recorded.get(str(path.relative_to(self.root)), (None, None))

    def _handle(self, file: str, shard: int | None = None) -> Any:
        path = self.path(file, shard)
        if path not in self._open:
            _check_file(path, self._record(path)[0], None)
            try:
                self._open[path] = safe_open(str(path), framework="pt", device="cpu")
            except SafetensorError as exc:
                raise DamagedCheckpoint(f"{path}: not a readable safetensors file ({exc})") from None
        return self._open[path]

    def keys(self, file: str) -> set[str]:
        return set(self._handle(file).keys())

    def _tensor(self, file: str, key: str, shard: int | None = None) -> Any:
        """The open file holding `key` (checked there)."""
        f = self._handle(file, shard)
        if key not in f.keys():  # noqa: SIM118 - safe_open is not a dict
            raise DamagedCheckpoint(f"{self.path(file, shard)}: missing tensor {key}")
        return f

    def _slice(self, file: str, key: str, shard: int | None = None) -> Any:
        return self._tensor(file, key, shard).get_slice(key)

    def _data(self, file: str, key: str, shard: int | None = None) -> Any:
        """The open file holding `key`, its bytes checked against the recorded sha256."""
        f, path = self._tensor(file, key, shard), self.path(file, shard)
        if path not in self._hashed:
            _check_file(path, *self._record(path))
            self._hashed.add(path)
        return f

    def _check_shape(self, file: str, key: str, rows: bool) -> None:
        if (file, key) in self._checked:
            return
        if self.shards is None or not rows:
            shape = list(self._slice(file, key).get_shape())
        else:  # each shard holds its range's rows; joined, they are the whole tensor
            parts = [list(self._slice(file, key, i).get_shape()) for i in range(len(self.shards))]
            for i, ((a, b), part) in enumerate(zip(self.shards, parts)):
                if not part or part[0] != b - a or part[1:] != parts[0][1:]:
                    raise DamagedCheckpoint(
                        f"{self.path(file, i)}: tensor {key} has shape {part}, but the manifest "
                        f"gives this shard features [{a}, {b}) of shape {[b - a] + parts[0][1:]}")
            shape = [sum(p[0] for p in parts)] + parts[0][1:]
        for want, source in ((_expected_shape(self.cfg, key), "the manifest's CLT config"),
                             (self.shapes.get(key.split(".")[0]), "the manifest's shapes")):
            if want is not None and shape != list(want):
                raise DamagedCheckpoint(f"{self.path(file)}: tensor {key} has shape {shape}, but "
                                        f"{source} gives {list(want)}")
        self._checked.add((file, key))

    def get(self, file: str, key: str, rows: bool = True) -> Tensor:
        self._check_shape(file, key, rows)
        if not rows:
            return self._data(file, key).get_tensor(key)
        if self.shards is None:
            return self._data(file, key).get_slice(key)[self.start : self.stop]
        parts = []
        for i, (a, b) in enumerate(self.shards):
            lo, hi = max(self.start, a), min(self.stop, b)
            if lo < hi:  # only the rows [start, stop) needs are read
                parts.append(self._data(file, key, i).get_slice(key)[lo - a : hi - a])
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
    log: Log | None = None,
) -> LoadedCheckpoint:
    """(model, training state, manifest) from a checkpoint folder or a run folder (its newest
    usable checkpoint).

    `start`/`stop` pick the feature range [start, stop) of every layer (default: the whole CLT);
    dead-feature counters and (with optimizer=True) Adam moments come for the same range. Every
    file read is checked against its recorded size and sha256 and every tensor against the
    manifest's shapes: a damaged checkpoint named explicitly is a DamagedCheckpoint naming the file
    and what is wrong; in a run folder it is skipped for the next older one, with a line to `log`
    (default: a logging warning) saying why. A URI is read through a verified local copy
    (`fetch_checkpoint`)."""
    path = fetch_checkpoint(str(path), log=log) if is_uri(path) else Path(path)
    if (path / MANIFEST).is_file():
        check_checkpoint(path)
        return _load(path, start, stop, device=device, dtype=dtype, optimizer=optimizer)
    skipped: list[str] = []
    for candidate in reversed(_step_dirs(path)):
        try:
            check_checkpoint(candidate)
            loaded = _load(candidate, start, stop, device=device, dtype=dtype,
                           optimizer=optimizer)
        except DamagedCheckpoint as exc:
            skipped.append(_skip_line(candidate, exc))
            continue
        _report(skipped, candidate, log)
        return loaded
    _report(skipped, None, log)
    raise _no_checkpoint(path, skipped)


def _check_shards(root: Path, shards: list[list[int]], n_features: int) -> None:
    """A sharded checkpoint's ranges must tile [0, n_features): rows are read by range."""
    ends = [0] + [b for _, b in shards]
    if [a for a, _ in shards] != ends[:-1] or ends[-1] != n_features or any(
            a >= b for a, b in shards):
        raise DamagedCheckpoint(f"{root / MANIFEST}: shards {shards} do not tile the "
                                f"{n_features} features of its CLT config")


def _load(root: Path, start: int, stop: int | None, *, device: torch.device | str,
          dtype: torch.dtype, optimizer: bool) -> LoadedCheckpoint:
    """load_checkpoint of one checkpoint folder."""
    manifest = read_manifest(root)
    try:
        cfg = CLTConfig.model_validate(manifest["clt"])
    except (KeyError, ValueError) as exc:
        raise DamagedCheckpoint(f"{root / MANIFEST}: no valid CLT config ({exc})") from None
    stop = cfg.n_features if stop is None else stop
    if not 0 <= start < stop <= cfg.n_features:
        raise ValueError(f"feature range [{start}, {stop}) is not inside [0, {cfg.n_features})")
    if manifest.get("shards") is not None:
        _check_shards(root, manifest["shards"], cfg.n_features)
    L, jumprelu = cfg.n_layers, cfg.activation == "jumprelu"
    reader = _Reader(root, manifest, cfg, start, stop)

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
    if reader.has(layout.CHECKPOINT_STATE):
        keys = reader.keys(layout.CHECKPOINT_STATE)
        state.rng = {k[4:]: reader.get(layout.CHECKPOINT_STATE, k, rows=False)
                     for k in keys if k.startswith("rng.")}
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
