"""Where each supported HF architecture keeps its MLP-in / MLP-out activations (docs/design.md §2).

One row per `config.model_type`. Every hook point is "the input or the output of one module of a
decoder layer", so extraction needs nothing but PyTorch forward (pre-)hooks:

- `hook_resid_mid`: INPUT of the pre-MLP norm (GPT-2 `ln_2`, Llama/Qwen/Mistral
  `post_attention_layernorm`, Gemma 2/3 `pre_feedforward_layernorm`). GPT-NeoX with
  `use_parallel_residual=True` (the Pythia default) feeds that norm the layer's *input*, so there
  this is resid_pre, not resid_pre + attn_out.
- `mlp.hook_in`: OUTPUT of that norm = the MLP module's input.
- `hook_mlp_out`: what the MLP adds to the residual stream: the MLP module's output, except
  Gemma 2/3 where it is the output of `post_feedforward_layernorm` (as circuit-tracer's nnsight
  mapping and TransformerLens' `hook_mlp_out` have it).
- `mlp.hook_out`: the MLP module's output.

Dropout after the MLP (GPT-2, NeoX) is a no-op in eval mode, which `load_model` sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from clt_ray.config import HOOK_PAIRS
from clt_ray.errors import CltRayError

Side = Literal["input", "output"]
HOOK_NAMES: tuple[str, ...] = (*HOOK_PAIRS, *HOOK_PAIRS.values())


@dataclass(frozen=True)
class Arch:
    """Module paths of one architecture: `layers` from the CausalLM, the rest from one layer."""

    layers: str
    pre_mlp_norm: str
    mlp: str = "mlp"
    post_mlp_norm: str | None = None
    """Gemma 2/3's norm on the MLP output, applied before it joins the residual stream."""

    def hook(self, name: str) -> tuple[str, Side]:
        """(module path inside a layer, which side of it) for a hook name of HOOK_NAMES."""
        table: dict[str, tuple[str, Side]] = {
            "hook_resid_mid": (self.pre_mlp_norm, "input"),
            "mlp.hook_in": (self.pre_mlp_norm, "output"),
            "hook_mlp_out": (self.post_mlp_norm or self.mlp, "output"),
            "mlp.hook_out": (self.mlp, "output"),
        }
        if name not in table:
            raise ValueError(f"unknown hook {name!r} (supported: {', '.join(HOOK_NAMES)})")
        return table[name]


_LLAMA_LIKE = Arch(layers="model.layers", pre_mlp_norm="post_attention_layernorm")
_GEMMA_2_3 = Arch(
    layers="model.layers",
    pre_mlp_norm="pre_feedforward_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)

ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch(layers="transformer.h", pre_mlp_norm="ln_2"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA_2_3,
    "gemma3_text": _GEMMA_2_3,
    "gpt_neox": Arch(layers="gpt_neox.layers", pre_mlp_norm="post_attention_layernorm"),
}


class UnsupportedArchitectureError(CltRayError, ValueError):
    """The model's `model_type` has no row in ARCHITECTURES."""


def arch_of(model_or_config: nn.Module | object) -> Arch:
    """The table row for a HF model or config (by `config.model_type`), or a clear error."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported for activation extraction "
            f"(supported model_type values: {', '.join(ARCHITECTURES)}); add a row to "
            "clt_ray.lm.arch.ARCHITECTURES"
        )
    return ARCHITECTURES[model_type]


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF CausalLM (or of its bare base model)."""
    path = arch_of(model).layers
    try:
        return model.get_submodule(path)  # type: ignore[return-value]
    except AttributeError:
        # A bare base model (GPT2Model, LlamaModel, ...) holds the list without the prefix.
        return model.get_submodule(path.split(".", 1)[1])  # type: ignore[return-value]


def n_layers(model: nn.Module) -> int:
    return len(layer_list(model))


def d_model(model: nn.Module) -> int:
    """The residual-stream width; every hook of HOOK_NAMES has this last dimension."""
    return int(model.config.hidden_size)  # GPT-2's n_embd is aliased to hidden_size


def hook_module(model: nn.Module, layer: int, name: str) -> tuple[nn.Module, Side]:
    """The module carrying hook `name` of `layer`, and whether the hook is its input or output."""
    path, side = arch_of(model).hook(name)
    layers = layer_list(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range: the model has {len(layers)} layers")
    return layers[layer].get_submodule(path), side
