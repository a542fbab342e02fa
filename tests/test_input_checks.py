"""Bad input is one clear error before any expensive work (issue 19, items 9-12 and 14): corpus
problems before the model loads, a damaged cache before training starts, a run folder that cannot
be written, --resume without a checkpoint, config values that would be coerced; and a training run
stopped by Ctrl-C exits 130."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import interrupt_cli
from test_cache_produce import config as small_config

from clt_ray.cache.produce import write_cache
from clt_ray.cache.store import CacheError, check_destination, check_files, open_cache
from clt_ray.config import parse_config
from clt_ray.data import check_corpus
from clt_ray.errors import CltRayError, ConfigError
from clt_ray.lm import load_model
from clt_ray.train.run import check_config, train_from_config

EXE = Path(sys.executable).parent / "clt-ray"

pytestmark = pytest.mark.usefixtures("one_thread")


def config(model_dir: Path, **sections) -> dict:
    """test_cache_produce's small run config as a mapping, with held-out every 2nd document (small
    corpora) and `sections` merged in."""
    base = small_config(model_dir, heldout_every=2).model_dump(mode="json")
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def run_cli(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)


def one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in out.stderr, out.stderr[-2000:]


# --- item 9: the corpus, before the model loads ----------------------------------------------


def bad_corpora(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (corpus path, words the error must contain)."""
    root.mkdir()
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "nul.txt").write_bytes(b"text\x00with\x00nuls " * 40)
    (root / "field.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"})
                                                for i in range(4)) + "\n")
    (root / "one-line.jsonl").write_text(json.dumps({"text": "the only document"}) + "\n")
    (root / "not-text.jsonl").write_text("\n".join(json.dumps({"text": i}) for i in range(4)))
    return {
        "empty": (root / "empty.txt", "no non-empty training document"),
        "binary": (root / "binary.txt", "not UTF-8 text"),
        "nul": (root / "nul.txt", "NUL bytes"),
        "missing field": (root / "field.jsonl", "'text' field"),
        "one line": (root / "one-line.jsonl", "no non-empty training document"),
        "not text": (root / "not-text.jsonl", "not text"),
    }


def test_corpus_problems_are_named_before_any_model_loads(tmp_path: Path, tiny_lm_dir,
                                                          monkeypatch):
    from clt_ray.train import run

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the corpus was checked")

    monkeypatch.setattr(run, "load_model", no_model)
    for name, (path, words) in bad_corpora(tmp_path / "corpora").items():
        cfg = parse_config(config(tiny_lm_dir, data={"corpus": str(path)}))
        with pytest.raises(ConfigError, match="data.corpus") as err:
            check_corpus(cfg.data)
        assert words in str(err.value), (name, str(err.value))
        run_dir = tmp_path / f"run-{name}"
        with pytest.raises(ConfigError, match=words):
            train_from_config(cfg, run_dir, log=lambda m: None)
        assert not run_dir.exists(), name  # no config.yaml left behind
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(4)))
    check_corpus(parse_config(config(tiny_lm_dir, data={"corpus": str(good)})).data)


def test_an_hf_corpus_out_of_reach_is_one_error(tiny_lm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = parse_config(config(tiny_lm_dir, data={"corpus": "hf:clt-ray/no-such-dataset"}))
    with pytest.raises(ConfigError, match="data.corpus 'hf:clt-ray/no-such-dataset': cannot "
                                          "read its training documents"):
        check_corpus(cfg.data)


def test_cli_train_and_cache_refuse_a_bad_corpus_in_one_line(tmp_path: Path, tiny_lm_dir):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tiny_lm_dir, data={"corpus": str(corpus)})))
    out = run_cli("train", "--config", str(path), "--run-dir", str(tmp_path / "run"))
    one_line_error(out, "no non-empty training document")
    assert not (tmp_path / "run").exists()
    out = run_cli("cache", "--config", str(path), "--out", str(tmp_path / "cache"),
                  "--tokens", "100", "--in-process")
    one_line_error(out, "no non-empty training document")
    assert not (tmp_path / "cache").exists()
    # --out at a file: refused before the corpus or model is looked at
    target = tmp_path / "a-file"
    target.write_text("keep me")
    out = run_cli("cache", "--config", str(path), "--out", str(target), "--tokens", "100")
    one_line_error(out, "is a file")
    assert target.read_text() == "keep me"


def test_cache_destination_that_is_a_file_is_refused(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CacheError, match="is a file"):
        check_destination(str(tmp_path / "f"))
    check_destination(str(tmp_path / "new"))  # a folder to be: fine
    check_destination("memory://bucket/cache")


# --- item 10: every cache file present and of its size, before training -----------------------


@pytest.fixture
def small_cache(tiny_lm_dir, tmp_path: Path) -> tuple[dict, str]:
    raw = config(tiny_lm_dir)
    cfg = parse_config(raw)
    lm, tok = load_model(cfg.model)
    uri = str(tmp_path / "cache")
    write_cache(lm, tok, cfg.data, cfg.model, uri, tokens=300, windows_per_file=5,
                progress=False, log=lambda s: None)
    raw["data"].update(source="cache", cache=uri)
    return raw, uri


def test_a_damaged_cache_is_found_before_training_starts(small_cache, tmp_path: Path,
                                                         monkeypatch):
    from clt_ray.train import run

    raw, uri = small_cache
    _, root, manifest = open_cache(uri)
    assert len(manifest.files) >= 3
    check_files(uri)  # intact
    last = Path(root) / manifest.files[-1].name
    last.write_bytes(last.read_bytes()[:-10])  # the last file read, truncated
    (Path(root) / manifest.files[-2].name).unlink()

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the cache was checked")

    monkeypatch.setattr(run, "load_model", no_model)
    cfg = parse_config(raw)
    with pytest.raises(CacheError) as err:
        check_config(cfg)
    message = str(err.value)
    assert "1 missing: " + manifest.files[-2].name in message
    assert f"1 of the wrong size: {manifest.files[-1].name}" in message
    with pytest.raises(CacheError):
        train_from_config(cfg, tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


# --- item 11: the run folder and --resume ------------------------------------------------------


def test_a_run_folder_that_cannot_be_written_is_one_error_before_the_model_loads(
        tmp_path: Path, tiny_lm_dir, monkeypatch):
    """A read-only folder (for a user other than root) and a file in the way (for anyone) fail
    the same way: the OSError of creating the folder or writing config.yaml."""
    from clt_ray.train import run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "a-file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    cases = [tmp_path / "a-file" / "run"]
    if os.geteuid() != 0:  # root writes into read-only folders
        cases += [locked, locked / "run"]
    try:
        for run_dir in cases:
            with pytest.raises(CltRayError, match=f"cannot write the run folder {run_dir}"):
                train_from_config(parse_config(config(tiny_lm_dir)), run_dir, log=lambda m: None)
    finally:
        locked.chmod(stat.S_IRWXU)


def test_resume_without_a_checkpoint_says_so_even_with_a_config(tmp_path: Path, tiny_lm_dir):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tiny_lm_dir)))
    empty = tmp_path / "empty-run"
    empty.mkdir()
    for args in (["--config", str(path)], []):
        out = run_cli("train", *args, "--run-dir", str(empty), "--resume")
        one_line_error(out, f"--resume: {empty} has no checkpoint to resume from")
        assert "config file not found" not in out.stderr


# --- item 12: config values that must not be coerced --------------------------------------------


@pytest.mark.parametrize(("section", "values", "words"), [
    ("optim", {"lr": {"lr": float("inf")}}, "optim.lr.lr: Input should be a finite number"),
    ("optim", {"lr": {"lr": float("nan")}}, "optim.lr.lr: Input should be a finite number"),
    ("optim", {"max_grad_norm": float("inf")}, "optim.max_grad_norm"),
    ("train", {"steps": True}, "train.steps: expected an integer, got a boolean"),
    ("clt", {"n_features": True}, "clt.n_features: expected an integer, got a boolean"),
    ("optim", {"lr": {"lr": False}}, "optim.lr.lr: expected a number, got a boolean"),
    ("data", {"stream_bits": True}, "data.stream_bits: expected one of 8, 4, 2"),
])
def test_values_that_would_be_coerced_are_refused(section: str, values: dict, words: str):
    with pytest.raises(ConfigError) as err:
        parse_config({section: values})
    assert words in str(err.value)


def test_yaml_inf_and_true_are_refused_and_real_booleans_and_ints_still_load(tmp_path: Path):
    from clt_ray.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr:\n    lr: .inf\ntrain:\n  steps: true\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "optim.lr.lr" in str(err.value) and "train.steps" in str(err.value)
    path.write_text("optim:\n  lr:\n    lr: 1\ntrain:\n  steps: 5\n  progress: false\n  tf32: true\n")
    cfg = load_config(path)
    assert (cfg.optim.lr.lr, cfg.train.steps, cfg.train.progress, cfg.train.tf32) == (
        1.0, 5, False, True)


# --- item 14: Ctrl-C ends a one-process run with exit code 130 -----------------------------------


def test_training_stopped_by_ctrl_c_checkpoints_and_exits_130(tmp_path: Path, tiny_lm_dir):
    raw = config(tiny_lm_dir, train={"steps": 100_000, "log_every": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    rc, stdout, stderr = interrupt_cli(["train", "--config", str(path), "--run-dir", str(run)],
                                       lambda: metrics.is_file() and bool(metrics.read_text()))
    assert rc == 130, stdout[-2000:] + stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert json.loads((run / "summary.json").read_text())["interrupted"] is True
    assert list((run / "checkpoints").glob("step_*/manifest.json"))


# --- item 4 (training's part): --resume skips a damaged latest checkpoint, saying why -----------


def test_resume_skips_a_checkpoint_with_a_flipped_byte_saying_so(tmp_path: Path, tiny_lm_dir):
    cfg = parse_config(config(tiny_lm_dir, train={"checkpoint_every": 3, "keep_checkpoints": 3}))
    run = tmp_path / "run"
    train_from_config(cfg, run, log=lambda m: None)
    newest = max((run / "checkpoints").glob("step_*"))
    victim = min(newest.glob("W_dec*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 finds it
    victim.write_bytes(bytes(data))
    said: list[str] = []
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 8})})
    res = train_from_config(longer, run, resume=True, log=said.append)
    assert res.step == 8
    assert any(f"skipping checkpoint {newest.name}" in line and victim.name in line
               for line in said), said
    assert any("resuming" in line and "step_000000003" in line for line in said), said
