"""Import-direction contracts of DESIGN.md: torch-free modules stay torch-free, and the study
layer's modules import each other one way only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

STUDY_PACKAGE = Path(__file__).resolve().parent.parent / "harness" / "study"


@pytest.mark.parametrize(
    "module",
    [
        "harness.spec",
        "harness.reports",
        "harness.db",
        "harness.results",
        "harness.trial_api",
        "harness.study",
        "harness.study.runner",
        "harness.study.search",
    ],
)
def test_import__does_not_pull_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing {module} imported torch\n{result.stderr}"


def test_registries__are_plain_dicts_named_as_in_the_spec() -> None:
    from harness import spec
    from harness.backbones import BACKBONES
    from harness.data import DATASETS
    from harness.losses import LOSSES
    from harness.methods import METHODS

    for registry in (METHODS, BACKBONES, DATASETS, LOSSES):
        assert type(registry) is dict
    assert set(METHODS) == set(spec.METHOD_NAMES)
    assert set(BACKBONES) == set(spec.BACKBONE_NAMES)
    assert set(DATASETS) == set(spec.DATASET_NAMES)
    assert set(spec.METHOD_DEFAULTS) == set(spec.METHOD_NAMES) == set(spec.METHOD_KNOBS)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def package_imports(folder: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, anywhere in its code (imports inside
    functions too: a lazy import still makes a cycle), except under ``if TYPE_CHECKING:``."""
    modules = {
        (package if path.stem == "__init__" else f"{package}.{path.stem}"): path
        for path in folder.glob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        pending: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
        while pending:
            node = pending.pop()
            if isinstance(node, ast.If) and _is_type_checking(node):
                pending.extend(node.orelse)
                continue
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
                if node.module == package:
                    # `from harness.study import store` imports a module; any other name, the package.
                    for alias in node.names:
                        edges.add(
                            f"{package}.{alias.name}" if f"{package}.{alias.name}" in modules else package
                        )
                elif node.module in modules:
                    edges.add(node.module)
            pending.extend(ast.iter_child_nodes(node))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_study_package__has_no_import_cycle() -> None:
    graph = package_imports(STUDY_PACKAGE, "harness.study")
    assert "harness.study.worker" in graph and "harness.study.store" in graph["harness.study.worker"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_package_imports__finds_a_lazy_import_cycle(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from pkg import b\n")
    (tmp_path / "b.py").write_text("def later():\n    from pkg.a import thing\n")
    (tmp_path / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    graph = package_imports(tmp_path, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": set()}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_trial_pruned__is_one_class_shared_by_train_and_the_study_layer() -> None:
    from harness import train, trial_api
    from harness.study import search

    assert train.TrialPruned is trial_api.TrialPruned is search.TrialPruned
