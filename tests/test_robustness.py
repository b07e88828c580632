"""Robustness: awkward layouts, non-finite input, numerics, property tests, determinism, leaks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashcon
from flashcon import MemoryQueue
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
from inputs import unit  # noqa: E402

BACKENDS = ["torch", *available_backends("cpu")]
ALL_BACKENDS = BACKENDS + available_backends("triton")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided", "channels_last_like"])
def test_non_contiguous_inputs_just_work(backend, layout):
    x = make_inputs("supcon", 6, 2, 8, dtype=torch.float32)
    f = x["features"]
    if layout == "transposed":
        g = f.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    elif layout == "strided":
        g = torch.zeros(6, 2, 16)[:, :, ::2]
        g.copy_(f)
    else:
        g = f.unsqueeze(-1).contiguous(memory_format=torch.contiguous_format).squeeze(-1)
        g = g.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert not g.is_contiguous() or layout == "channels_last_like"
    a = flashcon.supcon_loss(g, x["labels"], backend=backend)
    b = flashcon.supcon_loss(f.contiguous(), x["labels"], backend=backend)
    assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_give_nan(backend, loss, bad):
    """The API's guarantee (functional's finiteness check makes the loss NaN whatever the
    kernels return; test_ops_propagate_nan checks the kernels themselves)."""
    x = make_inputs(loss, 5, 2, 4, dtype=torch.float32)
    x["features"][2, 1, 3] = bad
    out = loss_fn(loss, backend)(**x)
    assert torch.isnan(out), out


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_prototypes_give_nan(backend):
    x = make_inputs("esupcon", 5, 2, 4, dtype=torch.float32)
    x["prototypes"][1, 0] = float("nan")
    assert torch.isnan(loss_fn("esupcon", backend)(**x))


# Measured on the interpreter and the C++ CPU kernels: a NaN key makes lse −inf ("no term")
# in every row, those it does not reach included; torch_stream gives NaN where it is a term.
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 1.0, 2.0)])
def test_ops_propagate_nan(backend, weights):
    """At the op level (no API check in between): a NaN in key row 2 makes lse NaN in every
    row where that key is a term (positives of class 0 for w_pos; every row for w_neg, k1),
    never −inf (the contract's 'no term') nor a finite number; sp is NaN where it is a
    positive, and never another finite number elsewhere."""
    from flashcon.engine import get_engine

    eng = get_engine(backend)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=1)
    ql, kl = torch.arange(6) % 2, torch.arange(7) % 2
    bad = k.clone()
    bad[2, 1] = float("nan")
    reached = (ql == 0) if weights[1] == 0 else torch.ones(6, dtype=torch.bool)
    lse = eng.lse(q, bad, ql, kl, -1, 10.0, *weights, False, None)[0]
    assert torch.isnan(lse[reached]).all(), lse
    eta = torch.zeros(6)
    sp = eng.sp(q, bad, ql, kl, eta, -1, 10.0, False, None)[0]
    clean = eng.sp(q, k, ql, kl, eta, -1, 10.0, False, None)[0]
    assert torch.isnan(sp[ql == 0]).all(), sp
    # Elsewhere unchanged, or NaN (torch_stream's masked sums spread it: 0·NaN).
    assert (torch.isnan(sp) | (sp == clean))[ql == 1].all(), (sp, clean)


def _rounded_ref(loss, x, opts):
    x64 = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}
    return value_and_grads(loss_fn(loss, None, **opts), x64)


NUMERIC_CASES = [
    ("tau0.05", {"temperature": 0.05}, 1.0),
    ("tau0.01", {"temperature": 0.01}, 1.0),
    ("norm100", {"temperature": 0.1}, 100.0),
]


# Units of rounding (assert_rounding_bound), measured over this grid (all backends): loss in
# fp32 units 14.6 from bf16 inputs (norm 100), 1.7 from fp16; ESupCon's loss 3760 and 299 (its
# prototypes are normalised in the input dtype, τ = 0.01); gradients 3.4 bf16 units, 2.4 fp16.
EXTREME_ULPS = {
    torch.bfloat16: {"loss": 64, "esupcon": 16384, "grad": 16},
    torch.float16: {"loss": 16, "esupcon": 2048, "grad": 16},
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case, opts, norm", NUMERIC_CASES, ids=[c[0] for c in NUMERIC_CASES])
@pytest.mark.parametrize("loss", ["supcon", "sincere", "tcl", "genscl", "esupcon"])
def test_low_precision_extremes(backend, dtype, case, opts, norm, loss):
    """Finite, and equal to the float64 reference on the same rounded inputs (fp32 statistics)."""
    if loss == "tcl":
        opts = {**opts, "k1": 10.0}
    x = make_inputs(loss, 12, 2, 16, dtype=dtype, norm=norm, seed=3)
    ref_val, ref_g = _rounded_ref(loss, x, opts)
    val, g = value_and_grads(loss_fn(loss, backend, **opts), x)
    assert torch.isfinite(val)
    # fp32 arithmetic on the rounded inputs: the loss within a few fp32 units of the float64
    # value, each gradient within its rounding to ``dtype`` plus fp32 noise.
    ulps = EXTREME_ULPS[dtype]
    loss_ulps = ulps["esupcon" if loss == "esupcon" else "loss"]
    assert_rounding_bound(val, ref_val, dtype=torch.float32, ulps=loss_ulps, name="loss")
    for key in ref_g:
        assert torch.isfinite(g[key]).all()
        assert_rounding_bound(g[key], ref_g[key], dtype=dtype, ulps=ulps["grad"], name=key)


EDGE = {
    "single_anchor": dict(b=1, v=0),
    "one_column_pair": dict(b=1, v=2),
    "no_positives": dict(b=6, v=0, n_classes=100),
    "all_equal": dict(b=7, v=2, n_classes=1),
}


EDGE_CASES = [
    pytest.param(edge, loss, id=f"{edge}-{loss}")
    for edge in EDGE
    for loss in LOSSES
    if not (loss == "ntxent" and EDGE[edge]["v"] == 0)  # NT-Xent needs [B, V, D] features
]


# atol = rtol; measured: float64 loss 1.9e-15, gradients 2.7e-15; fp32 (Triton) 1.0e-6, 1.4e-6.
EDGE_TOL = {torch.float64: 2e-14, torch.float32: 1e-5}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("edge, loss", EDGE_CASES)
def test_edge_batches(backend, edge, loss):
    p = dict(EDGE[edge])
    n_classes = p.pop("n_classes", 3)
    if edge == "no_positives":
        torch.manual_seed(0)
    dtype = torch.float32 if backend == "triton" else torch.float64
    x = make_inputs(loss, p["b"], p["v"], 5, n_classes=max(n_classes, 1), dtype=dtype)
    if edge == "no_positives" and "labels" in x:
        x["labels"] = torch.arange(p["b"])
        if loss == "esupcon":
            x["prototypes"] = torch.randn(p["b"], 5, dtype=dtype)
    ref_val, ref_g = _rounded_ref(loss, x, {})
    val, g = value_and_grads(loss_fn(loss, backend), x)
    assert torch.isfinite(val)
    tol = EDGE_TOL[dtype]
    assert_close(val, ref_val, atol=tol, rtol=tol)
    for key in ref_g:
        assert_close(g[key], ref_g[key], atol=tol, rtol=tol, name=f"d{key}")


# float64, atol = rtol. Measured over 500 draws of these parameters: loss 1.5e-14, gradients
# 1.6e-13 (TCL, unnormalised features). Logits reach ‖z‖²/τ ≈ 600 (d = 9, τ = 0.05), where
# eps_fp64 is 1.3e-13: 1e-12 is 8 units of that.
PROPERTY_TOL = 1e-12


@settings(
    max_examples=int(os.environ.get("FLASHCON_HYPOTHESIS_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    loss=st.sampled_from(LOSSES),
    backend=st.sampled_from(BACKENDS),
    b=st.integers(1, 10),
    v=st.integers(0, 3),
    d=st.integers(1, 9),
    n_classes=st.integers(1, 5),
    temperature=st.floats(0.05, 1.0),
    norm=st.sampled_from([None, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_property_backends_agree_with_reference(
    loss, backend, b, v, d, n_classes, temperature, norm, seed
):
    if loss == "ntxent" and v == 0:
        v = 2
    x = make_inputs(loss, b, v, d, n_classes=n_classes, norm=norm, seed=seed)
    opts = {"temperature": temperature}
    ref_val, ref_g = value_and_grads(loss_fn(loss, None, **opts), x)
    val, g = value_and_grads(loss_fn(loss, backend, **opts), x)
    assert_close(val, ref_val, atol=PROPERTY_TOL, rtol=PROPERTY_TOL, name="loss")
    for key in ref_g:
        assert_close(g[key], ref_g[key], atol=PROPERTY_TOL, rtol=PROPERTY_TOL, name=f"d{key}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_bitwise_deterministic_on_cpu(backend, loss):
    x = make_inputs(loss, 40, 2, 24, dtype=torch.float32)
    runs = [value_and_grads(loss_fn(loss, backend), x) for _ in range(3)]
    for val, g in runs[1:]:
        assert torch.equal(val, runs[0][0])
        for key in g:
            assert torch.equal(g[key], runs[0][1][key])


# The C++ CPU backend on every path (masks, multi-hot and soft labels, prototypes and a queue
# included): bitwise the same run to run at 2 threads, and the symmetric path ('all' mode) the
# same at 1 and 2 threads.
_DET_B = 150  # 300 rows: several tiles per row and column


def _det_cases() -> dict:
    g = torch.Generator().manual_seed(24)
    y = torch.randint(0, 5, (_DET_B,), generator=g)
    mh = torch.rand(_DET_B, 6, generator=g) < 0.3
    mask = torch.rand(_DET_B, _DET_B, generator=g)
    soft = torch.rand(_DET_B, 4, generator=g)
    p = torch.randn(5, 16, generator=g)
    q = MemoryQueue(64, 16)
    q.push(unit(32, 2, 16, seed=25, dtype=torch.float32), torch.randint(0, 5, (32,), generator=g))
    return {
        # 'all' mode: the symmetric path
        "supcon": (True, lambda f: flashcon.supcon_loss(f, y, backend="cpu")),
        "supcon_in": (True, lambda f: flashcon.supcon_loss(f, y, variant="in", backend="cpu")),
        "supcon_mask": (True, lambda f: flashcon.supcon_loss(f, None, mask, backend="cpu")),
        "supcon_multihot": (True, lambda f: flashcon.supcon_loss(f, mh, backend="cpu")),
        "ntxent": (True, lambda f: flashcon.ntxent_loss(f, backend="cpu")),
        "sincere": (True, lambda f: flashcon.sincere_loss(f, y, backend="cpu")),
        "genscl": (True, lambda f: flashcon.genscl_loss(f, soft, backend="cpu")),
        "tcl": (True, lambda f: flashcon.tcl_loss(f, y, backend="cpu")),
        # rectangular: the general path
        "supcon_one": (
            False,
            lambda f: flashcon.supcon_loss(f, y, contrast_mode="one", backend="cpu"),
        ),
        "supcon_queue": (False, lambda f: flashcon.supcon_loss(f, y, queue=q, backend="cpu")),
        "esupcon": (False, lambda f: flashcon.esupcon_loss(f, y, p, backend="cpu")),
    }


def _run_at(threads: int, fn, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fx = f.clone().requires_grad_(True)
        v = fn(fx)
        v.backward()
        return v.detach(), fx.grad
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("case", list(_det_cases()))
def test_cpu_bitwise_deterministic(case):
    symmetric, fn = _det_cases()[case]
    f = unit(_DET_B, 2, 16, seed=26, dtype=torch.float32)
    first = _run_at(2, fn, f)
    again = _run_at(2, fn, f)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), "run to run"
    if symmetric:  # README: "the symmetric path at any thread count"
        one = _run_at(1, fn, f)
        assert torch.equal(first[0], one[0]), "value differs between 1 and 2 threads"
        assert torch.equal(first[1], one[1]), "gradient differs between 1 and 2 threads"


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_leak_over_a_thousand_steps(backend):
    x = make_inputs("supcon", 32, 2, 16, dtype=torch.float32)
    f = x["features"].clone().requires_grad_(True)

    def step():
        f.grad = None
        flashcon.supcon_loss(f, x["labels"], backend=backend).backward()

    for _ in range(100):
        step()
    before = _rss_mb()
    for _ in range(1000):
        step()
    grown = _rss_mb() - before
    assert grown < 16, f"resident memory grew by {grown:.1f} MB over 1000 steps"
