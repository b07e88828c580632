"""Tests that need a CUDA GPU (marker `gpu`; skipped elsewhere). Run all with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

import flashcon
from flashcon.engine import cpp_available, triton_available
from flashcon.testing import LOSSES, assert_close, loss_fn, make_inputs, value_and_grads

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [
    b for b, ok in (("triton", triton_available()[0]), ("cuda", cpp_available("cuda")[0])) if ok
]


def _to(x, device, dtype=None):
    out = {}
    for k, t in x.items():
        t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t
    return out


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 tile products are compared against float64: keep cuBLAS's dense baseline in IEEE.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_some_gpu_backend_is_available():
    assert GPU_BACKENDS, "neither the Triton nor the CUDA extension backend can run on this GPU"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("b, v, d", [(1, 2, 7), (37, 2, 96), (130, 3, 130), (300, 2, 1024)])
def test_parity_fp32(backend, loss, b, v, d):
    x64 = make_inputs(loss, b, v, d, norm=1.0, seed=b)
    ref_val, ref_g = value_and_grads(loss_fn(loss, None, temperature=0.1), x64)
    x = _to(x64, "cuda", torch.float32)
    val, g = value_and_grads(loss_fn(loss, backend, temperature=0.1), x)
    # Triton's fp32 tile products may use TF32 (see triton_kernels): ~1e-3 relative on s.
    tol = 2e-3 if backend == "triton" else 1e-4
    assert_close(val.cpu(), ref_val, atol=tol, rtol=tol, name="loss")
    for key in ref_g:
        # An fp32 floor: some gradients are exactly 0 in float64 (B = 1: the only column is
        # the positive), where fp32 leaves ~1e-7.
        scale = ref_g[key].abs().max().item()
        atol = tol * scale + 1e-6
        assert_close(g[key].cpu(), ref_g[key], atol=atol, rtol=10 * tol, name=f"d{key}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("loss", LOSSES)
def test_low_precision_within_twice_torch_error(backend, dtype, loss):
    x = make_inputs(loss, 200, 2, 128, dtype=dtype, seed=5)
    x64 = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}
    opts = {"temperature": 0.1}
    gt_val, gt_g = value_and_grads(loss_fn(loss, None, **opts), x64)
    dense_val, dense_g = value_and_grads(loss_fn(loss, None, **opts), _to(x, "cuda"))
    val, g = value_and_grads(loss_fn(loss, backend, **opts), _to(x, "cuda"))
    atol = 1e-3
    err = (val.double().cpu() - gt_val).abs()
    assert err <= 2 * (dense_val.double().cpu() - gt_val).abs() + atol, (err, dense_val, gt_val)
    for key in gt_g:
        e = (g[key].double().cpu() - gt_g[key]).abs().max()
        e_dense = (dense_g[key].double().cpu() - gt_g[key]).abs().max()
        assert e <= 2 * e_dense + atol * gt_g[key].abs().max(), (key, e, e_dense)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("loss", ["supcon", "sincere", "tcl"])
def test_deterministic_bitwise(backend, loss):
    """Bitwise reproducible under torch.use_deterministic_algorithms (the Triton symmetric
    path adds with atomics and steps aside then; the CUDA kernels always are)."""
    x = _to(make_inputs(loss, 2048, 2, 128, dtype=torch.float32), "cuda")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [value_and_grads(loss_fn(loss, backend), x) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(before)
    for val, g in runs[1:]:
        assert torch.equal(val, runs[0][0])
        for key in g:
            assert torch.equal(g[key], runs[0][1][key]), "gradient differs between runs"


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="Triton is not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss", ["supcon", "sincere", "tcl"])
def test_triton_symmetric_path_matches_general(loss, dtype):
    """The tile-pair kernels (sym.py) against the general kernels at N = 4096 (NB = 64 or 128
    blocks), loss and gradient."""
    from flashcon import engine

    x = _to(make_inputs(loss, 2048, 2, 128, dtype=dtype, seed=7), "cuda")
    out = {}
    try:
        for sym in (True, False):
            engine.set_symmetric(sym)
            out[sym] = value_and_grads(loss_fn(loss, "triton", temperature=0.1), x)
    finally:
        engine.set_symmetric(True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close(out[True][0].float(), out[False][0].float(), atol=tol, rtol=tol, name="loss")
    for key in out[False][1]:
        want = out[False][1][key].float()
        atol = tol * want.abs().max().item()
        assert_close(out[True][1][key].float(), want, atol=atol, rtol=10 * tol, name=key)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_memory_is_linear_in_n(backend):
    n, d = 16384, 128
    f = torch.nn.functional.normalize(torch.randn(n // 2, 2, d, device="cuda"), dim=-1)
    f.requires_grad_(True)
    y = torch.randint(0, 100, (n // 2,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flashcon.supcon_loss(f, y, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # O(N·D): a few copies of the 8 MB features; the dense N×N logits alone are 1 GiB.
    assert extra < 16 * n * d * 4, f"peak extra {extra / 2**20:.1f} MiB"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_compiles_without_graph_breaks(backend, loss):
    torch._dynamo.reset()
    x = _to(make_inputs(loss, 64, 2, 32, dtype=torch.float32), "cuda")
    fn = loss_fn(loss, backend)
    explanation = torch._dynamo.explain(fn)(**x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, fullgraph=True)
    ref_val, ref_g = value_and_grads(fn, x)
    val, g = value_and_grads(compiled, x)
    assert_close(val, ref_val, atol=1e-5, rtol=1e-5)
    for key in ref_g:
        assert_close(g[key], ref_g[key], atol=1e-5, rtol=1e-4)


def test_auto_picks_a_gpu_kernel():
    assert flashcon.resolve_backend("auto", torch.device("cuda")) in ("triton", "cuda")
