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
