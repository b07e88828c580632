"""Positives beyond one integer label: SupContrast's mask= and multi-hot labels, every backend
(in fp16 and bf16 too); multi-label ESupCon up to its 64 prototypes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import flashcon
from flashcon import MemoryQueue
from flashcon import reference as R
from flashcon.testing import assert_close, available_backends, value_and_grads

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oracle as O  # noqa: E402
from inputs import Bound  # noqa: E402

# Triton runs through its interpreter without a GPU.
BACKENDS = ["torch", *available_backends("cpu", "triton")]
STREAMING = [b for b in BACKENDS if b != "triton"]

# (atol, rtol) of the loss and of the gradients against the float64 reference. Measured on this
# file's grid (torch, cpu, Triton interpreter): fp32 loss |err| <= 2.9e-6 (relative 2.5e-7;
# 4.8e-7 where the loss is near 0), gradients |err| <= 2.0e-6; float64 loss 2.3e-11, gradients
# 1.8e-10 (relative 6.8e-9, multi-hot labels).
TOL = {
    torch.float64: ((1e-10, 1e-9), (1e-10, 1e-8)),
    torch.float32: ((5e-6, 2e-6), (1e-5, 1e-5)),
}


def _feats(b, v, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, d) if v == 0 else (b, v, d)
    f = torch.nn.functional.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    return f.to(dtype)


def _dtypes(backend):
    return [torch.float32] if backend == "triton" else [torch.float64, torch.float32]


def _check(fn_ours, fn_ref, inputs, dtype):
    ref_val, ref_g = value_and_grads(fn_ref, {k: _f64(x) for k, x in inputs.items()})
    val, g = value_and_grads(fn_ours, inputs)
    (atol, rtol), (g_atol, g_rtol) = TOL[dtype]
    assert_close(val, ref_val, atol=atol, rtol=rtol, name="loss")
    for key in ref_g:
        assert_close(g[key], ref_g[key], atol=g_atol, rtol=g_rtol, name=f"d{key}")


def _f64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _params():
    for backend in BACKENDS:
        for dtype in _dtypes(backend):
            yield pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend, dtype", list(_params()))
@pytest.mark.parametrize("variant", ["out", "in"])
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("b, v", [(1, 2), (5, 0), (7, 2), (9, 3)])
def test_supcon_mask(backend, dtype, variant, mode, b, v):
    g = torch.Generator().manual_seed(b * 10 + v)
    mask = torch.rand(b, b, generator=g, dtype=torch.float64)
    mask = mask * (torch.rand(b, b, generator=g) > 0.5)  # asymmetric weights, some zero rows
    mask = mask.to(dtype)
    opts = {"temperature": 0.1, "base_temperature": 0.07, "contrast_mode": mode, "variant": variant}
    _check(
        lambda features, mask: flashcon.supcon_loss(features, None, mask, backend=backend, **opts),
        lambda features, mask: R.supcon_loss(features, None, mask, **opts),
        {"features": _feats(b, v, 6, dtype), "mask": mask},
        dtype,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_mask_equals_labels(backend):
    f = _feats(8, 2, 5, torch.float32)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    mask = (y[:, None] == y[None, :]).float()
    a = flashcon.supcon_loss(f, None, mask, backend=backend)
    b = flashcon.supcon_loss(f, y, backend=backend)
    assert_close(a, b, atol=1e-6, rtol=1e-6)


def _multihot(b, n_lab, seed, density=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n_lab, generator=g) < density


LABEL_LOSSES = {
    "supcon": lambda mod, f, y, **kw: mod.supcon_loss(f, y, **kw),
    "supcon_in": lambda mod, f, y, **kw: mod.supcon_loss(f, y, variant="in", **kw),
    "supcon_one": lambda mod, f, y, **kw: mod.supcon_loss(f, y, contrast_mode="one", **kw),
    "sincere": lambda mod, f, y, **kw: mod.sincere_loss(f, y, **kw),
    "tcl": lambda mod, f, y, **kw: mod.tcl_loss(f, y, **kw),
}


@pytest.mark.parametrize("backend, dtype", list(_params()))
@pytest.mark.parametrize("loss", list(LABEL_LOSSES))
@pytest.mark.parametrize("b, v, n_lab", [(1, 2, 3), (6, 0, 5), (11, 2, 64), (7, 3, 2)])
def test_multilabel(backend, dtype, loss, b, v, n_lab):
    fn = LABEL_LOSSES[loss]
    _check(
        lambda features, labels: fn(flashcon, features, labels, backend=backend),
        lambda features, labels: fn(R, features, labels),
        {"features": _feats(b, v, 6, dtype, seed=b), "labels": _multihot(b, n_lab, b)},
        dtype,
    )


@pytest.mark.parametrize("backend, dtype", list(_params()))
@pytest.mark.parametrize("proto", [True, False])
def test_multilabel_esupcon(backend, dtype, proto):
    y = _multihot(9, 5, 3)
    protos = torch.randn(6, 7, dtype=torch.float64).to(dtype)
    opts = {"prototype_anchors": proto}
    _check(
        lambda features, labels, prototypes: flashcon.esupcon_loss(
            features, labels, prototypes, backend=backend, **opts
        ),
        lambda features, labels, prototypes: R.esupcon_loss(features, labels, prototypes, **opts),
        {"features": _feats(9, 2, 7, dtype), "labels": y, "prototypes": protos},
        dtype,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", list(LABEL_LOSSES))
def test_one_hot_multilabel_equals_class_labels(backend, loss):
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    f = _feats(7, 2, 5, torch.float32)
    fn = LABEL_LOSSES[loss]
    a = fn(flashcon, f, torch.nn.functional.one_hot(y, 4).bool(), backend=backend)
    b = fn(flashcon, f, y, backend=backend)
    assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_multilabel_queue_matches_reference():
    q = MemoryQueue(10, 6, multilabel=True, dtype=torch.float64)
    q.push(_feats(5, 2, 6, torch.float64, seed=3), _multihot(5, 4, 7))
    with pytest.raises(ValueError, match="multi-hot"):
        q.push(_feats(2, 0, 6, torch.float64), torch.tensor([0, 1]))
    f, y = _feats(6, 2, 6, torch.float64), _multihot(6, 4, 9)
    a = flashcon.supcon_loss(f, y, queue=q, backend="torch")
    b = R.supcon_loss(f, y, queue=q)
    assert_close(a, b, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="multi-hot"):
        flashcon.supcon_loss(f, torch.arange(6), queue=q, backend="torch")


def test_mask_rejects_queue_and_gather():
    f = _feats(4, 2, 5, torch.float32)
    q = MemoryQueue(4, 5)
    q.push(f, torch.arange(4))
    with pytest.raises(ValueError, match="queue"):
        flashcon.supcon_loss(f, None, torch.ones(4, 4), queue=q, backend="torch")
    # Rejected before any process group is needed (none exists here).
    with pytest.raises(ValueError, match="gather_distributed"):
        flashcon.supcon_loss(f, None, torch.ones(4, 4), gather_distributed=True, backend="torch")


# ---------------------------------------------------------------------------------------------
# Multi-label ESupCon: at most 64 prototypes.


@pytest.mark.parametrize("backend", ["reference", *STREAMING])
def test_multilabel_esupcon_64_prototypes(backend):
    y = _multihot(8, 64, 13, density=0.05)
    y[0, 63] = y[1, 63] = True  # label 63: the int64 sign bit of the bitmask
    y[2, :] = False
    y[2, 62] = True
    f = _feats(8, 2, 5, torch.float64, seed=14).requires_grad_(True)
    p = torch.randn(64, 5, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    p.requires_grad_(True)
    kw = {"backend": backend} if backend != "reference" else {}
    fn = R.esupcon_loss if backend == "reference" else flashcon.esupcon_loss
    value = fn(f, y, p, **kw)
    expected = O.esupcon(f, y, p)
    assert_close(value, expected, atol=4e-14, rtol=0, name="value")
    for g, e in zip(torch.autograd.grad(value, (f, p)), torch.autograd.grad(expected, (f, p))):
        assert_close(g, e, atol=4e-14, rtol=0, name="gradient")
    with pytest.raises(ValueError, match="64"):
        fn(f.detach(), y, torch.randn(65, 5, dtype=torch.float64), **kw)


# ---------------------------------------------------------------------------------------------
# Masks and multi-hot labels in fp16 and bf16: against the float64 reference on the same
# rounded inputs (features and mask). Measured worst absolute errors over these cases (losses
# ~6, gradients up to 1.34):
#   loss: fp16 8.9e-7, bf16 7.4e-7 (every backend; statistics are fp32);
#   gradient, fp16: torch/cpu 7.6e-4, triton 8.4e-4; bf16: torch/cpu 5.2e-3, triton 1.13e-2.
#   The dense reference in fp32 with its gradient rounded to the dtype: 4.7e-4 / 3.8e-3.
# Tolerances: loss 5e-6; gradient 2e-3 (fp16) and 2.5e-2 (bf16), 2.2-2.4× the worst measured.
LOWP_GRAD_TOL = {torch.float16: 2e-3, torch.bfloat16: 2.5e-2}

LOWP_CASES = {
    "supcon_mask": lambda m, f, y, mask: m.supcon_loss(f, None, mask, temperature=0.1),
    "supcon_in_one_mask": lambda m, f, y, mask: m.supcon_loss(
        f, None, mask, temperature=0.1, variant="in", contrast_mode="one"
    ),
    "supcon_multihot": lambda m, f, y, mask: m.supcon_loss(f, y, temperature=0.1),
    "sincere_multihot": lambda m, f, y, mask: m.sincere_loss(f, y, temperature=0.1),
    "tcl_multihot": lambda m, f, y, mask: m.tcl_loss(f, y, k1=3.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(LOWP_CASES))
def test_low_precision_masks_and_multihot(case, dtype, backend):
    fn = LOWP_CASES[case]
    b = 9
    f = _feats(b, 2, 8, dtype, seed=16).requires_grad_(True)
    g = torch.Generator().manual_seed(17)
    mask = (torch.rand(b, b, generator=g) * (torch.rand(b, b, generator=g) < 0.5)).to(dtype)
    y = _multihot(b, 5, 18, density=0.4)
    value = fn(Bound(backend), f, y, mask)
    assert value.dtype == torch.float32
    f64 = f.detach().double().requires_grad_(True)
    expected = fn(R, f64, y, mask.double())
    assert_close(value, expected, atol=5e-6, rtol=0, name="value")
    (grad,) = torch.autograd.grad(value, (f,))
    (eg,) = torch.autograd.grad(expected, (f64,))
    assert grad.dtype == dtype
    assert_close(grad, eg, atol=LOWP_GRAD_TOL[dtype], rtol=0, name="gradient")
