"""`clt-ray serve`: a local web viewer over a run folder — feature browser and dashboards from the
auto-interp Parquet outputs, attribution graphs in circuit-tracer's frontend, training curves;
and `clt-ray serve-graphs`: that frontend alone over one `attribute` output folder.

No Ray here; Starlette + uvicorn and build-free pages in static/. See app.py.
"""

from clt_ray.viewer.app import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    GRAPHS_PORT,
    GraphsServer,
    ViewerServer,
    create_app,
    create_graphs_app,
    serve,
)
from clt_ray.viewer.paths import RunPaths

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "GRAPHS_PORT", "GraphsServer", "RunPaths",
           "ViewerServer", "create_app", "create_graphs_app", "serve"]
