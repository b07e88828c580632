"""Helpers for testing backends against the reference (used by flashcon's own tests)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from . import functional as F
from . import reference as R

LOSSES = ("supcon", "supcon_in", "supcon_one", "ntxent", "sincere", "genscl", "tcl", "esupcon")

# The option sets every backend's parity grid runs, per loss (defaults first).
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


# --------------------------------------------------------------------------------------------
# Which backends a test run must have. `make test` sets FLASHCON_REQUIRE=cpu,triton: the C++
# CPU extension and the Triton kernels (interpreted without a GPU) are built there, so a
# backend that fails to load is a failure, not a reason to run fewer tests.
# --------------------------------------------------------------------------------------------

REQUIRE_ENV = "FLASHCON_REQUIRE"


def required_backends() -> frozenset[str]:
    """Backends named in FLASHCON_REQUIRE (comma-separated: cpu, triton, cuda)."""
    names = os.environ.get(REQUIRE_ENV, "")
    return frozenset(n.strip() for n in names.split(",") if n.strip())


def backend_status(name: str) -> tuple[bool, str]:
    """(available, why not) of an optional backend: 'cpu' and 'cuda' (the C++ extension's
    CPU kernels, and its CUDA kernels being built) or 'triton' (the kernels import)."""
    from .engine import cpp_available, triton_available

    if name == "triton":
        return triton_available()
    if name in ("cpu", "cuda"):
        return cpp_available(name)
    raise ValueError(f"unknown optional backend {name!r}")


def missing_required_backends() -> list[str]:
    """One line per backend required by FLASHCON_REQUIRE that cannot run here."""
    out = []
    for name in sorted(required_backends()):
        ok, why = backend_status(name)
        if not ok:
            out.append(f"{name}: {why}")
    return out


def available_backends(*names: str) -> list[str]:
    """The optional backends among ``names`` that can run here, in order. A backend that
    FLASHCON_REQUIRE names but that cannot run raises, so a parametrised grid never shrinks
    silently (outside a required set a missing optional backend is left out)."""
    out = []
    required = required_backends()
    for name in names:
        ok, why = backend_status(name)
        if ok:
            out.append(name)
        elif name in required:
            raise RuntimeError(
                f"backend {name!r} is required ({REQUIRE_ENV}) but unavailable: {why}"
            )
    return out


def assert_close(
    actual: Tensor, expected: Tensor, *, atol: float, rtol: float, name: str = "value"
) -> None:
    """Like torch.testing.assert_close, but reports the worst coordinates and values."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}")
    if not torch.isfinite(a).all() and not torch.equal(torch.isfinite(a), torch.isfinite(e)):
        raise AssertionError(f"{name}: non-finite values where the reference is finite")
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = err > tol
    if bad.any():
        excess = (err - tol).flatten()
        worst = int(torch.argmax(excess))
        idx = (
            tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
            if a.dim()
            else ()
        )
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements out of tolerance "
            f"(atol={atol:g}, rtol={rtol:g}); worst at {idx}: got {a.flatten()[worst]:.10g}, "
            f"expected {e.flatten()[worst]:.10g} (|diff| = {err.flatten()[worst]:.3g}); "
            f"max |diff| = {err.max():.3g}"
        )


def assert_close_rel(actual: Tensor, expected: Tensor, rel: float, name: str = "value") -> None:
    """assert_close with rtol = rel and atol = rel · (largest finite |expected|): an error
    measured against the result's own scale (near-zero entries of a sum that cancels get the
    absolute slack of its largest entry)."""
    e = expected.detach()
    finite = e[torch.isfinite(e)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    assert_close(actual, expected, atol=rel * scale, rtol=rel, name=name)


# Unit roundoff (half an ulp at 1) of each dtype: a result rounded to that dtype is within
# u·|x| of its exact value.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def assert_rounding_bound(
    actual: Tensor, expected: Tensor, *, dtype: torch.dtype, ulps: float, name: str = "value"
) -> None:
    """max|actual − expected| ≤ ulps · u(dtype) · max|expected| (u: UNIT_ROUNDOFF): the error
    counted in units of ``dtype``'s rounding at the result's scale. The failure message gives
    the measured count, from which the test's ``ulps`` was set."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: non-finite values")
    unit = UNIT_ROUNDOFF[dtype] * max(e.abs().max().item(), 1e-30) if e.numel() else 1.0
    err = (a - e).abs()
    if err.numel() and err.max().item() > ulps * unit:
        worst = int(torch.argmax(err))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name}: max |diff| = {err.max():.3g} = {err.max() / unit:.3g} units of "
            f"{dtype} rounding at max|expected| = {e.abs().max():.3g} (allowed {ulps:g}); "
            f"worst at {idx}: got {a.flatten()[worst]:.10g}, expected {e.flatten()[worst]:.10g}"
        )


def make_inputs(
    loss: str,
    b: int,
    v: int,
    d: int,
    *,
    n_classes: int = 3,
    dtype: torch.dtype = torch.float64,
    norm: float | None = 1.0,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Random inputs of one loss: features [B, V, D] (or [B, D] when v == 0) and its extras."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, d) if v == 0 else (b, v, d)
    f = torch.randn(shape, generator=g, dtype=torch.float64)
    if norm is not None:
        f = norm * torch.nn.functional.normalize(f, dim=-1)
    out = {"features": f.to(dtype).to(device)}
    labels = torch.randint(0, n_classes, (b,), generator=g).to(device)
    if loss in ("supcon", "supcon_in", "supcon_one", "sincere", "tcl", "esupcon"):
        out["labels"] = labels
    if loss == "genscl":
        soft = torch.rand((b, max(v, 1), n_classes) if v > 1 else (b, n_classes), generator=g)
        out["soft_labels"] = soft.to(dtype).to(device)
    if loss == "esupcon":
        out["prototypes"] = (
            torch.randn(n_classes, d, generator=g, dtype=torch.float64).to(dtype).to(device)
        )
    return out


def loss_fn(loss: str, backend: str | None, **options) -> Callable[..., Tensor]:
    """A callable computing ``loss`` on make_inputs()' dict; backend None means the reference."""

    def call(features, labels=None, soft_labels=None, prototypes=None):
        kw = dict(options)
        if backend is not None:
            kw["backend"] = backend
        mod = R if backend is None else F
        if loss == "supcon":
            return mod.supcon_loss(features, labels, **kw)
        if loss == "supcon_in":
            return mod.supcon_loss(features, labels, variant="in", **kw)
        if loss == "supcon_one":
            return mod.supcon_loss(features, labels, contrast_mode="one", **kw)
        if loss == "ntxent":
            return mod.ntxent_loss(features, **kw)
        if loss == "sincere":
            return mod.sincere_loss(features, labels, **kw)
        if loss == "genscl":
            return mod.genscl_loss(features, soft_labels, **kw)
        if loss == "tcl":
            return mod.tcl_loss(features, labels, **kw)
        if loss == "esupcon":
            return mod.esupcon_loss(features, labels, prototypes, **kw)
        raise ValueError(loss)

    return call


def value_and_grads(fn: Callable[..., Tensor], inputs: dict) -> tuple[Tensor, dict]:
    """Loss value and gradients w.r.t. features (and prototypes) of fresh leaf copies."""
    leaves = {}
    for key, x in inputs.items():
        if key in ("features", "prototypes"):
            leaves[key] = x.detach().clone().requires_grad_(True)
        else:
            leaves[key] = x
    out = fn(**leaves)
    wrt = [leaves[k] for k in ("features", "prototypes") if k in leaves]
    grads = torch.autograd.grad(out, wrt)
    return out.detach(), {
        k: g for k, g in zip([k for k in ("features", "prototypes") if k in leaves], grads)
    }


def check_against_reference(loss: str, backend: str, x: dict, **options) -> None:
    """Value and gradients of ``backend`` equal the float64 reference's on ``x`` (float64)."""
    ref_val, ref_g = value_and_grads(loss_fn(loss, None, **options), x)
    val, g = value_and_grads(loss_fn(loss, backend, **options), x)
    assert_close(val, ref_val, atol=1e-10, rtol=1e-10, name="loss")
    for key in ref_g:
        assert_close(g[key], ref_g[key], atol=1e-10, rtol=1e-9, name=f"d{key}")


def label_extremes(loss: str, labels: str) -> dict:
    """Inputs where every label is the same ("same") or every sample its own class
    ("singleton": no positive anywhere; ESupCon then has a prototype per sample)."""
    x = make_inputs(loss, 9, 2, 5)
    if "labels" in x:
        x["labels"] = torch.zeros(9, dtype=torch.long) if labels == "same" else torch.arange(9)
        if loss == "esupcon":
            x["prototypes"] = torch.randn(9, 5, dtype=torch.float64)
    return x


# --------------------------------------------------------------------------------------------
# Distributed parity (used by tests/test_distributed.py; lives here so spawned workers can
# import it by name).
# --------------------------------------------------------------------------------------------

DIST_CASES = (
    ("supcon", {}),
    ("supcon_in", {}),
    ("supcon_one", {}),
    ("supcon_simclr", {}),
    ("ntxent", {}),
    ("sincere", {}),
    ("genscl", {}),
    ("genscl_per_view", {}),
    ("tcl", {}),
    ("esupcon", {}),
    ("esupcon_noproto", {"prototype_anchors": False}),
)


def dist_inputs(case: str, sizes: list[int], seed: int = 0) -> list[dict]:
    """Per-rank inputs of one distributed case (rank r has sizes[r] samples of 2 views)."""
    base = case.split("_")[0] if case not in ("supcon_in", "supcon_one") else case
    loss = {"supcon_simclr": "ntxent", "genscl_per_view": "genscl"}.get(case, base)
    loss = "esupcon" if case.startswith("esupcon") else loss
    total = make_inputs(loss, sum(sizes), 2, 6, n_classes=4, seed=seed)
    if case == "genscl_per_view":
        g = torch.Generator().manual_seed(seed + 1)
        total["soft_labels"] = torch.rand(sum(sizes), 2, 4, generator=g, dtype=torch.float64)
    out, start = [], 0
    for s in sizes:
        part = {}
        for key, x in total.items():
            part[key] = x if key == "prototypes" else x[start : start + s]
        out.append(part)
        start += s
    return out


def dist_loss(case: str, backend: str | None, **options) -> Callable[..., Tensor]:
    name = {
        "supcon_simclr": "supcon",
        "genscl_per_view": "genscl",
        "esupcon_noproto": "esupcon",
    }.get(case, case)
    fn = loss_fn(name, backend, **options)
    if case == "supcon_simclr":
        return lambda features, **kw: fn(features, labels=None)
    return fn


def _dist_worker(rank: int, world: int, init_file: str, out_file: str, backend: str, sizes):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for case, opts in DIST_CASES:
        x = dist_inputs(case, sizes)[rank]
        fn = dist_loss(case, backend, gather_distributed=True, **opts)
        val, grads = value_and_grads(fn, x)
        results[case] = (val, grads)
    torch.save(results, f"{out_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
