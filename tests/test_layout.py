"""The package's layout holds: no import cycles among the modules of limoe/ and service/ (every
import statement counted, function-level and TYPE_CHECKING ones too), nothing in limoe/ imports
the service, and limoe's subpackages import only the layers below them (limoe/__init__.py)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Which of limoe's subpackages each may import (besides itself); everything else is an arrow up.
LAYERS = {
    "runtime": set(),
    "data": {"runtime"},
    "model": {"runtime"},
    "train": {"model", "data", "runtime"},
    "export": {"train", "model", "data", "runtime"},
    "eval": {"export", "train", "model", "data", "runtime"},
    "bulk": {"data", "runtime"},
    "cli": {"bulk", "eval", "export", "train", "model", "data", "runtime"},
    "__main__": {"cli"},
}


def modules() -> dict[str, Path]:
    out = {}
    for top in ("limoe", "service"):
        for path in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project's modules it imports (`from pkg import mod` names the module)."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and not target.startswith(name + "."):  # a package's own children
                    found.add(target)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycles_found_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_resolve_every_statement_kind():
    graph = imports(modules())
    assert "limoe.runtime.model_store" in graph["limoe.runtime.encoders"]  # module level
    assert "limoe.runtime.encoders" in graph["limoe.bulk.classify"]  # function level, too
    assert "limoe.export.exporter" in graph["limoe.cli"]  # inside a function


def test_no_import_cycles():
    assert cycles(imports(modules())) == []


def test_library_never_imports_the_service():
    up = sorted(f"{m} -> {t}" for m, ts in imports(modules()).items() if m.startswith("limoe")
                for t in ts if t.startswith("service"))
    assert up == []


def test_subpackages_import_only_layers_below():
    graph = imports(modules())
    layer = lambda m: m.split(".")[1]  # noqa: E731 (limoe.<layer>...)
    wrong = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("limoe.")
                   for t in ts if t.startswith("limoe.") and layer(t) != layer(m) and layer(t) not in LAYERS[layer(m)])
    assert wrong == []
    assert set(map(layer, (m for m in graph if m.startswith("limoe.")))) == set(LAYERS)  # every layer named


def test_limoe_has_no_flat_modules():
    flat = sorted(p.name for p in (ROOT / "limoe").glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "cli.py"]
