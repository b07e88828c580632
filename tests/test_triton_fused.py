"""The fused 'all'-mode losses of the Triton backend (``fused_launch.fused_fwd``/``fused_bwd``,
``triton_kernels/fused.py``) against the float64 reference, through the public API.

SupCon L_out, NT-Xent, TCL and SINCERE in 'all' mode (no mask, queue or gathering) take this
path by default; the tests also check that they do, that the device-side gates fall back to
the general kernels (forward: a shift past fp32's range; backward: row constants past it),
and non-finite input. Without a GPU the kernels run through Triton's interpreter (conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import flashcon
from flashcon import engine
from flashcon import reference as R
from flashcon.tools.launch_count import count_device_ops

pytest.importorskip("triton")
from flashcon.triton_kernels import fused_launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOSSES = ("supcon", "ntxent", "tcl", "sincere")


def _call(loss, f, lab, backend, **kw):
    if loss == "supcon":
        return (flashcon.supcon_loss if backend else R.supcon_loss)(f, lab, **kw, **_be(backend))
    if loss == "ntxent":
        return (flashcon.ntxent_loss if backend else R.ntxent_loss)(f, **kw, **_be(backend))
    if loss == "tcl":
        return (flashcon.tcl_loss if backend else R.tcl_loss)(f, lab, **kw, **_be(backend))
    return (flashcon.sincere_loss if backend else R.sincere_loss)(f, lab, **kw, **_be(backend))


def _be(backend):
    return {"backend": backend} if backend else {}


def _inputs(b, v, d, labels, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * b + d)
    shape = (b, v, d) if v else (b, d)
    f = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    if labels == "multi-hot":
        lab = torch.rand(b, 6, generator=g) < 0.3
    elif labels == "unique":  # no anchor has a positive (one view each)
        lab = torch.arange(b)
    else:
        lab = torch.randint(0, 4, (b,), generator=g)
    return f, lab


def _run(loss, f64, lab, dtype, grad_out=None, **kw):
    """(value, gradient) of the Triton loss in ``dtype`` and of the float64 reference."""
    f = f64.to(DEVICE, dtype).requires_grad_(True)
    val = _call(loss, f, lab.to(DEVICE), "triton", **kw)
    val.backward(grad_out)
    fr = f.detach().cpu().double().requires_grad_(True)  # the rounded inputs, in float64
    ref = _call(loss, fr, lab, None, **kw)
    ref.backward(None if grad_out is None else grad_out.cpu().double())
    return val.detach().cpu().double(), f.grad.cpu().double(), ref.detach(), fr.grad


def _rel(a, b):
    """Largest error relative to the gradient's largest entry, or to 1/N where the exact
    gradient is 0 (B = 1: L_out is exactly 0 for any features; fp32 leaves ~1e-7 there)."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1.0 / b.shape[0])


# Measured on the interpreter (fp32 numpy, this grid): value ≤ 1.3e-7 relative, gradient
# ≤ 4.8e-7 of its largest entry; bf16 gradients (the tile products and dz in bf16) ≤ 1.2e-2.
TOL = {torch.float32: (2e-6, 5e-6), torch.bfloat16: (2e-6, 2.5e-2)}
SHAPES = [(1, 2, 7), (37, 2, 33), (50, 3, 16), (40, 0, 20)]  # V = 0: [N, D] features


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", LOSSES)
def test_fused_matches_reference(loss, shape, dtype):
    b, v, d = shape
    if loss == "ntxent" and v < 2:
        return  # NT-Xent needs views (checked by the validation tests)
    f64, lab = _inputs(b, v, d, "classes")
    val, grad, ref, ref_grad = _run(loss, f64, lab, dtype)
    tv, tg = TOL[dtype]
    assert abs(val - ref).item() <= tv * abs(ref).item() + 1e-7, (val, ref)
    assert _rel(grad, ref_grad) <= tg, _rel(grad, ref_grad)


@pytest.mark.parametrize("loss", ["supcon", "tcl", "sincere"])
@pytest.mark.parametrize("labels", ["multi-hot", "unique"])
def test_fused_labels(loss, labels):
    f64, lab = _inputs(30, 0 if labels == "unique" else 2, 24, labels)
    val, grad, ref, ref_grad = _run(loss, f64, lab, torch.float32)
    assert abs(val - ref).item() <= 2e-6 * abs(ref).item() + 1e-7, (val, ref)
    if labels == "unique":  # no positives anywhere: the loss and its gradient are exactly 0
        assert val.item() == 0.0 and grad.abs().max().item() == 0.0
    else:
        assert _rel(grad, ref_grad) <= 5e-6


def _launches(fn, syncs_ok: bool = False) -> dict:
    ops, syncs = count_device_ops(fn)
    assert syncs_ok or not syncs, syncs
    return ops


@pytest.mark.parametrize("loss", LOSSES)
def test_fused_path_is_taken_and_only_where_it_applies(loss):
    f64, lab = _inputs(20, 2, 16, "classes")
    f = f64.float().to(DEVICE).requires_grad_(True)
    lab = lab.to(DEVICE)
    step = lambda **kw: _call(loss, f, lab, "triton", **kw).backward()  # noqa: E731
    assert _launches(step)["triton:_finish_kernel"] >= 1
    engine.set_symmetric(False)
    try:
        assert "triton:_finish_kernel" not in _launches(step)
    finally:
        engine.set_symmetric(True)
    torch.use_deterministic_algorithms(True)
    try:
        ops = _launches(step)
        assert "triton:_finish_kernel" not in ops and "triton:_sym_fwd_kernel" not in ops
    finally:
        torch.use_deterministic_algorithms(False)
    if loss != "ntxent":
        queue = flashcon.MemoryQueue(8, 16)
        queue.push(torch.nn.functional.normalize(torch.randn(8, 16), dim=-1), torch.arange(8))
        kw = {"queue": queue}
        # (the queue's own checks read a few scalars on the host)
        assert "triton:_finish_kernel" not in _launches(lambda: step(**kw), syncs_ok=True)


@pytest.mark.parametrize("loss", LOSSES)
def test_forward_gate_falls_back_to_the_general_kernels(loss):
    """τ = 0.01 with unit-norm features: the static shift's spread 2/τ = 200 > 80, so the
    symmetric kernels return at once and the general ones (GATED) compute the loss."""
    f64, lab = _inputs(33, 2, 16, "classes")
    kw = {"temperature": 0.01}
    if loss == "supcon":
        kw["base_temperature"] = 0.01
    val, grad, ref, ref_grad = _run(loss, f64, lab, torch.float32, **kw)
    assert abs(val - ref).item() <= 1e-5 * abs(ref).item() + 1e-6, (val, ref)
    assert _rel(grad, ref_grad) <= 1e-5


def _bwd_gate_of(step) -> int:
    """The backward gate the fused backward computed (read from _bwd_finish_kernel's launch)."""
    seen = []
    real = fused_launch.wrap_triton

    def spy(kernel):
        wrapped = real(kernel)
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    out = wrapped[grid](*args, **kw)
                    if name == "_bwd_finish_kernel":
                        seen.append(int(args[3][0]))
                    return out

                return run

        return _Grid()

    fused_launch.wrap_triton = spy
    try:
        step()
    finally:
        fused_launch.wrap_triton = real
    assert len(seen) == 1, seen
    return seen[0]


@pytest.mark.parametrize("loss", ["supcon", "sincere"])
def test_backward_gate_falls_back_for_a_huge_incoming_gradient(loss):
    """An incoming gradient of 1e36 puts the row constants ρ_i past a quarter of fp32's range
    (|ρ_i| ≈ g·(1/N)·(1/τ)·e^{l1 − lse_i}): the backward gate is 0 while the forward's is 1,
    and the general kernels compute dz, finite and exact."""
    f64, lab = _inputs(25, 2, 16, "classes")
    g = torch.tensor(1e36, dtype=torch.float32, device=DEVICE)
    f = f64.float().to(DEVICE).requires_grad_(True)
    gate = _bwd_gate_of(lambda: _call(loss, f, lab.to(DEVICE), "triton").backward(g))
    assert gate == 0
    val, grad, ref, ref_grad = _run(loss, f64, lab, torch.float32, grad_out=g)
    assert torch.isfinite(grad).all()
    assert _rel(grad, ref_grad) <= 5e-6
    # and an ordinary gradient keeps the symmetric backward
    f.grad = None
    assert _bwd_gate_of(lambda: _call(loss, f, lab.to(DEVICE), "triton").backward()) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("loss", LOSSES)
def test_non_finite_features_give_nan(loss, bad):
    f64, lab = _inputs(12, 2, 8, "classes")
    f = f64.float()
    f[3, 1, 2] = bad
    val = _call(loss, f.to(DEVICE), lab.to(DEVICE), "triton")
    assert torch.isnan(val).item()


_FAKE_SCRIPT = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import flashcon
from flashcon.triton_kernels import ops

with FakeTensorMode():
    z = torch.empty(10, 7, dtype=torch.bfloat16)
    lab5 = torch.zeros(5, dtype=torch.int64)
    for loss in ("out", "sincere"):
        value, stats, plan, gates, lab = ops.fused_fwd_op(
            z, lab5, 2, loss, 2.0, 1.0, 1.0, 0.0, False, 0.1
        )
        assert value.shape == () and value.dtype == torch.float32
        assert stats.shape == (4, 10) and gates.dtype == torch.int32
        assert lab.shape == (10,) and lab.dtype == torch.int64
        g = torch.empty(())
        dz = ops.fused_bwd_op(g, z, lab, stats, plan, gates, loss, 2.0, 1.0, 1.0, 0.0, False, 0.1)
        assert dz.shape == (10, 7) and dz.dtype == torch.bfloat16
print("ok")
"""


def test_fused_ops_on_fake_tensors():
    """What torch.compile traces: the launchers on fake tensors (launches skipped). Without the
    interpreter, in a subprocess (the kernels are decorated at import under one setting)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run(
        [sys.executable, "-c", _FAKE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


_RECOMPILE_SCRIPT = """
import torch, triton
from triton.backends.compiler import GPUTarget


class _Target:  # torch.compile traces the Triton launches for a GPU target; nothing runs
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):
        raise RuntimeError(name)


triton.runtime.driver.set_active(_Target())
import flashcon
import flashcon.engine as E
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

E.resolve_backend = lambda backend, device: "triton"  # CPU tensors, traced only
compiles = [0]


def backend(gm, example):
    compiles[0] += 1
    boxed = lambda g, e: make_boxed_func(g.forward)
    return aot_module_simplified(gm, example, fw_compiler=boxed, bw_compiler=boxed)


for name, fn in (
    ("supcon", lambda f, y: flashcon.supcon_loss(f, y, temperature=0.1)),
    ("sincere", lambda f, y: flashcon.sincere_loss(f, y)),
    ("tcl", lambda f, y: flashcon.tcl_loss(f, y)),
):
    torch._dynamo.reset()
    compiles[0] = 0
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    counts = []
    for b in (10, 13, 17):
        f = torch.nn.functional.normalize(torch.randn(b, 2, 16), dim=-1).requires_grad_(True)
        try:
            compiled(f, torch.randint(0, 3, (b,)))
        except RuntimeError as e:
            # Running the traced graph asks the stand-in driver for a device (there is no
            # GPU): that, and only that, is expected; the trace is what is counted.
            if str(e) != "get_current_device":
                raise
        counts.append(compiles[0])
    assert counts[0] >= 1 and counts == [counts[0]] * 3, (name, counts)
print("ok")
"""


def test_fused_losses_do_not_recompile_for_new_batch_sizes():
    """torch.compile(dynamic=True) traces the fused op once for every batch size: no float
    argument of the op depends on N (the mean's 1/N is taken on the device). Traced for an
    sm_90 target without a GPU, in a subprocess without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", _RECOMPILE_SCRIPT], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
