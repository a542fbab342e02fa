"""clt_ray.autointerp.prompts: example format, reply parsers, scorer tasks and scores."""

from __future__ import annotations

import pytest

from clt_ray.autointerp.prompts import (
    CLOSE,
    OPEN,
    detection_task,
    explanation_messages,
    format_example,
    fuzzing_task,
    parse_answer,
    parse_explanation,
    score,
)


def example(tokens, acts, window=0):
    return {"window": window, "position": 0, "peak": max(acts), "group": 0,
            "tokens": tokens, "acts": acts}


ROW = {
    "layer": 1, "feature": 7, "max_activation": 4.0,
    "top_examples": [example([" the", " cat", " sat"], [0.0, 4.0, 0.0], 1)],
    "quantile_examples": [example([" a", " cat", " ran", " cat"], [0.0, 2.0, 0.0, 1.0], w)
                          for w in range(2, 8)],
    "quiet_examples": [example([" the", " dog", " ran"], [0.0, 0.0, 0.0], w)
                       for w in range(10, 16)],
}


def test_format_marks_active_tokens_and_scales_to_nine():
    text = format_example(3, [" the", " cat", " sat"], [0.0, 4.0, 2.0], 4.0)
    assert text.splitlines()[0] == f"Example 3: the {OPEN}cat{CLOSE} {OPEN}sat{CLOSE}"
    assert text.splitlines()[1] == '  activations: "cat" 9, "sat" 4'


def test_explanation_messages_hold_the_top_example_first():
    messages = explanation_messages(ROW, n_examples=3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    body = messages[-1]["content"]
    assert body.startswith(f"Example 1: the {OPEN}cat{CLOSE} sat") and "Example 3:" in body
    assert "Example 4:" not in body


@pytest.mark.parametrize("raw, expected", [
    ("Explanation: cats", "cats"), ("Sure!\nexplanation:  `the word cat` ", "the word cat")])
def test_parse_explanation(raw, expected):
    assert parse_explanation(raw) == expected


@pytest.mark.parametrize("raw", ["", "cats", "Explanation:   ", "Explanation: " + "x" * 500])
def test_malformed_explanations(raw):
    with pytest.raises(ValueError):
        parse_explanation(raw)


def test_parse_answer():
    assert parse_answer("Answer: [3, 1, 3]", 4) == [1, 3]
    assert parse_answer("answer: []", 4) == []
    for bad in ("Answer: 1, 2", "Answer: [0]", "Answer: [5]", "Answer: [a]"):
        with pytest.raises(ValueError):
            parse_answer(bad, 4)


def test_detection_task_mixes_activating_and_quiet_windows():
    task = detection_task(ROW, "the word cat", n_each=5)
    assert sum(task.labels) == 5 and len(task.labels) == 10
    lines = task.messages[1]["content"].splitlines()
    for line, label in zip(lines, task.labels):
        assert ("cat" in line) == label and OPEN not in line
    assert "the word cat" in task.messages[0]["content"]
    assert detection_task(ROW, "x").labels == task.labels  # deterministic


def test_fuzzing_task_moves_highlights_off_active_tokens():
    task = fuzzing_task(ROW, "the word cat", n_each=3)
    lines = task.messages[1]["content"].splitlines()
    assert len(lines) == 6 and 0 < sum(task.labels) < 6
    for line, correct in zip(lines, task.labels):
        marked = [part.split(CLOSE)[0] for part in line.split(OPEN)[1:]]
        assert all(m == "cat" for m in marked) == correct and marked


def test_scores():
    labels = [True, True, False, False]
    assert score(labels, [1, 2]) == {"accuracy": 1.0, "f1": 1.0, "auc": 1.0}
    assert score(labels, [1, 3]) == {"accuracy": 0.5, "f1": 0.5, "auc": 0.5}
    assert score(labels, []) == {"accuracy": 0.5, "f1": 0.0, "auc": 0.5}
