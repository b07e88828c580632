"""Which backend and which path a loss runs: ``backend='auto'`` is the C++ CPU backend for CPU
tensors (the torch backend where it is not built); ``FLASHCON_SYMMETRIC=0`` turns the symmetric
path off on the kernel backends (C++ CPU, Triton through its interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashcon
from flashcon.testing import available_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import B, D, V, unit  # noqa: E402

CPU = available_backends("cpu")
TRITON = available_backends("triton")


class _OpNames(TorchDispatchMode):
    """Records the names of the flashcon ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("flashcon."):
            self.names.add(str(func).split(".")[1])
        return func(*args, **(kwargs or {}))


_SYM_SCRIPT = """
import json, sys, torch, flashcon
from torch.utils._python_dispatch import TorchDispatchMode

class Names(TorchDispatchMode):
    names = set()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("flashcon."):
            Names.names.add(str(func).split(".")[1])
        return func(*args, **(kwargs or {}))

g = torch.Generator().manual_seed(11)
f = torch.nn.functional.normalize(torch.randn(20, 2, 6, generator=g), dim=-1)
y = torch.arange(20) % 3
ref = flashcon.reference.supcon_loss(f.double(), y)
out = {"enabled": flashcon.engine.symmetric_enabled()}
for backend in sys.argv[1:]:
    Names.names = set()
    x = f.clone().requires_grad_(True)
    with Names():
        v = flashcon.supcon_loss(x, y, backend=backend)
        v.backward()
    out[backend] = [sorted(Names.names), abs(float(v) - float(ref))]
print(json.dumps(out))
"""


def _sym_report(env_value: str | None) -> dict:
    """In a fresh process: whether the symmetric path is on, the flashcon ops an 'all'-mode
    SupCon ran on each kernel backend, and its error against the reference."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FLASHCON_SYMMETRIC", None)
    if env_value is not None:
        env["FLASHCON_SYMMETRIC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _SYM_SCRIPT, *CPU, *TRITON],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (CPU or TRITON), reason="no kernel backend with a symmetric path")
def test_flashcon_symmetric_env_switch():
    off = _sym_report("0")
    assert off["enabled"] is False
    before = flashcon.engine.symmetric_enabled()
    flashcon.engine.set_symmetric(True)  # this process: the switch's default
    try:
        for backend in [*CPU, *TRITON]:
            names, err = off[backend]
            # The symmetric path's ops: sym_* (and Triton's whole-loss fused_*, built on it).
            assert names and not any("sym" in n or "fused" in n for n in names), (backend, names)
            assert err < 1e-5, (backend, err)
            rec = _OpNames()
            f = unit(20, 2, 6, seed=11, dtype=torch.float32).requires_grad_(True)
            with rec:
                flashcon.supcon_loss(f, torch.arange(20) % 3, backend=backend).backward()
            assert any("sym" in n or "fused" in n for n in rec.names), (backend, rec.names)
    finally:
        flashcon.engine.set_symmetric(before)


def test_auto_backend_is_cpu_for_cpu_tensors():
    expected = "cpu" if CPU else "torch"
    assert flashcon.resolve_backend("auto", torch.device("cpu")) == expected
    f = unit(B, V, D, seed=12, dtype=torch.float32)
    y = torch.tensor([0, 1, 0, 2, 1, 1])
    for loss, args in [("supcon_loss", (y,)), ("sincere_loss", (y,)), ("ntxent_loss", ())]:
        rec = _OpNames()
        fa = f.clone().requires_grad_(True)
        with rec:
            va = getattr(flashcon, loss)(fa, *args)
            va.backward()
        fc = f.clone().requires_grad_(True)
        vc = getattr(flashcon, loss)(fc, *args, backend=expected)
        vc.backward()
        assert torch.equal(va, vc) and torch.equal(fa.grad, fc.grad)
        assert rec.names, "no flashcon op ran"
        if expected == "cpu":  # the C++ ops: neither torch_* nor triton_*
            assert not any(n.startswith(("torch_", "triton_")) for n in rec.names), rec.names
        else:
            assert all(n.startswith("torch_") for n in rec.names), rec.names
