"""flashcon benchmark: time and memory of every provider of a loss at growing batch sizes.

    python bench/run.py                      # SupCon, D=128, fp32, on CUDA if there is one
    python bench/run.py --loss sincere --dtype bfloat16 --providers flashcon-triton,reference
    python bench/run.py --quick              # a < 60 s smoke run (N = 256, 512)

Sweep: N = 1024, 2048, 4096, … (``--min-n`` to ``--max-n``) for every provider (see
``bench/providers.py``) until each one has failed (out of memory, error, timeout, or a
predicted time over the per-point timeout) or the total ``--budget`` is spent. Providers that
cannot run here (a backend not built, no GPU) are listed, with the reason, and skipped.

Each point (provider, N) runs in a fresh subprocess (``bench/worker.py``) with a timeout, so an
out-of-memory or a hang ends that provider's sweep and nothing else; on the CPU the process's
address space is capped (``--mem-limit-gb``) so that an allocation fails inside it instead of
waking the system's OOM killer. The worker's docstring says how time (p20/p50/p80 of fwd,
bwd, fwd+bwd) and peak memory (above the inputs) are measured.

Throughput follows DESIGN.md's performance model: 2·N·M·D flops forward, 6·N·M·D backward,
8·N·M·D both; "of mm" divides it by torch.mm's flop/s on ``[N, D] × [D, N]`` in the same dtype,
measured once per N, and "vs reference" is the dense reference's fwd+bwd time over the
provider's. "loss Δ vs ref" is the relative difference of the loss value from the reference's
on the same inputs: every provider computes the same quantity.

Output, in ``--out`` (default ``bench/results``), named ``<loss>_<device>_<dtype>_d<D>``
(``_quick`` added by ``--quick``): ``.md`` (the table, also printed), ``.csv`` (one row per
point, tagged with date, git SHA, device name, torch/triton versions), ``_time.png`` and
``_memory.png`` (log-log, one line per provider).
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
    ap.add_argument("--quick", action="store_true", help="tiny sweep for CI smoke (< 60 s)")
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
    defaults = {
        # name: (quick, cuda, cpu)
        "min_n": (256, 1024, 1024),
        "max_n": (512, NO_LIMIT, NO_LIMIT),
        "budget": (40.0, 660.0, 660.0),
        "timeout": (30.0, 180.0, 180.0),
        "warmup": (1, 3, 1),
        "min_reps": (2, 5, 3),
        "max_reps": (3, 50, 20),
        "target_s": (0.05, 1.0, 2.0),
    }
    for name, (quick, on_cuda, on_cpu) in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else on_cuda if cuda else on_cpu)
    if a.min_reps < 1 or a.max_reps < a.min_reps:
        ap.error("need 1 <= --min-reps <= --max-reps")
    return a


# --------------------------------------------------------------------------------------------
# Run metadata.
# --------------------------------------------------------------------------------------------


def _git_sha() -> str:
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(HERE.parent), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


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


def run_metadata(args) -> dict:
    import flashcon

    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "flashcon": flashcon.__version__,
        "python": platform.python_version(),
        "loss": args.loss,
        "dtype": args.dtype,
        "D": args.dim,
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


def point_row(provider: str, n: int, args, res: dict, wall: float, mm: dict) -> dict:
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
    if mm.get(n):
        row["mm_gflops"] = mm[n] / 1e9
        row["frac_of_mm"] = row["fwdbwd_gflops"] / row["mm_gflops"]
    return row


def _predicted_s(args, last: dict, n: int) -> float:
    """Wall time of the next point, from the last one's fwd+bwd time (the work is ∝ N²)."""
    scale = (n / last["N"]) ** 2
    calls = args.warmup + args.min_reps
    return STARTUP_S + calls * last["fwdbwd_ms_p50"] * 1e-3 * scale


def sweep(args, selected: list[str], meta: dict) -> tuple[list[dict], dict[int, float]]:
    from tqdm import tqdm

    ns = []
    n = args.min_n
    while n <= args.max_n:
        ns.append(n)
        n *= 2
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
    # The bar counts the time budget: the sweep ends when it is spent, or earlier when every
    # provider has stopped.
    bar = tqdm(
        total=round(args.budget),
        disable=args.no_progress,
        dynamic_ncols=True,
        bar_format="{percentage:3.0f}%|{bar}| {n:.0f}/{total} s of budget [{elapsed}]{postfix}",
    )

    def tick() -> None:
        bar.update(min(args.budget, time.perf_counter() - start) - bar.n)

    try:
        for n in ns:
            if not alive:
                break
            for p in list(alive):
                left = args.budget - (time.perf_counter() - start)
                predicted = _predicted_s(args, last_ok[p], n) if p in last_ok else STARTUP_S
                if predicted > args.timeout or predicted > left:
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
                    bar.write(f"  {p} N={n}: {why} ({note})")
                    alive.remove(p)
                    continue
                bar.set_postfix_str(f"{len(rows)} points done; {p} N={n}")
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
                res, wall = run_point(spec, min(args.timeout, left), tick)
                if res.get("mm_flops"):
                    mm[n] = res["mm_flops"]
                if res.get("device_name"):
                    meta["device_name"] = res["device_name"]
                row = point_row(p, n, args, res, wall, mm)
                if row["status"] == "timeout" and left < args.timeout:
                    row["status"], row["note"] = "budget", "total budget spent"
                rows.append(row)
                tick()
                if row["status"] == "ok":
                    last_ok[p] = row
                else:
                    bar.write(f"  {p} N={n}: {row['status']} ({row['note']})")
                    alive.remove(p)
    except KeyboardInterrupt:
        bar.write("interrupted: writing the points measured so far")
    finally:
        bar.close()

    # Fill in what needs the whole N column: torch.mm throughput and the reference columns.
    ref = {r["N"]: r for r in rows if r["provider"] == "reference" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if "frac_of_mm" not in r and mm.get(r["N"]):
            r["mm_gflops"] = mm[r["N"]] / 1e9
            r["frac_of_mm"] = r["fwdbwd_gflops"] / r["mm_gflops"]
        base = ref.get(r["N"])
        if base is not None:
            r["speedup_vs_reference"] = base["fwdbwd_ms_p50"] / r["fwdbwd_ms_p50"]
            if r.get("loss_value") is not None and base.get("loss_value") is not None:
                r["rel_diff_vs_reference"] = P.rel_diff(r["loss_value"], base["loss_value"])
    return rows, mm


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def replot(csv_path: Path) -> int:
    """Table and plots of an earlier run, from its CSV (written beside it)."""
    import csv

    with open(csv_path) as f:
        raw = list(csv.DictReader(f))
    rows = []
    for r in raw:
        row = {}
        for k, v in r.items():
            try:
                row[k] = int(v) if k in ("N", "M", "reps", "D") else float(v)
            except ValueError:
                row[k] = v
        rows.append(row)
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
    report.plot(points, title, Path(f"{stem}_time.png"), Path(f"{stem}_memory.png"), floor)
    print(report.markdown_table(points))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_csv is not None:
        return replot(args.from_csv)
    dev = torch.device(args.device)
    wanted = P.PROVIDERS if args.providers == "all" else args.providers.split(",")
    wanted = [P.canonical(p.strip()) for p in wanted if p.strip()]
    meta = run_metadata(args)

    print(
        f"flashcon benchmark: loss={args.loss} D={args.dim} dtype={args.dtype} "
        f"device={args.device} ({meta['device_name']}), torch {meta['torch']}, "
        f"triton {meta['triton']}, git {meta['git_sha']}"
    )
    selected, unavailable = [], []
    for p in wanted:
        ok, why = P.availability(p, args.loss, dev)
        if ok:
            selected.append(p)
        else:
            unavailable.append({"provider": p, "status": "unavailable", "note": why})
            print(f"  provider {p}: unavailable, skipped ({why})")
    if not selected:
        print("no provider can run here", file=sys.stderr)
        return 2
    print(
        f"  providers: {', '.join(selected)}; N from {args.min_n} "
        + (f"to {args.max_n}" if args.max_n < NO_LIMIT else "upward")
        + f" until each stops; budget {args.budget:.0f} s, timeout {args.timeout:.0f} s per point"
    )

    t0 = time.perf_counter()
    rows, mm = sweep(args, selected, meta)
    elapsed = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    dev_tag = "cpu" if dev.type == "cpu" else _slug(meta["device_name"]) or dev.type
    stem = f"{args.loss}_{dev_tag}_{args.dtype}_d{args.dim}" + ("_quick" if args.quick else "")
    table = report.markdown_table(rows)
    header = [
        f"# {args.loss}, D={args.dim}, {args.dtype}, {meta['device_name']}",
        "",
        f"{meta['date']} · git {meta['git_sha']} · torch {meta['torch']} · "
        f"triton {meta['triton']} · {elapsed:.0f} s",
        "",
        "Times are p50 over repetitions (CSV: p20/p50/p80); peak MB is memory above the "
        "inputs; GFLOP/s uses 8·N·M·D for fwd+bwd; 'of mm' is that over torch.mm's flop/s at "
        "[N, D]×[D, N]; 'vs reference' is the dense reference's fwd+bwd time over this one.",
        "",
    ]
    if unavailable:
        header += [f"Not run: {u['provider']} ({u['note']})." for u in unavailable] + [""]
    (args.out / f"{stem}.md").write_text("\n".join(header) + "\n" + table + "\n")
    report.write_csv(args.out / f"{stem}.csv", meta, unavailable + rows)
    floor = {n: P.flops(args.loss, n, args.dim, "fwdbwd") / f * 1e3 for n, f in mm.items()}
    title = f"{args.loss}, D={args.dim}, {args.dtype}, {meta['device_name']}"
    report.plot(rows, title, args.out / f"{stem}_time.png", args.out / f"{stem}_memory.png", floor)

    print()
    print(table)
    print()
    for u in unavailable:
        print(f"not run: {u['provider']}: {u['note']}")
    print(
        f"{len(rows)} points in {elapsed:.0f} s; wrote {args.out / stem}"
        "{.md,.csv,_time.png,_memory.png}"
    )
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
