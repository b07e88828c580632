"""``import flashcon`` on a machine without a GPU imports neither Triton nor Inductor; the
Triton backend is discovered on first demand and then works as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_SCRIPT = """
import json, sys
import torch
import flashcon
HEAVY = ("triton", "torch._inductor", "torch._dynamo")
heavy = lambda: sorted(m for m in HEAVY if m in sys.modules)
at_import = heavy()
cpu = flashcon.resolve_backend("auto", torch.device("cpu"))
after_cpu_call = heavy()
f = torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1)
flashcon.supcon_loss(f, torch.arange(8) % 3)
after_cpu_loss = heavy()
ok, why = flashcon.engine.triton_available()
cuda = flashcon.resolve_backend("auto", torch.device("cuda"))
print(json.dumps({"at_import": at_import, "after_cpu_call": after_cpu_call,
                  "after_cpu_loss": after_cpu_loss, "cpu": cpu, "triton": [ok, why],
                  "cuda": cuda, "after_triton": heavy()}))
"""


def _run(**env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", **env_extra)
    p = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_without_a_gpu_imports_no_triton():
    out = _run()
    assert out["at_import"] == [], out
    # CPU work never needs Triton.
    assert out["after_cpu_call"] == [] and out["after_cpu_loss"] == [], out
    # Asked for, the Triton backend is discovered, as it was at import before.
    assert out["triton"] == [True, ""], out
    assert out["cuda"] == "triton", out
    assert "triton" in out["after_triton"], out


def test_interpreter_discovers_triton_at_import():
    # TRITON_INTERPRET=1 runs the kernels on CPU tensors: discovered with the import.
    out = _run(TRITON_INTERPRET="1")
    assert "triton" in out["at_import"], out
