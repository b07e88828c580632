"""The README's Python examples each run as pasted, alone, and show a result; the documents
it links to exist."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3, "README has lost its Python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_alone(index):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # A fresh namespace per block: a block that needs another one's names fails here.
        exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    assert out.getvalue().strip(), f"python block {index} prints nothing to check"


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "<repository-url>" not in text and ".venv/bin/python" not in text


def _links(path: pathlib.Path) -> list[str]:
    return re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", path.read_text())


@pytest.mark.parametrize(
    "doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_linked_files_exist(doc):
    missing = [link for link in _links(doc) if not (doc.parent / link).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"
