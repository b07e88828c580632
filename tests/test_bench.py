"""The benchmark CLI: ``bench/run.py --quick`` produces its table, CSV and plots; the table's
rows, units and comparisons (``bench/report.py``)."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not RUN.exists(), reason="bench/run.py is not in this checkout")
def test_quick_run(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # One N, the providers the checks below read, the reference first: a busy machine still
    # measures every point within the budget.
    providers = "reference,flashcon-torch,flashcon-cpu,flashcon-cpu-general"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--device", "cpu", "--out", str(tmp_path)]
        + ["--providers", providers, "--ns", "256", "--budget", "100"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The markdown table is printed and written, one row per point, GFLOP/s on a CPU.
    assert "| provider | N |" in proc.stdout
    stem = "supcon_cpu_float32_d128_quick"
    md = (tmp_path / f"{stem}.md").read_text()
    for text in (md, proc.stdout):
        assert "| peak MB | GFLOP/s | of mm | vs eager dense | vs compiled dense |" in text
    for name in ("| reference | 256 |", "| flashcon-torch | 256 |"):
        assert name in md and proc.stdout.count(name) == 1

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


def test_points_skipped_for_budget_are_printed_once(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _run_module()
    argv = ["--quick", "--device", "cpu", "--providers", "torch,reference,triton"]
    argv += ["--budget", "0.01", "--no-progress", "--out", str(tmp_path)]
    assert run.main(argv) == 0  # the first size is measured whatever the budget
    out = capsys.readouterr().out
    # Each later point skipped for the budget is one line: its row of the table.
    skipped = [ln for ln in out.splitlines() if "budget:" in ln or "predicted" in ln]
    assert len(skipped) == 2, out
    for provider in ("flashcon-torch", "reference"):
        assert sum(ln.startswith(f"| {provider} | 512 | ") for ln in skipped) == 1, out
        assert sum(ln.startswith(f"| {provider} | 256 | ") for ln in out.splitlines()) == 1
    # An unavailable provider is named once, at the end, with the reason.
    assert out.count("flashcon-triton") == 1 and "not run: flashcon-triton (" in out
    rows = list(csv.DictReader(open(tmp_path / "supcon_cpu_float32_d128_quick.csv")))
    assert sorted((r["provider"], r["N"], r["status"]) for r in rows) == [
        ("flashcon-torch", "256", "ok"),
        ("flashcon-torch", "512", "budget"),
        ("flashcon-triton", "", "unavailable"),
        ("reference", "256", "ok"),
        ("reference", "512", "budget"),
    ]


def test_quick_run_compares_with_the_dense_loss(tmp_path, capsys):
    """The default quick run (no --providers) measures the fused loss of 'auto''s backend and
    the eager dense loss in this process, and prints the ratio; it records the CPU threads
    and the import cost of flashcon over torch."""
    pytest.importorskip("matplotlib")
    import torch

    import flashcon

    run = _run_module()
    argv = ["--quick", "--device", "cpu", "--ns", "256", "--no-progress", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    fused = f"flashcon-{flashcon.resolve_backend('auto', torch.device('cpu'))}"
    rows = report.read_csv(tmp_path / "supcon_cpu_float32_d128_quick.csv")
    assert sorted(r["provider"] for r in rows) == sorted([fused, "reference"])
    row = next(r for r in rows if r["provider"] == fused)
    assert row["status"] == "ok" and row["speedup_vs_reference"] > 0, row
    assert f"| {fused} | 256 |" in out and "×" in out.split(f"| {fused} | 256 |")[1].split("\n")[0]
    assert row["threads"] == torch.get_num_threads()
    assert row["import_torch_s"] > 0 and row["import_flashcon_s"] >= 0, row
    assert row["imports_triton"] in ("False", "True")
    assert "then import flashcon +" in out


def _ok(provider, n, ms, gflops):
    return {
        "provider": provider,
        "N": n,
        "status": "ok",
        "fwd_ms_p50": ms / 4,
        "bwd_ms_p50": 3 * ms / 4,
        "fwdbwd_ms_p50": ms,
        "peak_mb": 12.0,
        "fwdbwd_gflops": gflops,
        "loss_value": 4.25,
    }


def test_flop_rate_is_scaled_to_the_device():
    rows = [_ok("flashcon-triton", 65536, 47.3, 46443.2)]
    gpu = report.markdown_table(rows, "cuda")
    cpu = report.markdown_table(rows, "cpu")
    assert "| TFLOP/s |" in gpu and "GFLOP/s" not in gpu
    assert "| GFLOP/s |" in cpu and "TFLOP/s" not in cpu
    assert "| 46.4 |" in gpu and "| 46443.2 |" in cpu


def test_csv_keeps_gflops_with_the_unit_in_the_column_name(tmp_path):
    rows = [_ok("flashcon-triton", 65536, 47.3, 46443.2)]
    path = tmp_path / "x.csv"
    meta = {"device": "cuda", "loss": "supcon", "D": 128, "git_sha": "123456789012"}
    report.write_csv(path, meta, rows)
    header = path.read_text().splitlines()[0].split(",")
    assert {"fwd_gflops", "bwd_gflops", "fwdbwd_gflops", "mm_gflops"} <= set(header)
    back = report.read_csv(path)
    assert back[0]["fwdbwd_gflops"] == 46443.2 and back[0]["N"] == 65536
    assert back[0]["mm_gflops"] is None and back[0]["git_sha"] == "123456789012"


def test_speedups_over_eager_and_compiled_dense():
    rows = [
        _ok("flashcon-triton", 4096, 2.0, 100.0),
        _ok("reference", 4096, 4.0, 50.0),
        _ok("reference-compile", 4096, 1.0, 200.0),
        _ok("flashcon-triton", 8192, 6.0, 100.0),
        {"provider": "reference", "N": 8192, "status": "oom", "note": "out of memory"},
        _ok("reference-compile", 8192, 3.0, 200.0),
    ]
    rows[1]["loss_value"] = 4.0
    report.add_comparisons(rows, {4096: 400.0})
    fused = rows[0]
    assert fused["speedup_vs_reference"] == 2.0
    assert fused["speedup_vs_reference_compile"] == 0.5
    assert fused["frac_of_mm"] == 0.25
    assert fused["rel_diff_vs_reference"] == pytest.approx(0.0625)
    assert "speedup_vs_reference" not in rows[3]  # eager dense ran out of memory at 8192
    assert rows[3]["speedup_vs_reference_compile"] == 0.5
    table = report.markdown_table(rows, "cuda")
    assert "| 2.00× | 0.50× |" in table and "| — | 0.50× |" in table
    assert "| reference | 8192 | — |" in table and "oom: out of memory |" in table


def test_explicit_sizes_run_in_ascending_order():
    run = _run_module()
    args = run.parse_args(["--device", "cpu", "--ns", "65536,4096,16384,4096"])
    assert run.sizes(args) == [4096, 16384, 65536]
    args = run.parse_args(["--device", "cpu", "--min-n", "1024", "--max-n", "4096"])
    assert run.sizes(args) == [1024, 2048, 4096]


def test_one_tile_schedule_provider(monkeypatch):
    """flashcon-triton-tiles: the Triton symmetric path on its one-tile-pair schedule, set in
    the point's worker process before the loss runs; like every Triton provider it needs a
    CUDA device (the interpreter is not benchmarked)."""
    import providers
    import torch

    from flashcon.triton_kernels import config

    assert "flashcon-triton-tiles" in providers.PROVIDERS
    ok, why = providers.availability("flashcon-triton-tiles", "supcon", torch.device("cpu"))
    assert not ok and "CUDA" in why
    monkeypatch.setenv(config.SCHEDULE_ENV, "runs")  # restored (unset) after the test
    fn = providers.make_loss_fn("flashcon-triton-tiles", "supcon")
    assert os.environ[config.SCHEDULE_ENV] == "tiles"
    assert fn.keywords["backend"] == "triton"
    assert fn.func.__name__ == "supcon_loss"
