"""The package's layering, read from the source: the import graph of ``torchdora.*`` (every
import statement, inside functions and under ``TYPE_CHECKING`` too) follows the table of
``docs/design.md`` §2.1, has no cycle, never reaches from the library into the application
layer; and no module is over 450 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
APP_LAYER = ("torchdora.recipes", "torchdora.cli", "torchdora.__main__")
MAX_LINES = 450


def module_files() -> dict[str, Path]:
    """``torchdora.x.y`` -> its file, for every module and package of the source."""
    modules = {}
    for path in sorted((SOURCE / "torchdora").rglob("*.py")):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported(module: str, path: Path) -> set[str]:
    """The ``torchdora`` modules that ``module`` imports anywhere in its file. ``from p import
    name`` imports the module ``p.name`` where there is one, else ``p``; a package's own
    ``__init__`` running first is not counted (Python's doing, not the importer's)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package up
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imported(module, path) for module, path in MODULES.items()}


def layer(module: str) -> str:
    """The row of the layering table a module falls under: ``torchdora.<first part>``, or
    ``torchdora`` for the package's ``__init__``."""
    return ".".join(module.split(".")[:2])


def layering_table() -> dict[str, set[str]]:
    """docs/design.md §2.1: package -> the packages it may import (besides itself)."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text[text.index("### 2.1 Layering") : text.index("## 3.")]
    table: dict[str, set[str]] = {}
    for row in re.findall(r"^\| `(torchdora[\w.]*)`[^|]* \| (.+) \|$", section, re.M):
        package, allowed = row
        names = set(re.findall(r"`(\w+)`", allowed))
        table[package] = {"torchdora" if n == "torchdora" else f"torchdora.{n}" for n in names}
        if "the library" in allowed:
            table[package] |= LIBRARY
    return table


LIBRARY = {layer(m) for m in MODULES} - set(APP_LAYER)


def test_the_table_has_a_row_for_every_package():
    table = layering_table()
    assert len(table) >= 10  # the table was found and read
    missing = sorted({layer(m) for m in MODULES} - set(table))
    assert not missing, f"add a row for {missing} to docs/design.md §2.1"


def test_every_import_follows_the_layering_table():
    table = layering_table()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(target) != layer(module) and layer(target) not in table.get(layer(module), ())
    )
    assert not wrong, "imports that docs/design.md §2.1 does not allow:\n" + "\n".join(wrong)


def test_the_library_never_imports_the_application_layer():
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if layer(module) not in APP_LAYER
        for target in targets
        if layer(target) in APP_LAYER
    )
    assert not wrong, "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_the_checker_sees_cycles_and_imports_inside_functions(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    path = tmp_path / "config.py"
    path.write_text("def f():\n    from torchdora.cli import main\n")
    assert imported("torchdora.config", path) == {"torchdora.cli"}


def test_no_module_over_450_lines():
    lengths = {
        path.relative_to(SOURCE).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in MODULES.values()
    }
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"split these by job: {too_long}"
