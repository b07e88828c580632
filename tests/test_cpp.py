"""The C++ extension's CPU kernels (backend='cpu') against the float64 reference and torch_stream.

Skipped as a whole when flashcon._C is not built (FLASHCON_SKIP_EXT=1 installs), except
under FLASHCON_REQUIRE=cpu (make test), where a missing extension fails.
"""

from __future__ import annotations

import pytest
import torch

from flashcon.backends import torch_stream
from flashcon.testing import (
    LOSSES,
    OPTIONS,
    assert_close,
    assert_close_rel,
    assert_rounding_bound,
    available_backends,
    backend_status,
    check_against_reference,
    label_extremes,
    loss_fn,
    make_inputs,
    value_and_grads,
)

# Raises when FLASHCON_REQUIRE names cpu (make test) and the extension does not load.
_OK = bool(available_backends("cpu"))
pytestmark = pytest.mark.skipif(
    not _OK, reason=f"flashcon._C is not available: {backend_status('cpu')[1]}"
)

if _OK:
    OPS = torch.ops.flashcon

# (B, V, D): N = B·V anchors (V = 0: [N, D] features). N of 1, 3, 37, 130; D of 1, 7, 96, 130;
# V of 1, 2, 3. 65·2 = 130 rows cross the kernel's 128-row block.
SHAPES = [(1, 0, 7), (3, 1, 1), (37, 0, 96), (13, 3, 7), (65, 2, 130), (12, 3, 96)]
# (atol, rtol) against the float64 reference. Measured over this grid: fp32 loss |err| <= 1.6e-6,
# gradients 2.2e-6; float64 loss 3.5e-11, gradients 8.4e-11 (unnormalised features, D > 8).
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-5)}


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
    check_against_reference(loss, "cpu", label_extremes(loss, labels))


def test_supcon_labels_none_is_simclr():
    x = make_inputs("supcon", 10, 2, 6)
    f = x["features"]
    ref_val, ref_g = value_and_grads(loss_fn("supcon", None), {"features": f})
    val, g = value_and_grads(loss_fn("supcon", "cpu"), {"features": f})
    assert_close(val, ref_val, atol=1e-10, rtol=1e-10, name="loss")
    assert_close(g["features"], ref_g["features"], atol=1e-10, rtol=1e-9, name="dfeatures")


# Error in units of the output's rounding at its scale (assert_rounding_bound): (loss in fp32
# units, gradient in units of the input dtype). Measured over this grid (norm 3), worst loss:
# fp32 1.5, bf16 2.8, fp16 1.2 (ESupCon, its prototypes normalised in the input dtype: bf16
# 286); worst gradient: fp32 21, bf16 2.4, fp16 1.4.
LP_ULPS = {torch.float32: (16, 128), torch.bfloat16: (16, 16), torch.float16: (16, 16)}
ESUPCON_LOSS_ULPS = {torch.float32: 16, torch.bfloat16: 2048, torch.float16: 16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", LOSSES)
def test_low_precision_within_twice_torch_error(loss, dtype):
    """|cpu − ref64| <= 2·|dense in dtype − ref64| + atol (docs/verification.md), large norms."""
    x = make_inputs(loss, 40, 2, 32, dtype=dtype, norm=3.0)
    x64 = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}
    opts = {"temperature": 0.1}
    gt_val, gt_g = value_and_grads(loss_fn(loss, None, **opts), x64)
    dense_val, dense_g = value_and_grads(loss_fn(loss, None, **opts), x)
    val, g = value_and_grads(loss_fn(loss, "cpu", **opts), x)
    assert val.dtype == (torch.float32 if dtype != torch.float64 else dtype)
    # The kernels compute in fp32 from the rounded inputs: the loss (fp32) is within a few fp32
    # units of the float64 value, each gradient within its rounding to ``dtype`` plus fp32
    # noise. LP_ULPS holds the measured counts; docs/verification.md's rule below, kept beside it.
    loss_ulps, grad_ulps = LP_ULPS[dtype]
    loss_ulps = ESUPCON_LOSS_ULPS[dtype] if loss == "esupcon" else loss_ulps
    assert_rounding_bound(val, gt_val, dtype=torch.float32, ulps=loss_ulps, name="loss")
    for key in gt_g:
        assert_rounding_bound(g[key], gt_g[key], dtype=dtype, ulps=grad_ulps, name=key)
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
# How positives are defined (contract v2): class labels, int64 bitmasks, a [Bq, Bk] matrix.
POS_MODES = ["labels", "multilabel", "pos_weight"]


def _op_inputs(n, m, d, dtype, seed=0, n_classes=4, norm=2.0):
    g = torch.Generator().manual_seed(seed)
    q = (norm * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    k = (norm * torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype)
    qlab = torch.randint(0, n_classes, (n,), generator=g)
    klab = torch.randint(0, n_classes, (m,), generator=g)
    return q, k, qlab, klab


def _positives(mode, n, m, dtype, seed=0):
    """(qlab, klab, multilabel, pos_weight) of a positive-weight mode."""
    g = torch.Generator().manual_seed(seed + 100)
    if mode == "multilabel":
        # Bitmasks over 6 labels; some rows share none with anyone (label 0).
        qlab = torch.randint(0, 64, (n,), generator=g)
        klab = torch.randint(0, 64, (m,), generator=g)
        return qlab, klab, True, None
    qlab = torch.randint(0, 4, (n,), generator=g)
    klab = torch.randint(0, 4, (m,), generator=g)
    if mode == "labels":
        return qlab, klab, False, None
    # An asymmetric [5, 4] matrix with zeros (negatives) and weights in (0, 2).
    w = 2 * torch.rand(5, 4, generator=g, dtype=torch.float64)
    w = torch.where(torch.rand(5, 4, generator=g) < 0.4, torch.zeros_like(w), w)
    return qlab, klab, False, w.to(torch_stream.stat_dtype(dtype))


def _f64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


# Op results against torch_stream in float64 on the same inputs, relative to each result's
# largest finite entry (atol = rel·max|expected|, rtol = rel). Measured over this file's op grids
# (general, symmetric, shift and fallback paths): fp32 statistics 1.9e-6, gradients 7.7e-6;
# float64 statistics 4.8e-15, gradients 3.8e-14. The symmetric ops against the general ones:
# within the same bounds.
OP_REL = {
    torch.float64: {"stat": 5e-14, "grad": 5e-13},
    torch.float32: {"stat": 1e-5, "grad": 5e-5},
}


def _stat(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch_stream.stat_dtype(dtype))


@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("self_offset", [-1, 0, 2], ids=["noself", "off0", "off2"])
@pytest.mark.parametrize("weights", WEIGHTS, ids=["all", "pos", "neg", "tcl"])
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "N{}M{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_lse_ops_match_torch_stream(dtype, shape, weights, self_offset, mode):
    """Against torch_stream in float64 on the same (rounded) inputs."""
    q, k, _, _ = _op_inputs(*shape, dtype)
    qlab, klab, ml, pw = _positives(mode, shape[0], shape[1], dtype)
    args = (self_offset, 0.7, *weights, ml, pw)
    args64 = (self_offset, 0.7, *weights, ml, _f64(pw))
    rel = OP_REL[dtype]
    got = OPS.lse_fwd(q, k, qlab, klab, *args)
    want = torch_stream.lse_fwd(_f64(q), _f64(k), qlab, klab, *args64)
    for name, a, e in zip(("lse", "psum", "pcnt"), got, want):
        assert a.dtype == torch_stream.stat_dtype(dtype)
        assert_close_rel(a, e, rel["stat"], name)
    g_lse, g_psum = _stat(shape[0], dtype, 1), _stat(shape[0], dtype, 2)
    lse = want[0].to(g_lse.dtype)  # both sides get the same lse
    got = OPS.lse_bwd(g_lse, g_psum, q, k, qlab, klab, lse, *args)
    exp = torch_stream.lse_bwd(*map(_f64, (g_lse, g_psum, q, k)), qlab, klab, _f64(lse), *args64)
    for name, a, e in zip(("dq", "dk"), got, exp):
        assert a.dtype == dtype
        assert_close_rel(a, e, rel["grad"], name)


@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("self_offset", [-1, 0, 2], ids=["noself", "off0", "off2"])
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "N{}M{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sp_ops_match_torch_stream(dtype, shape, self_offset, mode):
    """Against torch_stream in float64 on the same (rounded) inputs."""
    q, k, _, _ = _op_inputs(*shape, dtype)
    qlab, klab, ml, pw = _positives(mode, shape[0], shape[1], dtype)
    eta = torch_stream.lse_fwd(q, k, qlab, klab, self_offset, 0.7, 0.0, 1.0, 0.0, ml, pw)[0]
    a64 = (self_offset, 0.7, ml, _f64(pw))
    rel = OP_REL[dtype]
    got = OPS.sp_fwd(q, k, qlab, klab, eta, self_offset, 0.7, ml, pw)
    want = torch_stream.sp_fwd(_f64(q), _f64(k), qlab, klab, _f64(eta), *a64)
    for name, a, e in zip(("sp", "r"), got, want):
        assert_close_rel(a, e, rel["stat"], name)
    g_sp = _stat(shape[0], dtype, 3)
    got = OPS.sp_bwd(g_sp, q, k, qlab, klab, eta, self_offset, 0.7, ml, pw)
    exp = torch_stream.sp_bwd(*map(_f64, (g_sp, q, k)), qlab, klab, _f64(eta), *a64)
    for name, a, e in zip(("dq", "dk"), got, exp):
        assert_close_rel(a, e, rel["grad"], name)


def test_empty_rows_have_no_terms():
    """A row with no weighted term gives lse = -inf and zero gradient (no NaN)."""
    q, k, qlab, klab = _op_inputs(6, 9, 5, torch.float64)
    klab = torch.full_like(klab, 7)  # no positives anywhere
    lse, psum, pcnt = OPS.lse_fwd(q, k, qlab, klab, -1, 1.0, 1.0, 0.0, 0.0, False, None)
    assert torch.isneginf(lse).all() and (psum == 0).all() and (pcnt == 0).all()
    g = torch.ones(6, dtype=torch.float64)
    dq, dk = OPS.lse_bwd(g, g, q, k, qlab, klab, lse, -1, 1.0, 1.0, 0.0, 0.0, False, None)
    assert (dq == 0).all() and (dk == 0).all()


def test_pos_weight_is_read_per_tile_not_by_label():
    """With pos_weight the labels are ignored: m_ij = pos_weight[i % Bq, j % Bk]."""
    q, k, qlab, klab = _op_inputs(12, 8, 3, torch.float64)
    w = torch.rand(3, 4, dtype=torch.float64)
    a = OPS.lse_fwd(q, k, qlab, klab, -1, 1.0, 1.0, 1.0, 0.0, False, w)
    b = OPS.lse_fwd(q, k, qlab.flip(0), klab + 5, -1, 1.0, 1.0, 1.0, 0.0, True, w)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    dense = w.repeat(4, 2)  # [12, 8]
    assert_close(a[2], dense.sum(1), atol=1e-12, rtol=1e-12, name="pcnt")
    assert_close(a[1], (dense * (q @ k.T)).sum(1), atol=1e-12, rtol=1e-12, name="psum")


# ---- symmetric path ----------------------------------------------------------------------------

# N of 1, 2, 3, 37, 130 and 300 / 600 (2 and 3 blocks of 256: even and odd round-robin
# schedules); D of 1, 7, 130.
SYM_SHAPES = [(1, 7), (2, 1), (3, 7), (37, 130), (130, 7), (300, 1), (600, 33)]


def _sym_inputs(n, d, dtype, mode, norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    if norm is not None:
        z = norm * torch.nn.functional.normalize(z, dim=1)
    lab, _, ml, pw = _positives(mode, n, n, dtype, seed)
    return z.to(dtype), lab, ml, pw


def _check_sym_lse(z, lab, scale, weights, ml, pw):
    """Against torch_stream in float64 on the same inputs, and the general op."""
    rel = OP_REL[z.dtype]
    args = (scale, *weights, ml, pw)
    args64 = (scale, *weights, ml, _f64(pw))
    got = OPS.sym_lse_fwd(z, lab, *args)
    want = torch_stream.sym_lse_fwd(_f64(z), lab, *args64)
    general = OPS.lse_fwd(z, z, lab, lab, 0, *args)
    for name, a, e, c in zip(("lse", "psum", "pcnt"), got, want, general):
        assert a.dtype == torch_stream.stat_dtype(z.dtype)
        assert_close_rel(a, e, rel["stat"], name)
        assert_close_rel(a, c, rel["stat"], f"{name} vs general op")
    n = z.shape[0]
    g_lse, g_psum = _stat(n, z.dtype, 1), _stat(n, z.dtype, 2)
    lse = want[0].to(g_lse.dtype)
    dz = OPS.sym_lse_bwd(g_lse, g_psum, z, lab, lse, *args)
    exp = torch_stream.sym_lse_bwd(*map(_f64, (g_lse, g_psum, z)), lab, _f64(lse), *args64)
    dq, dk = OPS.lse_bwd(g_lse, g_psum, z, z, lab, lab, lse, 0, *args)
    assert dz.dtype == z.dtype and dz.shape == z.shape
    assert_close_rel(dz, exp, rel["grad"], "dz")
    assert_close_rel(dz, dq + dk, rel["grad"], "dz vs general dq + dk")


@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("weights", WEIGHTS, ids=["all", "pos", "neg", "tcl"])
@pytest.mark.parametrize("shape", SYM_SHAPES, ids=lambda s: "N{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sym_lse_matches_torch_stream_and_general(dtype, shape, weights, mode):
    """Unit-norm features at τ = 0.1: the static-shift path."""
    z, lab, ml, pw = _sym_inputs(*shape, dtype, mode, norm=1.0)
    _check_sym_lse(z, lab, 10.0, weights, ml, pw)


@pytest.mark.parametrize(
    "case", ["static-near-limit", "tiny-temperature", "large-norms", "fp64-huge"]
)
@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("weights", WEIGHTS, ids=["all", "pos", "neg", "tcl"])
def test_sym_lse_shift_paths(weights, mode, case):
    """Near the static shift's limit (fp32, 2·scale·max‖z‖² = 76 <= 80) and past it (fp32:
    > 80; fp64: > 700), where the op takes the general per-row online-max path."""
    dtype = torch.float64 if case == "fp64-huge" else torch.float32
    norm, scale = {
        "static-near-limit": (1.0, 38.0),
        "tiny-temperature": (1.0, 100.0),
        "large-norms": (4.0, 5.0),
        "fp64-huge": (10.0, 10.0),
    }[case]
    z, lab, ml, pw = _sym_inputs(300, 7, dtype, mode, norm=norm)
    _check_sym_lse(z, lab, scale, weights, ml, pw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sym_lse_negative_scale(dtype):
    """No loss passes scale < 0, but the op may be called so: it takes the general path (the
    static shift would be a lower bound there, not an upper one)."""
    z, lab, ml, pw = _sym_inputs(300, 7, dtype, "labels", norm=3.0)
    _check_sym_lse(z, lab, -5.0, (1.0, 1.0, 0.0), ml, pw)


@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("shape", SYM_SHAPES, ids=lambda s: "N{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sym_sp_matches_torch_stream_and_general(dtype, shape, mode):
    z, lab, ml, pw = _sym_inputs(*shape, dtype, mode, norm=2.0)
    eta = torch_stream.sym_lse_fwd(z, lab, 0.7, 0.0, 1.0, 0.0, ml, pw)[0]
    rel = OP_REL[dtype]
    got = OPS.sym_sp_fwd(z, lab, eta, 0.7, ml, pw)
    want = torch_stream.sym_sp_fwd(_f64(z), lab, _f64(eta), 0.7, ml, _f64(pw))
    general = OPS.sp_fwd(z, z, lab, lab, eta, 0, 0.7, ml, pw)
    for name, a, e, c in zip(("sp", "r"), got, want, general):
        assert_close_rel(a, e, rel["stat"], name)
        assert_close_rel(a, c, rel["stat"], f"{name} vs general op")
    g_sp = _stat(shape[0], dtype, 3)
    dz = OPS.sym_sp_bwd(g_sp, z, lab, eta, 0.7, ml, pw)
    exp = torch_stream.sym_sp_bwd(*map(_f64, (g_sp, z)), lab, _f64(eta), 0.7, ml, _f64(pw))
    dq, dk = OPS.sp_bwd(g_sp, z, z, lab, lab, eta, 0, 0.7, ml, pw)
    assert_close_rel(dz, exp, rel["grad"], "dz")
    assert_close_rel(dz, dq + dk, rel["grad"], "dz vs general dq + dk")


# Units of rounding (assert_rounding_bound), measured: statistics 3.5 fp32 units (psum), dz
# 4.1 fp32 units from fp32 inputs, 0.46 units of bf16 or fp16 from 16-bit ones.
SYM_LP_ULPS = {"stat": 32, torch.float32: 32, torch.bfloat16: 4, torch.float16: 4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sym_low_precision_inputs(dtype):
    """Half inputs are converted once; statistics float32, dz in the input dtype."""
    z, lab, ml, pw = _sym_inputs(130, 16, dtype, "labels", norm=1.0)
    lse, psum, pcnt = OPS.sym_lse_fwd(z, lab, 10.0, 1.0, 1.0, 0.0, ml, pw)
    want = torch_stream.sym_lse_fwd(z.double(), lab, 10.0, 1.0, 1.0, 0.0, ml, pw)
    assert lse.dtype == torch.float32
    for name, a, e in zip(("lse", "psum"), (lse, psum), want):
        assert_rounding_bound(a, e, dtype=torch.float32, ulps=SYM_LP_ULPS["stat"], name=name)
    g = _stat(130, torch.float32, 1)
    dz = OPS.sym_lse_bwd(g, g, z, lab, lse, 10.0, 1.0, 1.0, 0.0, ml, pw)
    assert dz.dtype == dtype
    exp = torch_stream.sym_lse_bwd(g.double(), g.double(), z.double(), lab, lse.double(),
                                   10.0, 1.0, 1.0, 0.0, ml, pw)  # fmt: skip
    assert_rounding_bound(dz, exp, dtype=dtype, ulps=SYM_LP_ULPS[dtype], name="dz")


def test_sym_empty_rows_have_no_terms():
    z, lab, _, _ = _sym_inputs(40, 5, torch.float64, "labels", norm=1.0)
    lab = torch.arange(40)  # singletons: no positive anywhere
    lse, psum, pcnt = OPS.sym_lse_fwd(z, lab, 10.0, 1.0, 0.0, 0.0, False, None)
    assert torch.isneginf(lse).all() and (psum == 0).all() and (pcnt == 0).all()
    g = torch.ones(40, dtype=torch.float64)
    dz = OPS.sym_lse_bwd(g, g, z, lab, lse, 10.0, 1.0, 0.0, 0.0, False, None)
    assert (dz == 0).all()


@pytest.mark.parametrize("mode", POS_MODES)
def test_sym_used_by_the_api_and_bypassed_by_set_symmetric(mode):
    """'all'-mode SupCon through the public API, with and without the symmetric ops."""
    import flashcon
    from flashcon import engine

    x = make_inputs("supcon", 150, 2, 9, n_classes=5)
    f = x["features"]
    kwargs = {"labels": x["labels"]}
    if mode == "multilabel":
        g = torch.Generator().manual_seed(3)
        kwargs = {"labels": torch.rand(150, 4, generator=g) < 0.4}
    elif mode == "pos_weight":
        g = torch.Generator().manual_seed(3)
        kwargs = {"mask": torch.rand(150, 150, generator=g, dtype=torch.float64)}
    ref = flashcon.supcon_loss(f, backend="reference", **kwargs)
    out = {}
    try:
        for sym in (True, False):
            engine.set_symmetric(sym)
            fx = f.clone().requires_grad_(True)
            val = flashcon.supcon_loss(fx, backend="cpu", **kwargs)
            val.backward()
            out[sym] = (val.detach(), fx.grad)
    finally:
        engine.set_symmetric(True)
    fr = f.clone().requires_grad_(True)
    flashcon.supcon_loss(fr, backend="reference", **kwargs).backward()
    for sym, (val, grad) in out.items():
        assert_close(val, ref.detach(), atol=1e-10, rtol=1e-10, name=f"loss sym={sym}")
        assert_close(grad, fr.grad, atol=1e-10, rtol=1e-9, name=f"dfeatures sym={sym}")


# ---- autograd, opcheck, determinism, errors ---------------------------------------------------


@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("self_offset", [-1, 0, 1])
@pytest.mark.parametrize("op", ["lse", "sp"])
def test_gradcheck_float64(op, self_offset, mode):
    q, k, _, _ = _op_inputs(7, 9, 3, torch.float64)
    qlab, klab, ml, pw = _positives(mode, 7, 9, torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    if op == "lse":

        def f(q, k):
            lse, psum, _ = OPS.lse_fwd(q, k, qlab, klab, self_offset, 0.8, 1.0, 0.5, 2.0, ml, pw)
            return lse, psum

    else:
        eta = torch_stream.lse_fwd(
            q.detach(), k.detach(), qlab, klab, self_offset, 0.8, 0.0, 1.0, 0.0, ml, pw
        )[0]
        eta = torch.where(torch.isfinite(eta), eta, torch.zeros_like(eta))

        def f(q, k):
            return OPS.sp_fwd(q, k, qlab, klab, eta, self_offset, 0.8, ml, pw)[0]

    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("op", ["lse", "sp", "lse-fallback"])
def test_gradcheck_sym_float64(op, mode):
    # 5 rows of norm ~1, or of norm 30 (2·scale·R² far above 700: the general fallback).
    norm = 30.0 if op == "lse-fallback" else 1.0
    z, lab, ml, pw = _sym_inputs(9, 3, torch.float64, mode, norm=norm)
    z.requires_grad_(True)
    if op.startswith("lse"):

        def f(z):
            lse, psum, _ = OPS.sym_lse_fwd(z, lab, 0.8, 1.0, 0.5, 2.0, ml, pw)
            return lse, psum

    else:
        eta = torch_stream.sym_lse_fwd(z.detach(), lab, 0.8, 0.0, 1.0, 0.0, ml, pw)[0]
        eta = torch.where(torch.isfinite(eta), eta, torch.zeros_like(eta))

        def f(z):
            return OPS.sym_sp_fwd(z, lab, eta, 0.8, ml, pw)[0]

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-6)


def _opcheck_samples():
    q, k, qlab, klab = _op_inputs(5, 7, 3, torch.float32)
    st = torch.randn(5)
    pw = torch.rand(5, 7)
    lse = torch_stream.lse_fwd(q, k, qlab, klab, 0, 1.5, 1.0, 1.0, 0.0)[0]
    qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    z, zlab = q, qlab
    zg = z.clone().requires_grad_(True)
    zpw = torch.rand(5, 5)
    zlse = torch_stream.sym_lse_fwd(z, zlab, 1.5, 1.0, 1.0, 0.0)[0]
    return {
        "lse_fwd": ("lse_fwd", (qg, kg, qlab, klab, 0, 1.5, 1.0, 1.0, 0.0, False, None)),
        "lse_fwd-k1-pw": ("lse_fwd", (qg, kg, qlab, klab, -1, 1.5, 1.0, 0.5, 3.0, False, pw)),
        "lse_bwd": ("lse_bwd", (st, st, q, k, qlab, klab, lse, 0, 1.5, 1.0, 1.0, 0.0, True, None)),
        "sp_fwd": ("sp_fwd", (qg, kg, qlab, klab, lse, 0, 1.5, False, None)),
        "sp_bwd": ("sp_bwd", (st, q, k, qlab, klab, lse, 1, 1.5, False, pw)),
        "sym_lse_fwd": ("sym_lse_fwd", (zg, zlab, 1.5, 1.0, 1.0, 0.0, False, None)),
        "sym_lse_fwd-k1-pw": ("sym_lse_fwd", (zg, zlab, 1.5, 1.0, 0.5, 3.0, False, zpw)),
        "sym_lse_bwd": ("sym_lse_bwd", (st, st, z, zlab, zlse, 1.5, 1.0, 1.0, 0.0, True, None)),
        "sym_sp_fwd": ("sym_sp_fwd", (zg, zlab, zlse, 1.5, False, zpw)),
        "sym_sp_bwd": ("sym_sp_bwd", (st, z, zlab, zlse, 1.5, False, None)),
    }


@pytest.mark.parametrize("key", list(_opcheck_samples()) if _OK else [])
def test_opcheck(key):
    name, args = _opcheck_samples()[key]
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_has_cuda_matches_the_library():
    """has_cuda() is True exactly when the loaded library carries CUDA device code (nvcc's
    .nv_fatbin section), and the engine offers backend='cuda' accordingly."""
    import flashcon._C
    from flashcon.engine import cpp_available

    with open(flashcon._C.__file__, "rb") as fh:
        has_fatbin = b".nv_fatbin" in fh.read()
    assert OPS.has_cuda() is has_fatbin
    assert cpp_available("cuda")[0] is has_fatbin


@pytest.mark.parametrize("op", ["lse", "sp"])
def test_bitwise_reproducible(op):
    """Fixed chunking and a fixed-order dK reduction: identical bits run to run."""
    q, k, qlab, klab = _op_inputs(700, 700, 40, torch.float32)
    st = torch.randn(700)
    a = (False, None)
    if op == "lse":
        runs = [OPS.lse_fwd(q, k, qlab, klab, 0, 2.0, 1.0, 1.0, 0.0, *a) for _ in range(2)]
        runs += [
            OPS.lse_bwd(st, st, q, k, qlab, klab, runs[0][0], 0, 2.0, 1.0, 1.0, 0.0, *a)
            for _ in range(3)
        ]
    else:
        runs = [OPS.sp_fwd(q, k, qlab, klab, st, 0, 2.0, *a) for _ in range(2)]
        runs += [OPS.sp_bwd(st, q, k, qlab, klab, st, 0, 2.0, *a) for _ in range(3)]
    for a, b in [(runs[0], runs[1]), (runs[2], runs[3]), (runs[2], runs[4])]:
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("op", ["lse", "sp"])
def test_sym_bitwise_reproducible(op, mode):
    """Round-robin tile-pair schedule: identical bits run to run at a fixed thread count
    (5 blocks of 256 rows: an odd schedule with byes)."""
    n = 1100
    z, lab, ml, pw = _sym_inputs(n, 40, torch.float32, mode, norm=1.0)
    st = torch.randn(n)

    def run():
        if op == "lse":
            fwd = OPS.sym_lse_fwd(z, lab, 10.0, 1.0, 1.0, 2.0, ml, pw)
            return (*fwd, OPS.sym_lse_bwd(st, st, z, lab, fwd[0], 10.0, 1.0, 1.0, 2.0, ml, pw))
        fwd = OPS.sym_sp_fwd(z, lab, st, 2.0, ml, pw)
        return (*fwd, OPS.sym_sp_bwd(st, z, lab, st, 2.0, ml, pw))

    first = run()
    for _ in range(2):
        for x, y in zip(first, run()):
            assert torch.equal(x, y)


def test_bad_inputs_raise_actionable_errors():
    q, k, qlab, klab = _op_inputs(4, 6, 3, torch.float32)
    a = (False, None)
    with pytest.raises(RuntimeError, match="same feature size D"):
        OPS.lse_fwd(q, k[:, :2].contiguous(), qlab, klab, 0, 1.0, 1.0, 1.0, 0.0, *a)
    with pytest.raises(RuntimeError, match="same dtype"):
        OPS.lse_fwd(q, k.double(), qlab, klab, 0, 1.0, 1.0, 1.0, 0.0, *a)
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.lse_fwd(q.T.contiguous().T, k, qlab, klab, 0, 1.0, 1.0, 1.0, 0.0, *a)
    with pytest.raises(RuntimeError, match="qlab must have shape"):
        OPS.lse_fwd(q, k, qlab[:3], klab, 0, 1.0, 1.0, 1.0, 0.0, *a)
    with pytest.raises(RuntimeError, match="int64"):
        OPS.lse_fwd(q, k, qlab.float(), klab, 0, 1.0, 1.0, 1.0, 0.0, *a)
    with pytest.raises(RuntimeError, match="non-negative"):
        OPS.lse_fwd(q, k, qlab, klab, 0, 1.0, -1.0, 1.0, 0.0, *a)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        OPS.lse_fwd(q.int(), k.int(), qlab, klab, 0, 1.0, 1.0, 1.0, 0.0, *a)
    with pytest.raises(RuntimeError, match="statistics dtype"):
        OPS.sp_fwd(q, k, qlab, klab, torch.zeros(4, dtype=torch.float64), 0, 1.0, *a)
    with pytest.raises(RuntimeError, match="pos_weight must be a non-empty 2-D"):
        OPS.lse_fwd(q, k, qlab, klab, 0, 1.0, 1.0, 1.0, 0.0, False, torch.ones(4))
    with pytest.raises(RuntimeError, match="pos_weight must be a floating"):
        OPS.sym_lse_fwd(q, qlab, 1.0, 1.0, 1.0, 0.0, False, torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="statistics dtype"):
        OPS.sym_sp_fwd(q, qlab, torch.zeros(4, dtype=torch.float64), 1.0, *a)
