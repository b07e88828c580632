"""Every public entry point rejects bad input with an error a user can act on."""

from __future__ import annotations

import pytest
import torch

import flashcon
from flashcon import reference as R

F = torch.nn.functional.normalize(torch.randn(4, 2, 8), dim=-1)
Y = torch.tensor([0, 1, 0, 1])
P = torch.randn(3, 8)
SOFT = torch.rand(4, 3)

BACKENDS = ["reference", "torch"]


def _all_losses(mod, backend):
    kw = {} if mod is R else {"backend": backend}
    return {
        "supcon": lambda **o: mod.supcon_loss(o.pop("f", F), o.pop("y", Y), **o, **kw),
        "sincere": lambda **o: mod.sincere_loss(o.pop("f", F), o.pop("y", Y), **o, **kw),
        "tcl": lambda **o: mod.tcl_loss(o.pop("f", F), o.pop("y", Y), **o, **kw),
        "genscl": lambda **o: mod.genscl_loss(o.pop("f", F), o.pop("y", SOFT), **o, **kw),
        "esupcon": lambda **o: mod.esupcon_loss(o.pop("f", F), o.pop("y", Y), P, **o, **kw),
    }


def _cases(skip=()):
    for backend in BACKENDS:
        mod = R if backend == "reference" else flashcon
        for name, fn in _all_losses(mod, backend).items():
            if name not in skip:
                yield pytest.param(fn, id=f"{name}-{backend}")


CASES = list(_cases())


# SupCon takes SupContrast's [B, V, ...] (flattened; tests/test_dropins.py).
@pytest.mark.parametrize("fn", list(_cases(skip=("supcon",))))
def test_rank4_features(fn):
    with pytest.raises(ValueError, match="shape"):
        fn(f=torch.randn(2, 2, 2, 2))


@pytest.mark.parametrize("fn", CASES)
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"f": torch.randn(8)}, ValueError, "shape"),
        ({"f": torch.randn(0, 2, 8)}, ValueError, "empty"),
        ({"f": torch.randn(4, 2, 0)}, ValueError, "D = 0"),
        ({"f": torch.ones(4, 2, 8, dtype=torch.long)}, TypeError, "floating"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
    ],
    ids=["rank1", "empty", "d0", "int-features", "t0", "t-neg", "t-nan", "t-inf"],
)
def test_common_errors(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["supcon", "sincere", "tcl", "esupcon"])
def test_label_errors(backend, loss):
    mod = R if backend == "reference" else flashcon
    fn = _all_losses(mod, backend)[loss]
    with pytest.raises(ValueError, match="entries"):
        fn(y=torch.tensor([0, 1, 0]))
    if loss == "supcon":  # SupContrast's integral float labels are class ids; 0.5 is not
        with pytest.raises(ValueError, match="integral"):
            fn(y=torch.tensor([0.0, 0.5, 0.0, 1.0]))
    else:
        with pytest.raises(TypeError, match="integer"):
            fn(y=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="multi-hot bool"):
        fn(y=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B\]"):
        fn(y=torch.zeros(4, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="1 to 64"):
        fn(y=torch.zeros(4, 65, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows"):
        fn(y=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="on meta"):
        fn(y=Y.to("meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_mismatch(backend):
    mod = R if backend == "reference" else flashcon
    kw = {} if mod is R else {"backend": backend}
    with pytest.raises(ValueError, match="device|on meta"):
        mod.esupcon_loss(F, Y, P.to("meta"), **kw)
    with pytest.raises(ValueError, match="on meta"):
        mod.genscl_loss(F, SOFT.to("meta"), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tcl_negative_k(backend):
    mod = R if backend == "reference" else flashcon
    kw = {} if mod is R else {"backend": backend}
    with pytest.raises(ValueError, match="k1"):
        mod.tcl_loss(F, Y, k1=-1.0, **kw)
    with pytest.raises(ValueError, match="k2"):
        mod.tcl_loss(F, Y, k2=-0.5, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_label_errors(backend):
    mod = R if backend == "reference" else flashcon
    kw = {} if mod is R else {"backend": backend}
    with pytest.raises(ValueError, match="non-negative"):
        mod.genscl_loss(F, SOFT - 1.0, **kw)
    zero = SOFT.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match="all-zero"):
        mod.genscl_loss(F, zero, **kw)
    with pytest.raises(ValueError, match="rows"):
        mod.genscl_loss(F, torch.rand(5, 3), **kw)
    with pytest.raises(ValueError, match=r"\[B, V, K\]"):
        mod.genscl_loss(F, torch.rand(4, 3, 3), **kw)
    with pytest.raises(TypeError, match="floating"):
        mod.genscl_loss(F, torch.ones(4, 3, dtype=torch.long), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prototype_errors(backend):
    mod = R if backend == "reference" else flashcon
    kw = {} if mod is R else {"backend": backend}
    with pytest.raises(ValueError, match="width"):
        mod.esupcon_loss(F, Y, torch.randn(3, 7), **kw)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        mod.esupcon_loss(F, torch.tensor([0, 1, 3, 1]), P, **kw)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        mod.esupcon_loss(F, torch.tensor([0, -1, 2, 1]), P, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_choice_errors(backend):
    mod = R if backend == "reference" else flashcon
    kw = {} if mod is R else {"backend": backend}
    with pytest.raises(ValueError, match="contrast_mode"):
        mod.supcon_loss(F, Y, contrast_mode="two", **kw)
    with pytest.raises(ValueError, match="variant"):
        mod.supcon_loss(F, Y, variant="mid", **kw)
    with pytest.raises(ValueError, match="either labels or mask"):
        mod.supcon_loss(F, Y, torch.ones(4, 4), **kw)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        flashcon.supcon_loss(F, Y, backend="fast")


def test_unavailable_backend_says_why():
    with pytest.raises(flashcon.BackendUnavailableError, match="CUDA tensors"):
        flashcon.supcon_loss(F, Y, backend="cuda")


def test_ntxent_needs_views():
    with pytest.raises(ValueError, match=r"\[B, V, D\]"):
        flashcon.ntxent_loss(torch.randn(4, 8))


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="temperature"):
        flashcon.SupConLoss(temperature=0)
    with pytest.raises(ValueError, match="contrast_mode"):
        flashcon.SupConLoss(contrast_mode="x")
    with pytest.raises(ValueError, match="k1"):
        flashcon.TCLLoss(k1=-2)
    with pytest.raises(ValueError, match="num_classes"):
        flashcon.ESupConLoss(0, 8)
