"""circuit-tracer's bundled frontend over an attribution output folder, on 127.0.0.1."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any


def serve_frontend(data_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8032
                   ) -> Any:
    """circuit-tracer's bundled frontend over `data_dir` (graph JSON, graph-metadata.json,
    features/), on `host` (its own `serve` binds every interface). Returns its Server (`.stop()`,
    `.httpd.server_address`); port 0 picks a free one."""
    import threading

    from circuit_tracer.frontend.local_server import (
        DEFAULT_FRONTEND_DIR,
        CircuitGraphHandler,
        ReusableTCPServer,
        Server,
    )

    handler = functools.partial(CircuitGraphHandler, frontend_dir=DEFAULT_FRONTEND_DIR,
                                data_dir=str(Path(data_dir).resolve()))
    httpd = ReusableTCPServer((host, port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return Server(httpd, thread)
