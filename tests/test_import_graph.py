"""The package's module graph is clean.

Every file under ``amrsd_jax/`` is parsed statically with :mod:`ast` (relative imports are
resolved against the importing module), and four properties are checked:

a. every module imports without error;
b. the module-level imports between ``amrsd_jax`` modules form no cycle;
c. no function body imports an ``amrsd_jax`` module, except in ``amrsd_jax/cli.py`` (the CLI
   keeps ``--help`` fast); lazy imports of optional heavy third-party packages are fine;
d. no module imports a private name or a private module (leading underscore) of another
   package.

Edges of the graph (b):

* ``import amrsd_jax.a.b`` and ``from amrsd_jax.a.b import x`` -> ``amrsd_jax.a.b``;
* ``from amrsd_jax.a import b`` -> ``amrsd_jax.a.b`` when ``b`` is a submodule, otherwise
  ``amrsd_jax.a`` (a package stands for its ``__init__``);
* the implicit import of the parent packages is not an edge (a package ``__init__`` that
  re-exports its children is fine); a child that explicitly imports its own package's
  ``__init__`` is an edge, so it is a cycle when that ``__init__`` imports the child back.

Imports under ``if TYPE_CHECKING:`` never run, so they are neither edges nor lazy imports.
Failure messages list ``file:line`` of every offending import.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

import amrsd_jax

PACKAGE = "amrsd_jax"
ROOT = Path(amrsd_jax.__file__).resolve().parent
REPO = ROOT.parent
# modules allowed to import package modules inside functions
LAZY_IMPORTS_ALLOWED = {f"{PACKAGE}.cli"}


# ----------------------------------------------------------------------------- static model
@dataclass(frozen=True)
class Import:
    """One import of an ``amrsd_jax`` module found in a source file."""

    importer: str        # dotted name of the importing module
    target: str          # dotted name of the imported module (package = its __init__)
    names: tuple[str, ...]  # names taken from ``target`` (empty for ``import x``)
    lineno: int
    function_local: bool  # inside a function body (runs only when called)

    @property
    def where(self) -> str:
        return f"{_path_of(self.importer)}:{self.lineno}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULE_FILES: dict[str, Path] = {
    _module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}
PACKAGES = {name for name, p in MODULE_FILES.items() if p.name == "__init__.py"}


def _path_of(module: str) -> str:
    return MODULE_FILES[module].relative_to(REPO).as_posix()


def _package_of(module: str) -> str:
    """The package a module belongs to (a package ``__init__`` belongs to itself)."""
    return module if module in PACKAGES else module.rpartition(".")[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve_from(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(importer).split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str):
        self.module = module
        self.depth = 0  # function nesting
        self.imports: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # annotations only: never executed
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _add(self, target: str, names: tuple[str, ...], lineno: int) -> None:
        self.imports.append(Import(self.module, target, names, lineno, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _in_package(alias.name):
                self._add(alias.name, (), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _resolve_from(self.module, node)
        if not _in_package(source):
            return
        plain = []
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if sub in MODULE_FILES:  # ``from pkg import submodule``
                self._add(sub, (), node.lineno)
            else:
                plain.append(alias.name)
        if plain:
            self._add(source, tuple(plain), node.lineno)


@functools.cache
def _package_imports() -> tuple[Import, ...]:
    imports, unparsable = [], []
    for module, path in MODULE_FILES.items():
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except SyntaxError as e:
            unparsable.append(f"{_path_of(module)}:{e.lineno}: {e.msg}")
            continue
        collector = _ImportCollector(module)
        collector.visit(tree)
        imports.extend(collector.imports)
    if unparsable:
        pytest.fail("cannot parse:\n  " + "\n  ".join(unparsable), pytrace=False)
    return tuple(sorted(imports, key=lambda imp: (_path_of(imp.importer), imp.lineno)))


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # recursion depth <= number of modules (~60)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                components.append(sorted(component))

    nodes = set(MODULE_FILES) | set(edges) | {w for ws in edges.values() for w in ws}
    for v in sorted(nodes):
        if v not in index:
            strongconnect(v)
    return components


def _find_cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One shortest concrete cycle per strongly connected component with a cycle."""
    cycles = []
    for component in _strongly_connected(edges):
        members, start = set(component), component[0]
        # shortest path start -> ... -> start inside the component (BFS)
        parent: dict[str, str] = {}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges.get(v, ())):
                    if w not in members:
                        continue
                    if w == start:
                        found = v
                        break
                    if w not in parent:
                        parent[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append(path[::-1] + [start])
    return cycles


# ----------------------------------------------------------------------------- a. imports
def test_every_module_imports():
    walk_errors: list[str] = []
    walked = {info.name for info in pkgutil.walk_packages(
        amrsd_jax.__path__, prefix=f"{PACKAGE}.", onerror=walk_errors.append)} | {PACKAGE}
    failures = [f"{name}: pkgutil.walk_packages could not import this package"
                for name in walk_errors]
    failures += [f"{_path_of(name)}: not found by pkgutil.walk_packages (missing __init__.py?)"
                 for name in sorted(set(MODULE_FILES) - walked)]
    for name in sorted(walked | set(MODULE_FILES)):
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - SystemExit from a module is a failure too
            last = traceback.extract_tb(e.__traceback__)[-1]
            where = _path_of(name) if name in MODULE_FILES else name
            failures.append(f"{where}: {type(e).__name__}: {e} "
                            f"(raised at {last.filename}:{last.lineno})")
    if failures:
        pytest.fail(f"{len(failures)} import problem(s):\n  " + "\n  ".join(failures),
                    pytrace=False)


# ----------------------------------------------------------------------------- b. no cycles
def test_no_import_cycles():
    edges: dict[str, dict[str, Import]] = {}
    for imp in _package_imports():
        if not imp.function_local:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    cycles = _find_cycles(edges)
    report = []
    for cycle in cycles:
        members = set(cycle)
        lines = ["cycle: " + " -> ".join(cycle)]
        lines += [f"    {edges[a][b].where}: {a} imports {b}" for a, b in zip(cycle, cycle[1:])]
        lines.append("  all module-level imports inside this group of mutually dependent modules:")
        lines += sorted(f"    {imp.where}: imports {imp.target}"
                        for a in members for b, imp in edges.get(a, {}).items() if b in members)
        report.append("\n".join(lines))
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) among module-level imports:\n  "
                    + "\n  ".join(report), pytrace=False)


# ----------------------------------------------------------------------------- c. no lazy
def test_no_function_local_package_imports():
    offenders = [f"{imp.where}: imports {imp.target}" for imp in _package_imports()
                 if imp.function_local and imp.importer not in LAZY_IMPORTS_ALLOWED]
    if offenders:
        pytest.fail(f"{len(offenders)} function-local import(s) of amrsd_jax modules (move them "
                    "to module level; only cli.py may import lazily):\n  "
                    + "\n  ".join(offenders), pytrace=False)


# ----------------------------------------------------------------------------- d. privacy
def _private_violations(imp: Import) -> list[str]:
    own_package = _package_of(imp.importer)
    found = []
    # a private module on the path: amrsd_jax.a._b (owned by the package that contains it)
    parts = imp.target.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            owner = ".".join(parts[:i])
            if owner != own_package:
                found.append(f"private module {'.'.join(parts[:i + 1])} of {owner}")
            break
    # a private name taken from a module: owned by that module's package
    owner = _package_of(imp.target)
    if owner != own_package:
        found += [f"private name {imp.target}.{name}"
                  for name in imp.names if _is_private(name)]
    return found


def test_no_private_imports_across_packages():
    offenders = [f"{imp.where}: {v} (importer in {_package_of(imp.importer)})"
                 for imp in _package_imports() for v in _private_violations(imp)]
    if offenders:
        pytest.fail(f"{len(offenders)} import(s) of another package's private names or "
                    "modules:\n  " + "\n  ".join(offenders), pytrace=False)


# ----------------------------------------------------------------------------- the checker
def _graph_of(sources: dict[str, str]) -> list[Import]:
    imports = []
    for module, text in sources.items():
        collector = _ImportCollector(module)
        collector.visit(ast.parse(text))
        imports.extend(collector.imports)
    return imports


@pytest.mark.parametrize("module, source, target, names, local", [
    ("amrsd_jax.credit.grpo", "from ..losses import policy", "amrsd_jax.losses.policy", (),
     False),
    ("amrsd_jax.credit.grpo", "from . import hapo", "amrsd_jax.credit.hapo", (), False),
    ("amrsd_jax.credit", "from .grpo import x", "amrsd_jax.credit.grpo", ("x",), False),
    ("amrsd_jax.credit", "from . import cig", "amrsd_jax.credit.cig", (), False),
    ("amrsd_jax.credit.grpo", "from .. import arrays", "amrsd_jax.arrays", (), False),
    ("amrsd_jax.credit.grpo", "from .. import __version__", "amrsd_jax", ("__version__",),
     False),
    ("amrsd_jax.evaluation", "import amrsd_jax.models.decoder as d", "amrsd_jax.models.decoder",
     (), False),
    ("amrsd_jax.evaluation", "def f():\n    from .models import load_model",
     "amrsd_jax.models", ("load_model",), True),
])
def test_import_resolution(module, source, target, names, local):
    (imp,) = _graph_of({module: source})
    assert (imp.target, imp.names, imp.function_local) == (target, names, local)


def test_checker_ignores_third_party_and_type_checking():
    src = ("from typing import TYPE_CHECKING\nimport jax\n"
           "if TYPE_CHECKING:\n    from amrsd_jax.models import Decoder\n"
           "def f():\n    import torch\n")
    assert _graph_of({"amrsd_jax.evaluation": src}) == []


def test_checker_finds_cycles_and_private_imports():
    imports = _graph_of({
        "amrsd_jax.credit": "from .grpo import x\n",
        "amrsd_jax.credit.grpo": "from . import y\nfrom ..losses.policy import _z\n",
        "amrsd_jax.losses.policy": "from amrsd_jax.credit.grpo import q\n"
                                   "from amrsd_jax.credit._utils import m\n",
    })
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    assert _strongly_connected(edges) == [
        ["amrsd_jax.credit", "amrsd_jax.credit.grpo", "amrsd_jax.losses.policy"]]
    assert _find_cycles(edges) == [["amrsd_jax.credit", "amrsd_jax.credit.grpo",
                                    "amrsd_jax.credit"]]
    del edges["amrsd_jax.credit.grpo"]
    assert _find_cycles(edges) == []
    violations = [v for imp in imports for v in _private_violations(imp)]
    assert violations == ["private name amrsd_jax.losses.policy._z",
                          "private module amrsd_jax.credit._utils of amrsd_jax.credit"]
