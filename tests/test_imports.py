"""The package's modules import each other without cycles, so each one imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "svdcompress"


def _module_names() -> dict[str, Path]:
    names = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return names


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (imports inside functions run
    later and under TYPE_CHECKING never: neither can take part in an import cycle)."""
    names = _module_names()
    graph = {}
    for name, file in names.items():
        edges = set()
        for node in ast.parse(file.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("svdcompress"):
                # ``from svdcompress import api`` imports the submodule; ``import __version__`` the root.
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("svdcompress")}
        graph[name] = edges - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_level_import_cycles():
    graph = _import_graph()
    assert {"svdcompress.compress", "svdcompress.checkpoint", "svdcompress.runtime"} <= graph.keys()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_modules_that_were_in_cycles_import_first_in_a_fresh_interpreter():
    code = ("import svdcompress.quantize, svdcompress.runtime, svdcompress.compress, svdcompress; "
            "assert svdcompress.__version__ == svdcompress.quantize.__version__")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_library_never_imports_the_command_line():
    """commands/ and cli.py are a thin layer over the library (pipelines/, api.py), not beneath it:
    no other module imports them, at module level or inside a function."""
    offenders = []
    for name, file in _module_names().items():
        if name == "svdcompress.cli" or name.startswith("svdcompress.commands"):
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                       else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [(name, m) for m in modules
                          if m.startswith(("svdcompress.commands", "svdcompress.cli"))]
    assert offenders == []
