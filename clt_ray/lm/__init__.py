"""Loading HF causal LMs and reading their MLP-in / MLP-out activations (docs/design.md §2).

- `arch`: the per-architecture table of hook points (`ARCHITECTURES`) and layer accessors;
- `loading`: `load_model` for hub names, local folders, `toy:<arch>` and ModelConfig;
- `extract`: `extract_activations` (one cut-short forward pass) and `keep_mask` (drop BOS/padding);
- `tl`: `load_hooked_transformer` (imported lazily: TransformerLens is slow to import).
"""

from clt_ray.lm.arch import (
    ARCHITECTURES,
    HOOK_NAMES,
    Arch,
    UnsupportedArchitectureError,
    arch_of,
    d_model,
    hook_module,
    layer_list,
    n_layers,
)
from clt_ray.lm.extract import extract_activations, keep_mask
from clt_ray.lm.loading import (
    ModelNotAvailableError,
    load_model,
    model_config,
    resolve_model_path,
)

__all__ = [
    "ARCHITECTURES",
    "HOOK_NAMES",
    "Arch",
    "ModelNotAvailableError",
    "UnsupportedArchitectureError",
    "arch_of",
    "d_model",
    "extract_activations",
    "hook_module",
    "keep_mask",
    "layer_list",
    "load_hooked_transformer",
    "load_model",
    "model_config",
    "n_layers",
    "resolve_model_path",
]


def __getattr__(name: str):  # lazy: `import transformer_lens` takes seconds
    if name == "load_hooked_transformer":
        from clt_ray.lm.tl import load_hooked_transformer

        return load_hooked_transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
