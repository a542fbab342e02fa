"""Checkpoints: circuit-tracer's per-layer layout, exact round trip of weights, Adam moments,
counters and RNG, any feature range reloads, writes are atomic, run folders resolve to their
latest checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from clt_ray.config import CLTConfig, OptimConfig, parse_config
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.nn.step import make_optimizer
from clt_ray.train import checkpoint as ckpt_mod
from clt_ray.train.checkpoint import (
    CheckpointError,
    TrainingState,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)

L, D, F = 3, 8, 10

pytestmark = pytest.mark.usefixtures("one_thread")



def trained(activation="jumprelu", k=None):
    """A CLT with non-trivial weights, scales, Adam moments, counters and RNG state."""
    torch.manual_seed(0)
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=F, activation=activation, k=k)
    model = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        model.s_in.copy_(torch.rand(L) + 0.5)
        model.s_out.copy_(torch.rand(L) + 0.5)
        model.b_dec.normal_()
    opt = make_optimizer(model, OptimConfig())
    for _ in range(2):
        x = torch.randn(16, L, D)
        out = model(model.normalize(x)[0])
        (out.recon.square().sum() + out.pre.square().sum()).backward()
        opt.step()
        opt.zero_grad()
    state = TrainingState(step=2, total_steps=10, tokens=32, data={"chunk": 1, "offset": 3},
                          tokens_since_fired=torch.randint(0, 99, (L, F)),
                          rng={"torch": torch.get_rng_state()}, extra={"note": "x"})
    return model, opt, state


def moments(model, opt):
    return {n: {m: opt.state[p][m] for m in ("exp_avg", "exp_avg_sq")}
            for n, p in model.named_parameters()}


def test_layout_is_circuit_tracers_per_layer_files(tmp_path: Path):
    model, opt, state = trained()
    path = save_checkpoint(tmp_path / "c", model, opt, state, parse_config({}))
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert all(f.endswith((".safetensors", ".json")) for f in files)  # nothing pickled
    with safe_open(str(path / "W_enc_1.safetensors"), "pt") as f:
        assert set(f.keys()) == {"W_enc_1", "b_enc_1", "b_dec_1", "log_threshold_1"}
        assert torch.equal(f.get_tensor("W_enc_1"), model.W_enc[1].detach())
    with safe_open(str(path / "W_dec_1.safetensors"), "pt") as f:
        assert list(f.keys()) == ["W_dec_1"] and f.get_tensor("W_dec_1").shape == (F, L - 1, D)
    with safe_open(str(path / "optimizer" / "W_dec_0.safetensors"), "pt") as f:
        assert set(f.keys()) == {"W_dec_0.exp_avg", "W_dec_0.exp_avg_sq"}
    with safe_open(str(path / "state.safetensors"), "pt") as f:
        assert f.get_tensor("rng.torch").dtype == torch.uint8
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "clt-ray-checkpoint" and manifest["version"] == 1
    assert manifest["step"] == 2 and manifest["shapes"]["W_dec_2"] == [F, 1, D]
    assert manifest["data"] == {"chunk": 1, "offset": 3}


def test_round_trip_is_exact(tmp_path: Path):
    model, opt, state = trained()
    save_checkpoint(tmp_path / "c", model, opt, state, parse_config({"clt": {"n_features": F}}))
    loaded = load_checkpoint(tmp_path / "c", optimizer=True)
    for name, p in model.named_parameters():
        assert torch.equal(loaded.model.get_parameter(name), p), name
    assert torch.equal(loaded.model.s_in, model.s_in) and torch.equal(loaded.model.s_out,
                                                                      model.s_out)
    st = loaded.state
    assert (st.step, st.total_steps, st.tokens, st.data) == (2, 10, 32, state.data)
    assert torch.equal(st.tokens_since_fired, state.tokens_since_fired)
    assert torch.equal(st.rng["torch"], state.rng["torch"]) and st.extra["note"] == "x"
    assert st.adam_step == 2.0
    for name, mom in moments(model, opt).items():
        for m, t in mom.items():
            assert torch.equal(st.moments[name][m], t), (name, m)
    assert loaded.config.clt.n_features == F and loaded.path == tmp_path / "c"
    _, state2, _ = load_checkpoint(tmp_path / "c")  # unpacks; no moments by default
    assert state2.moments is None


def test_any_feature_range_reloads_and_halves_make_the_whole(tmp_path: Path):
    model, opt, state = trained()
    save_checkpoint(tmp_path / "c", model, opt, state)
    whole = load_checkpoint(tmp_path / "c", optimizer=True)
    lo = load_checkpoint(tmp_path / "c", 0, F // 2, optimizer=True)
    hi = load_checkpoint(tmp_path / "c", F // 2, F, optimizer=True)
    assert (lo.model.start, lo.model.stop, hi.model.start, hi.model.stop) == (0, 5, 5, 10)
    for name, p in whole.model.named_parameters():
        a, b = lo.model.get_parameter(name), hi.model.get_parameter(name)
        if name == "b_dec":
            assert torch.equal(a, p) and torch.equal(b, p)
        else:
            dim = 0 if name.startswith("W_dec") else 1
            assert torch.equal(torch.cat([a, b], dim), p), name
        for m in ("exp_avg", "exp_avg_sq"):
            ma, mb = lo.state.moments[name][m], hi.state.moments[name][m]
            mw = whole.state.moments[name][m]
            joined = ma if name == "b_dec" else torch.cat([ma, mb], 0 if name.startswith("W_dec")
                                                          else 1)
            assert torch.equal(joined, mw), (name, m)
    assert torch.equal(torch.cat([lo.state.tokens_since_fired, hi.state.tokens_since_fired], 1),
                       whole.state.tokens_since_fired)
    x = torch.randn(7, L, D)  # the halves' partial reconstructions sum to the whole's
    xn = whole.model.normalize(x)[0]
    parts = sum(m.decode(m.encode(xn)[1], bias=False) for m in (lo.model, hi.model))
    torch.testing.assert_close(parts + whole.model.b_dec, whole.model(xn).recon)
    middle = load_checkpoint(tmp_path / "c", 3, 7)
    assert torch.equal(middle.model.W_dec[1], model.W_dec[1][3:7].detach())
    with pytest.raises(ValueError, match="not inside"):
        load_checkpoint(tmp_path / "c", 4, 11)


def test_topk_checkpoint_has_no_threshold(tmp_path: Path):
    model, opt, state = trained("batchtopk", k=2)
    save_checkpoint(tmp_path / "c", model, opt, state)
    loaded = load_checkpoint(tmp_path / "c", 2, 6, optimizer=True)
    assert loaded.model.cfg.activation == "batchtopk" and loaded.model.threshold is None
    assert torch.equal(loaded.model.W_enc, model.W_enc[:, 2:6].detach())


def test_failed_write_leaves_no_partial_checkpoint(tmp_path: Path, monkeypatch):
    model, opt, state = trained()
    run = tmp_path / "run"
    good = save_checkpoint(checkpoint_path(run, 2), model, opt, state)
    real, calls = ckpt_mod.save_file, []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(ckpt_mod, "save_file", failing)
    state.step = 3
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(checkpoint_path(run, 3), model, opt, state)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [good.name]  # no temp dir
    assert resolve_checkpoint(run) == good
    with pytest.raises(OSError, match="disk full"):  # overwriting in place keeps the old one too
        calls.clear()
        save_checkpoint(good, model, opt, state)
    assert load_checkpoint(run).state.step == 2


def test_resolve_list_prune(tmp_path: Path):
    model, opt, state = trained()
    run = tmp_path / "run"
    for step in (5, 40, 7):
        state.step = step
        save_checkpoint(checkpoint_path(run, step), model, opt, state)
    (run / "checkpoints" / "step_000000099").mkdir()  # incomplete: no manifest
    assert [p.name for p in list_checkpoints(run)] == [
        "step_000000005", "step_000000007", "step_000000040"]
    assert resolve_checkpoint(run).name == "step_000000040"
    assert load_checkpoint(run).state.step == 40
    prune_checkpoints(run, keep=2)
    assert [p.name for p in list_checkpoints(run)] == ["step_000000007", "step_000000040"]
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither"):
        resolve_checkpoint(tmp_path)


def test_unknown_format_version_is_refused(tmp_path: Path):
    model, opt, state = trained()
    path = save_checkpoint(tmp_path / "c", model, opt, state)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(path)


def test_shards_written_apart_read_like_one_checkpoint(tmp_path: Path):
    """Each shard writes its slice (save_checkpoint_shard) into its own folder, as Ray shard
    workers do before Ray Train merges them: any feature range then loads exactly as from the
    whole checkpoint, spanning shard folders; a missing shard makes the checkpoint incomplete."""
    from clt_ray.nn.clt import feature_dim
    from clt_ray.train.checkpoint import is_complete, load_adam_moments, save_checkpoint_shard

    model, opt, state = trained()
    save_checkpoint(tmp_path / "whole", model, opt, state)
    ranges = [(0, 4), (4, 10)]
    merged = tmp_path / "merged"
    for start, stop in ranges:  # each shard on its own, with its own optimizer and counters
        part = model.shard(start, stop)
        part_opt = make_optimizer(part, OptimConfig())
        whole_moments = moments(model, opt)
        load_adam_moments(part_opt, part, float(opt.state[model.b_dec]["step"]), {
            n: {m: t if feature_dim(n) is None else t.narrow(feature_dim(n), start, stop - start)
                for m, t in mo.items()} for n, mo in whole_moments.items()})
        part_state = TrainingState(**{**state.__dict__, "tokens_since_fired":
                                      state.tokens_since_fired[:, start:stop]})
        save_checkpoint_shard(merged, part, part_opt, part_state, None, ranges)
    assert sorted(p.name for p in merged.iterdir()) == ["manifest.json", "shard_000", "shard_001"]
    assert is_complete(merged)
    for start, stop in ((0, 10), (2, 7), (4, 10), (5, 6)):
        a = load_checkpoint(tmp_path / "whole", start, stop, optimizer=True)
        b = load_checkpoint(merged, start, stop, optimizer=True)
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            assert torch.equal(p, q), (name, start, stop)
            for m in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(a.state.moments[name][m], b.state.moments[name][m])
        assert torch.equal(a.state.tokens_since_fired, b.state.tokens_since_fired)
        assert a.state.data == b.state.data and a.state.step == b.state.step
        assert torch.equal(a.state.rng["torch"], b.state.rng["torch"])
    (merged / "shard_001" / "W_dec_0.safetensors").unlink()
    assert not is_complete(merged)


# --- damaged checkpoints -------------------------------------------------------------------------


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {  # what is done to the checkpoint, the file the error names, what it says
    "truncated": (lambda c: truncate(c / "W_dec_1.safetensors"), "W_dec_1.safetensors", "bytes"),
    "deleted": (lambda c: (c / "W_enc_2.safetensors").unlink(), "W_enc_2.safetensors", "missing"),
    "half-written manifest": (lambda c: truncate(c / "manifest.json"), "manifest.json",
                              "unreadable"),
    "flipped byte": (lambda c: flip_byte(c / "W_dec_1.safetensors"), "W_dec_1.safetensors",
                     "sha256"),
    "flipped optimizer byte": (lambda c: flip_byte(c / "optimizer" / "W_enc_0.safetensors"),
                               "optimizer/W_enc_0.safetensors", "sha256"),
}


def run_with_two(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run folder with checkpoints at steps 2 and 3."""
    model, opt, state = trained()
    run = tmp_path / "run"
    older = save_checkpoint(checkpoint_path(run, 2), model, opt, state)
    state.step = 3
    newer = save_checkpoint(checkpoint_path(run, 3), model, opt, state)
    return run, older, newer


def test_manifest_records_size_and_sha256_of_every_file(tmp_path: Path):
    import hashlib

    model, opt, state = trained()
    path = save_checkpoint(tmp_path / "c", model, opt, state)
    manifest = json.loads((path / "manifest.json").read_text())
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*.safetensors"))
    assert sorted(manifest["sha256"]) == sorted(manifest["sizes"]) == files
    for name in files:
        data = (path / name).read_bytes()
        assert manifest["sizes"][name] == len(data)
        assert manifest["sha256"][name] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_is_skipped_saying_why_and_a_named_one_is_an_error(tmp_path, damage):
    from clt_ray.train.checkpoint import DamagedCheckpoint, latest_checkpoint

    run, older, newer = run_with_two(tmp_path)
    do, file, what = DAMAGES[damage]
    do(newer)
    lines: list[str] = []
    loaded = load_checkpoint(run, optimizer=True, log=lines.append)
    assert loaded.state.step == 2 and loaded.path == older
    assert len(lines) == 2, lines  # one line per skipped checkpoint, then the one used
    assert newer.name in lines[0] and file in lines[0] and what in lines[0]
    assert str(older) in lines[1]
    with pytest.raises(DamagedCheckpoint, match=f"{file}.*{what}"):
        load_checkpoint(newer, optimizer=True)
    # the cheap listing sees what sizes show; a resume (verify=True) sees flipped bytes too
    found, skipped = latest_checkpoint(run, verify=True)
    assert found == older and len(skipped) == 1 and file in skipped[0]
    if what != "sha256":
        assert resolve_checkpoint(run, log=lines.append) == older
        assert list_checkpoints(run) == [older]


def test_damage_is_said_through_logging_by_default(tmp_path: Path, caplog):
    run, older, newer = run_with_two(tmp_path)
    truncate(newer / "W_dec_1.safetensors")
    with caplog.at_level("WARNING"):
        assert load_checkpoint(run).path == older
    assert any(newer.name in r.getMessage() and "W_dec_1" in r.getMessage()
               for r in caplog.records)


def test_a_run_of_only_damaged_checkpoints_is_an_error_naming_the_damage(tmp_path: Path):
    run, older, newer = run_with_two(tmp_path)
    truncate(newer / "W_dec_1.safetensors")
    (older / "W_enc_0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint.*W_dec_1"):
        load_checkpoint(run, log=lambda m: None)


def test_checkpoints_without_recorded_sha256_still_load(tmp_path: Path):
    """Checkpoints written before sha256 was recorded: loaded with the size check alone."""
    from clt_ray.train.checkpoint import DamagedCheckpoint

    model, opt, state = trained()
    path = save_checkpoint(tmp_path / "c", model, opt, state)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_checkpoint(path, optimizer=True)
    assert torch.equal(loaded.model.W_enc, model.W_enc.detach())
    truncate(path / "W_dec_0.safetensors")
    with pytest.raises(DamagedCheckpoint, match="W_dec_0.safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize("edit", ["clt", "shapes"])
def test_manifest_shapes_disagreeing_with_the_files_are_an_error(tmp_path: Path, edit):
    """An edited n_features would make the loader read the first rows only: a different CLT."""
    from clt_ray.train.checkpoint import DamagedCheckpoint

    model, opt, state = trained()
    path = save_checkpoint(tmp_path / "c", model, opt, state)
    manifest = json.loads((path / "manifest.json").read_text())
    if edit == "clt":
        manifest["clt"]["n_features"] = F // 2
    else:
        manifest["shapes"]["W_dec_1"] = [F // 2, L - 1, D]
    (path / "manifest.json").write_text(json.dumps(manifest))
    file = "W_enc_0.safetensors" if edit == "clt" else "W_dec_1.safetensors"
    key = "W_enc_0" if edit == "clt" else "W_dec_1"
    shape, want = ([F, D], [F // 2, D]) if edit == "clt" else ([F, L - 1, D], [F // 2, L - 1, D])
    with pytest.raises(DamagedCheckpoint) as err:
        load_checkpoint(path)
    assert f"{file}: tensor {key} has shape {shape}" in str(err.value)
    assert str(want) in str(err.value)


def save_sharded(tmp_path: Path, ranges=((0, 4), (4, 10))) -> Path:
    from clt_ray.nn.clt import feature_dim
    from clt_ray.train.checkpoint import load_adam_moments, save_checkpoint_shard

    model, opt, state = trained()
    merged = tmp_path / "merged"
    for start, stop in ranges:
        part = model.shard(start, stop)
        part_opt = make_optimizer(part, OptimConfig())
        load_adam_moments(part_opt, part, float(opt.state[model.b_dec]["step"]), {
            n: {m: t if feature_dim(n) is None else t.narrow(feature_dim(n), start, stop - start)
                for m, t in mo.items()} for n, mo in moments(model, opt).items()})
        part_state = TrainingState(**{**state.__dict__, "tokens_since_fired":
                                      state.tokens_since_fired[:, start:stop]})
        save_checkpoint_shard(merged, part, part_opt, part_state, None, list(ranges))
    return merged


def test_shards_record_sha256_and_damage_in_a_shard_is_named(tmp_path: Path):
    import hashlib

    from clt_ray.train.checkpoint import DamagedCheckpoint, is_complete

    merged = save_sharded(tmp_path)
    for shard in ("shard_000", "shard_001"):
        hashes = json.loads((merged / shard / "sha256.json").read_text())
        sizes = json.loads((merged / shard / "sizes.json").read_text())
        assert sorted(hashes) == sorted(sizes)
        assert all(hashlib.sha256((merged / shard / n).read_bytes()).hexdigest() == h
                   for n, h in hashes.items())
    flip_byte(merged / "shard_001" / "W_dec_0.safetensors")
    assert is_complete(merged)  # sizes agree: only a load, which hashes, can tell
    assert load_checkpoint(merged, 0, 4).model.n_local == 4  # shard 1's rows are not read
    with pytest.raises(DamagedCheckpoint, match="shard_001/W_dec_0.safetensors.*sha256"):
        load_checkpoint(merged, 2, 7)


def test_sharded_manifest_with_an_edited_n_features_is_an_error(tmp_path: Path):
    from clt_ray.train.checkpoint import DamagedCheckpoint

    merged = save_sharded(tmp_path)
    manifest = json.loads((merged / "manifest.json").read_text())
    manifest["clt"]["n_features"] = 4  # only shard 0's rows would be read
    (merged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match="do not tile the 4 features"):
        load_checkpoint(merged)
    manifest["clt"]["n_features"], manifest["shards"] = 4, [[0, 2], [2, 4]]  # ranges edited too
    (merged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match=r"shard_000/W_enc_0.safetensors: tensor W_enc_0 "
                                                r"has shape \[4, 8\].*\[0, 2\)"):
        load_checkpoint(merged)
