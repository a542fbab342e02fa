"""Activation quantisation: exact packing, per-scheme error bounds, robustness to outlier
dimensions and tokens (against the seed library's one-scale-per-layer scheme)."""

from __future__ import annotations

import pytest
import torch

from clt_ray.quant import (
    INT2_STEP,
    absmax_per_layer_baseline,
    channel_scales,
    dequantize,
    pack,
    quantize,
    relative_mse,
    unpack,
)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("d", [96, 97, 7, 1])
def test_pack_unpack_round_trip_is_exact(bits: int, d: int):
    g = torch.Generator().manual_seed(bits * 1000 + d)
    codes = torch.randint(0, 2 ** bits, (5, 3, d), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, -(-d * bits // 8))
    assert torch.equal(unpack(packed, bits, d), codes)


def test_packing_layout_is_low_bits_first():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00_11_10_01]


def outlier_activations(tokens: int = 512, layers: int = 3, d: int = 256, seed: int = 0):
    """Gaussian activations with a few huge dimensions and a few huge tokens, as real LMs have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, layers, d, generator=g)
    x[:, :, :3] *= 80.0  # outlier dimensions
    x[torch.randint(0, tokens, (5,), generator=g)] *= 30.0  # outlier tokens
    return x


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_int4_error_is_at_most_half_a_step(bits: int):
    x = outlier_activations()
    q = quantize(x, bits, scale_dtype=torch.float32)
    x_hat = dequantize(q)
    step = q.scales.unsqueeze(-1)
    assert ((x - x_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()
    assert torch.allclose(q.scales, x.abs().amax(-1) / (2 ** (bits - 1) - 1))


def test_int2_levels_and_error_bound():
    x = torch.randn(2000, 2, 64, generator=torch.Generator().manual_seed(1))
    q = quantize(x, 2, scale_dtype=torch.float32)
    x_hat = dequantize(q)
    step = q.scales.unsqueeze(-1)
    assert torch.allclose(q.scales, INT2_STEP * x.square().mean(-1).sqrt())
    assert set((x_hat / step).unique().round(decimals=4).tolist()) == {-1.5, -0.5, 0.5, 1.5}
    inside = x.abs() <= 2 * step
    assert ((x - x_hat).abs()[inside] <= step.expand_as(x)[inside] / 2 + 1e-6).all()
    # the Lloyd-Max optimum for Gaussian data: relative MSE ≈ 0.1188
    assert relative_mse(x, x_hat).mean().item() == pytest.approx(0.1188, abs=0.01)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_row_and_channel_scales_beat_one_scale_per_layer_on_outliers(bits: int):
    x = outlier_activations()
    ch = channel_scales(x)
    ours = relative_mse(x, dequantize(quantize(x, bits, ch), ch))
    baseline = relative_mse(x, absmax_per_layer_baseline(x, bits))
    # relative MSE on the ordinary dimensions, which the coarse scale wipes out
    ordinary = (slice(None), slice(None), slice(3, None))
    ours_ord = relative_mse(x[ordinary], dequantize(quantize(x, bits, ch), ch)[ordinary])
    base_ord = relative_mse(x[ordinary], absmax_per_layer_baseline(x, bits)[ordinary])
    assert (ours_ord * 10 <= base_ord).all(), (ours_ord, base_ord)
    assert (ours <= baseline).all(), (ours, baseline)


def test_dequantize_into_the_training_dtype_and_fp16_scales():
    x = outlier_activations(tokens=64)
    q = quantize(x, 8)
    assert q.scales.dtype == torch.float16 and q.codes.shape == (64, 3, 256)
    assert q.nbytes == 64 * 3 * 256 + 64 * 3 * 2
    bf = dequantize(q, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    assert relative_mse(x, bf).max() < 1e-3
    zeros = quantize(torch.zeros(4, 2, 8), 4)  # an all-zero row must not divide by zero
    assert torch.equal(dequantize(zeros), torch.zeros(4, 2, 8))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="supported: 8, 4, 2"):
        quantize(torch.zeros(2, 2, 4), 3)
    with pytest.raises(ValueError, match=r"\[tokens, layers, d\]"):
        quantize(torch.zeros(2, 4), 8)
    with pytest.raises(ValueError, match="does not match"):
        quantize(torch.zeros(2, 2, 4), 8, channel_scale=torch.ones(2, 5))
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(4, dtype=torch.int64), 4)
