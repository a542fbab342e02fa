"""Export a CLT to circuit-tracer's on-disk format (docs/design.md §5).

Layout of the folder (what `circuit_tracer.transcoder.cross_layer_transcoder.load_clt` reads):

    W_enc_{l}.safetensors   W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d], threshold_{l} [F]
                            (threshold only for JumpReLU; without it circuit-tracer uses ReLU)
    W_dec_{l}.safetensors   W_dec_{l} [F, L−l, d]
    config.yaml             model_kind: cross_layer_transcoder, feature_input_hook,
                            feature_output_hook, model_name, scan (+ a `clt_ray` block of notes,
                            which circuit-tracer ignores)

Weights are in raw model space: the normalisation scales are folded in (`CrossLayerTranscoder.
folded_weights`), so circuit-tracer's encode/decode on raw activations equal ours. circuit-tracer
stores only ReLU and JumpReLU: a TopK/BatchTopK CLT is exported after conversion to JumpReLU
(`CrossLayerTranscoder.to_jumprelu`, one θ per layer calibrated so L0 is kept) from calibration
activations, or refused. The folder is written under a temporary name and renamed, so a failed
export never leaves a partial folder (an existing one is replaced only on success).

An export never deletes what is not its own (`check_destination`): the destination must be new,
an empty folder, or — with force — a previous clt-ray export (config.yaml and W_enc/W_dec files
only); never the current folder, the checkpoint exported, nor a folder containing it.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from clt_ray import layout
from clt_ray.config import HOOK_PAIRS, Config
from clt_ray.data import heldout_windows, window_activations
from clt_ray.errors import CltRayError
from clt_ray.fsutil import Staged, atomic_dir, filesystem, is_uri
from clt_ray.lm import load_model
from clt_ray.lm.loading import check_device, resolve_model_path
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.train.checkpoint import CheckpointError, Log, load_checkpoint, resolve_checkpoint

MODEL_KIND = "cross_layer_transcoder"
CONFIG_FILE = layout.CLT_CONFIG
EXPORTABLE = ("jumprelu", "relu")
DASHBOARD_DATA_KEYS = ("corpus", "text_field", "split", "context_size", "heldout_seed")
_WEIGHT_FILE = re.compile(r"^W_(enc|dec)_\d+\.safetensors$")


class ExportError(CltRayError, ValueError):
    """A CLT that cannot be exported as asked."""


def _check_hooks(input_hook: str, output_hook: str | None) -> str:
    if input_hook not in HOOK_PAIRS:
        raise ExportError(f"unknown input hook {input_hook!r} (supported: {', '.join(HOOK_PAIRS)})")
    expected = HOOK_PAIRS[input_hook]
    if output_hook is None:
        return expected
    if output_hook != expected:
        raise ExportError(f"hooks {input_hook} -> {output_hook} are not a supported pair "
                          f"(expected {input_hook} -> {expected})")
    return output_hook


def is_export(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` holds a clt-ray export and nothing else: config.yaml naming a
    cross-layer transcoder with its `clt_ray` block, and W_enc_*/W_dec_* weight files."""
    folder = Path(folder)
    try:
        names = os.listdir(folder)
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return (isinstance(config, dict) and config.get("model_kind") == MODEL_KIND
            and isinstance(config.get("clt_ray"), dict)
            and all(n == CONFIG_FILE or _WEIGHT_FILE.match(n) for n in names))


def check_destination(out_dir: str | os.PathLike[str], *, force: bool = False,
                      source: str | os.PathLike[str] | None = None) -> None:
    """ExportError unless writing an export to out_dir loses nothing: out_dir is new, an empty
    folder, or (force=True) a previous export; never the current folder or one containing it,
    nor `source` (the checkpoint exported), a folder containing it or one inside it."""
    out = Path(out_dir).resolve()
    if source is not None:
        src = Path(source).resolve()
        if out == src or out in src.parents:
            raise ExportError(f"{out_dir} holds the checkpoint {source} being exported: export "
                              "into a new folder")
        if src in out.parents:
            raise ExportError(f"{out_dir} is inside the checkpoint {source} being exported: "
                              "export into a new folder outside it")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise ExportError(f"{out_dir} is the current folder or contains it: export into a new "
                          "folder (e.g. ./clt)")
    if not os.path.lexists(out_dir):
        return
    if not out.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    entries = sorted(os.listdir(out))
    if not entries:
        return
    if not is_export(out):
        listed = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        raise ExportError(f"{out_dir} is not empty ({listed}) and is not a previous clt-ray "
                          "export: nothing written; export into a new or empty folder")
    if not force:
        raise ExportError(f"{out_dir} already holds a clt-ray export: pass --force to replace it")


def check_store_destination(out: Staged, *, force: bool = False, source: str | None = None
                            ) -> list[str]:
    """check_destination for a destination in a store (a URI): new, empty, or (force=True) a
    previous export; never the checkpoint exported, a folder of it or one inside it. Returns
    what is there (the previous export's entries)."""
    if source is not None and is_uri(source):
        a, b = out.location.rstrip("/") + "/", source.rstrip("/") + "/"
        if a.startswith(b) or b.startswith(a):
            raise ExportError(f"{out} and the checkpoint {source} being exported overlap: "
                              "export into a new folder")
    entries = out.entries()
    if not entries:
        return entries
    if CONFIG_FILE not in entries or not out.pull(CONFIG_FILE) or not is_export(out.local):
        listed = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        raise ExportError(f"{out} is not empty ({listed}) and is not a previous clt-ray "
                          "export: nothing written; export into a new or empty folder")
    if not force:
        raise ExportError(f"{out} already holds a clt-ray export: pass --force to replace it")
    return entries


def default_scan(out_dir: str | os.PathLike[str]) -> str:
    """`./data/features/<folder name>`: circuit-tracer's bundled frontend (index.html at the
    server root) then reads feature dashboards from `features/<folder name>/<index>.json` of its
    data folder instead of fetching them from the web (docs/design.md §5)."""
    return f"./data/features/{Path(out_dir).name}"


def as_jumprelu(clt: CrossLayerTranscoder, calibration: Tensor) -> CrossLayerTranscoder:
    """A JumpReLU copy of a TopK/BatchTopK CLT, θ per layer set on raw calibration input
    activations [N, L, d] (`to_jumprelu`: L0 per layer kept on that data); `clt` is unchanged."""
    converted = copy.deepcopy(clt)
    xn, _ = converted.normalize(calibration.to(clt.b_dec.device))
    converted.to_jumprelu(xn.detach())
    return converted


def export_clt(
    model: CrossLayerTranscoder,
    out_dir: str | os.PathLike[str],
    model_name: str,
    input_hook: str = "hook_resid_mid",
    output_hook: str | None = None,
    scan: str | None = None,
    *,
    calibration: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write `model` (the whole CLT) as a circuit-tracer CLT folder at out_dir; returns the path.

    model_name: what circuit-tracer should load the LM from (a hub name or a local folder path).
    output_hook defaults to the partner of input_hook. scan defaults to `default_scan(out_dir)`.
    TopK/BatchTopK CLTs need `calibration` (raw input activations [N, L, d], e.g. held-out) to be
    converted to JumpReLU; without it they are refused. dtype: of the stored tensors.
    extra: JSON-able notes added to config.yaml's `clt_ray` block. out_dir must be new or empty,
    or with force=True a previous export, which is then replaced (`check_destination`).
    """
    check_destination(out_dir, force=force)
    output_hook = _check_hooks(input_hook, output_hook)
    if not model.is_whole:
        raise ExportError(f"export needs the whole CLT, got the feature shard "
                          f"[{model.start}, {model.stop}) of {model.cfg.n_features}")
    if not model_name or not str(model_name).strip():
        raise ExportError("model_name is empty: give the hub name or local folder of the model")
    source_activation, source_k = model.cfg.activation, model.cfg.k
    if source_activation not in EXPORTABLE:
        if calibration is None:
            raise ExportError(
                f"circuit-tracer stores only ReLU and JumpReLU CLTs; this one is "
                f"{source_activation} (k={model.cfg.k}). Convert it to JumpReLU first "
                "(CrossLayerTranscoder.to_jumprelu on calibration activations, which keeps L0 per "
                "layer), or pass calibration=<raw input activations [N, L, d]> to export_clt")
        model = as_jumprelu(model, calibration)

    out_dir = Path(out_dir)
    L = model.cfg.n_layers
    config = {
        "model_kind": MODEL_KIND,
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
        "model_name": str(model_name),
        "scan": default_scan(out_dir) if scan is None else scan,
        "clt_ray": {
            "n_layers": L,
            "d_model": model.cfg.d_model,
            "n_features": model.cfg.n_features,
            "activation": model.cfg.activation,
            "converted_from": None if source_activation in EXPORTABLE else
            {"activation": source_activation, "k": source_k},
            "normalisation_folded": True,
            **(extra or {}),
        },
    }

    def store(t: Tensor) -> Tensor:  # own storage: safetensors refuses shared/non-contiguous
        return t.detach().to(device="cpu", dtype=dtype).contiguous().clone()

    with atomic_dir(out_dir) as tmp:
        for l in range(L):  # one layer folded at a time: memory ≈ the model + one layer
            weights = model.folded_weights([l])
            enc = {f"{k}_{l}": store(weights[f"{k}_{l}"])
                   for k in ("W_enc", "b_enc", "b_dec", "threshold") if f"{k}_{l}" in weights}
            save_file(enc, str(tmp / f"W_enc_{l}.safetensors"))
            save_file({f"W_dec_{l}": store(weights[f"W_dec_{l}"])},
                      str(tmp / f"W_dec_{l}.safetensors"))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return out_dir


def read_export_config(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """config.yaml of an exported folder (a local path or a URI)."""
    if is_uri(out_dir):
        fs, root = filesystem(out_dir)
        with fs.open_input_stream(f"{root.rstrip('/')}/{CONFIG_FILE}") as f:
            return yaml.safe_load(f.read().decode())
    return yaml.safe_load((Path(out_dir) / CONFIG_FILE).read_text())


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    scan: str | None = None,
    calibration_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    force: bool = False,
    log: Log | None = None,
) -> Path | str:
    """Export a checkpoint (or a run folder's latest usable one) with the hooks and model of its
    run config.

    model_name defaults to the config's model: toy models and local folders become their absolute
    path (what circuit-tracer can load), hub names stay names. A TopK/BatchTopK CLT is converted to
    JumpReLU on the input activations of `calibration_tokens` held-out tokens of its run's corpus
    (default data.heldout_tokens), which needs the LM, run on `device` (default: the config's
    model.device). out_dir: as in `export_clt` (force), and never the checkpoint, a folder holding
    it or one inside it; a URI is written through node-local scratch (`_export_to_store`). log:
    where lines about skipped damaged checkpoints go."""
    if device is not None:
        check_device(device)
    if is_uri(out_dir):
        return _export_to_store(checkpoint, str(out_dir), model_name=model_name,
                                scan=scan or default_scan(out_dir),
                                calibration_tokens=calibration_tokens, dtype=dtype,
                                device=device, force=force, log=log)
    source = resolve_checkpoint(checkpoint, log=lambda _: None)  # load_checkpoint says skips
    check_destination(out_dir, force=force, source=source)  # before anything is loaded
    loaded = load_checkpoint(checkpoint, log=log)
    if loaded.path != source:  # an older one: the newest failed its sha256 check
        check_destination(out_dir, force=force, source=loaded.path)
    cfg, clt = loaded.config, loaded.model
    if cfg is None and model_name is None:
        raise CheckpointError(f"{loaded.path}: saved without its run config; pass the model name")
    input_hook = cfg.model.input_hook if cfg is not None else "hook_resid_mid"
    if model_name is None:
        path = resolve_model_path(cfg.model.name)
        model_name = str(Path(path).resolve()) if Path(path).exists() else path
    calibration = None
    if clt.cfg.activation not in EXPORTABLE:
        if cfg is None:
            raise ExportError(f"{clt.cfg.activation} CLTs are converted to JumpReLU on held-out "
                              "activations, but this checkpoint has no run config naming them")
        calibration = _heldout_inputs(cfg, calibration_tokens, device)
    extra = {"checkpoint": str(loaded.path), "step": loaded.state.step}
    if cfg is not None:  # where feature examples for dashboards come from (attribution)
        extra["data"] = cfg.data.model_dump(mode="json", include=set(DASHBOARD_DATA_KEYS))
    return export_clt(clt, out_dir, model_name, input_hook, cfg.model.output_hook if cfg else None,
                      scan, calibration=calibration, dtype=dtype, extra=extra, force=force)


def _export_to_store(checkpoint: str | os.PathLike[str], out_dir: str, *, force: bool,
                     **options: Any) -> str:
    """export_checkpoint to a URI: written in node-local scratch, then pushed with config.yaml
    last (an export in a store is whole once its config.yaml is there). A previous export
    (force) loses its config.yaml first and its stale objects after."""
    with Staged(out_dir, "export destination") as out:
        before = check_store_destination(out, force=force, source=str(checkpoint))
        export_checkpoint(checkpoint, out.local, force=True, **options)
        if before:  # the old export is marked incomplete while it is replaced
            out.remove(CONFIG_FILE, local=False)
        out.push(last=[CONFIG_FILE])
        written = {p.name for p in out.local.iterdir()}
        for name in before:
            if name not in written:
                out.remove(name)
    return out_dir


def _heldout_inputs(cfg: Config, n_tokens: int | None, device: str | None = None) -> Tensor:
    """Raw CLT inputs [N, L, d] of held-out tokens of a run config's corpus."""
    model_cfg = cfg.model.model_copy(update={"device": device}) if device else cfg.model
    check_device(model_cfg.device)
    model, tokenizer = load_model(model_cfg)
    ids, mask = heldout_windows(tokenizer, cfg.data, n_tokens)
    x, _ = window_activations(model, ids, mask, model_cfg, cfg.data)
    return x.float().cpu()
