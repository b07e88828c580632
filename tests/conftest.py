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
