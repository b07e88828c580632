"""The launch budget of a Triton loss step: what decides its speed at small N on a GPU.

One forward + backward of each 'all'-mode loss on backend='triton' (the fused path,
``triton_kernels/fused.py``) may issue at most 16 device operations — Triton launches plus the
ATen ops that launch a kernel, counted by ``flashcon.tools.launch_count`` — and no host
synchronisation. Before the fused path the same step issued 185–206 (the static shift's plan,
the epilogues and their autograd as tiny PyTorch ops). The host code is the same under the
interpreter as on a GPU, so the count holds there too.
"""

from __future__ import annotations

import pytest
import torch

from flashcon.tools.launch_count import count_device_ops, loss_step

pytest.importorskip("triton")

BUDGET = 16


@pytest.mark.parametrize("labels", ["classes", "multi-hot"])
@pytest.mark.parametrize("loss", ["supcon", "ntxent", "sincere", "tcl"])
def test_loss_step_within_launch_budget_and_no_host_sync(loss, labels):
    if loss == "ntxent" and labels == "multi-hot":
        return  # NT-Xent takes no labels
    step = loss_step(loss, labels, b=48)
    step()  # first call: imports and kernel caches
    ops, syncs = count_device_ops(step)
    total = sum(ops.values())
    assert not syncs, f"host synchronisations: {dict(syncs)}"
    assert total <= BUDGET, f"{total} device operations: {dict(ops)}"
    # The count is of real work: the symmetric kernels and the fused epilogue ran.
    for kernel in ("_prep_kernel", "_sym_fwd_kernel", "_finish_kernel", "_sym_bwd_kernel"):
        assert ops[f"triton:{kernel}"] >= 1, dict(ops)


def test_counter_sees_aten_ops_and_syncs():
    """The counter itself: an elementwise op and a reduction count, a view and an allocation do
    not, ``.item()`` is a host synchronisation."""
    x = torch.randn(8, 4)

    def fn():
        y = x.view(4, 8)
        torch.empty(3)
        (y * 2).sum().item()

    ops, syncs = count_device_ops(fn)
    assert dict(ops) == {"mul": 1, "sum": 1} and sum(syncs.values()) == 1
