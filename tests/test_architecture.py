"""The house's shape (STYLE.md §1, §12): imports run train -> export -> index <- serve with no
circle, and modules and functions stay small enough to read.

Every import statement counts, at module level, inside functions and under TYPE_CHECKING alike:
a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "export", "index", "serve", "protos", "bench", "tests")
# package -> first-party packages it must never import (tests may import anything)
FORBIDDEN = {
    "train": {"export", "serve", "bench", "tests"},
    "export": {"serve", "bench", "tests"},
    "index": {"train", "export", "serve", "bench", "tests"},
    "serve": {"train", "export", "bench", "tests"},
    "protos": {"train", "export", "index", "serve", "bench", "tests"},
    "bench": {"tests"},
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
SIZED_PACKAGES = ("train", "export", "index", "serve")


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a file under root."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(root: Path = ROOT) -> dict[str, str]:
    """{module name: source} of every first-party module (generated stubs excluded)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "_gen" not in path.parts:
                out[module_name(path, root)] = path.read_text(encoding="utf-8")
    return out


def _resolve(name: str, modules: set[str]) -> str | None:
    """The first-party module an imported dotted name refers to (its longest known prefix)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(mods: dict[str, str]) -> dict[str, set[str]]:
    """{module: first-party modules it imports}; `from pkg import sub` points at pkg.sub."""
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, source in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(source)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                resolved = _resolve(target, known)
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import that crosses the allowed direction."""
    bad = []
    for source, targets in sorted(graph.items()):
        banned = FORBIDDEN.get(source.split(".")[0], set())
        bad += [f"{source} -> {t}" for t in sorted(targets) if t.split(".")[0] in banned]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_follow_the_layers():
    assert layer_violations(import_graph(sources())) == []


def test_no_import_cycle():
    assert cycles(import_graph(sources())) == []


@pytest.mark.parametrize("module, line, problem", [
    ("train.injected", "from export.bundle import export_run", "layer"),
    ("index.injected", "from serve import errors", "layer"),
    ("train.injected", "def f():\n    from serve.errors import ServeError", "layer"),
    ("bench.injected", "from tests.conftest import ROOT", "layer"),
    ("train.modules", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import train.stage1",
     "cycle"),
])
def test_checker_catches_an_injected_edge(module, line, problem):
    mods = sources()
    mods[module] = mods.get(module, "") + "\n" + line + "\n"
    graph = import_graph(mods)
    if problem == "layer":
        assert any(v.startswith(f"{module} -> ") for v in layer_violations(graph))
    else:
        assert any(module in c for c in cycles(graph))


def _sized_files() -> list[Path]:
    return [p for package in SIZED_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
            if "_gen" not in p.parts]


def test_modules_stay_under_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in _sized_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_functions_in_train_and_export_stay_short():
    long = {}
    for path in _sized_files():
        if path.relative_to(ROOT).parts[0] not in ("train", "export"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = n
    assert long == {}
