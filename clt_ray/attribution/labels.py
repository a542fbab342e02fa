"""Feature labels in graphs: a feature node's `clerp` is its auto-interp explanation, read from
explanations.parquet (an `autointerp` output folder), at attribute time or afterwards over a
folder of graphs (`clt-ray label-graphs`).

Labels are shown as HTML by circuit-tracer's frontend (its hover tooltip sets innerHTML) and by
Neuronpedia's, and an explanation is LLM output: angle brackets become look-alikes (‹ ›) and
whitespace runs one space, so a label can never be markup."""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clt_ray import layout
from clt_ray.attribution.folder import AttributionError, CLTFolder
from clt_ray.errors import CltRayError
from clt_ray.fsutil import atomic_write_text, filesystem, is_uri, reach

Labels = dict[tuple[int, int], str]
"""(layer, feature) → label."""

SAFE_SLUG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""A slug that names a file in the folder itself (never a path out of it)."""
FEATURE_NODE = "cross layer transcoder"
"""circuit-tracer's feature_type of a CLT feature node."""


def clean_label(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().replace("<", "‹").replace(">", "›")


def explanations_file(location: str | os.PathLike[str]) -> str:
    """explanations.parquet of an autointerp folder (or the file itself), local or in a store."""
    location = str(location)
    if location.endswith(".parquet"):
        return location
    join = posixpath.join if is_uri(location) else os.path.join
    return join(location, layout.EXPLANATIONS)


def read_labels(location: str | os.PathLike[str]) -> Labels:
    """Labels of every feature explained successfully in an autointerp folder's
    explanations.parquet (a missing file is an error naming it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = explanations_file(location)
    if not _exists(path):
        raise AttributionError(f"{path} does not exist: make explanations with `clt-ray "
                               "autointerp`, or point --autointerp at its output folder")
    fs, root = filesystem(path)
    try:
        rows = pq.read_table(root, filesystem=fs,
                             columns=["layer", "feature", "explanation", "ok"]).to_pylist()
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise AttributionError(f"{path} is not readable as explanations ({exc})") from None
    return {(int(r["layer"]), int(r["feature"])): clean_label(r["explanation"]) for r in rows
            if r["ok"] and r["explanation"] and clean_label(r["explanation"])}


def _exists(location: str) -> bool:
    if is_uri(location):
        from pyarrow.fs import FileType

        return reach(location)[2] == FileType.File
    return Path(location).is_file()


def run_autointerp_folder(clt: CLTFolder) -> str | None:
    """The autointerp/ folder of the run an exported CLT came from, when its config.yaml records
    a checkpoint inside a run folder (run/checkpoints/step_…) and that folder has explanations."""
    checkpoint = str((clt.config.get("clt_ray") or {}).get("checkpoint") or "")
    path = posixpath if is_uri(checkpoint) else os.path
    parent = path.dirname(checkpoint.rstrip("/"))
    if not checkpoint or path.basename(parent) != layout.CHECKPOINTS:
        return None
    folder = path.join(path.dirname(parent), layout.AUTOINTERP)
    try:
        return folder if _exists(explanations_file(folder)) else None
    except (OSError, CltRayError):  # a store that does not answer: no labels, still graphs
        return None


def find_labels(clt: CLTFolder, autointerp: str | None, log: Callable[[str], None]
                ) -> Labels:
    """The labels of `autointerp` (an error if it has none), else of the CLT's own run
    folder's autointerp/ when there is one, else none; says which."""
    where = autointerp or run_autointerp_folder(clt)
    if where is None:
        log("feature labels: no explanations.parquet found (pass --autointerp DIR): feature "
            "nodes are unlabelled")
        return {}
    labels = read_labels(where)
    log(f"feature labels: {len(labels)} explanations from {explanations_file(where)}")
    return labels


def label_graph(graph: dict[str, Any], labels: Labels) -> int:
    """Set every feature node's clerp to its label, cleaned ('' where there is none); returns
    how many nodes got one. Node ids are circuit-tracer's `{layer}_{feature}_{position}`."""
    labelled = 0
    for node in graph["nodes"]:
        if node.get("feature_type") != FEATURE_NODE:
            continue
        layer, feature, _ = node["node_id"].split("_")
        node["clerp"] = clean_label(labels.get((int(layer), int(feature)), ""))
        labelled += bool(node["clerp"])
    return labelled


def relabel_graphs(folder: str | os.PathLike[str], labels: Labels) -> tuple[int, int]:
    """Relabel every graph of an `attribute` output folder (each file replaced atomically);
    returns (graphs, labelled nodes)."""
    folder = Path(folder)
    meta = folder / layout.GRAPH_METADATA
    if not meta.is_file():
        raise AttributionError(f"{folder} has no {layout.GRAPH_METADATA}: give the output folder "
                               "of `clt-ray attribute`")
    graphs = nodes = 0
    for entry in json.loads(meta.read_text())["graphs"]:
        slug = str(entry.get("slug", ""))
        path = folder / f"{slug}.json"
        if not SAFE_SLUG.fullmatch(slug) or not path.is_file():
            continue
        graph = json.loads(path.read_text())
        nodes += label_graph(graph, labels)
        atomic_write_text(path, json.dumps(graph))
        graphs += 1
    return graphs, nodes
