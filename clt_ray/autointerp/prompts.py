"""Prompts for explaining and scoring features, and the parsers of their replies.

Example format (what the explainer sees): each example is one line of text in which every token
where the feature is active is wrapped in `<<` and `>>`, followed by the active tokens with their
activation scaled to 0–9 relative to the feature's maximum:

    Example 3: the crowd sang <<hesk>> gorb <<hesk>> gorb
      activations: "hesk" 9, "hesk" 7

Scorers (after Paulo et al., "Automatically Interpreting Millions of Features in LLMs"):
- detection: given the explanation and a shuffled mix of activating windows and windows where the
  feature never fired (no highlighting), the model lists the numbers of the examples that contain
  the feature;
- fuzzing: given the explanation and activating windows, some highlighted correctly and some with
  the same number of highlights on wrong tokens, the model lists the correctly highlighted ones.
Each prediction is binary; per feature we report accuracy, F1 and AUC (with binary predictions
AUC = (TPR + TNR) / 2, the balanced accuracy).

Replies must hold a line `Explanation: …` (explainer) or `Answer: [1, 4, …]` (scorers); anything
else is malformed (ValueError), which the client retries once and then records as failed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

OPEN, CLOSE = "<<", ">>"
MAX_EXPLANATION_CHARS = 400

EXPLAIN_SYSTEM = (
    "You are studying a neural network. Each feature of it activates on some tokens of text. "
    f"You will see text examples where the tokens the feature is active on are wrapped in {OPEN} "
    f"and {CLOSE}, with activation strengths from 0 to 9. Explain in one short phrase what the "
    "feature detects, as concretely as the examples allow (a word, a pattern, a context). Reply "
    "with exactly one line: `Explanation: <your explanation>`.")
FEW_SHOT_USER = (
    f"Example 1: The capital of Varnia is {OPEN}Tolbek{CLOSE}.\n  activations: \"Tolbek\" 9\n"
    f"Example 2: the people of Ostrel speak {OPEN}Keldric{CLOSE}\n  activations: \"Keldric\" 6")
FEW_SHOT_ASSISTANT = "Explanation: the answer to a question about a country (its capital or language)"

DETECTION_SYSTEM = (
    "A feature of a neural network has this explanation: \"{explanation}\". Below are numbered "
    "text examples. Some contain text the feature would activate on, others do not. Reply with "
    "exactly one line: `Answer: [<numbers of the examples that contain the feature>]`, e.g. "
    "`Answer: [2, 5]` or `Answer: []`.")
FUZZING_SYSTEM = (
    "A feature of a neural network has this explanation: \"{explanation}\". Below are numbered "
    f"text examples with some tokens wrapped in {OPEN} and {CLOSE}. In some examples the wrapped "
    "tokens are exactly where the feature activates; in others they were placed on wrong "
    "tokens. Reply with exactly one line: `Answer: [<numbers of the correctly marked examples>]`.")


def _mark(token: str) -> str:
    """<<token>>, with the token's leading space outside the marks ("the <<cat>>")."""
    word = token.lstrip()
    return f"{token[:len(token) - len(word)]}{OPEN}{word}{CLOSE}"


def _text(tokens: Sequence[str], marked: Sequence[bool] | None = None) -> str:
    if marked is None:
        return "".join(tokens).replace("\n", " ").strip()
    return "".join(_mark(t) if m else t for t, m in zip(tokens, marked)
                   ).replace("\n", " ").strip()


def format_example(n: int, tokens: Sequence[str], acts: Sequence[float], max_act: float) -> str:
    """One explainer example (the format in the module docstring)."""
    marked = [a > 0 for a in acts]
    scale = 9 / max_act if max_act > 0 else 0.0
    strengths = ", ".join(f"{json.dumps(t.strip())} {round(a * scale)}"
                          for t, a in zip(tokens, acts) if a > 0)
    return f"Example {n}: {_text(tokens, marked)}\n  activations: {strengths or 'none'}"


def explanation_messages(row: dict, n_examples: int = 10) -> list[dict]:
    """Chat messages asking for an explanation of a feature row (collect.FEATURE_SCHEMA):
    its top examples, then quantile examples, up to n_examples."""
    examples = (list(row["top_examples"]) + list(row["quantile_examples"]))[:n_examples]
    max_act = row["max_activation"] or 1.0
    body = "\n".join(format_example(i + 1, e["tokens"], e["acts"], max_act)
                     for i, e in enumerate(examples))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": FEW_SHOT_USER},
            {"role": "assistant", "content": FEW_SHOT_ASSISTANT},
            {"role": "user", "content": body}]


def parse_explanation(raw: str) -> str:
    """The text after `Explanation:`; ValueError if missing, empty or too long."""
    m = re.search(r"explanation\s*:\s*(.+)", raw or "", flags=re.IGNORECASE)
    text = m.group(1).strip().strip("`").strip() if m else ""
    if not text or len(text) > MAX_EXPLANATION_CHARS:
        raise ValueError(f"no `Explanation: …` line in the reply {raw[:120]!r}")
    return text


def parse_answer(raw: str, n: int) -> list[int]:
    """The example numbers of `Answer: [..]` (each in 1..n); ValueError if malformed."""
    m = re.search(r"answer\s*:\s*\[([^\]]*)\]", raw or "", flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"no `Answer: [...]` line in the reply {raw[:120]!r}")
    items = [x.strip() for x in m.group(1).split(",") if x.strip()]
    if not all(x.isdigit() and 1 <= int(x) <= n for x in items):
        raise ValueError(f"answer {m.group(0)!r} is not a list of example numbers 1..{n}")
    return sorted({int(x) for x in items})


@dataclass
class ScoringTask:
    """One scorer question: its messages and which example numbers (1-based) are positives."""

    kind: str
    messages: list[dict]
    labels: list[bool]


def detection_task(row: dict, explanation: str, n_each: int = 5, seed: int = 0) -> ScoringTask:
    """Activating windows (quantile examples, else top ones) and quiet windows, shuffled."""
    pos = (list(row["quantile_examples"]) or list(row["top_examples"]))[:n_each]
    neg = list(row["quiet_examples"])[:n_each]
    items = [(e, True) for e in pos] + [(e, False) for e in neg]
    random.Random(f"detection/{row['layer']}/{row['feature']}/{seed}").shuffle(items)
    body = "\n".join(f"Example {i + 1}: {_text(e['tokens'])}" for i, (e, _) in enumerate(items))
    return ScoringTask("detection", [
        {"role": "system", "content": DETECTION_SYSTEM.format(explanation=explanation)},
        {"role": "user", "content": body}], [label for _, label in items])


def fuzzing_task(row: dict, explanation: str, n_each: int = 5, seed: int = 0) -> ScoringTask:
    """Activating windows, half with their true highlights and half with as many highlights
    moved to tokens where the feature is not active."""
    rng = random.Random(f"fuzzing/{row['layer']}/{row['feature']}/{seed}")
    pool = (list(row["quantile_examples"]) + list(row["top_examples"]))[:2 * n_each]
    items = []
    for j, e in enumerate(pool):
        true = [a > 0 for a in e["acts"]]
        wrong = [i for i, on in enumerate(true) if not on]
        if j % 2 == 0 or not wrong:
            items.append((e["tokens"], true, True))
            continue
        chosen = set(rng.sample(wrong, min(len(wrong), max(1, sum(true)))))
        items.append((e["tokens"], [i in chosen for i in range(len(true))], False))
    rng.shuffle(items)
    body = "\n".join(f"Example {i + 1}: {_text(tokens, marked)}"
                     for i, (tokens, marked, _) in enumerate(items))
    return ScoringTask("fuzzing", [
        {"role": "system", "content": FUZZING_SYSTEM.format(explanation=explanation)},
        {"role": "user", "content": body}], [label for *_, label in items])


def score(labels: Sequence[bool], chosen: Sequence[int]) -> dict[str, float]:
    """Accuracy, F1 and AUC (balanced accuracy of binary predictions) of an answer."""
    predicted = [i + 1 in set(chosen) for i in range(len(labels))]
    tp = sum(p and y for p, y in zip(predicted, labels))
    tn = sum(not p and not y for p, y in zip(predicted, labels))
    fp = sum(p and not y for p, y in zip(predicted, labels))
    fn = sum(not p and y for p, y in zip(predicted, labels))
    pos, neg = tp + fn, tn + fp
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    tpr = tp / pos if pos else 1.0
    tnr = tn / neg if neg else 1.0
    return {"accuracy": (tp + tn) / max(1, len(labels)), "f1": f1, "auc": (tpr + tnr) / 2}
