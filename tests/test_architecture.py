"""The shape of the codebase: layers that only point down, no import cycles, imports at the top of modules, and
modules and functions small enough to read.

The layers, bottom up: ``grpo_kernels`` and ``model``; then ``rollout``, ``rewards`` and ``sft``; then ``grpo``. A
package imports only packages of its own layer or below (``grpo`` may import all of them; none of them imports
``grpo``). Imports inside functions are kept for optional heavy dependencies only.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "grpo_kernels", "rollout", "rewards", "sft", "grpo")
ALLOWED = {  # package -> the toolkit packages it may import
    "grpo_kernels": set(),
    "model": {"grpo_kernels"},
    "rollout": {"model", "grpo_kernels"},
    "rewards": {"model", "grpo_kernels"},
    "sft": {"model", "grpo_kernels"},
    "grpo": {"model", "grpo_kernels", "rollout", "rewards", "sft"},
}
# Optional or heavy dependencies a function may import when it needs them (not every run has or wants them).
LAZY_OK = ("vllm", "ray", "matplotlib", "triton", "trl", "torch.utils.tensorboard", "grpo_kernels.triton_impl", "wandb",
           "mlflow")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
EXEMPT_MODULES = {"model/modeling.py"}  # one readable file per architecture (STYLE.md)


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Collects ``(imported module, inside a function)`` pairs, skipping ``if TYPE_CHECKING:`` blocks."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.found: list[tuple[str, bool, int]] = []
        self.depth = 0

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(alias.name, self.depth > 0, node.lineno) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: resolve against this module's package
            base = self.module.split(".")
            base = base if self.is_package else base[:-1]
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" for a in node.names]
        self.found += [(n, self.depth > 0, node.lineno) for n in names]


def imports_of(path: Path) -> list[tuple[str, bool, int]]:
    visitor = _Imports(module_name(path), path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.found


def _resolve(name: str, known: set[str]) -> str | None:
    """The toolkit module an imported name refers to (``pkg.mod.attr`` -> ``pkg.mod``), or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_layers_only_point_down():
    bad = []
    for path in modules():
        package = module_name(path).split(".")[0]
        for name, _, line in imports_of(path):
            top = name.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    known = {module_name(p) for p in modules()}
    graph: dict[str, set[str]] = defaultdict(set)
    for path in modules():
        source = module_name(path)
        for name, _, _ in imports_of(path):
            target = _resolve(name, known)
            if target and target != source and not source.startswith(target + "."):
                graph[source].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(known):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_imports_inside_functions_only_defer_optional_dependencies():
    bad = []
    for path in modules():
        for name, in_function, line in imports_of(path):
            if in_function and not any(name == m or name.startswith(m + ".") for m in LAZY_OK):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not bad, "\n".join(bad)


def test_modules_and_functions_stay_small():
    bad = []
    for path in modules():
        rel = path.relative_to(ROOT).as_posix()
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES and rel not in EXEMPT_MODULES:
            bad.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    bad.append(f"{rel}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not bad, "\n".join(bad)


def test_one_write_report():
    defs = [f"{p.relative_to(ROOT)}" for p in modules()
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name == "write_report"]
    assert len(defs) == 1, defs
