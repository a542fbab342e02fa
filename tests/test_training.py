"""The training loop: it learns, resumes exactly (weights, Adam, counters, data position, RNG),
stops cleanly on Ctrl-C, and bad configs fail with one clear error before any work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clt_ray.config import load_config, parse_config, toy_config
from clt_ray.data import TensorSource, heldout_windows, lm_source, split_batches, window_activations
from clt_ray.errors import ConfigError
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.train import loop as training
from clt_ray.train.checkpoint import list_checkpoints, load_checkpoint
from clt_ray.train.loop import Trainer
from clt_ray.train.run import check_config, train_from_config

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "clt-ray"

pytestmark = pytest.mark.usefixtures("one_thread")



def small_config(**sections):
    base = {
        "clt": {"n_features": 48, "init_threshold": 0.05, "bandwidth": 0.5,
                "init_firing_rate": 0.05},
        "loss": {"sparsity": {"final": 0.3, "ramp_frac": 0.5}, "tanh_c": 1.0},
        "optim": {"lr": {"lr": 3e-3, "warmup_frac": 0.05}},
        "train": {"steps": 12, "batch_size": 64, "init_tokens": 256, "dead_after_tokens": 512,
                  "log_every": 3, "eval_every": 4, "checkpoint_every": 6, "progress": False},
        "data": {"context_size": 17, "lm_batch_size": 4, "shuffle_buffer": 200,
                 "heldout_tokens": 64},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return parse_config(base)


# --- learning ----------------------------------------------------------------------------------


def sparse_data(n=4096, L=2, d=12, n_true=24, seed=0):
    """x_l from a sparse code over a random dictionary; y_k depends on the codes of layers ≤ k."""
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(n, L, n_true, generator=g) < 0.08) * torch.rand(n, L, n_true, generator=g)
    enc_dict = torch.randn(L, n_true, d, generator=g)
    dec_dict = torch.randn(L, n_true, d, generator=g)
    x = torch.einsum("nlf,lfd->nld", codes, enc_dict)
    y = torch.cumsum(torch.einsum("nlf,lfd->nld", codes, dec_dict), dim=1)
    return x, y


def test_loop_decreases_loss_and_improves_heldout_ev(tmp_path: Path):
    x, y = sparse_data()
    cfg = small_config(train={"steps": 80, "batch_size": 128, "init_tokens": 512,
                              "log_every": 10, "eval_every": 40, "checkpoint_every": 0},
                       loss={"sparsity": {"final": 0.01}}, optim={"lr": {"lr": 3e-2}})
    clt_cfg = cfg.clt.resolve(2, 12)
    trainer = Trainer(CrossLayerTranscoder(clt_cfg), loss=cfg.loss, optim=cfg.optim,
                      train=cfg.train, heldout=split_batches(x[-512:], y[-512:], 256),
                      run_dir=tmp_path)
    source = TensorSource(x[:-512], y[:-512], 128, seed=0)
    trainer.initialize(source)
    before = trainer.evaluate()
    final = trainer.fit(source)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(10, 81, 10))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [40, 80]
    assert train_recs[-1]["mse"] < 0.3 * train_recs[0]["mse"]
    assert final["ev_mean"] > 0.75 and final["ev_mean"] > before["ev_mean"] + 0.7
    assert all(k in final for k in ("l0", "dead_fraction", "explained_variance"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000080"]


def test_tensorboard_is_an_optional_sink(tmp_path: Path, monkeypatch):
    from clt_ray.train import loop as training

    scalars = []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

    x, y = sparse_data(n=512)
    cfg = small_config(train={"steps": 4, "batch_size": 64, "init_tokens": 128, "log_every": 2,
                              "tensorboard": True, "checkpoint_every": 0})
    messages = []
    for sink in (lambda run_dir: None, lambda run_dir: Writer()):  # not installed, installed
        monkeypatch.setattr(training, "_sink_tensorboard", sink)
        trainer = Trainer(CrossLayerTranscoder(cfg.clt.resolve(2, 12)), loss=cfg.loss,
                          optim=cfg.optim, train=cfg.train, run_dir=tmp_path / str(len(messages)),
                          log=messages.append)
        source = TensorSource(x, y, 64)
        trainer.initialize(source)
        trainer.fit(source)
    assert any("tensorboard is not installed" in m for m in messages)
    assert ("train/mse", 2) in scalars and ("train/l0/1", 4) in scalars


def test_bf16_autocast_step_keeps_fp32_master_weights():
    x, y = sparse_data(n=512)
    cfg = small_config(train={"precision": "bfloat16", "batch_size": 128, "init_tokens": 256})
    trainer = Trainer(CrossLayerTranscoder(cfg.clt.resolve(2, 12)), loss=cfg.loss,
                      optim=cfg.optim, train=cfg.train)
    source = TensorSource(x, y, 128)
    trainer.initialize(source)
    res = trainer.train_step(*next(source))
    assert torch.isfinite(torch.tensor(res.loss)) and trainer.model.W_enc.dtype == torch.float32
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())


def test_tf32_flag_holds_during_the_step_only_and_adam_is_fused(monkeypatch):
    x, y = sparse_data(n=512)
    cfg = small_config(train={"tf32": True, "batch_size": 128, "init_tokens": 256})
    trainer = Trainer(CrossLayerTranscoder(cfg.clt.resolve(2, 12)), loss=cfg.loss,
                      optim=cfg.optim, train=cfg.train)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)  # fused Adam on CPU too
    source = TensorSource(x, y, 128)
    trainer.initialize(source)
    seen = []
    step = training.train_step
    monkeypatch.setattr(training, "train_step", lambda *a, **k: (
        seen.append(torch.backends.cuda.matmul.allow_tf32), step(*a, **k))[1])
    torch.backends.cuda.matmul.allow_tf32 = False
    trainer.train_step(*next(source))
    assert seen == [True] and torch.backends.cuda.matmul.allow_tf32 is False


def test_dead_counters_count_tokens_since_a_feature_fired():
    x, y = sparse_data(n=512)
    cfg = small_config(train={"batch_size": 64, "init_tokens": 256, "dead_after_tokens": 128})
    trainer = Trainer(CrossLayerTranscoder(cfg.clt.resolve(2, 12)), loss=cfg.loss,
                      optim=cfg.optim, train=cfg.train)
    source = TensorSource(x, y, 64)
    trainer.initialize(source)
    with torch.no_grad():
        trainer.model.b_enc[0, :5] = -1e4  # these five can never fire
    for _ in range(3):
        trainer.train_step(*next(source))
    since = trainer.state.tokens_since_fired
    assert (since[0, :5] == 192).all()
    assert trainer.dead()["dead"] >= 5 and trainer.dead()["dead_per_layer"][0] >= 5


# --- exact resume ------------------------------------------------------------------------------


def _lm_trainer(cfg, lm, tok, run_dir, *, resume_from=None):
    source = lm_source(lm, tok, cfg.data, cfg.model, cfg.train.batch_size)
    ids, mask = heldout_windows(tok, cfg.data)
    heldout = split_batches(*window_activations(lm, ids, mask, cfg.model, cfg.data), 64)
    kw = {"loss": cfg.loss, "optim": cfg.optim, "train": cfg.train, "heldout": heldout,
          "run_dir": run_dir, "config": cfg}
    if resume_from is not None:
        return Trainer.resume(resume_from, **kw), source
    trainer = Trainer(CrossLayerTranscoder(cfg.clt.resolve(2, 16)), **kw)
    trainer.initialize(source, init_rate=cfg.clt.init_firing_rate)
    return trainer, source


def test_resume_is_exact_including_data_position_and_rng(tmp_path: Path, tiny_lm_dir):
    from clt_ray.lm import load_model

    cfg = small_config(model={"name": str(tiny_lm_dir)}, train={"checkpoint_every": 0})
    lm, tok = load_model(cfg.model)
    torch.manual_seed(123)
    straight, src = _lm_trainer(cfg, lm, tok, tmp_path / "straight")
    straight.fit(src)  # N + M = 12 steps
    rng_after = torch.get_rng_state()

    torch.manual_seed(123)
    first, src = _lm_trainer(cfg, lm, tok, tmp_path / "split")
    first.fit(src, stop_at=5)  # N = 5 (crosses a shuffle-buffer refill), then stop
    saved = first.save(src)
    torch.manual_seed(999)  # scramble the global RNG: the checkpoint must bring it back
    resumed, src2 = _lm_trainer(cfg, lm, tok, tmp_path / "split", resume_from=saved)
    assert resumed.step == 5 and resumed.state.data == json.loads(json.dumps(src.state()))
    resumed.fit(src2)  # M = 7

    for name, p in straight.model.named_parameters():
        assert torch.equal(p, resumed.model.get_parameter(name)), name
        a, b = straight.optimizer.state[p], resumed.optimizer.state[resumed.model.get_parameter(
            name)]
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq")), name
    assert torch.equal(straight.state.tokens_since_fired, resumed.state.tokens_since_fired)
    assert straight.state.tokens == resumed.state.tokens
    assert torch.equal(rng_after, torch.get_rng_state())
    assert straight.last_eval == resumed.last_eval
    final = load_checkpoint(tmp_path / "split")
    assert final.state.step == 12 and final.state.data == load_checkpoint(
        tmp_path / "straight").state.data


def test_ctrl_c_finishes_the_step_and_checkpoints(tmp_path: Path):
    x, y = sparse_data(n=1024)
    cfg = small_config(train={"steps": 50, "batch_size": 64, "init_tokens": 128,
                              "checkpoint_every": 0})

    class Interrupting(TensorSource):
        calls = 0

        def __next__(self):
            Interrupting.calls += 1
            if Interrupting.calls == 6:  # the 4th training batch (2 went to initialisation)
                signal.raise_signal(signal.SIGINT)
            return super().__next__()

    trainer = Trainer(CrossLayerTranscoder(cfg.clt.resolve(2, 12)), loss=cfg.loss,
                      optim=cfg.optim, train=cfg.train, run_dir=tmp_path)
    source = Interrupting(x, y, 64)
    trainer.initialize(source)
    before = signal.getsignal(signal.SIGINT)  # default, or SIG_IGN when run in the background
    trainer.fit(source)
    assert trainer.interrupted and trainer.step == 4
    assert load_checkpoint(tmp_path).state.data == {"epoch": 0, "offset": 6 * 64}
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


# --- configs -----------------------------------------------------------------------------------


def test_config_checked_against_the_model_before_any_work(tiny_lm_dir):
    name = {"name": str(tiny_lm_dir)}
    assert check_config(small_config(model=name)).d_model == 16
    with pytest.raises(ConfigError, match="clt.d_model: 96, but the model's width is 16"):
        check_config(small_config(model=name, clt={"d_model": 96}))
    with pytest.raises(ConfigError, match="clt.n_layers: 4, but the model has 2 layers"):
        check_config(small_config(model=name, clt={"n_layers": 4}))
    with pytest.raises(ConfigError, match="context_size 64 exceeds the model's 32 positions"):
        check_config(small_config(model=name, data={"context_size": 64}))
    with pytest.raises(ConfigError, match="k=50 exceeds n_features=48"):
        check_config(small_config(model=name, clt={"activation": "topk", "k": 50}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device: device cuda asked for but torch sees no CUDA"):
            check_config(small_config(model=name, train={"device": "cuda"}))
    with pytest.raises(ConfigError, match="model.name"):
        check_config(small_config(model={"name": str(tiny_lm_dir / "missing")}))


def test_bad_values_and_keys_are_named():
    cases = [
        ({"clt": {"n_features": 0}}, "clt.n_features: Input should be greater than 0"),
        ({"clt": {"n_features": -4}}, "clt.n_features"),
        ({"clt": {"n_features": 8, "expansion_factor": 2}}, "not both"),
        ({"clt": {"activation": "topk"}}, "needs k"),
        ({"model": {"input_hook": "hook_resid_post"}}, "model.input_hook"),
        ({"train": {"stpes": 10}}, "unknown key 'train.stpes'"),
        ({"loss": {"sparsity": {"wait_frac": 0.5, "ramp_frac": 0.8}}}, "exceeds 1"),
        ({"train": {"batch_size": 4096, "dead_after_tokens": 100}}, "dead_after_tokens"),
    ]
    for data, match in cases:
        with pytest.raises(ConfigError, match=match):
            parse_config(data)


def test_cli_reports_a_bad_config_in_one_line_without_working(tmp_path: Path, tiny_lm_dir,
                                                               monkeypatch, capsys):
    from clt_ray.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": str(tiny_lm_dir)},
                                   "clt": {"n_features": 32, "d_model": 64}}))
    out = subprocess.run([str(EXE), "train", "--config", str(bad), "--run-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2, out.stderr
    assert "clt.d_model: 64, but the model's width is 16" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
    bad.write_text("clt:\n  n_features: 0\n")  # the same path in-process: no second start-up
    monkeypatch.setattr(sys, "argv", ["clt-ray", "train", "--config", str(bad)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "clt.n_features" in err and "Traceback" not in err


def test_example_configs_parse_and_toy_yaml_is_the_demo_config():
    from clt_ray.config import AutoInterpConfig

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        if path.name == "autointerp.yaml":
            load_config(path, AutoInterpConfig)
        elif not path.name.startswith("cluster"):  # cluster-*.yaml: Ray cluster configs
            load_config(path)
    assert load_config(ROOT / "examples" / "toy.yaml") == toy_config("gpt2")
    assert load_config(ROOT / "examples" / "toy-llama.yaml") == toy_config("llama")
    gpt2 = load_config(ROOT / "examples" / "gpt2.yaml")
    assert (gpt2.optim.lr.lr, gpt2.loss.sparsity.final, gpt2.clt.init_threshold,
            gpt2.clt.expansion_factor) == (4e-4, 2.0, 0.03, 32)


# --- the whole pipeline ------------------------------------------------------------------------


def test_train_from_config_runs_and_resumes(tmp_path: Path, tiny_lm_dir):
    cfg = small_config(model={"name": str(tiny_lm_dir)})
    run = tmp_path / "run"
    short = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 6})})
    res = train_from_config(short, run, log=lambda m: None)
    assert res.step == 6 and res.checkpoint.name == "step_000000006"
    assert {"explained_variance", "l0", "dead_training", "delta_ce", "kl_spliced"} <= set(
        res.metrics)
    assert json.loads((run / "summary.json").read_text())["step"] == 6
    from clt_ray.errors import CltRayError

    with pytest.raises(CltRayError, match="already holds checkpoints"):
        train_from_config(short, run, log=lambda m: None)
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 9})})
    res = train_from_config(longer, run, resume=True, log=lambda m: None)
    assert res.step == 9
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # records after the resumed step were not duplicated


@pytest.mark.slow
def test_cli_train_on_the_toy_model_then_resume(tmp_path: Path, toy_gpt2):
    cfg = toy_config("gpt2").model_dump(mode="json")
    cfg["clt"]["n_features"] = 96
    cfg["train"].update(steps=8, batch_size=256, init_tokens=1024, eval_every=4,
                        checkpoint_every=4, dead_after_tokens=1024, progress=False)
    cfg["data"].update(shuffle_buffer=2048, heldout_tokens=512)
    path = tmp_path / "toy-small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    out = subprocess.run([str(EXE), "train", "--config", str(path), "--run-dir", str(run),
                          "--steps", "4"], capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert f"run dir: {run}" in out.stdout and "held-out EV" in out.stdout
    assert "ΔCE" in out.stdout and "dead features" in out.stdout
    out = subprocess.run([str(EXE), "train", "--run-dir", str(run), "--resume", "--steps", "8"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout and load_checkpoint(run).state.step == 8


# --- metrics.jsonl after a crash -----------------------------------------------------------------


def test_metrics_torn_last_line_is_dropped_and_said_a_bad_middle_line_is_an_error(tmp_path: Path):
    from clt_ray.errors import CltRayError
    from clt_ray.train.loop import MetricsFile

    lines: list[str] = []
    metrics = MetricsFile(tmp_path, log=lines.append)
    metrics.append(*({"kind": "train", "step": s} for s in (1, 2, 3)))
    with metrics.path.open("a") as f:
        f.write('{"kind": "train", "st')  # a crash mid-write
    metrics.truncate_after(2)
    assert [json.loads(ln)["step"] for ln in metrics.path.read_text().splitlines()] == [1, 2]
    assert len(lines) == 1 and "metrics.jsonl" in lines[0] and "line 4" in lines[0]
    metrics.append({"kind": "train", "step": 3})  # the next record starts on a line of its own
    assert [json.loads(ln)["step"] for ln in metrics.path.read_text().splitlines()] == [1, 2, 3]

    metrics.path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(CltRayError, match=r"metrics.jsonl, line 2: not a JSON record"):
        metrics.truncate_after(3)
    assert metrics.path.read_text() == '{"step": 1}\n{"step": 2\n{"step": 3}\n'  # untouched


def test_resume_after_a_crash_mid_metrics_write(tmp_path: Path, tiny_lm_dir):
    cfg = small_config(model={"name": str(tiny_lm_dir)},
                       train={"steps": 6, "eval_every": 100, "log_every": 2})
    run = tmp_path / "run"
    train_from_config(cfg, run, log=lambda m: None)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 7, "lo')
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 8})})
    said: list[str] = []
    res = train_from_config(longer, run, resume=True, log=said.append)
    assert res.step == 8
    assert any("torn last line" in line for line in said), said
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 8
