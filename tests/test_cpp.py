"""The C++ extension's CPU kernels (backend='cpu') against the float64 reference and torch_stream.

Skipped as a whole when flashcon._C is not built (FLASHCON_SKIP_EXT=1 installs).
"""

from __future__ import annotations

import pytest
import torch

from flashcon.backends import torch_stream
from flashcon.engine import cpp_available
from flashcon.testing import LOSSES, assert_close, loss_fn, make_inputs, value_and_grads

_OK, _WHY = cpp_available("cpu")
pytestmark = pytest.mark.skipif(not _OK, reason=f"flashcon._C is not available: {_WHY}")

if _OK:
    OPS = torch.ops.flashcon

# (B, V, D): N = B·V anchors (V = 0: [N, D] features). N of 1, 3, 37, 130; D of 1, 7, 96, 130;
# V of 1, 2, 3. 65·2 = 130 rows cross the kernel's 128-row block.
SHAPES = [(1, 0, 7), (3, 1, 1), (37, 0, 96), (13, 3, 7), (65, 2, 130), (12, 3, 96)]
OPTIONS = {
    "supcon": [{}, {"temperature": 0.1, "base_temperature": 0.07}],
    "supcon_in": [{}],
    "supcon_one": [{}],
    "ntxent": [{}],
    "sincere": [{}, {"temperature": 0.5}],
    "genscl": [{}],
    "tcl": [{}, {"k1": 0.0, "k2": 2.0}, {"k1": 10.0, "k2": 0.0}],
    "esupcon": [{}, {"prototype_anchors": False, "base_temperature": 0.2}],
}
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-4)}


def _cases():
    for loss in LOSSES:
        for i, opt in enumerate(OPTIONS[loss]):
            for b, v, d in SHAPES:
                if loss == "ntxent" and v < 2:
                    continue
                yield pytest.param(loss, opt, (b, v, d), id=f"{loss}-opt{i}-B{b}V{v}D{d}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("loss, options, shape", list(_cases()))
def test_parity_with_reference(loss, options, shape, dtype):
    """Values and gradients of every loss and option through the public API."""
    b, v, d = shape
    # fp64 runs unnormalised features (|z| ~ sqrt(D) ~ 10, logits in the hundreds) for D > 8.
    norm = None if dtype == torch.float64 and d > 8 else 1.0
    x = make_inputs(loss, b, v, d, n_classes=3, norm=norm, dtype=dtype)
    x64 = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}
    ref_val, ref_g = value_and_grads(loss_fn(loss, None, **options), x64)
    val, g = value_and_grads(loss_fn(loss, "cpu", **options), x)
    atol, rtol = TOL[dtype]
    assert val.dtype == dtype
    assert_close(val, ref_val, atol=atol, rtol=rtol, name="loss")
    for key in ref_g:
        assert g[key].dtype == dtype
        assert_close(g[key], ref_g[key], atol=atol, rtol=rtol, name=f"d{key}")


@pytest.mark.parametrize("soft", ["BK", "BVK"])
@pytest.mark.parametrize("v", [1, 2, 3])
def test_genscl_soft_label_shapes(soft, v):
    x = make_inputs("genscl", 11, v, 9, n_classes=4)
    g = torch.Generator().manual_seed(1)
    shape = (11, v, 4) if soft == "BVK" else (11, 4)
    x["soft_labels"] = torch.rand(shape, generator=g, dtype=torch.float64)
    ref_val, ref_g = value_and_grads(loss_fn("genscl", None), x)
    val, grads = value_and_grads(loss_fn("genscl", "cpu"), x)
    assert_close(val, ref_val, atol=1e-10, rtol=1e-10, name="loss")
    assert_close(grads["features"], ref_g["features"], atol=1e-10, rtol=1e-9, name="dfeatures")


@pytest.mark.parametrize("labels", ["same", "singleton"])
@pytest.mark.parametrize("loss", LOSSES)
def test_label_extremes(loss, labels):
    x = make_inputs(loss, 9, 2, 5)
    if "labels" in x:
        x["labels"] = torch.zeros(9, dtype=torch.long) if labels == "same" else torch.arange(9)
        if loss == "esupcon":
            x["prototypes"] = torch.randn(9, 5, dtype=torch.float64)
    ref_val, ref_g = value_and_grads(loss_fn(loss, None), x)
    val, g = value_and_grads(loss_fn(loss, "cpu"), x)
    assert_close(val, ref_val, atol=1e-10, rtol=1e-10, name="loss")
    for key in ref_g:
        assert_close(g[key], ref_g[key], atol=1e-10, rtol=1e-9, name=f"d{key}")


def test_supcon_labels_none_is_simclr():
    x = make_inputs("supcon", 10, 2, 6)
    f = x["features"]
    ref_val, ref_g = value_and_grads(loss_fn("supcon", None), {"features": f})
    val, g = value_and_grads(loss_fn("supcon", "cpu"), {"features": f})
    assert_close(val, ref_val, atol=1e-10, rtol=1e-10, name="loss")
    assert_close(g["features"], ref_g["features"], atol=1e-10, rtol=1e-9, name="dfeatures")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", LOSSES)
def test_low_precision_within_twice_torch_error(loss, dtype):
    """|cpu − ref64| <= 2·|dense reference in dtype − ref64| + atol (STYLE.md), large norms."""
    x = make_inputs(loss, 40, 2, 32, dtype=dtype, norm=3.0)
    x64 = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}
    opts = {"temperature": 0.1}
    gt_val, gt_g = value_and_grads(loss_fn(loss, None, **opts), x64)
    dense_val, dense_g = value_and_grads(loss_fn(loss, None, **opts), x)
    val, g = value_and_grads(loss_fn(loss, "cpu", **opts), x)
    assert val.dtype == (torch.float32 if dtype != torch.float64 else dtype)
    atol = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}[dtype]
    err = (val.double() - gt_val).abs()
    bound = 2 * (dense_val.double() - gt_val).abs() + atol * (1 + gt_val.abs())
    assert err <= bound, f"loss: |err| {err:.3g} > {bound:.3g} (dense {dense_val}, gt {gt_val})"
    for key in gt_g:
        assert g[key].dtype == dtype
        e = (g[key].double() - gt_g[key]).abs()
        e_dense = (dense_g[key].double() - gt_g[key]).abs().max()
        worst = tuple(int(i) for i in torch.unravel_index(e.argmax(), e.shape))
        assert e.max() <= 2 * e_dense + atol, (
            f"d{key}: max |err| {e.max():.3g} at {worst} (got {g[key][worst]}, "
            f"expected {gt_g[key][worst]}) > 2·{e_dense:.3g} + {atol}"
        )


# ---- op level --------------------------------------------------------------------------------

OP_SHAPES = [(1, 1, 1), (5, 3, 4), (37, 130, 7), (130, 600, 33), (600, 130, 96)]
WEIGHTS = [(1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 2.0, 50.0)]


def _op_inputs(n, m, d, dtype, seed=0, n_classes=4):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    k = (2 * torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype)
    qlab = torch.randint(0, n_classes, (n,), generator=g)
    klab = torch.randint(0, n_classes, (m,), generator=g)
    return q, k, qlab, klab


def _stat(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch_stream.stat_dtype(dtype))


@pytest.mark.parametrize("self_offset", [-1, 0, 2], ids=["noself", "off0", "off2"])
@pytest.mark.parametrize("weights", WEIGHTS, ids=["all", "pos", "neg", "tcl"])
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "N{}M{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_lse_ops_match_torch_stream(dtype, shape, weights, self_offset):
    q, k, qlab, klab = _op_inputs(*shape, dtype)
    args = (self_offset, 0.7, *weights)
    atol, rtol = (1e-11, 1e-10) if dtype == torch.float64 else (1e-4, 1e-4)
    got = OPS.lse_fwd(q, k, qlab, klab, *args)
    want = torch_stream.lse_fwd(q, k, qlab, klab, *args)
    for name, a, e in zip(("lse", "psum", "pcnt"), got, want):
        assert a.dtype == e.dtype
        assert_close(a, e, atol=atol, rtol=rtol, name=name)
    g_lse, g_psum = _stat(shape[0], dtype, 1), _stat(shape[0], dtype, 2)
    got = OPS.lse_bwd(g_lse, g_psum, q, k, qlab, klab, want[0], *args)
    exp = torch_stream.lse_bwd(g_lse, g_psum, q, k, qlab, klab, want[0], *args)
    for name, a, e in zip(("dq", "dk"), got, exp):
        assert a.dtype == e.dtype == dtype
        assert_close(a, e, atol=10 * atol, rtol=10 * rtol, name=name)


@pytest.mark.parametrize("self_offset", [-1, 0, 2], ids=["noself", "off0", "off2"])
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "N{}M{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sp_ops_match_torch_stream(dtype, shape, self_offset):
    q, k, qlab, klab = _op_inputs(*shape, dtype)
    eta = torch_stream.lse_fwd(q, k, qlab, klab, self_offset, 0.7, 0.0, 1.0, 0.0)[0]
    atol, rtol = (1e-8, 1e-10) if dtype == torch.float64 else (2e-3, 1e-4)
    got = OPS.sp_fwd(q, k, qlab, klab, eta, self_offset, 0.7)
    want = torch_stream.sp_fwd(q, k, qlab, klab, eta, self_offset, 0.7)
    # torch's softplus returns x itself above x = 20 (an error up to log1p(e^-20) = 2e-9 per
    # term); the kernel's softplus is exact, so sp is compared within that slack.
    for name, a, e in zip(("sp", "r"), got, want):
        assert_close(a, e, atol=atol, rtol=rtol, name=name)
    g_sp = _stat(shape[0], dtype, 3)
    got = OPS.sp_bwd(g_sp, q, k, qlab, klab, eta, self_offset, 0.7)
    exp = torch_stream.sp_bwd(g_sp, q, k, qlab, klab, eta, self_offset, 0.7)
    tol = (1e-10, 1e-9) if dtype == torch.float64 else (1e-4, 1e-4)
    for name, a, e in zip(("dq", "dk"), got, exp):
        assert_close(a, e, atol=tol[0], rtol=tol[1], name=name)


def test_empty_rows_have_no_terms():
    """A row with no weighted term gives lse = -inf and zero gradient (no NaN)."""
    q, k, qlab, klab = _op_inputs(6, 9, 5, torch.float64)
    klab = torch.full_like(klab, 7)  # no positives anywhere
    lse, psum, pcnt = OPS.lse_fwd(q, k, qlab, klab, -1, 1.0, 1.0, 0.0, 0.0)
    assert torch.isneginf(lse).all() and (psum == 0).all() and (pcnt == 0).all()
    g = torch.ones(6, dtype=torch.float64)
    dq, dk = OPS.lse_bwd(g, g, q, k, qlab, klab, lse, -1, 1.0, 1.0, 0.0, 0.0)
    assert (dq == 0).all() and (dk == 0).all()


# ---- autograd, opcheck, determinism, errors ---------------------------------------------------


@pytest.mark.parametrize("self_offset", [-1, 0, 1])
@pytest.mark.parametrize("op", ["lse", "sp"])
def test_gradcheck_float64(op, self_offset):
    q, k, qlab, klab = _op_inputs(7, 9, 3, torch.float64, n_classes=2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    if op == "lse":

        def f(q, k):
            lse, psum, _ = OPS.lse_fwd(q, k, qlab, klab, self_offset, 0.8, 1.0, 0.5, 2.0)
            return lse, psum

    else:
        eta = torch_stream.lse_fwd(
            q.detach(), k.detach(), qlab, klab, self_offset, 0.8, 0.0, 1.0, 0.0
        )[0]
        eta = torch.where(torch.isfinite(eta), eta, torch.zeros_like(eta))

        def f(q, k):
            return OPS.sp_fwd(q, k, qlab, klab, eta, self_offset, 0.8)[0]

    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-6)


def _opcheck_samples():
    q, k, qlab, klab = _op_inputs(5, 7, 3, torch.float32)
    st = torch.randn(5)
    lse = torch_stream.lse_fwd(q, k, qlab, klab, 0, 1.5, 1.0, 1.0, 0.0)[0]
    qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    return [
        ("lse_fwd", (qg, kg, qlab, klab, 0, 1.5, 1.0, 1.0, 0.0)),
        ("lse_fwd", (q, k, qlab, klab, -1, 1.5, 1.0, 0.5, 3.0)),
        ("lse_bwd", (st, st, q, k, qlab, klab, lse, 0, 1.5, 1.0, 1.0, 0.0)),
        ("sp_fwd", (qg, kg, qlab, klab, lse, 0, 1.5)),
        ("sp_bwd", (st, q, k, qlab, klab, lse, 1, 1.5)),
    ]


@pytest.mark.parametrize(
    "i", range(5), ids=lambda i: ["lse_fwd", "lse_fwd-k1", "lse_bwd", "sp_fwd", "sp_bwd"][i]
)
def test_opcheck(i):
    name, args = _opcheck_samples()[i]
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_has_cuda_is_bool():
    assert isinstance(OPS.has_cuda(), bool)


@pytest.mark.parametrize("op", ["lse", "sp"])
def test_bitwise_reproducible(op):
    """Fixed chunking and a fixed-order dK reduction: identical bits run to run."""
    q, k, qlab, klab = _op_inputs(700, 700, 40, torch.float32)
    st = torch.randn(700)
    if op == "lse":
        runs = [OPS.lse_fwd(q, k, qlab, klab, 0, 2.0, 1.0, 1.0, 0.0) for _ in range(2)]
        runs += [
            OPS.lse_bwd(st, st, q, k, qlab, klab, runs[0][0], 0, 2.0, 1.0, 1.0, 0.0)
            for _ in range(3)
        ]
    else:
        runs = [OPS.sp_fwd(q, k, qlab, klab, st, 0, 2.0) for _ in range(2)]
        runs += [OPS.sp_bwd(st, q, k, qlab, klab, st, 0, 2.0) for _ in range(3)]
    for a, b in [(runs[0], runs[1]), (runs[2], runs[3]), (runs[2], runs[4])]:
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_bad_inputs_raise_actionable_errors():
    q, k, qlab, klab = _op_inputs(4, 6, 3, torch.float32)
    with pytest.raises(RuntimeError, match="same feature size D"):
        OPS.lse_fwd(q, k[:, :2].contiguous(), qlab, klab, 0, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="same dtype"):
        OPS.lse_fwd(q, k.double(), qlab, klab, 0, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.lse_fwd(q.T.contiguous().T, k, qlab, klab, 0, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="qlab must have shape"):
        OPS.lse_fwd(q, k, qlab[:3], klab, 0, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="int64"):
        OPS.lse_fwd(q, k, qlab.float(), klab, 0, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="non-negative"):
        OPS.lse_fwd(q, k, qlab, klab, 0, 1.0, -1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        OPS.lse_fwd(q.int(), k.int(), qlab, klab, 0, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="statistics dtype"):
        OPS.sp_fwd(q, k, qlab, klab, torch.zeros(4, dtype=torch.float64), 0, 1.0)
