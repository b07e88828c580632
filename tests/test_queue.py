"""MemoryQueue: ring-buffer behaviour, and every loss with queue rows as extra columns (the
torch and C++ CPU backends in float64; the C++ CPU and Triton backends in float32, with
integer, soft and multi-hot labels)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import flashcon
from flashcon import MemoryQueue
from flashcon import reference as R
from flashcon.testing import (
    LOSSES,
    assert_close,
    available_backends,
    loss_fn,
    make_inputs,
    value_and_grads,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import DT, B, Bound, D, V, small_labels, small_queue, unit  # noqa: E402

BACKENDS = ["torch", *available_backends("cpu")]
KERNEL_BACKENDS = available_backends("cpu", "triton")  # Triton through its interpreter


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


# ---------------------------------------------------------------------------------------------
# Multi-hot labels and queues beyond SupCon on the torch backend: the C++ CPU and Triton
# (interpreter) backends, float32, against the float64 reference on the same inputs.

# Measured (fp32, these inputs, cpu and triton): value error ≤ 7.4e-7 on losses up to 11,
# gradient error ≤ 1.1e-6; tolerances 5e-6 (value) and 1e-5 (gradient), 7× and 9× those.
FP32_TOL, FP32_GRAD_TOL = 5e-6, 1e-5


QUEUE_CASES = {
    "supcon": ("int", lambda m, f, y, p, q: m.supcon_loss(f, y, queue=q)),
    "supcon_in_one": (
        "int",
        lambda m, f, y, p, q: m.supcon_loss(f, y, queue=q, variant="in", contrast_mode="one"),
    ),
    "supcon_multihot": ("multihot", lambda m, f, y, p, q: m.supcon_loss(f, y, queue=q)),
    "ntxent": ("int", lambda m, f, y, p, q: m.ntxent_loss(f, queue=q)),
    "sincere": ("int", lambda m, f, y, p, q: m.sincere_loss(f, y, queue=q)),
    "sincere_multihot": ("multihot", lambda m, f, y, p, q: m.sincere_loss(f, y, queue=q)),
    "genscl": ("soft", lambda m, f, y, p, q: m.genscl_loss(f, y, queue=q)),
    "tcl": ("int", lambda m, f, y, p, q: m.tcl_loss(f, y, queue=q, k1=3.0, k2=2.0)),
    "tcl_multihot": (
        "multihot",
        lambda m, f, y, p, q: m.tcl_loss(f, y, queue=q, k1=3.0, k2=2.0),
    ),
    "esupcon": ("int", lambda m, f, y, p, q: m.esupcon_loss(f, y, p, queue=q)),
    "esupcon_multihot": ("multihot", lambda m, f, y, p, q: m.esupcon_loss(f, y, p, queue=q)),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(QUEUE_CASES))
def test_queue_and_multihot_on_kernel_backends(case, backend):
    kind, fn = QUEUE_CASES[case]
    q = small_queue(kind, seed=3)
    f = unit(B, V, D, seed=4, dtype=torch.float32).requires_grad_(True)
    p = (1.5 * torch.randn(4, D, generator=torch.Generator().manual_seed(6))).requires_grad_(True)
    y = small_labels(kind, seed=7)
    value = fn(Bound(backend), f, y, p, q)
    f64 = f.detach().double().requires_grad_(True)
    p64 = p.detach().double().requires_grad_(True)
    y64 = y.double() if kind == "soft" else y
    q64 = MemoryQueue(
        12,
        D,
        dtype=DT,
        num_soft_classes=3 if kind == "soft" else None,
        multilabel=kind == "multihot",
    )
    q64.load_state_dict(q.state_dict())  # the same rows, in float64
    expected = fn(R, f64, y64, p64, q64)
    assert_close(value, expected, atol=FP32_TOL, rtol=0, name=f"{case} value")
    leaves = (f, p) if "esupcon" in case else (f,)
    leaves64 = (f64, p64) if "esupcon" in case else (f64,)
    for g, e in zip(torch.autograd.grad(value, leaves), torch.autograd.grad(expected, leaves64)):
        assert_close(g, e, atol=FP32_GRAD_TOL, rtol=0, name=f"{case} gradient")
    # The queue is used: without it the loss changes.
    assert abs(float(value) - float(fn(R, f64, y64, p64, None))) > 1e-3
