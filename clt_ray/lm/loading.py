"""Load a HF causal LM and its tokenizer: a hub name, a local folder, or a toy model (`toy:gpt2`).

The config is read first so an unsupported architecture fails before any weights are loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clt_ray.config import ModelConfig
from clt_ray.errors import CltRayError
from clt_ray.lm.arch import arch_of
from clt_ray.toy import build_toy_model
from clt_ray.toy.recipe import check_arch, default_recipe

if TYPE_CHECKING:  # transformers takes seconds to import: loaded when a model is
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

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


class DeviceError(CltRayError, ValueError):
    """A device name torch does not know, or a device this machine does not have."""


def check_device(name: str | torch.device) -> torch.device:
    """The torch device `name` names, checked to exist here before any model is loaded on it:
    torch's own errors come late, as tracebacks, after the weights were read."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {str(name)!r} is not a torch device") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {name} asked for but torch sees no CUDA device")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {name} asked for but torch sees {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name} asked for but torch sees no MPS device")
    return device


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_path(name: str) -> str:
    """A local folder path for `toy:*` and local folders (checked), else the hub name unchanged.

    Toy models are built (or found in the cache) only here, so importing this module is cheap.
    """
    if name.startswith(TOY_PREFIX):
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


def hub_error(name: str, revision: str | None, exc: Exception) -> ModelNotAvailableError:
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
    from transformers import AutoConfig

    path = resolve_model_path(str(name))
    try:
        return path, AutoConfig.from_pretrained(path, revision=revision)
    except OSError as exc:
        raise hub_error(str(name), revision, exc) from exc


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """A model's tokenizer alone (no weights loaded)."""
    from transformers import AutoTokenizer

    path, _ = model_config(name, revision)
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except OSError as exc:
        raise hub_error(name, revision, exc) from exc


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        raise hub_error(name, revision, exc) from exc
    return model.to(device).eval(), tokenizer


def model_dims(model_cfg: ModelConfig) -> tuple[int, int, int | None]:
    """(n_layers, d_model, max positions or None) from the model's config file alone (toy models:
    from their recipe, before they are built) — no weights are loaded, so a config can be checked
    against the model before any expensive work."""
    from transformers import AutoConfig

    if model_cfg.name.startswith(TOY_PREFIX):  # from the recipe: no need to build the model yet
        arch = model_cfg.name[len(TOY_PREFIX):]
        check_arch(arch)
        recipe = default_recipe(arch)
        return recipe.n_layer, recipe.d_model, recipe.n_ctx
    path = resolve_model_path(model_cfg.name)
    try:
        hf = AutoConfig.from_pretrained(path, revision=model_cfg.revision)
    except OSError as exc:
        raise hub_error(model_cfg.name, model_cfg.revision, exc) from exc
    arch_of(hf)
    return config_dims(hf)


def config_dims(hf_config: PretrainedConfig) -> tuple[int, int, int | None]:
    """(n_layers, d_model, max positions or None) of an HF config (a multimodal one's text part;
    GPT-2's n_layer/n_embd are aliases of num_hidden_layers/hidden_size)."""
    hf = getattr(hf_config, "text_config", None) or hf_config
    return (int(hf.num_hidden_layers), int(hf.hidden_size),
            getattr(hf, "max_position_embeddings", None))
