"""From feature rows to LLM requests and back to result tables (no Ray, no HTTP).

A request is a plain dict — key, messages, parser and the feature it is about — that the Ray
Data actor pool (actors/autointerp.call_on_ray) sends and the tables are built back from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from clt_ray.autointerp.llm import LLMResult, request_key
from clt_ray.autointerp.prompts import (
    detection_task,
    explanation_messages,
    fuzzing_task,
    parse_answer,
    parse_explanation,
    score,
)

SCORERS: dict[str, Callable[..., Any]] = {"detection": detection_task, "fuzzing": fuzzing_task}


def parser(name: str) -> Callable[[str], Any]:
    """`explanation` or `answer:<n examples>` → the parse function the client applies."""
    if name == "explanation":
        return parse_explanation
    if name.startswith("answer:"):
        n = int(name.split(":", 1)[1])
        return lambda raw: parse_answer(raw, n)
    raise ValueError(f"unknown parser {name!r}")


def explanation_requests(rows: Sequence[dict], model: str, n_examples: int = 10) -> list[dict]:
    """One request per feature that fired (a feature never seen active has nothing to explain)."""
    out = []
    for r in rows:
        if not r["top_examples"]:
            continue
        messages = explanation_messages(r, n_examples)
        out.append({"key": request_key(f"explain/{r['layer']}/{r['feature']}", messages, model),
                    "messages": messages, "parser": "explanation", "layer": r["layer"],
                    "feature": r["feature"], "task": "explain", "labels": []})
    return out


def scoring_requests(rows: Sequence[dict], explanations: dict[tuple[int, int], str],
                     scorers: Sequence[str], model: str, n_each: int = 5) -> list[dict]:
    """One request per (explained feature, scorer) that has examples of both kinds."""
    out = []
    for r in rows:
        explanation = explanations.get((r["layer"], r["feature"]))
        if explanation is None:
            continue
        for name in scorers:
            task = SCORERS[name](r, explanation, n_each)
            if all(task.labels) or not any(task.labels):
                continue  # nothing to tell apart (e.g. a feature that fires everywhere)
            key = request_key(f"{name}/{r['layer']}/{r['feature']}", task.messages, model)
            out.append({"key": key, "messages": task.messages,
                        "parser": f"answer:{len(task.labels)}", "layer": r["layer"],
                        "feature": r["feature"], "task": name, "labels": task.labels})
    return out


def _result_columns(res: LLMResult) -> dict[str, Any]:
    return {"ok": res.ok, "error": res.error, "raw": None if res.ok else res.raw,
            "attempts": res.attempts, "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens, "cost_usd": res.cost_usd}


def explanation_rows(requests: Sequence[dict], results: Sequence[LLMResult]) -> list[dict]:
    """One row per feature: its explanation, or a recorded failure with the raw reply."""
    return [{"layer": q["layer"], "feature": q["feature"],
             "explanation": res.text if res.ok else None, **_result_columns(res)}
            for q, res in zip(requests, results) if q["task"] == "explain"]


def score_rows(requests: Sequence[dict], results: Sequence[LLMResult]) -> list[dict]:
    """One row per (feature, scorer): accuracy, F1 and AUC, or a recorded failure."""
    rows = []
    for q, res in zip(requests, results):
        if q["task"] == "explain":
            continue
        metrics = (score(q["labels"], json.loads(res.text) if isinstance(res.text, str)
                         else res.text) if res.ok else
                   {"accuracy": None, "f1": None, "auc": None})
        rows.append({"layer": q["layer"], "feature": q["feature"], "scorer": q["task"],
                     "n_examples": len(q["labels"]), **metrics, **_result_columns(res)})
    return rows
