"""What an exported CLT folder says about itself, read without weights, and the check that it
fits a model."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from safetensors import safe_open

from clt_ray import layout
from clt_ray.errors import CltRayError
from clt_ray.lm.loading import config_dims

Backend = Literal["auto", "transformerlens", "nnsight"]
BACKENDS: tuple[str, ...] = ("auto", "transformerlens", "nnsight")


class AttributionError(CltRayError, ValueError):
    """Bad input to attribution: a CLT that does not fit the model, a prompt too long, ..."""


# --- the CLT folder and the model --------------------------------------------------------------


@dataclass(frozen=True)
class CLTFolder:
    """What an exported CLT folder (export.export_clt) says about itself, read without weights."""

    path: Path
    n_layers: int
    d_model: int
    n_features: int
    model_name: str
    input_hook: str
    output_hook: str
    scan: str | None
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name


def read_clt_folder(path: str | os.PathLike[str]) -> CLTFolder:
    path = Path(path).expanduser().resolve()
    config_file = path / layout.CLT_CONFIG
    if not config_file.is_file():
        raise AttributionError(f"{path}: not an exported CLT folder (no config.yaml); make one "
                               "with `clt-ray export CHECKPOINT OUT`")
    config = yaml.safe_load(config_file.read_text()) or {}
    if config.get("model_kind") != "cross_layer_transcoder":
        raise AttributionError(f"{config_file}: model_kind is {config.get('model_kind')!r}, "
                               "expected cross_layer_transcoder")
    layers = sorted(int(m.group(1)) for f in path.glob("W_enc_*.safetensors")
                    if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", f.name)))
    if not layers or layers != list(range(len(layers))):
        raise AttributionError(f"{path}: expected W_enc_0.safetensors … W_enc_<L-1>.safetensors, "
                               f"found layers {layers}")
    for l in layers:
        if not (path / f"W_dec_{l}.safetensors").is_file():
            raise AttributionError(f"{path}: W_dec_{l}.safetensors is missing")
    with safe_open(str(path / "W_enc_0.safetensors"), "pt") as f:
        n_features, d = f.get_slice("W_enc_0").get_shape()
    return CLTFolder(path, len(layers), int(d), int(n_features), str(config.get("model_name", "")),
                     config.get("feature_input_hook", ""), config.get("feature_output_hook", ""),
                     config.get("scan"), config)


def check_fits(clt: CLTFolder, hf_config: Any, model_name: str) -> None:
    """The CLT's layers and width must be the model's: one error naming both."""
    n_layers, d_model, _ = config_dims(hf_config)
    if (clt.n_layers, clt.d_model) != (n_layers, d_model):
        raise AttributionError(
            f"the CLT at {clt.path} has {clt.n_layers} layers of width {clt.d_model}, but the "
            f"model {model_name} has {n_layers} layers of width {d_model}: it was trained for "
            "another model")


def feature_scan(clt: CLTFolder | str) -> str:
    """The scan written into graphs of a CLT (or a CLT name): with the bundled frontend's
    index.html at the server root, `./data/features/<name>/<index>.json` is read from the data
    folder (offline dashboards)."""
    return f"./data/{layout.FEATURE_DASHBOARDS}/{clt if isinstance(clt, str) else clt.name}"
