"""Typed configs (pydantic) that load from YAML and reject what they do not know, naming it.

Every config section is a `StrictModel`: unknown keys are an error, not silently ignored, because a
misspelt key in a research config otherwise trains the wrong thing for hours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from clt_ray.fsutil import atomic_write_text

CACHE_ENV = "CLT_RAY_CACHE"

# The two supported (input hook, output hook) pairs of DESIGN.md §2, in circuit-tracer's names.
HOOK_PAIRS: dict[str, str] = {"hook_resid_mid": "hook_mlp_out", "mlp.hook_in": "mlp.hook_out"}
InputHook = Literal["hook_resid_mid", "mlp.hook_in"]
OutputHook = Literal["hook_mlp_out", "mlp.hook_out"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and the problem."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where built artefacts (toy models, …) live: override > $CLT_RAY_CACHE > ~/.cache/clt-ray."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clt-ray"


class ModelConfig(StrictModel):
    """The language model whose MLPs the CLT reads and writes."""

    name: str = "toy:gpt2"
    """A hub name (`gpt2`), a local HF model folder, or `toy:gpt2` / `toy:llama` (built offline)."""
    revision: str | None = None
    input_hook: InputHook = "hook_resid_mid"
    output_hook: OutputHook = "hook_mlp_out"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"

    @model_validator(mode="after")
    def _hooks_pair(self) -> ModelConfig:
        if HOOK_PAIRS[self.input_hook] != self.output_hook:
            pairs = ", ".join(f"{i} -> {o}" for i, o in HOOK_PAIRS.items())
            raise ValueError(
                f"hooks {self.input_hook} -> {self.output_hook} are not a supported pair "
                f"(supported: {pairs})"
            )
        if not self.name.strip():
            raise ValueError("model name is empty")
        return self


class Config(StrictModel):
    """A whole clt-ray run. Sections are added as the parts of the pipeline land."""

    model: ModelConfig = ModelConfig()
    cache_dir: Path | None = None
    """Overrides $CLT_RAY_CACHE / ~/.cache/clt-ray for this run."""


C = TypeVar("C", bound=BaseModel)


def _fields_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the sub-model reached by following `loc` from `cls`, if it is one."""
    current: Any = cls
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def format_validation_error(exc: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(cls, loc[:-1])
            hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
            lines.append(f"unknown key '{key}'{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}" + (f" (got {err['input']!r})" if "input" in err and
                                              not isinstance(err["input"], dict) else ""))
    return f"{source}: invalid config:\n  " + "\n  ".join(lines)


def parse_config(data: dict[str, Any] | None, cls: type[C] = Config, source: str = "config") -> C:
    """Validate a mapping into `cls`, raising ConfigError with every problem named."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, cls, source)) from None


def load_config(path: str | os.PathLike[str], cls: type[C] = Config) -> C:
    """Load a YAML config file into `cls`; every failure is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, cls, source=str(path))


def dump_config(config: BaseModel, path: str | os.PathLike[str]) -> None:
    """Write a config as YAML (temp name, then rename: a crash never leaves half a file)."""
    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
