"""The layers the folders show, checked from the source alone: ast, nothing of diffuse imported.

- the networks (diffuse/models) import none of the layers that run or train them;
- the shapes world reads nothing of training but the finished-component files, and only the
  command line reaches into the server;
- the package's import-time imports form no cycle;
- no function on the generation path (pipeline, request, models, samplers, prompts) is over
  MAX_FUNCTION_LINES lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "diffuse"
NOT_IN_MODELS = ("diffuse.runtime", "diffuse.speedups", "diffuse.server", "diffuse.train", "diffuse.shapes")
# The one arrow from the shapes world into training: a model folder keeps its image tower in the
# stages' finished-component format, and that format has one reader (diffuse.train.components).
SHAPES_INTO_TRAIN = {("diffuse.shapes.evaluate", "diffuse.train.components")}
SERVER_USERS = {"diffuse.cli"}
MAX_FUNCTION_LINES = 50
SHORT_FUNCTION_FILES = (
    "pipeline*.py",
    "pipeline/**/*.py",
    "request.py",
    "generation*.py",
    "generation/**/*.py",
    "models/**/*.py",
    "samplers/**/*.py",
    "prompts*.py",
    "prompts/**/*.py",
    "conditioning*.py",
)


# ---- reading the source ------------------------------------------------------------------------


def module_name(path: Path, root: Path = ROOT) -> str:
    """diffuse/train/loop.py -> diffuse.train.loop; a package's __init__.py -> the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {
        module_name(path, package.parent): path
        for path in sorted(package.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def absolute_target(node: ast.ImportFrom, module: str, package: bool) -> str:
    """The module a `from ... import` names, with relative imports resolved against `module`."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, package: bool, known: set[str]) -> set[str]:
    """The package's own modules an import statement loads: a name imported from a package is its
    submodule when there is one, else the package itself. Other libraries are left out."""
    if isinstance(node, ast.Import):
        targets = set()
        for alias in node.names:
            name = alias.name
            while name and name not in known:
                name = name.rpartition(".")[0]
            targets.add(name)
        return targets - {""}
    target = absolute_target(node, module, package)
    found = {f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names}
    return found & known


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(
    statements: list[ast.stmt], *, functions: bool, type_checking: bool
) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among `statements`, and those nested in them: inside function bodies
    only with `functions`, under `if TYPE_CHECKING:` only with `type_checking`. Class bodies,
    try/except, with, loops and other ifs run at import time, so they always count."""
    for statement in statements:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            yield statement
        elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if functions:
                yield from imports_in(statement.body, functions=functions, type_checking=type_checking)
        elif isinstance(statement, ast.If) and _is_type_checking(statement.test):
            if type_checking:
                yield from imports_in(statement.body, functions=functions, type_checking=type_checking)
            yield from imports_in(statement.orelse, functions=functions, type_checking=type_checking)
        else:
            for child in ast.iter_child_nodes(statement):
                if isinstance(child, ast.stmt):
                    body = [child]
                else:  # an except clause or a match case holds statements; an expression none
                    body = child.body if isinstance(child, (ast.excepthandler, ast.match_case)) else []
                yield from imports_in(body, functions=functions, type_checking=type_checking)


def import_graph(modules: dict[str, Path], *, functions: bool, type_checking: bool) -> dict[str, set[str]]:
    """module -> the package's modules it imports (see imports_in for which import statements count)."""
    known, graph = set(modules), {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        statements = imports_in(tree.body, functions=functions, type_checking=type_checking)
        graph[module] = set().union(*(imported_modules(node, module, is_package(path), known) for node in statements))
        graph[module].discard(module)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) for each group of modules that import each other."""
    reach = {module: reachable(graph, module) for module in graph}
    cycles, covered = [], set()
    for module in sorted(graph):
        if module in reach[module] and module not in covered:
            group = {other for other in reach[module] if module in reach[other]}
            covered |= group
            cycles.append(cycle_through(module, graph, group))
    return cycles


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules `start` imports, directly or through others."""
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def cycle_through(start: str, graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest import path from `start` back to itself inside its group."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for step in sorted(graph[path[-1]] & group):
            if step == start:
                return path + [start]
            if step not in seen:
                seen.add(step)
                paths.append(path + [step])
    raise AssertionError(f"{start} is in a strongly connected group without a cycle through it")


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES, root: Path = ROOT) -> list[str]:
    """'file:line name (N lines)' for every function or method over `limit` lines, def line to last line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit
    ]


def offending_imports(graph: dict[str, set[str]], importers: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module in importers
        for target in graph[module]
        if any(target == layer or target.startswith(layer + ".") for layer in forbidden)
    )


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# ---- the layers ---------------------------------------------------------------------------------


def test_the_networks_import_nothing_that_runs_or_trains_them():
    graph = import_graph(package_modules(), functions=True, type_checking=True)
    models = {module for module in graph if in_package(module, "diffuse.models")}
    assert models, "no modules found under diffuse/models"
    offenders = offending_imports(graph, models, NOT_IN_MODELS)
    assert not offenders, "diffuse/models must stay plain networks:\n  " + "\n  ".join(offenders)


def test_the_shapes_world_reads_only_finished_components_from_training():
    graph = import_graph(package_modules(), functions=True, type_checking=True)
    arrows = {
        (module, target)
        for module in graph
        if in_package(module, "diffuse.shapes")
        for target in graph[module]
        if in_package(target, "diffuse.train")
    }
    extra = sorted(f"{module} imports {target}" for module, target in arrows - SHAPES_INTO_TRAIN)
    assert not extra, "diffuse.shapes must not depend on training:\n  " + "\n  ".join(extra)


def test_only_the_command_line_imports_the_server():
    graph = import_graph(package_modules(), functions=True, type_checking=True)
    outside = {module for module in graph if not in_package(module, "diffuse.server")} - SERVER_USERS
    offenders = offending_imports(graph, outside, ("diffuse.server",))
    assert not offenders, "only diffuse.cli may import the server:\n  " + "\n  ".join(offenders)


def test_no_import_cycle_in_the_package():
    graph = import_graph(package_modules(), functions=False, type_checking=False)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_cycle_hidden_in_an_import_deferred_into_a_function():
    graph = import_graph(package_modules(), functions=True, type_checking=False)
    cycles = find_cycles(graph)
    assert not cycles, (
        "modules that need each other (an import moved into a function only hides it):\n  "
        + "\n  ".join(" -> ".join(cycle) for cycle in cycles)
    )


def test_no_long_functions_on_the_generation_path():
    files = sorted(
        {path for pattern in SHORT_FUNCTION_FILES for path in PACKAGE.glob(pattern) if "__pycache__" not in path.parts}
    )
    assert any(path.parent.name == "models" for path in files), "the file patterns no longer find diffuse/models"
    offenders = [line for path in files for line in long_functions(path)]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n  " + "\n  ".join(
        offenders
    )


# ---- the checks themselves, on made-up packages ----------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package_modules(root / "pkg")


def test_relative_and_submodule_imports_resolve(tmp_path):
    modules = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from .core import thing\n",
            "pkg/core.py": "import os\nfrom . import util\nfrom .sub import deep\n",
            "pkg/util.py": "from pkg.sub.deep import value\nimport pkg.core\n",
            "pkg/sub/__init__.py": "from .. import util\n",
            "pkg/sub/deep.py": "from ..core import thing\nvalue = 1\n",
        },
    )
    graph = import_graph(modules, functions=False, type_checking=False)
    assert graph == {
        "pkg": {"pkg.core"},
        "pkg.core": {"pkg.util", "pkg.sub.deep"},
        "pkg.util": {"pkg.sub.deep", "pkg.core"},
        "pkg.sub": {"pkg.util"},
        "pkg.sub.deep": {"pkg.core"},
    }


def test_which_imports_count(tmp_path):
    modules = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\nelse:\n"
                "    from pkg import c\ndef later():\n    from pkg import d\nclass K:\n    from pkg import e\n"
                "try:\n    from pkg import f\nexcept ImportError:\n    from pkg import g\n"
            ),
            **{f"pkg/{name}.py": "" for name in "bcdefg"},
        },
    )

    def imported(**which: bool) -> set[str]:
        return import_graph(modules, **which)["pkg.a"]

    assert imported(functions=False, type_checking=False) == {"pkg.c", "pkg.e", "pkg.f", "pkg.g"}
    assert imported(functions=True, type_checking=False) == {"pkg.c", "pkg.d", "pkg.e", "pkg.f", "pkg.g"}
    assert imported(functions=True, type_checking=True) == {f"pkg.{name}" for name in "bcdefg"}


def test_a_cycle_is_found_and_named():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a", "p.d"}, "p.d": set(), "p.e": {"p.d"}}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    assert find_cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_a_long_function_is_named(tmp_path):
    path = tmp_path / "long.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    path.write_text(f"def short():\n    pass\n\n\ndef too_long():\n{body}", encoding="utf-8")
    assert long_functions(path, root=tmp_path) == [f"long.py:5 too_long ({MAX_FUNCTION_LINES + 1} lines)"]
    assert long_functions(path, MAX_FUNCTION_LINES + 1, root=tmp_path) == []
