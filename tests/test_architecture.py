"""The layers of rayq, checked by reading the source (docs/architecture.md draws them).

Static on purpose: an import inside a function counts the same as one at the top of a
module, so a lazy import cannot hide a circle or a heavy dependency. Imports under
`if TYPE_CHECKING:` are left out: they never run. No module is imported by these tests.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "rayq"
HEAVY = ("torch", "ray", "vllm")

# Which layer may import which (the module `rayq.errors` and the package roots' own
# docstrings aside). The layers are the first name under rayq: a package or a module.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "catalog": {"errors"},
    "planning": {"catalog", "errors"},
    "store": {"catalog", "planning", "errors"},
    "report": {"catalog", "store", "errors"},
    "host": {"catalog", "planning", "store", "errors"},
    "execution": {"catalog", "planning", "store", "host", "errors"},
    "api": {"catalog", "planning", "store", "execution", "errors"},
    "cli": {"catalog", "planning", "store", "execution", "report", "errors", "api"},
    "__init__": {"api", "errors", "store"},
    "__main__": {"cli"},
}
# The host modules the execution layer may name in an import: the contract, not an engine
# (an engine's class is imported by its path from the catalog, inside its Ray actor).
EXECUTION_MAY_IMPORT_FROM_HOST = {"rayq.host.protocol", "rayq.host.config"}
# transformers is heavy (it imports torch when a model class is touched); outside the host it
# is allowed only where a tokenizer or a config is read, before anything loads.
TRANSFORMERS_OUTSIDE_HOST = {"rayq.planning.context"}
# The command-line paths that must stay light; `rayq plan --address` reads a live cluster's
# shape, which is Ray's to give: that one call is allowed, by name.
LIGHT_CLI = ("rayq.cli", "rayq.cli.common", "rayq.cli.plan", "rayq.cli.status", "rayq.cli.check",
             "rayq.cli.query", "rayq.cli.report")  # fmt: skip
LIGHT_CLI_EXCEPTIONS = {("rayq.cli.plan", "rayq.execution.cluster")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


@functools.cache
def imports(module: str) -> frozenset[str]:
    """Every dotted name `module` imports anywhere (top level or inside a function)."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in modules())
    return frozenset(out)


def rayq_edges(module: str) -> set[str]:
    """The rayq modules `module` imports (a name that is an attribute of a module counts as that module)."""
    out = set()
    for name in imports(module):
        while name and name not in modules():
            name = name.rpartition(".")[0]
        if name.startswith("rayq") and name != module:
            out.add(name)
    return out


def external(module: str) -> set[str]:
    return {n.split(".")[0] for n in imports(module) if not n.startswith("rayq")}


def closure(start: str, skip: set[tuple[str, str]] = frozenset()) -> dict[str, list[str]]:
    """Every rayq module reachable from `start`, each with one import path that reaches it."""
    seen = {start: [start]}
    todo = [start]
    while todo:
        m = todo.pop()
        for n in sorted(rayq_edges(m)):
            if n not in seen and (m, n) not in skip:
                seen[n] = [*seen[m], n]
                todo.append(n)
    return seen


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_known_layer() -> None:
    assert {layer(m) for m in modules()} <= set(ALLOWED), sorted({layer(m) for m in modules()} - set(ALLOWED))


def test_no_import_circles_anywhere_in_rayq() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in rayq_edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in sorted(modules()):
        if m not in index:
            visit(m)
    assert circles == []


def test_each_layer_imports_only_the_layers_below_it() -> None:
    bad = []
    for m in sorted(modules()):
        for n in rayq_edges(m):
            if layer(n) != layer(m) and layer(n) not in ALLOWED[layer(m)]:
                bad.append(f"{m} -> {n}")
    assert bad == []


def test_catalog_imports_nothing_but_the_standard_library() -> None:
    import sys

    bad = {m: external(m) - set(sys.stdlib_module_names) for m in modules() if layer(m) == "catalog"}
    assert {m: e for m, e in bad.items() if e} == {}


@pytest.mark.parametrize("top", ["planning", "store", "report"])
def test_planning_store_and_report_never_reach_torch_ray_or_vllm(top: str) -> None:
    bad = {}
    for start in (m for m in modules() if layer(m) == top):
        for m, path in closure(start).items():
            heavy = external(m) & {*HEAVY, "transformers"}
            if heavy and not (heavy == {"transformers"} and m in TRANSFORMERS_OUTSIDE_HOST):
                bad[m] = (sorted(heavy), " -> ".join(path))
    assert bad == {}


def test_execution_never_reaches_torch_and_names_only_the_host_contract() -> None:
    bad = {}
    for start in (m for m in modules() if layer(m) == "execution"):
        for n in rayq_edges(start):
            if layer(n) == "host" and n not in EXECUTION_MAY_IMPORT_FROM_HOST:
                bad[f"{start} -> {n}"] = "an engine is imported by its path, in its actor"
        for m, path in closure(start).items():
            heavy = external(m) & {"torch", "vllm", "transformers"}
            # The driver runs the one preflight (rayq.store.preflight), whose context check may read a tokenizer.
            if heavy and not (heavy == {"transformers"} and m in TRANSFORMERS_OUTSIDE_HOST):
                bad[m] = (sorted(heavy), " -> ".join(path))
    assert bad == {}


def test_host_never_imports_report_or_the_tune_side() -> None:
    bad = []
    for m in (m for m in modules() if layer(m) == "host"):
        for n in closure(m):
            if layer(n) in ("report", "execution", "cli", "api"):
                bad.append(f"{m} reaches {n}")
        if "ray" in external(m) and any(i.startswith("ray.tune") for i in imports(m)):
            bad.append(f"{m} imports ray.tune")
    assert bad == []


@pytest.mark.parametrize("command", LIGHT_CLI)
def test_the_light_commands_never_reach_torch_ray_or_vllm(command: str) -> None:
    bad = {}
    for m, path in closure(command, skip=LIGHT_CLI_EXCEPTIONS).items():
        heavy = external(m) & {*HEAVY, "transformers"}
        if heavy and not (heavy == {"transformers"} and m in TRANSFORMERS_OUTSIDE_HOST):
            bad[m] = (sorted(heavy), " -> ".join(path))
    assert bad == {}


def test_the_checker_sees_lazy_imports_and_skips_type_checking_blocks(tmp_path: Path) -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
        "def f():\n    import ray\n    from rayq.store import dataset\n"
    )
    names = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    assert "ray" in names and "rayq.store" in names and "torch" not in names
