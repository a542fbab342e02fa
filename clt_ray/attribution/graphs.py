"""One prompt's graph (its logit targets, scores on the full graph, pruning), its frontend JSON,
and the feature dashboards of graph nodes."""

from __future__ import annotations

import functools
import json
import os
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
from clt_ray.attribution.folder import AttributionError, CLTFolder
from clt_ray.attribution.replacement import token_strings, tokenize
from clt_ray.config import DataConfig, GraphSettings, TopKSettings
from clt_ray.data import heldout_windows
from clt_ray.export import DASHBOARD_DATA_KEYS
from clt_ray.features import dashboards
from clt_ray.features.collect import TokenText, collect_rows, last_call, logit_effects
from clt_ray.features.topk import bin_edges


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
    batch = source_batch(rm, ids, s)
    with warnings.catch_warnings():  # circuit-tracer's backward hooks on outputs, by design
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        graph = attribute(ids, rm, attribution_targets=list(targets) if targets else None,
                          max_n_logits=s.max_n_logits, desired_logit_prob=s.desired_logit_prob,
                          batch_size=batch, max_feature_nodes=s.max_feature_nodes)
    if isinstance(prompt, str):
        graph.input_string = prompt
    replacement, completeness = compute_graph_scores(graph)
    node_mask, edge_mask, _ = prune_graph(graph, s.node_threshold, s.edge_threshold)
    return GraphResult(graph.input_string, token_strings(rm, ids.tolist()), graph, replacement,
                       completeness, node_mask.cpu(), edge_mask.cpu(),
                       time.perf_counter() - start)


def source_batch(rm: Any, ids: torch.Tensor, s: GraphSettings) -> int:
    """Source nodes per backward pass for this prompt: s.batch_size, lowered so that the
    gradients circuit-tracer's hook gathers ([batch, active features, d] fp32, and a copy in its
    einsum) fit s.gather_bytes. One forward pass counts the prompt's active features."""
    _, acts = rm.get_activations(ids, sparse=True)
    active = max(1, int(acts._nnz()))
    per_source = 2 * active * int(rm.transcoders.d_model) * 4
    return max(1, min(s.batch_size, s.gather_bytes // per_source))


def contrast_target(rm: Any, plus: Sequence[str], minus: Sequence[str], name: str = "contrast"
                    ) -> Any:
    """An attribution target for mean logit(plus) − mean logit(minus) (e.g. later years minus
    earlier ones), `plus`/`minus` vocabulary token strings: circuit-tracer's CustomTarget with
    that unembedding direction."""
    def ids(tokens: Sequence[str]) -> list[int]:
        found = rm.tokenizer.convert_tokens_to_ids(list(tokens))
        if not tokens or any(i is None or i == rm.tokenizer.unk_token_id for i in found):
            raise AttributionError(f"contrast tokens {list(tokens)} are not all in the vocabulary")
        return found

    return _contrast(rm, ids(plus), ids(minus), name)


def _contrast(rm: Any, plus: list[int], minus: list[int], name: str) -> Any:
    from circuit_tracer.attribution.targets import CustomTarget

    direction = rm.unembed_proj[:, plus].float().mean(1) - rm.unembed_proj[:, minus].float().mean(1)
    return CustomTarget(name, 1.0, direction.to(rm.unembed_proj.dtype))


def logit_targets(rm: Any, target: Sequence[str] = (), contrast: Sequence[str] = ()
                  ) -> list[Any] | None:
    """The attribution targets of a prompt: None (the likeliest logits), the logits of `target`
    tokens, or with `contrast` one target, mean logit(target) − mean logit(contrast). Each string
    must be one token as the tokenizer encodes it (" Paris" with its space for GPT-2)."""
    if not target:
        if contrast:
            raise AttributionError("a contrast needs a target")
        return None
    ids = [_one_token(rm, t) for t in target]
    if not contrast:
        return list(target)
    minus = [_one_token(rm, t) for t in contrast]
    return [_contrast(rm, ids, minus, f"{'+'.join(target)} − {'+'.join(contrast)}")]


def _one_token(rm: Any, text: str) -> int:
    ids = rm.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise AttributionError(f"target {text!r} is {len(ids)} tokens, not one")
    if ids[0] == rm.tokenizer.unk_token_id:
        raise AttributionError(f"target {text!r} is not in the vocabulary")
    return int(ids[0])


def graph_json(result: GraphResult, slug: str, scan: str, settings: GraphSettings | None = None
               ) -> dict[str, Any]:
    """The frontend's graph JSON of a result (circuit-tracer's `create_graph_files`, which
    prunes with the same thresholds), as a dict: nodes, links, metadata, qParams."""
    from circuit_tracer.utils.create_graph_files import create_graph_files

    s = settings or GraphSettings()
    with tempfile.TemporaryDirectory(prefix="clt_ray_graph_") as tmp:
        create_graph_files(result.graph, slug, tmp, scan=scan, node_threshold=s.node_threshold,
                           edge_threshold=s.edge_threshold)
        return json.loads((Path(tmp) / f"{slug}.json").read_text())


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

    def encode(w: torch.Tensor, a: int = 0, b: int | None = None) -> torch.Tensor:
        """[W, T, L, b − a]: each window's activations of features [a, b), sliced as it is made
        (all F of ~150 windows at GPT-2 shape, expansion 8, were 5.7 GB, twice over)."""
        out = []
        for i in w.tolist():
            n = int(valid[i].nonzero().max()) + 1 if valid[i].any() else 1
            _, acts = rm.get_activations(rm.ensure_tokenized(windows[i, :n]))
            acts = acts[..., a:b].float().cpu().permute(1, 0, 2)  # [n, L, b − a]
            full = acts.new_zeros(windows.shape[1], *acts.shape[1:])
            full[:n] = acts
            out.append(full)
        return torch.stack(out)

    chunk_acts = last_call(encode)  # pass 1: every range of a chunk reads one encoding

    def acts_of(w: torch.Tensor, a: int, b: int) -> torch.Tensor:
        if len(w) <= s.chunk_windows:
            return chunk_acts(w)[..., a:b]
        return encode(w, a, b)  # pass 2: a range's example windows, only its features

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
        acts_of,
        lambda a, b: logit_effects(decoder_rows, clt.n_layers, unembed, text, a, b, s.logits),
        windows, valid, ranges, chunks, text, s, progress,
        keep=lambda layer, feature: (layer, feature) in wanted)  # not the ranges' thousands
    folder = Path(out_dir) / layout.FEATURE_DASHBOARDS / clt.name
    edges = bin_edges().tolist()
    for row in rows:
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
