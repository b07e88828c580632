"""The documented arguments of every public callable are exactly its parameters.

Docstrings list arguments in ``Args:`` sections (the losses also in the shared ``Common
arguments:`` section), one ``name: text`` entry per argument at one indentation, continuation
lines deeper. A class's own docstring documents ``__init__``. This fails when a documented
argument leaves a signature or an undocumented one appears. The dense ``flashcon.reference``
functions are documented as their public counterparts less the backend and distribution
arguments; that claim is checked against both signatures.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import pytest

import flashcon
from flashcon import (
    distributed,
    engine,
    functional,
    info,
    modules,
    pml,
    queue,
    reference,
    registration,
)

_HEADER = re.compile(r"^( *)(Args|Common arguments):$")
_ENTRY = re.compile(r"^ *(\w+): \S")
NOT_IN_REFERENCE = {"backend", "gather_distributed", "group"}


def documented(doc: str | None) -> list[str]:
    """The argument names of a docstring's argument sections, in order."""
    lines = inspect.cleandoc(doc or "").splitlines()
    names: list[str] = []
    i = 0
    while i < len(lines):
        m = _HEADER.match(lines[i].rstrip())
        i += 1
        if not m:
            continue
        indent, entry_indent = len(m.group(1)), None
        while i < len(lines):
            line = lines[i]
            if line.strip():
                depth = len(line) - len(line.lstrip())
                if depth <= indent:
                    break
                entry_indent = depth if entry_indent is None else entry_indent
                if depth == entry_indent:
                    e = _ENTRY.match(line)
                    assert e, f"malformed argument entry {line.strip()!r}"
                    names.append(e.group(1))
            i += 1
    return names


def parameters(fn: Callable) -> list[str]:
    params = list(inspect.signature(fn).parameters)
    return [p for p in params if p not in ("self", "cls")]


def _public_functions(module) -> list[tuple[str, Callable]]:
    return [
        (f"{module.__name__}.{name}", obj)
        for name, obj in vars(module).items()
        if inspect.isfunction(obj)
        and not name.startswith("_")
        and obj.__module__ == module.__name__
    ]


def _classes() -> list[type]:
    found = [
        obj
        for module in (modules, queue, pml)
        for obj in vars(module).values()
        if inspect.isclass(obj) and obj.__module__ == module.__name__
    ]
    return found


def _targets() -> list[tuple[str, str | None, Callable]]:
    """(name, docstring, callable) of everything whose arguments must be documented."""
    out = [
        (f"flashcon.functional.{n}", getattr(functional, n).__doc__, getattr(functional, n))
        for n in functional.__all__
    ]
    for module in (engine, registration, distributed, info):
        out += [(name, fn.__doc__, fn) for name, fn in _public_functions(module)]
    for cls in _classes():
        qual = f"{cls.__module__}.{cls.__name__}"
        out.append((f"{qual}.__init__", cls.__doc__, cls.__init__))
        for name, obj in vars(cls).items():
            if name.startswith("_") and name != "forward":
                continue
            if isinstance(obj, property) or not callable(obj) or name == "extra_repr":
                continue
            out.append((f"{qual}.{name}", obj.__doc__, obj))
    return out


TARGETS = _targets()


def test_targets_cover_the_public_api():
    names = {t[0] for t in TARGETS}
    assert len(TARGETS) >= 40
    for must in (
        "flashcon.functional.supcon_loss",
        "flashcon.modules.SupConLoss.forward",
        "flashcon.modules.ESupConLoss.__init__",
        "flashcon.queue.MemoryQueue.push",
        "flashcon.pml.SupConLoss.forward",
        "flashcon.distributed.gather_rows",
        "flashcon.engine.resolve_backend",
        "flashcon.info.collect",
    ):
        assert must in names


@pytest.mark.parametrize("name,doc,fn", TARGETS, ids=[t[0] for t in TARGETS])
def test_documented_arguments_are_the_parameters(name, doc, fn):
    assert doc and doc.strip(), f"{name} has no docstring"
    names = documented(doc)
    assert len(names) == len(set(names)), f"{name} documents an argument twice: {names}"
    assert set(names) == set(parameters(fn)), (
        f"{name}: documented {sorted(set(names) - set(parameters(fn)))} not in the signature, "
        f"undocumented {sorted(set(parameters(fn)) - set(names))}"
    )


@pytest.mark.parametrize("name", reference.__all__)
def test_reference_functions_are_documented_by_their_public_counterparts(name):
    dense, public = getattr(reference, name), getattr(functional, name)
    assert f":func:`flashcon.{name}`" in (dense.__doc__ or ""), name
    assert parameters(dense) == [p for p in parameters(public) if p not in NOT_IN_REFERENCE]
    assert set(parameters(dense)) == set(documented(public.__doc__)) - NOT_IN_REFERENCE
    dense_sig = inspect.signature(dense).parameters
    for p, spec in inspect.signature(public).parameters.items():
        if p in dense_sig:
            assert dense_sig[p].default == spec.default, (name, p)
            assert dense_sig[p].kind == spec.kind, (name, p)


def test_modules_have_docstrings():
    for module in (
        flashcon,
        functional,
        modules,
        queue,
        distributed,
        pml,
        reference,
        engine,
        info,
    ):
        assert module.__doc__ and len(module.__doc__.strip()) > 40, module.__name__


def test_parser_catches_drift():
    """The parser sees a dropped or an extra argument (guards the test above)."""

    def f(a, b, *, c=1):
        """Summary.

        Args:
            a: first.
            b: second,
                continued.
        Common arguments:
            d: not a parameter.
        """

    assert documented(f.__doc__) == ["a", "b", "d"]
    assert set(documented(f.__doc__)) != set(parameters(f))
    with pytest.raises(AssertionError, match="malformed"):
        documented("S.\n\nArgs:\n    a - first.\n")
