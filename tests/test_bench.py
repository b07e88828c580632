"""Smoke test of the benchmark CLI: ``bench/run.py --quick`` produces its table, CSV and plots."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"


@pytest.mark.skipif(not RUN.exists(), reason="bench/run.py is not in this checkout")
def test_quick_run(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The markdown table is printed and written.
    assert "| provider | N |" in proc.stdout
    stem = "supcon_cpu_float32_d128_quick"
    md = (tmp_path / f"{stem}.md").read_text()
    for name in ("| reference | 256 |", "| flashcon-torch | 256 |"):
        assert name in md and name in proc.stdout

    # The CSV has the run's tags and an ok row of both providers.
    with open(tmp_path / f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["git_sha"] and r["device_name"] and r["torch"] for r in rows)
    ok = {(r["provider"], r["N"]): r for r in rows if r["status"] == "ok"}
    for provider in ("reference", "flashcon-torch"):
        r = ok.get((provider, "256"))
        assert r is not None, f"no ok row of {provider} at N=256:\n{proc.stdout[-3000:]}"
        for key in ("fwd_ms_p50", "bwd_ms_p50", "fwdbwd_ms_p50", "peak_mb", "fwdbwd_gflops"):
            assert float(r[key]) >= 0, (provider, key, r[key])
        assert float(r["fwdbwd_ms_p20"]) <= float(r["fwdbwd_ms_p80"])
    # A backend with a symmetric path runs it and its general kernels as two providers.
    if ("flashcon-cpu", "256") in ok:
        assert ("flashcon-cpu-general", "256") in ok, proc.stdout[-3000:]
    # Every provider that ran computes the same loss as the reference.
    for r in ok.values():
        if r["rel_diff_vs_reference"]:
            assert float(r["rel_diff_vs_reference"]) < 1e-4, r["provider"]

    for suffix in ("_time.png", "_memory.png"):
        png = tmp_path / f"{stem}{suffix}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
