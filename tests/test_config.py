"""Configs: YAML in/out, unknown keys and bad values rejected with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from clt_ray.config import Config, ModelConfig, cache_dir, dump_config, load_config, parse_config
from clt_ray.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_round_trip(tmp_path: Path) -> None:
    cfg = Config(model=ModelConfig(name="gpt2", input_hook="mlp.hook_in", output_hook="mlp.hook_out"))
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_defaults_are_the_toy_model_and_circuit_tracer_hooks(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "model: {}\n"))
    assert cfg.model.name == "toy:gpt2"
    assert (cfg.model.input_hook, cfg.model.output_hook) == ("hook_resid_mid", "hook_mlp_out")


def test_unknown_key_is_named_with_allowed_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "model:\n  nmae: gpt2\n"))
    msg = str(err.value)
    assert "unknown key 'model.nmae'" in msg
    assert "name" in msg and "input_hook" in msg  # the allowed keys are listed
    assert str(tmp_path / "c.yaml") in msg


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(write(tmp_path, "trian: {}\n"))


def test_bad_hook_and_bad_pair(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.input_hook"):
        load_config(write(tmp_path, "model:\n  input_hook: hook_resid_pre\n"))
    with pytest.raises(ConfigError, match="not a supported pair"):
        parse_config({"model": {"input_hook": "mlp.hook_in", "output_hook": "hook_mlp_out"}})


def test_bad_dtype_names_key_and_value() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"dtype": "float8"}})
    assert "model.dtype" in str(err.value) and "float8" in str(err.value)


def test_missing_file_bad_yaml_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLT_RAY_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "clt-ray"
    monkeypatch.setenv("CLT_RAY_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
