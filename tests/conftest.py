"""Shared fixtures. No CUDA call happens at import time beyond an availability query."""

from __future__ import annotations

import os

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
