"""The prompts of a graph run: one prompt each with its optional logit targets, read from a text
file (a line each), JSON Lines or Parquet (a `prompt` column, optional `target` and `contrast`),
keyed by a hash of what defines the graph so that a rerun knows which graphs it already has."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clt_ray.attribution.folder import AttributionError


@dataclass(frozen=True)
class PromptSpec:
    """One graph to make. target: token strings whose logits are the attribution targets (each
    one token; default: the likeliest logits). contrast: with target, the one target is mean
    logit(target) − mean logit(contrast) instead."""

    prompt: str
    target: tuple[str, ...] = ()
    contrast: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Stable across runs and machines: what defines the graph, hashed."""
        raw = json.dumps([self.prompt, list(self.target), list(self.contrast)])
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    @property
    def slug(self) -> str:
        """The graph's file name and frontend slug: readable words and the key (letters, digits
        and hyphens only, as Neuronpedia requires)."""
        words = re.sub(r"[^A-Za-z0-9]+", "-", self.prompt).strip("-").lower()[:40].strip("-")
        return f"{words or 'prompt'}-{self.key[:8]}"


def _tokens(value: Any, what: str, where: str) -> tuple[str, ...]:
    """A target/contrast cell: nothing, one token string or a list of them."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise AttributionError(f"{where}: {what} must be a token string or a list of them, "
                           f"not {value!r}")


def spec_of(row: dict[str, Any], where: str) -> PromptSpec:
    """A PromptSpec from a record with `prompt` and optional `target` / `contrast`."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise AttributionError(f"{where}: needs a string `prompt`, got {prompt!r}")
    unknown = set(row) - {"prompt", "target", "contrast"}
    if unknown:
        raise AttributionError(f"{where}: unknown field(s) {sorted(unknown)} (expected prompt, "
                               "target, contrast)")
    target = _tokens(row.get("target"), "target", where)
    contrast = _tokens(row.get("contrast"), "contrast", where)
    if contrast and not target:
        raise AttributionError(f"{where}: a contrast needs a target (the graph's target is "
                               "logit(target) − logit(contrast))")
    return PromptSpec(prompt, target, contrast)


def read_prompts(path: str | os.PathLike[str]) -> list[PromptSpec]:
    """Prompts of a .txt (a non-empty line each), .jsonl or .parquet file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise AttributionError(f"{path}: not a readable Parquet file ({exc})") from None
        return [spec_of(r, f"{path} row {i}") for i, r in enumerate(rows)]
    text = path.read_text()
    if suffix == ".jsonl":
        specs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AttributionError(f"{path} line {n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise AttributionError(f"{path} line {n}: expected an object with a prompt")
            specs.append(spec_of(row, f"{path} line {n}"))
        return specs
    return [PromptSpec(line) for line in text.splitlines() if line.strip()]


def unique_specs(prompts: Iterable[str | PromptSpec]) -> list[PromptSpec]:
    """PromptSpecs of plain strings and specs, blank prompts dropped, each graph once (first
    occurrence's order)."""
    seen: dict[str, PromptSpec] = {}
    for p in prompts:
        spec = p if isinstance(p, PromptSpec) else PromptSpec(p)
        if spec.prompt.strip():
            seen.setdefault(spec.key, spec)
    return list(seen.values())


def specs_summary(specs: Sequence[PromptSpec]) -> str:
    targeted = sum(bool(s.target) for s in specs)
    return f"{len(specs)} prompts" + (f" ({targeted} with logit targets)" if targeted else "")
