"""The layering rules of docs/architecture.md, checked on the source tree itself."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import streamrec
import trainer

ROOT = Path(__file__).resolve().parents[2]


def _modules(package: ModuleType) -> list[str]:
    path = package.__path__
    prefix = package.__name__ + "."
    names = (m.name for m in pkgutil.walk_packages(path, prefix))
    return sorted(n for n in names if not n.endswith(".__main__"))  # __main__ runs the CLI


def test_serving_package_never_loads_training_code() -> None:
    """Every streamrec module imports in a fresh interpreter without any trainer module."""
    modules = _modules(streamrec)
    assert "streamrec.engines.native.worker" in modules  # the walk found the subpackages
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] == 'trainer')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _imports(path: Path, module: str) -> set[str]:
    """Modules of streamrec/trainer imported at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in ("streamrec", "trainer")}


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for package in (streamrec, trainer):
        for name in [package.__name__, *_modules(package)]:
            spec = __import__("importlib").util.find_spec(name)
            assert spec is not None and spec.origin is not None
            graph[name] = _imports(Path(spec.origin), name)
    for name in graph:
        graph[name] = {m for m in graph[name] if m in graph and m != name}
    # a package's __init__ importing its own submodules is not a cycle of the layering
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_serving_package_has_no_training_imports_in_source() -> None:
    """Not even inside functions: grep the source for imports of trainer."""
    offenders = []
    for path in (ROOT / "streamrec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "trainer"
            ]
    assert offenders == []


def test_worker_runs_without_the_trainer_package() -> None:
    """What the worker image holds: the worker command works with ``trainer`` unimportable."""
    code = (
        "import sys\n"
        "sys.modules['trainer'] = None  # any import of it now raises ImportError\n"
        "import streamrec.engines.native.worker, streamrec.engines.faust.app\n"
        "from streamrec.cli.main import main\n"
        "main(['worker', '--help'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "Run one worker" in out.stdout


def test_worker_image_does_not_copy_the_trainer() -> None:
    copies = [
        line.split()[1]
        for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    ]
    assert "streamrec" in copies
    assert not [c for c in copies if c.startswith("trainer")]
