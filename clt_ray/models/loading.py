"""Load a HF causal LM and its tokenizer: a hub name, a local folder, or a toy model (`toy:gpt2`).

The config is read first so an unsupported architecture fails before any weights are loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from clt_ray.config import CltRayError, ModelConfig
from clt_ray.models.arch import arch_of

TOY_PREFIX = "toy:"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ModelNotAvailableError(CltRayError, OSError):
    """A model that is neither a local folder nor downloadable (offline, wrong name, no access)."""


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_path(name: str) -> str:
    """A local folder path for `toy:*` and local folders (checked), else the hub name unchanged.

    Toy models are built (or found in the cache) only here, so importing this module is cheap.
    """
    if name.startswith(TOY_PREFIX):
        from clt_ray.toy import build_toy_model  # lazy: building may train a model

        return str(build_toy_model(name[len(TOY_PREFIX):]).path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelNotAvailableError(f"local model folder {path} does not exist")
    return name


def _hub_error(name: str, revision: str | None, exc: Exception) -> ModelNotAvailableError:
    rev = f" at revision {revision!r}" if revision else ""
    why = ("HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set" if _offline() else
           "it could not be downloaded (no network, a wrong name, or gated without a token?)")
    return ModelNotAvailableError(
        f"model {name!r}{rev} is not available locally and {why}. Download it once where there is "
        f"network access (`hf download {name}`), or pass a local model folder or toy:gpt2 / "
        f"toy:llama. Cause: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    )


def model_config(name: str, revision: str | None = None) -> tuple[str, PretrainedConfig]:
    """(local path or hub name, HF config) of a model, without loading weights; a model that is
    not available is a ModelNotAvailableError saying why."""
    path = resolve_model_path(str(name))
    try:
        return path, AutoConfig.from_pretrained(path, revision=revision)
    except OSError as exc:
        raise _hub_error(str(name), revision, exc) from exc


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """A model's tokenizer alone (no weights loaded)."""
    path, _ = model_config(name, revision)
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except OSError as exc:
        raise _hub_error(name, revision, exc) from exc


def load_model(
    name_or_path: str | os.PathLike[str] | ModelConfig,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) for a hub name, local folder, `toy:<arch>` or ModelConfig.

    A ModelConfig supplies name, revision, dtype and device (the other arguments are then ignored).
    The tokenizer is returned as saved (GPT-2's has no pad token; extraction does not need one).
    """
    if isinstance(name_or_path, ModelConfig):
        cfg = name_or_path
        name_or_path, revision, dtype, device = cfg.name, cfg.revision, cfg.dtype, cfg.device
    name = str(name_or_path)
    path, config = model_config(name, revision)
    arch_of(config)  # unsupported architecture: fail before loading any weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=revision, config=config, dtype=to_dtype(dtype)
        )
    except OSError as exc:
        raise _hub_error(name, revision, exc) from exc
    return model.to(device).eval(), tokenizer
