"""Typed configs (pydantic) that load from YAML and reject what they do not know, naming it.

Every config section is a `StrictModel`: unknown keys are an error, not silently ignored, because a
misspelt key in a research config otherwise trains the wrong thing for hours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from clt_ray.fsutil import atomic_write_text

CACHE_ENV = "CLT_RAY_CACHE"

# The two supported (input hook, output hook) pairs of DESIGN.md §2, in circuit-tracer's names.
HOOK_PAIRS: dict[str, str] = {"hook_resid_mid": "hook_mlp_out", "mlp.hook_in": "mlp.hook_out"}
InputHook = Literal["hook_resid_mid", "mlp.hook_in"]
OutputHook = Literal["hook_mlp_out", "mlp.hook_out"]


class CltRayError(Exception):
    """An error the user can fix (bad input, missing artefact); the CLI prints it without a traceback."""


class ConfigError(CltRayError, ValueError):
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


Precision = Literal["float32", "bfloat16", "float16"]
Activation = Literal["jumprelu", "relu", "topk", "batchtopk"]


class CLTSection(StrictModel):
    """The `clt:` section: the CLT's width and activation. n_layers and d_model come from the model
    (`resolve` builds the full `clt.CLTConfig`); give them here only to have them checked."""

    n_features: PositiveInt | None = None
    """Features per layer (F). Give this or expansion_factor (default: expansion_factor 8)."""
    expansion_factor: PositiveFloat | None = None
    """F = round(expansion_factor · d_model)."""
    activation: Activation = "jumprelu"
    k: PositiveInt | None = None
    """TopK / BatchTopK only: active features per token per layer."""
    bandwidth: PositiveFloat = 1.0
    """JumpReLU straight-through bandwidth ε (normalised units)."""
    init_threshold: PositiveFloat = 0.1
    """Initial JumpReLU threshold θ."""
    init_firing_rate: float = Field(default=0.01, gt=0.0, lt=1.0)
    """b_enc is set from data so every feature starts firing on this fraction of tokens."""
    normalize: bool = True
    """Estimate the per-layer input/output scales from data (E‖s·x‖ = √d); else s = 1."""
    seed: int = 0
    """Seed of the weight initialisation."""
    n_layers: PositiveInt | None = None
    """Optional: checked against the model's layer count."""
    d_model: PositiveInt | None = None
    """Optional: checked against the model's width."""

    @model_validator(mode="after")
    def _width_and_k(self) -> CLTSection:
        if self.n_features is not None and self.expansion_factor is not None:
            raise ValueError("give n_features or expansion_factor, not both")
        if self.activation in ("topk", "batchtopk") and self.k is None:
            raise ValueError(f"activation '{self.activation}' needs k "
                             "(active features per token per layer)")
        if self.activation in ("jumprelu", "relu") and self.k is not None:
            raise ValueError(f"k is only used by topk/batchtopk, not '{self.activation}'")
        return self

    def features_for(self, d_model: int) -> int:
        if self.n_features is not None:
            return self.n_features
        return max(1, round((self.expansion_factor or 8.0) * d_model))

    def resolve(self, n_layers: int, d_model: int) -> Any:
        """The `clt.CLTConfig` for a model with these dimensions; ConfigError on a mismatch."""
        from clt_ray.clt import CLTConfig  # clt imports this module

        problems = []
        if self.n_layers is not None and self.n_layers != n_layers:
            problems.append(f"clt.n_layers: {self.n_layers}, but the model has {n_layers} layers")
        if self.d_model is not None and self.d_model != d_model:
            problems.append(f"clt.d_model: {self.d_model}, but the model's width is {d_model}")
        if problems:
            raise ConfigError("config does not match the model:\n  " + "\n  ".join(problems))
        try:
            return CLTConfig(n_layers=n_layers, d_model=d_model,
                             n_features=self.features_for(d_model), activation=self.activation,
                             k=self.k, bandwidth=self.bandwidth,
                             init_threshold=self.init_threshold, seed=self.seed)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, CLTConfig, "clt")) from None


class DataConfig(StrictModel):
    """The `data:` section: where training activations come from."""

    source: Literal["lm", "cache", "producers"] = "lm"
    """`lm`: run the model in this process over a token stream; `cache`: read the activation
    cache at `data.cache` (written by `clt-ray cache`); `producers`: `data.producers` CacheProducer
    actors on Ray stream quantised blocks through the object store. Held-out data always comes
    from the model in the trainer's process."""
    cache: str | None = None
    """The activation cache (local path or URI) when `source: cache`."""
    cache_order: Literal["shuffled", "written"] = "shuffled"
    """`shuffled`: the cache's files in a seeded order each epoch (then the shuffle buffer);
    `written`: in the order they were written, which replays the live stream exactly when the
    files hold `lm_batch_size` windows each (`clt-ray cache --windows-per-file`)."""
    producers: PositiveInt = 1
    """CacheProducer actors when `source: producers` (each runs the model on its own slice)."""
    producer_cpus: PositiveFloat | None = None
    """CPUs per producer actor (default: one GPU each when the cluster has them, else an equal
    share of the cluster's CPUs)."""
    stream_bits: Literal[8, 4, 2] = 8
    """Quantisation of the blocks streamed by producers."""
    backpressure: PositiveInt = 4
    """Blocks a producer may run ahead of the trainer (Ray's generator backpressure)."""
    corpus: str = "toy"
    """`toy` (the synthetic toy corpus), a local .txt/.jsonl/.parquet file or folder of
    them, or `hf:<dataset>[:<config>]` (Hugging Face datasets, streamed; needs network)."""
    text_field: str = "text"
    """The text column of .jsonl / Parquet / Hugging Face corpora."""
    split: str = "train"
    """Hugging Face split for training; held-out documents are a deterministic 1-in-N subset."""
    context_size: PositiveInt = 128
    """Tokens per window, BOS included (windows never cross documents; short tails are padded)."""
    lm_batch_size: PositiveInt = 32
    """Windows per forward pass of the model."""
    shuffle_buffer: PositiveInt = 65536
    """Tokens shuffled together; the buffer is refilled when drained (memory: tokens × 2·L·d)."""
    dtype: Precision = "float32"
    """Storage dtype of buffered activations."""
    seed: int = 1
    """Seed of the training stream (toy documents, shuffling). The toy models trained on seed 0."""
    heldout_seed: int = 2
    """Seed of the held-out toy documents (other corpora: see heldout_every)."""
    heldout_every: PositiveInt = 100
    """Non-toy corpora: every heldout_every-th document is held out (and skipped by training)."""
    heldout_tokens: PositiveInt = 8192
    """Tokens of held-out activations evaluated at each eval."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.context_size < 2:
            raise ValueError("context_size must be at least 2 (BOS + one token)")
        if self.heldout_every < 2:
            raise ValueError("heldout_every must be at least 2")
        if self.source == "cache" and not self.cache:
            raise ValueError("source 'cache' needs data.cache (the cache's path or URI)")
        return self


class TrainConfig(StrictModel):
    """The `train:` section: length, batch, precision, logging, eval and checkpoints."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 1024
    """Tokens per step."""
    precision: Precision = "float32"
    """Autocast dtype of the step; weights and Adam moments stay fp32. fp16 has no loss scaling:
    prefer bfloat16."""
    tf32: bool = False
    """Let CUDA run the step's fp32 matmuls in TF32 (weights and Adam stay fp32): 312 -> 95 ms a
    step on an H200 at L 12, d 768, F 8192, B 4096. No effect on CPU."""
    device: str | None = None
    """Where the CLT trains; default: the model's device."""
    seed: int = 0
    """Seed of torch's global RNG for the run (saved and restored with checkpoints)."""
    init_tokens: PositiveInt = 16384
    """Tokens (taken from the training stream) for the norm scales and the b_enc init."""
    dead_after_tokens: PositiveInt = 1_000_000
    """A feature is dead when it has not fired in the last this-many training tokens."""
    log_every: PositiveInt = 10
    eval_every: NonNegativeInt = 0
    """Steps between held-out evals (0: only at the end)."""
    checkpoint_every: NonNegativeInt = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: PositiveInt = 2
    progress: bool = True
    """tqdm progress bar."""
    graph_prompts: NonNegativeInt = 0
    """Held-out prompts whose attribution graphs are scored (replacement, completeness) at each
    eval and at the end: toy mechanism prompts on the toy corpus, else held-out text. A few
    seconds per prompt on CPU for the toy model. Needs a JumpReLU or ReLU CLT."""
    graph_max_feature_nodes: PositiveInt = 512
    tensorboard: bool = False
    """Also log to TensorBoard (run_dir/tensorboard) if the tensorboard package is installed."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.dead_after_tokens < self.batch_size:
            raise ValueError(f"dead_after_tokens ({self.dead_after_tokens}) is below one batch "
                             f"({self.batch_size} tokens)")
        return self


def _define_run_config() -> type[StrictModel]:
    """`Config`, defined on first use: its loss/optim sections live in losses.py / training.py,
    which import this module (PEP 562 `__getattr__` below breaks the import cycle)."""
    from clt_ray.losses import LossConfig
    from clt_ray.training import OptimConfig

    class Config(StrictModel):
        """A whole clt-ray run: model, CLT, loss, optimiser, training loop and data."""

        model: ModelConfig = ModelConfig()
        clt: CLTSection = CLTSection()
        loss: LossConfig = LossConfig()
        optim: OptimConfig = OptimConfig()
        train: TrainConfig = TrainConfig()
        data: DataConfig = DataConfig()
        cache_dir: Path | None = None
        """Overrides $CLT_RAY_CACHE / ~/.cache/clt-ray for this run."""

        @model_validator(mode="after")
        def _consistent(self) -> Config:
            if self.train.graph_prompts and self.clt.activation not in ("jumprelu", "relu"):
                raise ValueError(f"train.graph_prompts: attribution graphs need a JumpReLU or "
                                 f"ReLU CLT, this one is {self.clt.activation} (export converts "
                                 "it after training; score graphs with `clt-ray attribute`)")
            if self.data.shuffle_buffer < self.train.batch_size:
                raise ValueError(f"data.shuffle_buffer ({self.data.shuffle_buffer} tokens) is "
                                 f"smaller than one batch (train.batch_size "
                                 f"{self.train.batch_size})")
            return self

    Config.__module__ = __name__
    Config.__qualname__ = "Config"
    return Config


def __getattr__(name: str) -> Any:
    if name == "Config":
        cls = _define_run_config()
        globals()["Config"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def parse_config(data: dict[str, Any] | None, cls: type[C] | None = None,
                 source: str = "config") -> C:
    """Validate a mapping into `cls` (default: Config), raising ConfigError naming every problem."""
    if cls is None:
        cls = __getattr__("Config") if "Config" not in globals() else globals()["Config"]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, cls, source)) from None


def load_config(path: str | os.PathLike[str], cls: type[C] | None = None) -> C:
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


def toy_config(arch: str = "gpt2") -> Any:
    """The tuned settings of examples/toy.yaml (arch "gpt2") and examples/toy-llama.yaml
    ("llama"): what `clt-ray demo` trains (a test keeps the YAML files equal to these)."""
    if arch not in TOY_ARCHS:
        raise ValueError(f"unknown toy architecture {arch!r}; supported: {', '.join(TOY_ARCHS)}")
    return parse_config({"model": {"name": f"toy:{arch}"}, **TOY_TRAIN}, source=f"toy_config({arch!r})")


TOY_ARCHS = ("gpt2", "llama")
TOY_TRAIN: dict[str, Any] = {
    "clt": {"n_features": 512, "activation": "jumprelu", "init_threshold": 0.1,
            "bandwidth": 1.0, "init_firing_rate": 0.01},
    "loss": {"sparsity": {"final": 1.0, "wait_frac": 0.0, "ramp_frac": 0.8, "shape": "linear"},
             "tanh_c": 1.0, "preact_coef": 1e-3},
    "optim": {"lr": {"lr": 1e-3, "warmup_frac": 0.02, "decay": "linear",
                     "decay_start_frac": 0.8, "final_frac": 0.0}, "max_grad_norm": 1.0},
    "train": {"steps": 600, "batch_size": 1024, "init_tokens": 16384,
              "dead_after_tokens": 200_000, "log_every": 10, "eval_every": 200,
              "checkpoint_every": 300, "keep_checkpoints": 2},
    "data": {"corpus": "toy", "context_size": 128, "lm_batch_size": 32,
             "shuffle_buffer": 65536, "seed": 1, "heldout_seed": 2, "heldout_tokens": 8192},
}
"""Tuned on the toy models (figures they reach: README, "Training a CLT")."""
