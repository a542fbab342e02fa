"""A run folder for the viewer tests, made by the project's real functions on the toy CLT:
the training run's config and metrics, one attribution graph (`attribute_prompts`) in graphs/,
and autointerp/ with features.parquet (`collect_features`), explanations.parquet and
scores.parquet (the real LLM client against the local fake server)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from llm_server import FakeLLMServer, last_user_message

WINDOW_TOKENS = 2048
"""Held-out tokens searched for top examples (16 windows of 128)."""


def responder(messages: list[dict]) -> str:
    """A deterministic 'LLM': explains a feature by its first highlighted token; answers a scorer
    with the examples that contain that token."""
    from clt_ray.autointerp.prompts import CLOSE, OPEN

    system, body = messages[0]["content"], last_user_message(messages)
    if system.startswith("You are studying"):
        m = re.search(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), body)
        return f"Explanation: the token '{m.group(1).strip() if m else 'none'}'"
    word = re.search(r"the token '(.*?)'", system).group(1)
    hits = [i + 1 for i, line in enumerate(body.splitlines()) if word in line]
    return f"Answer: {hits}"


def build_viewer_run(toy_clt: Path, root: Path, graph_features: bool = True) -> Path:
    """root/run: config.yaml, metrics.jsonl, summary.json, graphs/ and autointerp/."""
    import torch

    from clt_ray.attribution import attribute_prompts
    from clt_ray.autointerp.llm import LLMClient, LLMRequest
    from clt_ray.autointerp.tasks import (
        explanation_requests,
        explanation_rows,
        parser,
        score_rows,
        scoring_requests,
    )
    from clt_ray.config import GraphSettings, LLMConfig, TopKSettings
    from clt_ray.data import heldout_windows
    from clt_ray.features.collect import collect_features, write_features
    from clt_ray.fsutil import atomic_write_parquet
    from clt_ray.lm import load_model
    from clt_ray.toy import mechanism_prompts
    from clt_ray.train.checkpoint import load_checkpoint

    source = toy_clt.parent / "run"
    run = root / "run"
    run.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        if (source / name).is_file():
            shutil.copy(source / name, run / name)

    prompt = mechanism_prompts("induction", 1, seed=3)[0].text
    attribute_prompts(toy_clt, [prompt], run / "graphs", progress=False, example_tokens=1024,
                      settings=GraphSettings(max_feature_nodes=128, max_n_logits=3),
                      log=lambda m: None)

    loaded = load_checkpoint(source)
    cfg = loaded.config
    lm, tokenizer = load_model(cfg.model)
    ids, mask = heldout_windows(tokenizer, cfg.data, WINDOW_TOKENS)
    n = loaded.model.cfg.n_features
    with torch.no_grad():
        rows = collect_features(loaded.model.shard(0, n), lm, tokenizer, ids, mask,
                                cfg.model.input_hook,
                                TopKSettings(k=8, range_size=n, chunk_windows=16))
    out = run / "autointerp"
    write_features(rows, out / "features.parquet", {"checkpoint": str(source)})

    llm = LLMConfig(base_url="http://127.0.0.1:9/v1", model="fake", concurrency=32,
                    timeout_s=5.0, max_retries=1)
    live = [r for r in rows if r["top_examples"]]
    live = live[::max(1, len(live) // 48)]  # a few dozen over every layer: enough to search
    with FakeLLMServer(responder) as server:
        llm = llm.model_copy(update={"base_url": server.url})
        asked = explanation_requests(live, "fake")
        results = LLMClient(llm).run_sync([LLMRequest(q["key"], q["messages"]) for q in asked],
                                          parser("explanation"))
        explained = explanation_rows(asked, results)
        texts = {(r["layer"], r["feature"]): r["explanation"] for r in explained if r["ok"]}
        scored_q = scoring_requests(live, texts, ["detection", "fuzzing"], "fake")
        scored = []
        for name in {q["parser"] for q in scored_q}:  # one parser per answer length
            group = [q for q in scored_q if q["parser"] == name]
            res = LLMClient(llm).run_sync([LLMRequest(q["key"], q["messages"]) for q in group],
                                          parser(name))
            scored += score_rows(group, res)
    atomic_write_parquet(explained, out / "explanations.parquet")
    atomic_write_parquet(scored, out / "scores.parquet")
    return run
