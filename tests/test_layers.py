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


@pytest.mark.parametrize("low", ["orcal.heads", *OPS_WING])
def test_lower_layers_do_not_reach_up(low):
    """The op layer never imports the application layer (training, experiments, reports, the CLI)."""
    high = ("orcal.training", "orcal.train", "orcal.experiment", "orcal.plots", "orcal.commands",
            "orcal.cli", "orcal.evaluate", "orcal.metrics", "orcal.fusion", "orcal.data", "orcal.models")
    reach = set()
    todo = [low]
    while todo:
        for n in GRAPH.get(todo.pop(), ()):
            if n not in reach:
                reach.add(n)
                todo.append(n)
    assert not [m for m in reach if m.startswith(high)], sorted(reach)


# The old paths of the integrations (deprecated shims, removed next release) are no part of the layering.
SHIMS = {"orcal.monai", "orcal.nnunet", "orcal.metrics_torchmetrics"}
# orcal.metrics re-exports the torchmetrics classes lazily (orcal.metrics.MultiRaterECE, ...): public names
# that predate the integrations package, loaded only when asked for.
LAZY_REEXPORTS = {("orcal.metrics", "orcal.integrations.torchmetrics")}


def test_nothing_below_the_integrations_imports_them():
    """orcal.integrations sits on top of the library: only itself, the command line above it and its deprecated
    old paths import it."""
    reach = sorted((m, n) for m, targets in GRAPH.items() for n in targets
                   if n.startswith("orcal.integrations") and not m.startswith(("orcal.integrations", "orcal.commands"))
                   and m not in SHIMS and (m, n) not in LAZY_REEXPORTS)
    assert not reach, reach


@pytest.mark.parametrize("old, new, names", [
    ("orcal.monai", "orcal.integrations.monai", ("StackRatersd", "ORCTargetd", "MultiRaterCalibrationMetric",
                                                 "metric_cmp_fn")),
    ("orcal.metrics_torchmetrics", "orcal.integrations.torchmetrics", ("MultiRaterECE", "MultiRaterStatistics")),
    ("orcal.nnunet", "orcal.integrations.nnunet", ("convert_dataset", "export_probabilities", "joint_levels")),
])
def test_old_integration_paths_warn_and_give_the_same_objects(old, new, names):
    """Paths the docs once gave stay importable for one release, warn, and hand out the new home's objects."""
    import importlib
    import sys

    home = pytest.importorskip(new)
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert all(getattr(module, name) is getattr(home, name) for name in names)
