"""The ahead-of-time kernel report compiles (sm_80/sm_90, no GPU needed) and comes out clean.

The test runs the quick subset: the heaviest flag set of each kernel, bf16 and fp32 (fp16
compiles to the same tiles as bf16), sm_80 and sm_90. The full report (``python -m
flashcon.tools.kernel_report``, 7 to 25 minutes on two cores) covers every specialisation.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_kernel_report_quick():
    """Every kernel's heaviest flag set, bf16 and fp32, both architectures: clean."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "flashcon.tools.kernel_report", "--quick", "-j", "2"]
    cmd += ["--dtype", "bf16", "--dtype", "fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "0 failing" in proc.stdout, out[-6000:]
    lines = proc.stdout.splitlines()
    rows = [
        line
        for line in lines
        if line.startswith(("lse_", "sp_", "bwd_dq", "bwd_dk", "sym_fwd", "sym_bwd"))
    ]
    # The symmetric kernels' resident variants (a row block kept for a run of partners).
    for kernel in ("sym_fwd", "sym_bwd"):
        for arch in ("sm_80", "sm_90"):
            res = [r for r in rows if r.startswith(kernel) and "RESIDENT=1" in r and arch in r]
            assert len(res) >= 2, (kernel, arch, out[-6000:])
    # fused.py's small kernels (no tile products) are in the report too, clean.
    prefixes = ("prep_", "plan_", "finish_", "bwd_prep", "bwd_fin")
    small = [line for line in lines if line.startswith(prefixes)]
    assert len(small) >= 2 * 10 and all(" ok" in line for line in small), out[-6000:]
    assert len(rows) >= 16 and all(" ok" in line for line in rows), out[-6000:]
    # 16-bit tile products use tensor cores: HMMA on sm_80, HGMMA (or HMMA) on sm_90.
    for line in rows:
        if "[bf16" in line or "[fp16" in line:
            f = line.split()
            at = next(i for i, x in enumerate(f) if x.startswith("sm_"))
            hmma, hgmma = int(f[at + 4]), int(f[at + 5])
            assert hmma + hgmma > 0, line
