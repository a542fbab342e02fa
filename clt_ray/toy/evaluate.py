"""Score a (toy) model on held-out mechanism prompts: did it really learn each mechanism?"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clt_ray.toy.corpus import MECHANISMS, MechanismPrompt, mechanism_prompts

EVAL_SEED = 1000
"""Seed of the held-out prompts scored at build time (any seed gives held-out prompts)."""

THRESHOLDS = {"induction/top1": 0.9, "facts/top1": 0.9, "agreement/top1": 0.9,
              "greater_than/prob": 0.8}
"""What a toy model must reach on held-out prompts to count as having learned its mechanisms."""


@torch.no_grad()
def next_token_probs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(len(texts), vocab) next-token probabilities after each text (right padding, <bos> added)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        last = enc["attention_mask"].sum(1) - 1
        out.append(logits[torch.arange(len(last)), last].float().softmax(-1))
    return torch.cat(out)


def score_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  prompts: list[MechanismPrompt]) -> dict[str, float]:
    """top1: the most likely next token is a target; prob: probability summed over the targets."""
    if tokenizer.padding_side != "right":
        raise ValueError("score_prompts needs a right-padding tokenizer")
    probs = next_token_probs(model, tokenizer, [p.text for p in prompts])
    top = probs.argmax(-1)
    top1, mass = [], []
    for p, row, best in zip(prompts, probs, top):
        ids = torch.tensor(tokenizer.convert_tokens_to_ids(p.targets))
        top1.append(float(best in ids))
        mass.append(row[ids].sum().item())
    return {"top1": sum(top1) / len(top1), "prob": sum(mass) / len(mass)}


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int = 200,
             seed: int = EVAL_SEED) -> dict[str, float]:
    """{"<mechanism>/top1": …, "<mechanism>/prob": …} over `n` held-out prompts per mechanism."""
    was_training = model.training
    model.eval()
    scores = {}
    for kind in MECHANISMS:
        for name, value in score_prompts(model, tokenizer, mechanism_prompts(kind, n, seed)).items():
            scores[f"{kind}/{name}"] = round(value, 4)
    model.train(was_training)
    return scores


def failed_thresholds(scores: dict[str, float]) -> list[str]:
    """The THRESHOLDS a score dict misses, as readable strings (empty when all hold)."""
    return [f"{key} = {scores.get(key, float('nan')):.3f} < {bound}"
            for key, bound in THRESHOLDS.items() if not scores.get(key, 0.0) >= bound]
