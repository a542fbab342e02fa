"""One encoding for an activation block, in the Ray object store and in cache files (docs/design.md §4).

A block is `T` tokens' MLP-in and MLP-out activations of every layer, quantised (`clt_ray.quant`),
with their token ids. It is an Arrow IPC stream — one row per token, columns

    token_id  int32
    x_codes   fixed_size_binary[L · ceil(d·bits/8)]   packed codes, layer-major within the row
    x_scales  fixed_size_list<halffloat>[L]           per token-row per layer scales
    y_codes, y_scales                                  the same for the output hook

— and the schema metadata says how to read it (format version, bits, tokens, layers, d). Any Arrow reader
opens it without our code. zstd, when asked for, is Arrow's own IPC buffer compression (with a
level), so decoding needs nothing beyond pyarrow either. Per-channel pre-scales are cache-wide and
live in the manifest, not in every block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from clt_ray.quant import Quantized, dequantize, quantize

FORMAT = "clt-ray-block"
VERSION = 1


class BlockError(ValueError):
    """A block that cannot be decoded: truncated, corrupt, or not a clt-ray block."""


@dataclass(frozen=True)
class Block:
    """Decoded block: token ids [T] and activations x, y [T, L, d]."""

    token_ids: Tensor
    x: Tensor
    y: Tensor


def _codes_column(q: Quantized) -> pa.FixedSizeBinaryArray:
    codes = q.codes.contiguous().cpu().numpy()
    row_bytes = codes.shape[1] * codes.shape[2]
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(row_bytes), len(codes), [None, pa.py_buffer(codes.reshape(-1))])


def _scales_column(q: Quantized) -> pa.FixedSizeListArray:
    scales = q.scales.to(torch.float16).contiguous().cpu().numpy()
    return pa.FixedSizeListArray.from_arrays(pa.array(scales.reshape(-1)), scales.shape[1])


def encode_block(token_ids: Tensor, x: Tensor, y: Tensor, bits: int, *,
                 x_channel_scale: Tensor | None = None, y_channel_scale: Tensor | None = None,
                 zstd_level: int | None = None) -> bytes:
    """Quantise x, y [T, L, d] to `bits` and encode them with token_ids [T] as Arrow IPC bytes.
    zstd_level None: uncompressed (what stays on one node); 1-22: zstd (what crosses nodes or
    goes to disk)."""
    if x.shape != y.shape or x.dim() != 3:
        raise ValueError(f"x and y must both be [tokens, layers, d]; got {list(x.shape)} and "
                         f"{list(y.shape)}")
    if token_ids.shape != (x.shape[0],):
        raise ValueError(f"token_ids shape {list(token_ids.shape)} does not match {x.shape[0]} tokens")
    qx = quantize(x, bits, x_channel_scale)
    qy = quantize(y, bits, y_channel_scale)
    T, L, d = x.shape
    meta = {"format": FORMAT, "version": VERSION, "bits": bits, "tokens": T, "layers": L, "d": d}
    table = pa.table(
        {"token_id": pa.array(token_ids.to(torch.int32).cpu().numpy()),
         "x_codes": _codes_column(qx), "x_scales": _scales_column(qx),
         "y_codes": _codes_column(qy), "y_scales": _scales_column(qy)},
        metadata={"clt_ray": json.dumps(meta)})
    options = pa.ipc.IpcWriteOptions(
        compression=None if zstd_level is None else pa.Codec("zstd", compression_level=zstd_level))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_block_table(data: bytes | pa.Buffer) -> tuple[pa.Table, dict]:
    """The Arrow table and its clt-ray metadata; BlockError if it is not a readable block."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data) if isinstance(data, bytes) else data).read_all()
        meta = json.loads(table.schema.metadata[b"clt_ray"])
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError) as exc:
        raise BlockError(f"not a readable clt-ray block ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise BlockError(f"unsupported block format {meta.get('format')!r} version "
                         f"{meta.get('version')!r} (this clt-ray reads {FORMAT} {VERSION})")
    if table.num_rows != meta.get("tokens"):  # a stream cut between messages reads "cleanly"
        raise BlockError(f"block holds {table.num_rows} tokens, its header says {meta.get('tokens')}"
                         " (truncated?)")
    return table, meta


def _quantized(table: pa.Table, prefix: str, meta: dict, device: str | torch.device) -> Quantized:
    T, L, d, bits = table.num_rows, meta["layers"], meta["d"], meta["bits"]
    codes = table.column(f"{prefix}_codes").combine_chunks()
    row_bytes = codes.type.byte_width
    if row_bytes != L * -(-d * bits // 8):
        raise BlockError(f"{prefix}_codes rows hold {row_bytes} bytes; {L} layers × d {d} at "
                         f"{bits} bits need {L * -(-d * bits // 8)}")
    raw = np.frombuffer(codes.buffers()[1], dtype=np.uint8, count=T * row_bytes,
                        offset=codes.offset * row_bytes)
    scales = table.column(f"{prefix}_scales").combine_chunks().flatten().to_numpy(
        zero_copy_only=False)
    return Quantized(bits, torch.from_numpy(raw.reshape(T, L, -1).copy()).to(device),
                     torch.from_numpy(scales.reshape(T, L).copy()).to(device), d)


def decode_block(data: bytes | pa.Buffer, *, x_channel_scale: Tensor | None = None,
                 y_channel_scale: Tensor | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Block:
    """Bytes from `encode_block` → token ids and activations in `dtype` on `device` (unpacking and
    scaling run there, so a GPU trainer dequantises on the GPU)."""
    table, meta = read_block_table(data)
    x, y = (_quantized(table, p, meta, device) for p in ("x", "y"))
    token_ids = torch.from_numpy(table.column("token_id").to_numpy().astype(np.int64))
    return Block(token_ids.to(device), dequantize(x, x_channel_scale, dtype),
                 dequantize(y, y_channel_scale, dtype))
