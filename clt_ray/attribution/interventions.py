"""Setting feature activations and reading the next-token logits before and after."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clt_ray.attribution.folder import AttributionError
from clt_ray.attribution.replacement import tokenize

Intervention = tuple[int, int, int, float]
"""(layer, position, feature, value): set that feature's activation there (0: ablate)."""


@dataclass
class InterventionResult:
    prompt: str
    target: str
    target_logit_before: float
    target_logit_after: float
    top_before: list[tuple[str, float]]
    top_after: list[tuple[str, float]]

    @property
    def delta(self) -> float:
        return self.target_logit_after - self.target_logit_before


def parse_intervention(spec: str) -> Intervention:
    """`LAYER:POSITION:FEATURE=VALUE` (position may be negative: -1 is the last token)."""
    m = re.fullmatch(r"\s*(\d+):(-?\d+):(\d+)=(\S+)\s*", spec)
    try:
        value = float(m.group(4)) if m else float("nan")
    except ValueError:
        value = float("nan")
    if not m or math.isnan(value):
        raise AttributionError(f"intervention {spec!r} is not LAYER:POSITION:FEATURE=VALUE "
                               "(e.g. 2:-1:113=0)")
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), value


def intervene(rm: Any, prompt: str, interventions: Sequence[Intervention],
              target: str | None = None, top_k: int = 5, freeze_attention: bool = True
              ) -> InterventionResult:
    """Next-token logits at the last position before and after setting features
    (`feature_intervention`). target: the token whose logit is followed (default: the top one)."""
    ids = tokenize(rm, prompt)
    n_layers, n_features = rm.transcoders.n_layers, rm.transcoders.d_transcoder
    checked = []
    for layer, pos, feature, value in interventions:
        p = pos + len(ids) if pos < 0 else pos
        if not (0 <= layer < n_layers and 0 <= p < len(ids) and 0 <= feature < n_features):
            raise AttributionError(
                f"intervention ({layer}, {pos}, {feature}) is outside the CLT and prompt: layers "
                f"0..{n_layers - 1}, positions 0..{len(ids) - 1}, features 0..{n_features - 1}")
        checked.append((layer, p, feature, float(value)))
    before, _ = rm.feature_intervention(ids, [], freeze_attention=freeze_attention,
                                        return_activations=False)
    after, _ = rm.feature_intervention(ids, checked, freeze_attention=freeze_attention,
                                       return_activations=False)
    before, after = before[0, -1].float().cpu(), after[0, -1].float().cpu()
    if target is None:
        target_id = int(before.argmax())
    else:
        target_ids = rm.tokenizer(target, add_special_tokens=False).input_ids
        if len(target_ids) != 1:
            raise AttributionError(f"target {target!r} is {len(target_ids)} tokens, not one")
        target_id = target_ids[0]

    def top(logits: torch.Tensor) -> list[tuple[str, float]]:
        probs = logits.softmax(-1)
        values, idx = probs.topk(top_k)
        return [(rm.tokenizer.decode([int(i)]), float(v)) for i, v in zip(idx, values)]

    return InterventionResult(prompt, rm.tokenizer.decode([target_id]), float(before[target_id]),
                              float(after[target_id]), top(before), top(after))
