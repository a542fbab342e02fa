"""circuit-tracer's bundled graph frontend, served from the installed package and made to work
offline: its index.html loads d3, d3-jetpack, dagre and pako from the web, so those script tags
are pointed at the copies in static/vendor/ (and the dev-only hot-reload and npy scripts dropped).
Nothing of circuit-tracer is copied into this repository."""

from __future__ import annotations

import functools
import re
from importlib.resources import files
from pathlib import Path

VENDOR = {  # basename of the remote script → our local copy (None: not needed, dropped)
    "d3.js": "/static/vendor/d3v7+jetpack.js",
    "jetpack_2024-07-20.js": None,  # d3v7+jetpack.js is d3 with jetpack
    "npy_v0.js": None,  # reads .npy files, which local graphs do not use
    "hotserver-client-ws.js": None,  # the authors' live-reload client
    "dagre.min.js": "/static/vendor/dagre.min.js",
    "pako.min.js": "/static/vendor/pako_inflate.min.js",
}
REMOTE_SCRIPT = re.compile(r"<script src='(https?://[^']+)'></script>\n?")
READ_ONLY = "<style>.save-button{display:none !important}</style>\n"
"""The frontend's Save button POSTs into the data folder; this viewer never writes."""


def assets_dir() -> Path:
    """circuit-tracer's frontend/assets folder in the installed package."""
    return Path(str(files("circuit_tracer") / "frontend" / "assets"))


def _local(match: re.Match) -> str:
    name = match.group(1).rsplit("/", 1)[-1]
    local = VENDOR.get(name)
    return f"<script src='{local}'></script>\n" if local else ""


@functools.lru_cache(maxsize=1)
def index_html() -> str:
    """The frontend's index.html with every remote script replaced by a local one or dropped."""
    html = REMOTE_SCRIPT.sub(_local, (assets_dir() / "index.html").read_text())
    if "://" in "".join(re.findall(r"<script src='([^']+)'", html)):
        raise RuntimeError("circuit-tracer's index.html loads a script this viewer has no copy of")
    return html.replace("<title>", READ_ONLY + "<title>", 1)
