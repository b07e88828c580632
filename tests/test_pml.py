"""flashcon.pml.SupConLoss equals pytorch-metric-learning's SupConLoss (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from flashcon import pml
from flashcon.testing import assert_close, available_backends

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
BACKENDS = ["torch", *available_backends("cpu")]


def _both(backend, t, emb, labels, ref=None, ref_labels=None):
    outs = []
    for crit in (pml.SupConLoss(t, backend=backend), pml_losses.SupConLoss(temperature=t)):
        e = emb.detach().clone().requires_grad_(True)
        r = None if ref is None else ref.detach().clone().requires_grad_(True)
        kw = {} if r is None else {"ref_emb": r, "ref_labels": ref_labels}
        loss = crit(e, labels, **kw)
        grads = torch.autograd.grad(loss, [e] + ([r] if r is not None else []), allow_unused=True)
        outs.append((loss.detach(), grads))
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [0.07, 0.1, 0.5])
@pytest.mark.parametrize("n, n_classes", [(32, 5), (17, 3), (9, 9), (40, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_pml(backend, t, n, n_classes, dtype):
    # The library's tests use random unnormalised embeddings and random integer labels.
    emb = torch.randn(n, 16, dtype=dtype)
    labels = torch.randint(0, n_classes, (n,))
    (ours, g_ours), (theirs, g_theirs) = _both(backend, t, emb, labels)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert_close(ours, theirs, atol=tol, rtol=tol, name="loss")
    assert_close(g_ours[0], g_theirs[0], atol=tol, rtol=tol * 10, name="dembeddings")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pml_with_ref_emb(backend):
    emb = torch.randn(12, 8, dtype=torch.float64)
    ref = torch.randn(20, 8, dtype=torch.float64)
    labels = torch.randint(0, 4, (12,))
    ref_labels = torch.randint(0, 4, (20,))
    (ours, g_ours), (theirs, g_theirs) = _both(backend, 0.1, emb, labels, ref, ref_labels)
    assert_close(ours, theirs, atol=1e-10, rtol=1e-10)
    for a, b in zip(g_ours, g_theirs):
        assert_close(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [0, 0, 0, 0], [0, 0, 1, 2]])
def test_degenerate_batches_match_pml(labels):
    emb = torch.randn(4, 8, dtype=torch.float64)
    (ours, _), (theirs, _) = _both("torch", 0.1, emb, torch.tensor(labels))
    assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_indices_tuple_is_refused():
    with pytest.raises(ValueError, match="indices_tuple"):
        pml.SupConLoss()(torch.randn(4, 8), torch.arange(4), indices_tuple=(None,) * 4)
