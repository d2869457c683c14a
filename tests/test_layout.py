"""The layout: no import cycle between the project's modules; client commands load no MLX."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The installed package `mlxd` and the folder each of its parts lives in.
PACKAGES = {
    "mlxd": ROOT / "mlxd_pkg",
    "mlxd.rpc": ROOT / "rpc",
    "mlxd.daemon": ROOT / "daemon",
    "mlxd.client": ROOT / "clients" / "python",
    "mlxd.launchd": ROOT / "launchd",
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, wherever the import stands (also under
    TYPE_CHECKING or inside a function: a cycle there is still a knot in the design)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    edges = set()
    for target in targets:
        # `import a.b.c` runs a, a.b and a.b.c; a package's __init__ is an edge only
        # when it is named itself (its submodules do not import their parents' code
        # for this check: a package __init__ that imports its children is the re-export).
        if target in modules and target != name and not name.startswith(target + "."):
            edges.add(target)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_imports() -> None:
    # The walk itself must find edges, or an empty graph would pass the next test.
    modules = _modules()
    assert "mlxd.daemon.service.service" in modules
    engine = _imports("mlxd.daemon.engine.engine", modules["mlxd.daemon.engine.engine"], modules)
    assert "mlxd.daemon.engine.sampling" in engine
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycle_between_modules() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


_LOADED_MLX = """
import sys
def loaded():
    names = (m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm"))
    print(sorted([*names, *(m for m in sys.modules if m.startswith("mlxd.daemon"))]))
    sys.stdout.flush()
"""


def test_importing_the_client_loads_no_mlx() -> None:
    code = f"{_LOADED_MLX}\nimport mlxd.client\nloaded()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["status", "generate", "chat", "token"])
def test_a_client_command_loads_no_mlx(command: str) -> None:
    # `mlxd <command> --help` as the entry point runs it; --help exits, atexit reports.
    code = (
        f"{_LOADED_MLX}\nimport atexit\natexit.register(loaded)\n"
        f"from mlxd.cli import main\nsys.exit(main([{command!r}, '--help']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f"usage: mlxd {command}" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_loaded_check_sees_mlx() -> None:
    # The same check after a daemon command's parser: it must name what it loaded.
    code = f"{_LOADED_MLX}\nimport mlxd.daemon.service.status\nloaded()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "mlx.core" in out.stdout and "mlxd.daemon" in out.stdout


def test_the_entry_point_is_the_dispatcher() -> None:
    # `mlxd` must be mlxd.cli:main, or `mlxd status` would import the daemon after all.
    text = (ROOT / "pyproject.toml").read_text()
    assert 'mlxd = "mlxd.cli:main"' in text
    out = subprocess.run(
        [sys.executable, "-m", "mlxd", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("serve", "status", "generate", "chat", "token", "install", "service-status"):
        assert command in out.stdout
