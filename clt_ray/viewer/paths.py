"""Where a run's outputs are, what is missing and the command that makes it, and the one
function every file read from a URL goes through (`safe_path`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clt_ray import layout


class BadPath(ValueError):
    """A URL path that would leave its served folder."""


def safe_path(root: str | os.PathLike[str], rel: str) -> Path:
    """root/rel, refused (BadPath) unless it stays inside root: no '..' parts, no absolute or
    drive paths, no backslashes or NULs, and after resolving symlinks still under root."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        raise BadPath(rel)
    parts = rel.split("/")
    if any(p in ("..", ".") or p.endswith(":") for p in parts if p) or "" in parts[:-1]:
        raise BadPath(rel)
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise BadPath(rel)
    return path


@dataclass(frozen=True)
class Missing:
    """An output that is not there yet: what, where, and how to make it."""

    what: str
    path: str
    command: str

    def message(self) -> str:
        return f"{self.what} is missing ({self.path}). Make it with: {self.command}"

    def to_json(self) -> dict[str, str]:
        return {"error": self.message(), "missing": self.path, "command": self.command,
                "what": self.what}


@dataclass(frozen=True)
class RunPaths:
    """A run folder and the output folders the viewer reads (graphs/ and autointerp/ inside the
    run by default)."""

    run: Path
    graphs: Path
    autointerp: Path

    @classmethod
    def of(cls, run: str | os.PathLike[str], graphs: str | os.PathLike[str] | None = None,
           autointerp: str | os.PathLike[str] | None = None) -> RunPaths:
        run = Path(run).resolve()
        return cls(run, Path(graphs).resolve() if graphs else run / layout.GRAPHS,
                   Path(autointerp).resolve() if autointerp else run / layout.AUTOINTERP)

    @property
    def features(self) -> Path:
        return self.autointerp / layout.TOPK_FEATURES

    @property
    def explanations(self) -> Path:
        return self.autointerp / layout.EXPLANATIONS

    @property
    def scores(self) -> Path:
        return self.autointerp / layout.SCORES

    @property
    def metrics(self) -> Path:
        return self.run / layout.METRICS

    @property
    def graph_metadata(self) -> Path:
        return self.graphs / layout.GRAPH_METADATA

    @property
    def graph_summary(self) -> Path:
        return self.graphs / layout.GRAPH_SUMMARY

    def missing(self, kind: str) -> Missing | None:
        """None when the output `kind` (features, explanations, scores, metrics, graphs) exists."""
        graphs = (f"clt-ray export {self.run} {self.graphs / 'clt'} && clt-ray attribute "
                  f"--clt {self.graphs / 'clt'} --prompt TEXT --out {self.graphs}")
        autointerp = (f"clt-ray autointerp --config CONFIG.yaml --out {self.autointerp}  "
                      f"(CONFIG.yaml like examples/autointerp.yaml, with checkpoint: {self.run})")
        table = {
            "features": ("Top activating examples (auto-interp top-k)", self.features,
                         autointerp),
            "explanations": ("Feature explanations (auto-interp)", self.explanations,
                             autointerp),
            "scores": ("Explanation scores (auto-interp)", self.scores, autointerp),
            "metrics": ("Training metrics", self.metrics,
                        f"clt-ray train --config CONFIG.yaml --run-dir {self.run}"),
            "graphs": ("Attribution graphs", self.graph_metadata, graphs),
        }
        what, path, command = table[kind]
        return None if path.is_file() else Missing(what, str(path), command)

    def status(self) -> dict[str, dict | None]:
        """Every output kind → None (present) or its Missing as JSON."""
        kinds = ("metrics", "features", "explanations", "scores", "graphs")
        return {k: (m.to_json() if (m := self.missing(k)) else None) for k in kinds}
