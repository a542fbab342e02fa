"""The viewer's web app (Starlette): build-free HTML pages in static/ that fetch a small JSON API,
circuit-tracer's graph frontend under /ct/, and the run's files read through `safe_path` only.

Pages whose output is missing answer with a page naming the file and the command that makes it;
errors are one-line messages, never tracebacks. `serve` binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import html
import logging
import threading
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from typing_extensions import Self

from clt_ray.viewer.data import SORTS, NotFound, RunData
from clt_ray.viewer.frontend import assets_dir, index_html
from clt_ray.viewer.paths import BadPath, Missing, RunPaths, safe_path

STATIC = Path(__file__).parent / "static"
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>clt-ray viewer</title>
<link rel="icon" href="/favicon.ico">
<link rel="stylesheet" href="/static/viewer.css">
<main id="main"><p>loading…</p></main>
<script src="/static/common.js"></script>
<script src="/static/{script}.js"></script>
"""
"""Every page: common.js draws the frame, the page's script fills <main> from the JSON API."""
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
LOCAL_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]
FAVICON = (b"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'>"
           b"<circle cx='8' cy='8' r='6' fill='#e8590c'/></svg>")
log = logging.getLogger("clt_ray.viewer")


class BadRequest(ValueError):
    """A query parameter that is not what the endpoint takes."""


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    """A server-rendered page in the viewer's frame (missing outputs, errors)."""
    return HTMLResponse(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)} · clt-ray</title>"
        "<link rel='icon' href='/favicon.ico'><link rel='stylesheet' href='/static/viewer.css'>"
        "<nav class='top'><a href='/'>clt-ray viewer</a><a href='/features'>features</a>"
        "<a href='/graphs'>graphs</a><a href='/training'>training</a></nav>"
        f"<main><h1>{html.escape(title)}</h1>{body}</main>", status_code=status)


def missing_page(title: str, missing: Missing) -> HTMLResponse:
    return _page(title, f"<div class='missing'><p>{html.escape(missing.what)} is missing: "
                        f"<code>{html.escape(missing.path)}</code></p><p>Make it with:</p>"
                        f"<pre>{html.escape(missing.command)}</pre></div>")


def error_response(request: Request, status: int, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    return _page({400: "Bad request", 404: "Not found"}.get(status, "Error"),
                 f"<p class='error'>{html.escape(message)}</p>", status)


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None


def _float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return None
    try:
        return float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {raw!r}") from None


def create_app(paths: RunPaths, allowed_hosts: list[str] | None = None) -> Starlette:
    """The app over one run. `allowed_hosts` guards the Host header (DNS rebinding); default:
    the loopback names. Endpoints are plain functions: Starlette runs them in its thread pool,
    so a slow Parquet read never stalls the other requests."""
    data = RunData(paths)

    def need(kind: str) -> Missing | None:
        return paths.missing(kind)

    def static_page(name: str) -> HTMLResponse:
        """The page shell with the page's script (static/<name>.js) in it."""
        return HTMLResponse(PAGE.replace("{script}", name))

    # --- pages -----------------------------------------------------------------------------

    def home(request: Request) -> Response:
        return static_page("index")

    def features_page(request: Request) -> Response:
        if m := need("features"):
            return missing_page("Features", m)
        return static_page("features")

    def feature_page(request: Request) -> Response:
        if m := need("features"):
            return missing_page("Feature", m)
        layer, feature = request.path_params["layer"], request.path_params["feature"]
        data.check_feature(layer, feature)  # NotFound → a 404 page naming it
        return static_page("feature")

    def graphs_page(request: Request) -> Response:
        if m := need("graphs"):
            return missing_page("Attribution graphs", m)
        return static_page("graphs")

    def graph_page(request: Request) -> Response:
        if m := need("graphs"):
            return missing_page("Attribution graph", m)
        if request.path_params["slug"] not in data.graph_slugs():
            raise NotFound(f"no graph {request.path_params['slug']!r} in {paths.graph_metadata}")
        return static_page("graph")

    def training_page(request: Request) -> Response:
        if m := need("metrics"):
            return missing_page("Training curves", m)
        return static_page("training")

    # --- API -------------------------------------------------------------------------------

    def api_missing(kind: str) -> JSONResponse | None:
        m = need(kind)
        return JSONResponse(m.to_json(), status_code=404) if m else None

    def api_run(request: Request) -> Response:
        return JSONResponse({"run": str(paths.run), "graphs": str(paths.graphs),
                             "autointerp": str(paths.autointerp), "outputs": paths.status(),
                             "summary": data.summary()})

    def api_features(request: Request) -> Response:
        if r := api_missing("features"):
            return r
        q = request.query_params.get("q") or None
        if q and (r := api_missing("explanations")):
            return r
        min_score = _float(request, "min_score")
        if min_score is not None and (r := api_missing("scores")):
            return r
        sort = request.query_params.get("sort") or "feature"
        if sort not in SORTS:
            raise BadRequest(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
        return JSONResponse(data.list_features(
            layer=_int(request, "layer"), q=q, min_density=_float(request, "min_density"),
            max_density=_float(request, "max_density"), min_score=min_score, sort=sort,
            offset=_int(request, "offset", 0), limit=_int(request, "limit", 50)))

    def api_layers(request: Request) -> Response:
        return api_missing("features") or JSONResponse({"layers": data.layers()})

    def api_feature(request: Request) -> Response:
        if r := api_missing("features"):
            return r
        row = data.feature(request.path_params["layer"], request.path_params["feature"])
        row["missing"] = {k: m.to_json() for k in ("explanations", "scores") if (m := need(k))}
        return JSONResponse(row)

    def api_graphs(request: Request) -> Response:
        return api_missing("graphs") or JSONResponse(data.list_graphs(
            offset=_int(request, "offset", 0), limit=_int(request, "limit", 50)))

    def api_graph_node(request: Request) -> Response:
        return api_missing("graphs") or JSONResponse(
            data.graph_node(request.path_params["slug"], request.path_params["node_id"]))

    def api_metrics(request: Request) -> Response:
        return api_missing("metrics") or JSONResponse(data.metrics())

    # --- files -----------------------------------------------------------------------------

    def static_file(request: Request) -> Response:
        return _file(STATIC, request.path_params["path"])

    def ct_asset(request: Request) -> Response:
        rel = request.path_params["path"]
        if rel in ("", "index.html"):
            return HTMLResponse(index_html())
        if not rel.endswith((".js", ".css")):  # its other pages load scripts from the web
            safe_path(assets_dir(), rel)  # a traversal is refused as one (400)
            raise NotFound(f"no file {rel}")
        return _file(assets_dir(), rel)

    def ct_data(request: Request) -> Response:
        if m := need("graphs"):
            return JSONResponse(m.to_json(), status_code=404)
        return _file(paths.graphs, request.path_params["path"])

    def favicon(request: Request) -> Response:
        return Response(FAVICON, media_type="image/svg+xml")

    # --- errors ----------------------------------------------------------------------------

    async def on_not_found(request: Request, exc: Exception) -> Response:
        return error_response(request, 404, str(exc))

    async def on_bad_request(request: Request, exc: Exception) -> Response:
        return error_response(request, 400, f"refused: {exc}" if isinstance(exc, BadPath)
                              else str(exc))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no page at {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(request, exc.status_code, message)

    async def on_error(request: Request, exc: Exception) -> Response:
        log.error("viewer error on %s", request.url.path, exc_info=exc)
        return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [
        Route("/", home), Route("/features", features_page),
        Route("/feature/{layer:int}/{feature:int}", feature_page),
        Route("/graphs", graphs_page), Route("/graph/{slug}", graph_page),
        Route("/training", training_page),
        Route("/api/run", api_run), Route("/api/features", api_features),
        Route("/api/layers", api_layers),
        Route("/api/feature/{layer:int}/{feature:int}", api_feature),
        Route("/api/graphs", api_graphs),
        Route("/api/graph/{slug}/node/{node_id}", api_graph_node),
        Route("/api/metrics", api_metrics),
        Route("/static/{path:path}", static_file),
        Route("/ct/data/{path:path}", ct_data), Route("/ct/graph_data/{path:path}", ct_data),
        Route("/ct/{path:path}", ct_asset),
        Route("/favicon.ico", favicon),
    ]
    handlers: dict[Any, Any] = {NotFound: on_not_found, BadPath: on_bad_request,
                                BadRequest: on_bad_request, HTTPException: on_http,
                                Exception: on_error}
    hosts = allowed_hosts or LOCAL_HOSTS
    return Starlette(routes=routes, exception_handlers=handlers,
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])


def _file(root: Path, rel: str) -> Response:
    """A file under root (BadPath if the path would leave it; NotFound if it is not there)."""
    path = safe_path(root, rel)
    if not path.is_file():
        raise NotFound(f"no file {rel}")
    return FileResponse(path)


class ViewerServer:
    """uvicorn serving the app from a background thread (`url`, `stop()`); port 0 picks a free
    port."""

    def __init__(self, paths: RunPaths, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 log_level: str = "warning") -> None:
        import socket

        import uvicorn

        hosts = ["*"] if host in ("0.0.0.0", "::", "") else sorted({*LOCAL_HOSTS, host})
        self.app = create_app(paths, hosts)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))  # bound here: a busy port fails before the thread starts
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level=log_level, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> Self:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the viewer's server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(paths: RunPaths, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> ViewerServer:
    """Start the viewer in a background thread and return it (the caller waits and stops it)."""
    return ViewerServer(paths, host, port).start()
