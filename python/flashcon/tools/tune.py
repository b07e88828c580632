"""Tune the symmetric kernels on this GPU and write the table the launchers read.

    python -m flashcon.tools.tune            # every key; writes triton_kernels/tuned.json
    python -m flashcon.tools.tune --budget 90 --out tuned.json --jobs 12

For each key the fast paths launch (``triton_kernels/tuning.py``: architecture, kernel,
dtype, D bucket, N bucket, flags) — SupCon / NT-Xent / SINCERE's η pass (one flag set), TCL
(with k1) and SINCERE's softplus pass, each forward and backward, bf16 and fp32, D = 128,
N = 4096, 16 384 and 65 536 — every candidate of ``tuning.candidates`` is

1. compiled, before anything is timed, in ``--jobs`` worker processes that each run the
   candidate once (Triton's JIT writes the kernel to its on-disk cache, which this process
   then reads), and
2. timed in this process with CUDA events: after warm-up calls, repetitions until at least
   ``--min-reps`` and ``--target-s`` seconds; the median. Each call is the launcher itself,
   which allocates its atomically accumulated outputs zeroed, so no run sees another's sums.

The fastest candidate per key is written with its time and the fixed table's time
(``default_ms``) beside it. Keys are taken in order (SupCon bf16 first) until ``--budget``
seconds are spent; the table holds the keys that were timed. ``make gpu-check`` runs this
step before its benchmark sweeps, so they measure the tuned kernels.

Nothing here runs without a CUDA GPU except :func:`tune`, the orchestration, which takes the
compile and measure functions as arguments (the tests give it stand-ins).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

D = 128
NS = (4096, 16384, 65536)
DTYPES = ("bf16", "fp32")
# (name, kind's flags): the flag sets of the losses' symmetric launches (MODE 0: the LSE
# pass; MODE 1: SINCERE's softplus pass), in tuning order.
FAMILIES = (
    ("lse", {"MODE": 0, "HAS_K1": False}),  # SupCon, NT-Xent, SINCERE's η
    ("lse-k1", {"MODE": 0, "HAS_K1": True}),  # TCL
    ("softplus", {"MODE": 1, "HAS_K1": False}),  # SINCERE's second pass
)
KINDS = ("sym_fwd", "sym_bwd")


@dataclasses.dataclass(frozen=True)
class Task:
    """One key to tune: what to launch and at which size."""

    family: str
    kind: str
    dtype: str
    n: int
    d: int = D

    def flags(self, prec: str) -> dict:
        fl = dict(next(f for name, f in FAMILIES if name == self.family))
        fl.update(MULTILABEL=False, HAS_PW=False, DOT_PREC=prec)
        return fl


def tasks(dtypes=DTYPES, ns=NS, families=None) -> list[Task]:
    """Every key, in tuning order: the most used first (bf16, the LSE pass, large N)."""
    out = []
    for dtype in dtypes:
        for family, _ in FAMILIES:
            if families is not None and family not in families:
                continue
            for n in sorted(ns, reverse=True):
                for kind in KINDS:
                    out.append(Task(family, kind, dtype, n))
    return out


def tune(
    work: list[tuple[str, Task]],
    candidates: Callable[[Task], list],
    compile_all: Callable[[list[tuple[Task, object]]], dict],
    measure: Callable[[Task, object], float | None],
    default: Callable[[Task], object],
    budget_s: float = float("inf"),
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict]:
    """The table's entries {key: {"choice", "ms", "default_ms", "timed", "failed"}} for the
    ``(key, task)`` pairs in ``work``, in order, until ``budget_s`` is spent.

    ``compile_all(pairs)`` compiles every (task, candidate) first and returns {pair index:
    error} for those that failed (never timed); ``measure(task, candidate)`` is seconds per
    call, or None when it failed; ``default(task)`` is the fixed table's choice (timed too,
    as the reference of each entry)."""
    t0 = clock()
    pairs = [(task, c) for _, task in work for c in candidates(task)]
    failed = compile_all(pairs)
    broken = {(id(pairs[i][0]), pairs[i][1]) for i in failed}
    entries: dict[str, dict] = {}
    for key, task in work:
        if clock() - t0 >= budget_s:
            break
        times = []
        n_failed = 0
        for c in candidates(task):
            s = None if (id(task), c) in broken else measure(task, c)
            if s is None:
                n_failed += 1
            else:
                times.append((s, c))
        if not times:
            continue
        best_s, best = min(times, key=lambda t: t[0])
        base = default(task)
        base_s = next((s for s, c in times if c == base), None)
        if base_s is None:
            base_s = measure(task, base) if base is not None else None
        entries[key] = {
            "choice": best.as_dict(),
            "ms": round(best_s * 1e3, 4),
            "default_ms": None if base_s is None else round(base_s * 1e3, 4),
            "timed": len(times),
            "failed": n_failed,
        }
    return entries


# --------------------------------------------------------------------------------------------
# On a GPU.
# --------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


class Bench:
    """Inputs of each task (made once) and the launcher call of a candidate."""

    def __init__(self, device: str = "cuda") -> None:
        self.device = device
        self._inputs: dict[tuple, tuple] = {}

    def inputs(self, task: Task) -> tuple:
        import torch

        from flashcon.triton_kernels import sym_launch

        k = (task.dtype, task.n, task.d, task.family)
        if k not in self._inputs:
            g = torch.Generator(device="cpu").manual_seed(0)
            z = torch.nn.functional.normalize(torch.randn(task.n, task.d, generator=g), dim=1)
            z = z.to(self.device, _torch_dtype(task.dtype))
            lab = torch.randint(0, max(1, task.n // 4), (task.n,), generator=g).to(self.device)
            w = (1.0, 1.0, 5000.0) if task.family == "lse-k1" else (1.0, 1.0, 0.0)
            lse = sym_launch.sym_lse_fwd(z, lab, 10.0, *w)[0]
            eta = sym_launch.sym_lse_fwd(z, lab, 10.0, 0.0, 1.0, 0.0)[0]
            grads = torch.randn(2, task.n, generator=g).to(self.device)
            self._inputs[k] = (z, lab, w, lse, eta, grads)
        return self._inputs[k]

    def call(self, task: Task, choice) -> Callable[[], object]:
        from flashcon.triton_kernels import sym_launch

        z, lab, w, lse, eta, grads = self.inputs(task)
        if task.family == "softplus":
            if task.kind == "sym_fwd":
                return lambda: sym_launch.sym_sp_fwd(z, lab, eta, 10.0, config=choice)
            return lambda: sym_launch.sym_sp_bwd(grads[0], z, lab, eta, 10.0, config=choice)
        if task.kind == "sym_fwd":
            return lambda: sym_launch.sym_lse_fwd(z, lab, 10.0, *w, config=choice)
        return lambda: sym_launch.sym_lse_bwd(
            grads[0], grads[1], z, lab, lse, 10.0, *w, config=choice
        )


def cuda_time(fn: Callable[[], object], warmup: int, min_reps: int, target_s: float) -> float:
    """Median seconds of ``fn`` by CUDA events, one synchronisation per repetition."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < target_s and len(times) < 100):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
        spent += times[-1]
    return statistics.median(times)


def _compile_worker(items: list[tuple[Task, dict]]) -> list[str | None]:
    """Run each (task, choice) once in this worker process: Triton's JIT compiles it and
    writes it to the cache the parent reads. An error is returned, not raised."""
    from flashcon.triton_kernels import tuning

    bench = Bench()
    errors: list[str | None] = []
    for task, choice in items:
        try:
            bench.call(task, tuning.Choice.from_dict(choice))()
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is a result
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
    import torch

    torch.cuda.synchronize()
    return errors


def compile_in_processes(pairs: list[tuple[Task, object]], jobs: int) -> dict[int, str]:
    """{pair index: error} after compiling every pair in ``jobs`` spawned processes."""
    if not pairs:
        return {}
    batches = [list(range(i, len(pairs), jobs)) for i in range(min(jobs, len(pairs)))]
    ctx = multiprocessing.get_context("spawn")
    failed: dict[int, str] = {}
    with cf.ProcessPoolExecutor(max_workers=len(batches), mp_context=ctx) as pool:
        futures = {
            pool.submit(_compile_worker, [(pairs[i][0], pairs[i][1].as_dict()) for i in b]): b
            for b in batches
        }
        for fut in cf.as_completed(futures):
            batch = futures[fut]
            try:
                errors = fut.result()
            except Exception as e:  # noqa: BLE001 - a crashed worker fails its batch
                errors = [f"worker: {type(e).__name__}: {e}"] * len(batch)
            for i, err in zip(batch, errors):
                if err is not None:
                    failed[i] = err
    return failed


def main(argv: list[str] | None = None) -> int:
    import torch

    from flashcon.triton_kernels import config, tuning

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=tuning.TABLE, help="the table to write")
    ap.add_argument("--budget", type=float, default=float("inf"), help="seconds of timing")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--ns", nargs="+", type=int, default=list(NS))
    names = [name for name, _ in FAMILIES]
    ap.add_argument("--families", nargs="+", default=names, choices=names)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--target-s", type=float, default=0.2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune: no CUDA GPU visible", file=sys.stderr)
        return 2
    os.environ[tuning.TABLE_ENV] = "off"  # the defaults are the fixed table's, not a tuned one
    dev = torch.device("cuda")
    arch = config.arch_of(dev)
    work = []
    for t in tasks(args.dtypes, args.ns, args.families):
        prec = config.dot_precision(_torch_dtype(t.dtype))
        work.append((tuning.key(arch, t.kind, _torch_dtype(t.dtype), t.d, t.n, t.flags(prec)), t))

    def candidates(task: Task) -> list:
        return tuning.candidates(task.kind, _torch_dtype(task.dtype), task.d)

    def default(task: Task):
        cfg, resident = config.sym_tiles(task.kind, arch, _torch_dtype(task.dtype), task.d)
        return tuning.Choice(
            cfg.block_m, cfg.block_d, cfg.block_do, cfg.num_warps, cfg.num_stages, resident
        )

    bench = Bench()

    def measure(task: Task, choice) -> float | None:
        try:
            return cuda_time(bench.call(task, choice), args.warmup, args.min_reps, args.target_s)
        except Exception as e:  # noqa: BLE001 - a candidate that fails is no winner
            print(f"  {task} {choice}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
            return None

    t0 = time.perf_counter()
    entries = tune(
        work,
        candidates,
        lambda pairs: compile_in_processes(pairs, args.jobs),
        measure,
        default,
        budget_s=args.budget,
    )
    import triton

    meta = {
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tuning.write(entries, meta, args.out)
    for key, e in entries.items():
        gain = "" if not e["default_ms"] else f" ({e['default_ms'] / e['ms']:.2f}x the default)"
        print(f"{key}: {e['ms']:.3f} ms{gain} {json.dumps(e['choice'])}")
    print(f"wrote {len(entries)} of {len(work)} keys to {args.out} in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
