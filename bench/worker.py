"""Measure one benchmark point in this process: ``python bench/worker.py '<json spec>'``.

``bench/run.py`` starts one worker per (provider, N) so that every point runs in isolation (an
out-of-memory or a hang ends that process only) and so that CPU peak memory can be read from
the process's own high-water mark. The result is one line ``@@RESULT {json}`` on stdout.

Timing. After ``warmup`` untimed calls (they include ``torch.compile``'s compilation and
Triton's JIT), each repetition times the forward (the loss call, with autograd recording) and
the backward (``torch.autograd.grad`` of the loss w.r.t. the inputs) separately; fwd+bwd is
their sum within the repetition. Repetitions continue until ``min_reps`` are done and
``target_s`` seconds have been spent, or ``max_reps`` are done. CPU: ``time.perf_counter``
(the ops are synchronous). CUDA: CUDA events around each phase, synchronised per repetition.

Peak memory is the most memory in use during the first timed repetition, *above* what was in
use just before it (inputs, the compiled code, the allocator state): outputs, saved tensors,
temporaries and gradients. CUDA: ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, less ``memory_allocated()`` before. CPU: the resident-set
high-water mark of the process (``VmHWM`` in ``/proc/self/status``), reset to the current RSS
by writing ``5`` to ``/proc/self/clear_refs`` just before the repetition (Linux ≥ 4.0), less
the RSS then. ``malloc_trim(0)`` first returns glibc's freed heap pages to the system, so
memory reused from the heap counts as well. Where ``clear_refs`` cannot be written, a thread
samples ``VmRSS`` every millisecond (a lower bound).

The torch.mm reference (``measure_mm``): ``[N, D] × [D, N]`` in the benchmark dtype, computed
in blocks of rows into a preallocated output of at most ``MM_BLOCK_ELEMS`` elements (so that
it fits where the N×N result would not): 2·N²·D flops per product.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import resource
import sys
import threading
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import providers  # noqa: E402

RESULT_TAG = "@@RESULT "
MM_BLOCK_ELEMS = 1 << 26


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _CpuPeak:
    """Peak RSS above the current RSS while the context is open (see the module docstring)."""

    def __init__(self):
        self.peak = 0
        self.method = "VmHWM"
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = _status_bytes("VmRSS:") or 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            hwm = _status_bytes("VmHWM:")
            if hwm is None or hwm > self.base + (16 << 20):
                raise OSError("VmHWM was not reset")
        except OSError:
            self.method = "sampled VmRSS"
            self._sampled = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _status_bytes("VmRSS:") or 0)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            top = self._sampled
        else:
            top = _status_bytes("VmHWM:") or 0
        self.peak = max(0, top - self.base)
        return False


def _limit_cpu_memory(limit_bytes: int) -> None:
    """Make allocations beyond ``limit_bytes`` more than now fail (MemoryError / RuntimeError)
    instead of waking the system's OOM killer. Address space, so libraries count: only CPU."""
    vm = _status_bytes("VmSize:")
    if not vm or limit_bytes <= 0:
        return
    cap = vm + limit_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return any(
        s in text
        for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc")
    )


def _quantiles(xs: list[float]) -> list[float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in (0.2, 0.5, 0.8)]


def _step(fn, args, params, cuda: bool) -> tuple[float, float, float]:
    """One forward + backward; returns (fwd seconds, bwd seconds, loss value)."""
    if cuda:
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        loss = fn(*args)
        ev[1].record()
        torch.autograd.grad(loss, params)
        ev[2].record()
        torch.cuda.synchronize()
        return ev[0].elapsed_time(ev[1]) / 1e3, ev[1].elapsed_time(ev[2]) / 1e3, loss.item()
    t0 = time.perf_counter()
    loss = fn(*args)
    t1 = time.perf_counter()
    torch.autograd.grad(loss, params)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, loss.item()


def _reps(spec: dict, one) -> list:
    out, start = [], time.perf_counter()
    if spec["max_reps"] <= 0:
        return out
    while len(out) < spec["max_reps"]:
        out.append(one())
        if len(out) >= spec["min_reps"] and time.perf_counter() - start >= spec["target_s"]:
            break
    return out


def measure_loss(spec: dict, device: torch.device, dtype: torch.dtype) -> dict:
    cuda = device.type == "cuda"
    loss, n, d = spec["loss"], spec["n"], spec["d"]
    args, params = providers.make_inputs(loss, n, d, dtype, device, seed=spec["seed"])
    fn = providers.make_loss_fn(spec["provider"], loss)
    for _ in range(spec["warmup"]):
        _step(fn, args, params, cuda)
    gc.collect()

    # The first timed repetition also measures peak memory.
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        first = _step(fn, args, params, cuda)
        peak, method = torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    else:
        with _CpuPeak() as p:
            first = _step(fn, args, params, cuda)
        peak, method = p.peak, p.method
    rest = {**spec, "min_reps": spec["min_reps"] - 1, "max_reps": spec["max_reps"] - 1}
    reps = [first] + _reps(rest, lambda: _step(fn, args, params, cuda))
    fwd = [r[0] for r in reps]
    bwd = [r[1] for r in reps]
    return {
        "status": "ok",
        "fwd": _quantiles(fwd),
        "bwd": _quantiles(bwd),
        "fwdbwd": _quantiles([a + b for a, b in zip(fwd, bwd)]),
        "reps": len(reps),
        "peak_bytes": int(peak),
        "mem_method": method,
        "loss_value": reps[-1][2],
    }


def measure_mm(spec: dict, device: torch.device, dtype: torch.dtype) -> float:
    """flop/s of torch.mm at the benchmark's shapes ([N, D] × [D, N]), see the docstring."""
    n, d = spec["n"], spec["d"]
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(d, n, generator=g).to(device=device, dtype=dtype)
    rows = max(1, min(n, MM_BLOCK_ELEMS // n))
    out = torch.empty(rows, n, device=device, dtype=dtype)

    def product() -> float:
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        t0 = time.perf_counter()
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            torch.mm(a[r0:r1], b, out=out[: r1 - r0])
        if cuda:
            e1.record()
            torch.cuda.synchronize()
            return e0.elapsed_time(e1) / 1e3
        return time.perf_counter() - t0

    for _ in range(spec["warmup"]):
        product()
    times = _reps({**spec, "target_s": min(spec["target_s"], 1.0)}, product)
    return 2.0 * n * n * d / _quantiles(times)[1]


def run_point(spec: dict) -> dict:
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    if device.type == "cpu" and spec.get("mem_limit_bytes"):
        _limit_cpu_memory(int(spec["mem_limit_bytes"]))
    torch.manual_seed(spec["seed"])
    try:
        result = measure_loss(spec, device, dtype)
    except Exception as e:  # noqa: BLE001  (every failure is a result of the point)
        status = "oom" if _is_oom(e) else "error"
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        result = {"status": status, "note": f"{type(e).__name__}: {last}"[:300]}
        if status == "error":
            traceback.print_exc()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if spec.get("measure_mm"):
        try:
            result["mm_flops"] = measure_mm(spec, device, dtype)
        except Exception as e:  # noqa: BLE001
            result["mm_note"] = f"torch.mm failed: {type(e).__name__}: {e}"[:300]
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = run_point(spec)
    for k in ("loss_value", "mm_flops"):
        if k in result and not math.isfinite(result[k]):
            result[k] = None
    print(RESULT_TAG + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
