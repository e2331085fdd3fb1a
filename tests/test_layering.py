"""The import structure: the library (``lk_vllm``, which holds everything vLLM loads into its own processes)
imports no application (``training``, ``serving``), and no two modules import each other at module level.
Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from repo_helpers import ROOT, package_modules

pytestmark = pytest.mark.unit


APPLICATIONS = ("training", "serving")


def _imports(path: Path, module: str, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the file; with ``top_level_only`` only those run when the
    module itself is imported (not inside functions or ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
            found.append((name, node.lineno))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk of the import graph closes, as ``a -> b -> a``."""
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_library_imports_no_application():
    upward = []
    for module, path in package_modules().items():
        if not module.startswith("lk_vllm"):
            continue
        for name, line in _imports(path, module, top_level_only=False):
            if name.split(".")[0] in APPLICATIONS:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not upward, "lk_vllm must not import training or serving:\n" + "\n".join(sorted(set(upward)))


def test_no_import_cycle_at_module_level():
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name, _ in _imports(path, module, top_level_only=True):
            if (
                name in modules and name != module and not module.startswith(name + ".")
            ):  # not its own package
                targets.add(name)
        graph[module] = targets
    cycles = _cycles(graph)
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    # The walkers themselves: a function-level import is found (and is not a module-level one), a relative one
    # is resolved, and a cycle through three modules is reported while a diamond is not.
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from training.train import train\n")
    names = [name for name, _ in _imports(source, "lk_vllm.m", top_level_only=False)]
    assert "training.train" in names and "os" in names
    assert "training.train" not in [name for name, _ in _imports(source, "lk_vllm.m", top_level_only=True)]
    package = tmp_path / "__init__.py"
    package.write_text("from .sub import x\n")
    assert ("lk_vllm.pkg.sub", 1) in _imports(package, "lk_vllm.pkg", top_level_only=True)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []
