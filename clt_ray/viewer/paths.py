"""Where a run's outputs are, what is missing and the command that makes it, and the one
function every file read from a URL goes through (`safe_path`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from clt_ray import layout

MAX_URL_PATH = 4096
"""Longer file paths in a URL are refused before touching the file system."""


def shorten(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters, for echoing a request's value back in a message."""
    return text if len(text) <= limit else text[:limit] + "…"


class BadPath(ValueError):
    """A URL path that would leave its served folder (its message echoes the path, shortened)."""

    def __init__(self, rel: str) -> None:
        super().__init__(shorten(rel))


def safe_path(root: str | os.PathLike[str], rel: str) -> Path:
    """root/rel, refused (BadPath) unless it stays inside root: no '..' parts, no absolute or
    drive paths, no backslashes or NULs, not over MAX_URL_PATH, and after resolving symlinks
    still under root (a name the OS refuses, e.g. too long, or a symlink loop, is refused too)."""
    if not rel or len(rel) > MAX_URL_PATH or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        raise BadPath(rel)
    parts = rel.split("/")
    if any(p in ("..", ".") or p.endswith(":") for p in parts if p) or "" in parts[:-1]:
        raise BadPath(rel)
    try:
        base = Path(root).resolve()
        path = (base / rel).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        raise BadPath(rel) from None
    if not path.is_relative_to(base):
        raise BadPath(rel)
    return path


def is_file(path: Path) -> bool:
    """Path.is_file that answers False where the OS refuses the name (e.g. ENAMETOOLONG)."""
    try:
        return path.is_file()
    except OSError:
        return False


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


class Output(NamedTuple):
    """One kind of run output: what it is, its file, the full command that makes it (with the
    run's paths) and the program that does (`clt-ray autointerp`)."""

    what: str
    path: Path
    command: str
    program: str


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

    def show(self, path: Path) -> str:
        """`path` as the viewer's messages name it: relative to the run folder, never absolute."""
        return Path(os.path.relpath(path, self.run)).as_posix()

    def output(self, kind: str) -> Output:
        """The output `kind`: features, explanations, scores, metrics or graphs."""
        graphs = (f"clt-ray export {self.run} {self.graphs / 'clt'} && clt-ray attribute "
                  f"--clt {self.graphs / 'clt'} --prompt TEXT --out {self.graphs}")
        autointerp = (f"clt-ray autointerp --config CONFIG.yaml --out {self.autointerp}  "
                      f"(CONFIG.yaml like examples/autointerp.yaml, with checkpoint: {self.run})")
        return {
            "features": Output("Top activating examples (auto-interp top-k)", self.features,
                               autointerp, "clt-ray autointerp"),
            "explanations": Output("Feature explanations (auto-interp)", self.explanations,
                                   autointerp, "clt-ray autointerp"),
            "scores": Output("Explanation scores (auto-interp)", self.scores, autointerp,
                             "clt-ray autointerp"),
            "metrics": Output("Training metrics", self.metrics,
                              f"clt-ray train --config CONFIG.yaml --run-dir {self.run}",
                              "clt-ray train"),
            "graphs": Output("Attribution graphs", self.graph_metadata, graphs,
                             "clt-ray attribute"),
        }[kind]

    def missing(self, kind: str) -> Missing | None:
        """None when the output `kind` exists."""
        out = self.output(kind)
        return None if out.path.is_file() else Missing(out.what, self.show(out.path), out.command)

    def status(self) -> dict[str, dict | None]:
        """Every output kind → None (present) or its Missing as JSON."""
        kinds = ("metrics", "features", "explanations", "scores", "graphs")
        return {k: (m.to_json() if (m := self.missing(k)) else None) for k in kinds}
