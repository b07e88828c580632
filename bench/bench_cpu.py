"""CPU benchmark of the C++ kernels: SupCon forward+backward, fp32, against the dense reference.

Prints, for each N, the p20/p50/p80 time of four providers measured in the same run,
interleaved: ``backend='cpu'`` through the symmetric 'all'-mode ops (``sym``, the default),
the same backend with ``flashcon.engine.set_symmetric(False)`` (``general``: the rectangular
ops with q = k), the dense eager ``flashcon.reference.supcon_loss`` (``dense``) and
``torch.compile`` of it (``compiled``); their ratios to ``sym``; the achieved flop/s of both
fused paths (the flops each performs: 8·N²·D per forward+backward for the general path,
4·N²·D for the symmetric one, which computes each unordered tile pair once) beside torch.mm's
flop/s at the kernel's tile shapes; and the peak extra memory of one forward+backward at a
large N for both paths (each in a fresh subprocess, from the peak resident set size).

    .venv/bin/python bench/bench_cpu.py                 # N = 2048, 8192; memory at 32768
    .venv/bin/python bench/bench_cpu.py --n 4096 --repeats 3 --mem-n 16384 --no-compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import torch

import flashcon
from flashcon import engine, reference

TILE_ROWS, TILE_COLS = 128, 512  # csrc/cpu/engine_cpu.cpp: kRows, kCols


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return q[1], statistics.median(xs), q[7]


def make_inputs(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n // 2, 2, d, generator=g), dim=-1)
    labels = torch.randint(0, max(2, n // 20), (n // 2,), generator=g)
    return z, labels


def fwd_bwd(fn, z, labels) -> float:
    x = z.clone().requires_grad_(True)
    t0 = time.perf_counter()
    loss = fn(x, labels)
    loss.backward()
    return time.perf_counter() - t0


def cpu_loss(x, labels):
    return flashcon.supcon_loss(x, labels, temperature=0.1, backend="cpu")


def sym_loss(x, labels):
    engine.set_symmetric(True)
    return cpu_loss(x, labels)


def general_loss(x, labels):
    engine.set_symmetric(False)
    try:
        return cpu_loss(x, labels)
    finally:
        engine.set_symmetric(True)


def dense_loss(x, labels):
    return reference.supcon_loss(x, labels, temperature=0.1)


_compiled_dense = None


def compiled_loss(x, labels):
    global _compiled_dense
    if _compiled_dense is None:
        _compiled_dense = torch.compile(dense_loss)
    return _compiled_dense(x, labels)


def mm_flops(d: int, repeats: int = 100) -> float:
    """Aggregate flop/s of torch.mm at the kernel's tile shapes, one stream per thread.

    Each thread runs the three tile products of the backward (S = Q·Kᵀ, dQ += G·K, dK += Gᵀ·Q)
    single-threaded, all threads at once: the same load the fused kernel puts on the machine.
    """
    threads = torch.get_num_threads()
    a = torch.randn(TILE_ROWS, d)
    b = torch.randn(TILE_COLS, d)
    g = torch.randn(TILE_ROWS, TILE_COLS)
    times: list[float] = []

    def work():
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b.T)
            torch.mm(g, b)
            torch.mm(g.T, a)
        times.append(time.perf_counter() - t0)

    torch.set_num_threads(1)
    try:
        work()  # warm-up
        times.clear()
        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        torch.set_num_threads(threads)
    return threads * repeats * 3 * 2 * TILE_ROWS * TILE_COLS * d / max(times)


def mm_flops_full(n: int, d: int, repeats: int = 5) -> float:
    """Multi-threaded flop/s of torch.mm at the full [N, D]·[D, N] shape (for reference)."""
    a = torch.randn(n, d)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, a.T)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * n * d / best


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(n: int, d: int, symmetric: bool) -> None:
    engine.set_symmetric(symmetric)
    z, labels = make_inputs(n, d)
    x = z.clone().requires_grad_(True)
    cpu_loss(x[:32], labels[:32])  # load the kernels and warm the allocator
    # Reset the peak resident set size (Linux: "5" to clear_refs), then measure its growth.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _vm_kib("VmRSS")
    loss = cpu_loss(x, labels)
    loss.backward()
    peak = _vm_kib("VmHWM")
    print(json.dumps({"extra_bytes": (peak - base) * 1024, "input_bytes": z.numel() * 4}))


def peak_memory(n: int, d: int, symmetric: bool) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--mem-child", str(n), "--d", str(d)]
        + ([] if symmetric else ["--general"]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mem-n", type=int, default=32768)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(dense)")
    ap.add_argument("--mem-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--general", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_child:
        peak_memory_child(args.mem_child, args.d, symmetric=not args.general)
        return

    d = args.d
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, SupCon fwd+bwd fp32, D={d}"
    )
    mm = mm_flops(d)
    print(f"torch.mm at the tile shapes ({TILE_ROWS}x{TILE_COLS}x{d}): {mm / 1e9:.1f} GFLOP/s")
    print()
    providers = {"sym": sym_loss, "general": general_loss, "dense": dense_loss}
    if not args.no_compile:
        providers["compiled"] = compiled_loss
    names = list(providers)
    print(
        "| N | "
        + " | ".join(f"{p} p20/p50/p80 (s)" for p in names)
        + " | "
        + " | ".join(f"{p}/sym" for p in names[1:])
        + " | sym GFLOP/s (of mm) | general GFLOP/s (of mm) |"
    )
    print("|---" * (1 + 2 * len(names) + 1) + "|")
    for n in args.n:
        z, labels = make_inputs(n, d)
        for fn in providers.values():  # warm-up (and compilation)
            fwd_bwd(fn, z, labels)
        times: dict[str, list[float]] = {p: [] for p in names}
        for _ in range(args.repeats):
            for p in names:
                times[p].append(fwd_bwd(providers[p], z, labels))
        q = {p: quantiles(times[p]) for p in names}
        f_sym = 4 * n * n * d / q["sym"][1]
        f_gen = 8 * n * n * d / q["general"][1]
        print(
            f"| {n} | "
            + " | ".join(f"{q[p][0]:.3f}/{q[p][1]:.3f}/{q[p][2]:.3f}" for p in names)
            + " | "
            + " | ".join(f"{q[p][1] / q['sym'][1]:.2f}x" for p in names[1:])
            + f" | {f_sym / 1e9:.1f} ({f_sym / mm:.0%}) | {f_gen / 1e9:.1f} ({f_gen / mm:.0%}) |"
        )
    print(
        f"\ntorch.mm full [{args.n[-1]}x{d}]·[{d}x{args.n[-1]}]: "
        f"{mm_flops_full(args.n[-1], d) / 1e9:.1f} GFLOP/s"
    )
    if args.mem_n:
        for symmetric in (True, False):
            mem = peak_memory(args.mem_n, d, symmetric)
            print(
                f"peak extra memory of fwd+bwd at N={args.mem_n}, D={d}, "
                f"{'symmetric' if symmetric else 'general'} path (peak RSS growth in a fresh "
                f"process): {mem['extra_bytes'] / 2**20:.1f} MiB "
                f"(the features themselves: {mem['input_bytes'] / 2**20:.1f} MiB)"
            )


if __name__ == "__main__":
    main()
