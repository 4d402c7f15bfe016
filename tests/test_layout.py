"""The shape of the source tree: import graph, private names, file sizes, layer boundaries.

The import graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` statement, at module level or inside a function, with relative imports resolved.
A cycle counts even when one of its imports sits inside a function: such a lazy import only hides the
tangle from the interpreter, not from a reader. A check that names a module fails when that module is
gone (renamed or moved), and every loop over files first asserts that it found some: no check here can
pass by finding nothing to check.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "sparsediff"
MAX_LINES = 600
NATIVE_SUFFIXES = (".cpp", ".h", ".cu")  # the C++ sources of the native kernels count against MAX_LINES


@dataclass(frozen=True)
class Import:
    """One imported name: ``module`` is the sparsediff module it comes from, ``name`` the name taken
    from it (``None`` for ``import module``)."""

    importer: str
    line: int
    module: str
    name: str | None


def module_files(src: Path = SRC) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package under ``src``."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(module: str, files: dict[str, Path]) -> bool:
    return module in files and files[module].name == "__init__.py"


def imports_of(module: str, files: dict[str, Path]) -> Iterator[Import]:
    """Every name ``module`` imports from a sparsediff module (relative imports resolved)."""
    tree = ast.parse(files[module].read_text(), filename=str(files[module]))
    package = module if _is_package(module, files) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield Import(module, node.lineno, alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                yield Import(module, node.lineno, source, alias.name)


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules it imports}``; ``from package import submodule`` points at the submodule."""
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module in files:
        for imp in imports_of(module, files):
            target = imp.module
            if imp.name is not None and f"{imp.module}.{imp.name}" in files:
                target = f"{imp.module}.{imp.name}"
            if target in files and target != module:
                graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def depends_on(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every module ``module`` reaches through imports (itself excluded)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    seen.discard(module)
    return seen


def chain(graph: dict[str, set[str]], start: str, goal: str) -> list[str]:
    """A shortest import chain ``[start, ..., goal]`` (breadth first), or ``[]`` when there is none."""
    parent: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v]):
            if w in parent:
                continue
            parent[w] = v
            if w == goal:
                path = [w]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1]
            todo.append(w)
    return []


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def require(graph: dict[str, set[str]], *modules: str) -> None:
    """Fail, naming them, when ``modules`` are not modules of the package: a check about a module that
    was renamed or moved must not pass by finding nothing to check."""
    missing = [m for m in modules if m not in graph]
    assert not missing, (
        f"{', '.join(missing)}: no such module any more; if it was renamed or moved, "
        "update the layout test that names it (it would otherwise check nothing)"
    )


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    found = module_files()
    assert PACKAGE in found and len(found) > 1, f"no sparsediff modules found under {SRC / PACKAGE}"
    return found


@pytest.fixture(scope="module")
def graph(files: dict[str, Path]) -> dict[str, set[str]]:
    return import_graph(files)


def test_the_graph_sees_relative_and_function_level_imports(tmp_path):
    """The reader itself: relative imports, ``from . import module`` and imports inside functions."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import thing\n")
    (pkg / "a.py").write_text("thing = 1\ndef f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom ..a import _hidden\nimport sparsediff.a\n")
    found = module_files(tmp_path)
    g = import_graph(found)
    assert g[PACKAGE] == {f"{PACKAGE}.a"}
    assert g[f"{PACKAGE}.a"] == {f"{PACKAGE}.sub.b"}
    assert g[f"{PACKAGE}.sub.b"] == {f"{PACKAGE}.a"}
    assert cycles(g) == [[f"{PACKAGE}.a", f"{PACKAGE}.sub.b"]]
    names = {(i.module, i.name) for i in imports_of(f"{PACKAGE}.sub.b", found)}
    assert names == {(PACKAGE, "a"), (f"{PACKAGE}.a", "_hidden"), (f"{PACKAGE}.a", None)}
    require(g, f"{PACKAGE}.a", f"{PACKAGE}.sub")
    with pytest.raises(AssertionError, match=f"{PACKAGE}.gone: no such module"):
        require(g, f"{PACKAGE}.a", f"{PACKAGE}.gone")


def test_no_import_cycles(graph):
    loops = []
    for component in cycles(graph):
        first = component[0]
        back = min((chain(graph, w, first) for w in graph[first] if w in component), key=len)
        loops.append(" -> ".join([first, *back]) + f"  (cycle of {len(component)} modules: {component})")
    assert not loops, "import cycles:\n" + "\n".join(loops)


def test_no_private_names_imported_from_other_modules(files):
    offenders = [
        f"{files[imp.importer].relative_to(SRC)}:{imp.line} imports {imp.name} from {imp.module}"
        for module in files
        for imp in imports_of(module, files)
        if imp.name is not None
        and imp.name.startswith("_")
        and not (imp.name.startswith("__") and imp.name.endswith("__"))  # __version__
        and imp.module != module
    ]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_no_source_file_over_the_line_limit(files):
    native = sorted(p for p in (SRC / PACKAGE).rglob("*") if p.suffix in NATIVE_SUFFIXES)
    assert native, f"no native sources ({', '.join(NATIVE_SUFFIXES)}) found under {SRC / PACKAGE}"
    long = {
        str(path.relative_to(SRC)): n
        for path in [*files.values(), *native]
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("module", ["sparsediff.sample", "sparsediff.evaluate"])
def test_sampling_and_evaluation_do_not_depend_on_training(graph, module):
    require(graph, module, "sparsediff.train")
    assert "sparsediff.train" not in depends_on(graph, module), " -> ".join(
        chain(graph, module, "sparsediff.train")
    )


def test_the_engine_depends_on_no_diffusion_layer(graph):
    """``sparsediff.sparse`` stands on its own: it sparsifies any model in any loop."""
    layers = ("diffusion", "models", "data")
    require(graph, "sparsediff.sparse", *(f"sparsediff.{p}" for p in layers))
    engine = [m for m in graph if _in(m, "sparsediff.sparse")]
    bad = {m: sorted(w for w in graph[m] if any(_in(w, f"sparsediff.{p}") for p in layers)) for m in engine}
    bad = {m: w for m, w in bad.items() if w}
    assert not bad, f"sparse/ modules importing diffusion, models or data: {bad}"
