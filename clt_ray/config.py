"""Every config of clt-ray, in one place (layer 1: imports only errors and fsutil): typed pydantic
models that load from YAML and reject what they do not know, naming it.

Every section is a `StrictModel`: unknown keys are an error, not silently ignored, because a
misspelt key in a research config otherwise trains the wrong thing for hours. In order: the model,
the CLT (`CLTConfig`, and the `clt:` section `CLTSection` that resolves to it), the loss and
optimiser schedules, data, training, the root `Config` of a run; then attribution's
`GraphSettings`, the top-k statistics, the LLM endpoint and the auto-interp run; then loading,
dumping and the toy settings.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from clt_ray.errors import ConfigError
from clt_ray.fsutil import atomic_write_text

CACHE_ENV = "CLT_RAY_CACHE"
TOY_ARCHS = ("gpt2", "llama")
"""The toy world's architectures (`toy:gpt2`, `toy:llama`)."""

# The two supported (input hook, output hook) pairs of docs/design.md §2, in circuit-tracer's names.
HOOK_PAIRS: dict[str, str] = {"hook_resid_mid": "hook_mlp_out", "mlp.hook_in": "mlp.hook_out"}
InputHook = Literal["hook_resid_mid", "mlp.hook_in"]
OutputHook = Literal["hook_mlp_out", "mlp.hook_out"]


class StrictModel(BaseModel):
    """Unknown keys, infinite or NaN floats (`lr: .inf`) and booleans where a number is meant
    (`steps: true` would be 1 step) are errors, not coerced."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if not _accepts_bool(annotation):
                raise ValueError(f"expected {_describe(annotation)}, got a boolean")
        return value


def _accepts_bool(annotation: object) -> bool:
    """Whether a field's type takes true/false (bool, Any, a Literal of them, a union with one)."""
    if annotation is bool or annotation is Any or annotation is object:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_accepts_bool(a) for a in get_args(annotation))


def _describe(annotation: object) -> str:
    names = {int: "an integer", float: "a number", str: "text"}
    for a in (annotation, *get_args(annotation)):
        if get_origin(a) is Literal:
            return "one of " + ", ".join(map(repr, get_args(a)))
        base = get_args(a)[0] if get_origin(a) is Annotated else a
        if base in names:
            return names[base]
    return "a value of another type"


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


def check_k(activation: str, k: int | None) -> None:
    """TopK/BatchTopK need k (active features per token per layer); the others take none."""
    if activation in ("topk", "batchtopk") and k is None:
        raise ValueError(f"activation '{activation}' needs k (active features per token per layer)")
    if activation in ("jumprelu", "relu") and k is not None:
        raise ValueError(f"k is only used by topk/batchtopk, not '{activation}'")


class CLTConfig(StrictModel):
    """Shape and activation of a whole CLT (shards are given their range separately)."""

    n_layers: PositiveInt
    d_model: PositiveInt
    n_features: PositiveInt
    """Features per layer in the whole CLT (F)."""
    activation: Activation = "jumprelu"
    k: PositiveInt | None = None
    """Active features per token per layer: TopK exactly, BatchTopK on average over the batch."""
    bandwidth: PositiveFloat = 1.0
    """JumpReLU straight-through bandwidth ε, in normalised units (pre-activations are O(1))."""
    init_threshold: PositiveFloat = 0.1
    """Initial JumpReLU θ (every feature)."""
    seed: int = 0

    @model_validator(mode="after")
    def _check_k(self) -> CLTConfig:
        check_k(self.activation, self.k)
        if self.k is not None and self.k > self.n_features:
            raise ValueError(f"k={self.k} exceeds n_features={self.n_features}")
        return self


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
        check_k(self.activation, self.k)
        return self

    def features_for(self, d_model: int) -> int:
        if self.n_features is not None:
            return self.n_features
        return max(1, round((self.expansion_factor or 8.0) * d_model))

    def resolve(self, n_layers: int, d_model: int) -> CLTConfig:
        """The `CLTConfig` for a model with these dimensions; ConfigError on a mismatch."""
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


def _fraction(default: float) -> float:
    """A config field in [0, 1] (a fraction of the run's total steps or of a value)."""
    return Field(default=default, ge=0.0, le=1.0)



def _check_step(step: int, total_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")


class SparsitySchedule(StrictModel):
    """λ(t): 0 for the first wait_frac of the run, then a ramp over ramp_frac to `final`."""

    final: NonNegativeFloat = 1.0
    wait_frac: float = _fraction(0.0)
    ramp_frac: float = _fraction(1.0)
    shape: Literal["linear", "cosine"] = "linear"

    @model_validator(mode="after")
    def _fits(self) -> SparsitySchedule:
        if self.wait_frac + self.ramp_frac > 1 + 1e-9:
            raise ValueError(f"wait_frac + ramp_frac = {self.wait_frac + self.ramp_frac} exceeds 1")
        return self

    def at(self, step: int, total_steps: int) -> float:
        _check_step(step, total_steps)
        wait, ramp = self.wait_frac * total_steps, self.ramp_frac * total_steps
        if step < wait:
            return 0.0
        frac = 1.0 if ramp == 0 else min(1.0, (step - wait) / ramp)
        if self.shape == "cosine":
            frac = (1 - math.cos(math.pi * frac)) / 2
        return self.final * frac


class LRSchedule(StrictModel):
    """Linear warm-up over warmup_frac, constant, then decay from decay_start_frac to the end,
    down to final_frac·lr."""

    lr: PositiveFloat = 2e-4
    warmup_frac: float = _fraction(0.01)
    decay: Literal["constant", "linear", "cosine"] = "linear"
    decay_start_frac: float = _fraction(0.8)
    final_frac: float = _fraction(0.0)

    @model_validator(mode="after")
    def _ordered(self) -> LRSchedule:
        if self.decay != "constant" and self.decay_start_frac < self.warmup_frac:
            raise ValueError("decay_start_frac must not come before the end of warm-up")
        return self

    def at(self, step: int, total_steps: int) -> float:
        """The learning rate of the update made at `step` (0-based); step 0 already gets
        lr/warmup_steps, so no update is wasted at lr 0."""
        _check_step(step, total_steps)
        warmup = self.warmup_frac * total_steps
        if step < warmup:
            return self.lr * min(1.0, (step + 1) / warmup)
        start = self.decay_start_frac * total_steps
        if self.decay == "constant" or step < start:
            return self.lr
        frac = min(1.0, (step - start) / max(total_steps - start, 1e-12))
        shape = frac if self.decay == "linear" else (1 - math.cos(math.pi * frac)) / 2
        return self.lr * (1 - (1 - self.final_frac) * shape)


class LossConfig(StrictModel):
    """Coefficients of mse + λ(t)·sparsity + λ_p·preact."""

    sparsity: SparsitySchedule = SparsitySchedule()
    tanh_c: PositiveFloat = 1.0
    """c in tanh(c·a·‖W_dec‖)."""
    preact_coef: NonNegativeFloat = 3e-6
    """λ_p."""


class OptimConfig(StrictModel):
    lr: LRSchedule = LRSchedule()
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    max_grad_norm: PositiveFloat | None = Field(default=1.0)
    """Clip the GLOBAL gradient norm (over all shards) to this; None: no clipping."""


WINDOWS_PER_FILE = 64
"""Windows a cache file holds by default (`clt-ray cache --windows-per-file`): a producer runs
the LM over them in one forward pass, so they also set its memory (clt_ray.plan)."""


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
    decoder: Literal["auto", "dense", "sparse"] = "auto"
    """How the step decodes: `dense` (a matmul per source layer over all F features), `sparse`
    (only the active (token, feature) pairs, forward and backward; same gradients to round-off),
    or `auto`: sparse on each step where the entries the backward needs (L0, plus JumpReLU's
    in-window ones) are few enough to make it faster on this device (clt_ray.nn.step
    SPARSE_MAX_DENSITY, measured on CPU; CUDA stays dense until measured)."""
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


class GraphSettings(StrictModel):
    """How graphs are computed and pruned (circuit-tracer's `attribute` / `prune_graph`)."""

    max_feature_nodes: PositiveInt = 4096
    """Always set: the adjacency matrix is dense, so memory grows with nodes²."""
    max_n_logits: PositiveInt = 10
    desired_logit_prob: float = Field(0.95, gt=0, le=1)
    batch_size: PositiveInt = 256
    """Source nodes per backward pass, at most: lowered per prompt to keep `gather_bytes`."""
    gather_bytes: PositiveInt = 2_000_000_000
    """Memory one backward pass may use to gather gradients. circuit-tracer's backward hook
    gathers, for each source node of the batch, the gradient at every active feature's decoder
    position, [batch, active features, d] fp32 and an einsum copy: at GPT-2 small's shape a
    prompt with ~27 k active features took 21 GB at batch 256 (bench/scale.py). The batch is
    cut so that batch × 2 × active × d × 4 bytes ≤ this (`attribution.graphs.source_batch`)."""
    node_threshold: float = Field(0.8, ge=0, le=1)
    edge_threshold: float = Field(0.98, ge=0, le=1)


NO_KEY = "EMPTY"
"""What is sent when no key is set: local servers (vLLM, SGLang) without --api-key accept it."""


class LLMConfig(StrictModel):
    """Which server and model to ask, how hard, and what it may cost."""

    base_url: str = Field("http://127.0.0.1:8000/v1", min_length=1)
    model: str = Field(min_length=1)
    api_key_env: str = Field("OPENAI_API_KEY", min_length=1)
    """Name of the environment variable holding the key. Unset: requests carry the placeholder
    "EMPTY" (no authentication, normal for a local vLLM), and the run says so."""
    concurrency: PositiveInt = 64
    timeout_s: PositiveFloat = 60.0
    max_retries: NonNegativeInt = 5
    max_tokens: PositiveInt = 256
    temperature: NonNegativeFloat = 0.0
    prompt_price_per_mtok: NonNegativeFloat = 0.0
    completion_price_per_mtok: NonNegativeFloat = 0.0
    """USD per million tokens, for the cost counts and the budget."""
    budget_usd: NonNegativeFloat | None = None
    """Stop sending once this much is spent (None: no cap)."""
    http: Literal["aiohttp", "httpx"] = "aiohttp"
    """openai's HTTP transport: aiohttp costs less CPU per request (the limit of one process)."""

    def api_key(self) -> SecretStr:
        """The key in this process's environment (empty when unset). A SecretStr: its repr is
        redacted, so it can be handed to Ray actors (a constructor argument, never a runtime_env,
        whose env_vars Ray writes to its logs) without any log or repr showing it."""
        return SecretStr(os.environ.get(self.api_key_env, ""))

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.prompt_price_per_mtok
            + completion_tokens * self.completion_price_per_mtok
        ) / 1e6


class FeatureChoice(StrictModel):
    """Features to explain: every one, index ranges (of every layer, or of one), or the feature
    nodes of the attribution graphs in a `clt-ray attribute` output folder."""

    all: bool = False
    ranges: list[tuple[int, int]] = Field(default_factory=list)
    """[start, stop) feature indices."""
    layers: list[int] | None = None
    """Only these layers (default: all)."""
    graphs: str | None = None

    def problems(self, n_layers: int, n_features: int) -> list[str]:
        """What does not fit a CLT of n_layers layers × n_features features: one line each,
        naming the key and what is allowed (the graphs folder is checked where it is read)."""
        out = []
        if self.layers is not None and not self.layers:
            out.append(f"features.layers: empty; give layers from 0 to {n_layers - 1}, or leave "
                       "the key out for every layer")
        out += [f"features.layers: {layer} is not a layer of this CLT (0 to {n_layers - 1})"
                for layer in self.layers or () if not 0 <= layer < n_layers]
        out += [f"features.ranges: [{a}, {b}) goes past the CLT's {n_features} features per "
                f"layer (allowed: 0 <= start < stop <= {n_features})"
                for a, b in self.ranges if b > n_features]
        return out

    @model_validator(mode="after")
    def _one(self) -> FeatureChoice:
        chosen = sum([self.all, bool(self.ranges), self.graphs is not None])
        if chosen != 1:
            raise ValueError("features: give exactly one of `all: true`, `ranges: [[start, "
                             "stop], ...]` or `graphs: <attribute output folder>`")
        for a, b in self.ranges:
            if not 0 <= a < b:
                raise ValueError(f"features.ranges: [{a}, {b}) is not a range of feature indices")
        return self


class TopKCommon(StrictModel):
    """What the `topk:` section and the statistics share (defaults stated once)."""

    k: PositiveInt = 20
    """Top windows per feature."""
    samples_per_bin: PositiveInt = 4
    """Min-hash samples per activation bin (quantile examples come from these)."""
    range_size: PositiveInt = 512
    """Features per layer encoded together (memory: windows × T × L × range_size floats)."""
    chunk_windows: PositiveInt = 32


class TopKSettings(TopKCommon):
    """How top-k statistics are collected (features/): the section's keys and fixed ones."""

    quantile_groups: PositiveInt = 4
    per_group: PositiveInt = 5
    logits: PositiveInt = 10


class TopKSection(TopKCommon):
    """The auto-interp config's `topk:` section."""

    source: Literal["heldout", "cache"] = "heldout"
    """`heldout`: the LM over held-out text of the CLT's corpus; `cache`: the CLT inputs read
    from an activation cache (no LM passes; its windows are training text)."""
    cache: str | None = None
    """The cache when `source: cache` (default: the run's data.cache)."""
    tokens: PositiveInt = 65536
    """Tokens searched for examples."""

    def settings(self) -> TopKSettings:
        return TopKSettings(**self.model_dump(include=set(TopKCommon.model_fields)))


class AutoInterpConfig(StrictModel):
    checkpoint: str
    """A training run folder or checkpoint (its config names the model and corpus)."""
    out: str
    """Output folder: features.parquet, explanations.parquet, scores.parquet, llm-cache/."""
    features: FeatureChoice = FeatureChoice(all=True)
    topk: TopKSection = TopKSection()
    explain_examples: PositiveInt = 10
    scorers: list[Literal["detection", "fuzzing"]] = Field(
        default_factory=lambda: ["detection", "fuzzing"])
    score_examples: PositiveInt = 5
    """Activating and non-activating (or mis-highlighted) examples per scorer question."""
    llm: LLMConfig | None = None
    """The endpoint that explains and scores (needed unless the run is top-k only)."""
    actors: PositiveInt = 2
    """Ray actors for the top-k pass and for the LLM calls (each gets llm.concurrency / actors)."""
    cpus_per_actor: PositiveFloat = Field(0.5, le=64)


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
        cls = Config  # type: ignore[assignment]
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


def toy_config(arch: str = "gpt2") -> Config:
    """The tuned settings of examples/toy.yaml (arch "gpt2") and examples/toy-llama.yaml
    ("llama"): what `clt-ray demo` trains (a test keeps the YAML files equal to these)."""
    if arch not in TOY_ARCHS:
        raise ValueError(f"unknown toy architecture {arch!r}; supported: {', '.join(TOY_ARCHS)}")
    return parse_config({"model": {"name": f"toy:{arch}"}, **TOY_TRAIN}, source=f"toy_config({arch!r})")

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
