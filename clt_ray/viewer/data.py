"""Reading a run's outputs for the viewer without loading anything large whole.

Parquet is read with pyarrow: lists scan only their small columns in record batches with the
filters pushed down (`pyarrow.dataset`), and a feature page finds its row by the key columns of
the row groups whose (layer, feature) statistics may hold it and decodes that one row group — so a
features.parquet written in small row groups keeps a page's read small. metrics.jsonl is streamed line by line
and thinned to at most `MAX_POINTS` points per curve. Graph JSON is read only to map a clicked
node to its feature (cached per file version). A file that is there but cannot be read raises
`Unreadable`, which names it relative to the run folder (never its absolute path).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from clt_ray import layout
from clt_ray.layout import cantor_pair
from clt_ray.viewer.paths import RunPaths, safe_path, shorten

LIST_COLUMNS = ["layer", "feature", "fired", "frequency", "max_activation"]
EXPLANATION_COLUMNS = ["layer", "feature", "explanation", "ok", "error"]
SCORE_COLUMNS = ["layer", "feature", "scorer", "n_examples", "accuracy", "f1", "auc", "ok", "error"]
MAX_LIMIT = 500
MAX_POINTS = 2000
SORTS = {"feature": None, "density": "frequency", "max_activation": "max_activation",
         "fired": "fired"}
"""The feature list's orders: file order (layer, feature), or a column, largest first."""
MAX_SUMMARY_BYTES = 1 << 20
KEY_SHIFT = 32  # (layer, feature) → one int64 key: layer << 32 | feature


log = logging.getLogger("clt_ray.viewer")


class NotFound(LookupError):
    """A feature, graph or node that the outputs do not hold (a 404 with this message)."""


class Unreadable(Exception):
    """An output file that is there but cannot be read (damaged, not Parquet or JSON, columns or
    keys missing). Its message names the file relative to the run folder and the program that
    makes it again; the cause's text goes to the server's log only (it may hold absolute
    paths)."""

    def __init__(self, what: str, shown: str, program: str, cause: str) -> None:
        super().__init__(f"{what} could not be read: {shown} ({cause}: damaged, incomplete or "
                         f"not written by this version?). Make it again with `{program}`.")


def _key(layer: Any, feature: Any) -> Any:
    return pc.add(pc.shift_left(pc.cast(layer, pa.int64()), KEY_SHIFT), pc.cast(feature, pa.int64()))


def _dataset(path: Path, columns: list[str]) -> ds.Dataset | None:
    """The Parquet file at `path`, or None when it is absent or lacks `columns` (a table of no
    rows, e.g. scores of a run where nothing could be scored, is written without columns)."""
    if not path.is_file():
        return None
    data = ds.dataset(path)
    return data if set(columns) <= set(data.schema.names) else None


def _top(rows: pa.Table | pa.RecordBatch, column: str, k: int) -> pa.Table:
    """The k rows with the largest `column` (ties by layer, feature), in that order."""
    keys = [(column, "descending"), ("layer", "ascending"), ("feature", "ascending")]
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
    return table.take(pc.select_k_unstable(table, k=min(k, table.num_rows), sort_keys=keys))


def _keys_where(data: ds.Dataset | None, where: ds.Expression) -> pa.Array:
    """The (layer, feature) keys of the rows matching `where`, scanned in batches."""
    parts = [] if data is None else [
        _key(b.column("layer"), b.column("feature"))
        for b in data.to_batches(columns=["layer", "feature"], filter=where) if b.num_rows]
    return pa.concat_arrays(parts) if parts else pa.array([], pa.int64())


def _clean(value: Any) -> Any:
    """JSON-safe floats (NaN/inf → None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class RunData:
    """The viewer's read side over one run's folders."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths

    @contextmanager
    def _reading(self, kind: str, path: Path | None = None) -> Iterator[None]:
        """Turn a failure to read the output `kind` (its file, or `path` of it) into
        Unreadable; NotFound passes through."""
        try:
            yield
        except NotFound:
            raise
        except (pa.ArrowException, OSError, ValueError, LookupError, TypeError) as exc:
            out = self.paths.output(kind)
            log.warning("cannot read %s", path or out.path, exc_info=exc)
            raise Unreadable(out.what, self.paths.show(path or out.path), out.program,
                             type(exc).__name__) from None

    def _explanations(self) -> ds.Dataset | None:
        return _dataset(self.paths.explanations, EXPLANATION_COLUMNS)

    def _scores(self) -> ds.Dataset | None:
        return _dataset(self.paths.scores, SCORE_COLUMNS)

    # --- features --------------------------------------------------------------------------

    def list_features(self, layer: int | None = None, q: str | None = None,
                      min_density: float | None = None, max_density: float | None = None,
                      min_score: float | None = None, sort: str = "feature", offset: int = 0,
                      limit: int = 50) -> dict[str, Any]:
        """One page of features matching every filter given: layer, an explanation substring
        (case-insensitive), firing frequency bounds and a minimum mean AUC over scorers; in file
        order (layer, feature) or by a column, largest first (`SORTS`). Returns {total, offset,
        limit, items}."""
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
        offset, limit = max(0, offset), min(max(1, limit), MAX_LIMIT)
        where = ds.field("fired") >= 0
        if layer is not None:
            where &= ds.field("layer") == layer
        if min_density is not None:
            where &= ds.field("frequency") >= min_density
        if max_density is not None:
            where &= ds.field("frequency") <= max_density
        wanted: list[pa.Array] = []
        if q:
            match = pc.match_substring(ds.field("explanation"), q, ignore_case=True)
            with self._reading("explanations"):
                wanted.append(_keys_where(self._explanations(), match))
        if min_score is not None:
            wanted.append(self._keys_scoring_at_least(min_score))
        order = SORTS[sort]
        total, items, best = 0, [], None
        with self._reading("features"):
            for batch in ds.dataset(self.paths.features).to_batches(columns=LIST_COLUMNS,
                                                                    filter=where):
                keys = _key(batch.column("layer"), batch.column("feature"))
                keep = pa.array([True] * batch.num_rows)
                for allowed in wanted:
                    keep = pc.and_(keep, pc.is_in(keys, value_set=allowed))
                batch = batch.filter(keep)
                if order is None:  # file order: stream, keep only the page
                    lo, hi = max(0, offset - total), min(batch.num_rows, offset + limit - total)
                    if hi > lo:
                        items += batch.slice(lo, hi - lo).to_pylist()
                elif batch.num_rows:  # by a column: the best offset + limit rows so far
                    best = _top(batch if best is None else pa.concat_tables(
                        [best, pa.Table.from_batches([batch])]), order, offset + limit)
                total += batch.num_rows
            if best is not None:
                ranked = best.sort_by([(order, "descending"), ("layer", "ascending"),
                                       ("feature", "ascending")])
                items = ranked.slice(offset, limit).to_pylist()
        self._attach_explanations(items)
        return {"total": total, "offset": offset, "limit": limit, "items": _clean(items)}

    def _keys_scoring_at_least(self, min_score: float) -> pa.Array:
        """Keys whose mean AUC over scorers (successful scores only) is ≥ min_score."""
        with self._reading("scores"):
            scores = self._scores()
            if scores is None:
                return pa.array([], pa.int64())
            table = scores.to_table(columns=["layer", "feature", "auc"],
                                    filter=ds.field("ok") & ds.field("auc").is_valid())
        means = table.group_by(["layer", "feature"]).aggregate([("auc", "mean")])
        good = means.filter(pc.greater_equal(means.column("auc_mean"), min_score))
        return _key(good.column("layer"), good.column("feature")).combine_chunks() \
            if good.num_rows else pa.array([], pa.int64())

    def _attach_explanations(self, items: list[dict]) -> None:
        """Add explanation and mean AUC to a page of feature rows (reads only their keys)."""
        if not items:
            return
        keys = pa.array([(r["layer"] << KEY_SHIFT) | r["feature"] for r in items], pa.int64())
        layers = pa.array(sorted({r["layer"] for r in items}), pa.int32())
        features = pa.array(sorted({r["feature"] for r in items}), pa.int32())
        near = ds.field("layer").isin(layers) & ds.field("feature").isin(features)
        found: dict[int, dict] = {}
        with self._reading("explanations"):
            explanations = self._explanations()
            rows = [] if explanations is None else explanations.to_table(
                columns=["layer", "feature", "explanation"], filter=near).to_pylist()
        for r in rows:
            found.setdefault((r["layer"] << KEY_SHIFT) | r["feature"], {})["explanation"] = \
                r["explanation"]
        with self._reading("scores"):
            scores = self._scores()
            rows = [] if scores is None else scores.to_table(
                columns=["layer", "feature", "scorer", "auc"],
                filter=near & ds.field("ok")).to_pylist()
        for r in rows:
            found.setdefault((r["layer"] << KEY_SHIFT) | r["feature"], {}).setdefault(
                "aucs", []).append(r["auc"])
        for r, k in zip(items, keys.to_pylist()):
            extra = found.get(k, {})
            r["explanation"] = extra.get("explanation")
            aucs = [a for a in extra.get("aucs", []) if a is not None]
            r["score"] = sum(aucs) / len(aucs) if aucs else None

    def check_features(self) -> None:
        """Unreadable unless features.parquet opens as Parquet with the list's columns (its
        footer only), so that the features page names a bad file itself."""
        with self._reading("features"):
            if lacking := set(LIST_COLUMNS) - set(pq.read_schema(self.paths.features).names):
                raise KeyError(f"no columns {sorted(lacking)}")

    def layers(self) -> list[int]:
        """The layers present in features.parquet (its layer column only)."""
        with self._reading("features"):
            col = ds.dataset(self.paths.features).to_table(columns=["layer"]).column("layer")
            return sorted(pc.unique(col).to_pylist())

    def check_feature(self, layer: int, feature: int) -> None:
        """NotFound unless features.parquet has (layer, feature) (reads key columns only)."""
        with self._reading("features"):
            where = _locate(pq.ParquetFile(self.paths.features), layer, feature)
        if where is None:
            raise NotFound(f"layer {layer} feature {feature} is not in "
                           f"{self.paths.show(self.paths.features)}")

    def feature(self, layer: int, feature: int) -> dict[str, Any]:
        """Everything about one feature: its features.parquet row (one row read), histogram bin
        edges, explanation row and score rows (when those files exist)."""
        with self._reading("features"):
            pf = pq.ParquetFile(self.paths.features)
            where = _locate(pf, layer, feature)
            if where is None:
                raise NotFound(f"layer {layer} feature {feature} is not in "
                               f"{self.paths.show(self.paths.features)}")
            row = pf.read_row_group(where[0]).slice(where[1], 1).to_pylist()[0]
            meta = json.loads((pf.schema_arrow.metadata or {}).get(b"clt_ray", b"{}"))
            row["histogram_edges"] = meta.get("histogram_edges")
        row["index"] = cantor_pair(layer, feature)
        match = (ds.field("layer") == layer) & (ds.field("feature") == feature)
        row["explanation"] = None
        with self._reading("explanations"):
            if (explanations := self._explanations()) is not None:
                rows = explanations.to_table(columns=EXPLANATION_COLUMNS[2:],
                                             filter=match).to_pylist()
                row["explanation"] = rows[0] if rows else None
        row["scores"] = None
        if self.paths.scores.is_file():
            with self._reading("scores"):
                scores = self._scores()
                row["scores"] = [] if scores is None else scores.to_table(
                    columns=SCORE_COLUMNS[2:], filter=match).to_pylist()
        return _clean(row)

    # --- graphs ----------------------------------------------------------------------------

    def list_graphs(self, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """A page of graphs: slug, prompt and scores from graph-metadata.json, nodes and edges
        from graphs.parquet when it is there."""
        offset, limit = max(0, offset), min(max(1, limit), MAX_LIMIT)
        with self._reading("graphs"):
            graphs = self._graph_entries()
            page = graphs[offset:offset + limit]
        sizes: dict[str, dict] = {}
        if self.paths.graph_summary.is_file() and page:
            with self._reading("graphs", self.paths.graph_summary):
                want = pa.array([g["slug"] for g in page])
                t = ds.dataset(self.paths.graph_summary)
                cols = [c for c in ("slug", "nodes", "edges", "tokens") if c in t.schema.names]
                sizes = {r["slug"]: r for r in t.to_table(
                    columns=cols, filter=ds.field("slug").isin(want)).to_pylist()}
        items = [{"slug": g["slug"], "prompt": g.get("prompt"),
                  "replacement": g.get("replacement_score"),
                  "completeness": g.get("completeness_score"),
                  **{k: v for k, v in sizes.get(g["slug"], {}).items() if k != "slug"}}
                 for g in page]
        return {"total": len(graphs), "offset": offset, "limit": limit, "items": _clean(items)}

    def _graph_entries(self) -> list[dict]:
        """graph-metadata.json's graphs, each checked to be an object with a string slug."""
        graphs = json.loads(self.paths.graph_metadata.read_text())["graphs"]
        if not isinstance(graphs, list) or not all(
                isinstance(g, dict) and isinstance(g.get("slug"), str) for g in graphs):
            raise TypeError("graphs must be a list of objects with a slug")
        return graphs

    def graph_slugs(self) -> set[str]:
        with self._reading("graphs"):
            return {g["slug"] for g in self._graph_entries()}

    def graph_node(self, slug: str, node_id: str) -> dict[str, Any]:
        """A node of a graph: its type and, for a CLT feature, its layer and feature."""
        if slug not in self.graph_slugs():
            raise NotFound(f"no graph {shorten(slug)!r} in "
                           f"{self.paths.show(self.paths.graph_metadata)}")
        with self._reading("graphs", self.paths.graphs / f"{slug}.json"):
            path = safe_path(self.paths.graphs, f"{slug}.json")  # a slug may not leave graphs/
            nodes = _graph_nodes(str(path), path.stat().st_mtime_ns)
        if node_id not in nodes:
            raise NotFound(f"graph {shorten(slug)!r} has no node {shorten(node_id)!r}")
        return nodes[node_id]

    # --- metrics ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any] | None:
        """summary.json's numbers (the final held-out evaluation), when the run has finished."""
        path = self.paths.run / layout.VIEWER_SUMMARY
        if not path.is_file() or path.stat().st_size > MAX_SUMMARY_BYTES:
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return _clean({k: v for k, v in raw.items() if _numeric(v)}) if isinstance(raw, dict) \
            else None

    def metrics(self) -> dict[str, Any]:
        """Training and eval curves from metrics.jsonl: per kind, the steps and each series
        (scalars and per-layer lists), thinned to at most MAX_POINTS points."""
        with self._reading("metrics"):
            return _curves(_jsonl(self.paths.metrics))


def _curves(records: Iterator[dict]) -> dict[str, Any]:
    """Per record kind: the steps and each numeric series, aligned (None where a record lacks
    one), thinned."""
    series: dict[str, dict[str, list]] = {}
    for rec in records:
        kind = rec.get("kind", "train")
        if "step" not in rec:
            continue
        out = series.setdefault(kind, {"step": []})
        n = len(out["step"])
        out["step"].append(rec["step"])
        for name, value in rec.items():
            if name in ("kind", "step") or not _numeric(value):
                continue
            column = out.setdefault(name, [None] * n)
            column += [None] * (n - len(column))
            column.append(value)
        for column in out.values():
            column += [None] * (n + 1 - len(column))
    return _clean({kind: _thin(cols) for kind, cols in series.items()})


def _numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _thin(cols: dict[str, list]) -> dict[str, list]:
    n = len(cols["step"])
    if n <= MAX_POINTS:
        return cols
    stride = math.ceil(n / MAX_POINTS)
    keep = list(range(0, n, stride)) + ([n - 1] if (n - 1) % stride else [])
    return {k: [v[i] for i in keep] for k, v in cols.items()}


def _jsonl(path: Path) -> Iterator[dict]:
    """Records of a JSONL file, read line by line; a torn or bad line (a run still writing) is
    skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes: a bad line
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


def _locate(pf: pq.ParquetFile, layer: int, feature: int) -> tuple[int, int] | None:
    """(row group, row) of (layer, feature), reading only the key columns of the row groups
    whose statistics may hold it."""
    names = pf.schema_arrow.names
    li, fi = names.index("layer"), names.index("feature")
    for g in range(pf.metadata.num_row_groups):
        rg = pf.metadata.row_group(g)
        if not (_may_hold(rg.column(li).statistics, layer)
                and _may_hold(rg.column(fi).statistics, feature)):
            continue
        keys = pf.read_row_group(g, columns=["layer", "feature"])
        hit = pc.and_(pc.equal(keys.column("layer"), layer),
                      pc.equal(keys.column("feature"), feature))
        idx = pc.indices_nonzero(hit).to_pylist()
        if idx:
            return g, idx[0]
    return None


def _may_hold(stats: Any, value: int) -> bool:
    if stats is None or not stats.has_min_max:
        return True
    return stats.min <= value <= stats.max


@functools.lru_cache(maxsize=8)
def _graph_nodes(path: str, mtime_ns: int) -> dict[str, dict]:
    """node_id → {feature_type, layer, feature, ctx_idx, clerp} of one graph file version."""
    graph = json.loads(Path(path).read_text())
    nodes = {}
    for n in graph.get("nodes", []):
        entry = {"node_id": n["node_id"], "feature_type": n.get("feature_type"),
                 "ctx_idx": n.get("ctx_idx"), "clerp": n.get("clerp")}
        if n.get("feature_type") == "cross layer transcoder":
            layer = int(n["layer"])
            entry.update(layer=layer, feature=int(n["node_id"].split("_")[1]))
            if cantor_pair(layer, entry["feature"]) != n.get("feature"):
                entry.update(layer=None, feature=None)  # not our pairing: no link
        nodes[n["node_id"]] = entry
    return nodes
