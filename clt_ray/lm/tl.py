"""Load a local (or hub) model into TransformerLens, processed the way circuit-tracer expects.

`HookedTransformer.from_pretrained` accepts only TL's official names. Its building blocks accept a
folder, so we use those (docs/design.md §5), with three workarounds:
- TL picks branches by substrings of the *path* ("llama" skips loading the HF config and crashes;
  "gemma-2-", "Llama-3.2-1B", ... select hard-coded configs). We hand TL a fresh temporary folder
  with a neutral name that holds only config.json; the weights come from the loaded HF model.
- TL's GPT-2 converter reads `config.n_ctx`, which current GPT2Config no longer has (it is
  `n_positions`), and assumes d_mlp = 4·d, ignoring `n_inner`: both are set from the HF config.
- TL sizes a causal-mask buffer n_ctx × n_ctx per layer from `max_position_embeddings` (131072 for
  Llama 3.2: 17 GB a layer). `n_ctx` defaults to at most 2048, as TL does for official Llama 3.2.

Checked on tiny random models: GPT-2, Llama, Mistral, Qwen 2, Qwen 3 load and match HF. TL builds
Gemma 1/2/3 only from official names (local configs: UnsupportedArchitectureError; circuit-tracer's nnsight
backend takes local Gemma 2/3 folders instead). TL builds every GPT-NeoX with a parallel residual,
so `use_parallel_residual=False` models are refused (TL would silently compute something else), and
its parallel blocks have no `hook_resid_mid`: use the `mlp.hook_in` pair for NeoX there.

Weight processing: circuit-tracer's `from_pretrained_and_transcoders` uses fold_ln=False,
center_writing_weights=False, center_unembed=False (fold_value_biases stays at TL's default True),
so `hook_resid_mid` / `hook_mlp_out` / `mlp.hook_*` hold exactly the HF values and a CLT trained on
our extraction plugs in unchanged. We apply the same flags.

A circuit-tracer replacement model from a local model (circuit-tracer only builds one from a TL
name or from a bare config with uninitialised weights): load straight into its class, then do what
`from_pretrained_and_transcoders` does after loading:

    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel)
    model = load_hooked_transformer(path, cls=TransformerLensReplacementModel)
    model._configure_replacement_model(clt)   # wraps the MLPs, adds the skip/gradient hooks

(`ReplacementModel.from_config(cfg, clt, backend="transformerlens")` also works but wraps the MLPs
before weights exist, so the state dict's `blocks.{l}.mlp.*` / `unembed.*` keys would need renaming
to `mlp.old_mlp.*` / `unembed.old_unembed.*`.)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import (
    get_pretrained_model_config,
    get_pretrained_state_dict,
)
from transformers import PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from clt_ray.config import ModelConfig
from clt_ray.lm.arch import UnsupportedArchitectureError
from clt_ray.lm.loading import load_model, to_dtype

MAX_DEFAULT_N_CTX = 2048
CIRCUIT_TRACER_PROCESSING: dict[str, bool] = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}

H = TypeVar("H", bound=HookedTransformer)


def _tl_config_json(hf_model: PreTrainedModel) -> dict[str, Any]:
    """The HF config as TL's converters need it to read."""
    hf_config: PretrainedConfig = hf_model.config
    data = hf_config.to_dict()
    if not data.get("architectures"):  # a config built in memory rather than loaded
        data["architectures"] = [type(hf_model).__name__]
    if hf_config.model_type == "gpt2":
        data.setdefault("n_ctx", hf_config.n_positions)
    return data


def tl_config_and_state_dict(
    hf_model: PreTrainedModel,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    n_ctx: int | None = None,
    model_name: str | None = None,
) -> tuple[HookedTransformerConfig, dict[str, torch.Tensor]]:
    """TL config and (unprocessed) TL state dict of a loaded HF model, never touching the hub."""
    hf_config = hf_model.config
    if hf_config.model_type == "gpt_neox" and not hf_config.use_parallel_residual:
        raise ValueError("TransformerLens builds every GPT-NeoX with a parallel residual; this model "
                         "has use_parallel_residual=False, so its TL version would compute "
                         "something else")
    with tempfile.TemporaryDirectory(prefix="clt_ray_tl_") as tmp:
        folder = Path(tmp) / "model"  # a name no TL substring rule matches
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(_tl_config_json(hf_model)))
        try:
            cfg = get_pretrained_model_config(str(folder), hf_cfg=hf_config.to_dict(),
                                              dtype=dtype, device=device, fold_ln=False)
        except NotImplementedError as exc:
            raise UnsupportedArchitectureError(
                f"TransformerLens cannot build {hf_config.model_type!r} from a local config "
                f"({exc}); it knows Gemma models only by official hub name. For local Gemma 2/3 "
                "folders use circuit-tracer's nnsight backend (docs/design.md §5)"
            ) from exc
        if n_ctx is not None or cfg.n_ctx > MAX_DEFAULT_N_CTX:
            cfg.n_ctx = n_ctx or MAX_DEFAULT_N_CTX
        if hf_config.model_type == "gpt2" and hf_config.n_inner is not None:
            cfg.d_mlp = hf_config.n_inner
        cfg.model_name = Path(model_name or hf_config.name_or_path or "model").name
        cfg.tokenizer_name = hf_config.name_or_path or None  # the real folder, not the temp one
        state_dict = get_pretrained_state_dict(str(folder), cfg, hf_model=hf_model, dtype=dtype)
    return cfg, state_dict


def load_hooked_transformer(
    name_or_path: str | os.PathLike[str] | ModelConfig,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    n_ctx: int | None = None,
    hf_model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    cls: type[H] = HookedTransformer,  # type: ignore[assignment]
    **processing: bool,
) -> H:
    """A `cls` (HookedTransformer or a subclass) holding the model's weights, in eval mode.

    `name_or_path` is anything `load_model` takes (a ModelConfig overrides revision, dtype and
    device); pass an already loaded `hf_model` (+ tokenizer)
    to skip loading it again. `processing` overrides CIRCUIT_TRACER_PROCESSING flags (e.g.
    fold_ln=True for TL's usual analysis view — that changes hook values).
    """
    unknown = set(processing) - set(CIRCUIT_TRACER_PROCESSING)
    if unknown:
        raise ValueError(f"unknown processing flags {sorted(unknown)} "
                         f"(supported: {', '.join(CIRCUIT_TRACER_PROCESSING)})")
    if isinstance(name_or_path, ModelConfig):  # it supplies name, revision, dtype and device
        mc = name_or_path
        name_or_path, revision, dtype, device = mc.name, mc.revision, mc.dtype, mc.device
    torch_dtype = to_dtype(dtype)
    if hf_model is None:
        hf_model, loaded_tokenizer = load_model(name_or_path, revision, dtype=torch_dtype)
        tokenizer = tokenizer or loaded_tokenizer
    cfg, state_dict = tl_config_and_state_dict(hf_model, dtype=torch_dtype, device=device,
                                               n_ctx=n_ctx, model_name=str(name_or_path))
    model = cls(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **{**CIRCUIT_TRACER_PROCESSING, **processing})
    model.move_model_modules_to_device()
    return model.eval()
