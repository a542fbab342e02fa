"""The output folder of a graph run and its one writer (in a Ray run: the driver).

    out/<slug>.json                a graph: circuit-tracer's JSON, labelled, Neuronpedia's fields
    out/graphs.parquet             one row per prompt: its key, status ok/failed, error, sizes, scores
    out/graph-metadata.json        the frontend's index of the graphs that are there
    out/features/<clt>/<i>.json    feature dashboards (circuit-tracer's / Anthropic's feature format)

Each graph is written (atomically) as it finishes, then graphs.parquet, then graph-metadata.json,
each replaced whole: at any moment both index files are complete and every graph they name is
complete on disk, so a run stopped at any point loses only graphs in flight. A rerun skips every
prompt whose row says ok for the same settings and whose file is there (prompts are keyed by a hash
of prompt and targets: `PromptSpec.key`); failed prompts are tried again.

Neuronpedia's upload (its graph schema) requires metadata slug/scan/prompt/prompt_tokens, qParams,
nodes with node_id/feature/layer/ctx_idx/feature_type/jsNodeId/clerp and links with
source/target/weight — circuit-tracer's JSON has them; this module adds metadata.info (generator
clt-ray and its version), generation_settings and pruning_settings, and, for an upload, the
Neuronpedia model id as scan and feature_details.feature_json_base_url."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clt_ray import layout
from clt_ray.attribution.folder import AttributionError, feature_scan
from clt_ray.attribution.labels import Labels, label_graph
from clt_ray.attribution.prompts import PromptSpec
from clt_ray.config import GraphSettings
from clt_ray.fsutil import atomic_write_bytes, atomic_write_parquet, atomic_write_text

ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("slug", pa.string()), ("prompt", pa.string()),
    ("target", pa.list_(pa.string())), ("contrast", pa.list_(pa.string())),
    ("status", pa.string()), ("error", pa.string()),
    ("tokens", pa.int64()), ("nodes", pa.int64()), ("edges", pa.int64()),
    ("features", pa.int64()), ("replacement", pa.float64()), ("completeness", pa.float64()),
    ("seconds", pa.float64()), ("settings", pa.string()),
    ("feature_nodes", pa.list_(pa.struct([("layer", pa.int64()), ("feature", pa.int64())]))),
])
"""graphs.parquet: one row per prompt. feature_nodes: the (layer, feature) pairs of the pruned
graph, whose dashboards the folder holds."""

ENTRY_KEYS = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
              "schema_version")
"""What graph-metadata.json keeps of a graph's metadata (as circuit-tracer writes it)."""

NEURONPEDIA_ID = re.compile(r"[A-Za-z0-9_-]+")
"""Neuronpedia accepts only these characters in a graph's scan (its model id) and slug."""


@dataclass
class GraphOutcome:
    """A prompt's result as a worker sends it: its graphs.parquet row and, when ok, the graph
    JSON (bytes: circuit-tracer's, before labels and metadata, which the writer adds)."""

    row: dict[str, Any]
    graph: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.row["status"] == "ok"


def settings_id(settings: GraphSettings) -> str:
    return json.dumps(settings.model_dump(), sort_keys=True)


def base_row(spec: PromptSpec, settings: GraphSettings) -> dict[str, Any]:
    """A row with every column, the prompt's own filled in."""
    row: dict[str, Any] = dict.fromkeys(ROW_SCHEMA.names)
    row.update(key=spec.key, slug=spec.slug, prompt=spec.prompt, target=list(spec.target),
               contrast=list(spec.contrast), settings=settings_id(settings), feature_nodes=[])
    return row


@dataclass(frozen=True)
class Upload:
    """What makes graphs uploadable to Neuronpedia: scan, the model's id there (replacing the
    local `./data/features/<clt>` scan, so the local frontend then shows no dashboards), and the
    public https base URL where features/<clt name>/ is hosted (CORS open)."""

    scan: str | None = None
    feature_json_base_url: str | None = None

    def __post_init__(self) -> None:
        if self.scan is not None and not NEURONPEDIA_ID.fullmatch(self.scan):
            raise AttributionError(f"Neuronpedia model id {self.scan!r}: only letters, digits, "
                                   "'-' and '_' (e.g. gpt2-small, gemma-2-2b)")
        url = self.feature_json_base_url
        if url is not None and not re.match(r"https?://", url):
            raise AttributionError(f"feature JSON base URL {url!r} is not an http(s) URL")


def generator() -> dict[str, str]:
    try:
        own = version("clt-ray")
    except PackageNotFoundError:  # run from a source tree without installing
        own = "unknown"
    return {"name": "clt-ray", "version": own}


def finish_graph(graph: dict[str, Any], settings: GraphSettings, labels: Labels,
                 upload: Upload | None = None, scan: str | None = None) -> dict[str, Any]:
    """circuit-tracer's graph JSON → ours: feature labels, the generator and settings, the
    scan (the upload's, else `scan`) and the upload fields (module docstring)."""
    meta = graph["metadata"]
    if scan is not None:
        meta["scan"] = scan
    meta["info"] = {"generator": generator(), "create_time_ms": int(time.time() * 1000)}
    meta["generation_settings"] = {k: getattr(settings, k) for k in (
        "max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")}
    meta["pruning_settings"] = {"node_threshold": settings.node_threshold,
                                "edge_threshold": settings.edge_threshold}
    if upload is not None and upload.scan:
        meta["scan"] = upload.scan
    if upload is not None and upload.feature_json_base_url:
        meta["feature_details"] = {
            "feature_json_base_url": upload.feature_json_base_url.rstrip("/")}
    label_graph(graph, labels)
    return graph


class GraphStore:
    """The output folder (module docstring); `record` is its only way in."""

    def __init__(self, out_dir: str | os.PathLike[str], clt_name: str, settings: GraphSettings,
                 labels: Labels | None = None, upload: Upload | None = None) -> None:
        self.out, self.clt_name, self.settings = Path(out_dir), clt_name, settings
        self.scan = feature_scan(clt_name)
        self.labels, self.upload = labels or {}, upload
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale(self.out)
        self.rows: dict[str, dict[str, Any]] = {r["key"]: r for r in self._read_rows()}
        meta_path = self.out / layout.GRAPH_METADATA
        self.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"graphs": []}

    def _read_rows(self) -> list[dict[str, Any]]:
        path = self.out / layout.GRAPH_SUMMARY
        if not path.is_file():
            return []
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise AttributionError(f"{path} is not readable ({exc}): move it away to start "
                                   "the index afresh") from None
        if "key" not in table.column_names:  # made before rows had keys: redone, not resumed
            return []
        table = table.select([n for n in ROW_SCHEMA.names if n in table.column_names])
        return [{**dict.fromkeys(ROW_SCHEMA.names), **r} for r in table.to_pylist()]

    def finished(self, spec: PromptSpec) -> bool:
        row = self.rows.get(spec.key)
        return (row is not None and row["status"] == "ok"
                and row["settings"] == settings_id(self.settings)
                and (self.out / f"{row['slug']}.json").is_file())

    def todo(self, specs: Iterable[PromptSpec]) -> list[PromptSpec]:
        return [s for s in specs if not self.finished(s)]

    def record(self, outcome: GraphOutcome) -> None:
        """A finished prompt: its graph file (if ok), then graphs.parquet, then
        graph-metadata.json, each replaced atomically."""
        row = outcome.row
        slug = row["slug"]
        entries = self.meta["graphs"]
        at = next((i for i, g in enumerate(entries) if g.get("slug") == slug), None)
        if outcome.ok:
            graph = finish_graph(json.loads(outcome.graph), self.settings, self.labels,
                                 self.upload, self.scan)
            atomic_write_text(self.out / f"{slug}.json", json.dumps(graph))
            entry = {k: graph["metadata"][k] for k in ENTRY_KEYS if k in graph["metadata"]}
            entry.update(replacement_score=row["replacement"],
                         completeness_score=row["completeness"])
            if at is None:
                entries.append(entry)
            else:
                entries[at] = entry
        elif at is not None:  # an earlier graph of this prompt, for other settings
            del entries[at]
        self.rows[row["key"]] = row
        self._write_index()
        if not outcome.ok:
            (self.out / f"{slug}.json").unlink(missing_ok=True)

    def _write_index(self) -> None:
        atomic_write_parquet(list(self.rows.values()), self.out / layout.GRAPH_SUMMARY,
                             schema=ROW_SCHEMA)
        atomic_write_text(self.out / layout.GRAPH_METADATA, json.dumps(self.meta, indent=1))

    def rows_for(self, specs: Sequence[PromptSpec]) -> list[dict[str, Any]]:
        return [self.rows[s.key] for s in specs if s.key in self.rows]

    def dashboards_folder(self) -> Path:
        return self.out / layout.FEATURE_DASHBOARDS / self.clt_name

    def wanted_dashboards(self) -> list[tuple[int, int]]:
        """(layer, feature) of every feature in a finished graph whose dashboard is missing."""
        folder = self.dashboards_folder()
        wanted = {(n["layer"], n["feature"]) for r in self.rows.values() if r["status"] == "ok"
                  for n in r["feature_nodes"] or ()}
        return sorted(f for f in wanted
                      if not (folder / f"{layout.cantor_pair(*f)}.json").is_file())

    def write_dashboards(self, files: dict[str, bytes]) -> None:
        """Feature JSON a worker made ({"<index>.json": bytes}), each written atomically."""
        folder = self.dashboards_folder()
        for name, data in files.items():
            if not re.fullmatch(r"\d+\.json", name):
                raise AttributionError(f"{name!r} is not a feature dashboard's file name")
            atomic_write_bytes(folder / name, data)


def remove_stale(out_dir: Path) -> None:
    """Leftovers of a run killed mid-write: temporary folders and files."""
    for p in out_dir.glob(".graph-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)
