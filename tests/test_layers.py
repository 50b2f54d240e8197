"""The package's structure: no import circle in orcal/ (lazy imports inside functions included), and the
op contract and kernels below everything that uses them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "orcal"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The orcal module that an imported name lives in (a package's __init__ for a name it defines)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every orcal module ``module`` imports, at the top or inside a function."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            if name.startswith("orcal"):
                target = _resolve(name)
                if target and target != module and target != "orcal":
                    out.add(target)
    return out


GRAPH = {m: imports_of(m) for m in MODULES if m != "orcal"}  # the package facade imports on demand


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle)


OPS_WING = sorted(m for m in MODULES if m == "orcal.ops" or m.startswith("orcal.ops."))


@pytest.mark.parametrize("low", ["orcal.stats", "orcal.reference", *OPS_WING])
def test_lower_layers_do_not_reach_up(low):
    """The op layer never imports the application layer (training, experiments, reports, the CLI)."""
    high = ("orcal.training", "orcal.train", "orcal.experiment", "orcal.report", "orcal.plots", "orcal.commands",
            "orcal.cli", "orcal.evaluate", "orcal.metrics", "orcal.fusion", "orcal.data", "orcal.models")
    reach = set()
    todo = [low]
    while todo:
        for n in GRAPH.get(todo.pop(), ()):
            if n not in reach:
                reach.add(n)
                todo.append(n)
    assert not [m for m in reach if m.startswith(high)], sorted(reach)
