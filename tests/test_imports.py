"""The package's layering, read from the source: which module imports which (every import
statement, those under TYPE_CHECKING and inside functions included), as a graph."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kimi_cli

ROOT = Path(kimi_cli.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    """Module -> the kimi_cli modules it imports (`from pkg import mod` counts as `pkg.mod`)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if is_package(name, modules) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                           for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycle(graph: dict[str, set[str]], within: str) -> list[str] | None:
    """One import cycle among the modules under `within`, or None."""
    nodes = {n for n in graph if n == within or n.startswith(within + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n] & nodes):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_relative_and_module_imports(graph):
    # A check on the checker: both spellings of an import are edges.
    assert "kimi_cli.config" in graph["kimi_cli.ui.repl"]  # from .. import config
    assert "kimi_cli.ui.render" in graph["kimi_cli.ui.repl"]  # from .render import ...
    assert cycle({"a": {"a.b"}, "a.b": {"a.c"}, "a.c": {"a.b"}}, "a") == ["a.b", "a.c", "a.b"]


def test_the_chat_ui_has_no_import_cycle(graph):
    assert cycle(graph, "kimi_cli.ui") is None


def test_the_package_has_no_import_cycle(graph):
    assert cycle(graph, "kimi_cli") is None


def test_the_agent_does_not_know_the_chat_ui(graph):
    upward = {(m, t) for m, ts in graph.items() if m.startswith("kimi_cli.agent")
              for t in ts if t.startswith("kimi_cli.ui")}
    assert upward == set()


def test_the_model_and_engine_do_not_know_any_front_end(graph):
    front_ends = ("kimi_cli.ui", "kimi_cli.agent", "kimi_cli.serve", "kimi_cli.cli")
    lower = [m for m in graph if m.startswith(("kimi_cli.model", "kimi_cli.engine",
                                              "kimi_cli.chat", "kimi_cli.checkpoint"))]
    upward = {(m, t) for m in lower for t in graph[m] if t.startswith(front_ends)}
    assert upward == set()


def test_the_chat_app_is_a_chat_host():
    # Commands and agent turns are written against ChatHost; the REPL's ChatApp must offer it.
    import inspect
    import textwrap

    from kimi_cli.ui.host import ChatHost
    from kimi_cli.ui.repl import ChatApp

    init = ast.parse(textwrap.dedent(inspect.getsource(ChatApp.__init__)))
    assigned = {t.attr for node in ast.walk(init) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Attribute)}
    assert set(ChatHost.__annotations__) <= assigned
    methods = {n for n, v in vars(ChatHost).items() if inspect.isfunction(v) and n[0] != "_"}
    assert methods and methods <= set(dir(ChatApp))
    for name in methods:
        host, app = inspect.signature(getattr(ChatHost, name)), \
            inspect.signature(getattr(ChatApp, name))
        assert list(host.parameters) == list(app.parameters), name
