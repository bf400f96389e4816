"""The layering stays one-way (issue 16): every import, function-level ones included, is checked.

Layers, bottom to top: shared_models < privacy < client, server (never each other) < simulations.
A module may import its own package and lower layers only; no two modules import each other,
directly or around a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"shared_models": 0, "privacy": 1, "client": 2, "server": 2, "simulations": 3}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in LAYER for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(name: str) -> str:
    """The most specific fedpriv module `name` refers to (a module, or the package it names)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> list[tuple[int, str]]:
    """(line, fedpriv module) for every import in `module`, at any depth of the file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and target != module and target.split(".")[0] in LAYER:
                out.append((node.lineno, target))
    return out


GRAPH = {module: sorted({target for _, target in _imports(module)}) for module in MODULES}


def _allowed(source: str, target: str) -> bool:
    mine, theirs = source.split(".")[0], target.split(".")[0]
    return mine == theirs or LAYER[theirs] < LAYER[mine]


def test_every_import_runs_down_the_layers():
    against = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
               for m in MODULES for line, target in _imports(m) if not _allowed(m, target)]
    assert against == []


def test_the_layer_check_sees_function_level_and_relative_imports():
    # The checker itself: an upward import inside a function, and a relative import.
    tree = {name: [t for _, t in _imports(name)] for name in ("client.node_training", "privacy.secagg.protocol")}
    assert "shared_models.datasets.partitioning" in tree["client.node_training"]
    assert "privacy.secagg.encoding" in tree["privacy.secagg.protocol"]
    assert not _allowed("privacy.dp_sgd", "client.config") and not _allowed("client.config", "server.ledger")
    assert _allowed("simulations.cli", "client.config") and _allowed("server.report", "privacy.releases")


def test_there_are_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in GRAPH[module]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("package", sorted(LAYER))
def test_each_package_says_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8")))
    assert doc and "May import:" in doc
