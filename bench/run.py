"""flashcon benchmark: time and memory of every provider of a loss at growing batch sizes.

    python bench/run.py                      # SupCon, D=128, fp32, on CUDA if there is one
    python bench/run.py --loss sincere --dtype bfloat16 --providers flashcon-triton,reference
    python bench/run.py --quick              # flashcon against the dense loss, N = 256, 512
    python bench/run.py --ns 4096,16384,65536 --providers flashcon-triton,reference-compile

Sweep: N = 1024, 2048, 4096, … (``--min-n`` to ``--max-n``, or the list ``--ns``) for every
provider (see ``bench/providers.py``), in the order given, until each one has failed (out of
memory, error, timeout, or a predicted time over the per-point timeout) or the total
``--budget`` is spent. Nothing skips a point on a memory estimate: a provider stops at its
first real out-of-memory. Providers that cannot run here (a backend not built, no GPU) are
listed, with the reason, and skipped.

Each point (provider, N) runs in a fresh subprocess (``bench/worker.py``) with a timeout, so an
out-of-memory or a hang ends that provider's sweep and nothing else; on the CPU the process's
address space is capped (``--mem-limit-gb``) so that an allocation fails inside it instead of
waking the system's OOM killer. The worker's docstring says how time (p20/p50/p80 of fwd,
bwd, fwd+bwd) and peak memory (above the inputs) are measured.

``--quick`` is the smoke run: by default two providers, the fused loss on the backend
``'auto'`` picks for the device and the eager dense ``reference``, at N = 256 and 512, in this
process (``--in-process``: no worker start-up of seconds per point, no per-point timeout or
memory cap, which such small points do not need). Every provider's first point is measured
whatever the budget, so the quick table always has a flashcon-vs-dense ratio.

Every run also records the CPU threads (``torch.get_num_threads()``: the CPU kernels' OpenMP
threads) and what ``import flashcon`` costs on top of ``import torch`` (one ``-X importtime``
subprocess; whether Triton was imported with it).

Throughput follows docs/design.md's performance model: 2·N·M·D flops forward, 6·N·M·D backward,
8·N·M·D both; "of mm" divides it by torch.mm's flop/s on ``[N, D] × [D, N]`` in the same dtype,
measured once per N; "vs eager dense" and "vs compiled dense" are the fwd+bwd times of
``reference`` and ``reference-compile`` over the provider's. "loss Δ vs ref" is the relative
difference of the loss value from the reference's on the same inputs: every provider computes
the same quantity. Flop rates read in TFLOP/s on GPUs and GFLOP/s on CPUs (the CSV keeps
GFLOP/s, ``*_gflops``).

Output, in ``--out`` (default ``bench/results``), named ``<loss>_<device>_<dtype>_d<D>``
(``_quick`` added by ``--quick``): ``.md`` (the table, also printed: one row per point), ``.csv``
(one row per point, tagged with date, git SHA, device name, torch/triton versions),
``_time.png`` and ``_memory.png`` (log-log, one line per provider; drawn where matplotlib is
installed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import providers as P  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
from worker import RESULT_TAG  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16", "float64")
NO_LIMIT = 1 << 30
# Seconds a worker needs before it measures anything (interpreter, torch and flashcon import).
STARTUP_S = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark flashcon's streaming losses against dense baselines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--loss", choices=P.LOSSES, default="supcon")
    ap.add_argument("--dim", "-D", type=int, default=128, help="feature dimension D")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument(
        "--providers",
        default="all",
        help=f"comma-separated subset of: {', '.join(P.PROVIDERS)} "
        "(bare backend names such as 'torch' mean flashcon-<name>)",
    )
    ap.add_argument("--min-n", type=int, default=None, help="first N (default 1024; quick 256)")
    ap.add_argument("--max-n", type=int, default=None, help="last N (default: no limit)")
    ap.add_argument(
        "--ns",
        type=lambda s: sorted({int(x) for x in s.split(",") if x.strip()}),
        default=None,
        help="comma-separated N to run instead of the doubling sweep (e.g. 4096,16384,65536)",
    )
    ap.add_argument(
        "--budget", type=float, default=None, help="total seconds (default 660; quick 40)"
    )
    ap.add_argument("--timeout", type=float, default=None, help="seconds per point (default 180)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per point")
    ap.add_argument("--min-reps", type=int, default=None)
    ap.add_argument("--max-reps", type=int, default=None)
    ap.add_argument("--target-s", type=float, default=None, help="timed seconds per point")
    ap.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="CPU: memory a point may allocate (default 60%% of MemAvailable)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: fused ('auto' backend) vs eager dense at N = 256, 512, in-process",
    )
    ap.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure every point in this process (default: with --quick only)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--from-csv",
        type=Path,
        default=None,
        help="measure nothing: print the table and redraw the plots of an earlier run's CSV",
    )
    a = ap.parse_args(argv)

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(a.device).type == "cuda"
    if a.in_process is None:
        a.in_process = a.quick
    defaults = {
        # name: (quick, cuda, cpu)
        "min_n": (256, 1024, 1024),
        "max_n": (512, NO_LIMIT, NO_LIMIT),
        "budget": (40.0, 660.0, 660.0),
        "timeout": (30.0, 180.0, 180.0),
        "warmup": (3, 3, 1),
        "min_reps": (3, 5, 3),
        "max_reps": (20, 50, 20),
        "target_s": (0.2, 1.0, 2.0),
    }
    for name, (quick, on_cuda, on_cpu) in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else on_cuda if cuda else on_cpu)
    if a.min_reps < 1 or a.max_reps < a.min_reps:
        ap.error("need 1 <= --min-reps <= --max-reps")
    if a.ns is not None and (not a.ns or a.ns[0] < 1):
        ap.error("--ns needs positive sizes")
    return a


def sizes(args) -> list[int]:
    """The N of the sweep, ascending (the time of each point is predicted from the last)."""
    if args.ns is not None:
        return list(args.ns)
    ns, n = [], args.min_n
    while n <= args.max_n:
        ns.append(n)
        n *= 2
    return ns


# --------------------------------------------------------------------------------------------
# Run metadata.
# --------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    return f"{name} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def import_cost() -> dict:
    """Seconds of ``import torch`` and of ``import flashcon`` after it, in a fresh interpreter
    (``-X importtime``'s cumulative figures of the two top-level imports), and whether Triton
    came with flashcon."""
    code = "import sys, torch; import flashcon; print('triton' in sys.modules)"
    try:
        p = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env=_worker_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    cumulative = {}
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line)
        if m:  # top-level imports only: no indentation before the name
            cumulative[m.group(2)] = int(m.group(1)) * 1e-6
    if p.returncode != 0 or "torch" not in cumulative or "flashcon" not in cumulative:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:200]}"}
    return {
        "import_torch_s": round(cumulative["torch"], 3),
        "import_flashcon_s": round(cumulative["flashcon"], 3),
        "imports_triton": p.stdout.strip() == "True",
    }


def describe_imports(cost: dict) -> str:
    if "error" in cost:
        return f"import cost not measured ({cost['error']})"
    triton = "imported" if cost["imports_triton"] else "not imported"
    return (
        f"import torch {cost['import_torch_s']:.2f} s, then import flashcon "
        f"+{cost['import_flashcon_s']:.2f} s (Triton {triton})"
    )


def run_metadata(args) -> dict:
    import flashcon

    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": report.git_sha(HERE.parent),
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "flashcon": flashcon.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "loss": args.loss,
        "dtype": args.dtype,
        "D": args.dim,
        **import_cost(),
    }


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------
# One point in a subprocess.
# --------------------------------------------------------------------------------------------


def _worker_env() -> dict:
    env = dict(os.environ)
    # The Triton interpreter (which tests turn on without a GPU) is not what we time.
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_point_here(spec: dict) -> tuple[dict, float]:
    """``--in-process``: the worker's measurement in this process (no timeout, no memory cap)."""
    import worker

    t0 = time.perf_counter()
    res = worker.run_point({**spec, "mem_limit_bytes": 0})
    return res, time.perf_counter() - t0


def run_point(spec: dict, timeout: float, tick=None) -> tuple[dict, float]:
    """Run one worker; returns (its result, or a failure record; wall seconds).

    ``tick()`` is called about once a second while the worker runs (the progress bar)."""
    cmd = [sys.executable, str(HERE / "worker.py"), json.dumps(spec)]
    t0 = time.perf_counter()
    # A session of its own, so that a timeout ends the worker with anything it started
    # (torch.compile's compile workers) as one process group.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_worker_env(),
        start_new_session=True,
    )
    deadline = t0 + max(1.0, timeout)
    try:
        while True:
            try:
                wait = min(1.0, max(0.01, deadline - time.perf_counter()))
                out, err = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                if tick is not None:
                    tick()
                if time.perf_counter() >= deadline:
                    _kill(proc)
                    proc.communicate()
                    note = f"over {timeout:.0f} s"
                    return {"status": "timeout", "note": note}, time.perf_counter() - t0
    except BaseException:
        _kill(proc)
        proc.communicate()
        raise
    wall = time.perf_counter() - t0
    for line in out.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :]), wall
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        note = f"killed by {sig}"
        if sig in ("SIGKILL", "SIGSEGV", "SIGBUS"):
            # The OOM killer sends SIGKILL; compiled code that ignores a failed allocation
            # under the CPU address-space cap (--mem-limit-gb) dies of SIGSEGV.
            note += " (out of memory?)"
        return {"status": "oom" if sig == "SIGKILL" else "error", "note": note}, wall
    tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return {"status": "error", "note": f"exit {proc.returncode}: {tail[0][:200]}"}, wall


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------------------------


def _ms(q: list[float] | None) -> list[float | None]:
    return [None] * 3 if not q else [x * 1e3 for x in q]


def point_row(provider: str, n: int, args, res: dict, wall: float) -> dict:
    row = {
        "provider": provider,
        "N": n,
        "M": P.columns(args.loss, n),
        "status": res.get("status", "error"),
        "note": res.get("note", ""),
        "wall_s": round(wall, 2),
    }
    if row["status"] != "ok":
        return row
    for mode in ("fwd", "bwd", "fwdbwd"):
        p20, p50, p80 = _ms(res.get(mode))
        row.update({f"{mode}_ms_p20": p20, f"{mode}_ms_p50": p50, f"{mode}_ms_p80": p80})
        row[f"{mode}_gflops"] = P.flops(args.loss, n, args.dim, mode) / (p50 * 1e-3) / 1e9
    row["reps"] = res.get("reps")
    row["peak_mb"] = res["peak_bytes"] / 2**20
    row["mem_method"] = res.get("mem_method", "")
    row["loss_value"] = res.get("loss_value")
    return row


def _startup_s(args) -> float:
    return 0.0 if args.in_process else STARTUP_S


def _predicted_s(args, last: dict, n: int) -> float:
    """Wall time of the next point, from the last one's fwd+bwd time (the work is ∝ N²)."""
    scale = (n / last["N"]) ** 2
    calls = args.warmup + args.min_reps
    return _startup_s(args) + calls * last["fwdbwd_ms_p50"] * 1e-3 * scale


class _NoBar:
    """Stands in for tqdm's bar where tqdm is not installed (a bare GPU machine)."""

    n = 0.0

    def update(self, d: float) -> None:
        self.n += d

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(args):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    # The bar counts the time budget: the sweep ends when it is spent, or earlier when every
    # provider has stopped.
    return tqdm(
        total=round(args.budget),
        disable=args.no_progress,
        dynamic_ncols=True,
        bar_format="{percentage:3.0f}%|{bar}| {n:.0f}/{total} s of budget [{elapsed}]{postfix}",
    )


def sweep(args, selected: list[str], meta: dict) -> tuple[list[dict], dict[int, float]]:
    """Every (provider, N) point in order; each point is one row of the result, printed once
    (in the table at the end: the bar shows only the count of points and of failures)."""
    ns = sizes(args)
    mem_limit = 0
    if torch.device(args.device).type == "cpu":
        avail = _mem_available()
        if args.mem_limit_gb is not None:
            mem_limit = int(args.mem_limit_gb * 2**30)
        elif avail:
            mem_limit = int(0.6 * avail)

    rows: list[dict] = []
    mm: dict[int, float] = {}
    alive = list(selected)
    last_ok: dict[str, dict] = {}
    start = time.perf_counter()
    bar = _progress_bar(args)

    def tick() -> None:
        bar.update(min(args.budget, time.perf_counter() - start) - bar.n)

    def done() -> str:
        failed = sum(r["status"] != "ok" for r in rows)
        return f"{len(rows)} points done" + (f" ({failed} stopped)" if failed else "")

    try:
        for n in ns:
            if not alive:
                break
            for p in list(alive):
                left = args.budget - (time.perf_counter() - start)
                first = n == ns[0]  # measured whatever the budget: every table compares
                predicted = _predicted_s(args, last_ok[p], n) if p in last_ok else _startup_s(args)
                if not first and (predicted > args.timeout or predicted > left):
                    why = "skipped" if predicted > args.timeout else "budget"
                    limit = "budget left" if why == "budget" else "timeout"
                    note = f"predicted {predicted:.0f} s > {limit}"
                    rows.append(
                        {
                            "provider": p,
                            "N": n,
                            "M": P.columns(args.loss, n),
                            "status": why,
                            "note": note,
                        }
                    )
                    alive.remove(p)
                    continue
                bar.set_postfix_str(f"{done()}; {p} N={n}")
                spec = {
                    "provider": p,
                    "loss": args.loss,
                    "n": n,
                    "d": args.dim,
                    "dtype": args.dtype,
                    "device": args.device,
                    "seed": args.seed,
                    "warmup": args.warmup,
                    "min_reps": args.min_reps,
                    "max_reps": args.max_reps,
                    "target_s": args.target_s,
                    "measure_mm": n not in mm,
                    "mem_limit_bytes": mem_limit,
                }
                if args.in_process:
                    res, wall = run_point_here(spec)
                else:
                    res, wall = run_point(spec, max(min(args.timeout, left), args.timeout * first))
                if res.get("mm_flops"):
                    mm[n] = res["mm_flops"]
                if res.get("device_name"):
                    meta["device_name"] = res["device_name"]
                row = point_row(p, n, args, res, wall)
                if row["status"] == "timeout" and left < args.timeout:
                    row["status"], row["note"] = "budget", "total budget spent"
                rows.append(row)
                tick()
                if row["status"] == "ok":
                    last_ok[p] = row
                else:
                    alive.remove(p)
                bar.set_postfix_str(done())
    except KeyboardInterrupt:
        print("interrupted: writing the points measured so far", file=sys.stderr)
    finally:
        bar.close()

    report.add_comparisons(rows, {n: f / 1e9 for n, f in mm.items()})
    return rows, mm


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def replot(csv_path: Path) -> int:
    """Table and plots of an earlier run, from its CSV (written beside it)."""
    rows = report.read_csv(csv_path)
    if not rows:
        print(f"{csv_path}: no rows", file=sys.stderr)
        return 1
    loss, d = rows[0]["loss"], int(rows[0]["D"])
    floor = {
        r["N"]: P.flops(loss, r["N"], d, "fwdbwd") / (r["mm_gflops"] * 1e9) * 1e3
        for r in rows
        if isinstance(r.get("mm_gflops"), float) and r["mm_gflops"] > 0
    }
    stem = csv_path.with_suffix("")
    title = f"{loss}, D={d}, {rows[0]['dtype']}, {rows[0]['device_name']}"
    points = [r for r in rows if r["status"] != "unavailable"]
    # Comparisons a CSV of an older run may lack (the speed-up over compiled dense).
    report.add_comparisons(points, {r["N"]: r["mm_gflops"] for r in points if r.get("mm_gflops")})
    if not report.plot(points, title, Path(f"{stem}_time.png"), Path(f"{stem}_memory.png"), floor):
        print("matplotlib is not installed: no plots", file=sys.stderr)
    print(report.markdown_table(points, rows[0]["device"]))
    return 0


def flashcon_auto(device: torch.device) -> str:
    """The backend ``backend='auto'`` picks for ``device`` (``torch`` when it is the reference)."""
    import flashcon

    picked = flashcon.resolve_backend("auto", device)
    return picked if picked in P.STREAMING else "torch"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_csv is not None:
        return replot(args.from_csv)
    dev = torch.device(args.device)
    if args.providers == "all" and args.quick:
        wanted = [f"flashcon-{flashcon_auto(dev)}", "reference"]
    else:
        wanted = P.PROVIDERS if args.providers == "all" else args.providers.split(",")
    wanted = [P.canonical(p.strip()) for p in wanted if p.strip()]
    meta = run_metadata(args)

    print(
        f"flashcon benchmark: loss={args.loss} D={args.dim} dtype={args.dtype} "
        f"device={args.device} ({meta['device_name']}, {meta['threads']} CPU threads), "
        f"torch {meta['torch']}, triton {meta['triton']}, git {meta['git_sha']}"
    )
    print(f"  {describe_imports(meta)}")
    selected, unavailable = [], []
    for p in wanted:
        ok, why = P.availability(p, args.loss, dev)
        if ok:
            selected.append(p)
        else:
            unavailable.append({"provider": p, "status": "unavailable", "note": why})
    not_run = [f"not run: {u['provider']} ({u['note']})" for u in unavailable]
    if not selected:
        print("\n".join(not_run + ["no provider can run here"]), file=sys.stderr)
        return 2
    if args.ns is not None:
        span = "N = " + ", ".join(map(str, args.ns))
    else:
        span = f"N from {args.min_n} " + (f"to {args.max_n}" if args.max_n < NO_LIMIT else "upward")
    more = f" ({len(unavailable)} not available here: listed at the end)" if unavailable else ""
    print(
        f"  providers: {', '.join(selected)}{more}; {span} until each stops; "
        f"budget {args.budget:.0f} s, timeout {args.timeout:.0f} s per point"
    )

    t0 = time.perf_counter()
    rows, mm = sweep(args, selected, meta)
    elapsed = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    dev_tag = "cpu" if dev.type == "cpu" else _slug(meta["device_name"]) or dev.type
    stem = f"{args.loss}_{dev_tag}_{args.dtype}_d{args.dim}" + ("_quick" if args.quick else "")
    table = report.markdown_table(rows, args.device)
    unit, _ = report.flop_unit(args.device)
    header = [
        f"# {args.loss}, D={args.dim}, {args.dtype}, {meta['device_name']}",
        "",
        f"{meta['date']} · git {meta['git_sha']} · torch {meta['torch']} · "
        f"triton {meta['triton']} · {meta['threads']} CPU threads · {elapsed:.0f} s",
        "",
        f"{describe_imports(meta)[0].upper()}{describe_imports(meta)[1:]}.",
        "",
        "Times are p50 over repetitions (CSV: p20/p50/p80); peak MB is memory above the "
        f"inputs; {unit} uses 8·N·M·D for fwd+bwd; 'of mm' is that over torch.mm's flop/s at "
        "[N, D]×[D, N]; 'vs eager dense' / 'vs compiled dense' are the fwd+bwd times of "
        "`reference` / `reference-compile` over this one's.",
        "",
    ]
    if unavailable:
        header += [f"{line[0].upper()}{line[1:]}." for line in not_run] + [""]
    (args.out / f"{stem}.md").write_text("\n".join(header) + "\n" + table + "\n")
    report.write_csv(args.out / f"{stem}.csv", meta, unavailable + rows)
    floor = {n: P.flops(args.loss, n, args.dim, "fwdbwd") / f * 1e3 for n, f in mm.items()}
    title = f"{args.loss}, D={args.dim}, {args.dtype}, {meta['device_name']}"
    plotted = report.plot(
        rows, title, args.out / f"{stem}_time.png", args.out / f"{stem}_memory.png", floor
    )

    print()
    print(table)
    print()
    for line in not_run:
        print(line)
    files = (
        "{.md,.csv,_time.png,_memory.png}" if plotted else "{.md,.csv} (no matplotlib: no plots)"
    )
    print(f"{len(rows)} points in {elapsed:.0f} s; wrote {args.out / stem}{files}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
