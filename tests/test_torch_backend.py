"""backend='torch' (chunked PyTorch streaming) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from flashcon.backends import torch_stream
from flashcon.engine import _TORCH_OPS
from flashcon.testing import (
    LOSSES,
    OPTIONS,
    assert_rounding_bound,
    check_against_reference,
    label_extremes,
    loss_fn,
    make_inputs,
    value_and_grads,
)

SHAPES = [(1, 0, 3), (3, 1, 7), (5, 2, 1), (7, 3, 16), (37, 2, 33), (65, 2, 130)]


def _cases():
    for loss in LOSSES:
        for i, opt in enumerate(OPTIONS[loss]):
            for b, v, d in SHAPES:
                if loss == "ntxent" and v == 0:
                    continue
                yield pytest.param(loss, opt, (b, v, d), id=f"{loss}-opt{i}-B{b}V{v}D{d}")


@pytest.mark.parametrize("loss, options, shape", list(_cases()))
@pytest.mark.parametrize("chunk", [1 << 21, 64], ids=["onechunk", "chunk64"])
def test_parity_float64(loss, options, shape, chunk, monkeypatch):
    monkeypatch.setenv("FLASHCON_TORCH_CHUNK_ELEMS", str(chunk))
    b, v, d = shape
    x = make_inputs(loss, b, v, d, n_classes=3, norm=None if d > 8 else 1.0)
    check_against_reference(loss, "torch", x, **options)


@pytest.mark.parametrize("labels", ["same", "singleton"])
@pytest.mark.parametrize("loss", LOSSES)
def test_label_extremes(loss, labels):
    check_against_reference(loss, "torch", label_extremes(loss, labels))


# Error in units of the output's rounding at its scale (assert_rounding_bound): (loss in fp32
# units, gradient in units of the input dtype). Measured over this grid, worst loss: fp32 1.2,
# bf16 3.0, fp16 1.6 (ESupCon, whose prototypes are normalised in the input dtype: bf16 602,
# fp16 12.4); worst gradient: fp32 10.9, bf16 2.4, fp16 2.1.
LP_ULPS = {torch.float32: (8, 64), torch.bfloat16: (16, 8), torch.float16: (16, 8)}
ESUPCON_LOSS_ULPS = {torch.float32: 8, torch.bfloat16: 4096, torch.float16: 64}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", LOSSES)
def test_low_precision_within_twice_torch_error(loss, dtype):
    """|flashcon − ref64| <= 2·|dense reference in dtype − ref64| + atol (docs/verification.md)."""
    x = make_inputs(loss, 40, 2, 32, dtype=dtype)
    x64 = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}
    opts = {"temperature": 0.1}
    gt_val, gt_g = value_and_grads(loss_fn(loss, None, **opts), x64)
    dense_val, dense_g = value_and_grads(loss_fn(loss, None, **opts), x)
    val, g = value_and_grads(loss_fn(loss, "torch", **opts), x)
    assert val.dtype == (torch.float32 if dtype != torch.float64 else dtype)
    # fp32 arithmetic on the rounded inputs: the loss (fp32) within a few fp32 units of the
    # float64 value, each gradient within its rounding to ``dtype`` plus fp32 noise (LP_ULPS:
    # measured counts). The rule of docs/verification.md below is kept beside it.
    loss_ulps, grad_ulps = LP_ULPS[dtype]
    loss_ulps = ESUPCON_LOSS_ULPS[dtype] if loss == "esupcon" else loss_ulps
    assert_rounding_bound(val, gt_val, dtype=torch.float32, ulps=loss_ulps, name="loss")
    for key in gt_g:
        assert_rounding_bound(g[key], gt_g[key], dtype=dtype, ulps=grad_ulps, name=key)
    atol = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}[dtype]
    err = (val.double() - gt_val).abs()
    assert err <= 2 * (dense_val.double() - gt_val).abs() + atol, (err, dense_val, gt_val)
    for key in gt_g:
        assert g[key].dtype == dtype
        e = (g[key].double() - gt_g[key]).abs().max()
        e_dense = (dense_g[key].double() - gt_g[key]).abs().max()
        assert e <= 2 * e_dense + atol, (key, e, e_dense)


POSITIVES = ["labels", "multilabel", "pos_weight"]


def _op_inputs(mode, n=7, m=11):
    q = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(m, 5, dtype=torch.float64, requires_grad=True)
    if mode == "multilabel":
        qlab, klab = torch.randint(0, 8, (n,)), torch.randint(0, 8, (m,))
    else:
        qlab, klab = torch.randint(0, 3, (n,)), torch.randint(0, 3, (m,))
    pos_weight = None
    if mode == "pos_weight":
        pos_weight = torch.rand(3, 4, dtype=torch.float64) * (torch.rand(3, 4) > 0.4)
    return q, k, qlab, klab, mode == "multilabel", pos_weight


@pytest.mark.parametrize("mode", POSITIVES)
@pytest.mark.parametrize("self_offset", [-1, 0, 3])
def test_ops_opcheck(self_offset, mode):
    lse_fwd, lse_bwd, sp_fwd, sp_bwd = _TORCH_OPS
    q, k, qlab, klab, ml, pw = _op_inputs(mode)
    extra = (ml, pw)
    torch.library.opcheck(lse_fwd, (q, k, qlab, klab, self_offset, 2.0, 1.0, 0.5, 3.0, *extra))
    eta = torch.randn(7, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(sp_fwd, (q, k, qlab, klab, eta, self_offset, 2.0, *extra))
    lse = torch_stream.lse_fwd(q, k, qlab, klab, self_offset, 2.0, 1.0, 0.5, 3.0, *extra)[0]
    g = torch.randn(7, dtype=torch.float64)
    qd, kd = q.detach(), k.detach()
    args = (g, g, qd, kd, qlab, klab, lse.detach(), self_offset, 2.0, 1.0, 0.5, 3.0, *extra)
    torch.library.opcheck(lse_bwd, args)
    torch.library.opcheck(sp_bwd, (g, qd, kd, qlab, klab, eta.detach(), self_offset, 2.0, *extra))


@pytest.mark.parametrize("mode", POSITIVES)
def test_ops_gradcheck_rectangular(mode):
    lse_fwd, _, sp_fwd, _ = _TORCH_OPS
    q, k, qlab, klab, ml, pw = _op_inputs(mode, 6, 9)
    eta = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(q, k, eta):
        lse, psum, _ = lse_fwd(q, k, qlab, klab, 2, 1.5, 1.0, 2.0, 4.0, ml, pw)
        sp, _ = sp_fwd(q, k, qlab, klab, eta, 2, 1.5, ml, pw)
        return lse.sum() + (psum * 0.3).sum() + sp.sum()

    assert torch.autograd.gradcheck(f, (q, k, eta))
