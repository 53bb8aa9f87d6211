"""The package's layers: no import circle in sste_jax (an import inside a function counts: it closes a
circle as surely at run time), the kernels are a ground floor that imports nothing of the core but its pure
primitives, and the checkpoints know no framework."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sste_jax"
PRIMITIVES = {"sste_jax._sparsity", "sste_jax._fp8", "sste_jax._config"}  # what the kernels may import of the core


def _modules(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """``{dotted name: file}`` of every module of ``package`` (a package is named by its ``__init__``)."""
    out = {}
    for file in package.rglob("*.py"):
        parts = file.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def _imports(file: pathlib.Path, known: set[str]) -> set[str]:
    """Every module ``file`` imports, at any depth of its code (functions included); ``from a import b`` is
    ``a.b`` when that is a module of ``known``, else ``a``."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in known else node.module)
    return found


def _graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """The import graph among ``modules``, without the implicit edges of a module to the packages above it."""
    known = set(modules)
    return {name: (_imports(file, known) & known) - {name} for name, file in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected group of ``graph`` of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_sste_jax_has_no_import_circle():
    circles = _circles(_graph(_modules()))
    assert not circles, f"import circles in sste_jax: {circles}"


def test_the_circle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    package = tmp_path / "sste_jax"
    (package / "kernels").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "kernels" / "__init__.py").write_text("")
    (package / "_linear.py").write_text("def f():\n    from sste_jax.kernels import _backend\n")
    (package / "kernels" / "_backend.py").write_text("from sste_jax.kernels import _dispatch\n")
    (package / "kernels" / "_dispatch.py").write_text("from sste_jax._linear import FORWARD_WEIGHT\n")
    assert _circles(_graph(_modules(package))) == [
        ["sste_jax._linear", "sste_jax.kernels._backend", "sste_jax.kernels._dispatch"]
    ]


def test_the_kernels_import_nothing_of_the_core_but_its_pure_primitives():
    modules = _modules()
    for name, file in modules.items():
        if not name.startswith("sste_jax.kernels"):
            continue
        core = {m for m in _imports(file, set(modules)) if m.startswith("sste_jax") and m != "sste_jax"}
        outside = {m for m in core if not m.startswith("sste_jax.kernels")} - PRIMITIVES
        assert not outside, f"{name} imports {sorted(outside)}: the kernels may import only {sorted(PRIMITIVES)}"


@pytest.mark.parametrize("module", sorted(PRIMITIVES))
def test_the_pure_primitives_import_nothing_else_of_the_package(module):
    modules = _modules()
    imported = {m for m in _imports(modules[module], set(modules)) if m.startswith("sste_jax")}
    assert imported <= PRIMITIVES, f"{module} imports {sorted(imported - PRIMITIVES)}"


def test_checkpoint_imports_no_framework():
    modules = _modules()
    imported = _imports(modules["sste_jax.checkpoint"], set(modules))
    assert not {m for m in imported if m.split(".")[0] == "flax"}, sorted(imported)
    code = "import sys, sste_jax.checkpoint; print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", f"import sste_jax.checkpoint loads {run.stdout.strip()}"
