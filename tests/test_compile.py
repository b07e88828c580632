"""torch.compile: every loss traces into one graph, matches eager, and is shape-dynamic; with a
mask or a queue too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

import flashcon
from flashcon.testing import (
    LOSSES,
    assert_close,
    assert_rounding_bound,
    available_backends,
    loss_fn,
    make_inputs,
    value_and_grads,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import B, D, V, small_labels, small_queue, unit  # noqa: E402

BACKENDS = ["torch", *available_backends("cpu")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(loss, b, dtype=torch.float32):
    return make_inputs(loss, b, 2, 16, dtype=dtype, seed=b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_no_graph_breaks(loss, backend):
    fn = loss_fn(loss, backend)
    explanation = torch._dynamo.explain(fn)(**_inputs(loss, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_compiled_matches_eager_without_recompiling(loss, backend):
    fn = loss_fn(loss, backend)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    after_first = None
    for b in (6, 9, 13):  # only the batch size changes
        x = _inputs(loss, b)
        ref_val, ref_g = value_and_grads(fn, x)
        val, g = value_and_grads(compiled, x)
        assert_close(val, ref_val, atol=1e-6, rtol=1e-6, name="loss")
        for key in ref_g:
            assert_close(g[key], ref_g[key], atol=1e-6, rtol=1e-5, name=f"d{key}")
        after_first = counter.frame_count if after_first is None else after_first
    assert counter.frame_count == after_first, "recompiled when only the batch size changed"


def test_model_step_compiles_end_to_end_with_inductor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    crit = flashcon.SupConLoss(temperature=0.1, backend=BACKENDS[-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        z = torch.nn.functional.normalize(model(x), dim=-1)
        loss = crit(z.view(-1, 2, 8), y)
        loss.backward()
        opt.step()
        return loss.detach()

    compiled = torch.compile(step, fullgraph=False)
    x = torch.randn(32, 12)
    y = torch.randint(0, 4, (16,))
    eager_model = [p.detach().clone() for p in model.parameters()]
    first = compiled(x, y)
    later = [compiled(x, y) for _ in range(5)][-1]
    assert torch.isfinite(first) and later < first
    assert any(not torch.equal(a, b) for a, b in zip(eager_model, model.parameters()))


def test_loss_fullgraph_with_inductor():
    fn = loss_fn("supcon", BACKENDS[-1], temperature=0.1)
    x = _inputs("supcon", 8)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    ref_val, ref_g = value_and_grads(fn, x)
    val, g = value_and_grads(compiled, x)
    assert_close(val, ref_val, atol=1e-6, rtol=1e-6)
    assert_close(g["features"], ref_g["features"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_autocast_keeps_fp32_statistics(loss, backend):
    x = _inputs(loss, 7)
    feats = x["features"].detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = feats * 1.0  # an autocast region around the loss, as in a training step
        out = loss_fn(loss, backend)(**{**x, "features": h})
    assert out.dtype == torch.float32
    out.backward()
    assert feats.grad.dtype == feats.dtype
    ref = loss_fn(loss, backend)(**x)
    assert_close(out, ref, atol=1e-6, rtol=1e-6)


# Measured: loss within 1.4 fp32 units (torch; cpu 0.06), gradient 0.74 bf16 units.
AUTOCAST_ULPS = {"loss": 8, "grad": 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_features(backend):
    """bf16 features under autocast: an fp32 loss and a bf16 gradient, equal to the float64
    reference on the same (rounded) features: the loss to fp32 accuracy, the gradient to its
    rounding to bf16 (AUTOCAST_ULPS: measured counts)."""
    x = _inputs("supcon", 7)
    feats = x["features"].to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flashcon.supcon_loss(feats, x["labels"], backend=backend)
    assert out.dtype == torch.float32
    out.backward()
    assert feats.grad.dtype == torch.bfloat16
    f64 = feats.detach().double().requires_grad_(True)
    ref = flashcon.supcon_loss(f64, x["labels"], backend="reference")
    ref.backward()
    assert_rounding_bound(out, ref, dtype=torch.float32, ulps=AUTOCAST_ULPS["loss"], name="loss")
    assert_rounding_bound(feats.grad, f64.grad, dtype=torch.bfloat16, ulps=AUTOCAST_ULPS["grad"])


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) with a mask or a queue.


def _compiled_matches_eager(fn, f: torch.Tensor) -> int:
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    fc, fe = f.clone().requires_grad_(True), f.clone().requires_grad_(True)
    vc, ve = compiled(fc), fn(fe)
    vc.backward()
    ve.backward()
    assert_close(vc, ve, atol=1e-6, rtol=0, name="value")
    assert_close(fc.grad, fe.grad, atol=1e-6, rtol=0, name="gradient")
    return counter.frame_count


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_with_mask(backend):
    """(The mask's data checks run in eager mode only: under torch.compile they would be a
    data-dependent branch, which fullgraph tracing rejects.)"""
    mask = torch.rand(B, B, generator=torch.Generator().manual_seed(19))
    f = unit(B, V, D, seed=20, dtype=torch.float32)
    assert (
        _compiled_matches_eager(lambda f: flashcon.supcon_loss(f, None, mask, backend=backend), f)
        == 1
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["int", "soft", "multihot"])
def test_compile_with_queue(kind, backend):
    q = small_queue(kind, seed=21)
    y = small_labels(kind, seed=22)
    f = unit(B, V, D, seed=23, dtype=torch.float32)
    if kind == "soft":
        fn = lambda f: flashcon.genscl_loss(f, y, queue=q, backend=backend)  # noqa: E731
    else:
        fn = lambda f: flashcon.sincere_loss(f, y, queue=q, backend=backend)  # noqa: E731
    assert _compiled_matches_eager(fn, f) == 1
