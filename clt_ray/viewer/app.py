"""The viewer's web app (Starlette): build-free HTML pages in static/ that fetch a small JSON API,
circuit-tracer's graph frontend under /ct/, and the run's files read through `safe_path` only.
`create_graphs_app` is that frontend alone at / over one `attribute` output folder (`clt-ray
serve-graphs`), with the same guards, in place of circuit-tracer's own server (which serves any
file on the machine and takes any Host header).

Pages whose output is missing answer with a page naming the file and the command that makes it;
an output that cannot be read, with a page naming it relative to the run folder; bad query values
are 400s; errors are one-line messages, never tracebacks or absolute paths. Servers bind
127.0.0.1 unless told otherwise and answer only requests whose Host header names where they are
bound (DNS rebinding).
"""

from __future__ import annotations

import html
import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.convertors import IntegerConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from typing_extensions import Self

from clt_ray.viewer.data import SORTS, NotFound, RunData, Unreadable
from clt_ray.viewer.frontend import assets_dir, index_html
from clt_ray.viewer.paths import BadPath, Missing, RunPaths, is_file, safe_path, shorten

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
GRAPHS_PORT = 8032  # circuit-tracer's own default
NAV = ("<nav class='top'><a href='/'>clt-ray viewer</a><a href='/features'>features</a>"
       "<a href='/graphs'>graphs</a><a href='/training'>training</a></nav>")
GRAPHS_NAV = "<nav class='top'><a href='/'>attribution graphs</a></nav>"
JSON_PREFIXES = ("/api/", "/ct/data/", "/ct/graph_data/", "/data/", "/graph_data/")
"""Paths whose errors are JSON (fetched by scripts), not pages."""
INT_RANGE = (-(2**31), 2**31 - 1)
LOCAL_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]
FAVICON = (b"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'>"
           b"<circle cx='8' cy='8' r='6' fill='#e8590c'/></svg>")
log = logging.getLogger("clt_ray.viewer")


class SmallInt(IntegerConvertor):
    """A path's layer or feature: at most 9 digits, so an int32 (Starlette's `int` takes any
    number of digits, and Python refuses to parse over 4300: a 500)."""

    regex = "[0-9]{1,9}"


register_url_convertor("small_int", SmallInt())


class BadRequest(ValueError):
    """A query parameter that is not what the endpoint takes."""


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith(JSON_PREFIXES)


def _page(title: str, body: str, status: int = 200, nav: str = NAV) -> HTMLResponse:
    """A server-rendered page in the viewer's frame (missing outputs, errors)."""
    return HTMLResponse(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)} · clt-ray</title>"
        "<link rel='icon' href='/favicon.ico'><link rel='stylesheet' href='/static/viewer.css'>"
        f"{nav}<main><h1>{html.escape(title)}</h1>{body}</main>", status_code=status)


def missing_page(title: str, missing: Missing) -> HTMLResponse:
    return _page(title, f"<div class='missing'><p>{html.escape(missing.what)} is missing: "
                        f"<code>{html.escape(missing.path)}</code></p><p>Make it with:</p>"
                        f"<pre>{html.escape(missing.command)}</pre></div>")


def error_response(request: Request, status: int, message: str, title: str | None = None
                   ) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    title = title or {400: "Bad request", 404: "Not found"}.get(status, "Error")
    return _page(title, f"<p class='error'>{html.escape(message)}</p>", status,
                 getattr(request.app.state, "nav", NAV))


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    """Query parameter `name` as an int32 (BadRequest otherwise)."""
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise BadRequest(f"{name} must be an integer from {INT_RANGE[0]} to {INT_RANGE[1]}, "
                         f"got {shorten(raw)!r}")
    return value


def _float(request: Request, name: str) -> float | None:
    """Query parameter `name` as a finite float (BadRequest for text, nan, inf, 1e400)."""
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {shorten(raw)!r}")
    return value


async def _on_not_found(request: Request, exc: Exception) -> Response:
    return error_response(request, 404, str(exc))


async def _on_bad_request(request: Request, exc: Exception) -> Response:
    return error_response(request, 400, f"refused: {exc}" if isinstance(exc, BadPath)
                          else str(exc))


async def _on_unreadable(request: Request, exc: Exception) -> Response:
    """An output that is there but unreadable: its file (relative to the run), its program."""
    return error_response(request, 500, str(exc), "Unreadable output")


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no page at {shorten(request.url.path)}"}.get(exc.status_code,
                                                                   str(exc.detail))
    return error_response(request, exc.status_code, message)


async def _on_error(request: Request, exc: Exception) -> Response:
    """Anything else: logged with its traceback here, answered without it (an exception's text
    may hold absolute or install paths)."""
    log.error("viewer error on %s", shorten(request.url.path), exc_info=exc)
    return error_response(request, 500, f"internal error ({type(exc).__name__}); the server's "
                                        "log has the details")


HANDLERS: dict[Any, Any] = {NotFound: _on_not_found, BadPath: _on_bad_request,
                            BadRequest: _on_bad_request, Unreadable: _on_unreadable,
                            HTTPException: _on_http, Exception: _on_error}


def _app(routes: list[Route], allowed_hosts: list[str] | None, nav: str) -> Starlette:
    """A Starlette app with the error handlers above and the Host allow-list (default: the
    loopback names)."""
    app = Starlette(routes=routes, exception_handlers=HANDLERS, middleware=[
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOCAL_HOSTS)])
    app.state.nav = nav
    return app


def _frontend_routes(prefix: str, graphs: Path,
                     guard: Callable[[], Response | None] = lambda: None) -> list[Route]:
    """circuit-tracer's graph frontend under `prefix`: its index.html made offline, its scripts
    and styles, and the graph files it fetches (data/, graph_data/) from the folder `graphs`,
    each through `safe_path`. `guard` may answer a data request instead (a missing output)."""

    def data(request: Request) -> Response:
        return guard() or _file(graphs, request.path_params["path"])

    def asset(request: Request) -> Response:
        rel = request.path_params["path"]
        if rel in ("", "index.html"):
            return HTMLResponse(index_html())
        if not rel.endswith((".js", ".css")):  # its other pages load scripts from the web
            safe_path(assets_dir(), rel)  # a traversal is refused as one (400)
            raise NotFound(f"no file {shorten(rel)}")
        return _file(assets_dir(), rel)

    return [Route(f"{prefix}/data/{{path:path}}", data),
            Route(f"{prefix}/graph_data/{{path:path}}", data),
            Route(f"{prefix}/{{path:path}}", asset)]


def _static(request: Request) -> Response:
    return _file(STATIC, request.path_params["path"])


def _favicon(request: Request) -> Response:
    return Response(FAVICON, media_type="image/svg+xml")


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
        data.check_features()  # Unreadable → a page naming the file
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
        data.graph_slugs()  # Unreadable → a page naming the file
        return static_page("graphs")

    def graph_page(request: Request) -> Response:
        if m := need("graphs"):
            return missing_page("Attribution graph", m)
        if (slug := request.path_params["slug"]) not in data.graph_slugs():
            raise NotFound(f"no graph {shorten(slug)!r} in {paths.show(paths.graph_metadata)}")
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

    routes = [
        Route("/", home), Route("/features", features_page),
        Route("/feature/{layer:small_int}/{feature:small_int}", feature_page),
        Route("/graphs", graphs_page), Route("/graph/{slug}", graph_page),
        Route("/training", training_page),
        Route("/api/run", api_run), Route("/api/features", api_features),
        Route("/api/layers", api_layers),
        Route("/api/feature/{layer:small_int}/{feature:small_int}", api_feature),
        Route("/api/graphs", api_graphs),
        Route("/api/graph/{slug}/node/{node_id}", api_graph_node),
        Route("/api/metrics", api_metrics),
        Route("/static/{path:path}", _static), Route("/favicon.ico", _favicon),
        *_frontend_routes("/ct", paths.graphs, lambda: api_missing("graphs")),
    ]
    return _app(routes, allowed_hosts, NAV)


def create_graphs_app(folder: str | os.PathLike[str], allowed_hosts: list[str] | None = None
                      ) -> Starlette:
    """circuit-tracer's graph frontend alone at / over an `attribute` output folder: the URLs of
    its own server (/index.html, /data/…, /graph_data/…), read-only (no Save), offline, every
    file through `safe_path` and the Host allow-list of `create_app`."""
    folder = Path(folder).resolve()
    routes = [Route("/static/{path:path}", _static), Route("/favicon.ico", _favicon),
              *_frontend_routes("", folder)]
    return _app(routes, allowed_hosts, GRAPHS_NAV)


def _file(root: Path, rel: str) -> Response:
    """A file under root (BadPath if the path would leave it; NotFound if it is not there)."""
    path = safe_path(root, rel)
    if not is_file(path):
        raise NotFound(f"no file {shorten(rel)}")
    return FileResponse(path)


class AppServer:
    """uvicorn serving `make_app(allowed_hosts)` from a background thread (`url`, `stop()`);
    the Host header must name `host` or a loopback name unless `host` is every interface; port 0
    picks a free port."""

    def __init__(self, make_app: Callable[[list[str]], Starlette], host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT, log_level: str = "warning") -> None:
        import socket

        import uvicorn

        hosts = ["*"] if host in ("0.0.0.0", "::", "") else sorted({*LOCAL_HOSTS, host})
        self.app = make_app(hosts)
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


class ViewerServer(AppServer):
    """The viewer over one run (`create_app`)."""

    def __init__(self, paths: RunPaths, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 log_level: str = "warning") -> None:
        super().__init__(lambda hosts: create_app(paths, hosts), host, port, log_level)


class GraphsServer(AppServer):
    """circuit-tracer's graph frontend over one `attribute` output folder
    (`create_graphs_app`; `clt-ray serve-graphs`)."""

    def __init__(self, folder: str | os.PathLike[str], host: str = DEFAULT_HOST,
                 port: int = GRAPHS_PORT, log_level: str = "warning") -> None:
        super().__init__(lambda hosts: create_graphs_app(folder, hosts), host, port, log_level)


def serve(paths: RunPaths, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> ViewerServer:
    """Start the viewer in a background thread and return it (the caller waits and stops it)."""
    return ViewerServer(paths, host, port).start()
