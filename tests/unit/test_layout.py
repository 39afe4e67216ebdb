"""The package's shape, checked: imports flow one way, nobody borrows another module's private names,
and the runtime never imports the test support it ships.

Read from the source with `ast`, so the checks see lazy imports inside functions too.
"""

from __future__ import annotations

import ast
import pathlib

import ecr_twisted

ROOT = pathlib.Path(ecr_twisted.__file__).resolve().parent
PACKAGE = "ecr_twisted"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text("utf-8"), str(p)) for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node, except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)
    return out


def _imports(tree: ast.Module, types_too: bool = True) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of our own package."""
    found: list[tuple[str, list[str]]] = []
    for node in (ast.walk(tree) if types_too else _runtime_nodes(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == PACKAGE or node.module.startswith(PACKAGE + "."):
                names = [a.name for a in node.names]
                # `from ecr_twisted.x import y` may name a submodule y
                subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
                found.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES]))
                found.extend((s, []) for s in subs)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.append((alias.name, []))
    return found


def _graph(types_too: bool = True) -> dict[str, set[str]]:
    return {name: {m for m, _ in _imports(tree, types_too) if m in MODULES and m != name}
            for name, tree in MODULES.items()}


def test_relative_imports_are_not_used() -> None:
    """Absolute imports only: a moved module cannot silently import a sibling of the same name."""
    relative = [name for name, tree in MODULES.items()
                for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert relative == []


def test_the_import_graph_has_no_cycle() -> None:
    """At run time; imports for annotations only (`if TYPE_CHECKING:`) may point back."""
    graph = _graph(types_too=False)
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_module_takes_another_modules_private_names() -> None:
    borrowed = [
        (name, module, n)
        for name, tree in MODULES.items()
        for module, names in _imports(tree)
        for n in names
        if n.startswith("_") and module != name
    ]
    assert borrowed == []


def test_the_runtime_never_imports_the_shipped_test_support() -> None:
    runtime = {name: deps for name, deps in _graph().items() if not name.startswith(f"{PACKAGE}.testing")}
    leaks = sorted(
        (name, dep) for name, deps in runtime.items() for dep in deps if dep.startswith(f"{PACKAGE}.testing")
    )
    assert leaks == []


def test_lower_layers_do_not_import_higher_ones() -> None:
    """The data path knows nothing of registries, access or caching; the cache never calls the handler."""
    forbidden = {
        "http": ("registry", "access", "cache", "ecr", "app", "observe"),
        "cache": ("registry.handler", "access", "app"),
        "access": ("registry.handler", "cache", "app"),
        "ecr": ("registry", "access", "cache", "app", "http.server"),
        "registry": ("app",),
        "observe": ("registry", "access", "cache", "app"),
    }
    found = []
    for name, deps in _graph().items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in forbidden:
            continue
        for dep in deps:
            for bad in forbidden[parts[1]]:
                if dep == f"{PACKAGE}.{bad}" or dep.startswith(f"{PACKAGE}.{bad}."):
                    found.append((name, dep))
    assert found == []


def test_every_package_is_installed() -> None:
    """setup.cfg lists packages by hand: one left out installs a proxy that cannot start (the tests,
    which import from the working tree, would not notice; `ecr_twisted.upstreams` once was)."""
    import configparser

    root = pathlib.Path(__file__).resolve().parents[2]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {
        ".".join(p.parent.relative_to(root).parts) for p in (root / "ecr_twisted").rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
