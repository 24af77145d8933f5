"""The import graph, read from the source (imports inside functions too): the model layers
import no higher layer and no circle runs through them (DESIGN.md: data flows one way)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# package -> the atlas_jax modules (and packages) it may import besides its own
ALLOWED = {
    "atlas_jax.parallel": {"atlas_jax.config"},
    "atlas_jax.models": {"atlas_jax.config", "atlas_jax.parallel"},
    "atlas_jax.generation": {"atlas_jax.config", "atlas_jax.parallel", "atlas_jax.models"},
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in (ROOT / "atlas_jax").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the atlas_jax modules it imports (`from pkg import sub` counts as pkg.sub)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("atlas_jax"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _owner(module: str) -> str:
    return next((package for package in ALLOWED if module == package or module.startswith(package + ".")), module)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_model_layers_import_no_higher_layer(package):
    graph = _graph()
    imported = {_owner(t) for m, ts in graph.items() if _owner(m) == package for t in ts if _owner(t) != package}
    assert imported <= ALLOWED[package], sorted(imported - ALLOWED[package])


def _reachable(graph, start) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def test_no_import_circle_runs_through_the_model_layers():
    graph = _graph()
    circular = sorted(m for m in graph if _owner(m) in ALLOWED and m in _reachable(graph, m))
    assert not circular, circular
