"""``make gpu-check``: build, test, tune and benchmark flashcon on one CUDA GPU within 9 minutes.

    python3 tools/gpu_check.py                        # writes gpu-check/ and gpu-check.tgz
    python3 tools/gpu_check.py --out /tmp/gc --tgz "$OUT/gpu-check.tgz"
    python3 tools/gpu_check.py --dry-run              # the plan: steps, commands, time limits
    python3 tools/gpu_check.py --summarize gpu-check  # rebuild a run's summary.md from its files

For a machine with one CUDA GPU and a Python whose torch sees it, offline: nothing is
installed and torch is never touched (no .venv; pytorch-metric-learning, matplotlib and tqdm
are optional). The steps, each with its own time limit inside one deadline (``--deadline``),
so that a step that hangs cannot take the others' time:

1. ``probe``: torch, Triton, the GPU and its compute capability (in a subprocess: this
   process never initialises CUDA).
2. ``stage``: ``python/flashcon`` and ``triton_kernels/`` (as ``flashcon/triton_kernels``)
   copied into ``build/gpu-check/site``, first on ``PYTHONPATH`` of every later step — the
   layout ``pip install`` gives, without pip.
3. ``build``, in the background during step 4 (with ``cost-model``: the static cost model's
   predictions for this GPU's architecture, ``python -m flashcon.tools.cost_model``, printed
   beside the measured times): ``setup.py build_ext --inplace --force`` for
   the visible GPU only (``TORCH_CUDA_ARCH_LIST`` from its capability, ``MAX_JOBS=8``,
   ``FLASHCON_FORCE_CUDA=1``); the library is then copied into the stage and ``backends``
   records which backends load.
4. ``tests-triton``: ``pytest -m gpu -k "triton or available or auto"``, without the
   extension (it is still building).
5. ``tests-cuda``: every other ``gpu`` test, with the extension.
6. ``bench-*``: ``bench/run.py`` sweeps (see :data:`SWEEPS`), each given a time budget from
   what is left (:func:`allot`).
7. ``summary.md`` (also printed) from the steps' records (``steps.json``), the pytest JUnit
   files and the bench CSVs; the folder packed as one ``.tgz``.

bench/README.md argues the time budget from the timings of an H200 run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))  # bench/report.py: the bench's CSV reader and table helpers

import report  # noqa: E402

# The steps end by DEADLINE_S - SUMMARY_S, within 9 minutes (540 s of a lent GPU's 15; one
# command may run 10): the summary and the pack take about a second.
DEADLINE_S = 530.0
SUMMARY_S = 5.0
# A step past its limit gets SIGINT (pytest and bench/run.py then write what they have),
# and SIGKILL GRACE_S later.
GRACE_S = 10.0
MAX_JOBS = 8
SITE = ROOT / "build" / "gpu-check" / "site"
OUT_ENV = "GPU_CHECK_OUT"

# Time limits (s) of the fixed steps; the measured times of an H200 run in the comments.
LIMITS = {
    "probe": 60.0,  # torch import and CUDA initialisation: a few seconds
    "build": 200.0,  # 100 s for sm_90 with MAX_JOBS=8, beside the Triton tests
    "tests-triton": 150.0,  # 68 tests in 95 s with -n 6 (Triton's JIT fills ~/.triton)
    "backends": 60.0,  # one import
    "tests-cuda": 100.0,  # 60 tests in 62 s
    "cost-model": 120.0,  # ~12 sm_90 compiles of a few seconds each, two at a time
    "tune": 90.0,  # ~24 compiles in 8 processes, then ~50 timed candidates of 0.1-0.5 s
}
# The tuner's keys here (python -m flashcon.tools.tune): the LSE pass of SupCon / NT-Xent /
# SINCERE in bf16 and fp32 at the two large sizes, its timing within TUNE_BUDGET_S.
TUNE_ARGS = ("--families", "lse", "--ns", "16384", "65536", "--jobs", "8")
TUNE_BUDGET_S = 30.0
TUNE_EXPECTED_S = 60.0  # its compiles and timings as planned (not yet timed on a GPU)
# Architectures the cost model compiles for (its GPU table: H100 and H200, sm_90).
COST_ARCHS = {(9, 0): "90"}
TRITON_TESTS = "triton or available or auto"

# The bench: flashcon's paths against eager and compiled dense SupCon, in the order each N
# runs them. The compiled dense loss comes second so that a short budget drops the slowest
# fused paths at the largest N first, never the baseline the targets are set against.
DENSE = ("reference-compile", "reference")
ALL_PATHS = ("flashcon-triton", *DENSE, "flashcon-triton-general", "flashcon-cuda")
TRITON_PATHS = ("flashcon-triton", "flashcon-triton-general")
SCHEDULES = ("flashcon-triton", "flashcon-triton-tiles")
# Per-point settings: 3 warm-ups (compilation included), then at least 5 timed fwd+bwd calls
# and up to 0.3 s of them; a point over 60 s is hung.
POINT_ARGS = (
    "--dim", "128", "--warmup", "3", "--min-reps", "5", "--max-reps", "50",
    "--target-s", "0.3", "--timeout", "60",
)  # fmt: skip


@dataclass(frozen=True)
class Sweep:
    """One ``bench/run.py`` run. ``planned_s``: the expected time of its points (about 6 s
    each for the worker's start, torch.compile or Triton's JIT, the warm-ups and the timed
    calls, plus the calls' own time at large N: 8 calls of 1.6 s for the fp32 general path at
    N = 65536); an optional sweep runs only when that much time is left."""

    name: str
    loss: str
    dtype: str
    providers: tuple[str, ...]
    ns: tuple[int, ...]
    planned_s: float
    required: bool = True


SWEEPS = (
    Sweep("supcon-bf16", "supcon", "bfloat16", ALL_PATHS, (4096, 16384, 65536), 95.0),
    Sweep("supcon-fp32", "supcon", "float32", ALL_PATHS, (4096, 16384, 65536), 115.0),
    Sweep("ntxent-bf16", "ntxent", "bfloat16", TRITON_PATHS, (65536,), 15.0),
    Sweep("sincere-bf16", "sincere", "bfloat16", TRITON_PATHS, (65536,), 15.0),
    Sweep("tcl-bf16", "tcl", "bfloat16", TRITON_PATHS, (65536,), 15.0),
    # The symmetric kernels' schedules side by side: partner runs with resident blocks (the
    # default) against one streamed tile pair per program (FLASHCON_SYM_SCHEDULE=tiles).
    Sweep("supcon-bf16-schedule", "supcon", "bfloat16", SCHEDULES, (16384, 65536), 20.0, False),
    Sweep("supcon-bf16-n32768", "supcon", "bfloat16", ALL_PATHS, (32768,), 33.0, False),
    Sweep("supcon-fp32-n32768", "supcon", "float32", ALL_PATHS, (32768,), 37.0, False),
)
# What bench/run.py takes besides its budget: its start (imports, the providers' checks,
# about 4 s) and writing the table, the CSV and the plots (about 3 s). BENCH_START_S is that
# expected time, BENCH_OVERHEAD_S what a sweep's limit and the budgets keep for it.
BENCH_START_S = 7.0
BENCH_OVERHEAD_S = 10.0
# A sweep with less than this left is not started.
MIN_SWEEP_S = 10.0


@dataclass
class Step:
    name: str
    cmd: list[str]
    limit_s: float
    env: dict[str, str] = field(default_factory=dict)
    junit: str | None = None  # pytest steps: the JUnit XML file, relative to the out folder
    status: str = "planned"  # planned, ok, failed, timeout, skipped
    start_s: float | None = None  # since the run started
    seconds: float | None = None
    note: str = ""


# --------------------------------------------------------------------------------------------
# The plan.
# --------------------------------------------------------------------------------------------


def arch_list(capability: tuple[int, int]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` of one GPU: its compute capability, e.g. ``9.0``."""
    return f"{capability[0]}.{capability[1]}"


def _xdist(workers: int) -> list[str]:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    if workers <= 1:
        return []
    # With plugin autoloading off, an installed pytest-xdist must be named to be loaded.
    load = ["-p", "xdist.plugin"] if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else []
    return [*load, "-n", str(workers)]


def _pytest(name: str, select: str, workers: int, py: str, tests: str) -> Step:
    junit = f"pytest/{name}.xml"
    cmd = [py, "-m", "pytest", tests, "-m", "gpu", "-k", select, *_xdist(workers)]
    cmd += ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    return Step(name, cmd, LIMITS[name], junit=junit)


def plan_steps(
    capability: tuple[int, int], py: str, cores: int, tests: str = "tests"
) -> list[Step]:
    """The fixed steps after the probe: build, tests-triton, backends, tests-cuda."""
    # --force: setuptools would take a library left by another build (another torch, CPU
    # only) as up to date; ninja still recompiles only the objects that changed.
    build = Step(
        "build",
        [py, "setup.py", "build_ext", "--inplace", "--force"],
        LIMITS["build"],
        env={
            "TORCH_CUDA_ARCH_LIST": arch_list(capability),
            "MAX_JOBS": str(MAX_JOBS),
            "FLASHCON_FORCE_CUDA": "1",
        },
    )
    # The Triton tests share the cores with the build's nvcc jobs; the others have them all.
    triton = _pytest("tests-triton", TRITON_TESTS, max(1, min(6, cores - MAX_JOBS)), py, tests)
    triton.env["FLASHCON_REQUIRE"] = "triton"
    backends = Step("backends", [py, "-c", BACKENDS], LIMITS["backends"])
    cuda = _pytest("tests-cuda", f"not ({TRITON_TESTS})", max(1, min(12, cores - 2)), py, tests)
    cuda.env["FLASHCON_REQUIRE"] = "triton,cuda"
    for s in (triton, backends, cuda):
        s.env["PYTHONPATH"] = _pythonpath()
    return [build, triton, backends, cuda]


def cost_step(capability: tuple[int, int], out: Path, py: str) -> Step | None:
    """The cost model's predictions for this GPU (None where it has no table for it)."""
    arch = COST_ARCHS.get(tuple(capability))
    if arch is None:
        return None
    cmd = [py, "-m", "flashcon.tools.cost_model", "--archs", arch, "--no-ops", "-j", "2"]
    cmd += ["--ns", "4096", "16384", "65536", "--json", str(out / "cost_model.json")]
    return Step("cost-model", cmd, LIMITS["cost-model"], env={"PYTHONPATH": _pythonpath()})


def tune_step(out: Path, py: str) -> Step:
    """The symmetric kernels tuned on this GPU; the table goes to ``out`` and, for the bench
    sweeps after it, into the stage."""
    cmd = [py, "-m", "flashcon.tools.tune", *TUNE_ARGS, "--budget", f"{TUNE_BUDGET_S:.0f}"]
    cmd += ["--out", str(out / "tuned.json")]
    return Step("tune", cmd, LIMITS["tune"], env={"PYTHONPATH": _pythonpath()})


def install_table(out: Path, site: Path | None = None) -> str:
    """Copy the run's tuned table into the stage, where the launchers read it."""
    site = SITE if site is None else site
    table = out / "tuned.json"
    if not table.exists():
        return "no table written"
    shutil.copy2(table, site / "flashcon" / "triton_kernels" / "tuned.json")
    n = len(json.loads(table.read_text()).get("entries", {}))
    return f"{n} keys tuned"


def _pythonpath() -> str:
    old = os.environ.get("PYTHONPATH")
    return str(SITE) + (os.pathsep + old if old else "")


def bench_step(sweep: Sweep, budget_s: float, out: Path, py: str) -> Step:
    cmd = [py, str(BENCH / "run.py"), "--loss", sweep.loss, "--dtype", sweep.dtype]
    cmd += ["--device", "cuda", "--providers", ",".join(sweep.providers)]
    cmd += ["--ns", ",".join(map(str, sweep.ns)), "--budget", f"{budget_s:.0f}", *POINT_ARGS]
    cmd += ["--out", str(out / "bench" / sweep.name), "--no-progress"]
    step = Step(f"bench-{sweep.name}", cmd, budget_s + BENCH_OVERHEAD_S)
    step.env["PYTHONPATH"] = _pythonpath()
    return step


def allot(sweeps: tuple[Sweep, ...], index: int, left_s: float) -> float:
    """Budget of ``sweeps[index]`` with ``left_s`` seconds left for it and the sweeps after
    it: all that is left less the planned time of the required sweeps after it (so a slow
    sweep cannot starve them); an optional sweep gets its planned time or nothing. 0: skip."""
    sweep = sweeps[index]
    if not sweep.required:
        return sweep.planned_s if left_s - BENCH_OVERHEAD_S >= sweep.planned_s else 0.0
    later = sum(s.planned_s + BENCH_OVERHEAD_S for s in sweeps[index + 1 :] if s.required)
    budget = left_s - later - BENCH_OVERHEAD_S
    if budget < MIN_SWEEP_S:
        # Not enough for every required sweep: this one, being earlier, takes what there is.
        budget = left_s - BENCH_OVERHEAD_S
    return budget if budget >= MIN_SWEEP_S else 0.0


def nominal_s() -> float:
    """Expected time of the steps, from the H200 run's timings: probe and stage (6 s), the
    build (100 s, the Triton tests' 95 s beside it), the backends probe (3 s), the CUDA
    tests (62 s), the tuner (planned, not yet timed on a GPU), the required sweeps with
    bench/run.py's own start and output each."""
    sweeps = sum(s.planned_s + BENCH_START_S for s in SWEEPS if s.required)
    return 6.0 + 100.0 + 3.0 + 62.0 + TUNE_EXPECTED_S + sweeps


# --------------------------------------------------------------------------------------------
# Running the steps.
# --------------------------------------------------------------------------------------------


class Runner:
    """Starts steps as process groups with a log each and stops them at their limit."""

    def __init__(self, out: Path, deadline_s: float):
        self.out = out
        self.t0 = time.perf_counter()
        self.end = self.t0 + deadline_s - SUMMARY_S
        self.steps: list[Step] = []
        self.active: dict[str, subprocess.Popen] = {}
        self.ended: dict[str, float] = {}
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "pytest").mkdir(exist_ok=True)

    def left(self) -> float:
        return self.end - time.perf_counter()

    def record(self, step: Step) -> None:
        if step not in self.steps:
            self.steps.append(step)
        save_steps(self.out, self.steps)

    def skip(self, step: Step, why: str) -> None:
        step.status, step.note = "skipped", why
        self.record(step)

    def start(self, step: Step, background: bool = False) -> subprocess.Popen:
        """Start ``step``; a ``background`` one has its end time taken when it exits, not
        when :meth:`wait` gets to it."""
        cmd = list(step.cmd)
        if step.junit:
            cmd.append(f"--junitxml={self.out / step.junit}")
        env = {**os.environ, **step.env}
        # A GPU is there: the Triton interpreter must not replace it.
        env.pop("TRITON_INTERPRET", None)
        env["PYTHONUNBUFFERED"] = "1"
        step.status, step.start_s = "running", time.perf_counter() - self.t0
        self.record(step)
        with open(self.log(step), "w") as log:
            log.write("$ " + _shell(step, cmd) + "\n")
            log.flush()
            # A session of its own: a stop reaches the step's whole process tree (pytest's
            # xdist workers, the nvcc jobs) and nothing else.
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.active[step.name] = proc
        if background:

            def note_end() -> None:
                proc.wait()
                self.ended.setdefault(step.name, time.perf_counter())

            threading.Thread(target=note_end, daemon=True).start()
        return proc

    def wait(self, step: Step, proc: subprocess.Popen) -> int | None:
        """Wait for ``proc`` until the step's limit (counted from its start) or the deadline;
        returns its exit code, None when it was stopped."""
        started = self.t0 + (step.start_s or 0.0)
        stop_at = min(started + step.limit_s, self.end - GRACE_S)
        rc: int | None
        try:
            rc = proc.wait(timeout=max(0.0, stop_at - time.perf_counter()))
        except subprocess.TimeoutExpired:
            rc = None
            _stop(proc)
        del self.active[step.name]
        step.seconds = round(self.ended.get(step.name, time.perf_counter()) - started, 1)
        if rc is None:
            step.status = "timeout"
            step.note = f"stopped after {step.seconds:.0f} s (limit {step.limit_s:.0f} s)"
        else:
            step.status = "ok" if rc == 0 else "failed"
            step.note = "" if rc == 0 else f"exit {rc}"
        self.record(step)
        return rc

    def stop_all(self) -> None:
        """Stop the steps still running (the run was interrupted)."""
        for step in self.steps:
            proc = self.active.pop(step.name, None)
            if proc is not None:
                _stop(proc)
                step.status, step.note = "stopped", "the run was interrupted"
                self.record(step)

    def run(self, step: Step) -> int | None:
        if self.left() < GRACE_S + 1.0:
            self.skip(step, "no time left")
            return None
        return self.wait(step, self.start(step))

    def log(self, step: Step) -> Path:
        return self.out / "logs" / f"{step.name}.log"


def _shell(step: Step, cmd: list[str]) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in step.env.items())
    return (env + " " if env else "") + shlex.join(cmd)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (pytest and bench/run.py then write what they have), SIGKILL GRACE_S later;
    then SIGKILL to what is left of the group, so that nothing of the step keeps running."""
    _signal(proc, signal.SIGINT)
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal(proc, signal.SIGKILL)
    proc.wait()


def save_steps(out: Path, steps: list[Step]) -> None:
    (out / "steps.json").write_text(json.dumps([asdict(s) for s in steps], indent=1))


def _last_json(path: Path) -> dict | None:
    try:
        lines = path.read_text().strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


PROBE = """
import json, os, platform, torch
d = {"python": platform.python_version(), "torch": torch.__version__,
     "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
     "cuda_available": torch.cuda.is_available()}
try:
    import triton
    d["triton"] = triton.__version__
except Exception as e:
    d["triton"] = f"not importable ({type(e).__name__})"
if d["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    d.update(device_name=p.name, capability=list(torch.cuda.get_device_capability(0)),
             memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
             device_count=torch.cuda.device_count())
print(json.dumps(d))
"""


# The backends the staged package can run, as the last line (JSON); `python -m flashcon.info`
# first, where the package has it, for the log.
BACKENDS = """
import json, runpy
try:
    runpy.run_module("flashcon.info", run_name="__main__")
except (Exception, SystemExit):
    pass
import flashcon.engine as e
print(json.dumps({"triton": e.triton_available(), "cuda": e.cpp_available("cuda"),
                  "cpu": e.cpp_available("cpu")}))
"""


def nvcc_version() -> str:
    candidates = [shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for nvcc in filter(None, candidates):
        try:
            text = subprocess.run(
                [nvcc, "--version"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        m = re.search(r"release ([\d.]+)", text)
        if m:
            return m.group(1)
    return "not found"


def stage(site: Path | None = None) -> None:
    """The installed layout in ``site`` (default SITE): flashcon with flashcon.triton_kernels
    inside, as setup.py's package_dir maps them (no compiled library: the build adds it)."""
    site = site or SITE
    if site.exists():
        shutil.rmtree(site)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    shutil.copytree(ROOT / "python" / "flashcon", site / "flashcon", ignore=skip)
    shutil.copytree(ROOT / "triton_kernels", site / "flashcon" / "triton_kernels", ignore=skip)


def install_extension(site: Path | None = None) -> str:
    """Copy the library the build wrote into python/flashcon into the stage."""
    site = site or SITE
    built = ROOT / "python" / "flashcon" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not built.exists():
        raise FileNotFoundError(f"the build wrote no {built.relative_to(ROOT)}")
    shutil.copy2(built, site / "flashcon" / built.name)
    return f"{built.name}, {built.stat().st_size / 2**20:.1f} MB"


def prepare_out(out: Path) -> None:
    """An empty out folder; an earlier run's is replaced, any other folder left alone."""
    if out.exists() and any(out.iterdir()):
        if not (out / "steps.json").exists():
            raise SystemExit(f"{out} exists and holds no gpu-check run: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_all(out: Path, deadline_s: float, tests: str) -> int:
    run = Runner(out, deadline_s)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info: dict = {"date": date, "git_sha": report.git_sha(ROOT), "deadline_s": deadline_s}
    py = sys.executable

    def save_info() -> None:
        (out / "info.json").write_text(json.dumps(info, indent=1))

    save_info()
    try:
        probe = Step("probe", [py, "-c", PROBE], LIMITS["probe"])
        run.run(probe)
        info.update(_last_json(run.log(probe)) or {})
        info["nvcc"] = nvcc_version()
        save_info()
        if not info.get("cuda_available"):
            probe.status, probe.note = "failed", "no CUDA GPU visible to this Python's torch"
            run.record(probe)
            return 2

        st = Step("stage", ["copy", "python/flashcon", "triton_kernels", str(SITE)], 30.0)
        t = time.perf_counter()
        stage()
        st.status, st.seconds = "ok", round(time.perf_counter() - t, 1)
        st.start_s = round(t - run.t0, 1)
        run.record(st)

        cap, cores = tuple(info["capability"]), info.get("cpu_count") or 1
        build, triton, backends, cuda = plan_steps(cap, py, cores, tests)
        building = run.start(build, background=True)
        cost = cost_step(cap, out, py)
        costing = run.start(cost, background=True) if cost else None
        run.run(triton)
        if run.wait(build, building) == 0:
            try:
                build.note = install_extension()
            except OSError as e:
                build.status, build.note = "failed", str(e)
            run.record(build)
        if build.status != "ok":
            # The tests that need the extension are reported missing by the summary's
            # backends line; the others still run.
            cuda.env["FLASHCON_REQUIRE"] = "triton"
        run.run(backends)
        info["backends"] = _last_json(run.log(backends))
        save_info()
        run.run(cuda)
        if cost is not None:
            run.wait(cost, costing)
            run.record(cost)
        tune = tune_step(out, py)
        if run.run(tune) == 0:
            tune.note = install_table(out)
            run.record(tune)

        for i, sweep in enumerate(SWEEPS):
            budget = allot(SWEEPS, i, run.left() - GRACE_S)
            step = bench_step(sweep, max(budget, 0.0), out, py)
            if budget <= 0:
                run.skip(step, "no time left" if sweep.required else "optional: no time left")
                continue
            run.run(step)
    except KeyboardInterrupt:
        info["interrupted"] = True
    finally:
        run.stop_all()
        info["wall_s"] = round(time.perf_counter() - run.t0, 1)
        save_info()
    return 0 if all(s.status in ("ok", "skipped") for s in run.steps) else 1


# --------------------------------------------------------------------------------------------
# The summary.
# --------------------------------------------------------------------------------------------

COUNT_KEYS = ("passed", "failed", "errors", "skipped")
JUNIT_KEYS = ("tests", "failures", "errors", "skipped")


def pytest_counts(junit: Path | None, log_text: str = "") -> dict[str, int] | None:
    """passed / failed / errors / skipped of a pytest run: from its JUnit XML, else from the
    last summary line of its output (a run stopped before it wrote the XML); None if neither."""
    if junit is not None and junit.exists():
        try:
            root = ET.parse(junit).getroot()
        except ET.ParseError:
            root = None
        if root is not None:
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            c = {k: sum(int(s.get(k, 0)) for s in suites) for k in JUNIT_KEYS}
            return {
                "passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"],
                "failed": c["failures"],
                "errors": c["errors"],
                "skipped": c["skipped"],
            }
    found: dict[str, int] | None = None
    for line in log_text.splitlines():
        pairs = re.findall(r"(\d+) (passed|failed|errors?|skipped)\b", line)
        if pairs and re.search(r"\bin [\d.]+s\b", line):
            found = dict.fromkeys(COUNT_KEYS, 0)
            for num, key in pairs:
                found["errors" if key.startswith("error") else key] += int(num)
    return found


def bench_rows(out: Path) -> tuple[list[dict], list[dict]]:
    """(points, unavailable providers) of every bench CSV under ``out/bench``."""
    points, unavailable = [], []
    for path in sorted((out / "bench").glob("*/*.csv")):
        for r in report.read_csv(path):
            (unavailable if r.get("N") is None else points).append(r)
    return points, unavailable


def _order(values: list[str], first: tuple[str, ...]) -> dict[str, int]:
    known = list(dict.fromkeys([*first, *values]))
    return {v: i for i, v in enumerate(known)}


DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def load_predictions(out: Path) -> dict | None:
    """The cost model's report of the run (``cost_model.json``), or None."""
    path = out / "cost_model.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _cost_model():
    """``flashcon/tools/cost_model/lookup.py`` loaded by path: it imports nothing but the
    standard library, and importing the package would import torch into this process."""
    import importlib.util

    name = "flashcon_cost_model_lookup"
    if name not in sys.modules:
        path = ROOT / "python" / "flashcon" / "tools" / "cost_model" / "lookup.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def predicted(pred: dict | None, r: dict, device_name: str) -> float | None:
    """The cost model's fwd+bwd ms for a measured point of the Triton symmetric path."""
    if not pred or r.get("provider") != "flashcon-triton":
        return None
    return _cost_model().predicted_ms(pred, r["loss"], r["dtype"], r["N"], device_name)


def bench_table(points: list[dict], pred: dict | None = None, device_name: str = "") -> str:
    """One markdown row per point: loss, dtype, N, provider, fwd+bwd p50, the cost model's
    prediction (flashcon-triton), peak memory, flop rate, speed-ups over eager and compiled
    dense (>1: faster), status."""
    device = points[0].get("device", "cuda") if points else "cuda"
    unit, div = report.flop_unit(device)
    losses = _order([r["loss"] for r in points], tuple(dict.fromkeys(s.loss for s in SWEEPS)))
    dtypes = _order([r["dtype"] for r in points], ("bfloat16", "float32"))
    provs = _order([r["provider"] for r in points], ALL_PATHS)
    points = sorted(
        points,
        key=lambda r: (losses[r["loss"]], dtypes[r["dtype"]], r["N"], provs[r["provider"]]),
    )
    head = (
        f"| loss | dtype | N | provider | fwd+bwd ms | predicted ms | peak MB | {unit} "
        "| vs eager dense | vs compiled dense | status |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    num = report.num
    for r in points:
        ok = r["status"] == "ok"
        rate = r.get("fwdbwd_gflops")
        cells = [
            num(r.get("fwdbwd_ms_p50")),
            num(predicted(pred, r, device_name), "{:.3g}"),
            num(r.get("peak_mb"), "{:.4g}"),
            num(None if rate is None else rate / div, "{:.1f}"),
            num(r.get("speedup_vs_reference"), "{:.2f}×"),
            num(r.get("speedup_vs_reference_compile"), "{:.2f}×"),
        ]
        if not ok:
            cells = ["—"] * len(cells)
        status = "ok" if ok else f"{r['status']}: {r.get('note') or ''}".strip().rstrip(":")
        row = [r["loss"], DTYPE_SHORT.get(r["dtype"], r["dtype"]), str(r["N"]), r["provider"]]
        lines.append("| " + " | ".join([*row, *cells, status.replace("|", "/")[:70]]) + " |")
    return "\n".join(lines)


def relative_to_supcon(points: list[dict]) -> list[str]:
    """Each other loss's fwd+bwd time over SupCon's, same provider, dtype and N."""
    ok = {(r["loss"], r["dtype"], r["N"], r["provider"]): r for r in points if r["status"] == "ok"}
    lines = []
    for (loss, dtype, n, prov), r in ok.items():
        base = ok.get(("supcon", dtype, n, prov))
        if loss != "supcon" and base is not None:
            ratio = r["fwdbwd_ms_p50"] / base["fwdbwd_ms_p50"]
            where = f"{prov}, {DTYPE_SHORT.get(dtype, dtype)}, N={n}"
            lines.append(f"{loss} / supcon ({where}): {ratio:.2f}")
    return lines


def tuned_lines(out: Path) -> list[str]:
    """The tuned table of the run: one row per key, its time against the fixed table's."""
    path = out / "tuned.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    lines = [
        "",
        "## Tuned symmetric kernels (`python -m flashcon.tools.tune`; the sweeps above use them)",
        "",
        "| key | ms | fixed table ms | choice |",
        "|---|---|---|---|",
    ]
    for key, e in data.get("entries", {}).items():
        c = e["choice"]
        choice = ", ".join(f"{k}={v}" for k, v in c.items())
        fixed = report.num(e.get("default_ms"), "{:.3g}")
        shown = key.replace("|", " ")  # a pipe would split the markdown cell
        lines.append(f"| `{shown}` | {e['ms']:.3g} | {fixed} | {choice} |")
    if not data.get("entries"):
        lines.append("| (none: no key was timed) | | | |")
    return lines


def summarize(out: Path) -> str:
    """summary.md of the run in ``out`` from its files (info.json, steps.json, pytest/*.xml,
    bench/*/*.csv); also written there."""
    info = json.loads((out / "info.json").read_text()) if (out / "info.json").exists() else {}
    steps = json.loads((out / "steps.json").read_text()) if (out / "steps.json").exists() else []
    points, unavailable = bench_rows(out)
    pred = load_predictions(out)

    cap = info.get("capability")
    device = info.get("device_name", "no CUDA device seen")
    if cap:
        device += f" (sm_{cap[0]}{cap[1]}, {info.get('memory_gib')} GiB, {info.get('sms')} SMs)"
    backends = info.get("backends") or {}
    lines = [
        f"# flashcon gpu-check: {info.get('device_name', 'no GPU')}",
        "",
        f"- device: {device}; {info.get('cpu_count', '?')} CPU cores",
        f"- torch {info.get('torch', '?')} (CUDA {info.get('torch_cuda', '?')}), "
        f"Triton {info.get('triton', '?')}, nvcc {info.get('nvcc', '?')}, "
        f"Python {info.get('python', '?')}",
        "- backends: "
        + (
            ", ".join(f"{k} {'yes' if v[0] else 'no (' + v[1] + ')'}" for k, v in backends.items())
            or "not probed"
        ),
        f"- git {info.get('git_sha', '?')}, {info.get('date', '?')}, "
        f"{info.get('wall_s', '?')} s of the {info.get('deadline_s', DEADLINE_S):.0f} s deadline",
        "",
        "## Tests (`pytest -m gpu`)",
        "",
        "| step | selection | passed | failed | errors | skipped | s | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        if not s.get("junit"):
            continue
        log = out / "logs" / f"{s['name']}.log"
        c = pytest_counts(out / s["junit"], log.read_text() if log.exists() else "")
        counts = [str(c[k]) for k in COUNT_KEYS] if c else ["—"] * 4
        select = s["cmd"][s["cmd"].index("-k") + 1] if "-k" in s["cmd"] else "all"
        status = s["status"] + (f" ({s['note']})" if s.get("note") else "")
        lines.append(
            f"| {s['name']} | `{select}` | " + " | ".join(counts) + f" | {_sec(s)} | {status} |"
        )
    if not any(s.get("junit") for s in steps):
        lines += ["(no pytest step ran)"]
    lines += [
        "",
        "## Bench (forward + backward, D = 128)",
        "",
        "p50 of ≥ 5 timed calls after 3 warm-ups (CUDA events), each point in its own process; "
        "peak MB above the inputs (`torch.cuda.max_memory_allocated`); flop rate on the "
        "8·N²·D model; *vs eager dense* / *vs compiled dense*: the fwd+bwd time of `reference` "
        "/ `torch.compile(reference)` at the same N over this one's (above 1: faster).",
        "",
        bench_table(points, pred, info.get("device_name", ""))
        if points
        else "(no bench point ran)",
    ]
    if pred:
        lines += [
            "",
            "*predicted ms*: the static cost model (`python -m flashcon.tools.cost_model`, "
            "run here for this GPU's architecture with this Triton) — a prediction, to be "
            "compared with the measured time beside it. Its calibration points:",
            "",
        ]
        for c in pred.get("calibration", []):
            lines.append(
                f"- {c['what']}, N = {c['n']}: measured {c['ms']:.3g} ms, predicted "
                f"{c['pred_ms']:.3g} ms (ratio {c['ratio']:.2f})"
            )
    other = relative_to_supcon(points)
    if other:
        lines += ["", "Time over SupCon's: " + "; ".join(other) + "."]
    lines += tuned_lines(out)
    for u in dict.fromkeys((u["provider"], u.get("note") or "") for u in unavailable):
        lines += ["", f"Not run: {u[0]} ({u[1]})."]
    lines += ["", "## Steps", "", "| step | status | s | limit s | note |", "|---|---|---|---|---|"]
    for s in steps:
        note = (s.get("note") or "").replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {_sec(s)} | {s['limit_s']:.0f} | {note} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _sec(step: dict) -> str:
    return "—" if step.get("seconds") is None else f"{step['seconds']:.0f}"


def pack(out: Path, tgz: Path) -> None:
    tgz.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(out, arcname=out.name)


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def print_plan(capability: tuple[int, int], out: Path, cores: int, tests: str) -> None:
    py = sys.executable
    print(f"gpu-check plan: out {out}, deadline {DEADLINE_S:.0f} s, nominal {nominal_s():.0f} s")
    print(f"probe   [{LIMITS['probe']:.0f} s] {shlex.join([py, '-c', '<probe>'])}")
    print(f"stage   copy python/flashcon, triton_kernels -> {SITE}")
    cost = cost_step(capability, out, py)
    steps = plan_steps(capability, py, cores, tests) + ([cost] if cost else [])
    for s in steps + [tune_step(out, py)]:
        tag = " (background, during tests-triton)" if s.name in ("build", "cost-model") else ""
        print(f"{s.name:<7} [{s.limit_s:.0f} s]{tag} {_shell(s, s.cmd)}")
    for sweep in SWEEPS:
        s = bench_step(sweep, sweep.planned_s, out, py)
        when = "" if sweep.required else " (if time is left)"
        print(f"{s.name} [budget {sweep.planned_s:.0f} s planned]{when} {_shell(s, s.cmd)}")
    print(f"summary {out / 'summary.md'}; pack {out}.tgz")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get(OUT_ENV) or ROOT / "gpu-check"),
        help=f"results folder (default: ${OUT_ENV} or gpu-check/ in the repository)",
    )
    ap.add_argument("--tgz", type=Path, default=None, help="archive (default: <out>.tgz)")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for all steps")
    ap.add_argument("--tests", default="tests", help="where pytest looks for gpu tests")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument(
        "--capability",
        default=None,
        help="with --dry-run: plan for this compute capability (e.g. 9.0) instead of probing",
    )
    ap.add_argument(
        "--summarize", type=Path, default=None, help="rebuild summary.md of an earlier run"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize is not None:
        print(summarize(args.summarize))
        return 0
    out = args.out.resolve()
    if args.dry_run:
        cap, cores = (9, 0), os.cpu_count() or 1
        if args.capability:
            cap = tuple(int(x) for x in args.capability.split("."))[:2]
        else:
            got = subprocess.run(
                [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
            )
            probe = json.loads(got.stdout.strip().splitlines()[-1]) if got.returncode == 0 else {}
            cap = tuple(probe.get("capability") or cap)
            if not probe.get("cuda_available"):
                print("no CUDA GPU visible: planning for compute capability 9.0")
        print_plan(cap, out, cores, args.tests)
        return 0

    prepare_out(out)
    # A SIGTERM (a timeout around make) ends the run as Ctrl-C does: the summary is written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rc = run_all(out, args.deadline, args.tests)
    print(summarize(out))
    tgz = args.tgz or out.with_name(out.name + ".tgz")
    pack(out, tgz)
    print(f"wrote {out}/ and {tgz}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
