"""The ahead-of-time kernel report compiles (sm_80/sm_90, no GPU needed) and comes out clean.

The test runs a quick subset (one architecture, one dtype, the heaviest flag set); the full
report (``python -m flashcon.tools.kernel_report``) covers every specialisation and is run by
hand and in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernel_report_quick(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "flashcon.tools.kernel_report", "--quick", "--arch", arch,
           "--dtype", "bf16", "-j", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "0 failing" in proc.stdout, out[-6000:]
    # One row per specialisation, each with tensor-core instructions.
    rows = [line for line in proc.stdout.splitlines() if f"sm_{arch}" in line]
    assert rows and all(" ok" in line for line in rows), out[-6000:]
