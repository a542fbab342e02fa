"""The viewer in headless Chromium (Debian's /usr/bin/chromium driven by Playwright, installed by
`make test`): a feature page shows highlighted examples and the explanation, search finds a
feature by a word of its explanation, the graph page loads the toy graph in circuit-tracer's
frontend and a node click leads to that node's feature page, the training curves draw — with no
console or page errors anywhere. Screenshots go to tests/artifacts/viewer/."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import FARTHEST_CLT_NODE_JS

from clt_ray.viewer import RunPaths, ViewerServer

CHROMIUM = os.environ.get("CLT_RAY_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).parent / "artifacts" / "viewer"
TIMEOUT_MS = 30_000

@pytest.fixture(scope="module")
def server(viewer_run):
    with ViewerServer(RunPaths.of(viewer_run), port=0) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():  # a failure, not a skip: these are the viewer's own tests
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (or set "
                    "CLT_RAY_CHROMIUM to a Chromium binary)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    """A page whose console errors and uncaught exceptions fail the test; a screenshot is kept."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text} ({m.location})")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url} {r.failure}")
            if "ERR_ABORTED" not in (r.failure or "") else None)  # aborted by a navigation
    yield page
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, "\n".join(errors)


def explained(viewer_run: Path) -> list[dict]:
    rows = pq.read_table(viewer_run / "autointerp" / "explanations.parquet").to_pylist()
    return [r for r in rows if r["ok"]]


def feature_row(viewer_run: Path, layer: int, feature: int) -> dict:
    table = pq.read_table(viewer_run / "autointerp" / "features.parquet")
    return next(r for r in table.to_pylist() if (r["layer"], r["feature"]) == (layer, feature))


def test_feature_page_shows_highlighted_examples_and_explanation(page, server, viewer_run):
    target = explained(viewer_run)[0]
    layer, feature = target["layer"], target["feature"]
    row = feature_row(viewer_run, layer, feature)
    page.goto(f"{server.url}feature/{layer}/{feature}")
    page.wait_for_selector("#top-examples .example")
    assert page.inner_text("#explanation") == target["explanation"]
    examples = page.locator("#top-examples .example")
    assert examples.count() == len(row["top_examples"])
    first = row["top_examples"][0]
    pos = first["position"]
    shown = first["acts"][max(0, pos - 24):pos + 9]  # the context around the peak
    hot = examples.nth(0).locator(".part .tok.hot")
    assert hot.inner_text() == first["tokens"][pos]
    alpha = float(re.search(r"rgba\(232, 89, 12, ([0-9.]+)\)", hot.get_attribute("style"))[1])
    assert alpha == pytest.approx(min(1.0, first["peak"] / row["max_activation"]), abs=2e-3)
    active = examples.nth(0).locator(".part .tok.active")
    assert active.count() == sum(a > 0 for a in shown) > 0
    weakest = min(a for a in shown if a > 0)
    styles = [active.nth(i).get_attribute("style") for i in range(active.count())]
    assert any(f"{weakest / row['max_activation']:.3f}" in s for s in styles)
    examples.nth(0).click()  # the whole window
    whole = examples.nth(0).locator(".whole .tok")
    whole.first.wait_for()
    assert whole.count() == len(first["tokens"])
    assert page.locator("#quantile-examples .example").count() == len(row["quantile_examples"])
    assert page.locator("svg[data-title='decoder norm'] rect.bar").count() == len(
        row["decoder_norms"])
    assert page.locator("svg[data-title^='tokens per activation bin'] rect.bar").count() > 0
    assert page.locator("table.top-logits tr").count() == len(row["top_logits"]) + 1


def test_search_finds_a_feature_by_a_word_of_its_explanation(page, server, viewer_run):
    rows = explained(viewer_run)
    target = next(r for r in rows if sum(r["explanation"] == e["explanation"] for e in rows) == 1)
    word = target["explanation"].split("'")[1]
    page.goto(f"{server.url}features")
    page.wait_for_selector("tr.feature-row")
    from playwright.sync_api import expect

    page.fill("#q", word)
    page.click("#search")
    n = sum(word.lower() in r["explanation"].lower() for r in rows)
    expect(page.locator("#count")).to_have_text(f"{n} features")
    hit = page.locator(f"tr.feature-row[data-layer='{target['layer']}']"
                       f"[data-feature='{target['feature']}']")
    assert hit.count() == 1 and page.locator("tr.feature-row").count() == n
    assert all(word.lower() in t.lower()
               for t in page.locator("td.explanation-cell").all_inner_texts())
    assert "q=" in page.url
    hit.locator("a").click()
    page.wait_for_url(f"**/feature/{target['layer']}/{target['feature']}")
    page.wait_for_selector("#explanation")
    assert page.inner_text("#explanation") == target["explanation"]


def test_graph_page_loads_the_toy_graph_and_a_node_opens_its_feature(page, server, viewer_run):
    meta = json.loads((viewer_run / "graphs" / "graph-metadata.json").read_text())["graphs"][0]
    page.goto(f"{server.url}graphs")
    page.locator("tr.graph-row a").first.click()
    page.wait_for_url(f"**/graph/{meta['slug']}")
    frame = page.frame_locator("#graph-frame")
    frame.locator("text.node").first.wait_for()
    inner = page.frame(url=re.compile(r"/ct/index\.html"))
    # the CLT feature node farthest from any other node (a click goes to the nearest node)
    index = inner.evaluate(FARTHEST_CLT_NODE_JS)
    assert index >= 0, "the graph shows no CLT feature node"
    node = inner.evaluate(f"""() => {{ const d = d3.select(
        document.querySelectorAll('text.node')[{index}]).datum();
        return {{node_id: d.node_id, layer: d.layer}} }}""")
    frame.locator("text.node").nth(index).click()
    link = page.locator("#graphbar a.open-feature")
    link.wait_for()
    layer, feature = int(node["layer"]), int(node["node_id"].split("_")[1])
    assert link.get_attribute("href") == f"/feature/{layer}/{feature}"
    assert inner.evaluate("() => new URLSearchParams(location.search).get('clickedId')") == \
        node["node_id"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "graph-clicked.png"), full_page=True)
    link.click()
    page.wait_for_url(f"**/feature/{layer}/{feature}")
    page.wait_for_selector("h1:has-text('Feature L')")
    assert f"L{layer} / {feature}" in page.inner_text("h1")


def test_training_curves_draw(page, server, viewer_run):
    n_layers = len(json.loads((viewer_run / "metrics.jsonl").read_text().splitlines()[0])["l0"])
    page.goto(f"{server.url}training")
    page.wait_for_selector("svg.chart path.line")
    titles = page.locator("svg.chart").evaluate_all("els => els.map(e => e.dataset.title)")
    assert {"loss", "explained variance per layer (train)", "L0 per layer (train)"} <= set(titles)
    ev = page.locator("svg[data-title='explained variance per layer (train)'] path.line")
    assert ev.count() == n_layers
    assert all(len(d) > 20 for d in ev.evaluate_all("els => els.map(e => e.getAttribute('d'))"))


def test_home_page_lists_the_outputs(page, server):
    page.goto(server.url)
    page.wait_for_selector("tr.output")
    assert page.locator("tr.output").count() == 5
    assert "missing" not in page.inner_text("main")
    assert "explained_variance" in page.inner_text("#summary")


def test_missing_outputs_are_named_with_their_command(page, viewer_run, tmp_path):
    run = tmp_path / "run"
    (run / "autointerp").mkdir(parents=True)
    shutil.copy(viewer_run / "metrics.jsonl", run)
    shutil.copy(viewer_run / "autointerp" / "features.parquet", run / "autointerp")
    with ViewerServer(RunPaths.of(run), port=0) as s:
        page.goto(s.url)
        page.wait_for_selector("tr.output")
        text = page.inner_text("main")
        assert "graph-metadata.json" in text and "clt-ray attribute --clt" in text
        assert "explanations.parquet" in text and "clt-ray autointerp --config" in text
        page.goto(f"{s.url}graphs")
        assert "clt-ray attribute --clt" in page.inner_text(".missing")
        page.goto(f"{s.url}feature/0/1")  # top-k done, no LLM run yet
        page.wait_for_selector("#top-examples .example")
        assert "clt-ray autointerp" in page.inner_text(".missing")
