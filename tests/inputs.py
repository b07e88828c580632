"""Small seeded inputs that several test files share (imported as ``oracle`` is: the test
file puts tests/ on ``sys.path``; a test file run as a script has it there already)."""

from __future__ import annotations

import torch

import flashcon
from flashcon import MemoryQueue

DT = torch.float64
B, V, D = 6, 2, 5  # the small batch: B samples of V views in D dimensions


def unit(*shape: int, seed: int, dtype: torch.dtype = DT) -> torch.Tensor:
    """Rows of unit norm (normalised in float64, then rounded to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=DT), dim=-1)
    return f.to(dtype)


def multihot(b: int, n_labels: int, seed: int, density: float = 0.4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n_labels, generator=g) < density


def small_queue(kind: str, seed: int) -> MemoryQueue:
    """A float32 queue of 10 rows (5 samples × 2 views, capacity 12) with labels of ``kind``:
    "int", "soft" (3 classes) or "multihot" (4 labels)."""
    if kind == "soft":
        q = MemoryQueue(12, D, num_soft_classes=3)
        q.push(unit(5, 2, D, seed=seed, dtype=torch.float32), torch.rand(5, 3))
    elif kind == "multihot":
        q = MemoryQueue(12, D, multilabel=True)
        q.push(unit(5, 2, D, seed=seed, dtype=torch.float32), multihot(5, 4, seed))
    else:
        q = MemoryQueue(12, D)
        q.push(unit(5, 2, D, seed=seed, dtype=torch.float32), torch.randint(0, 3, (5,)))
    return q


def small_labels(kind: str, seed: int) -> torch.Tensor:
    """Labels of the small batch that match small_queue(kind)."""
    if kind == "soft":
        return torch.rand(B, 3, generator=torch.Generator().manual_seed(seed))
    if kind == "multihot":
        return multihot(B, 4, seed)
    return torch.tensor([0, 1, 0, 2, 1, 0])


class Bound:
    """``flashcon`` with ``backend=`` bound: a case written as ``fn(module, ...)`` runs on
    ``flashcon.reference`` or, through this, on one backend."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __getattr__(self, name: str):
        fn = getattr(flashcon, name)
        return lambda *a, **kw: fn(*a, backend=self.backend, **kw)
