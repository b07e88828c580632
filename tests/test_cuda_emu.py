"""The CUDA kernels' own source, run on the CPU, against the float64 oracle.

csrc/cuda/kernels.cuh (the kernels and launch plans flashcon._C runs on a GPU) is compiled for
the host with csrc/emu/cuda_emu.h, which runs every CUDA thread as an OS thread with real
barriers, emulates WMMA by its matrix semantics, poisons shared memory and checks the alignment
of WMMA and 16-byte accesses (the header says what this proves and what it does not). The ops
are compared with backend='torch''s streaming implementation in float64 on the same inputs,
through the same Params filling and launch plans as csrc/cuda/engine_cuda.cu.

Built with the host C++ compiler (a few seconds) once per test run.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flashcon.backends import torch_stream as TS
from flashcon.testing import assert_close_rel, assert_rounding_bound

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "emu" / "emu_capi.cpp"

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _build(out: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler on PATH (the extension needs one too)"
    # -Wno-unknown-pragmas: the host compiler ignores nvcc's `#pragma unroll`.
    cmd = [cxx, "-O1", "-g0", "-std=c++20", "-pthread", "-shared", "-fPIC", "-Wall", "-Werror",
           "-Wno-unknown-pragmas", "-DFLASHCON_CUDA_EMU", f"-I{ROOT / 'csrc' / 'include'}",
           str(SOURCE), "-o", str(out / "libfcemu.so")]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def emu(shared_once):
    lib = ctypes.CDLL(str(shared_once("cuda-emu", _build) / "libfcemu.so"))
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.fcemu_run.argtypes = [i32, i32, p, p, p, p, i64, i64, i64, i64, f64, f64, f64, f64, i32,
                              p, p, i64, i64, p, p, p, p, p, p, p, p, p, i32]  # fmt: skip
    lib.fcemu_run.restype = i32
    lib.fcemu_vec_ok.argtypes = [p, p, i64, i32]
    lib.fcemu_vec_ok.restype = i32
    lib.fcemu_resident_width.argtypes = [i32, p, p, i64, i64, i64]
    lib.fcemu_resident_width.restype = i32
    return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class Emu:
    """The four ops of the engine contract, run by the emulated CUDA kernels."""

    def __init__(
        self, lib, q, k, ql, kl, self_offset, scale, multilabel=False, pos_weight=None,
        streamed=False,
    ):  # fmt: skip
        self.lib, self.q, self.k, self.streamed = lib, q, k, streamed
        self.ql, self.kl = ql.long().contiguous(), kl.long().contiguous()
        self.so, self.scale = self_offset, scale
        self.pw = None if pos_weight is None else pos_weight.float().contiguous()
        self.lpw = None
        if self.pw is not None:
            self.lpw = torch.where(self.pw > 0, self.pw.log(), torch.tensor(float("-inf")))
        self.mode = 2 if self.pw is not None else (1 if multilabel else 0)

    def _run(self, op, weights=(1.0, 1.0, 0.0), g0=None, g1=None, stat=None, eta=None):
        n, d = self.q.shape
        m = self.k.shape[0]
        outs = [torch.full((n,), float("nan")) for _ in range(3)]
        dq, dk = torch.full_like(self.q, float("nan")), torch.full_like(self.k, float("nan"))
        bq, bk = self.pw.shape if self.pw is not None else (1, 1)
        rc = self.lib.fcemu_run(
            op, DTYPES[self.q.dtype], _ptr(self.q), _ptr(self.k), _ptr(self.ql), _ptr(self.kl),
            n, m, d, self.so, self.scale, *weights, self.mode, _ptr(self.pw), _ptr(self.lpw),
            bq, bk, _ptr(g0), _ptr(g1), _ptr(stat), _ptr(eta), *(_ptr(o) for o in outs),
            _ptr(dq), _ptr(dk), int(self.streamed),
        )  # fmt: skip
        assert rc == 0
        return outs, (dq, dk)

    def lse_fwd(self, w_pos, w_neg, k1):
        return tuple(self._run(0, (w_pos, w_neg, k1))[0])

    def lse_bwd(self, g_lse, g_psum, lse, w_pos, w_neg, k1):
        return self._run(1, (w_pos, w_neg, k1), g0=g_lse, g1=g_psum, stat=lse)[1]

    def sp_fwd(self, eta):
        return tuple(self._run(2, eta=eta)[0][:2])

    def sp_bwd(self, g_sp, eta):
        return self._run(3, g0=g_sp, eta=eta)[1]

    def sym_lse_bwd(self, g_lse, g_psum, lse, w_pos, w_neg, k1):
        return self._run(4, (w_pos, w_neg, k1), g0=g_lse, g1=g_psum, stat=lse)[1][0]

    def sym_sp_bwd(self, g_sp, eta):
        return self._run(5, g0=g_sp, eta=eta)[1][0]


# (n, m, d, self_offset): 64-row blocks and 64-column tiles crossed and partial; D below one
# staging slice, one and a half 16-bit slices (96: 16-byte staging), past the 128 columns one
# backward CTA accumulates (130: two CTA columns, scalar staging), D = 0 and no columns (M = 0:
# k empty); anchors with their own column (0), a second view (45) and none (-1).
SHAPES = [(130, 129, 96, 0), (70, 70, 130, 0), (45, 90, 40, 45), (20, 33, 64, -1),
          (3, 5, 7, 0), (5, 6, 0, -1), (6, 0, 64, -1)]  # fmt: skip

# Positive weights and lse weights: labels (SupCon), bitmask labels with TCL's k1, a
# [Bq, Bk] pos_weight matrix with zeros (SupContrast's mask), and w_pos = 0 (SINCERE's
# denominator: negatives only).
OPTIONS = {
    "labels": dict(weights=(1.0, 1.0, 0.0)),
    "multilabel-k1": dict(weights=(1.0, 1.0, 3.0), multilabel=True),
    "pos_weight": dict(weights=(1.0, 1.0, 0.0), pos_weight=True),
    "neg-only": dict(weights=(0.0, 1.0, 0.0)),
}

# Statistics in fp32 units, gradients in units of their dtype (assert_rounding_bound). The
# fp32 gradients are held to 1e-5 of their scale, as the CPU kernels' parity tests hold them.
STAT_ULPS = 64
GRAD_ULPS = {torch.float16: 8, torch.bfloat16: 8}
FP32_REL = 1e-5


def _inputs(n, m, d, dtype, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    hi = 16 if opt.get("multilabel") else 3
    ql, kl = torch.randint(0, hi, (n,), generator=g), torch.randint(0, hi, (m,), generator=g)
    pw = None
    if opt.get("pos_weight"):
        pw = torch.rand(5, 7, generator=g) * (torch.rand(5, 7, generator=g) > 0.4)
    return q.to(dtype), k.to(dtype), ql, kl, pw, g


def _check(name, got, want, dtype, kind):
    if got.dtype == torch.float32 and (kind == "stat" or dtype == torch.float32):
        if kind == "stat":
            assert_rounding_bound(got, want, dtype=torch.float32, ulps=STAT_ULPS, name=name)
        else:
            assert_close_rel(got, want, FP32_REL, name=name)
    else:
        assert got.dtype == dtype, name
        assert_rounding_bound(got, want, dtype=dtype, ulps=GRAD_ULPS[dtype], name=name)


def _finite_part(got, want):
    """-inf where the oracle has no term (an lse over no pair) must come back -inf."""
    none = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), none), "rows with no term differ"
    return got[~none], want[~none]


def _resident(dtype, n, m, d):
    """Whether the launch plan picks the resident kernels (for 16-byte aligned rows)."""
    return dtype != torch.float32 and n > 0 and m > 0 and 0 < d <= 128 and d % 8 == 0


def _paths(shapes):
    """(dtype, shape, streamed): every dtype and shape as the launch plan runs it, and where it
    picks the resident kernels, the same call forced onto the streamed ones."""
    out = []
    for dtype, name in zip(DTYPES, ["fp32", "fp16", "bf16"]):
        for shape in shapes:
            sid = f"{name}-N{shape[0]}M{shape[1]}D{shape[2]}-self{shape[3]}"
            out.append(pytest.param(dtype, shape, False, id=sid))
            if _resident(dtype, *shape[:3]):
                out.append(pytest.param(dtype, shape, True, id=sid + "-streamed"))
    return out


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype, shape, streamed", _paths(SHAPES))
def test_lse_ops(emu, dtype, shape, streamed, opt):
    n, m, d, so = shape
    o = OPTIONS[opt]
    q, k, ql, kl, pw, g = _inputs(n, m, d, dtype, o)
    ml, scale, w = o.get("multilabel", False), 10.0, o["weights"]
    e = Emu(emu, q, k, ql, kl, so, scale, ml, pw, streamed=streamed)
    q64, k64 = q.double(), k.double()
    pw64 = None if pw is None else pw.double()
    want = TS.lse_fwd(q64, k64, ql, kl, so, scale, *w, ml, pw64)
    got = e.lse_fwd(*w)
    for name, a, b in zip(("lse", "psum", "pcnt"), got, want):
        if name == "lse":
            a, b = _finite_part(a, b)
        _check(name, a, b, dtype, "stat")
    lse = got[0]
    g_lse, g_psum = torch.randn(n, generator=g), torch.randn(n, generator=g)
    want = TS.lse_bwd(g_lse.double(), g_psum.double(), q64, k64, ql, kl, lse.double(), so, scale,
                      *w, ml, pw64)  # fmt: skip
    got = e.lse_bwd(g_lse, g_psum, lse, *w)
    for name, a, b in zip(("dq", "dk"), got, want):
        _check(name, a, b, dtype, "grad")


@pytest.mark.parametrize("dtype, shape, streamed", _paths(SHAPES[:4]))
def test_sp_ops(emu, dtype, shape, streamed):
    n, m, d, so = shape
    q, k, ql, kl, _, g = _inputs(n, m, d, dtype, {}, seed=1)
    e = Emu(emu, q, k, ql, kl, so, 10.0, streamed=streamed)
    q64, k64 = q.double(), k.double()
    eta = torch.randn(n, generator=g) + 5.0
    want = TS.sp_fwd(q64, k64, ql, kl, eta.double(), so, 10.0)
    for name, a, b in zip(("sp", "r"), e.sp_fwd(eta), want):
        _check(name, a, b, dtype, "stat")
    g_sp = torch.randn(n, generator=g)
    want = TS.sp_bwd(g_sp.double(), q64, k64, ql, kl, eta.double(), so, 10.0)
    for name, a, b in zip(("dq", "dk"), e.sp_bwd(g_sp, eta), want):
        _check(name, a, b, dtype, "grad")


def test_vectorised_staging_needs_alignment(emu):
    """16-byte staging only where every row start is 16-byte aligned: a 16-bit D that is a
    multiple of 8 and 16-byte aligned bases (a GPU faults on a misaligned vector load)."""
    buf = torch.zeros(1024, dtype=torch.bfloat16)
    base = buf.data_ptr()
    assert base % 16 == 0
    assert emu.fcemu_vec_ok(base, base, 64, 2) == 1
    assert emu.fcemu_vec_ok(base, base, 40, 2) == 1
    assert emu.fcemu_vec_ok(base, base, 36, 2) == 0  # rows 72 bytes apart
    assert emu.fcemu_vec_ok(base + 2, base, 64, 2) == 0
    assert emu.fcemu_vec_ok(base, base + 8, 64, 2) == 0
    assert emu.fcemu_vec_ok(base, base, 64, 4) == 0  # float32 stages with scalar loads


def test_launch_plan_picks_resident_kernels(emu):
    """The resident kernels (cp.async of 16-byte chunks) only for 16-bit rows of D <= 128
    elements, D % 8 == 0, 16-byte aligned, q and k not empty (an empty tensor's pointer may be
    null); 64 columns wide up to D = 64, 128 beyond."""
    buf = torch.zeros(4096, dtype=torch.bfloat16)
    base = buf.data_ptr()
    want = {8: 64, 40: 64, 64: 64, 72: 128, 96: 128, 128: 128, 136: 0, 36: 0, 7: 0, 0: 0}
    for d, width in want.items():
        for dtype in (1, 2):
            assert emu.fcemu_resident_width(dtype, base, base, 9, 5, d) == width, (dtype, d)
        assert _resident(torch.bfloat16, 9, 5, d) == (width > 0), d
    assert emu.fcemu_resident_width(0, base, base, 9, 5, 64) == 0  # float32
    assert emu.fcemu_resident_width(2, base + 2, base, 9, 5, 64) == 0  # misaligned q
    assert emu.fcemu_resident_width(2, base, base + 8, 9, 5, 64) == 0  # misaligned k
    assert emu.fcemu_resident_width(2, base, None, 9, 0, 64) == 0  # k empty
    assert emu.fcemu_resident_width(2, None, base, 0, 5, 64) == 0  # q empty


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_misaligned_storage(emu, dtype):
    """q and k that start 2 bytes past an aligned address (views of a larger buffer, as a
    contiguous slice can be) take the scalar staging path and give the same results."""
    n, d = 70, 64
    q0, k0, ql, kl, _, g = _inputs(n, n, d, dtype, {})
    buf = torch.empty(2 * n * d + 1, dtype=dtype)
    q = buf[1 : 1 + n * d].view(n, d)
    k = buf[1 + n * d :].view(n, d)
    q.copy_(q0)
    k.copy_(k0)
    assert q.data_ptr() % 16 != 0 and q.is_contiguous()
    assert emu.fcemu_vec_ok(q.data_ptr(), k.data_ptr(), d, 2) == 0
    want = TS.lse_fwd(q0.double(), k0.double(), ql, kl, 0, 10.0, 1.0, 1.0, 0.0, False, None)
    got = Emu(emu, q, k, ql, kl, 0, 10.0).lse_fwd(1.0, 1.0, 0.0)
    aligned = Emu(emu, q0, k0, ql, kl, 0, 10.0).lse_fwd(1.0, 1.0, 0.0)
    for name, a, b, c in zip(("lse", "psum", "pcnt"), got, want, aligned):
        _check(name, a, b, dtype, "stat")
        assert torch.equal(a, c), f"{name}: scalar and 16-byte staging differ"


# (n, n, d, 0): the symmetric ops' shapes (q = k = z, self_offset = 0).
SYM_SHAPES = [(130, 130, 96, 0), (70, 70, 130, 0), (33, 33, 40, 0), (5, 5, 7, 0)]


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype, shape, streamed", _paths(SYM_SHAPES))
def test_sym_lse_bwd(emu, dtype, shape, streamed, opt):
    """The symmetric backward's one launch: dz = dq + dk of the general op with q = k = z,
    rounded once (G_ab + G_ba per pair, one S per tile)."""
    n, _, d, _ = shape
    o = OPTIONS[opt]
    z, _, lab, _, pw, g = _inputs(n, n, d, dtype, o, seed=3)
    ml, scale, w = o.get("multilabel", False), 10.0, o["weights"]
    e = Emu(emu, z, z, lab, lab, 0, scale, ml, pw, streamed=streamed)
    z64, pw64 = z.double(), None if pw is None else pw.double()
    lse = e.lse_fwd(*w)[0]
    g_lse, g_psum = torch.randn(n, generator=g), torch.randn(n, generator=g)
    dq, dk = TS.lse_bwd(g_lse.double(), g_psum.double(), z64, z64, lab, lab, lse.double(), 0,
                        scale, *w, ml, pw64)  # fmt: skip
    _check("dz", e.sym_lse_bwd(g_lse, g_psum, lse, *w), dq + dk, dtype, "grad")


@pytest.mark.parametrize("dtype, shape, streamed", _paths(SYM_SHAPES[:3]))
def test_sym_sp_bwd(emu, dtype, shape, streamed):
    n, _, d, _ = shape
    z, _, lab, _, _, g = _inputs(n, n, d, dtype, {}, seed=4)
    e = Emu(emu, z, z, lab, lab, 0, 10.0, streamed=streamed)
    eta, g_sp = torch.randn(n, generator=g) + 5.0, torch.randn(n, generator=g)
    dq, dk = TS.sp_bwd(g_sp.double(), z.double(), z.double(), lab, lab, eta.double(), 0, 10.0)
    _check("dz", e.sym_sp_bwd(g_sp, eta), dq + dk, dtype, "grad")
