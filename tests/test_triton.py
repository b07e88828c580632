"""The Triton backend against the float64 reference (losses) and the torch backend (ops).

Without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels run on CPU tensors through
Triton's interpreter; with one, the same tests run the compiled kernels on CUDA tensors.

Tolerances (docs/verification.md): the error of the Triton result against the float64
reference on the same rounded inputs must be at most twice the error of PyTorch's dense
computation in the input dtype, plus a small absolute term relative to the result's scale.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import flashcon
from flashcon import reference as R
from flashcon.backends import torch_stream as TS
from flashcon.engine import get_engine, resolve_backend
from flashcon.testing import assert_rounding_bound

# Only the triton package itself may be missing; an import error in flashcon's kernels fails.
pytest.importorskip("triton")
from flashcon.triton_kernels import config, lse_launch, ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small absolute slack per dtype, relative to the largest reference magnitude, over what
# 2·|dense − ref64| and the recomputation term allow. Measured on the interpreter over this
# file's grids (the slack each case needs): fp32 1.5e-7 (losses; gradients need none beyond
# the recomputation term), fp16 5.1e-4, bf16 7.2e-3 (gradients). bf16: G is rounded to bf16 for
# the tensor-core products G·k and Gᵀ·q (as flash attention rounds its probabilities), a
# rounding the dense computation places elsewhere: 2e-2·max|ref| is 2.5 bf16 ulps of the
# largest entry.
ATOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def assert_close_verbose(name: str, got, ref64, dense, dtype, logit_max: float = 0.0) -> None:
    """|got − ref64| ≤ 2·|dense − ref64| + atol·max|ref64|, elementwise; report the worst.

    ``logit_max`` adds the recomputation term: the backward recomputes s in tiles of other
    shapes than the forward's, so s may differ in its last fp32 bit between the two, which
    e^{ℓ − lse} turns into a relative gradient error of about eps_fp32·max|ℓ| (visible only for
    unnormalised, large-norm features; a dense computation reuses one s and has no such term).
    """
    got = got.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    dense = dense.detach().double().cpu()
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values in the Triton result"
    scale = max(ref64.abs().max().item(), 1e-2) if ref64.numel() else 1.0
    err = (got - ref64).abs()
    allowed = 2 * (dense - ref64).abs() + (ATOL[dtype] + 4 * 1.2e-7 * logit_max) * scale
    excess = err - allowed
    if (excess > 0).any():
        idx = torch.argmax(excess)
        coord = tuple(int(c) for c in torch.unravel_index(idx, got.shape)) if got.dim() else ()
        raise AssertionError(
            f"{name} ({dtype}): worst at {coord}: triton {got.flatten()[idx]:.8g}, "
            f"ref64 {ref64.flatten()[idx]:.8g}, dense {dense.flatten()[idx]:.8g}; "
            f"error {err.flatten()[idx]:.3g} > allowed {allowed.flatten()[idx]:.3g}; "
            f"max error {err.max():.3g}, rms {err.pow(2).mean().sqrt():.3g}"
        )


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str
    opts: tuple = ()
    soft: str = ""  # genscl: "bk" ([B, K]) or "bvk" ([B, V, K])

    def __str__(self) -> str:
        o = ",".join(f"{k}={v}" for k, v in self.opts)
        return self.loss + (f"[{o}]" if o else "") + (f"-{self.soft}" if self.soft else "")


CASES = [
    Case("supcon", (("contrast_mode", "all"), ("variant", "out"))),
    Case("supcon", (("contrast_mode", "one"), ("variant", "out"), ("temperature", 0.1))),
    Case("supcon", (("contrast_mode", "all"), ("variant", "in"))),
    Case("supcon", (("contrast_mode", "one"), ("variant", "in"), ("base_temperature", 0.1))),
    Case("supcon_nolabels"),
    Case("ntxent"),
    Case("sincere"),
    Case("genscl", soft="bk"),
    Case("genscl", soft="bvk"),
    Case("tcl"),
    Case("tcl", (("k1", 0.0), ("k2", 1.0))),
    Case("tcl", (("k1", 10.0), ("k2", 2.5), ("temperature", 0.2))),
    Case("esupcon", (("prototype_anchors", True),)),
    Case("esupcon", (("prototype_anchors", False), ("base_temperature", 0.07))),
]

# (B, V, D, labels, features): N = B·V of 1, 3, 37, 39, 130; D of 1, 7, 96, 130, 33.
SHAPES = [
    (1, 1, 7, "random", "unit"),
    (3, 1, 1, "same", "large"),
    (37, 1, 96, "random", "unit"),
    (13, 3, 130, "singleton", "unit"),
    (65, 2, 33, "random", "large"),
    (6, 2, 16, "same", "unit"),
]


def _inputs(b, v, d, labels_kind, feat_kind, soft, dtype, k_cls=5):
    g = torch.Generator().manual_seed(1000 * b + 10 * v + d)
    x = torch.randn(b, v, d, generator=g)
    if feat_kind == "unit":
        x = torch.nn.functional.normalize(x, dim=-1)
    else:
        # Unnormalised with large norms: logits far beyond fp16's e^x range, so only a
        # max-shifted exponent survives.
        x = x * 3.0
    x = x.to(dtype)
    if labels_kind == "same":
        y = torch.zeros(b, dtype=torch.long)
    elif labels_kind == "singleton":
        y = torch.arange(b) % k_cls if b > k_cls else torch.arange(b)
    else:
        y = torch.randint(0, max(2, min(k_cls, b // 3)), (b,), generator=g)
    protos = torch.randn(k_cls, d, generator=g).to(dtype)
    soft_labels = None
    if soft == "bk":
        soft_labels = torch.rand(b, k_cls, generator=g) + 0.05
    elif soft == "bvk":
        soft_labels = torch.rand(b, v, k_cls, generator=g) + 0.05
    return x, y, protos, soft_labels


def _run(mod, case: Case, x, y, protos, soft_labels, **backend):
    """Loss value and gradients (features, and prototypes for esupcon) of one module."""
    x = x.detach().clone().requires_grad_(True)
    p = protos.detach().clone().requires_grad_(True)
    opts = dict(case.opts)
    if case.loss == "supcon":
        loss = mod.supcon_loss(x, y, **opts, **backend)
    elif case.loss == "supcon_nolabels":
        loss = mod.supcon_loss(x, **backend)
    elif case.loss == "ntxent":
        loss = mod.ntxent_loss(x, **backend)
    elif case.loss == "sincere":
        loss = mod.sincere_loss(x, y, **backend)
    elif case.loss == "genscl":
        loss = mod.genscl_loss(x, soft_labels, **backend)
    elif case.loss == "tcl":
        loss = mod.tcl_loss(x, y, **opts, **backend)
    else:
        loss = mod.esupcon_loss(x, y, p, **opts, **backend)
    wrt = [x, p] if case.loss == "esupcon" else [x]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    return loss, grads


def _check_case(case: Case, shape, dtype) -> None:
    b, v, d, labels_kind, feat_kind = shape
    assert not (case.loss == "ntxent" and v < 2), "NT-Xent needs V >= 2 views"
    x, y, protos, soft = _inputs(b, v, d, labels_kind, feat_kind, case.soft, dtype)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    loss_t, grads_t = _run(flashcon, case, dev(x), dev(y), dev(protos), dev(soft), backend="triton")
    loss_64, grads_64 = _run(R, case, x.double(), y, protos.double(), soft)
    loss_d, grads_d = _run(R, case, x, y, protos, soft)
    t = dict(case.opts).get("temperature", 0.07)
    lmax = x.double().pow(2).sum(-1).max().item() / min(t, 0.07)
    assert_close_verbose(f"{case} loss", loss_t, loss_64, loss_d, dtype)
    for i, (gt, g64, gd) in enumerate(zip(grads_t, grads_64, grads_d)):
        assert gt.dtype == dtype, f"gradient dtype {gt.dtype}, expected {dtype}"
        assert_close_verbose(f"{case} grad[{i}]", gt, g64, gd, dtype, lmax)


# --------------------------------------------------------------------------------------------
# Loss parity: every loss and option, fp32 on every shape; fp16/bf16 on two shapes.
# --------------------------------------------------------------------------------------------


# The interpreter is slow: every case runs on the small shapes, and one case per loss (plus
# L_in and 'one' mode) on the two larger ones (N = 39 with D = 130, N = 130 with D = 33).
_SMALL = [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[5]]
_LARGE = [SHAPES[3], SHAPES[4]]
_CORE = [CASES[i] for i in (0, 2, 1, 5, 6, 7, 9, 12)]
_FP32 = [(c, s) for c in CASES for s in _SMALL] + [(c, s) for c in _CORE for s in _LARGE]
_FP32 = [(c, s) for c, s in _FP32 if not (c.loss == "ntxent" and s[1] < 2)]  # needs views


def _sid(s):
    return f"B{s[0]}V{s[1]}D{s[2]}-{s[3]}-{s[4]}"


@pytest.mark.parametrize("case, shape", _FP32, ids=[f"{c}-{_sid(s)}" for c, s in _FP32])
def test_loss_parity_fp32(case, shape):
    _check_case(case, shape, torch.float32)


@pytest.mark.parametrize("shape", [SHAPES[3]], ids=_sid)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_loss_parity_low_precision(case, dtype, shape):
    _check_case(case, shape, dtype)


def test_backend_selection_and_float64():
    dev = torch.device(DEVICE)
    assert resolve_backend("triton", dev) == "triton"
    eng = get_engine("triton")
    assert eng.lse is ops.lse_fwd_op and eng.sp is ops.sp_fwd_op
    x = torch.randn(4, 2, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        flashcon.supcon_loss(x, torch.arange(4, device=DEVICE), backend="triton")


# --------------------------------------------------------------------------------------------
# Op level: the four launchers against torch_stream, rectangular, every self_offset kind.
# --------------------------------------------------------------------------------------------

SMALL = config.TileConfig(16, 16, 16, 16, 4, 1)  # many tiles on small shapes: rescaling paths

OP_SHAPES = [
    (37, 50, 7, -1),
    (37, 50, 7, 0),
    (20, 70, 33, 5),
    (130, 129, 96, 0),
    (1, 1, 1, 0),
    (5, 3, 130, 1),
    (9, 40, 64, -1),
]
WEIGHTS = [(1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 2.0, 5000.0), (0.0, 0.0, 0.0)]


def _op_inputs(n, m, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + n * 7 + m * 3 + d)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype)
    ql = torch.randint(0, 3, (n,), generator=g)
    kl = torch.randint(0, 3, (m,), generator=g)
    return q, k, ql, kl, g


def _f64(*ts):
    return tuple(t.double() for t in ts)


# fp32 op results against torch_stream in float64 on the same inputs, relative to each result's
# largest finite entry (rtol = rel, atol = rel·max|expected|). Measured on the interpreter over
# these grids (both tile configurations): statistics 2.0e-7, gradients 1.3e-6.
OP_STAT_REL = 1e-6
OP_GRAD_REL = 1e-5


def _close(name, got, want, rel):
    got, want = got.double().cpu(), want.double().cpu()
    finite = want[torch.isfinite(want)]
    rtol, atol = rel, rel * (finite.abs().max().item() if finite.numel() else 0.0)
    same_inf = torch.isinf(want) & (got == want)
    err = torch.where(same_inf, torch.zeros_like(got), (got - want).abs())
    tol = atol + rtol * torch.where(torch.isinf(want), torch.zeros_like(want), want.abs())
    if not (err <= tol).all():
        bad = torch.argmax(torch.nan_to_num(err - tol, nan=math.inf))
        coord = tuple(int(c) for c in torch.unravel_index(bad, got.shape))
        raise AssertionError(
            f"{name}: worst at {coord}: got {got.flatten()[bad]:.8g}, "
            f"want {want.flatten()[bad]:.8g}, |err| {err.flatten()[bad]:.3g}"
        )


# 16-row tiles on the 130 × 129 × 96 shape (9 × 9 blocks, 6 D chunks) take 30-50 s each in the
# interpreter: there they run for the weights with every stream (TCL's); the other shapes give
# the small tiles several blocks and chunks for every weight set.
_OP_GRID = [
    (s, w, t)
    for s in OP_SHAPES
    for w in WEIGHTS
    for t in ("table", "small")
    if not (t == "small" and s == OP_SHAPES[3] and w != WEIGHTS[3])
]


@pytest.mark.parametrize(
    "shape, weights, tiles",
    _OP_GRID,
    ids=[
        "N{}M{}D{}-self{}".format(*s) + "-wp{}-wn{}-k1{}".format(*w) + f"-{t}"
        for s, w, t in _OP_GRID
    ],
)
def test_lse_ops(shape, weights, tiles):
    n, m, d, so = shape
    cfg = SMALL if tiles == "small" else None
    q, k, ql, kl, g = _op_inputs(n, m, d, torch.float32)
    scale = 1 / 0.07
    want = TS.lse_fwd(q.double(), k.double(), ql, kl, so, scale, *weights)
    qd, kd, qld, kld = (t.to(DEVICE) for t in (q, k, ql, kl))
    got = lse_launch.lse_fwd(qd, kd, qld, kld, so, scale, *weights, config=cfg)
    for name, a, b in zip(("lse", "psum", "pcnt"), got, want):
        _close(name, a, b, OP_STAT_REL)
    g_lse, g_psum = torch.randn(n, generator=g), torch.randn(n, generator=g)
    lse = want[0].float()  # both sides get the same lse
    want = TS.lse_bwd(*_f64(g_lse, g_psum, q, k), ql, kl, lse.double(), so, scale, *weights)
    got = lse_launch.lse_bwd(
        g_lse.to(DEVICE), g_psum.to(DEVICE), qd, kd, qld, kld, lse.to(DEVICE), so, scale,
        *weights, config=cfg,
    )  # fmt: skip
    for name, a, b in zip(("dq", "dk"), got, want):
        _close(name, a, b, OP_GRAD_REL)


_SP_GRID = [
    (s, t) for s in OP_SHAPES for t in ("table", "small") if (s, t) != (OP_SHAPES[3], "small")
]


@pytest.mark.parametrize(
    "shape, tiles", _SP_GRID, ids=["N{}M{}D{}-self{}".format(*s) + f"-{t}" for s, t in _SP_GRID]
)
def test_sp_ops(shape, tiles):
    n, m, d, so = shape
    cfg = SMALL if tiles == "small" else None
    q, k, ql, kl, g = _op_inputs(n, m, d, torch.float32, seed=1)
    scale = 1 / 0.1
    eta = TS.lse_fwd(q, k, ql, kl, so, scale, 0.0, 1.0, 0.0)[0]  # −inf where no negatives
    want = TS.sp_fwd(*_f64(q, k), ql, kl, eta.double(), so, scale)
    qd, kd, qld, kld, etad = (t.to(DEVICE) for t in (q, k, ql, kl, eta))
    got = lse_launch.sp_fwd(qd, kd, qld, kld, etad, so, scale, config=cfg)
    for name, a, b in zip(("sp", "r"), got, want):
        _close(name, a, b, OP_STAT_REL)
    g_sp = torch.randn(n, generator=g)
    want = TS.sp_bwd(*_f64(g_sp, q, k), ql, kl, eta.double(), so, scale)
    got = lse_launch.sp_bwd(g_sp.to(DEVICE), qd, kd, qld, kld, etad, so, scale, config=cfg)
    for name, a, b in zip(("dq", "dk"), got, want):
        _close(name, a, b, OP_GRAD_REL)


@pytest.mark.parametrize("shape", OP_SHAPES[:4], ids=lambda s: "N{}M{}D{}-self{}".format(*s))
def test_multilabel_ops(shape):
    """Bitmask labels: positive when the masks share a bit (a compile-time flag)."""
    n, m, d, so = shape
    q, k, _, _, g = _op_inputs(n, m, d, torch.float32, seed=2)
    ql = torch.randint(0, 16, (n,), generator=g)
    kl = torch.randint(0, 16, (m,), generator=g)
    args = (so, 1 / 0.1, 1.0, 1.0, 3.0, True)
    q64, k64 = _f64(q, k)
    want = TS.lse_fwd(q64, k64, ql, kl, *args)
    lse = want[0].float()
    q, k, ql, kl = (t.to(DEVICE) for t in (q, k, ql, kl))
    got = lse_launch.lse_fwd(q, k, ql, kl, *args)
    for name, a, b in zip(("lse", "psum", "pcnt"), got, want):
        _close(name, a, b, OP_STAT_REL)
    g_lse, g_psum = torch.randn(n, generator=g), torch.randn(n, generator=g)
    want = TS.lse_bwd(*_f64(g_lse, g_psum), q64, k64, ql.cpu(), kl.cpu(), lse.double(), *args)
    g_lse, g_psum = g_lse.to(DEVICE), g_psum.to(DEVICE)
    got = lse_launch.lse_bwd(g_lse, g_psum, q, k, ql, kl, lse.to(DEVICE), *args)
    for name, a, b in zip(("dq", "dk"), got, want):
        _close(name, a, b, OP_GRAD_REL)
    eta = torch.randn(n, generator=g)
    want = TS.sp_fwd(q64, k64, ql.cpu(), kl.cpu(), eta.double(), so, 10.0, True)
    got = lse_launch.sp_fwd(q, k, ql, kl, eta.to(DEVICE), so, 10.0, True)
    for name, a, b in zip(("sp", "r"), got, want):
        _close(name, a, b, OP_STAT_REL)


# Units of rounding (assert_rounding_bound), measured: lse 1.7 fp32 units, dq and dk 2.0 units
# of their dtype.
OPS_LP_ULPS = {"stat": 16, torch.float16: 8, torch.bfloat16: 8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_ops_low_precision_dtypes(dtype):
    """Statistics come back fp32, gradients in the input dtype, close to the fp32 result."""
    q, k, ql, kl, g = _op_inputs(45, 61, 40, dtype)
    args = (ql, kl)
    lse, psum, pcnt = ops.lse_fwd_op(q.to(DEVICE), k.to(DEVICE), *(a.to(DEVICE) for a in args),
                                     0, 10.0, 1.0, 1.0, 0.0, False, None)  # fmt: skip
    assert lse.dtype == psum.dtype == pcnt.dtype == torch.float32
    # Against float64 on the same rounded inputs: fp32 statistics, gradients rounded to dtype.
    want = TS.lse_fwd(*_f64(q, k), ql, kl, 0, 10.0, 1.0, 1.0, 0.0)
    assert_rounding_bound(lse, want[0], dtype=torch.float32, ulps=OPS_LP_ULPS["stat"], name="lse")
    g_lse = torch.randn(45, generator=g)
    dq, dk = ops.lse_bwd_op(g_lse.to(DEVICE), torch.zeros(45, device=DEVICE), q.to(DEVICE),
                            k.to(DEVICE), ql.to(DEVICE), kl.to(DEVICE), lse, 0, 10.0, 1.0, 1.0,
                            0.0, False, None)  # fmt: skip
    assert dq.dtype == dk.dtype == dtype
    wq, wk = TS.lse_bwd(*_f64(g_lse, torch.zeros(45), q, k), ql, kl, lse.double().cpu(), 0, 10.0,
                        1.0, 1.0, 0.0)  # fmt: skip
    assert_rounding_bound(dq, wq, dtype=dtype, ulps=OPS_LP_ULPS[dtype], name="dq")
    assert_rounding_bound(dk, wk, dtype=dtype, ulps=OPS_LP_ULPS[dtype], name="dk")


_FAKE_SCRIPT = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from flashcon.triton_kernels import ops

names = ("lse_fwd", "lse_bwd", "sp_fwd", "sp_bwd")
for op, name in zip(ops.OPS, names):
    assert op._qualname == f"flashcon::triton_{name}", op._qualname
for op, name in zip(ops.SYM_OPS, names):
    assert op._qualname == f"flashcon::triton_sym_{name}", op._qualname
with FakeTensorMode():
    q, k = torch.empty(10, 7), torch.empty(12, 7)
    lab_q, lab_k = torch.zeros(10, dtype=torch.long), torch.zeros(12, dtype=torch.long)
    lse, psum, pcnt = ops.lse_fwd_op(q, k, lab_q, lab_k, 0, 1.0, 1.0, 1.0, 0.0, False, None)
    assert lse.shape == (10,) and lse.dtype == torch.float32
    dq, dk = ops.sp_bwd_op(lse, q, k, lab_q, lab_k, lse, -1, 1.0, False, None)
    assert dq.shape == (10, 7) and dk.shape == (12, 7)
    z = torch.empty(10, 7, dtype=torch.bfloat16)
    pw = torch.empty(5, 5)
    for mask in (None, pw):
        lse, psum, pcnt = ops.sym_lse_fwd_op(z, lab_q, 1.0, 1.0, 1.0, 0.0, False, mask)
        assert lse.shape == psum.shape == (10,) and lse.dtype == torch.float32
        dz = ops.sym_lse_bwd_op(lse, psum, z, lab_q, lse, 1.0, 1.0, 1.0, 0.0, False, mask)
        assert dz.shape == (10, 7) and dz.dtype == torch.bfloat16
    sp, r = ops.sym_sp_fwd_op(z, lab_q, lse, 1.0, True, None)
    assert sp.shape == r.shape == (10,) and sp.dtype == torch.float32
    dz = ops.sym_sp_bwd_op(sp, z, lab_q, lse, 1.0, True, None)
    assert dz.shape == (10, 7) and dz.dtype == torch.bfloat16
print("ok")
"""


def test_op_names_and_fake_tensors():
    """Every op's fake implementation (the launcher with the launch skipped), as torch.compile
    traces it. Run without the interpreter (it computes on tensor storage, which fake tensors
    lack), in a subprocess: kernels are decorated at import under one setting."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run(
        [sys.executable, "-c", _FAKE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
