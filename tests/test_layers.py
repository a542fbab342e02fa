"""The package is layered (docs/design.md §1): every import in clt_ray/ and actors/ — function-level
ones included, `if TYPE_CHECKING:` ones excepted — goes to the same layer without a cycle or to a
layer below; clt_ray/ never imports Ray; the viewer imports only layer 0."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS: dict[str, int] = {
    "clt_ray": 0, "clt_ray.errors": 0, "clt_ray.layout": 0, "clt_ray.fsutil": 0,
    "clt_ray.seeding": 0,
    "clt_ray.config": 1,
    "clt_ray.nn": 2, "clt_ray.quant": 2, "clt_ray.toy": 2,
    "clt_ray.lm": 3, "clt_ray.data": 3, "clt_ray.cache": 3,
    "clt_ray.train": 4, "clt_ray.eval": 4, "clt_ray.export": 4, "clt_ray.plan": 4,
    "clt_ray.features": 5, "clt_ray.attribution": 5, "clt_ray.autointerp": 5,
    "clt_ray.viewer": 6, "clt_ray.cli": 6, "clt_ray.actors": 6,
}
"""Each module's layer is that of its longest listed prefix (a new top-level module must be
listed: the package itself is no prefix)."""


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in (("clt_ray", "clt_ray"), ("actors", "clt_ray.actors")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 1 if len(parts) > 1 else 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    raise AssertionError(f"{module} has no layer: add it to LAYERS and to docs/design.md §1")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module or third-party top-level name, line) for every import."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
            targets = [n for n in names if n in known] or [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out += [(t, node.lineno) for t in targets]
    return out


def project_graph() -> tuple[dict[str, set[str]], list[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    upward = []
    for module, path in known.items():
        for target, line in imports(path, known):
            if not target.startswith("clt_ray") or target == module:
                continue
            while target not in known:  # `from clt_ray.x import name`: the module x
                target = target.rpartition(".")[0]
            if target == module or module.startswith(target + "."):
                continue  # a package's own __init__ seen from inside
            edges[module].add(target)
            if layer(target) > layer(module):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {module} (layer "
                              f"{layer(module)}) imports {target} (layer {layer(target)})")
    return edges, upward


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_goes_up_a_layer():
    _, upward = project_graph()
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges, _ = project_graph()
    assert cycles(edges) == []


def test_core_never_imports_ray_and_viewer_imports_only_layer_0():
    known = modules()
    for module, path in known.items():
        for target, line in imports(path, known):
            where = f"{path.relative_to(ROOT)}:{line}"
            if not module.startswith("clt_ray.actors"):
                assert target.split(".")[0] != "ray", f"{where}: the core imports {target}"
            if module.startswith("clt_ray.viewer") and target.startswith("clt_ray"):
                assert layer(target) == 0 or target.startswith("clt_ray.viewer"), \
                    f"{where}: the viewer imports {target}"


def test_project_imports_are_deferred_only_for_the_cli_and_transformer_lens():
    """A function-level import of a project module hides a dependency; only the CLI (whose
    `--help` must not load torch) and `lm.tl` (it imports TransformerLens) may be deferred."""
    deferred = []
    for module, path in modules().items():
        if module == "clt_ray.cli":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                deferred += [f"{path.relative_to(ROOT)}:{n.lineno}: {n.module}"
                             for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)
                             and (n.module or "").startswith("clt_ray")
                             and n.module != "clt_ray.lm.tl"]
    assert not deferred, "deferred project imports:\n" + "\n".join(deferred)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The checks would fail on what they are meant to catch."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from clt_ray.train.run import x\nif TYPE_CHECKING:\n"
                   "    from clt_ray.cli import y\n")
    known = {"clt_ray.train.run": src}
    assert imports(src, known) == [("clt_ray.train.run", 2)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
