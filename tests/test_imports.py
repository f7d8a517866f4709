"""The package's import graph: no cycles, and the boundaries of the design (issue 12) hold.

* ``models/`` and ``layers/`` never import the fused package or the command line: the networks read like the paper,
  and the fused package plugs in through the dispatch table and ``cbam.fuse``;
* nothing outside ``cli/`` imports the command line;
* no module of the package imports another one inside a function (a way to hide a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cbam"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported cbam module, whether the import is inside a function) for every import of the file."""
    module = _module_name(path)
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.split(".")[0] == "cbam")
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, path.name == "__init__.py", child)
                if target.split(".")[0] == "cbam":
                    for alias in child.names:  # "from . import x" imports the submodule x
                        sub = f"{target}.{alias.name}"
                        found.append((sub if _exists(sub) else target, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def _exists(module: str) -> bool:
    path = SRC.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = {target for target, _ in _imports(path) if target != name}
    return graph


def _ancestors(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_no_import_cycles():
    graph = _graph()
    # an import of a.b.c also imports its parent packages
    edges = {
        m: {t for target in ts for t in (target, *_ancestors(target)) if t in graph and t != m}
        for m, ts in graph.items()
    }
    # a package's own __init__ importing its submodules is how packages work, not a cycle
    for m in edges:
        edges[m] -= {a for a in _ancestors(m)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("area", ["cbam.models", "cbam.layers"])
def test_models_and_layers_do_not_import_the_fused_package_or_the_command_line(area):
    bad = {
        (m, t)
        for m, targets in _graph().items()
        if m == area or m.startswith(area + ".")
        for t in targets
        if t.startswith(("cbam.fused", "cbam.cli")) or t == "cbam"
    }
    assert not bad, f"{area} imports {sorted(bad)}"


def test_only_the_command_line_imports_the_command_line_and_argparse():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name.startswith("cbam.cli") or name == "cbam.__main__":
            continue
        if any(t.startswith("cbam.cli") for t, _ in _imports(path)):
            offenders.append(f"{name} imports cbam.cli")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                offenders.append(f"{name} imports argparse")
    assert not offenders, offenders


def test_no_package_import_inside_a_function():
    hidden = [
        f"{_module_name(path)} imports {target} inside a function"
        for path in sorted(PACKAGE.rglob("*.py"))
        for target, in_function in _imports(path)
        if in_function
    ]
    assert not hidden, hidden
