"""MLP-in / MLP-out activations of many layers from one forward pass, stopping after the last one.

BOS and padding. Windows are expected to start with BOS (the toy tokenizer adds it; real models
want it too). Extraction returns every position, BOS included; `keep_mask` says which positions a
CLT should train on: not the first real token of a window (BOS: its activations are huge outliers
and circuit-tracer zeroes features at position 0 anyway), not padding. Pad on the right: with
causal attention the real tokens then see exactly what they would see unpadded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clt_ray.config import HOOK_PAIRS
from clt_ray.lm.arch import HOOK_NAMES, d_model, hook_module, n_layers


class _StopForward(Exception):
    """Raised by the hook filling the last needed activation: the rest of the model is skipped."""


def _check_hook(name: str) -> None:
    if name not in HOOK_NAMES:
        raise ValueError(f"unknown hook {name!r} (supported: {', '.join(HOOK_NAMES)})")


def _layer_ids(layers: Sequence[int] | None, total: int) -> list[int]:
    ids = list(range(total)) if layers is None else [int(i) for i in layers]
    if not ids:
        raise ValueError("no layers requested")
    if len(set(ids)) != len(ids):
        raise ValueError(f"layers must be distinct, got {ids}")
    bad = [i for i in ids if not 0 <= i < total]
    if bad:
        raise IndexError(f"layers {bad} out of range: the model has {total} layers")
    return ids


def extract_activations(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    layers: Sequence[int] | None = None,
    input_hook: str = "hook_resid_mid",
    output_hook: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(x, y), each [B, T, len(layers), d]: the input / output hook of each layer in `layers`.

    `input_ids` is [B, T] (windows starting with BOS, see the module docstring); `layers` defaults
    to all; `output_hook` defaults to the partner of `input_hook` in HOOK_PAIRS. One forward pass
    under inference mode, cut short after the last needed module (later layers, final norm and
    LM head never run). The results are ordinary tensors (not inference tensors), so training code
    may use them in autograd.
    """
    output_hook = HOOK_PAIRS.get(input_hook, "") if output_hook is None else output_hook
    _check_hook(input_hook)
    _check_hook(output_hook)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    ids = _layer_ids(layers, n_layers(model))
    device = next(model.parameters()).device
    shape = (*input_ids.shape, len(ids), d_model(model))
    # Allocated outside inference mode: filling them in place keeps them ordinary tensors.
    outs = {"x": torch.empty(shape, dtype=dtype, device=device),
            "y": torch.empty(shape, dtype=dtype, device=device)}
    pending = {(key, j) for key in outs for j in range(len(ids))}

    def store(key: str, j: int, act: Tensor) -> None:
        outs[key][:, :, j] = act
        pending.discard((key, j))
        if not pending:
            raise _StopForward

    def pre_hook(key: str, j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            store(key, j, args[0] if args else next(iter(kwargs.values())))
        return hook

    def post_hook(key: str, j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            store(key, j, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = []
    try:
        for key, hook_name in (("x", input_hook), ("y", output_hook)):
            for j, layer in enumerate(ids):
                module, side = hook_module(model, layer, hook_name)
                if side == "input":
                    handles.append(module.register_forward_pre_hook(pre_hook(key, j),
                                                                    with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(post_hook(key, j)))
        with torch.inference_mode():
            try:
                model(input_ids=input_ids.to(device),
                      attention_mask=None if attention_mask is None else attention_mask.to(device),
                      use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if pending:
        raise RuntimeError(f"hooks never fired for {sorted(pending)}: the architecture table "
                           "does not match this model's forward pass")
    return outs["x"], outs["y"]


def keep_mask(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """[B, T] bool: the positions to train on — every real token except each row's first (BOS).

    Works for right or left padding (the first real token is found from the attention mask).
    """
    real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.bool())
    first = real & (real.long().cumsum(dim=1) == 1)
    return real & ~first
