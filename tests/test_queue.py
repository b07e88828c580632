"""MemoryQueue: ring-buffer behaviour, and every loss with queue rows as extra columns."""

from __future__ import annotations

import pytest
import torch

import flashcon
from flashcon import MemoryQueue
from flashcon.testing import (
    LOSSES,
    assert_close,
    available_backends,
    loss_fn,
    make_inputs,
    value_and_grads,
)

BACKENDS = ["torch", *available_backends("cpu")]


def test_ring_buffer_keeps_the_newest_rows():
    q = MemoryQueue(5, 3, dtype=torch.float64)
    assert len(q) == 0
    f = torch.arange(2 * 2 * 3, dtype=torch.float64).view(2, 2, 3)  # B=2, V=2 → 4 rows
    q.push(f, torch.tensor([7, 8]))
    assert len(q) == 4
    assert q.labels.tolist() == [7, 8, 7, 8]  # view-major, like the losses
    q.push(torch.ones(3, 3, dtype=torch.float64) * 100, torch.tensor([1, 2, 3]))
    assert len(q) == 5
    assert sorted(q.labels.tolist()) == [1, 2, 3, 7, 8]  # the oldest two rows were dropped
    q.push(torch.zeros(9, 3, dtype=torch.float64), torch.arange(9))
    assert sorted(q.labels.tolist()) == [4, 5, 6, 7, 8]


def test_push_detaches_and_checks():
    q = MemoryQueue(4, 3)
    f = torch.randn(2, 3, requires_grad=True)
    q.push(f, torch.tensor([0, 1]))
    assert not q.features.requires_grad
    with pytest.raises(ValueError, match="D ="):
        q.push(torch.randn(2, 4), torch.tensor([0, 1]))
    soft = MemoryQueue(4, 3, num_soft_classes=5)
    with pytest.raises(ValueError, match="soft labels"):
        soft.push(torch.randn(2, 3))
    with pytest.raises(ValueError, match="integer labels|soft"):
        flashcon.supcon_loss(torch.randn(2, 2, 3), torch.tensor([0, 1]), queue=soft)


def _queue_for(loss, d, n_classes=3, dtype=torch.float64):
    soft = loss == "genscl"
    q = MemoryQueue(16, d, num_soft_classes=n_classes if soft else None, dtype=dtype)
    filler = make_inputs(loss if loss != "ntxent" else "supcon", 7, 2, d, seed=11)
    if soft:
        q.push(filler["features"], torch.rand(7, n_classes, dtype=torch.float64))
    else:
        q.push(filler["features"], filler.get("labels", torch.randint(0, 3, (7,))))
    q.push(
        make_inputs("supcon", 3, 0, d, seed=12)["features"],
        torch.tensor([0, 2, 2]) if not soft else torch.rand(3, n_classes, dtype=torch.float64),
    )
    return q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_losses_with_queue_match_reference(loss, backend):
    x = make_inputs(loss, 6, 2, 5)
    queue = _queue_for(loss, 5)
    assert len(queue) == 16
    ref_val, ref_g = value_and_grads(loss_fn(loss, None, queue=queue), x)
    val, g = value_and_grads(loss_fn(loss, backend, queue=queue), x)
    assert_close(val, ref_val, atol=1e-10, rtol=1e-10, name="loss")
    for key in ref_g:
        assert_close(g[key], ref_g[key], atol=1e-10, rtol=1e-9, name=f"d{key}")
    # The queue changes the loss (it is really used).
    plain = loss_fn(loss, backend)(**x)
    assert (plain - val).abs() > 1e-6


def test_simclr_queue_rows_are_negatives():
    # With a queue, NT-Xent's partition function grows by the queue rows: the loss increases.
    x = make_inputs("ntxent", 5, 2, 4)
    q = MemoryQueue(8, 4, dtype=torch.float64)
    q.push(torch.nn.functional.normalize(torch.randn(8, 4, dtype=torch.float64), dim=-1))
    a = flashcon.ntxent_loss(x["features"], backend="torch")
    b = flashcon.ntxent_loss(x["features"], backend="torch", queue=q)
    assert b > a
    assert_close(b, flashcon.reference.ntxent_loss(x["features"], queue=q), atol=1e-12, rtol=1e-12)
