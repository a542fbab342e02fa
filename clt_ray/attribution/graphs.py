"""One prompt's graph (scores on the full graph, pruning), its frontend JSON, the feature
dashboards of its nodes, and many prompts in one go."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from clt_ray import layout
from clt_ray.attribution.folder import (
    AttributionError,
    Backend,
    CLTFolder,
    feature_scan,
    read_clt_folder,
)
from clt_ray.attribution.replacement import load_replacement_model, token_strings, tokenize
from clt_ray.config import DataConfig, GraphSettings, TopKSettings
from clt_ray.data import heldout_windows
from clt_ray.export import DASHBOARD_DATA_KEYS
from clt_ray.features import dashboards
from clt_ray.features.collect import TokenText, collect_rows, last_call, logit_effects
from clt_ray.features.topk import bin_edges
from clt_ray.fsutil import atomic_write_parquet, atomic_write_text


@dataclass
class GraphResult:
    """One prompt's graph, its scores (on the unpruned graph) and its pruning."""

    prompt: str
    tokens: list[str]
    graph: Any  # circuit_tracer.graph.Graph
    replacement: float
    completeness: float
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    seconds: float

    @functools.cached_property
    def node_influence(self) -> torch.Tensor:
        """Each node's influence on the logits (what pruning ranks by), computed on first use."""
        from circuit_tracer.graph import compute_node_influence

        g = self.graph
        weights = torch.zeros(g.adjacency_matrix.shape[0])
        weights[-len(g.logit_targets):] = g.logit_probabilities.cpu()
        return compute_node_influence(g.adjacency_matrix.cpu(), weights)

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())

    @property
    def n_features(self) -> int:
        return len(self.graph.selected_features)

    def feature_nodes(self) -> list[tuple[int, int, int]]:
        """(layer, position, feature) of every feature node the pruning kept."""
        g = self.graph
        kept = self.node_mask[:self.n_features].nonzero().flatten()
        return [tuple(g.active_features[g.selected_features[i]].tolist()) for i in kept.tolist()]

    def summary(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "tokens": len(self.tokens), "nodes": self.n_nodes,
                "edges": self.n_edges, "features": self.n_features,
                "replacement": self.replacement, "completeness": self.completeness,
                "seconds": self.seconds}


def attribute_prompt(rm: Any, prompt: str | Sequence[int], settings: GraphSettings | None = None,
                     targets: Sequence[Any] | None = None) -> GraphResult:
    """Attribute one prompt; scores come from the full graph, nodes/edges from the pruned one.
    targets: token strings or CustomTargets (`contrast_target`); default: the likeliest logits."""
    from circuit_tracer.attribution.attribute import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph

    s = settings or GraphSettings()
    ids = tokenize(rm, prompt)
    start = time.perf_counter()
    with warnings.catch_warnings():  # circuit-tracer's backward hooks on outputs, by design
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        graph = attribute(ids, rm, attribution_targets=list(targets) if targets else None,
                          max_n_logits=s.max_n_logits, desired_logit_prob=s.desired_logit_prob,
                          batch_size=s.batch_size, max_feature_nodes=s.max_feature_nodes)
    if isinstance(prompt, str):
        graph.input_string = prompt
    replacement, completeness = compute_graph_scores(graph)
    node_mask, edge_mask, _ = prune_graph(graph, s.node_threshold, s.edge_threshold)
    return GraphResult(graph.input_string, token_strings(rm, ids.tolist()), graph, replacement,
                       completeness, node_mask.cpu(), edge_mask.cpu(),
                       time.perf_counter() - start)


def contrast_target(rm: Any, plus: Sequence[str], minus: Sequence[str], name: str = "contrast"
                    ) -> Any:
    """An attribution target for mean logit(plus) − mean logit(minus) (e.g. later years minus
    earlier ones): circuit-tracer's CustomTarget with that unembedding direction."""
    from circuit_tracer.attribution.targets import CustomTarget

    def column(tokens: Sequence[str]) -> torch.Tensor:
        ids = rm.tokenizer.convert_tokens_to_ids(list(tokens))
        if not tokens or any(i is None or i == rm.tokenizer.unk_token_id for i in ids):
            raise AttributionError(f"contrast tokens {list(tokens)} are not all in the vocabulary")
        return rm.unembed_proj[:, ids].float().mean(1)

    return CustomTarget(name, 1.0, (column(plus) - column(minus)).to(rm.unembed_proj.dtype))


def slugify(text: str, index: int) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40].strip("-")
    return f"{index:03d}-{words or 'prompt'}"


def write_graph(result: GraphResult, out_dir: str | os.PathLike[str], slug: str, scan: str,
                settings: GraphSettings | None = None) -> Path:
    """The frontend's graph JSON (`create_graph_files`) at out_dir/<slug>.json and its entry in
    graph-metadata.json, each replaced atomically: a failure leaves the folder as it was."""
    from circuit_tracer.utils.create_graph_files import create_graph_files

    s = settings or GraphSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".graph-") as tmp:
        create_graph_files(result.graph, slug, tmp, scan=scan, node_threshold=s.node_threshold,
                           edge_threshold=s.edge_threshold)
        entry = json.loads((Path(tmp) / layout.GRAPH_METADATA).read_text())["graphs"][0]
        os.replace(Path(tmp) / f"{slug}.json", out_dir / f"{slug}.json")
    meta_path = out_dir / layout.GRAPH_METADATA
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"graphs": []}
    meta["graphs"] = [g for g in meta["graphs"] if g["slug"] != slug] + [
        {**entry, "replacement_score": result.replacement,
         "completeness_score": result.completeness}]
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return out_dir / f"{slug}.json"







def write_feature_dashboards(rm: Any, clt: CLTFolder, features: Sequence[tuple[int, int]],
                             windows: torch.Tensor, valid: torch.Tensor,
                             out_dir: str | os.PathLike[str], progress: bool = False,
                             settings: TopKSettings | None = None) -> int:
    """Feature JSON for each (layer, feature) under out_dir/features/<clt name>/, from the top-k
    statistics (features.collect.collect_rows: the same examples, histogram and logit effects
    as auto-interp's) over `windows` (token ids [N, T], valid [N, T]) through the replacement
    model's own encoder — the activations the graph shows. Returns files written."""
    wanted = set(features)
    if not wanted:
        return 0
    s = settings or TopKSettings()

    def encode(w: torch.Tensor) -> torch.Tensor:  # [W, T, L, F]
        out = []
        for i in w.tolist():
            n = int(valid[i].nonzero().max()) + 1 if valid[i].any() else 1
            _, acts = rm.get_activations(rm.ensure_tokenized(windows[i, :n]))
            acts = acts.float().cpu().permute(1, 0, 2)  # [n, L, F]
            full = acts.new_zeros(windows.shape[1], *acts.shape[1:])
            full[:n] = acts
            out.append(full)
        return torch.stack(out)

    acts_of = last_call(encode)

    def decoder_rows(layer: int, a: int, b: int) -> torch.Tensor:
        with safe_open(str(clt.path / f"W_dec_{layer}.safetensors"), "pt") as f:
            return f.get_slice(f"W_dec_{layer}")[a:b].float()

    text = TokenText(rm.tokenizer)
    unembed = rm.unembed_proj.detach().float().cpu()  # [d, V]
    size = s.range_size  # only the ranges that hold a wanted feature
    ranges = sorted({(f // size * size, f // size * size + size) for _, f in wanted})
    ranges = [(a, min(b, clt.n_features)) for a, b in ranges]
    chunks = [(c, min(c + s.chunk_windows, len(windows)))
              for c in range(0, len(windows), s.chunk_windows)]
    rows = collect_rows(
        lambda w, a, b: acts_of(w)[..., a:b],
        lambda a, b: logit_effects(decoder_rows, clt.n_layers, unembed, text, a, b, s.logits),
        windows, valid, ranges, chunks, text, s, progress)
    folder = Path(out_dir) / layout.FEATURE_DASHBOARDS / clt.name
    edges = bin_edges().tolist()
    for row in rows:
        if (row["layer"], row["feature"]) in wanted:
            dashboards.write_feature_json(folder, dashboards.feature_json(row, clt.name, edges))
    return len(wanted)




def example_windows(rm: Any, clt: CLTFolder, corpus: str | None, n_tokens: int
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Held-out windows (ids, valid) for feature examples: of `corpus` if given, else of the
    corpus the CLT was trained on (recorded by `clt-ray export`), else None (no examples)."""
    stored = dict(clt.config.get("clt_ray", {}).get("data") or {})
    if corpus is None and not stored:
        return None
    data = DataConfig(**{k: stored[k] for k in DASHBOARD_DATA_KEYS if k in stored},
                      **({"corpus": corpus} if corpus else {}))
    ids, mask = heldout_windows(rm.tokenizer, data, n_tokens)
    valid = mask.bool()
    valid[:, 0] = False  # BOS: circuit-tracer zeroes it too
    return ids, valid


def attribute_prompts(
    clt: str | os.PathLike[str],
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    backend: Backend = "auto",
    settings: GraphSettings | None = None,
    device: str = "cpu",
    corpus: str | None = None,
    example_tokens: int = 16384,
    progress: bool = True,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Graphs of many prompts with the model loaded once, into out_dir (the frontend's data
    folder): <slug>.json per prompt, graph-metadata.json, features/<clt name>/<index>.json for
    every feature of every pruned graph, and graphs.parquet (one row per prompt). Every prompt
    is checked before the first graph is computed."""
    from tqdm import tqdm

    settings = settings or GraphSettings()
    folder = read_clt_folder(clt)
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise AttributionError("no prompts given")
    rm = load_replacement_model(folder, model, backend=backend, device=device)
    for p in prompts:
        tokenize(rm, p)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir)
    scan = feature_scan(folder)
    rows, features = [], set()
    for i, prompt in enumerate(tqdm(prompts, desc="graphs", unit="graph", disable=not progress)):
        result = attribute_prompt(rm, prompt, settings)
        slug = slugify(prompt, i)
        write_graph(result, out_dir, slug, scan, settings)
        features.update((layer, f) for layer, _, f in result.feature_nodes())
        rows.append({"slug": slug, **result.summary()})
    atomic_write_parquet(rows, out_dir / layout.GRAPH_SUMMARY)  # one row per graph
    windows = example_windows(rm, folder, corpus, example_tokens)
    if windows is None:
        log("no corpus for feature examples (pass --corpus): dashboards show logit effects only")
        windows = (torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool))
    write_feature_dashboards(rm, folder, sorted(features), *windows, out_dir, progress=progress)
    return rows




def remove_stale(out_dir: Path) -> None:
    """Leftover temporary folders of an interrupted run."""
    for p in out_dir.glob(".graph-*"):
        shutil.rmtree(p, ignore_errors=True)
