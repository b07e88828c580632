"""The loss modules: each forwards its options, its backend and ``queue=`` to the functional
loss; ESupConLoss's prototypes serve as a classifier."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import flashcon
from flashcon import MemoryQueue
from flashcon import reference as R
from flashcon.testing import assert_close, available_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oracle as O  # noqa: E402
from inputs import DT, B, D, V, unit  # noqa: E402

STREAMING = ["torch", *available_backends("cpu")]

_F = unit(B, V, D, seed=1)
_Y = torch.tensor([0, 1, 0, 2, 1, 1])
_SOFT = torch.rand(B, 3, generator=torch.Generator().manual_seed(2), dtype=DT)

# (module, functional, arguments after the features, one option with a non-default value)
MODULE_OPTIONS = [
    ("SupConLoss", "supcon_loss", (_Y,), {"temperature": 0.2}),
    ("SupConLoss", "supcon_loss", (_Y,), {"base_temperature": 0.3}),
    ("SupConLoss", "supcon_loss", (_Y,), {"contrast_mode": "one"}),
    ("SupConLoss", "supcon_loss", (_Y,), {"variant": "in"}),
    ("NTXentLoss", "ntxent_loss", (), {"temperature": 0.2}),
    ("SINCERELoss", "sincere_loss", (_Y,), {"temperature": 0.2}),
    ("GenSCLLoss", "genscl_loss", (_SOFT,), {"temperature": 0.2}),
    ("GenSCLLoss", "genscl_loss", (_SOFT,), {"base_temperature": 0.3}),
    ("TCLLoss", "tcl_loss", (_Y,), {"temperature": 0.2}),
    ("TCLLoss", "tcl_loss", (_Y,), {"k1": 3.0}),
    ("TCLLoss", "tcl_loss", (_Y,), {"k2": 2.0}),
    ("ESupConLoss", "esupcon_loss", (_Y,), {"temperature": 0.2}),
    ("ESupConLoss", "esupcon_loss", (_Y,), {"base_temperature": 0.3}),
    ("ESupConLoss", "esupcon_loss", (_Y,), {"prototype_anchors": False}),
]


def _module(name: str, options: dict, backend: str) -> torch.nn.Module:
    cls = getattr(flashcon, name)
    if name == "ESupConLoss":
        torch.manual_seed(5)
        return cls(3, D, dtype=DT, backend=backend, **options)
    return cls(backend=backend, **options)


def _functional(name: str, module: torch.nn.Module, args: tuple, **kw) -> torch.Tensor:
    fn = getattr(flashcon, name)
    if name == "esupcon_loss":
        return fn(_F, *args, module.prototypes, **kw)
    return fn(_F, *args, **kw)


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize(
    "module, functional, args, options",
    MODULE_OPTIONS,
    ids=[f"{m}-{next(iter(o))}" for m, _, _, o in MODULE_OPTIONS],
)
def test_module_forwards_option(module, functional, args, options, backend):
    crit = _module(module, options, backend)
    got = crit(_F, *args)
    same = _functional(functional, crit, args, backend=backend, **options)
    default = _functional(functional, crit, args, backend=backend)
    assert torch.equal(got, same)
    assert abs(float((got - default).detach())) > 1e-3, "the option did not change the loss"


@pytest.mark.parametrize(
    "module, functional, args",
    [
        ("SupConLoss", "supcon_loss", (_Y,)),
        ("NTXentLoss", "ntxent_loss", ()),
        ("SINCERELoss", "sincere_loss", (_Y,)),
        ("GenSCLLoss", "genscl_loss", (_SOFT,)),
        ("TCLLoss", "tcl_loss", (_Y,)),
        ("ESupConLoss", "esupcon_loss", (_Y,)),
    ],
)
def test_module_forwards_backend_and_queue(module, functional, args):
    q = MemoryQueue(8, D, dtype=DT, num_soft_classes=3 if module == "GenSCLLoss" else None)
    q.push(unit(4, D, seed=9), _SOFT[:4] if module == "GenSCLLoss" else _Y[:4])
    crit = _module(module, {}, "reference")
    assert torch.equal(crit(_F, *args), _functional(functional, crit, args, backend="reference"))
    with_queue = crit(_F, *args, queue=q)
    assert torch.equal(
        with_queue, _functional(functional, crit, args, backend="reference", queue=q)
    )
    assert abs(float(with_queue - crit(_F, *args))) > 1e-3, "the queue was not used"


def test_supcon_module_all_options_together():
    opts = {"temperature": 0.2, "base_temperature": 0.3, "contrast_mode": "one", "variant": "in"}
    crit = flashcon.SupConLoss(**opts, backend="reference")
    assert torch.equal(crit(_F, _Y), R.supcon_loss(_F, _Y, **opts))
    assert abs(float(crit(_F, _Y) - O.supcon(_F, _Y, **opts))) < 1e-13


def test_esupcon_module_classifier():
    crit = flashcon.ESupConLoss(4, D, temperature=0.25, dtype=DT)
    z = _F[:, 0]
    u = torch.nn.functional.normalize(crit.prototypes.detach(), dim=1)
    logits = crit.logits(z)
    assert_close(logits, z @ u.T / 0.25, atol=1e-14, rtol=0, name="logits")
    assert torch.equal(crit.predict(z), (z @ u.T).argmax(dim=1))
    crit(_F, _Y).backward()
    assert crit.prototypes.grad is not None and crit.prototypes.grad.abs().sum() > 0
