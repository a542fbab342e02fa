"""Attribution graphs with circuit-tracer (DESIGN.md §5): a replacement model from a local or hub LM
plus an exported CLT, graphs with a node cap, pruning, replacement and completeness scores, the
graph and feature JSON its frontend reads, and feature interventions.

    rm = load_replacement_model("runs/x/clt")                # LM named in the CLT's config.yaml
    result = attribute_prompt(rm, "The capital of Varnia is")
    result.replacement, result.completeness, result.n_nodes
    write_graph(result, out_dir, "varnia")                   # out_dir/varnia.json + metadata
    intervene(rm, prompt, [(layer, position, feature, 0.0)])

Backends: nnsight (circuit-tracer's own mapping) for the architectures it registers — Llama,
Gemma 2/3, Qwen 3, GPT-OSS — from hub names or local folders; TransformerLens for the others
(GPT-2, Mistral, Qwen 2, NeoX), built from the local folder by `models.tl.load_hooked_transformer`
because TL's `from_pretrained` takes only official names. Both give the same graph where both
apply (tested on the toy Llama). Everything that can be checked before loading weights is: the
CLT folder, the model's availability, layers and width, the prompt length.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, PositiveInt
from safetensors import safe_open

from clt_ray.config import CltRayError, StrictModel
from clt_ray.fsutil import atomic_write_parquet, atomic_write_text

Backend = Literal["auto", "transformerlens", "nnsight"]
BACKENDS: tuple[str, ...] = ("auto", "transformerlens", "nnsight")
SUMMARY_FILE = "graphs.parquet"
METADATA_FILE = "graph-metadata.json"


class AttributionError(CltRayError, ValueError):
    """Bad input to attribution: a CLT that does not fit the model, a prompt too long, ..."""


class GraphSettings(StrictModel):
    """How graphs are computed and pruned (circuit-tracer's `attribute` / `prune_graph`)."""

    max_feature_nodes: PositiveInt = 4096
    """Always set: the adjacency matrix is dense, so memory grows with nodes²."""
    max_n_logits: PositiveInt = 10
    desired_logit_prob: float = Field(0.95, gt=0, le=1)
    batch_size: PositiveInt = 256
    """Source nodes per backward pass."""
    node_threshold: float = Field(0.8, ge=0, le=1)
    edge_threshold: float = Field(0.98, ge=0, le=1)


# --- the CLT folder and the model --------------------------------------------------------------


@dataclass(frozen=True)
class CLTFolder:
    """What an exported CLT folder (export.export_clt) says about itself, read without weights."""

    path: Path
    n_layers: int
    d_model: int
    n_features: int
    model_name: str
    input_hook: str
    output_hook: str
    scan: str | None
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name


def read_clt_folder(path: str | os.PathLike[str]) -> CLTFolder:
    path = Path(path).expanduser().resolve()
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise AttributionError(f"{path}: not an exported CLT folder (no config.yaml); make one "
                               "with `clt-ray export CHECKPOINT OUT`")
    config = yaml.safe_load(config_file.read_text()) or {}
    if config.get("model_kind") != "cross_layer_transcoder":
        raise AttributionError(f"{config_file}: model_kind is {config.get('model_kind')!r}, "
                               "expected cross_layer_transcoder")
    layers = sorted(int(m.group(1)) for f in path.glob("W_enc_*.safetensors")
                    if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", f.name)))
    if not layers or layers != list(range(len(layers))):
        raise AttributionError(f"{path}: expected W_enc_0.safetensors … W_enc_<L-1>.safetensors, "
                               f"found layers {layers}")
    for l in layers:
        if not (path / f"W_dec_{l}.safetensors").is_file():
            raise AttributionError(f"{path}: W_dec_{l}.safetensors is missing")
    with safe_open(str(path / "W_enc_0.safetensors"), "pt") as f:
        n_features, d = f.get_slice("W_enc_0").get_shape()
    return CLTFolder(path, len(layers), int(d), int(n_features), str(config.get("model_name", "")),
                     config.get("feature_input_hook", ""), config.get("feature_output_hook", ""),
                     config.get("scan"), config)


def check_fits(clt: CLTFolder, hf_config: Any, model_name: str) -> None:
    """The CLT's layers and width must be the model's: one error naming both."""
    n_layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layer", None)
    d_model = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", None)
    if (clt.n_layers, clt.d_model) != (n_layers, d_model):
        raise AttributionError(
            f"the CLT at {clt.path} has {clt.n_layers} layers of width {clt.d_model}, but the "
            f"model {model_name} has {n_layers} layers of width {d_model}: it was trained for "
            "another model")


def pick_backend(hf_config: Any, backend: str, input_hook: str) -> str:
    """nnsight where circuit-tracer registers the architecture and the hook, else TL."""
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping, get_supported_architectures

    if backend not in BACKENDS:
        raise AttributionError(f"unknown backend {backend!r} (supported: {', '.join(BACKENDS)})")
    arch = (getattr(hf_config, "architectures", None) or [""])[0]
    registered = arch in get_supported_architectures() and \
        input_hook in get_mapping(arch).feature_hook_mapping
    if backend == "nnsight" and not registered:
        raise AttributionError(f"circuit-tracer's nnsight backend has no mapping for {arch} with "
                               f"hook {input_hook}; use backend transformerlens")
    if backend == "auto":
        return "nnsight" if registered else "transformerlens"
    return backend


def _position_safe_clt_class() -> type:
    """circuit-tracer's CrossLayerTranscoder with its reconstruction sized by the prompt.

    circuit-tracer 0.5 sizes the reconstruction by the last position where some feature fires
    (`n_pos = pos_ids.max() + 1`), so a prompt whose last tokens activate no feature in any layer
    gets a reconstruction shorter than the MLP outputs it is subtracted from, and
    `setup_attribution` fails ("size of tensor a (42) must match … b (41)"). Early in training,
    with few features, that is common. With no feature active at all it fails on an empty
    `torch.cat`. This subclass takes the length from the activations and handles the empty case;
    it adds no state, so a loaded instance can take it as its class."""
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    class PositionSafeCLT(CrossLayerTranscoder):
        def select_decoder_vectors(self, features):
            if features.is_sparse and features._nnz() == 0:
                long = torch.zeros(0, dtype=torch.long, device=features.device)
                empty = torch.zeros(0, self.d_model, dtype=self.dtype, device=features.device)
                return long, long, long, empty, long
            return super().select_decoder_vectors(features)

        def compute_reconstruction(self, pos_ids, layer_ids, decoder_vectors, input_acts=None,
                                   n_pos: int | None = None):
            if n_pos is None:
                n_pos = input_acts.shape[-2] if input_acts is not None else int(pos_ids.max()) + 1
            recon = torch.zeros(n_pos * self.n_layers, self.d_model, device=self.b_dec.device,
                                dtype=self.b_dec.dtype)
            recon.index_add_(0, layer_ids * n_pos + pos_ids, decoder_vectors.to(recon.dtype))
            recon = recon.reshape(self.n_layers, n_pos, self.d_model) + self.b_dec[:, None]
            if self.W_skip is not None:
                recon = recon + input_acts @ self.W_skip
            return recon

        def decode(self, features, input_acts=None):
            pos_ids, layer_ids, _, vectors, _ = self.select_decoder_vectors(features)
            return self.compute_reconstruction(pos_ids, layer_ids, vectors, input_acts,
                                               n_pos=features.shape[1])

    return PositionSafeCLT


def load_replacement_model(
    clt: str | os.PathLike[str] | CLTFolder,
    model: str | None = None,
    *,
    backend: Backend = "auto",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    hf_model: Any = None,
    tokenizer: Any = None,
) -> Any:
    """circuit-tracer's replacement model of `model` (default: the CLT's config.yaml model_name;
    a hub name, a local folder or `toy:<arch>`) with the CLT's features in place of its MLPs.

    hf_model/tokenizer: an already loaded HF model to build the TL model from (no second load)."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    from clt_ray.models import model_config

    folder = clt if isinstance(clt, CLTFolder) else read_clt_folder(clt)
    name = model or folder.model_name
    if not name:
        raise AttributionError(f"{folder.path}/config.yaml names no model; pass one")
    if hf_model is not None:
        path, hf_config = name, hf_model.config
    else:
        path, hf_config = model_config(name)
    check_fits(folder, hf_config, name)
    backend = pick_backend(hf_config, backend, folder.input_hook)
    transcoder = load_clt(str(folder.path), device=torch.device(device), dtype=dtype,
                          lazy_encoder=False, lazy_decoder=False)
    transcoder.__class__ = _position_safe_clt_class()
    transcoder.scan = feature_scan(folder)  # graphs then name our offline dashboards
    if backend == "nnsight":
        from circuit_tracer.replacement_model.replacement_model_nnsight import (
            NNSightReplacementModel,
        )

        return NNSightReplacementModel.from_pretrained_and_transcoders(
            path, transcoder, device=torch.device(device), dtype=dtype)
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )

    from clt_ray.models.tl import load_hooked_transformer

    rm = load_hooked_transformer(path, dtype=dtype, device=device, hf_model=hf_model,
                                 tokenizer=tokenizer, cls=TransformerLensReplacementModel)
    rm._configure_replacement_model(transcoder)  # what from_pretrained_and_transcoders does
    return rm


def context_limit(rm: Any) -> int | None:
    """The longest input the replacement model takes (TL's n_ctx; the HF config's positions)."""
    if getattr(rm, "backend", None) == "transformerlens":
        return int(rm.cfg.n_ctx)
    hf = getattr(rm, "_hf_config", None)
    return getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)


def tokenize(rm: Any, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Token ids [T] as circuit-tracer sees them (a special token prepended), length-checked."""
    ids = rm.ensure_tokenized(prompt if isinstance(prompt, (str, torch.Tensor)) else list(prompt))
    limit = context_limit(rm)
    if limit is not None and len(ids) > limit:
        shown = prompt if isinstance(prompt, str) else f"{len(ids)} token ids"
        raise AttributionError(f"prompt is {len(ids)} tokens, longer than the model's context of "
                               f"{limit}: {str(shown)[:80]!r}")
    if len(ids) < 2:
        raise AttributionError(f"prompt {prompt!r} is empty")
    return ids


def token_strings(rm: Any, ids: Sequence[int]) -> list[str]:
    return [rm.tokenizer.decode([int(i)]) for i in ids]


# --- graphs ------------------------------------------------------------------------------------


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
        entry = json.loads((Path(tmp) / METADATA_FILE).read_text())["graphs"][0]
        os.replace(Path(tmp) / f"{slug}.json", out_dir / f"{slug}.json")
    meta_path = out_dir / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"graphs": []}
    meta["graphs"] = [g for g in meta["graphs"] if g["slug"] != slug] + [
        {**entry, "replacement_score": result.replacement,
         "completeness_score": result.completeness}]
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return out_dir / f"{slug}.json"


def feature_scan(clt: CLTFolder) -> str:
    """The scan written into graphs: with the bundled frontend's index.html at the server root,
    `./data/features/<name>/<index>.json` is read from the data folder (offline dashboards)."""
    return f"./data/features/{clt.name}"


# --- feature dashboards ------------------------------------------------------------------------


def write_feature_dashboards(rm: Any, clt: CLTFolder, features: Sequence[tuple[int, int]],
                             windows: torch.Tensor, valid: torch.Tensor,
                             out_dir: str | os.PathLike[str], progress: bool = False,
                             settings: Any = None) -> int:
    """Feature JSON for each (layer, feature) under out_dir/features/<clt name>/, from the top-k
    statistics (autointerp.collect.collect_rows: the same examples, histogram and logit effects
    as auto-interp's) over `windows` (token ids [N, T], valid [N, T]) through the replacement
    model's own encoder — the activations the graph shows. Returns files written."""
    from clt_ray import dashboards
    from clt_ray.autointerp.collect import (
        TokenText,
        TopKSettings,
        collect_rows,
        last_call,
        logit_effects,
    )
    from clt_ray.autointerp.topk import bin_edges

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
    folder = Path(out_dir) / "features" / clt.name
    edges = bin_edges().tolist()
    for row in rows:
        if (row["layer"], row["feature"]) in wanted:
            dashboards.write_feature_json(folder, dashboards.feature_json(row, clt.name, edges))
    return len(wanted)


# --- interventions -----------------------------------------------------------------------------


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


# --- graph scores while training ---------------------------------------------------------------


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
        from clt_ray.export import export_clt

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


def graph_eval_prompts(tokenizer: Any, data: Any, n: int, n_tokens: int = 32
                       ) -> list[str | list[int]]:
    """`n` held-out prompts for graph scores: toy mechanism prompts (each kind in turn) on the
    toy corpus, else the first `n_tokens` tokens of held-out windows."""
    from clt_ray.data import heldout_windows

    if data.corpus == "toy":
        from clt_ray.toy import MECHANISMS, mechanism_prompts

        per_kind = {k: mechanism_prompts(k, n, seed=data.heldout_seed) for k in MECHANISMS}
        return [per_kind[MECHANISMS[i % len(MECHANISMS)]][i // len(MECHANISMS)].text
                for i in range(n)]
    ids, mask = heldout_windows(tokenizer, data, n * n_tokens)
    return [row[:n_tokens][m[:n_tokens].bool()].tolist() for row, m in zip(ids[:n], mask[:n])]


def graph_scorer_for(cfg: Any, lm: Any, tokenizer: Any) -> GraphScorer | None:
    """The run config's GraphScorer (train.graph_prompts > 0), else None."""
    t = cfg.train
    if not t.graph_prompts:
        return None
    prompts = graph_eval_prompts(tokenizer, cfg.data, t.graph_prompts)
    return GraphScorer(lm, tokenizer, cfg.model.input_hook, prompts,
                       GraphSettings(max_feature_nodes=t.graph_max_feature_nodes))


# --- many prompts, the frontend ----------------------------------------------------------------


def serve_frontend(data_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8032
                   ) -> Any:
    """circuit-tracer's bundled frontend over `data_dir` (graph JSON, graph-metadata.json,
    features/), on `host` (its own `serve` binds every interface). Returns its Server (`.stop()`,
    `.httpd.server_address`); port 0 picks a free one."""
    import threading

    from circuit_tracer.frontend.local_server import (
        DEFAULT_FRONTEND_DIR,
        CircuitGraphHandler,
        ReusableTCPServer,
        Server,
    )

    handler = functools.partial(CircuitGraphHandler, frontend_dir=DEFAULT_FRONTEND_DIR,
                                data_dir=str(Path(data_dir).resolve()))
    httpd = ReusableTCPServer((host, port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return Server(httpd, thread)


def example_windows(rm: Any, clt: CLTFolder, corpus: str | None, n_tokens: int
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Held-out windows (ids, valid) for feature examples: of `corpus` if given, else of the
    corpus the CLT was trained on (recorded by `clt-ray export`), else None (no examples)."""
    from clt_ray.config import DataConfig
    from clt_ray.data import heldout_windows
    from clt_ray.export import DASHBOARD_DATA_KEYS

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
    atomic_write_parquet(rows, out_dir / SUMMARY_FILE)  # one row per graph
    windows = example_windows(rm, folder, corpus, example_tokens)
    if windows is None:
        log("no corpus for feature examples (pass --corpus): dashboards show logit effects only")
        windows = (torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool))
    write_feature_dashboards(rm, folder, sorted(features), *windows, out_dir, progress=progress)
    return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The summary table for people: one line per graph and the means."""
    header = (f"{'graph':<34} {'tokens':>6} {'nodes':>6} {'edges':>7} {'replace':>8} "
              f"{'complete':>8} {'s':>6}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['slug'][:34]:<34} {r['tokens']:>6} {r['nodes']:>6} {r['edges']:>7} "
                     f"{r['replacement']:>8.3f} {r['completeness']:>8.3f} {r['seconds']:>6.2f}")
    n = len(rows)
    lines.append(f"{'mean':<34} {'':>6} {'':>6} {'':>7} "
                 f"{sum(r['replacement'] for r in rows) / n:>8.3f} "
                 f"{sum(r['completeness'] for r in rows) / n:>8.3f}")
    return "\n".join(lines)


def remove_stale(out_dir: Path) -> None:
    """Leftover temporary folders of an interrupted run."""
    for p in out_dir.glob(".graph-*"):
        shutil.rmtree(p, ignore_errors=True)
