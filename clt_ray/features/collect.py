"""Top activating examples and statistics of every CLT feature over token windows, in one process.

Two passes: (1) every chunk of windows through the LM and the encoder, one feature range at a
time, into mergeable `topk.TopKState`s; (2) per range, only the windows that its features' top
and quantile examples name are run again to read their per-token activations. The Ray Data job
(actors/autointerp.py) runs the same two functions on chunks and ranges in parallel; this module
is its single-process twin and the reference the tests compare it with.

Output: Parquet, one row per feature (`FEATURE_SCHEMA`), written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor

from clt_ray.config import TopKSettings
from clt_ray.features.topk import (
    EMPTY,
    TopKState,
    bin_edges,
    chunk_state,
    encode_range,
    merge_all,
    quantile_examples,
)
from clt_ray.fsutil import atomic_write_parquet
from clt_ray.lm import extract_activations, keep_mask

EXAMPLE = pa.struct([("window", pa.int64()), ("position", pa.int32()), ("peak", pa.float32()),
                     ("group", pa.int32()), ("tokens", pa.list_(pa.string())),
                     ("acts", pa.list_(pa.float32()))])
FEATURE_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("feature", pa.int32()), ("n_tokens", pa.int64()),
    ("fired", pa.int64()), ("frequency", pa.float64()), ("max_activation", pa.float32()),
    ("histogram", pa.list_(pa.int64())), ("top_examples", pa.list_(EXAMPLE)),
    ("quantile_examples", pa.list_(EXAMPLE)), ("quiet_examples", pa.list_(EXAMPLE)),
    ("decoder_norms", pa.list_(pa.float32())),
    ("top_logits", pa.list_(pa.string())), ("top_logit_values", pa.list_(pa.float32())),
    ("bottom_logits", pa.list_(pa.string())), ("bottom_logit_values", pa.list_(pa.float32())),
])


FEATURE_ROW_GROUP = 256
"""Rows per Parquet row group: the viewer's feature page decodes only the group of its row."""


def feature_ranges(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) cut into ranges of at most `size` features."""
    return [(s, min(s + size, stop)) for s in range(start, stop, size)]


def lm_window_inputs(lm: Any, ids: Tensor, mask: Tensor, input_hook: str) -> Tensor:
    """Raw CLT inputs x [W, T, L, d] of windows ids/mask [W, T]."""
    device = next(lm.parameters()).device
    x, _ = extract_activations(lm, ids.to(device), mask.to(device), input_hook=input_hook)
    return x.float().cpu()


def chunk_states(clt: Any, x: Tensor, valid: Tensor, window_ids: Tensor,
                 ranges: Sequence[tuple[int, int]], s: TopKSettings) -> list[TopKState]:
    """Pass 1 for one chunk: a state per feature range."""
    return [chunk_state(encode_range(clt, x, a, b), valid, window_ids, a, s.k, s.samples_per_bin)
            for a, b in ranges]


class TokenText:
    """Token id → display string, memoised: what the token adds to the text after an ordinary
    word. Decoded alone, a word-level tokenizer's token loses the space its decode puts between
    words (and a SentencePiece one its leading "▁"), which would run examples together ("thecat");
    after an anchor word each token keeps exactly the spacing that decoding a window gives."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.memo = tokenizer, {}
        self.anchor = _anchor_id(tokenizer)
        self.anchor_text = "" if self.anchor is None else tokenizer.decode([self.anchor])

    def __call__(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            if i not in self.memo:
                self.memo[i] = self._text(int(i))
            out.append(self.memo[i])
        return out

    def _text(self, i: int) -> str:
        if self.anchor is None:
            return self.tokenizer.decode([i])
        both = self.tokenizer.decode([self.anchor, i])
        if both.startswith(self.anchor_text):
            return both[len(self.anchor_text):]
        return self.tokenizer.decode([i])


def _anchor_id(tokenizer: Any, search: int = 2000) -> int | None:
    """The first token that decodes to a plain word (letters only), or None."""
    special = set(tokenizer.all_special_ids)
    for i in range(min(search, len(tokenizer))):
        text = tokenizer.decode([i]).strip()
        if i not in special and len(text) > 1 and text.isalpha():
            return i
    return None


DecoderRows = Callable[[int, int, int], Tensor]
"""(layer, start, stop) -> the raw-space decoder rows [stop − start, L − layer, d] of those
features of that layer: our CLT module's (`clt_decoder_rows`) or an exported folder's."""
Effects = tuple[list[float], list[str], list[float], list[str], list[float]]


def clt_decoder_rows(clt: Any) -> DecoderRows:
    def rows(layer: int, start: int, stop: int) -> Tensor:
        w = clt.folded_weights([layer])[f"W_dec_{layer}"][start - clt.start:stop - clt.start]
        return w.detach().float().cpu()

    return rows


def logit_effects(decoder_rows: DecoderRows, n_layers: int, unembed: Tensor, text: TokenText,
                  start: int, stop: int, n: int) -> Iterator[Effects]:
    """Per (layer, feature) of [start, stop), layer-major: decoder norms per target layer, and the
    top/bottom tokens of the summed raw decoder rows through the unembedding [d, V]."""
    for layer in range(n_layers):
        w = decoder_rows(layer, start, stop)  # [n, L − layer, d]
        norms = w.norm(dim=-1)
        scores = w.sum(1) @ unembed.float()  # [n, V]
        top = scores.topk(min(n, scores.shape[1]), dim=1)
        bottom = (-scores).topk(min(n, scores.shape[1]), dim=1)
        for i in range(stop - start):
            yield (norms[i].tolist(), text(top.indices[i].tolist()), top.values[i].tolist(),
                   text(bottom.indices[i].tolist()), (-bottom.values[i]).tolist())


def feature_rows(state: TopKState, window_acts: Callable[[list[int]], Tensor], ids: Tensor,
                 valid: Tensor, text: TokenText, effects: Iterator[Effects], s: TopKSettings,
                 keep: Callable[[int, int], bool] | None = None) -> list[dict]:
    """Pass 2 for one range: the rows of its features (only those keep(layer, feature) allows:
    a graph's dashboards want a few features of ranges that hold thousands). window_acts(windows)
    -> activations [len(windows), T, L, n] of this range on those windows; effects:
    `logit_effects` of the range."""
    L, n = state.top_peak.shape[:2]
    kept_features = [(l, i) for l in range(L) for i in range(n)
                     if keep is None or keep(l, state.start + i)]
    quantiles = {(l, i): quantile_examples(state, l, i, s.quantile_groups, s.per_group)
                 for l, i in kept_features}
    needed = {int(w) for l, i in kept_features for w in state.top_window[l, i] if w != EMPTY}
    needed |= {w for groups in quantiles.values() for g in groups for _, w, _ in g}
    needed |= {int(w) for l, i in kept_features for w in state.quiet_window[l, i] if w != EMPTY}
    order = sorted(needed)
    acts = window_acts(order).numpy() if order else None
    kept = {w: valid[w].nonzero().flatten().numpy() for w in order}  # positions after BOS
    tokens = {w: text(ids[w][kept[w]].tolist()) for w in order}

    def example(layer: int, i: int, peak: float, w: int, pos: int, group: int) -> dict:
        j = slots[w]
        return {"window": w, "position": int((kept[w] < pos).sum()), "peak": peak,
                "group": group, "tokens": tokens[w], "acts": acts[j, kept[w], layer, i].tolist()}

    slots = {w: j for j, w in enumerate(order)}

    rows = []
    for layer in range(L):
        for i in range(n):
            norms, top_t, top_v, bot_t, bot_v = next(effects)
            if (layer, i) not in quantiles:
                continue
            top = [example(layer, i, float(p), int(w), int(q), 0) for p, w, q in zip(
                state.top_peak[layer, i], state.top_window[layer, i], state.top_pos[layer, i])
                if w != EMPTY]
            quant = [example(layer, i, p, w, q, g + 1)
                     for g, group in enumerate(quantiles[layer, i]) for p, w, q in group]
            quiet = [example(layer, i, 0.0, int(w), 0, -1)
                     for w in state.quiet_window[layer, i] if w != EMPTY]
            fired = int(state.fired[layer, i])
            rows.append({
                "layer": layer, "feature": state.start + i, "n_tokens": state.n_tokens,
                "fired": fired, "frequency": fired / max(1, state.n_tokens),
                "max_activation": top[0]["peak"] if top else 0.0,
                "histogram": state.histogram[layer, i].tolist(), "top_examples": top,
                "quantile_examples": quant, "quiet_examples": quiet, "decoder_norms": norms,
                "top_logits": top_t,
                "top_logit_values": top_v, "bottom_logits": bot_t, "bottom_logit_values": bot_v,
            })
    return rows


def write_features(rows: list[dict] | pa.Table, path: str | os.PathLike[str], meta: dict
                   ) -> Path:
    """Parquet of feature rows (sorted by layer, feature), written under a temporary name; rows
    as dicts or, for many features, a pyarrow Table (never turned into Python objects)."""
    if isinstance(rows, pa.Table):
        rows = rows.sort_by([("layer", "ascending"), ("feature", "ascending")])
    else:
        rows = sorted(rows, key=lambda r: (r["layer"], r["feature"]))
    schema = FEATURE_SCHEMA.with_metadata({
        "clt_ray": json.dumps({**meta, "histogram_edges": bin_edges().tolist()})})
    return atomic_write_parquet(rows, path, schema, row_group_size=FEATURE_ROW_GROUP)


def unembedding(lm: Any) -> Tensor:
    """The LM's unembedding [d, V] (its output embedding, transposed)."""
    return lm.get_output_embeddings().weight.detach().float().cpu().T


ActsOf = Callable[[Tensor, int, int], Tensor]
"""(windows, start, stop) -> activations [len(windows), T, L, stop − start] of those features."""


def collect_rows(acts_of: ActsOf, effects_of: Callable[[int, int], Iterator[Effects]],
                 ids: Tensor, valid: Tensor, ranges: Sequence[tuple[int, int]],
                 chunks: Sequence[tuple[int, int]], text: TokenText, s: TopKSettings,
                 progress: bool = False, keep: Callable[[int, int], bool] | None = None
                 ) -> list[dict]:
    """Both passes in this process over windows ids/valid [N, T], for any encoder: pass 1 per
    chunk [first, stop) of windows and feature range, pass 2 per range (rows only of the
    features keep(layer, feature) allows). `clt-ray attribute` calls it with circuit-tracer's
    encoder, `collect_features` with our CLT module."""
    from tqdm import tqdm

    parts: dict[int, list[TopKState]] = {a: [] for a, _ in ranges}
    for first, stop in tqdm(chunks, desc="top-k pass", unit="chunk", disable=not progress):
        w = torch.arange(first, stop)
        for a, b in ranges:
            parts[a].append(chunk_state(acts_of(w, a, b), valid[w], w, a, s.k, s.samples_per_bin))
    rows = []
    for a, b in ranges:

        def window_acts(windows: list[int], a: int = a, b: int = b) -> Tensor:
            return acts_of(torch.tensor(windows), a, b)

        rows += feature_rows(merge_all(parts[a]), window_acts, ids, valid, text,
                             effects_of(a, b), s, keep)
    return rows


def last_call(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """fn, remembering its last call: every range of a chunk encodes the same inputs."""
    memo: list = [None, None]

    def call(windows: Tensor) -> Tensor:
        if memo[0] is None or not torch.equal(memo[0], windows):
            memo[:] = [windows.clone(), fn(windows)]
        return memo[1]

    return call


def collect_features(clt: Any, lm: Any, tokenizer: Any, ids: Tensor, mask: Tensor,
                     input_hook: str, settings: TopKSettings | None = None,
                     progress: bool = False, inputs: Callable[[Tensor], Tensor] | None = None,
                     chunks: Sequence[tuple[int, int]] | None = None) -> list[dict]:
    """Feature rows of every feature of `clt` (a whole CLT, or a feature shard of one for
    features [clt.start, clt.stop)) over windows ids/mask [N, T], with our CLT module.

    inputs(windows) -> the CLT inputs x [len(windows), T, L, d] (default: the LM's, computed);
    chunks: [first, stop) windows per pass-1 step (default: runs of settings.chunk_windows).
    The cache source (cache_source.py) passes both: x read from blocks, a chunk per file."""
    s = settings or TopKSettings()
    if inputs is None:
        def inputs(w: Tensor) -> Tensor:
            return lm_window_inputs(lm, ids[w], mask[w], input_hook)
    if chunks is None:
        chunks = [(c, min(c + s.chunk_windows, len(ids))) for c in range(0, len(ids),
                                                                         s.chunk_windows)]
    x_of = last_call(inputs)
    text, unembed = TokenText(tokenizer), unembedding(lm)
    decoder = clt_decoder_rows(clt)
    return collect_rows(
        lambda w, a, b: encode_range(clt, x_of(w), a, b),
        lambda a, b: logit_effects(decoder, clt.cfg.n_layers, unembed, text, a, b, s.logits),
        ids, keep_mask(ids, mask), feature_ranges(clt.start, clt.stop, s.range_size), chunks,
        text, s, progress)
