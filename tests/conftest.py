"""Shared fixtures. No CUDA call happens at import time beyond an availability query."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter. The switch is read when
# the kernels are decorated, so it must be set before flashcon.triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    # Under `make test` (FLASHCON_REQUIRE=cpu,triton) a backend that should be built but does
    # not load ends the session here, before any grid is collected without it.
    from flashcon.testing import REQUIRE_ENV, missing_required_backends

    missing = missing_required_backends()
    if missing:
        raise pytest.UsageError(
            f"{REQUIRE_ENV} names backends that cannot run here:\n  " + "\n  ".join(missing)
        )


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """``shared_once(name, make)``: a directory ``make(dir)`` fills once per test run, shared by
    the pytest-xdist workers (their base temporary directories share a parent). The first
    worker to ask builds it under a lock; the others wait for it and reuse it. A ``make`` that
    raises leaves nothing behind, and the next worker to ask tries again."""

    def get(name: str, make: Callable[[Path], None]) -> Path:
        if "PYTEST_XDIST_WORKER" not in os.environ:
            d = tmp_path_factory.mktemp(name)
            make(d)
            return d
        root = tmp_path_factory.getbasetemp().parent
        d = root / name
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (d / ".done").exists():
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
                make(d)
                (d / ".done").touch()
        return d

    return get
