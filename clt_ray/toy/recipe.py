"""`ToyRecipe`: everything that decides a toy model's weights. Its hash names the cache folder."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Literal

from pydantic import model_validator

from clt_ray.config import TOY_ARCHS, StrictModel

TOY_VERSION = 2
"""Bump when the corpus, tokenizer, training or evaluation code changes what a recipe builds."""

ARCHS = TOY_ARCHS
Arch = Literal["gpt2", "llama"]


class Phase(StrictModel):
    """One stage of the training curriculum: until `until` (a share of the steps), train on
    windows of `window` tokens, a share `drills` of them copying drills (`corpus.drill_tokens`)."""

    until: float
    window: int
    drills: float = 0.0


DEFAULT_CURRICULUM = (Phase(until=0.4, window=32, drills=1.0),
                      Phase(until=0.7, window=64, drills=0.3),
                      Phase(until=1.0, window=128, drills=0.2))
"""Short pure drills first (the induction head forms there, around 40-70% of the steps), then
ever longer mixed windows that teach the other mechanisms and every position."""


class ToyRecipe(StrictModel):
    arch: Arch
    n_layer: int = 4
    d_model: int = 96
    n_head: int = 4
    n_kv_head: int | None = None
    """Llama only: key/value heads (grouped-query attention when fewer than `n_head`)."""
    d_mlp: int = 384
    init_std: float = 0.08
    """`initializer_range` of the HF config. HF's 0.02 left attention flat for so long that no
    induction head formed within the budget; 0.08 breaks the plateau within a few hundred steps."""
    n_ctx: int = 128
    span_len: tuple[int, int] = (3, 6)
    """Lengths of the copied (induction) spans."""
    spans: tuple[int, int] = (2, 3)
    """Copied spans per training document (min, max)."""
    chants: tuple[int, int] = (1, 2)
    """Chants per training document (min, max): 2-3 pool words sung 3-5 times in a row."""
    curriculum: tuple[Phase, ...] = DEFAULT_CURRICULUM
    """Training stages; short windows sit at a random offset so every position embedding trains."""
    steps: int = 1800
    batch_size: int = 8
    """Rows of `n_ctx` tokens per step; a shorter window packs proportionally more rows."""
    lr: float = 3e-3
    warmup: int = 60
    """Warm-up steps (capped at `steps`)."""
    decay: float = 0.3
    """Share of the steps, at the end, over which the learning rate decays (cosine, to 10%)."""
    weight_decay: float = 0.05
    seed: int = 0
    threads: int = 2
    """CPU threads while training (part of the recipe: the thread count can change round-off)."""
    eval_prompts: int = 200
    """Held-out prompts per mechanism scored after training (saved in mechanisms.json)."""

    @model_validator(mode="after")
    def _check(self) -> ToyRecipe:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.n_kv_head is not None:
            if self.arch != "llama":
                raise ValueError("n_kv_head is only used by the llama architecture")
            if self.n_head % self.n_kv_head:
                raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        lo, hi = self.span_len
        if not 2 <= lo <= hi:
            raise ValueError(f"span_len {self.span_len} must satisfy 2 <= min <= max")
        for name in ("spans", "chants"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 3:
                raise ValueError(f"{name} {(lo, hi)} must satisfy 0 <= min <= max <= 3")
        if self.n_ctx < 64:
            raise ValueError(f"n_ctx {self.n_ctx} is too short for the corpus (min 64)")
        if not self.curriculum or self.curriculum[-1].until != 1.0:
            raise ValueError("curriculum must be non-empty and its last phase must end at 1.0")
        for before, phase in zip((None, *self.curriculum), self.curriculum):
            if before is not None and phase.until <= before.until:
                raise ValueError("curriculum phases must end in increasing order")
            if not 8 <= phase.window <= self.n_ctx or self.n_ctx % phase.window:
                raise ValueError(f"curriculum window {phase.window} must divide n_ctx {self.n_ctx}"
                                 " and be at least 8")
            if not 0.0 <= phase.drills <= 1.0:
                raise ValueError(f"curriculum drills {phase.drills} must lie in [0, 1]")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay {self.decay} must lie in [0, 1]")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError("steps must be >= 1 and warmup >= 0")
        return self

    def hash(self) -> str:
        """16 hex digits of sha256 over the recipe and TOY_VERSION (stable across key order)."""
        blob = json.dumps({"toy_version": TOY_VERSION, "recipe": self.model_dump(mode="json")},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown toy architecture {arch!r}; supported: {', '.join(ARCHS)}")


SEED_ENV = "CLT_RAY_TOY_SEED"
"""Changes only the default recipes' seed: `CLT_RAY_TOY_SEED=1 make test` runs the suite against
toy models of another build, which checks that no test depends on one build's floats."""


def default_seed() -> int:
    raw = os.environ.get(SEED_ENV, "0")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${SEED_ENV} is {raw!r}, not an integer seed") from None


def default_recipe(arch: str = "gpt2") -> ToyRecipe:
    """The recipe of the demo's and the test suite's toy models (seed: $CLT_RAY_TOY_SEED, else 0)."""
    check_arch(arch)
    if arch == "llama":
        return ToyRecipe(arch="llama", n_kv_head=2, seed=default_seed())
    return ToyRecipe(arch="gpt2", seed=default_seed())
