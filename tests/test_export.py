"""clt_ray.export: circuit-tracer's own loader reads our folder and computes what we compute."""

from __future__ import annotations

import os

import pytest
import torch
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

import clt_ray.export as export_mod
from clt_ray.config import CLTConfig
from clt_ray.export import ExportError, export_clt, read_export_config
from clt_ray.nn.clt import CrossLayerTranscoder

L, D, F = 3, 8, 24
N = 64


def make(activation: str = "jumprelu", k: int | None = None) -> CrossLayerTranscoder:
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=F, activation=activation, k=k, seed=1)
    clt = CrossLayerTranscoder(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.3)
        clt.b_dec.normal_()
        for w in clt.W_dec:
            w.normal_()
        clt.W_enc.normal_(0, 0.3)
        if activation == "jumprelu":
            clt.log_threshold.uniform_(-3, -0.5)
        clt.s_in.copy_(torch.tensor([0.5, 2.0, 3.0]))  # folding must be exercised
        clt.s_out.copy_(torch.tensor([4.0, 0.25, 1.5]))
    return clt


def raw_inputs(seed: int = 1) -> torch.Tensor:
    """Raw-space activations [N, L, d] at the scale the CLT expects (s_in · x ~ unit size)."""
    x = torch.randn(N, L, D, generator=torch.Generator().manual_seed(seed))
    return x * torch.tensor([2.0, 0.5, 0.3])[:, None]


def ours(clt: CrossLayerTranscoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations [L, N, F], raw reconstruction [L, N, d]) in circuit-tracer's layout."""
    with torch.no_grad():
        xn, _ = clt.normalize(x)
        _, acts = clt.encode(xn)
        recon = clt.decode(acts) / clt.s_out[:, None]
    return acts.transpose(0, 1), recon.transpose(0, 1)


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
@pytest.mark.parametrize("lazy", [True, False])
def test_circuit_tracer_loads_our_export_and_agrees(tmp_path, activation, lazy):
    clt = make(activation)
    out = export_clt(clt, tmp_path / "clt", "/models/some-model", "hook_resid_mid")
    ct = load_clt(str(out), dtype=torch.float32, device=torch.device("cpu"),
                  lazy_decoder=lazy, lazy_encoder=lazy)
    assert (ct.n_layers, ct.d_model, ct.d_transcoder) == (L, D, F)
    assert isinstance(ct.activation_function, JumpReLU) == (activation == "jumprelu")
    x = raw_inputs()
    acts, recon = ours(clt, x)
    assert 0 < (acts > 0).float().mean() < 0.9  # a real mix of active and inactive features
    with torch.no_grad():
        ct_acts = ct.encode(x.transpose(0, 1))
        torch.testing.assert_close(ct_acts, acts, rtol=1e-5, atol=1e-5)
        ct_recon = ct.decode(ct_acts.to_sparse())
        torch.testing.assert_close(ct_recon, recon, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ct(x.transpose(0, 1)), recon, rtol=1e-5, atol=1e-5)
        for l in range(L):  # the per-layer path attribution uses
            torch.testing.assert_close(ct.encode_layer(x[:, l], l), acts[l], rtol=1e-5, atol=1e-5)


def test_config_yaml_fields(tmp_path):
    out = export_clt(make("relu"), tmp_path / "my-clt", "gpt2", "mlp.hook_in")
    cfg = read_export_config(out)
    assert cfg["model_kind"] == "cross_layer_transcoder"
    assert cfg["feature_input_hook"] == "mlp.hook_in"
    assert cfg["feature_output_hook"] == "mlp.hook_out"
    assert cfg["model_name"] == "gpt2"
    assert cfg["scan"] == "./data/features/my-clt"  # offline dashboards (docs/design.md §5)
    assert cfg["clt_ray"]["activation"] == "relu" and cfg["clt_ray"]["n_features"] == F
    names = sorted(os.listdir(out))
    assert names == sorted(["config.yaml"] + [f"W_{p}_{l}.safetensors" for p in ("enc", "dec")
                                                for l in range(L)])
    out = export_clt(make(), tmp_path / "x", "gpt2", "hook_resid_mid", scan="my/scan@v1")
    assert read_export_config(out)["scan"] == "my/scan@v1"
    assert read_export_config(out)["feature_output_hook"] == "hook_mlp_out"
    with pytest.raises(ExportError, match="pair"):
        export_clt(make(), tmp_path / "y", "gpt2", "hook_resid_mid", "mlp.hook_out")


def test_topk_is_refused_without_calibration_and_converted_with_it(tmp_path):
    clt = make("batchtopk", k=4)
    with pytest.raises(ExportError, match="JumpReLU"):
        export_clt(clt, tmp_path / "a", "gpt2")
    assert not (tmp_path / "a").exists()
    x = raw_inputs(2)
    out = export_clt(clt, tmp_path / "a", "gpt2", calibration=x)
    assert clt.cfg.activation == "batchtopk"  # the caller's CLT is untouched
    cfg = read_export_config(out)
    assert cfg["clt_ray"]["activation"] == "jumprelu"
    assert cfg["clt_ray"]["converted_from"] == {"activation": "batchtopk", "k": 4}
    ct = load_clt(str(out), dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        acts = ct.encode(x.transpose(0, 1))
    # θ_l calibrated on x: BatchTopK's L0 (k per token per layer) is kept on that data
    assert (acts > 0).sum(dim=(1, 2)).tolist() == [4 * N] * L


def test_failed_export_leaves_no_partial_folder(tmp_path, monkeypatch):
    clt = make()
    calls = []
    real_save = export_mod.save_file

    def failing_save(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(export_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_clt(clt, tmp_path / "out", "gpt2")
    assert os.listdir(tmp_path) == []  # neither the folder nor a temporary one

    monkeypatch.setattr(export_mod, "save_file", real_save)
    export_clt(clt, tmp_path / "out", "gpt2")
    before = {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")}
    calls.clear()
    monkeypatch.setattr(export_mod, "save_file", failing_save)
    with pytest.raises(OSError):
        export_clt(make("relu"), tmp_path / "out", "gpt2", force=True)
    assert os.listdir(tmp_path) == ["out"]  # the earlier export is untouched
    assert {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")} == before


def test_shard_is_refused(tmp_path):
    with pytest.raises(ExportError, match="whole CLT"):
        export_clt(make().shard(0, 12), tmp_path / "s", "gpt2")


@pytest.mark.parametrize("activation,k", [("jumprelu", None), ("batchtopk", 3)])
def test_export_command_on_a_checkpoint(tmp_path, activation, k):
    from click.testing import CliRunner
    from test_metrics import make_run  # tiny model + corpus + checkpoint

    from clt_ray.cli import cli

    path, cfg, clt = make_run(tmp_path, activation, k)
    out = tmp_path / "exported"
    res = CliRunner().invoke(cli, ["export", str(path), str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    conf = read_export_config(out)
    assert conf["model_name"] == str((tmp_path / "model").resolve())
    assert conf["clt_ray"]["activation"] == "jumprelu" and conf["clt_ray"]["step"] == 7
    ct = load_clt(str(out), dtype=torch.float32, device=torch.device("cpu"))
    x = torch.randn(20, clt.cfg.n_layers, clt.cfg.d_model)
    with torch.no_grad():
        ct_acts = ct.encode(x.transpose(0, 1))
    if activation == "jumprelu":
        torch.testing.assert_close(ct_acts, ours(clt, x)[0], rtol=1e-5, atol=1e-5)
    else:  # θ set on the run's held-out inputs: there BatchTopK's k per token and layer is kept
        heldout = export_mod._heldout_inputs(cfg, None)
        with torch.no_grad():
            acts = ct.encode(heldout.transpose(0, 1))
        assert (acts > 0).sum(dim=(1, 2)).tolist() == [k * len(heldout)] * clt.cfg.n_layers


# --- the destination: never delete what is not an export -------------------------------------------


def tree(root) -> dict[str, bytes]:
    """Every file under root with its bytes (to show nothing changed)."""
    from pathlib import Path

    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


def test_export_replaces_only_a_previous_export_and_only_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for force in (False, True):  # a folder of other files is never replaced
        with pytest.raises(ExportError, match="not empty.*notes.txt.*not a previous"):
            export_clt(make(), out, "gpt2", force=force)
    assert tree(out) == {"notes.txt": b"mine"} and os.listdir(tmp_path) == ["out"]

    (out / "notes.txt").unlink()  # an empty folder is filled
    export_clt(make(), out, "gpt2")
    first = tree(out)
    with pytest.raises(ExportError, match="already holds a clt-ray export.*--force"):
        export_clt(make("relu"), out, "gpt2")
    assert tree(out) == first
    export_clt(make("relu"), out, "gpt2", force=True)  # a previous export is replaced
    assert read_export_config(out)["clt_ray"]["activation"] == "relu"

    (out / "features").mkdir()  # an export holding anything else is not replaced
    (out / "features" / "0.json").write_text("{}")
    with pytest.raises(ExportError, match="not a previous clt-ray export"):
        export_clt(make(), out, "gpt2", force=True)
    assert (out / "features" / "0.json").read_text() == "{}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_clt(make(), tmp_path / "file", "gpt2")
    assert sorted(os.listdir(tmp_path)) == ["file", "out"]  # no temporary folders left


def test_export_never_writes_over_or_into_the_checkpoint_it_exports(tmp_path, monkeypatch,
                                                                    capsys):
    from test_metrics import make_run, run_main  # tiny model + corpus + checkpoint

    from clt_ray.export import export_checkpoint
    from clt_ray.train.checkpoint import load_checkpoint

    path, _, _ = make_run(tmp_path)
    run = tmp_path / "run"
    before = tree(run)
    for dest in (run, run / "checkpoints", path, path / "clt"):
        with pytest.raises(ExportError, match="checkpoint"):
            export_checkpoint(run, dest, force=True)
    code, out, err = run_main(monkeypatch, capsys, "export", str(run), str(run))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"Error: {run} holds the checkpoint")
    assert tree(run) == before and load_checkpoint(run).state.step == 7
    # a folder inside the run but outside its checkpoints is a fine place (the demo's graphs/clt)
    exported = export_checkpoint(run, run / "graphs" / "clt")
    assert read_export_config(exported)["clt_ray"]["step"] == 7


def test_export_into_the_current_folder_is_refused_leaving_nothing(tmp_path, monkeypatch, capsys):
    from test_metrics import make_run, run_main

    make_run(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for dest in (".", str(work), ".."):  # ".." is refused too (it also holds the checkpoint)
        code, _, err = run_main(monkeypatch, capsys, "export", str(tmp_path / "run"), dest)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "current folder" in err or dest == ".."
    assert os.listdir(work) == [] and sorted(os.listdir(tmp_path)) == sorted(
        ["work", "run", "model", "corpus.jsonl"])


def test_export_of_a_run_with_a_damaged_latest_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    from test_metrics import make_run, run_main

    from clt_ray.train.checkpoint import load_checkpoint, save_checkpoint

    path, cfg, clt = make_run(tmp_path)
    loaded = load_checkpoint(path)
    loaded.state.step = 9
    newer = save_checkpoint(path.parent / "step_000000009", clt, state=loaded.state, config=cfg)
    blob = newer / "W_dec_1.safetensors"
    blob.write_bytes(blob.read_bytes()[:100])
    code, out, err = run_main(monkeypatch, capsys, "export", str(tmp_path / "run"),
                              str(tmp_path / "out"))
    assert code == 0 and "exported" in out, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and "step_000000009" in warnings[0] and "W_dec_1" in warnings[0]
    assert str(path) in warnings[1]
    assert read_export_config(tmp_path / "out")["clt_ray"]["step"] == 7
    code, _, err = run_main(monkeypatch, capsys, "export", str(newer), str(tmp_path / "out2"))
    assert code == 2 and "W_dec_1.safetensors" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()


def test_export_device_is_checked_first(tmp_path, monkeypatch, capsys):
    from test_metrics import make_run, run_main

    make_run(tmp_path, "batchtopk", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, says in (("banana", "device 'banana' is not a torch device"),
                         ("cuda", "device cuda asked for but torch sees no CUDA device")):
        code, _, err = run_main(monkeypatch, capsys, "export", str(tmp_path / "run"),
                                str(tmp_path / "out"), "--device", device)
        assert code == 2 and err.strip() == f"Error: {says}"
    assert not (tmp_path / "out").exists()
