"""The architecture of docs/design.md, enforced from the import graph of kdcore/ and dashboard/.

Imports are read with ``ast`` (nothing is imported): at module level and inside functions
alike, except under ``if TYPE_CHECKING:``. A package's ``__init__`` is see-through: importing
a package depends on what its ``__init__`` imports, and a module never depends on its parent
package merely by living in it, so re-exports make no cycle of their own.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each folder under the name it is installed as (pyproject.toml's package-dir).
FOLDERS = {"kdcore": "kdcore", "dashboard": "kdcore_app"}
SHIMS = ("kdcore.bias", "kdcore.losses", "kdcore.bundles", "kdcore.tabular")
PLOTLY = ("plotly.graph_objects", "plotly.express", "plotly.subplots")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, as installed: kdcore.data.bundles
    path: str  # its file in the repository, for messages
    name: str  # what it imports: `import a.b` -> a.b, `from a import b` -> a.b
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.name}"


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_in(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(name, line) of every import in ``source``, except those under ``if TYPE_CHECKING:``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        else:
            children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.extend((base if alias.name == "*" else f"{base}.{alias.name}", node.lineno)
                         for alias in node.names)
        for child in children:
            visit(child)

    visit(ast.parse(source))
    return found


def read_graph(root: Path = ROOT, folders: dict[str, str] = FOLDERS):
    """(modules, imports): every module's name -> whether it is a package, and every import."""
    modules: dict[str, bool] = {}
    imports: list[Import] = []
    for folder, installed in folders.items():
        for file in sorted((root / folder).rglob("*.py")):
            parts = [installed, *file.relative_to(root / folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if is_package else parts)
            modules[module] = is_package
            rel = file.relative_to(root).as_posix()
            imports += [Import(module, rel, name, line)
                        for name, line in imports_in(file.read_text(), module, is_package)]
    return modules, imports


def resolve(name: str, modules: dict[str, bool]) -> str | None:
    """The module of ours that ``name`` lands in (``a.b.Name`` -> ``a.b``), or None."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def dependency_graph(modules, imports, package: str = "kdcore") -> dict[str, dict[str, Import]]:
    """module -> {module it depends on: the import that says so}, packages seen through."""
    direct: dict[str, dict[str, Import]] = {m: {} for m in modules if under(m, [package])}
    for imp in imports:
        target = resolve(imp.name, modules)
        if imp.module in direct and target in direct and target != imp.module:
            direct[imp.module].setdefault(target, imp)

    def through(target: str, seen: set[str]) -> set[str]:
        if not modules[target]:
            return {target}
        seen.add(target)
        return {m for t in direct[target] if t not in seen for m in through(t, seen)}

    return {m: {t: imp for d, imp in deps.items() for t in through(d, set()) if t != m}
            for m, deps in direct.items() if not modules[m]}


def _paths_from(graph: dict[str, dict[str, Import]], start: str) -> dict[str, Import]:
    """Breadth first from ``start``: each module reached -> the import that first reached it."""
    parent: dict[str, Import] = {}
    queue = deque([start])
    while queue:
        for target, imp in sorted(graph[queue.popleft()].items()):
            if target not in parent:
                parent[target] = imp
                queue.append(target)
    return parent


def cycles(graph: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """A shortest cycle for each group of modules that import each other (a strongly connected
    component), through the group's first module by name."""
    reach = {m: _paths_from(graph, m) for m in graph}
    found, covered = [], set()
    for start in sorted(graph):
        if start in covered or start not in reach[start]:
            continue
        covered |= {m for m in reach[start] if start in reach[m]}
        path, node = [], start
        while not path or node != start:
            path.append(reach[start][node])
            node = path[-1].module
        found.append(path[::-1])
    return found


def offending(imports, where, what) -> list[str]:
    return [str(i) for i in imports if under(i.module, where) and under(i.name, what)]


MODULES, IMPORTS = read_graph()


def test_no_import_cycle_inside_kdcore():
    found = cycles(dependency_graph(MODULES, IMPORTS))
    assert not found, "import cycles:\n" + "\n".join(
        " -> ".join(f"{i.module} ({i.path}:{i.line} imports {i.name})" for i in cycle)
        for cycle in found)


def test_the_engine_never_imports_streamlit():
    assert not (bad := offending(IMPORTS, ["kdcore"], ["streamlit"])), "\n".join(bad)


def test_data_and_analysis_import_neither_torch_nor_the_store():
    bad = offending(IMPORTS, ["kdcore.data", "kdcore.analysis"], ["torch", "kdcore.store"])
    assert not bad, "\n".join(bad)


def test_pages_neither_spawn_processes_nor_import_torch():
    bad = offending(IMPORTS, ["kdcore_app.app_pages"], ["subprocess", "torch"])
    assert not bad, "\n".join(bad)


def test_one_module_imports_plotly_figures():
    drawing: dict[str, Import] = {}
    for i in IMPORTS:
        if under(i.name, PLOTLY):
            drawing.setdefault(i.module, i)
    assert len(drawing) <= 1, "more than one module draws with Plotly:\n" + "\n".join(
        str(i) for i in drawing.values())


def test_nothing_inside_uses_the_kept_import_paths():
    users = [i for i in IMPORTS if resolve(i.name, MODULES) in SHIMS]
    assert not users, "\n".join(f"{i} (a kept path for outside code)" for i in users)


def test_the_reader_sees_what_the_rules_rely_on(tmp_path):
    """Function-level imports count, TYPE_CHECKING ones do not, __init__ is seen through."""
    files = {
        "pkg/__init__.py": "from pkg.b import thing\n",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                    "else:\n    import numpy\ndef f():\n    from pkg import thing\n",
        "pkg/b.py": "from . import c\n",
        "pkg/c.py": "import pkg.a\nimport plotly.graph_objects as go\n",
        "pkg/d.py": "from .a import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, imports = read_graph(tmp_path, {"pkg": "pkg"})
    assert not offending(imports, ["pkg"], ["torch"])
    assert offending(imports, ["pkg.a"], ["numpy"]) == ["pkg/a.py:5 imports numpy"]
    graph = dependency_graph(modules, imports, "pkg")
    assert set(graph) == {"pkg.a", "pkg.b", "pkg.c", "pkg.d"}
    assert set(graph["pkg.a"]) == {"pkg.b"} and set(graph["pkg.d"]) == {"pkg.a"}
    (cycle,) = cycles(graph)
    assert [i.module for i in cycle] == ["pkg.a", "pkg.b", "pkg.c"]
