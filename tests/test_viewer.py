"""`clt-ray serve` over HTTP: the JSON API (pagination, search, filters, one feature, graphs,
metrics) against the run folder made by the real pipeline (conftest `viewer_run`), missing
outputs named with the command that makes them, unreadable ones named relative to the run, bad
query values refused as 400s, no internal paths in any error, path traversal refused, 127.0.0.1 by
default; and `clt-ray serve-graphs` (circuit-tracer's frontend alone) under the same attacks."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from clt_ray.viewer import DEFAULT_HOST, GraphsServer, RunPaths, ViewerServer
from clt_ray.viewer.data import RunData

EXE = Path(sys.executable).parent / "clt-ray"
INSTALL_PATHS = (sysconfig.get_paths()["purelib"], sys.prefix,
                 str(Path(__file__).resolve().parents[1]))
"""Where Python, the packages and this repository are: no response may show them."""
ATTACKS = [
    "/data/../../../../../../etc/passwd", "/graph_data//etc/hostname",  # issue 19, as sent
    "/graph_data/../../../../etc/passwd", "/data//etc/passwd", "/data/features//etc/passwd",
    "/data/..%2f..%2f..%2f..%2fetc/passwd", "/data/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/data/%2fetc%2fpasswd", "/graph_data/%2Fetc%2Fhostname", "/data/..\\..\\..\\etc\\passwd",
    "/data/C:/Windows/win.ini", "/data/x%00.json", "/data/features/../../../../etc/passwd",
    "/data/escape/passwd", "/graph_data/secret.json", "/data/loop/x.json",  # symlinks out, loop
    "/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2f..%2fetc/passwd",
    "/static/../../../../etc/passwd", "/static/..%2f..%2f..%2fpyproject.toml",
    "/data/" + "a" * 100_000,
]
"""Requests for files outside the served graphs folder (paths relative to circuit-tracer's
frontend root: `clt-ray serve-graphs` serves it at /, `clt-ray serve` under /ct)."""


@pytest.fixture(scope="module")
def server(viewer_run):
    with ViewerServer(RunPaths.of(viewer_run), port=0) as s:
        yield s


def raw_get(server: ViewerServer, path: str, host: str | None = None, method: str = "GET"
            ) -> tuple[int, str]:
    """GET with the path sent exactly as written (no client-side normalisation)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host or f"{server.host}:{server.port}")
    conn.endheaders()
    res = conn.getresponse()
    body = res.read().decode(errors="replace")
    conn.close()
    return res.status, body


def no_internals(body: str, *paths: Path | str) -> bool:
    """No traceback, no install path, none of `paths` (absolute) in a response."""
    return "Traceback" not in body and not any(str(p) in body for p in (*INSTALL_PATHS, *paths))


def start_cli(*args: str) -> tuple[subprocess.Popen, SimpleNamespace]:
    """`clt-ray ARGS` in the background, once it prints its URL: (process, its host and port)."""
    proc = subprocess.Popen([str(EXE), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    line = ""
    deadline = time.monotonic() + 60
    while "http://" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"clt-ray {args[0]} exited"
    match = re.search(r"http://([^/:]+):(\d+)/", line)
    assert match, line
    return proc, SimpleNamespace(host=match.group(1), port=int(match.group(2)))


def get_json(server: ViewerServer, path: str) -> tuple[int, dict]:
    status, body = raw_get(server, path)
    return status, json.loads(body)


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_features_are_paginated_in_file_order(server, viewer_run):
    rows = table(viewer_run / "autointerp" / "features.parquet")
    keys = [(r["layer"], r["feature"]) for r in rows]
    status, first = get_json(server, "/api/features?limit=7")
    assert status == 200 and first["total"] == len(rows)
    status, second = get_json(server, "/api/features?limit=7&offset=7")
    got = [(r["layer"], r["feature"]) for r in first["items"] + second["items"]]
    assert got == keys[:14]
    _, tail = get_json(server, f"/api/features?limit=50&offset={len(rows) - 3}")
    assert [(r["layer"], r["feature"]) for r in tail["items"]] == keys[-3:]
    assert set(first["items"][0]) >= {"frequency", "fired", "max_activation", "explanation",
                                      "score"}
    assert "top_examples" not in first["items"][0]  # lists read only the small columns


def test_search_finds_a_feature_by_a_word_of_its_explanation(server, viewer_run):
    explained = [r for r in table(viewer_run / "autointerp" / "explanations.parquet") if r["ok"]]
    target = next(r for r in explained
                  if sum(r["explanation"] == e["explanation"] for e in explained) == 1)
    word = target["explanation"].split("'")[1]
    status, page = get_json(server, f"/api/features?q={word.upper()}&limit=100")
    assert status == 200
    hits = {(r["layer"], r["feature"]) for r in page["items"]}
    expected = {(r["layer"], r["feature"]) for r in explained
                if word.lower() in r["explanation"].lower()}
    assert hits == expected and (target["layer"], target["feature"]) in hits
    assert all(word.lower() in r["explanation"].lower() for r in page["items"])
    _, none = get_json(server, "/api/features?q=zzzz-no-such-word")
    assert none["total"] == 0 and none["items"] == []


def test_layer_density_and_score_filters(server, viewer_run):
    rows = table(viewer_run / "autointerp" / "features.parquet")
    scores = table(viewer_run / "autointerp" / "scores.parquet")
    _, page = get_json(server, "/api/features?layer=2&min_density=0.01&max_density=0.1&limit=500")
    expected = [(r["layer"], r["feature"]) for r in rows
                if r["layer"] == 2 and 0.01 <= r["frequency"] <= 0.1]
    assert page["total"] == len(expected) > 0
    assert [(r["layer"], r["feature"]) for r in page["items"]] == expected
    by_feature: dict[tuple[int, int], list[float]] = {}
    for s in scores:
        if s["ok"] and s["auc"] is not None:
            by_feature.setdefault((s["layer"], s["feature"]), []).append(s["auc"])
    good = {k for k, v in by_feature.items() if sum(v) / len(v) >= 0.9}
    _, page = get_json(server, "/api/features?min_score=0.9&limit=500")
    assert {(r["layer"], r["feature"]) for r in page["items"]} == good
    assert all(r["score"] >= 0.9 for r in page["items"])


def test_features_sorted_by_a_column_are_paginated(server, viewer_run):
    rows = table(viewer_run / "autointerp" / "features.parquet")
    for sort, column in [("density", "frequency"), ("max_activation", "max_activation")]:
        expected = [(r["layer"], r["feature"]) for r in sorted(
            (r for r in rows if r["layer"] == 1),
            key=lambda r: (-r[column], r["layer"], r["feature"]))]
        got = []
        for offset in (0, 9, 18):
            _, page = get_json(server, f"/api/features?layer=1&sort={sort}&limit=9&offset={offset}")
            got += [(r["layer"], r["feature"]) for r in page["items"]]
        assert page["total"] == len(expected) and got == expected[:27]
    status, body = get_json(server, "/api/features?sort=bogus")
    assert status == 400 and "sort must be one of" in body["error"]


def test_one_feature_has_its_dashboard(server, viewer_run):
    explained = next(r for r in table(viewer_run / "autointerp" / "explanations.parquet")
                     if r["ok"])
    layer, feature = explained["layer"], explained["feature"]
    status, row = get_json(server, f"/api/feature/{layer}/{feature}")
    assert status == 200
    source = next(r for r in table(viewer_run / "autointerp" / "features.parquet")
                  if (r["layer"], r["feature"]) == (layer, feature))
    assert len(row["top_examples"]) == len(source["top_examples"]) > 0
    for got, want in zip(row["top_examples"], source["top_examples"]):
        assert got["tokens"] == want["tokens"] and got["position"] == want["position"]
        assert got["acts"] == pytest.approx(want["acts"])
    assert row["decoder_norms"] == pytest.approx(source["decoder_norms"])
    assert len(row["histogram_edges"]) == len(row["histogram"]) + 1
    assert row["explanation"]["explanation"] == explained["explanation"]
    assert {s["scorer"] for s in row["scores"]} <= {"detection", "fuzzing"}
    status, html = raw_get(server, f"/feature/{layer}/{feature}")
    assert status == 200 and "/static/feature.js" in html


def test_a_feature_page_reads_one_row_group(viewer_run, tmp_path, monkeypatch):
    from clt_ray.fsutil import atomic_write_parquet

    out = tmp_path / "autointerp"
    out.mkdir()
    table = pq.read_table(viewer_run / "autointerp" / "features.parquet")
    pq.write_table(table, out / "features.parquet", row_group_size=100)
    shutil.copy(viewer_run / "autointerp" / "explanations.parquet", out)
    atomic_write_parquet([], out / "scores.parquet")  # nothing scored: a table without columns
    data = RunData(RunPaths.of(viewer_run, autointerp=out))
    reads: list[tuple[int, list | None]] = []
    read = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, columns=None, **kw:
                        reads.append((i, columns)) or read(self, i, columns=columns, **kw))
    rows = table.to_pylist()
    for r in rows[::173] + rows[-1:]:
        reads.clear()
        got = data.feature(r["layer"], r["feature"])
        assert (got["fired"], got["decoder_norms"]) == (r["fired"], pytest.approx(
            r["decoder_norms"]))
        assert [i for i, columns in reads if columns is None] == [rows.index(r) // 100]
        assert got["scores"] == []
    assert data.list_features(min_score=0.0)["total"] == 0
    assert data.list_features(limit=2)["items"][0]["score"] is None


def test_graphs_nodes_and_metrics(server, viewer_run):
    meta = json.loads((viewer_run / "graphs" / "graph-metadata.json").read_text())["graphs"]
    status, page = get_json(server, "/api/graphs")
    assert status == 200 and page["total"] == len(meta)
    g = page["items"][0]
    assert g["replacement"] == pytest.approx(meta[0]["replacement_score"])
    assert g["nodes"] > 0 and g["edges"] > 0
    graph = json.loads((viewer_run / "graphs" / f"{g['slug']}.json").read_text())
    node = next(n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
    _, got = get_json(server, f"/api/graph/{g['slug']}/node/{node['node_id']}")
    assert (got["layer"], got["feature"]) == (int(node["layer"]),
                                              int(node["node_id"].split("_")[1]))
    logit = next(n for n in graph["nodes"] if n["feature_type"] == "logit")
    _, got = get_json(server, f"/api/graph/{g['slug']}/node/{logit['node_id']}")
    assert got.get("layer") is None
    status, html = raw_get(server, "/ct/index.html")
    assert status == 200 and "https://" not in "".join(
        line for line in html.splitlines() if "<script src" in line)
    status, _ = raw_get(server, f"/ct/graph_data/{g['slug']}.json")
    assert status == 200
    lines = [json.loads(x) for x in (viewer_run / "metrics.jsonl").read_text().splitlines()]
    _, metrics = get_json(server, "/api/metrics")
    train = [x for x in lines if x["kind"] == "train"]
    assert metrics["train"]["step"] == [x["step"] for x in train]
    assert metrics["train"]["ev"][-1] == pytest.approx(train[-1]["ev"])
    assert "explained_variance" in metrics["eval"]


@pytest.mark.parametrize("path", [
    "/static/../../pyproject.toml", "/static/..%2f..%2fpyproject.toml",
    "/static/%2e%2e/%2e%2e/pyproject.toml", "/graphs/..%2f..%2fetc/passwd",
    "/ct/data/..%2f..%2f..%2fetc/passwd", "/ct/graph_data/../config.yaml",
    "/ct/..%2f..%2f..%2f..%2fetc/passwd", "/ct/data/features/..%2f..%2f..%2fconfig.yaml",
    "/ct/data/%2fetc%2fpasswd", "/ct/data/..\\..\\config.yaml",
])
def test_path_traversal_is_refused(server, path):
    status, body = raw_get(server, path)
    assert status in (400, 404)
    assert "root:" not in body and "[project]" not in body and "Traceback" not in body


def test_foreign_host_header_is_refused(server):
    status, _ = raw_get(server, "/api/run", host="evil.example:80")
    assert status == 400


@pytest.fixture(scope="module")
def graphs_dir(viewer_run, tmp_path_factory):
    """A copy of the run's graphs folder with symlinks out of it (a folder, a file) and a loop."""
    folder = tmp_path_factory.mktemp("serve-graphs") / "graphs"
    shutil.copytree(viewer_run / "graphs", folder)
    secret = folder.parent / "secret.json"
    secret.write_text('{"passwd": "root:x:0:0"}')
    (folder / "escape").symlink_to("/etc", target_is_directory=True)
    (folder / "secret.json").symlink_to(secret)
    (folder / "loop").symlink_to(folder / "loop")
    return folder


@pytest.fixture(scope="module")
def graphs_server(graphs_dir):
    with GraphsServer(graphs_dir, port=0) as s:
        yield s


@pytest.fixture(scope="module")
def ct_server(viewer_run, graphs_dir):
    with ViewerServer(RunPaths.of(viewer_run, graphs=graphs_dir), port=0) as s:
        yield s


@pytest.mark.parametrize("path", ATTACKS)
@pytest.mark.parametrize("app", ["serve-graphs", "serve"])
def test_graph_files_out_of_the_folder_are_refused(app, path, graphs_server, ct_server,
                                                    graphs_dir):
    server, prefix = (graphs_server, "") if app == "serve-graphs" else (ct_server, "/ct")
    status, body = raw_get(server, prefix + path)
    assert status in (400, 404), (status, body[:300])
    assert "root:" not in body and "[project]" not in body and len(body) < 2000
    assert no_internals(body, graphs_dir)


def test_serve_graphs_refuses_a_foreign_host(graphs_server):
    assert raw_get(graphs_server, "/index.html")[0] == 200
    for host in ("evil.example", "evil.example:8032", "127.0.0.1.evil.example"):
        assert raw_get(graphs_server, "/data/graph-metadata.json", host=host)[0] == 400, host


def test_serve_graphs_serves_circuit_tracers_frontend_for_the_folder(graphs_server, graphs_dir):
    status, page = raw_get(graphs_server, "/index.html")
    assert status == 200 and raw_get(graphs_server, "/") == (200, page)
    scripts = re.findall(r"<script src='([^']+)'", page)
    assert scripts and not [s for s in scripts if "://" in s]  # offline
    for src in scripts:  # as a browser asks for them
        assert raw_get(graphs_server, urllib.parse.urljoin("/index.html", src))[0] == 200, src
    meta = json.loads((graphs_dir / "graph-metadata.json").read_text())
    assert get_json(graphs_server, "/data/graph-metadata.json") == (200, meta)
    for entry in meta["graphs"]:
        status, graph = get_json(graphs_server, f"/graph_data/{entry['slug']}.json")
        assert status == 200 and graph["metadata"]["prompt"] == entry["prompt"]
        scan = graph["metadata"]["scan"]
        feature = next(n["feature"] for n in graph["nodes"]
                       if n["feature_type"] == "cross layer transcoder")
        status, dashboard = get_json(graphs_server, f"{scan[1:]}/{feature}.json")  # ./data/…
        assert status == 200 and dashboard["index"] == feature
    before = (graphs_dir / f"{meta['graphs'][0]['slug']}.json").read_bytes()
    status, _ = raw_get(graphs_server, f"/save_graph/{meta['graphs'][0]['slug']}", method="POST")
    assert status == 405  # read-only: circuit-tracer's server would rewrite the graph file
    assert (graphs_dir / f"{meta['graphs'][0]['slug']}.json").read_bytes() == before


def test_clt_ray_serve_graphs_binds_loopback_and_refuses_the_attacks(graphs_dir):
    proc, s = start_cli("serve-graphs", str(graphs_dir), "--port", "0")
    try:
        assert s.host == "127.0.0.1"
        assert raw_get(s, "/index.html")[0] == 200
        assert get_json(s, "/data/graph-metadata.json")[0] == 200
        for path in ATTACKS[:2]:  # issue 19's two requests, as curl --path-as-is sends them
            status, body = raw_get(s, path)
            assert status in (400, 404) and "root:" not in body, (path, body)
            assert no_internals(body, graphs_dir)
        assert raw_get(s, "/index.html", host="evil.example")[0] == 400
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("query", [
    "min_density=nan", "min_density=inf", "min_density=1e400", "max_density=-inf",
    "max_density=NaN", "min_score=1e400", "min_density=" + "9" * 100_000,
    "layer=99999999999999999999", "offset=1e3", "limit=-99999999999999999999",
])
def test_bad_query_values_are_400s_with_a_message(server, viewer_run, query):
    status, body = raw_get(server, f"/api/features?{query}")
    name = query.split("=")[0]
    assert status == 400 and json.loads(body)["error"].startswith(f"{name} must be"), body[:300]
    assert len(body) < 1000 and no_internals(body, viewer_run)


def test_long_paths_are_refused_without_internal_paths(server, viewer_run):
    for path in ["/ct/" + "a" * 100_000, "/ct/data/" + "a" * 300, "/ct/graph_data/" + "b/" * 50_000,
                 "/static/" + "a/" * 50_000, f"/api/graph/{'a' * 100_000}/node/1",
                 f"/feature/{'9' * 5000}/1", f"/api/feature/1/{'9' * 5000}"]:
        try:
            status, body = raw_get(server, path)
        except (ConnectionResetError, BrokenPipeError):  # uvicorn may drop a request line this
            continue  # long before it is all sent: refused, nothing served
        assert status in (400, 404), (path[:40], status, body[:300])
        assert len(body) < 2000 and no_internals(body, viewer_run), (path[:40], body[:300])


def _no_columns(path: Path) -> None:
    pq.write_table(pq.read_table(path).select(["layer"]), path)


@pytest.mark.parametrize("file, damage, pages", [
    ("autointerp/features.parquet", b"PAR1 not Parquet",
     ["/features", "/feature/0/1", "/api/features", "/api/feature/0/1", "/api/layers"]),
    ("autointerp/features.parquet", _no_columns, ["/features", "/api/features?limit=3"]),
    ("autointerp/explanations.parquet", b"\x00" * 64, ["/api/features?q=the", "/api/feature/0/1"]),
    ("graphs/graph-metadata.json", b'{"graphs": [', ["/graphs", "/graph/any", "/api/graphs"]),
    ("graphs/graph-metadata.json", b'{"graphs": 5}', ["/graphs", "/api/graph/any/node/1"]),
], ids=["features-not-parquet", "features-no-columns", "explanations-zeros", "metadata-torn",
        "metadata-not-a-list"])
def test_an_unreadable_output_is_a_page_naming_it_relative_to_the_run(viewer_run, tmp_path, file,
                                                                        damage, pages):
    run = tmp_path / "run"
    shutil.copytree(viewer_run, run)
    if callable(damage):
        damage(run / file)
    else:
        (run / file).write_bytes(damage)
    with ViewerServer(RunPaths.of(run), port=0) as s:
        for page in pages:
            status, body = raw_get(s, page)
            assert status == 500 and f"could not be read: {file}" in body, (page, body[:300])
            assert "Make it again with `clt-ray" in body
            assert no_internals(body, run), (page, body)
            if not page.startswith("/api/"):
                assert "<h1>Unreadable output</h1>" in body


def test_a_metrics_file_with_bad_bytes_keeps_its_good_lines(viewer_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    good = (viewer_run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe garbage\n" + good)
    with ViewerServer(RunPaths.of(run), port=0) as s:
        status, metrics = get_json(s, "/api/metrics")
    assert status == 200 and metrics["train"]["step"] == [
        json.loads(x)["step"] for x in good.decode().splitlines() if '"train"' in x]


def test_internal_errors_do_not_show_their_text(viewer_run, monkeypatch):
    def boom(self):
        raise RuntimeError(f"secret {INSTALL_PATHS[0]} {viewer_run}")

    monkeypatch.setattr(RunData, "metrics", boom)
    with ViewerServer(RunPaths.of(viewer_run), port=0) as s:
        status, body = raw_get(s, "/api/metrics")
    assert status == 500 and "internal error" in body and "secret" not in body
    assert no_internals(body, viewer_run)


def test_bad_requests_are_messages_not_tracebacks(server, viewer_run):
    for path, status, words in [
        ("/api/feature/99/0", 404, "layer 99 feature 0"),
        ("/feature/99/0", 404, "layer 99 feature 0"),
        ("/feature/x/0", 404, "no page"),
        ("/api/features?layer=two", 400, "layer must be an integer"),
        ("/api/features?min_score=high", 400, "min_score must be a finite number"),
        ("/api/graph/no-such-graph/node/1_2_3", 404, "no graph"),
        ("/graph/no-such-graph", 404, "in graphs/graph-metadata.json"),
        ("/api/feature/0/99999", 404, "not in autointerp/features.parquet"),
    ]:
        got, body = raw_get(server, path)
        assert got == status and words in body and "Traceback" not in body, (path, body)
        assert no_internals(body, viewer_run), (path, body)


def test_missing_outputs_name_the_file_and_the_command(viewer_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(viewer_run / "config.yaml", run / "config.yaml")
    with ViewerServer(RunPaths.of(run), port=0) as s:
        _, status = get_json(s, "/api/run")
        assert {k for k, v in status["outputs"].items() if v} == {
            "metrics", "features", "explanations", "scores", "graphs"}
        for page, file, command in [
            ("/features", "features.parquet", "clt-ray autointerp --config"),
            ("/feature/0/1", "features.parquet", "clt-ray autointerp --config"),
            ("/graphs", "graph-metadata.json", "clt-ray attribute --clt"),
            ("/graph/any", "graph-metadata.json", "clt-ray attribute --clt"),
            ("/training", "metrics.jsonl", "clt-ray train"),
        ]:
            code, body = raw_get(s, page)
            assert code == 200 and file in body and command in body, page
            assert "Traceback" not in body
        code, body = raw_get(s, "/api/features")
        assert code == 404 and json.loads(body)["command"].startswith("clt-ray autointerp")
    # top-k done, no LLM run yet: the browser works, search says what is missing
    (run / "autointerp").mkdir()
    shutil.copy(viewer_run / "autointerp" / "features.parquet", run / "autointerp")
    with ViewerServer(RunPaths.of(run), port=0) as s:
        code, page = get_json(s, "/api/features?limit=3")
        assert code == 200 and page["items"][0]["explanation"] is None
        code, body = get_json(s, "/api/features?q=token")
        assert code == 404 and "explanations.parquet" in body["error"]
        code, row = get_json(s, "/api/feature/0/1")
        assert code == 200 and "clt-ray autointerp" in row["missing"]["explanations"]["command"]


def test_output_folders_can_be_given(viewer_run, tmp_path):
    run = tmp_path / "bare-run"
    run.mkdir()
    paths = RunPaths.of(run, graphs=viewer_run / "graphs", autointerp=viewer_run / "autointerp")
    with ViewerServer(paths, port=0) as s:
        assert get_json(s, "/api/graphs")[0] == 200
        assert get_json(s, "/api/features?limit=1")[0] == 200


def test_serve_binds_loopback_by_default(viewer_run):
    assert DEFAULT_HOST == "127.0.0.1"
    with ViewerServer(RunPaths.of(viewer_run), port=0) as s:
        assert s.host == "127.0.0.1"
    proc, s = start_cli("serve", str(viewer_run), "--port", "0")
    try:
        assert s.host == "127.0.0.1"
        assert raw_get(s, "/api/run")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_refuses_a_missing_run_dir(tmp_path):
    res = subprocess.run([str(EXE), "serve", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode != 0 and "nope" in res.stderr and "Traceback" not in res.stderr


def test_pages_are_offline_and_shipped_as_package_data():
    import fnmatch

    import tomllib

    from clt_ray.viewer.app import STATIC

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["clt_ray.viewer"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []
    for path in STATIC.glob("*.*"):  # our own pages load nothing from the network
        assert "//" not in "".join(
            line for line in path.read_text().splitlines() if "src=" in line or "href=" in line
        ).replace("://127.0.0.1", ""), path
