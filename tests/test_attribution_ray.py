"""Attribution graphs on a Ray actor pool (clt_ray.actors.attribution): the same graphs as one
process, a failing prompt recorded while the rest go on, and a lost worker: what was done stays,
a rerun computes the rest, every graph is there exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clt_ray.attribution import GraphStore, PromptSpec, attribute_prompts, read_clt_folder
from clt_ray.config import GraphSettings
from clt_ray.errors import CltRayError
from clt_ray.toy import mechanism_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # the actors run one torch thread too

SETTINGS = GraphSettings(max_feature_nodes=128, max_n_logits=5)
SEED = 7


def _specs(n: int) -> list[PromptSpec]:
    """A plain prompt, one with a logit target, one with a contrast target, more plain ones
    (short ones: a graph's time grows with its tokens)."""
    induction = mechanism_prompts("induction", n, seed=SEED, max_context=0)
    years = mechanism_prompts("greater_than", 1, seed=SEED, max_context=0)[0]
    return [PromptSpec(induction[0].text),
            PromptSpec(induction[1].text, (induction[1].targets[0],)),
            PromptSpec(years.text, tuple(years.targets[:2]), tuple(years.foils[:2])),
            *(PromptSpec(p.text) for p in induction[2:])]


def _index(out: Path) -> tuple[list[dict], list[dict]]:
    rows = pq.read_table(out / "graphs.parquet").to_pylist()
    return rows, json.loads((out / "graph-metadata.json").read_text())["graphs"]


def test_pool_graphs_equal_one_process_and_a_failing_prompt_is_recorded(ray_local, toy_clt,
                                                                        tmp_path, capsys,
                                                                        monkeypatch):
    """Through the command line (`--workers 2`, a .jsonl prompts file): the graphs' nodes and
    links equal the one-process ones (weights to 1e-5 of the largest), the failing prompt is a
    row with its error and no graph, the dashboards are the same files."""
    from clt_ray import cli

    plain, _, contrast = _specs(2)
    specs = [plain, contrast, PromptSpec("The keys to the cabinet", ("xyzzy plugh",))]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": s.prompt, "target": list(s.target),
                                             "contrast": list(s.contrast)}) for s in specs))
    one = tmp_path / "one"
    attribute_prompts(toy_clt, specs, one, settings=SETTINGS, example_tokens=512,
                      progress=False, log=lambda m: None)
    pool = tmp_path / "pool"
    monkeypatch.setattr("sys.argv", [
        "clt-ray", "attribute", "--clt", str(toy_clt), "--prompts-file", str(prompts),
        "--out", str(pool), "--workers", "2", "--cpus-per-worker", "0.5",
        "--max-feature-nodes", "128", "--max-n-logits", "5", "--example-tokens", "512"])
    cli.main()
    out = capsys.readouterr()
    assert "2 graph workers on Ray (0.5 CPU, 0 GPU each, device cpu)" in out.out
    assert "2 of 3 graphs (1 failed" in out.out and "xyzzy plugh" in out.err

    rows_one, meta_one = _index(one)
    rows_pool, meta_pool = _index(pool)
    by_key = {r["key"]: r for r in rows_pool}
    assert sorted(by_key) == sorted(r["key"] for r in rows_one)
    for r in rows_one:
        p = by_key[r["key"]]
        assert (p["status"], p["error"], p["nodes"], p["edges"]) == (
            r["status"], r["error"], r["nodes"], r["edges"])
        if r["status"] == "failed":
            assert "xyzzy plugh" in r["error"] and not (pool / f"{r['slug']}.json").exists()
            continue
        assert p["replacement"] == pytest.approx(r["replacement"], abs=1e-5)
        a, b = (json.loads((d / f"{r['slug']}.json").read_text()) for d in (one, pool))
        assert [n["node_id"] for n in a["nodes"]] == [n["node_id"] for n in b["nodes"]]
        scale = max(abs(link["weight"]) for link in a["links"])
        assert [(x["source"], x["target"]) for x in a["links"]] == \
            [(x["source"], x["target"]) for x in b["links"]]
        assert max(abs(x["weight"] - y["weight"]) for x, y in zip(a["links"], b["links"])) \
            <= 1e-5 * scale
    assert sorted(g["slug"] for g in meta_pool) == sorted(g["slug"] for g in meta_one)
    name = Path(toy_clt).name
    assert sorted(p.name for p in (pool / "features" / name).iterdir()) == \
        sorted(p.name for p in (one / "features" / name).iterdir())


def test_a_lost_worker_loses_only_graphs_in_flight_and_a_rerun_finishes(ray_local, toy_clt,
                                                                          tmp_path):
    """The pool's only worker is killed (as when its node goes) once the first graph is
    recorded, with no replacement allowed: the run stops with that graph recorded; a rerun
    (here in one process) computes only the others; every graph is there exactly once."""
    import ray
    from clt_ray.actors.attribution import GraphPool

    specs = _specs(2)  # one recorded, one running and one queued on the worker when it goes
    out = tmp_path / "graphs"
    folder = read_clt_folder(toy_clt)

    class KillAfterFirst(GraphStore):
        def record(self, outcome):
            super().record(outcome)
            if len(self.rows) == 1:
                ray.kill(pool.actors[0], no_restart=True)

    store = KillAfterFirst(out, folder.name, SETTINGS)
    with GraphPool(str(folder.path), workers=1, settings=SETTINGS, cpus_per_worker=0.5,
                   replacements=0) as pool, pytest.raises(CltRayError, match="every worker was lost"):
        pool.run(specs, store)
    rows, meta = _index(out)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and len(meta) == 1
    first = out / f"{rows[0]['slug']}.json"
    written = first.stat().st_mtime_ns

    messages: list[str] = []
    attribute_prompts(toy_clt, specs, out, settings=SETTINGS, example_tokens=512,
                      progress=False, log=messages.append)
    assert f"1 of {len(specs)} graphs already there" in "\n".join(messages)
    assert first.stat().st_mtime_ns == written  # not computed again
    rows, meta = _index(out)
    assert sorted(r["key"] for r in rows) == sorted(s.key for s in specs)
    assert all(r["status"] == "ok" for r in rows)
    assert sorted(g["slug"] for g in meta) == sorted(s.slug for s in specs)
    assert sorted(p.name for p in out.glob("*.json")) == sorted(
        [f"{s.slug}.json" for s in specs] + ["graph-metadata.json"])
