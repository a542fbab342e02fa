"""Graph scores of a CLT in training (reached by the trainer only through its eval callback)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clt_ray.attribution.graphs import attribute_prompt
from clt_ray.attribution.replacement import load_replacement_model
from clt_ray.config import Config, DataConfig, GraphSettings
from clt_ray.data import heldout_windows
from clt_ray.export import export_clt
from clt_ray.toy import MECHANISMS, mechanism_prompts


class GraphScorer:
    """Replacement and completeness scores of a few fixed prompts' graphs for a CLT in training
    (the whole CLT: one process, or the gathered shards at the end of a Ray run).

    Each call exports the CLT (export.export_clt, so the scores are those of the files a user
    gets) and builds a TransformerLens replacement model around the already loaded LM."""

    def __init__(self, lm: Any, tokenizer: Any, input_hook: str,
                 prompts: Sequence[str | Sequence[int]], settings: GraphSettings) -> None:
        self.lm, self.tokenizer, self.input_hook = lm, tokenizer, input_hook
        self.prompts, self.settings = list(prompts), settings

    def __call__(self, clt: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="clt_ray_graph_eval_") as tmp:
            folder = export_clt(clt, Path(tmp) / "clt", "in-memory", self.input_hook)
            rm = load_replacement_model(folder, backend="transformerlens", hf_model=self.lm,
                                        tokenizer=self.tokenizer,
                                        device=str(next(self.lm.parameters()).device))
            results = [attribute_prompt(rm, p, self.settings) for p in self.prompts]
        rep = [r.replacement for r in results]
        comp = [r.completeness for r in results]
        return {"graph_replacement": sum(rep) / len(rep),
                "graph_completeness": sum(comp) / len(comp),
                "graph_replacement_per_prompt": rep}


def graph_eval_prompts(tokenizer: Any, data: DataConfig, n: int, n_tokens: int = 32
                       ) -> list[str | list[int]]:
    """`n` held-out prompts for graph scores: toy mechanism prompts (each kind in turn) on the
    toy corpus, else the first `n_tokens` tokens of held-out windows."""
    if data.corpus == "toy":
        per_kind = {k: mechanism_prompts(k, n, seed=data.heldout_seed) for k in MECHANISMS}
        return [per_kind[MECHANISMS[i % len(MECHANISMS)]][i // len(MECHANISMS)].text
                for i in range(n)]
    ids, mask = heldout_windows(tokenizer, data, n * n_tokens)
    return [row[:n_tokens][m[:n_tokens].bool()].tolist() for row, m in zip(ids[:n], mask[:n])]


def graph_scorer_for(cfg: Config, lm: Any, tokenizer: Any) -> GraphScorer | None:
    """The run config's GraphScorer (train.graph_prompts > 0), else None."""
    t = cfg.train
    if not t.graph_prompts:
        return None
    prompts = graph_eval_prompts(tokenizer, cfg.data, t.graph_prompts)
    return GraphScorer(lm, tokenizer, cfg.model.input_hook, prompts,
                       GraphSettings(max_feature_nodes=t.graph_max_feature_nodes))
