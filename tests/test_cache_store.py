"""The activation cache on a filesystem: manifest, atomic files, checksums, a second fsspec
filesystem (memory://), resumable writer and reader."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from clt_ray.cache import decode_block, encode_block
from clt_ray.cache.store import CacheBlocks, CacheError, CacheWriter, Manifest, open_cache
from clt_ray.data import ShuffledSource
from clt_ray.quant import channel_scales

L, D = 3, 16


def manifest(**over) -> Manifest:
    base = {"model": "toy:gpt2", "input_hook": "hook_resid_mid", "output_hook": "hook_mlp_out",
            "layers": L, "d_model": D, "bits": 8}
    return Manifest(**{**base, **over})


def blocks(n: int = 4, tokens: int = 50):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        x = torch.randn(tokens + i, L, D, generator=g)
        y = torch.randn(tokens + i, L, D, generator=g)
        ids = torch.arange(1000 * i, 1000 * i + tokens + i)
        yield f"part-{i:06d}.arrows", ids, x, y


def write_cache(uri: str, zstd_level: int | None = None, n: int = 4) -> CacheWriter:
    writer = CacheWriter(uri, manifest(zstd_level=zstd_level))
    for name, ids, x, y in blocks(n):
        writer.write(name, encode_block(ids, x, y, 8, zstd_level=zstd_level))
    return writer


@pytest.fixture(params=["local", "memory"])
def uri(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "cache")
    return f"memory://clt-ray-test-{uuid.uuid4().hex}/cache"


def test_write_then_read_every_token_once_per_epoch(uri: str):
    write_cache(uri, zstd_level=1)
    _, _, m = open_cache(uri)
    assert [f.tokens for f in m.files] == [50, 51, 52, 53] and m.tokens == 206
    stream = CacheBlocks(uri, seed=3, epochs=2)
    got = list(stream)
    assert len(got) == 8 and sum(len(x) for x, _ in got) == 2 * 206
    expected = {len(x): x for _, _, x, _ in blocks()}
    for x, _ in got:  # int8 of N(0, 1): within half a step of the source
        assert (x - expected[len(x)]).abs().max() < 3.5 / 127 * 1.01
    first, second = [len(x) for x, _ in got[:4]], [len(x) for x, _ in got[4:]]
    assert sorted(first) == sorted(second) == [50, 51, 52, 53]


def test_local_files_are_plain_arrow_and_the_manifest_is_json(tmp_path: Path):
    uri = str(tmp_path / "cache")
    write_cache(uri)
    files = sorted(p.name for p in Path(uri).iterdir())
    assert files == ["manifest.json"] + [f"part-{i:06d}.arrows" for i in range(4)]  # no temp files
    table = pa.ipc.open_stream(pa.OSFile(f"{uri}/part-000002.arrows")).read_all()
    assert table.column("token_id").to_pylist() == list(range(2000, 2052))
    saved = json.loads(Path(uri, "manifest.json").read_text())
    assert saved["format"] == "clt-ray-cache" and saved["files"][1]["tokens"] == 51


def test_resume_reading_at_a_file_boundary_gives_the_same_batches(uri: str):
    write_cache(uri)
    a = ShuffledSource(CacheBlocks(uri, seed=1), batch_size=32, buffer_tokens=100, seed=5)
    for _ in range(3):
        next(a)
    state = a.state()
    rest = [next(a) for _ in range(6)]
    b = ShuffledSource(CacheBlocks(uri, seed=1), batch_size=32, buffer_tokens=100, seed=5)
    b.restore(json.loads(json.dumps(state)))
    for (x1, y1), (x2, y2) in zip(rest, (next(b) for _ in range(6))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_damaged_file_is_named(tmp_path: Path):
    uri = str(tmp_path / "cache")
    write_cache(uri)
    path = Path(uri, "part-000001.arrows")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"part-000001\.arrows: sha256 .* \(the file is corrupt\)"):
        list(CacheBlocks(uri, epochs=1))
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(CacheError, match=r"part-000001\.arrows: 100 bytes, the manifest says"):
        list(CacheBlocks(uri, epochs=1))


def test_writer_resumes_and_refuses_a_different_cache(uri: str):
    write_cache(uri, n=2)
    again = CacheWriter(uri, manifest())
    assert again.has("part-000001.arrows") and not again.has("part-000002.arrows")
    with pytest.raises(CacheError, match="already in the cache"):
        name, ids, x, y = next(blocks(1))
        again.write(name, encode_block(ids, x, y, 8))
    with pytest.raises(CacheError, match="bits differ"):
        CacheWriter(uri, manifest(bits=4))
    with pytest.raises(CacheError, match="bits=4 layers=3 d=16; the cache is bits=8"):
        again.write("part-000009.arrows", encode_block(ids, x, y, 4))


def test_channel_scales_travel_in_the_manifest(tmp_path: Path):
    uri = str(tmp_path / "cache")
    _, ids, x, y = next(blocks(1))
    x[:, :, 0] *= 100
    ch = channel_scales(x)
    writer = CacheWriter(uri, manifest(x_channel_scale=ch.tolist()))
    writer.write("a.arrows", encode_block(ids, x, y, 8, x_channel_scale=ch))
    got, _ = next(CacheBlocks(uri))
    assert torch.allclose(got, decode_block(encode_block(ids, x, y, 8, x_channel_scale=ch),
                                            x_channel_scale=ch).x)
    assert ((got - x).abs() <= ch / 127 * 4).all()  # ordinary channels keep their precision


def test_mismatch_and_missing_are_clear_errors(tmp_path: Path):
    with pytest.raises(CacheError, match="no activation cache here"):
        CacheBlocks(str(tmp_path / "nothing"))
    m = manifest()
    with pytest.raises(CacheError, match="layers: cache has 3, config has 12; d_model: cache has 16"):
        m.check_matches(model="toy:gpt2", input_hook="hook_resid_mid",
                        output_hook="hook_mlp_out", layers=12, d_model=768)
    m.check_matches(model="toy:gpt2", input_hook="hook_resid_mid", output_hook="hook_mlp_out",
                    layers=L, d_model=D)
    Path(tmp_path / "bad").mkdir()
    Path(tmp_path / "bad" / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(CacheError, match="not a valid clt-ray cache manifest"):
        open_cache(str(tmp_path / "bad"))
