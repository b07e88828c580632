"""``make gpu-check`` without a GPU: its plan, time budget, step runner, summary and archive.

The GPU steps themselves (build, ``pytest -m gpu``, bench) need the GPU; everything that
decides what they run, stops them and reports them is checked here, with stand-ins for the
GPU steps and synthetic bench results.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

check = importlib.import_module("gpu_check")
report = importlib.import_module("report")


def _by_name(steps):
    return {s.name: s for s in steps}


@pytest.mark.parametrize("cap, arch", [((9, 0), "9.0"), ((8, 6), "8.6"), ((10, 0), "10.0")])
def test_build_targets_the_visible_gpu_only(cap, arch):
    steps = _by_name(check.plan_steps(cap, "python3", cores=16))
    build = steps["build"]
    assert build.cmd == ["python3", "setup.py", "build_ext", "--inplace", "--force"]
    assert build.env == {
        "TORCH_CUDA_ARCH_LIST": arch,
        "MAX_JOBS": "8",
        "FLASHCON_FORCE_CUDA": "1",
    }


def test_plan_runs_every_gpu_test_once_on_the_staged_package():
    steps = check.plan_steps((9, 0), "python3", cores=16)
    assert [s.name for s in steps] == ["build", "tests-triton", "backends", "tests-cuda"]
    s = _by_name(steps)
    triton, cuda = s["tests-triton"], s["tests-cuda"]
    for t in (triton, cuda):
        assert t.cmd[:4] == ["python3", "-m", "pytest", "tests"]
        assert t.cmd[t.cmd.index("-m", 3) + 1] == "gpu"
        assert t.junit == f"pytest/{t.name}.xml"
        assert t.env["PYTHONPATH"].split(":")[0] == str(check.SITE)
    # The two selections partition the gpu tests: the second is the first's complement.
    first, second = (t.cmd[t.cmd.index("-k") + 1] for t in (triton, cuda))
    assert first == check.TRITON_TESTS and second == f"not ({first})"
    assert triton.env["FLASHCON_REQUIRE"] == "triton"
    assert cuda.env["FLASHCON_REQUIRE"] == "triton,cuda"
    # Nothing reinstalls anything: no pip, no .venv.
    for step in steps:
        assert "pip" not in step.cmd and not any(".venv" in c for c in step.cmd)


def test_bench_sweeps_cover_the_asked_points():
    supcon = {s.dtype: s for s in check.SWEEPS if s.loss == "supcon" and s.required}
    assert set(supcon) == {"bfloat16", "float32"}
    for s in supcon.values():
        assert s.ns == (4096, 16384, 65536)
        assert set(s.providers) == {
            "flashcon-triton",
            "flashcon-triton-general",
            "flashcon-cuda",
            "reference",
            "reference-compile",
        }
        # Compiled dense runs right after the fused path: a short budget never drops it first.
        assert s.providers.index("reference-compile") == 1
    others = {s.loss: s for s in check.SWEEPS if s.loss != "supcon"}
    assert set(others) == {"ntxent", "sincere", "tcl"}
    for s in others.values():
        assert s.required and s.dtype == "bfloat16" and s.ns == (65536,)
        assert s.providers == ("flashcon-triton", "flashcon-triton-general")
    extra = {s.name: s for s in check.SWEEPS if not s.required}
    ab = extra.pop("supcon-bf16-schedule")  # the symmetric kernels' two schedules, A/B
    assert ab.providers == ("flashcon-triton", "flashcon-triton-tiles")
    assert extra and all(s.ns == (32768,) for s in extra.values())

    step = check.bench_step(check.SWEEPS[0], 95.0, Path("/o"), "python3")
    cmd = step.cmd
    assert cmd[cmd.index("--ns") + 1] == "4096,16384,65536"
    assert cmd[cmd.index("--budget") + 1] == "95"
    assert cmd[cmd.index("--out") + 1] == "/o/bench/supcon-bf16"
    assert step.limit_s == 95.0 + check.BENCH_OVERHEAD_S


def test_time_budget_fits_nine_minutes():
    assert check.DEADLINE_S + 5.0 <= 540.0
    assert check.nominal_s() <= check.DEADLINE_S - check.SUMMARY_S
    for name, limit in check.LIMITS.items():
        assert 0 < limit < check.DEADLINE_S / 2, name


def _simulate(left: float, need: dict[str, float] | None = None) -> dict[str, float]:
    """The budget each sweep gets when each takes ``need[name]`` seconds (default: all of its
    budget, the worst case) plus bench/run.py's overhead."""
    got = {}
    for i, sweep in enumerate(check.SWEEPS):
        budget = check.allot(check.SWEEPS, i, left)
        got[sweep.name] = budget
        if budget > 0:
            left -= min(budget, (need or {}).get(sweep.name, budget)) + check.BENCH_OVERHEAD_S
        assert left >= -1e-9, (sweep.name, left)
    return got


def test_allot_protects_the_required_sweeps_and_drops_the_optional_ones():
    required = [s for s in check.SWEEPS if s.required]
    planned = {s.name: s.planned_s for s in check.SWEEPS}
    # Sweeps that take their planned time, with time to spare: all of them run.
    plenty = _simulate(600.0, planned)
    assert all(plenty[s.name] >= s.planned_s for s in check.SWEEPS)
    # Each sweep taking all it is given: the later required ones still get their planned time.
    greedy = _simulate(600.0)
    assert all(greedy[s.name] >= s.planned_s for s in required)
    # Just the required sweeps' time: each gets its planned time, the optional ones nothing.
    need = sum(s.planned_s + check.BENCH_OVERHEAD_S for s in required)
    nominal = _simulate(need, planned)
    assert all(nominal[s.name] >= s.planned_s - 1e-9 for s in required)
    assert all(nominal[s.name] == 0 for s in check.SWEEPS if not s.required)
    # Short of time: the first sweep is cut, the later required ones keep their planned time.
    short = _simulate(need - 60.0)
    assert 0 < short["supcon-bf16"] < planned["supcon-bf16"]
    assert all(short[s.name] >= s.planned_s - 1e-9 for s in required[1:])
    # Almost nothing left: nothing is started with less than the minimum.
    assert all(v == 0 for v in _simulate(check.MIN_SWEEP_S).values())


def _step(name, code, limit):
    return check.Step(name, [sys.executable, "-c", code], limit)


def test_runner_stops_a_hung_step_with_sigint_first_and_goes_on(tmp_path):
    run = check.Runner(tmp_path, deadline_s=120.0)
    hung = _step(
        "hung",
        "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
        "    print('wrote what it had', flush=True)\n",
        2.0,  # time enough for the interpreter to start and enter the try
    )
    t = time.perf_counter()
    assert run.run(hung) is None
    assert time.perf_counter() - t < 9.0
    assert hung.status == "timeout" and "limit 2 s" in hung.note
    assert "wrote what it had" in run.log(hung).read_text()

    after = _step("after", "print('next step ran')", 30.0)
    assert run.run(after) == 0 and after.status == "ok"
    assert "next step ran" in run.log(after).read_text()
    failing = _step("failing", "raise SystemExit(3)", 30.0)
    assert run.run(failing) == 3 and failing.status == "failed" and failing.note == "exit 3"

    saved = json.loads((tmp_path / "steps.json").read_text())
    assert [(s["name"], s["status"]) for s in saved] == [
        ("hung", "timeout"),
        ("after", "ok"),
        ("failing", "failed"),
    ]


def test_runner_skips_steps_past_the_deadline(tmp_path):
    run = check.Runner(tmp_path, deadline_s=check.SUMMARY_S + 1.0)
    late = _step("late", "print('should not run')", 30.0)
    assert run.run(late) is None
    assert late.status == "skipped" and not run.log(late).exists()


def test_pytest_counts_from_junit_and_from_output(tmp_path):
    xml = tmp_path / "out.xml"
    xml.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        '<testsuite name="pytest" errors="1" failures="2" skipped="3" tests="70" time="9.1">'
        '<testcase classname="t" name="a" time="0.1"/></testsuite></testsuites>'
    )
    want = {"passed": 64, "failed": 2, "errors": 1, "skipped": 3}
    assert check.pytest_counts(xml) == want
    # A run stopped before it wrote its XML: the counts of its last summary line.
    log = "..F.\n== 2 failed, 64 passed, 3 skipped, 1 error in 95.10s (0:01:35) ==\n"
    assert check.pytest_counts(tmp_path / "missing.xml", log) == want
    assert check.pytest_counts(None, "collecting ...\n!!! KeyboardInterrupt !!!\n") is None


def _point(provider, n, ms, *, loss="supcon", dtype="bfloat16", peak=10.0, status="ok"):
    if status != "ok":
        return {"provider": provider, "N": n, "M": n, "status": status, "note": "CUDA OOM"}
    flops = 8.0 * n * n * 128
    return {
        "provider": provider,
        "N": n,
        "M": n,
        "status": "ok",
        "note": "",
        "fwdbwd_ms_p50": ms,
        "peak_mb": peak,
        "fwdbwd_gflops": flops / (ms * 1e-3) / 1e9,
        "loss_value": 4.5,
    }


def _write_bench(out, name, loss, dtype, rows, unavailable=()):
    report.add_comparisons(rows, {})
    meta = {"device": "cuda", "device_name": "Test GPU", "loss": loss, "dtype": dtype, "D": 128}
    folder = out / "bench" / name
    folder.mkdir(parents=True)
    report.write_csv(folder / f"{loss}_{dtype}.csv", meta, list(unavailable) + rows)


def _fake_run(out: Path) -> None:
    out.mkdir()
    info = {
        "date": "2026-11-27T09:00:00+00:00",
        "git_sha": "0123456789ab",
        "device_name": "Test GPU",
        "capability": [9, 0],
        "memory_gib": 79.2,
        "sms": 132,
        "cpu_count": 16,
        "torch": "2.11.0+cu130",
        "torch_cuda": "13.0",
        "triton": "3.6.0",
        "nvcc": "13.0",
        "python": "3.12.3",
        "backends": {"triton": [True, ""], "cuda": [False, "not built"], "cpu": [True, ""]},
        "wall_s": 431.0,
        "deadline_s": 470.0,
    }
    (out / "info.json").write_text(json.dumps(info))
    tests = check.Step("tests-triton", ["python3", "-m", "pytest", "-k", "triton"], 150.0)
    tests.junit, tests.status, tests.seconds = "pytest/tests-triton.xml", "failed", 95.0
    (out / "pytest").mkdir()
    (out / "pytest" / "tests-triton.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2"'
        ' skipped="3" tests="70" time="95.0"/></testsuites>'
    )
    cut = check.Step("tests-cuda", ["python3", "-m", "pytest", "-k", "not triton"], 100.0)
    cut.junit, cut.status, cut.seconds = "pytest/tests-cuda.xml", "timeout", 100.0
    (out / "logs").mkdir()
    (out / "logs" / "tests-cuda.log").write_text("....\n= 1 failed, 40 passed in 99.1s =\n")
    check.save_steps(out, [tests, cut])

    gone = {"provider": "flashcon-cuda", "status": "unavailable", "note": "not built"}
    _write_bench(
        out,
        "supcon-bf16",
        "supcon",
        "bfloat16",
        [
            _point("flashcon-triton", 4096, 2.0),
            _point("reference-compile", 4096, 1.0, peak=448.0),
            _point("reference", 4096, 4.0, peak=900.0),
            _point("flashcon-triton", 65536, 30.0),
            _point("reference-compile", 65536, 24.0),
            _point("reference", 65536, 0, status="oom"),
        ],
        [gone],
    )
    _write_bench(
        out,
        "ntxent-bf16",
        "ntxent",
        "bfloat16",
        [_point("flashcon-triton", 65536, 45.0, loss="ntxent")],
    )


def test_summary_from_the_run_files(tmp_path, capsys):
    out = tmp_path / "gpu-check"
    _fake_run(out)
    text = check.summarize(out)
    assert (out / "summary.md").read_text() == text
    for fact in ("Test GPU", "sm_90", "2.11.0+cu130", "Triton 3.6.0", "nvcc 13.0", "0123456789ab"):
        assert fact in text, fact
    assert "2026-11-27T09:00:00+00:00" in text and "cuda no (not built)" in text

    # pytest counts: from the JUnit file, and from the log of a step stopped at its limit.
    assert "| tests-triton | `triton` | 64 | 2 | 1 | 3 | 95 | failed |" in text
    assert "| tests-cuda | `not triton` | 40 | 1 | 0 | 0 | 100 | timeout |" in text

    # One row per point, TFLOP/s on the 8·N²·D model, speed-ups over both dense baselines.
    head = "| loss | dtype | N | provider | fwd+bwd ms | predicted ms | peak MB | TFLOP/s |"
    assert head in text
    tflops = 8.0 * 4096**2 * 128 / 2e-3 / 1e12
    row = "| supcon | bf16 | 4096 | flashcon-triton | 2 | — | 10 | "
    row += f"{tflops:.1f} | 2.00× | 0.50× | ok |"
    assert row in text
    assert text.count("| supcon | bf16 | 4096 | flashcon-triton |") == 1
    assert "| supcon | bf16 | 65536 | flashcon-triton | 30 | — | 10 |" in text
    assert "| — | 0.80× | ok |" in text  # no eager dense at 65536: it ran out of memory
    assert "| supcon | bf16 | 65536 | reference | — | — | — | — | — | — | oom: CUDA OOM |" in text
    # Rows in sweep order: the fused path, compiled dense, eager dense at each N, N ascending.
    lines = [ln for ln in text.splitlines() if ln.startswith("| supcon | bf16 |")]
    assert [ln.split(" | ")[2:4] for ln in lines] == [
        ["4096", "flashcon-triton"],
        ["4096", "reference-compile"],
        ["4096", "reference"],
        ["65536", "flashcon-triton"],
        ["65536", "reference-compile"],
        ["65536", "reference"],
    ]
    assert "ntxent / supcon (flashcon-triton, bf16, N=65536): 1.50" in text
    assert "Not run: flashcon-cuda (not built)." in text

    assert check.main(["--summarize", str(out)]) == 0
    assert capsys.readouterr().out.strip() == text.strip()

    tgz = tmp_path / "gpu-check.tgz"
    check.pack(out, tgz)
    with tarfile.open(tgz) as tar:
        names = tar.getnames()
    assert "gpu-check/summary.md" in names
    assert "gpu-check/bench/supcon-bf16/supcon_bfloat16.csv" in names


def test_summary_prints_the_cost_models_prediction_beside_the_measured_time(tmp_path):
    out = tmp_path / "gpu-check"
    _fake_run(out)
    info = json.loads((out / "info.json").read_text())
    (out / "info.json").write_text(json.dumps({**info, "device_name": "NVIDIA H200"}))
    pred = {
        "predictions": [
            {"loss": "supcon", "dtype": "bf16", "n": 4096, "gpu": "H200", "ms": 0.33},
            {"loss": "supcon", "dtype": "bf16", "n": 4096, "gpu": "H100", "ms": 9.0},
            {"loss": "supcon", "dtype": "fp32", "n": 65536, "gpu": "H200", "ms": 173.0},
        ],
        "calibration": [
            {"what": "fwd+bwd (fitted)", "n": 65536, "ms": 34.5, "pred_ms": 34.5, "ratio": 1.0}
        ],
    }
    (out / "cost_model.json").write_text(json.dumps(pred))
    text = check.summarize(out)
    # The H200's prediction for the Triton point; none for the dense baselines or other N.
    assert "| supcon | bf16 | 4096 | flashcon-triton | 2 | 0.33 | 10 |" in text
    assert "| supcon | bf16 | 4096 | reference | 4 | — |" in text
    assert "| supcon | bf16 | 65536 | flashcon-triton | 30 | — |" in text
    assert "fwd+bwd (fitted), N = 65536: measured 34.5 ms, predicted 34.5 ms (ratio 1.00)" in text


def test_cost_model_step_only_for_its_architectures(tmp_path):
    step = check.cost_step((9, 0), tmp_path, "python3")
    assert step.cmd[:5] == ["python3", "-m", "flashcon.tools.cost_model", "--archs", "90"]
    assert step.cmd[-2:] == ["--json", str(tmp_path / "cost_model.json")]
    assert check.cost_step((8, 0), tmp_path, "python3") is None


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "gc"
    assert check.main(["--dry-run", "--capability", "8.0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "TORCH_CUDA_ARCH_LIST=8.0 MAX_JOBS=8 FLASHCON_FORCE_CUDA=1" in text
    assert "build_ext --inplace --force" in text
    for sweep in check.SWEEPS:
        assert f"--loss {sweep.loss} --dtype {sweep.dtype}" in text
        assert f"--out {out}/bench/{sweep.name}" in text
    assert f"pack {out}.tgz" in text


def test_stage_has_the_installed_layout(tmp_path):
    site = tmp_path / "site"
    check.stage(site)
    assert (site / "flashcon" / "__init__.py").exists()
    assert (site / "flashcon" / "engine.py").exists()
    assert (site / "flashcon" / "triton_kernels" / "__init__.py").exists()
    assert not (site / "triton_kernels").exists()
    assert not list(site.rglob("*.so")) and not list(site.rglob("__pycache__"))
    check.stage(site)  # a second run replaces the first
    assert (site / "flashcon" / "__init__.py").exists()


def test_out_folder_of_another_kind_is_left_alone(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        check.prepare_out(other)
    assert (other / "notes.txt").read_text() == "keep"

    earlier = tmp_path / "gpu-check"
    earlier.mkdir()
    (earlier / "steps.json").write_text("[]")
    (earlier / "summary.md").write_text("old")
    check.prepare_out(earlier)
    assert earlier.is_dir() and not any(earlier.iterdir())


def _make_dry_run(*args: str) -> subprocess.CompletedProcess:
    # Under `make test` this runs inside make: without MAKEFLAGS/MAKELEVEL and with
    # --no-print-directory the nested make prints only the recipe.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", "-n", "gpu-check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_target_uses_the_system_python(tmp_path):
    proc = _make_dry_run(f"GPU_CHECK_OUT={tmp_path}/x")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.strip().splitlines()[-1]
    assert cmd.startswith("python3 tools/gpu_check.py") and f"{tmp_path}/x" in cmd
    assert ".venv" not in proc.stdout
    custom = _make_dry_run("GPU_PY=/opt/py/bin/python3")
    assert custom.stdout.strip().splitlines()[-1].startswith("/opt/py/bin/python3 tools/")


FAKE_BENCH = """
import sys
sys.path.insert(0, {bench!r})
import report
out = sys.argv[1]
import os
os.makedirs(out, exist_ok=True)
row = {{"provider": "flashcon-triton", "N": 4096, "M": 4096, "status": "ok",
        "fwdbwd_ms_p50": 2.0, "peak_mb": 10.0, "fwdbwd_gflops": 8589.9}}
meta = {{"device": "cuda", "device_name": "Fake GPU", "loss": sys.argv[2], "dtype": "bfloat16",
         "D": 128}}
report.write_csv(os.path.join(out, "points.csv"), meta, [row])
"""


def test_run_all_orders_the_steps_and_reports_them(tmp_path, monkeypatch):
    """The whole sequence with stand-ins for what needs a GPU (probe, build, backends, bench)
    and real pytest runs of a two-test suite, one per selection."""
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tests / "test_fake_gpu.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.gpu\n"
        "def test_triton_path(): __import__('time').sleep(3.0)\n"
        "def test_cuda_path(): pass\n"
        "def test_cuda_other(): assert False\n"
    )
    py = sys.executable
    fake = {"cuda_available": True, "capability": [9, 0], "device_name": "Fake GPU", "cpu_count": 4}
    monkeypatch.setattr(check, "PROBE", f"import json; print(json.dumps({fake!r}))")
    monkeypatch.setattr(check, "SITE", tmp_path / "site")
    monkeypatch.setattr(check, "install_extension", lambda: "fake library")
    real_plan = check.plan_steps

    def plan(*args, **kwargs):
        build, triton, backends, cuda = real_plan(*args, **kwargs)
        build.cmd = [py, "-c", "import time; time.sleep(0.5); print('built')"]
        backends.cmd = [py, "-c", 'print(\'{"triton": [true, ""], "cuda": [true, ""]}\')']
        return build, triton, backends, cuda

    monkeypatch.setattr(check, "plan_steps", plan)
    write = "import json, sys; open(sys.argv[1], 'w').write(json.dumps({'predictions': []}))"
    monkeypatch.setattr(
        check,
        "cost_step",
        lambda cap, out, py_: check.Step(
            "cost-model", [py, "-c", write, str(out / "cost_model.json")], 30.0
        ),
    )
    entry = {
        "choice": {"block": 64, "block_d": 128, "block_do": 0, "num_warps": 8,
                   "num_stages": 3, "resident": True, "chunk": 0, "maxnreg": True},
        "ms": 1.25, "default_ms": 1.5,
    }  # fmt: skip
    table = {"version": 1, "meta": {}, "entries": {"sm90|sym_fwd|bf16|d128|F|n65536": entry}}
    write_table = f"import sys; open(sys.argv[1], 'w').write({json.dumps(table)!r})"
    monkeypatch.setattr(
        check,
        "tune_step",
        lambda out, py_: check.Step("tune", [py, "-c", write_table, str(out / "tuned.json")], 30.0),
    )
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # a faster start, same counts
    sweeps = (
        check.Sweep("one", "supcon", "bfloat16", ("flashcon-triton",), (4096,), 15.0),
        check.Sweep("extra", "supcon", "bfloat16", ("flashcon-triton",), (4096,), 1000.0, False),
    )
    monkeypatch.setattr(check, "SWEEPS", sweeps)
    code = FAKE_BENCH.format(bench=str(ROOT / "bench"))
    monkeypatch.setattr(
        check,
        "bench_step",
        lambda sweep, budget, out, py_: check.Step(
            f"bench-{sweep.name}",
            [py, "-c", code, str(out / "bench" / sweep.name), sweep.loss],
            budget + check.BENCH_OVERHEAD_S,
        ),
    )

    out = tmp_path / "gc"
    check.prepare_out(out)
    rc = check.run_all(out, deadline_s=200.0, tests=str(tests))
    assert rc == 1  # one test fails
    steps = {s["name"]: s for s in json.loads((out / "steps.json").read_text())}
    assert list(steps) == [
        "probe",
        "stage",
        "build",
        "cost-model",
        "tests-triton",
        "backends",
        "tests-cuda",
        "tune",
        "bench-one",
        "bench-extra",
    ]
    # The build ran beside the Triton tests, and its time is its own (0.5 s), not theirs (a
    # 3 s test): timed as the step it is, not up to the join after them. Relative, not
    # absolute, so that a loaded machine's slow process starts do not matter.
    assert steps["build"]["start_s"] <= steps["tests-triton"]["start_s"]
    assert steps["tests-triton"]["seconds"] >= 3.0
    assert steps["build"]["seconds"] < steps["tests-triton"]["seconds"] - 1.0
    assert steps["build"]["status"] == "ok" and steps["build"]["note"] == "fake library"
    assert steps["tests-triton"]["status"] == "ok" and steps["tests-cuda"]["status"] == "failed"
    assert steps["bench-one"]["status"] == "ok"
    assert steps["bench-extra"]["status"] == "skipped"
    assert steps["cost-model"]["status"] == "ok" and (out / "cost_model.json").exists()
    # The tuned table reached the stage (the sweeps' launchers read it) before the sweeps.
    assert steps["tune"]["status"] == "ok" and steps["tune"]["note"] == "1 keys tuned"
    staged = tmp_path / "site" / "flashcon" / "triton_kernels" / "tuned.json"
    assert json.loads(staged.read_text()) == table
    assert steps["tune"]["start_s"] < steps["bench-one"]["start_s"]
    assert (tmp_path / "site" / "flashcon" / "__init__.py").exists()

    # The counts of a real pytest run read the same from its JUnit file and from its output.
    for name in ("tests-triton", "tests-cuda"):
        log = (out / "logs" / f"{name}.log").read_text()
        assert check.pytest_counts(None, log) == check.pytest_counts(out / "pytest" / f"{name}.xml")

    text = check.summarize(out)
    assert "| tests-triton | `triton or available or auto` | 1 | 0 | 0 | 0 |" in text
    assert "| tests-cuda | `not (triton or available or auto)` | 1 | 1 | 0 | 0 |" in text
    assert "| supcon | bf16 | 4096 | flashcon-triton | 2 | — | 10 | 8.6 |" in text
    assert "backends: triton yes, cuda yes" in text
    assert "| `sm90 sym_fwd bf16 d128 F n65536` | 1.25 | 1.5 | block=64," in text
