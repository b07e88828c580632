"""The package's layers import only downward: kernels and launchers know nothing of the
engine or the losses, and no module imports (at any depth, inside functions included) a module
that imports it back."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "flashcon"
KERNELS = ROOT / "triton_kernels"
# What the Triton kernels and launchers may use of the package (everything else is above them).
KERNELS_MAY_IMPORT = ("flashcon.registration", "flashcon.backends", "flashcon.triton_kernels")


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    for path in KERNELS.glob("*.py"):
        name = "flashcon.triton_kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        mods[name] = path
    return mods


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every flashcon module ``name`` imports, wherever the import statement stands."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "flashcon":
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_kernels_import_nothing_above_them():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("flashcon.triton_kernels"):
            upward = sorted(d for d in deps if not d.startswith(KERNELS_MAY_IMPORT))
            assert not upward, f"{name} imports {upward}"


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d] if d in path else path + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
