"""pytest-benchmark micro-benchmarks: forward and backward of every available backend.

    make bench-micro        # pytest bench/micro --benchmark-only

Fixed shapes (N = 1024 rows, D = 128, fp32; on CUDA when there is one). ``fwd`` times the
loss call with autograd recording; ``bwd`` times ``torch.autograd.grad`` of a loss computed
(untimed) in the round's setup. Backends that cannot run here are skipped with the reason.
Compare runs with pytest-benchmark's own ``--benchmark-autosave`` / ``--benchmark-compare``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashcon
from flashcon import reference
from flashcon.engine import BackendUnavailableError

N, D, K = 1024, 128, 100
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("triton", "cuda", "cpu", "torch", "reference")
LOSSES = ("supcon", "ntxent", "sincere", "genscl", "tcl", "esupcon")


def _inputs(loss: str) -> tuple[tuple, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(N, D, generator=g), dim=1)
    y = (torch.arange(N) % K)[torch.randperm(N, generator=g)]
    if loss == "ntxent":
        f = z.view(N // 2, 2, D).to(DEVICE).requires_grad_()
        return (f,), [f]
    f = z.to(DEVICE).requires_grad_()
    y = y.to(DEVICE)
    if loss == "genscl":
        return (f, F.one_hot(y, K).to(f.dtype)), [f]
    if loss == "esupcon":
        w = torch.randn(K, D, generator=g).to(DEVICE).requires_grad_()
        return (f, y, w), [f, w]
    return (f, y), [f]


def _loss_fn(backend: str, loss: str):
    if backend == "reference":
        return getattr(reference, f"{loss}_loss")
    if backend == "triton" and DEVICE.type != "cuda":
        pytest.skip("backend 'triton' is benchmarked on CUDA only")
    try:
        flashcon.resolve_backend(backend, DEVICE)
    except BackendUnavailableError as e:
        pytest.skip(str(e))
    fn = getattr(flashcon, f"{loss}_loss")
    return lambda *args: fn(*args, backend=backend)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fwd(benchmark, backend, loss):
    fn = _loss_fn(backend, loss)
    args, _ = _inputs(loss)
    benchmark.group = f"{loss}-fwd"

    def run():
        out = fn(*args)
        _sync()
        return out

    out = benchmark(run)
    assert torch.isfinite(out)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bwd(benchmark, backend, loss):
    fn = _loss_fn(backend, loss)
    args, params = _inputs(loss)
    benchmark.group = f"{loss}-bwd"

    def setup():
        out = fn(*args)
        _sync()
        return (out,), {}

    def run(out):
        grads = torch.autograd.grad(out, params)
        _sync()
        return grads

    fn(*args)  # warm-up (compilation, lazy initialisation)
    grads = benchmark.pedantic(run, setup=setup, rounds=10, warmup_rounds=1)
    assert all(torch.isfinite(g).all() for g in grads)
