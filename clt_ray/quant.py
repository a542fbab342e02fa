"""Quantisation of activation blocks [tokens, layers, d] to int8, int4 (two per byte) and int2
(four per byte), for the object store and the cache (docs/design.md §4).

Scales are per token-row per layer, so one outlier token cannot coarsen its neighbours; an optional
per-channel pre-scale (`channel_scales`, estimated once from data and kept in the cache manifest)
divides every dimension by its typical size first, so a few outlier dimensions cannot wipe out the
ordinary ones. One coarse absmax scale per layer per file, the seed library's scheme, loses both.

- int8 and int4: symmetric, codes -q..q (q = 127, 7) on the row's absmax; error ≤ scale/2.
- int2: four levels (±0.5, ±1.5)·Δ without a zero, Δ = 0.996·rms of the row: the uniform
  4-level quantiser with the least MSE for Gaussian data (Lloyd-Max); absmax would put nearly every
  value in the two inner levels.

Everything is plain vectorised torch, so it runs on the device the tensors live on; `dequantize`
writes straight into the training dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BITS = (8, 4, 2)
INT2_STEP = 0.9957
"""Lloyd-Max uniform 4-level step for a unit Gaussian (levels ±0.498, ±1.494)."""
_FP16_TINY = float(torch.finfo(torch.float16).tiny)
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class Quantized:
    """Packed codes [T, L, ceil(d·bits/8)] (uint8) and one scale per token-row per layer [T, L]."""

    bits: int
    codes: Tensor
    scales: Tensor
    d: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + \
            self.scales.numel() * self.scales.element_size()


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"unsupported bits {bits}; supported: {', '.join(map(str, BITS))}")


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes in [0, 2^bits) along the last dim → bytes holding 8/bits codes each (the first
    code in the low bits). The last dim is zero-padded to a multiple of 8/bits."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    per = 8 // bits
    if per == 1:
        return codes
    pad = -codes.shape[-1] % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    groups = codes.view(*codes.shape[:-1], -1, per)
    out = groups[..., 0].clone()
    for i in range(1, per):
        out |= groups[..., i] << (bits * i)
    return out


def unpack(packed: Tensor, bits: int, d: int) -> Tensor:
    """Inverse of `pack`: bytes → uint8 codes, the last dim cut back to `d`."""
    _check_bits(bits)
    per = 8 // bits
    if per == 1:
        return packed[..., :d]
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).view(*packed.shape[:-1], -1)[..., :d]


def channel_scales(sample: Tensor, eps: float = 1e-6) -> Tensor:
    """[L, d] per-channel RMS of a sample [T, L, d] (floored at eps·mean RMS, so a dead channel
    does not divide by zero): divide by it before quantising, multiply after."""
    rms = sample.float().square().mean(0).sqrt()
    return torch.maximum(rms, eps * rms.mean(-1, keepdim=True).clamp_min(eps))


def _row_scales(x: Tensor, bits: int, scale_dtype: torch.dtype) -> Tensor:
    if bits == 2:
        scale = INT2_STEP * x.square().mean(-1).sqrt()
    else:
        scale = x.abs().amax(-1) / (2 ** (bits - 1) - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scale_dtype == torch.float16:
        scale = scale.clamp(_FP16_TINY, _FP16_MAX)
    # codes are computed against the scale as stored, so decoding sees exactly what encoding used
    return scale.to(scale_dtype)


def quantize(x: Tensor, bits: int, channel_scale: Tensor | None = None,
             scale_dtype: torch.dtype = torch.float16) -> Quantized:
    """[T, L, d] activations → `Quantized` (computed in fp32 on x's device)."""
    _check_bits(bits)
    if x.dim() != 3:
        raise ValueError(f"expected activations [tokens, layers, d], got shape {list(x.shape)}")
    x = x.float()
    if channel_scale is not None:
        if channel_scale.shape != x.shape[1:]:
            raise ValueError(f"channel_scale shape {list(channel_scale.shape)} does not match "
                             f"[layers, d] = {list(x.shape[1:])}")
        x = x / channel_scale.to(x.device, torch.float32)
    scales = _row_scales(x, bits, scale_dtype)
    s = scales.float().unsqueeze(-1)
    if bits == 2:
        codes = (torch.floor(x / s) + 2).clamp_(0, 3)
    else:
        q = 2 ** (bits - 1) - 1
        codes = torch.round(x / s).clamp_(-q, q) + q
    return Quantized(bits, pack(codes.to(torch.uint8), bits), scales, x.shape[-1])


def dequantize(q: Quantized, channel_scale: Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """`Quantized` → [T, L, d] in `dtype` on the codes' device."""
    codes = unpack(q.codes, q.bits, q.d)
    scale = q.scales.unsqueeze(-1).to(dtype)
    if q.bits == 2:
        levels = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=dtype, device=codes.device)
        x = levels[codes.long()] * scale
    else:
        x = (codes.to(dtype) - (2 ** (q.bits - 1) - 1)) * scale
    if channel_scale is not None:
        x = x * channel_scale.to(x.device, dtype)
    return x


def relative_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per layer: Σ (x − x̂)² / Σ x² over tokens and d, for [T, L, d] tensors."""
    x, x_hat = x.float(), x_hat.float()
    return (x - x_hat).square().sum((0, 2)) / x.square().sum((0, 2)).clamp_min(1e-30)


def absmax_per_layer_baseline(x: Tensor, bits: int) -> Tensor:
    """The seed library's scheme for comparison: one absmax scale per layer for the whole block,
    symmetric int codes; returns the dequantised fp32 tensor."""
    _check_bits(bits)
    q = 2 ** (bits - 1) - 1
    scale = (x.float().abs().amax((0, 2), keepdim=True) / q).clamp_min(1e-30)
    return torch.round(x.float() / scale).clamp_(-q, q) * scale
