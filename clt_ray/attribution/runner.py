"""Graphs of many prompts: the worker side (`Attributor`: the replacement model loaded once, one
prompt → its outcome, feature dashboards → files) and the one-process run over a `GraphStore`.
`clt_ray.actors.attribution` runs the same `Attributor` in Ray actors and feeds the same store.

A prompt that fails (too long, a target that is not one token, out of memory) becomes a failed
row with its error; the others go on."""

from __future__ import annotations

import gc
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clt_ray import layout
from clt_ray.attribution.folder import (
    AttributionError,
    Backend,
    CLTFolder,
    feature_scan,
    read_clt_folder,
)
from clt_ray.attribution.graphs import (
    attribute_prompt,
    example_windows,
    graph_json,
    logit_targets,
    write_feature_dashboards,
)
from clt_ray.attribution.labels import Labels, find_labels
from clt_ray.attribution.prompts import PromptSpec, unique_specs
from clt_ray.attribution.replacement import check_model, load_replacement_model
from clt_ray.attribution.store import GraphOutcome, GraphStore, Upload, base_row
from clt_ray.config import GraphSettings

MAX_ERROR_CHARS = 500


class Attributor:
    """The replacement model of one CLT, loaded once, and what a worker does with it."""

    def __init__(self, clt: str | os.PathLike[str] | CLTFolder, model: str | None = None, *,
                 backend: Backend = "auto", device: str = "cpu",
                 settings: GraphSettings | None = None) -> None:
        self.folder = clt if isinstance(clt, CLTFolder) else read_clt_folder(clt)
        self.settings = settings or GraphSettings()
        self.device = device
        self.rm = load_replacement_model(self.folder, model, backend=backend, device=device)
        self.scan = feature_scan(self.folder)

    def run(self, spec: PromptSpec) -> GraphOutcome:
        """The prompt's graph and row, or a failed row with the error (never raises for a
        prompt's own problems)."""
        row = base_row(spec, self.settings)
        start = time.perf_counter()
        try:
            targets = logit_targets(self.rm, spec.target, spec.contrast)
            result = attribute_prompt(self.rm, spec.prompt, self.settings, targets=targets)
            graph = graph_json(result, spec.slug, self.scan, self.settings)
        except Exception as exc:  # noqa: BLE001 - the prompt fails, the run goes on
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            error = " ".join(f"{type(exc).__name__}: {exc}".split())[:MAX_ERROR_CHARS]
            row.update(status="failed", error=error, seconds=time.perf_counter() - start)
            return GraphOutcome(row)
        row.update(status="ok", tokens=len(result.tokens), nodes=result.n_nodes,
                   edges=result.n_edges, features=result.n_features,
                   replacement=float(result.replacement),
                   completeness=float(result.completeness),
                   seconds=time.perf_counter() - start,
                   feature_nodes=[{"layer": int(layer), "feature": int(f)} for layer, f in
                                  sorted({(n[0], n[2]) for n in result.feature_nodes()})])
        del result
        gc.collect()  # the dense adjacency: free it before the next prompt's
        return GraphOutcome(row, json.dumps(graph).encode())

    def dashboards(self, features: Sequence[tuple[int, int]], corpus: str | None,
                   example_tokens: int, progress: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, bytes]:
        """Feature JSON of `features` (write_feature_dashboards), as {"<index>.json": bytes}:
        the files of a CLT's dashboards folder (the writer knows which folder that is)."""
        if not features:
            return {}
        windows = example_windows(self.rm, self.folder, corpus, example_tokens)
        if windows is None:
            log("no corpus for feature examples (pass --corpus): dashboards show logit "
                "effects only")
            windows = (torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool))
        with tempfile.TemporaryDirectory(prefix="clt_ray_dashboards_") as tmp:
            write_feature_dashboards(self.rm, self.folder, features, *windows, tmp,
                                     progress=progress)
            folder = Path(tmp) / layout.FEATURE_DASHBOARDS / self.folder.name
            return {p.name: p.read_bytes() for p in folder.glob("*.json")}

    @staticmethod
    def peak_memory_mb() -> float:
        """This process's peak resident memory (Linux reports KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(clt: str | os.PathLike[str], prompts: Sequence[str | PromptSpec],
            out_dir: str | os.PathLike[str], *, model: str | None, backend: Backend,
            settings: GraphSettings, autointerp: str | None, labels: Labels | None,
            upload: Upload | None, log: Callable[[str], None], clt_name: str | None = None
            ) -> tuple[CLTFolder, list[PromptSpec], GraphStore]:
    """Everything checked before the output folder is touched (the CLT, the model without its
    weights, the prompts, the labels), then the store of `out_dir`. clt_name: the CLT's name
    in scans and dashboard folders when its folder's own name is not (a local copy of a URI)."""
    folder = read_clt_folder(clt)
    specs = unique_specs(prompts)
    if not specs:
        raise AttributionError("no prompts given")
    check_model(folder, model, backend)
    if labels is None:
        labels = find_labels(folder, autointerp, log)
    store = GraphStore(out_dir, clt_name or folder.name, settings, labels, upload)
    todo = store.todo(specs)
    if len(todo) < len(specs):
        log(f"{len(specs) - len(todo)} of {len(specs)} graphs already there: computing "
            f"{len(todo)}")
    return folder, specs, store


def attribute_prompts(
    clt: str | os.PathLike[str],
    prompts: Sequence[str | PromptSpec],
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    backend: Backend = "auto",
    settings: GraphSettings | None = None,
    device: str = "cpu",
    corpus: str | None = None,
    example_tokens: int = 16384,
    autointerp: str | None = None,
    labels: Labels | None = None,
    upload: Upload | None = None,
    clt_name: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Graphs of many prompts in this process, the model loaded once (only if some prompt has
    no finished graph yet), into out_dir (the frontend's data folder; `store` says what it
    holds). Prompts are strings or PromptSpecs (with logit targets). Labels come from
    `labels`, else `autointerp`'s explanations, else the CLT's run's. Returns graphs.parquet's
    rows of these prompts, in their order (failed ones with their error)."""
    from tqdm import tqdm

    settings = settings or GraphSettings()
    folder, specs, store = prepare(clt, prompts, out_dir, model=model, backend=backend,
                                   settings=settings, autointerp=autointerp, labels=labels,
                                   upload=upload, log=log, clt_name=clt_name)
    todo = store.todo(specs)
    attributor: Attributor | None = None
    if todo:
        attributor = Attributor(folder, model, backend=backend, device=device, settings=settings)
        with tqdm(total=len(todo), desc="graphs", unit="graph", disable=not progress) as bar:
            failed = 0
            for spec in todo:
                outcome = attributor.run(spec)
                store.record(outcome)
                failed += not outcome.ok
                bar.set_postfix(failed=failed, refresh=False)
                bar.update()
    wanted = store.wanted_dashboards()
    if wanted:
        attributor = attributor or Attributor(folder, model, backend=backend, device=device,
                                              settings=settings)
        store.write_dashboards(attributor.dashboards(wanted, corpus, example_tokens, progress, log))
    return store.rows_for(specs)
