"""The dense reference: hand-computed values, identities, gradcheck, agreement with PML."""

from __future__ import annotations

import math

import pytest
import torch

import flashcon
from flashcon import reference as R
from flashcon.testing import LOSSES, assert_close, loss_fn, make_inputs

E = math.e


@pytest.fixture
def tiny():
    # Rows 0 and 2 are the same class and identical; row 1 is orthogonal and alone.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    return f, torch.tensor([0, 1, 0])


def test_supcon_hand_value(tiny):
    f, y = tiny
    got = R.supcon_loss(f, y, temperature=1.0, base_temperature=1.0)
    # Rows 0, 2: log(e^0 + e^1) − 1; row 1 has no positive: 0, but counts in the mean.
    assert got.item() == pytest.approx(2 * (math.log(1 + E) - 1) / 3, rel=1e-12)


def test_supcon_base_temperature_scales(tiny):
    f, y = tiny
    a = R.supcon_loss(f, y, temperature=0.5, base_temperature=0.5)
    b = R.supcon_loss(f, y, temperature=0.5, base_temperature=0.07)
    assert b.item() == pytest.approx(a.item() * 0.5 / 0.07, rel=1e-12)


def test_sincere_hand_value(tiny):
    f, y = tiny
    got = R.sincere_loss(f, y, temperature=1.0)
    # Row 0: η = log e^{0} = 0 (one negative), softplus(0 − 1); row 1: no positive → 0.
    assert got.item() == pytest.approx(2 * math.log1p(math.exp(-1)) / 3, rel=1e-12)


def test_tcl_hand_value(tiny):
    f, y = tiny
    got = R.tcl_loss(f, y, temperature=1.0, k1=1.0, k2=1.0)
    # D_0 = e^{1} (positive) + k1·e^{−1} (hard-positive term) + k2·e^{0} (negative).
    assert got.item() == pytest.approx(2 * (math.log(E + 1 / E + 1) - 1) / 3, rel=1e-12)


def test_esupcon_hand_value():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # normalised inside
    got = R.esupcon_loss(f, y, protos, temperature=1.0)
    sample = math.log(2 + E) - 1  # columns: other sample (0), own prototype (1), other (0)
    proto = math.log(1 + E) - 1  # columns: own-class sample (1), other sample (0)
    assert got.item() == pytest.approx((2 * sample + 2 * proto) / 4, rel=1e-12)
    without = R.esupcon_loss(f, y, protos, temperature=1.0, prototype_anchors=False)
    assert without.item() == pytest.approx(sample, rel=1e-12)


def test_esupcon_logits_and_classifier():
    f = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    logits = flashcon.esupcon_logits(f, protos, temperature=0.5)
    assert_close(logits, f @ torch.eye(2, dtype=torch.float64) / 0.5, atol=1e-12, rtol=0)
    crit = flashcon.ESupConLoss(2, 2, dtype=torch.float64)
    with torch.no_grad():
        crit.prototypes.copy_(protos)
    assert crit.predict(f).tolist() == [0, 1]


def test_genscl_one_hot_equals_supcon():
    x = make_inputs("supcon", 9, 2, 5)
    onehot = torch.nn.functional.one_hot(x["labels"], 3).double()
    a = R.genscl_loss(x["features"], onehot, temperature=0.1, base_temperature=0.07)
    b = R.supcon_loss(x["features"], x["labels"], temperature=0.1, base_temperature=0.07)
    assert_close(a, b, atol=1e-7, rtol=1e-7)  # GenSCL's +1e-8 in the denominator


def test_tcl_k1_0_k2_1_equals_supcon():
    x = make_inputs("supcon", 9, 2, 5)
    a = R.tcl_loss(x["features"], x["labels"], temperature=0.2, k1=0.0, k2=1.0)
    b = R.supcon_loss(x["features"], x["labels"], temperature=0.2, base_temperature=0.2)
    assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_ntxent_equals_supcon_without_labels():
    x = make_inputs("ntxent", 7, 3, 5)
    a = R.ntxent_loss(x["features"], temperature=0.3)
    b = R.supcon_loss(x["features"], None, temperature=0.3, base_temperature=0.3)
    assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_supcon_in_below_out(seed):
    x = make_inputs("supcon", 11, 2, 6, seed=seed)
    lin = R.supcon_loss(x["features"], x["labels"], variant="in")
    lout = R.supcon_loss(x["features"], x["labels"], variant="out")
    assert lin.item() <= lout.item() + 1e-12


def test_mask_equals_labels():
    x = make_inputs("supcon", 8, 2, 5)
    y = x["labels"]
    mask = (y[:, None] == y[None, :]).double()
    for variant in ("out", "in"):
        a = R.supcon_loss(x["features"], mask=mask, variant=variant)
        b = R.supcon_loss(x["features"], y, variant=variant)
        assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(loss):
    x = make_inputs(loss, 5, 2, 4, norm=None)
    fn = loss_fn(loss, None, temperature=0.5)
    wrt = ["features"] + (["prototypes"] if loss == "esupcon" else [])
    leaves = {k: v.clone().requires_grad_(k in wrt) for k, v in x.items()}

    def f(*args):
        kw = dict(leaves)
        kw.update(zip(wrt, args))
        return fn(**kw)

    assert torch.autograd.gradcheck(f, tuple(leaves[k] for k in wrt))


# Degenerate batches whose value is known exactly (one class throughout, default τ = τ_b): one
# sample with one view has no column at all (0); two views of one sample leave the other view
# as the only column and the only positive (ℓ − log e^ℓ = 0), except TCL (its k1 term) and
# ESupCon (the prototypes are columns); four samples of one class make every column a positive,
# so L_in = −log((1/3)·Σ_p e^ℓ / Σ_a e^ℓ) = log 3 whatever the features, and SINCERE has no
# negative (0).
_DEGENERATE = {
    (1, 0): {loss: 0.0 for loss in LOSSES},
    (1, 2): {"supcon": 0.0, "supcon_in": 0.0, "supcon_one": 0.0, "ntxent": 0.0, "sincere": 0.0,
             "genscl": 0.0},
    (4, 0): {"supcon_in": math.log(3), "sincere": 0.0},
}  # fmt: skip


@pytest.mark.parametrize("loss", LOSSES)
def test_degenerate_batches(loss):
    """Exact values (and a zero gradient, the value being constant) where they are known;
    finite values and gradients in the other degenerate batches."""
    for (b, v), exact in _DEGENERATE.items():
        if loss == "ntxent" and v == 0:
            continue
        x = make_inputs(loss, b, v, 3, n_classes=1)
        out, grads = _vg(loss, x)
        assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads), (b, v)
        if loss in exact:
            assert out.item() == pytest.approx(exact[loss], abs=1e-12), (b, v, out.item())
            for g in grads:
                assert g.abs().max().item() <= 1e-12, (b, v, g)


def _vg(loss, x):
    leaves = {k: (v.clone().requires_grad_(True) if k == "features" else v) for k, v in x.items()}
    out = loss_fn(loss, None)(**leaves)
    return out, torch.autograd.grad(out, [leaves["features"]], allow_unused=True)


def test_agrees_with_pytorch_metric_learning():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(24, 8, dtype=torch.float64), dim=1)
    labels = torch.arange(24) % 5  # every anchor has a positive
    for t in (0.1, 0.5):
        ours = R.supcon_loss(emb, labels, temperature=t, base_temperature=t)
        theirs = pml_losses.SupConLoss(temperature=t)(emb, labels)
        assert_close(ours, theirs.double(), atol=1e-6, rtol=1e-6)
