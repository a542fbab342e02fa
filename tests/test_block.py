"""The block encoding: round trips through quantisation, Arrow readability without our code,
zstd as Arrow's own compression, and named errors for damaged bytes."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from clt_ray.cache import BlockError, decode_block, encode_block, read_block_table
from clt_ray.quant import channel_scales, dequantize, quantize


def activations(T: int = 300, L: int = 4, d: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, L, d, generator=g)
    x[:, :, 0] *= 50.0
    y = torch.randn(T, L, d, generator=g) * 3
    ids = torch.randint(4, 300, (T,), generator=g)
    return ids, x, y


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("zstd_level", [None, 3])
def test_round_trip_equals_quantise_dequantise(bits: int, zstd_level: int | None):
    ids, x, y = activations()
    ch = channel_scales(x)
    data = encode_block(ids, x, y, bits, x_channel_scale=ch, zstd_level=zstd_level)
    block = decode_block(data, x_channel_scale=ch)
    assert torch.equal(block.token_ids, ids)
    assert torch.equal(block.x, dequantize(quantize(x, bits, ch), ch))
    assert torch.equal(block.y, dequantize(quantize(y, bits)))
    half = decode_block(data, x_channel_scale=ch, dtype=torch.bfloat16)
    assert half.x.dtype == torch.bfloat16 and torch.equal(half.token_ids, ids)


def test_plain_pyarrow_reads_it_and_sizes_add_up():
    ids, x, y = activations(T=256)
    data = encode_block(ids, x, y, 4)
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()  # no clt-ray code involved
    assert table.column_names == ["token_id", "x_codes", "x_scales", "y_codes", "y_scales"]
    assert table.num_rows == 256 and table.column("token_id").to_pylist() == ids.tolist()
    assert table.schema.field("x_codes").type == pa.binary(4 * 96 // 2)
    assert json.loads(table.schema.metadata[b"clt_ray"]) == {
        "format": "clt-ray-block", "version": 1, "bits": 4, "tokens": 256, "layers": 4, "d": 96}
    payload = 256 * (4 + 2 * 4 * (48 + 2))  # ids + (codes + fp16 scales) for x and y
    assert payload <= len(data) < payload + 2048  # Arrow framing is small


def test_zstd_shrinks_what_is_compressible_and_level_is_used():
    ids, x, y = activations(T=512)
    x[:, 2:] = 0  # layers with nothing in them compress well
    plain = encode_block(ids, x, y, 8)
    fast, best = (encode_block(ids, x, y, 8, zstd_level=lv) for lv in (1, 19))
    assert len(best) <= len(fast) < 0.9 * len(plain)
    assert torch.equal(decode_block(fast).x, decode_block(plain).x)


def test_damaged_bytes_are_named_errors():
    ids, x, y = activations(T=64)
    data = encode_block(ids, x, y, 8, zstd_level=1)
    with pytest.raises(BlockError, match="not a readable clt-ray block"):
        decode_block(data[: len(data) // 2])  # truncated
    with pytest.raises(BlockError, match="not a readable clt-ray block"):
        decode_block(b"not arrow at all")
    header_only = pa.BufferOutputStream()  # a stream cut right after its schema message
    schema = read_block_table(data)[0].schema
    with pa.ipc.new_stream(header_only, schema):
        pass
    with pytest.raises(BlockError, match="holds 0 tokens, its header says 64"):
        decode_block(header_only.getvalue().to_pybytes())
    other = pa.table({"a": [1, 2]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, other.schema) as w:
        w.write_table(other)
    with pytest.raises(BlockError, match="not a readable clt-ray block"):
        read_block_table(sink.getvalue().to_pybytes())  # Arrow, but no clt-ray metadata


def test_bad_input_is_named():
    ids, x, y = activations(T=8)
    with pytest.raises(ValueError, match="does not match 8 tokens"):
        encode_block(ids[:5], x, y, 8)
    with pytest.raises(ValueError, match=r"\[tokens, layers, d\]"):
        encode_block(ids, x, y[:, :2], 8)
    with pytest.raises(ValueError, match="supported: 8, 4, 2"):
        encode_block(ids, x, y, 16)
