"""`clt-ray plan`: what a CLT on a given model costs before anything runs — parameters, bytes per
shard, the smallest shard count that fits a GPU, activation-cache bytes, producer and trainer
memory, and (from a measured device profile) tokens/s. Pure arithmetic on the model's shape: no
weights are loaded and no tensors allocated: the built-in shapes below need no download, and
any other model only its config.json.

Where each figure comes from:
- CLT parameters: the shapes of `nn.clt.CrossLayerTranscoder` (docs/design.md §2);
- checkpoint bytes: the tensors `train.checkpoint.save_checkpoint` writes;
- cache bytes: the columns of `cache.block.encode_block` (before zstd);
- step FLOPs: as bench/train_step.py counts them (multiply-add = 2; encoder forward + ∂W_enc,
  decoder forward + ∂W_dec + ∂a);
- activation memory: peak memory of `nn.step.compute_grads` measured on CPU (see ACT_COPIES).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clt_ray.config import (
    HOOK_PAIRS,
    WINDOWS_PER_FILE,
    CLTSection,
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from clt_ray.errors import CltRayError
from clt_ray.lm.arch import arch_of
from clt_ray.lm.loading import TOY_PREFIX, config_dims, model_config
from clt_ray.quant import BITS
from clt_ray.toy.recipe import check_arch, default_recipe
from clt_ray.toy.tokenizer import vocabulary


class PlanError(CltRayError, ValueError):
    """An input the planner cannot use (unknown model, bad size, unreadable profile)."""


# --- the language model's shape ----------------------------------------------------------------


@dataclass(frozen=True)
class LMShape:
    """What the planner needs of a causal LM: its dimensions (config.json field names in the
    comments) and where they came from."""

    name: str
    model_type: str
    n_layers: int  # num_hidden_layers (GPT-2: n_layer)
    d_model: int  # hidden_size (GPT-2: n_embd)
    d_mlp: int  # intermediate_size (GPT-2: n_inner, None = 4·d)
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads (default: n_heads)
    head_dim: int  # head_dim (default: d / n_heads)
    vocab_size: int
    n_ctx: int | None  # max_position_embeddings (GPT-2: n_positions)
    tied_embeddings: bool  # tie_word_embeddings
    source: str

    @property
    def params(self) -> int:
        """Parameter count of the HF CausalLM (tied embeddings counted once): embeddings, per
        layer attention + MLP + norms, final norm, LM head. Exact for the built-in models and the
        toy models (tests/test_plan.py checks it against transformers' own modules)."""
        t, d, f, L = self.model_type, self.d_model, self.d_mlp, self.n_layers
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        if t in ("gpt2", "gpt_neox"):  # biased projections, LayerNorms with bias, plain MLP
            layer = attn + q + 2 * kv + d + 2 * d * f + f + d + 4 * d
            final = 2 * d
        else:  # Llama family: gated MLP, RMSNorms without bias
            layer = attn + 3 * d * f + 2 * d
            if t == "qwen2":
                layer += q + 2 * kv  # q/k/v biases
            if t in ("qwen3", "gemma3_text"):
                layer += 2 * self.head_dim  # q_norm, k_norm
            if t in ("gemma2", "gemma3_text"):
                layer += 2 * d  # pre/post feed-forward norms
            final = d
        embed = self.vocab_size * d
        pos = (self.n_ctx or 0) * d if t == "gpt2" else 0  # learned positions
        return embed + pos + L * layer + final + (0 if self.tied_embeddings else embed)


# Built-in shapes: no download needed. Every figure is from the model's config.json on the
# Hugging Face hub (<name>/config.json). `LMShape.params` of each equals what transformers builds
# from those fields (tests/test_plan.py, on the meta device): GPT-2 124,439,808, Llama-3.2-1B
# 1,235,814,400, Gemma-2-2B 2,614,341,888 (the model cards' totals), Qwen3-1.7B 1,720,574,976
# (its card: "1.7B").
BUILTIN: dict[str, LMShape] = {
    s.name: s for s in (
        LMShape("gpt2", "gpt2", n_layers=12, d_model=768, d_mlp=3072, n_heads=12,
                n_kv_heads=12, head_dim=64, vocab_size=50257, n_ctx=1024,
                tied_embeddings=True, source="built-in shape (openai-community/gpt2 config.json)"),
        LMShape("meta-llama/Llama-3.2-1B", "llama", n_layers=16, d_model=2048, d_mlp=8192,
                n_heads=32, n_kv_heads=8, head_dim=64, vocab_size=128256, n_ctx=131072,
                tied_embeddings=True, source="built-in shape (meta-llama/Llama-3.2-1B config.json)"),
        LMShape("google/gemma-2-2b", "gemma2", n_layers=26, d_model=2304, d_mlp=9216,
                n_heads=8, n_kv_heads=4, head_dim=256, vocab_size=256000, n_ctx=8192,
                tied_embeddings=True, source="built-in shape (google/gemma-2-2b config.json)"),
        LMShape("Qwen/Qwen3-1.7B", "qwen3", n_layers=28, d_model=2048, d_mlp=6144,
                n_heads=16, n_kv_heads=8, head_dim=128, vocab_size=151936, n_ctx=40960,
                tied_embeddings=True, source="built-in shape (Qwen/Qwen3-1.7B config.json)"),
    )
}
ALIASES = {"openai-community/gpt2": "gpt2"}
README_MODELS = tuple(BUILTIN)


def builtin_shape(name: str) -> LMShape | None:
    """The built-in shape of a hub name (case-insensitive; `openai-community/gpt2` = `gpt2`)."""
    key = ALIASES.get(name.lower(), name).lower()
    return next((s for n, s in BUILTIN.items() if n.lower() == key), None)


def shape_from_hf_config(hf_config: Any, name: str, source: str) -> LMShape:
    """An LMShape from an HF config (a multimodal one's text part); unsupported architectures are
    the same error extraction gives."""
    arch_of(hf_config)
    L, d, n_ctx = config_dims(hf_config)
    hf = getattr(hf_config, "text_config", None) or hf_config
    heads = int(hf.num_attention_heads)
    d_mlp = getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None) or 4 * d
    return LMShape(
        name=name, model_type=str(hf.model_type), n_layers=L, d_model=d, d_mlp=int(d_mlp),
        n_heads=heads, n_kv_heads=int(getattr(hf, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(hf, "head_dim", None) or d // heads),
        vocab_size=int(hf.vocab_size), n_ctx=n_ctx,
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)), source=source)


def toy_shape(arch: str) -> LMShape:
    """The toy model's shape from its recipe (as `lm.model_dims` does: nothing is built)."""
    try:
        check_arch(arch)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    r = default_recipe(arch)
    heads = r.n_head
    return LMShape(
        name=f"{TOY_PREFIX}{arch}", model_type=arch, n_layers=r.n_layer, d_model=r.d_model,
        d_mlp=r.d_mlp, n_heads=heads, n_kv_heads=r.n_kv_head or heads, head_dim=r.d_model // heads,
        vocab_size=len(vocabulary()), n_ctx=r.n_ctx, tied_embeddings=arch == "gpt2",
        source="toy recipe (clt_ray.toy.recipe.default_recipe)")


def lm_shape(name: str, revision: str | None = None) -> LMShape:
    """The shape of `toy:<arch>`, a local model folder, a built-in hub name (no download), or any
    other hub name (its config.json only; an unavailable one is one clear error)."""
    if name.startswith(TOY_PREFIX):
        return toy_shape(name[len(TOY_PREFIX):])
    local = Path(name).expanduser()
    if not local.exists() and (shape := builtin_shape(name)) is not None:
        return shape
    path, hf = model_config(name, revision)
    where = f"{path}/config.json" if Path(path).exists() else f"{name} config.json from the hub"
    return shape_from_hf_config(hf, name, where)


# --- sizes -------------------------------------------------------------------------------------

FP32 = 4
COUNTER_BYTES = 8  # tokens_since_fired, int64 per feature and layer
SCALE_BYTES = 2  # cache scales are fp16 (cache.block._scales_column)
TOKEN_ID_BYTES = 4  # cache token ids are int32
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def clt_params(n_layers: int, d_model: int, n_features: int,
               activation: str = "jumprelu") -> dict[str, int]:
    """Parameters of a CrossLayerTranscoder holding `n_features` features of every layer:
    W_enc [L, F, d], W_dec[l] [F, L−l, d] (F·d·L(L+1)/2 in all), b_enc [L, F], log θ [L, F]
    (JumpReLU only), b_dec [L, d] (every shard holds a copy)."""
    L, d, F = n_layers, d_model, n_features
    out = {"W_enc": L * F * d, "W_dec": F * d * L * (L + 1) // 2, "b_enc": L * F,
           "log_threshold": L * F if activation == "jumprelu" else 0,
           "b_dec": L * d}
    out["total"] = sum(out.values())
    return out


def checkpoint_bytes(n_layers: int, d_model: int, n_features: int,
                     activation: str = "jumprelu") -> dict[str, int]:
    """Tensor bytes of a whole-CLT checkpoint (`train.checkpoint.save_checkpoint` with Adam and
    dead-feature counters): fp32 weights, two fp32 Adam moments per weight, int64 counters,
    the norm scales. Safetensors headers (~0.1–1 KB a file), the manifest and the RNG state
    (~5 KB) come on top."""
    p = clt_params(n_layers, d_model, n_features, activation)["total"]
    out = {"weights": FP32 * p, "adam": 2 * FP32 * p,
           "state": COUNTER_BYTES * n_layers * n_features + 2 * FP32 * n_layers}
    out["total"] = sum(out.values())
    return out


def cache_bytes_per_token(n_layers: int, d_model: int, bits: int) -> int:
    """Bytes per token of an activation-cache block before zstd: the int32 token id, and for
    the input and the output hook the packed codes (ceil(d·bits/8) a layer) and one fp16 scale a
    layer (`cache.block.encode_block`). Arrow framing adds ~1 KB a file (≪ 1 byte a token)."""
    if bits not in BITS:
        raise PlanError(f"unsupported bits {bits}; supported: {', '.join(map(str, BITS))}")
    return TOKEN_ID_BYTES + 2 * n_layers * (-(-d_model * bits // 8) + SCALE_BYTES)


def step_flops(n_layers: int, d_model: int, n_features: int, batch: int) -> int:
    """FLOPs of one dense training step (forward + backward) of n_features features a layer, as
    bench/train_step.py counts them: encoder 2·B·L·F·d forward and as much for ∂W_enc; decoder
    2·B·F·d·L(L+1)/2 forward and twice that backward (∂W_dec, ∂a). Element-wise work, the
    losses and Adam count zero."""
    L, d, F, B = n_layers, d_model, n_features, batch
    enc = 2 * B * L * F * d
    dec = 2 * B * F * d * L * (L + 1) // 2
    return 2 * enc + 3 * dec


# --- memory ------------------------------------------------------------------------------------

ACT_COPIES = {"jumprelu": 8, "relu": 8, "topk": 9, "batchtopk": 9}
"""Peak [B, L, F_shard] fp32 tensors alive in one `compute_grads` (pre-activations, activations,
the sparsity and pre-activation terms, their gradients). Measured here as the slope of peak RSS
over the batch size (B 256 vs 1024, L 4, d 64, F 8192, CPU, torch 2.13): jumprelu 6.8, relu 7.0,
batchtopk 8.3, jumprelu under bf16 autocast 5.5 — rounded up. Not yet measured on a GPU."""
BATCH_COPIES = 12
"""[B, L, d] fp32 tensors of a step (raw and normalised x and y, the partial, summed and full
reconstructions, their gradients, the decoder's per-layer outputs)."""
SLACK = 0.10
"""Allocator slack: the CUDA caching allocator rounds blocks up and fragments; 10% on top."""
RESERVED = 1.5e9
"""Device memory no tensor can use: the CUDA context, cuBLAS workspaces, NCCL buffers."""
PROCESS_BASE = 1e9
"""Host memory of a worker process with torch and transformers imported (0.33 GB measured here
without CUDA or Ray; CUDA libraries and the Ray worker add to it)."""
HEADROOM_RULE = (f"a shard fits when (weights + gradients + Adam + autocast copies + counters + "
                 f"activations of a batch [B, L, F/S] ×{ACT_COPIES['jumprelu']} (topk ×"
                 f"{ACT_COPIES['topk']}) + decoder intermediates [B, L, d] ×{BATCH_COPIES}) "
                 f"× {1 + SLACK:.2f} (allocator slack) + {RESERVED / 1e9:.1f} GB (CUDA context, "
                 "cuBLAS, NCCL) ≤ the GPU's memory")


@dataclass(frozen=True)
class ShardMemory:
    """Device bytes of one training shard (features F/S of every layer)."""

    shards: int
    features: int
    params: int
    weights: int
    gradients: int
    adam: int
    autocast_copies: int
    counters: int
    activations: int
    batch: int
    subtotal: int
    total: int
    """subtotal × (1 + SLACK) + RESERVED: what the GPU must have."""


def shard_memory(n_layers: int, d_model: int, n_features: int, shards: int, batch_size: int,
                 activation: str = "jumprelu", precision: str = "float32") -> ShardMemory:
    """One shard's device memory under HEADROOM_RULE. Weights, gradients and Adam moments are
    fp32 (TrainConfig.precision only sets the autocast dtype); bf16/fp16 autocast keeps a 2-byte
    copy of W_enc and W_dec for the backward."""
    if n_features % shards:
        raise PlanError(f"{shards} shards do not divide {n_features} features")
    L, d, B, Fs = n_layers, d_model, batch_size, n_features // shards
    counts = clt_params(L, d, Fs, activation)
    p = counts["total"]
    copies = 0 if precision == "float32" else DTYPE_BYTES[precision] * (counts["W_enc"]
                                                                         + counts["W_dec"])
    parts = {"weights": FP32 * p, "gradients": FP32 * p, "adam": 2 * FP32 * p,
             "autocast_copies": copies, "counters": COUNTER_BYTES * L * Fs,
             "activations": ACT_COPIES[activation] * B * L * Fs * FP32,
             "batch": BATCH_COPIES * B * L * d * FP32}
    subtotal = sum(parts.values())
    return ShardMemory(shards=shards, features=Fs, params=p, **parts, subtotal=subtotal,
                       total=math.ceil(subtotal * (1 + SLACK) + RESERVED))


def divisors(n: int) -> list[int]:
    """Every divisor of n, ascending."""
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted({*small, *(n // k for k in small)})


def smallest_shards(n_layers: int, d_model: int, n_features: int, gpu_bytes: float,
                    batch_size: int, activation: str = "jumprelu",
                    precision: str = "float32") -> ShardMemory | None:
    """The shard with the fewest shards S that fits `gpu_bytes` among those dividing n_features
    (equal shards: actors.shard_trainer.check_shards); None when even one feature a shard does
    not fit (the replicated batch tensors alone are too large: lower the batch size)."""
    for s in divisors(n_features):
        mem = shard_memory(n_layers, d_model, n_features, s, batch_size, activation, precision)
        if mem.total <= gpu_bytes:
            return mem
    return None


def producer_memory(shape: LMShape, lm_dtype: str, windows_per_file: int, context_size: int,
                    bits: int = 8) -> dict[str, int]:
    """One cache producer (`cache.produce`): it runs the LM over a whole file's windows in one
    forward pass (`--windows-per-file`, 64; sized by data.lm_batch_size it read 27% low at GPT-2
    shape, bench/scale.py). On its device the LM's weights, the x/y buffers of that pass (fp32,
    [windows·context, L, d] each) and one layer's intermediates (q/k/v, attention scores as eager
    attention makes them, the MLP's hidden units); in host memory the CPU copies of x and y, one
    fp32 working copy while quantising, and the block."""
    n = windows_per_file * context_size
    L, d, b = shape.n_layers, shape.d_model, DTYPE_BYTES[lm_dtype]
    gated = shape.model_type not in ("gpt2", "gpt_neox")
    hidden = (3 if gated else 2) * shape.d_mlp
    qkv = (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim
    transient = n * (3 * d + qkv + shape.n_heads * shape.head_dim + hidden) * b \
        + shape.n_heads * n * context_size * b
    out = {"weights": shape.params * b, "buffers": 2 * n * L * d * FP32, "forward": transient}
    out["device_total"] = math.ceil(sum(out.values()) * (1 + SLACK) + RESERVED)
    out["host_total"] = math.ceil(PROCESS_BASE + 3 * n * L * d * FP32
                                  + n * cache_bytes_per_token(L, d, bits))
    return out


def trainer_host_memory(n_layers: int, d_model: int, n_features: int, shards: int,
                        lm_params: int, lm_dtype: str, data: DataConfig,
                        train: TrainConfig) -> dict[str, int]:
    """Host memory of one training shard: the process, the held-out activations every shard
    keeps (data.heldout_tokens × x and y, fp32), the initialisation sample
    (train.init_tokens), and checkpoint staging (the largest file, Adam's W_dec_0, copied to
    the CPU: its two moments and one tensor in flight). Rank 0 also streams the data: the
    shuffle buffer (data.shuffle_buffer tokens × x and y in data.dtype) and the LM (for
    held-out data and `data.source: lm`)."""
    L, d, Fs = n_layers, d_model, n_features // shards
    per_token = 2 * L * d * FP32
    staging = 3 * FP32 * Fs * L * d
    each = math.ceil(PROCESS_BASE + (data.heldout_tokens + train.init_tokens) * per_token
                     + staging)
    rank0 = (data.shuffle_buffer * 2 * L * d * DTYPE_BYTES[data.dtype]
             + lm_params * DTYPE_BYTES[lm_dtype])
    return {"each_shard": each, "rank0_extra": rank0, "rank0_total": each + rank0}


# --- a measured device profile -----------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Achieved FLOP/s of the training step on one device, by precision, as measured by
    bench/train_step.py (--json) or bench/gpu.py; optionally the sparse step's speed-up."""

    flop_s: dict[str, float]
    sparse_speedup: float | None = None
    device: str | None = None
    path: str = ""


def _by_precision(value: Any) -> dict[str, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"*": float(value)}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {}


def load_profile(path: str | Path) -> Profile:
    """A profile from a JSON object: the file whole, or its last line that is one (the output of
    `bench/train_step.py --json` as printed). Keys: `achieved_flop_s` (FLOP/s of the step, a
    number or {precision: number}), or `matmul_flop_s` and `flop_ratio_gpt2_dense` (achieved =
    matmul × ratio); optional `sparse_speedup_gpt2` and `device`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    data = None
    for candidate in (text, *reversed(text.strip().splitlines())):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            break
        data = None
    if data is None:
        raise PlanError(f"profile {path} holds no JSON object (whole, or as its last line)")
    flop_s = _by_precision(data.get("achieved_flop_s"))
    if not flop_s and "flop_ratio_gpt2_dense" in data:
        ratio = float(data["flop_ratio_gpt2_dense"])
        flop_s = {k: v * ratio for k, v in _by_precision(data.get("matmul_flop_s")).items()}
    if not flop_s or min(flop_s.values()) <= 0:
        raise PlanError(f"profile {path} has no positive achieved_flop_s (nor matmul_flop_s with "
                        "flop_ratio_gpt2_dense): see bench/train_step.py --json")
    speedup = data.get("sparse_speedup_gpt2")
    return Profile(flop_s, None if speedup is None else float(speedup),
                   None if data.get("device") is None else str(data["device"]), str(path))


def profile_flop_s(profile: Profile, precision: str) -> float:
    """The profile's FLOP/s for this precision (or its one precision-free figure)."""
    for key in (precision, "*"):
        if key in profile.flop_s:
            return profile.flop_s[key]
    raise PlanError(f"profile {profile.path} has FLOP/s for {', '.join(profile.flop_s)}, not "
                    f"{precision}")


# --- the plan ----------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes of "80GB", "80 GB", "141G", "24GiB", "512MB" or a plain number of GB (GB = 10⁹,
    GiB = 2³⁰: nominal GPU sizes read as GB undercount slightly, which errs on the safe side)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b?|b)?\s*", text.lower())
    if not m:
        raise PlanError(f"memory size {text!r} is not a size like 80GB, 24GiB or 141")
    number, unit = float(m.group(1)), (m.group(2) or "g")
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".index(unit[0])
    size = int(number * base**power)
    if size <= 0:
        raise PlanError(f"memory size {text!r} must be positive")
    return size


@dataclass
class Plan:
    """Everything `clt-ray plan` reports (its --json is `asdict` of this)."""

    model: dict[str, Any]
    clt: dict[str, Any]
    train: dict[str, Any]
    checkpoint_bytes: dict[str, int]
    shards: int | None
    per_shard: dict[str, int] | None
    one_shard: dict[str, int]
    headroom_rule: str
    cache_bytes_per_million_tokens: dict[str, int]
    producer: dict[str, Any]
    trainer_host: dict[str, int] | None
    estimate: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def check_width(expansion: float | None, features: int | None) -> None:
    """One error for a width that cannot be (checked before the model is looked up)."""
    if expansion is not None and features is not None:
        raise PlanError("give --expansion or --features, not both")
    if (expansion is not None and not expansion > 0) or (features is not None and features < 1):
        raise PlanError("the width must be positive (--expansion > 0 or --features ≥ 1)")


def resolve_features(d_model: int, expansion: float | None, features: int | None) -> int:
    """F as a run config resolves it (`CLTSection.features_for`: round(expansion · d), default
    expansion 8)."""
    check_width(expansion, features)
    return CLTSection(n_features=features, expansion_factor=expansion).features_for(d_model)


def make_plan(model: str | LMShape, *, expansion: float | None = None,
              features: int | None = None, activation: str = "jumprelu",
              input_hook: str = "hook_resid_mid", precision: str | None = None,
              gpu_memory: str | int = "80GB", batch_size: int | None = None,
              lm_dtype: str | None = None, windows_per_file: int = WINDOWS_PER_FILE,
              context_size: int | None = None, bits: int = 8,
              profile: Profile | str | Path | None = None) -> Plan:
    """The plan for a CLT of this width on `model` (a name for `lm_shape`, or a shape). Defaults
    are the run config's (TrainConfig, DataConfig, ModelConfig); the width defaults to the
    config's expansion factor 8. Every input is checked before the model is looked up."""
    if activation not in ACT_COPIES:
        raise PlanError(f"unknown activation {activation!r} (supported: {', '.join(ACT_COPIES)})")
    if input_hook not in HOOK_PAIRS:
        raise PlanError(f"unknown input hook {input_hook!r} (supported: {', '.join(HOOK_PAIRS)})")
    train_defaults, data_defaults = TrainConfig(), DataConfig()
    precision = precision or train_defaults.precision
    lm_dtype = lm_dtype or ModelConfig().dtype
    for what, value in (("precision", precision), ("LM dtype", lm_dtype)):
        if value not in DTYPE_BYTES:
            raise PlanError(f"unknown {what} {value!r} (supported: {', '.join(DTYPE_BYTES)})")
    check_width(expansion, features)
    for flag, value in (("--batch-size", batch_size), ("--windows-per-file", windows_per_file),
                        ("--context-size", context_size)):
        if value is not None and value < 1:
            raise PlanError(f"{flag} must be at least 1, got {value}")
    B = batch_size or train_defaults.batch_size
    data = data_defaults.model_copy(update={
        "context_size": context_size or data_defaults.context_size})
    gpu = parse_size(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
    prof = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    shape = model if isinstance(model, LMShape) else lm_shape(model)  # the slow part: last
    L, d = shape.n_layers, shape.d_model
    F = resolve_features(d, expansion, features)
    params = clt_params(L, d, F, activation)
    mem = smallest_shards(L, d, F, gpu, B, activation, precision)
    one = shard_memory(L, d, F, 1, B, activation, precision)
    notes = ["hooks do not change the sizes (every hook is d_model wide)",
             "cache bytes are before zstd (`clt-ray cache` prints the bytes/token it achieves)"]
    if mem is None:
        notes.append(f"no shard count fits {gpu / 1e9:.1f} GB even at one feature a shard: "
                     "lower --batch-size")
    plan = Plan(
        model={"name": shape.name, "source": shape.source, "model_type": shape.model_type,
               "n_layers": L, "d_model": d, "d_mlp": shape.d_mlp, "vocab_size": shape.vocab_size,
               "params": shape.params},
        clt={"n_features": F, "expansion": F / d, "features_all_layers": F * L,
             "activation": activation, "input_hook": input_hook,
             "output_hook": HOOK_PAIRS[input_hook], "params": params},
        train={"precision": precision, "batch_size": B, "gpu_memory_bytes": gpu},
        checkpoint_bytes=checkpoint_bytes(L, d, F, activation),
        shards=None if mem is None else mem.shards,
        per_shard=None if mem is None else asdict(mem),
        one_shard=asdict(one),
        headroom_rule=HEADROOM_RULE,
        cache_bytes_per_million_tokens={f"int{b}": cache_bytes_per_token(L, d, b) * 10**6
                                        for b in BITS},
        producer={"lm_dtype": lm_dtype, "windows_per_file": windows_per_file,
                  "context_size": data.context_size,
                  **producer_memory(shape, lm_dtype, windows_per_file, data.context_size, bits)},
        trainer_host=None if mem is None else trainer_host_memory(
            L, d, F, mem.shards, shape.params, lm_dtype, data, train_defaults),
        notes=notes,
    )
    if prof is not None and mem is not None:
        plan.estimate = estimate(prof, L, d, mem.features, B, precision)
    return plan


def estimate(profile: Profile, n_layers: int, d_model: int, shard_features: int, batch_size: int,
             precision: str) -> dict[str, Any]:
    """Tokens/s of the shard group: every shard runs its F/S features' step in parallel at the
    profile's FLOP/s; the all-reduce of [B, L, d] and Adam's update are not counted."""
    flop_s = profile_flop_s(profile, precision)
    flops = step_flops(n_layers, d_model, shard_features, batch_size)
    seconds = flops / flop_s
    out: dict[str, Any] = {"profile": profile.path, "device": profile.device, "flop_s": flop_s,
                           "step_flops": flops, "step_seconds": seconds,
                           "tokens_per_s": batch_size / seconds}
    if profile.sparse_speedup:
        out["sparse_speedup"] = profile.sparse_speedup
        out["tokens_per_s_sparse"] = batch_size / seconds * profile.sparse_speedup
    return out


# --- for people --------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """Decimal units (GB = 10⁹), as GPU memory is quoted."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


WIDTH = 100
LABEL = 13


def _row(label: str, text: str) -> str:
    """One labelled row, wrapped under its text."""
    return textwrap.fill(f"  {label:<{LABEL}}{text}", WIDTH, subsequent_indent=" " * (LABEL + 2))


def format_plan(plan: Plan) -> str:
    """The plan as labelled rows for people."""
    m, c, t, hb, hc = plan.model, plan.clt, plan.train, human_bytes, human_count
    p, ck, gpu = c["params"], plan.checkpoint_bytes, hb(t["gpu_memory_bytes"])
    rows = [
        f"clt-ray plan for {m['name']}  ({m['source']})",
        _row("model", f"{m['model_type']}: {m['n_layers']} layers, d_model {m['d_model']}, "
             f"d_mlp {m['d_mlp']}, vocab {m['vocab_size']:,}, {hc(m['params'])} parameters"),
        _row("CLT", f"{c['n_features']:,} features a layer (expansion {c['expansion']:.4g}), "
             f"{c['activation']}, hooks {c['input_hook']} -> {c['output_hook']}"),
        _row("parameters", f"{hc(p['total'])}: W_enc {hc(p['W_enc'])}, W_dec {hc(p['W_dec'])}, "
             f"biases and thresholds {hc(p['b_enc'] + p['log_threshold'] + p['b_dec'])}"),
        _row("checkpoint", f"{hb(ck['total'])}: weights {hb(ck['weights'])} + Adam moments "
             f"{hb(ck['adam'])} + counters {hb(ck['state'])}"),
        _row("training", f"{t['precision']}, batch {t['batch_size']:,} tokens, GPU {gpu}"),
    ]
    s = plan.per_shard
    if s is None:
        rows.append(_row("shards", f"none fits {gpu}: even one feature a shard is too large "
                         "(lower --batch-size)"))
    else:
        rows.append(_row("shards", f"{plan.shards} (the smallest count dividing "
                         f"{c['n_features']:,} that fits {gpu}; 1 shard needs "
                         f"{hb(plan.one_shard['total'])})"))
        rows.append(_row("per shard", f"{s['features']:,} features a layer, {hc(s['params'])} "
                         f"parameters: weights {hb(s['weights'])} + gradients "
                         f"{hb(s['gradients'])} + Adam {hb(s['adam'])} + autocast copies "
                         f"{hb(s['autocast_copies'])} + counters {hb(s['counters'])} + "
                         f"activations {hb(s['activations'])} + decoder intermediates "
                         f"{hb(s['batch'])} = {hb(s['subtotal'])}; with headroom "
                         f"{hb(s['total'])}"))
    rows.append(_row("headroom", plan.headroom_rule))
    cache = ", ".join(f"{k} {hb(v)}" for k, v in plan.cache_bytes_per_million_tokens.items())
    rows.append(_row("cache", f"per 1M tokens, before zstd: {cache}"))
    pr = plan.producer
    rows.append(_row("producer", f"{pr['lm_dtype']} LM, {pr['windows_per_file']} windows × "
                     f"{pr['context_size']} tokens a pass (a cache file): device {hb(pr['device_total'])} "
                     f"(weights {hb(pr['weights'])}), host {hb(pr['host_total'])}"))
    if (th := plan.trainer_host) is not None:
        rows.append(_row("trainer host", f"{hb(th['each_shard'])} a shard; rank 0 "
                         f"{hb(th['rank0_total'])} (with the shuffle buffer and the LM)"))
    if (e := plan.estimate) is None:
        rows.append(_row("estimate", "tokens/s: pass --profile (the JSON of "
                         "bench/train_step.py --json)"))
    else:
        where = f" on {e['device']}" if e["device"] else ""
        text = (f"{e['tokens_per_s']:,.0f} tokens/s dense{where} ({e['step_seconds'] * 1e3:.1f} "
                f"ms a step at {e['flop_s'] / 1e12:.1f} TFLOP/s; all-reduce and Adam not counted)")
        if "tokens_per_s_sparse" in e:
            text += (f"; {e['tokens_per_s_sparse']:,.0f} with the sparse decoder "
                     f"(×{e['sparse_speedup']:.1f}, as measured at GPT-2 shape)")
        rows.append(_row("estimate", text))
    rows += [_row("note", n) for n in plan.notes]
    return "\n".join(rows)


README_GPUS = ("24GB", "80GB", "141GB")


def readme_table(models: tuple[str, ...] = README_MODELS, expansion: float = 32,
                 gpus: tuple[str, ...] = README_GPUS, batch_size: int | None = None,
                 precision: str | None = None) -> str:
    """The README's Markdown table: for each model at this expansion, the CLT's parameters, its
    checkpoint, the smallest shard count (GPUs) on each GPU size, and cache bytes per token."""
    head = ["model", "L", "d", "F a layer", "CLT params", "checkpoint",
            *(f"shards on {g.replace('GB', ' GB')}" for g in gpus),
            "cache/token int8 · int4 · int2"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        plans = [make_plan(name, expansion=expansion, gpu_memory=g, batch_size=batch_size,
                           precision=precision) for g in gpus]
        p = plans[0]
        L, d = p.model["n_layers"], p.model["d_model"]
        cache = " · ".join(human_bytes(cache_bytes_per_token(L, d, b)) for b in BITS)
        shards = [f"{q.shards} ({human_bytes(q.per_shard['total'])} each)" if q.shards else "—"
                  for q in plans]
        rows.append("| " + " | ".join([
            f"`{name}`", str(L), str(d), f"{p.clt['n_features']:,}",
            human_count(p.clt["params"]["total"]), human_bytes(p.checkpoint_bytes["total"]),
            *shards, cache]) + " |")
    return "\n".join(rows)
