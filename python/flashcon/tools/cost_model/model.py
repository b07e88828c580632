"""The model: occupancy, a launch's bounds and time (``kernel_time``), a call's
(``predict_call``), the one fitted constant with its calibration (``fit_interval``), and the
epilogue what-ifs (``scaled``, ``required_factor``)."""

from __future__ import annotations

import heapq
import json
import math
from pathlib import Path

from .hardware import (
    ARCH,
    ATOMIC_FRACTION_OF_L2,
    DEVICE_OP_S,
    GPUS,
    HOST_ATEN_S,
    HOST_TRITON_S,
    L1_BYTES_PER_CLK,
    MUFU_PER_CLK,
    SHFL_PER_CLK,
    SM_PIPES,
    Gpu,
)
from .sass import add_counts, per_program, traffic

# The one fitted constant: cycles between consecutive issues of one warp of these kernels
# (their dependency, barrier, shuffle, MUFU and load waits, on average). A scheduler holding w
# warps issues min(1, w / ISSUE_INTERVAL) instructions per clock. Fitted by ``--fit`` so that
# the counts of main a986ea9 (calibration_a986ea9.json) give the measured 34.5 ms at
# N = 65 536 (SupCon bf16 D = 128, H200); checked against that run's other points, not fitted.
ISSUE_INTERVAL = 11.90

# The measured points of main a986ea9 on the H200 (README "GPU": SupCon 'all' mode, τ = 0.1,
# D = 128, bf16, fwd+bwd, median of >= 5 CUDA-event timings; the N = 4096 profile: its two
# symmetric kernels took 0.13 ms of 6.2 ms, 229 kernel launches).
CALIBRATION = {
    "commit": "a986ea9",
    "gpu": "H200",
    "loss": "supcon",
    "dtype": "bf16",
    "n": 65536,
    "ms": 34.5,
}
CHECKS = [
    {"what": "fwd+bwd", "n": 16384, "ms": 6.80},
    {"what": "fwd+bwd", "n": 4096, "ms": 6.05},
    {"what": "symmetric kernels only (profile)", "n": 4096, "ms": 0.13},
]
CALIBRATION_FILE = Path(__file__).with_name("calibration_a986ea9.json")

# Device operations per fwd+bwd of the fused 'all'-mode losses (launch_count on the CPU at
# this code): the host bound where a run did not count them (--no-ops, e.g. on a machine whose
# Triton interpreter cannot run the kernels).
OPS_FALLBACK = {
    "supcon": {"aten": 2, "triton": 11},
    "ntxent": {"aten": 2, "triton": 11},
    "tcl": {"aten": 2, "triton": 11},
    "sincere": {"aten": 2, "triton": 14},
}


def occupancy(regs: int, shared: int, warps: int, arch: int) -> tuple[int, str]:
    """(CTAs per SM, the limiting resource) as CUDA's occupancy calculator computes them:
    registers per warp rounded up to the allocation unit, each of the 4 sub-partitions holding
    whole warps; shared memory per CTA plus the reserved 1 KB, rounded to 128 B."""
    lim = ARCH[arch]
    per_warp = -(-max(regs, 1) * 32 // lim.reg_unit) * lim.reg_unit
    sub = lim.regs_per_sm // lim.schedulers
    warps_by_regs = (sub // per_warp) * lim.schedulers
    by = {
        "registers": warps_by_regs // warps,
        "warps": lim.warps_per_sm // warps,
        "CTA limit": lim.ctas_per_sm,
    }
    smem = -(-(shared + lim.smem_reserved) // lim.smem_unit) * lim.smem_unit
    by["shared memory"] = lim.smem_per_sm // smem if shared > 0 else lim.ctas_per_sm
    ctas = min(by.values())
    why = min(by, key=lambda k: (by[k], list(by).index(k)))
    return ctas, why


def makespan(durations: list[tuple[float, int]], slots: int) -> float:
    """Finish time of programs (runs of (duration, count) in launch order) list-scheduled on
    ``slots`` identical slots: each program starts on the first slot to free up."""
    runs = [(t, k) for t, k in durations if t > 0 and k > 0]
    if not runs:
        return 0.0
    if len({t for t, _ in runs}) == 1:
        return math.ceil(sum(k for _, k in runs) / slots) * runs[0][0]
    heap = [0.0] * slots
    for t, k in runs:
        for _ in range(k):
            heapq.heappush(heap, heapq.heappop(heap) + t)
    return max(heap)


def kernel_time(
    row: dict,
    programs: list,
    gpu: Gpu,
    n: int,
    d: int,
    interval: float = ISSUE_INTERVAL,
    eff: float | None = None,
) -> dict:
    """Predicted seconds of one launch and its bounds (see the module docstring); ``eff``
    replaces the occupancy-dependent issue efficiency (a sensitivity check)."""
    warps = row["warps"]
    ctas, why = occupancy(row["regs"], row["shared"], warps, row["arch"])
    w = ctas * warps / ARCH[row["arch"]].schedulers
    if eff is None:
        eff = min(1.0, w / interval)
    clk = gpu.clock_hz
    flops_clk = {k: v / (gpu.sms * clk) for k, v in gpu.mma_flops.items()}

    def cycles(c: dict) -> dict:
        return {
            "issue": c["total"] * warps / (4 * eff),
            "tensor": warps * sum(c[f"mma_flops_{k}"] / flops_clk[k] for k in flops_clk),
            "mufu": c["mufu"] * warps * 32 / MUFU_PER_CLK,
            "shfl": c["shfl"] * warps * 32 / SHFL_PER_CLK,
        }

    totals: dict = {}
    durations = []
    l2 = atom = 0.0
    for tiles, k in programs:
        if tiles == 0:
            continue
        c = per_program(row["sass"], tiles)
        tr = traffic(row["sass"], tiles, row["cfg"][5])
        cy = cycles(c)
        cy["L1"] = tr["l1"] * warps / L1_BYTES_PER_CLK
        totals = add_counts(totals, cy, k)
        durations.append((max(cy.values()) * ctas / clk, k))
        l2 += k * warps * tr["l2"]
        atom += k * warps * tr["atom"]
    elem = 4 if row["dtype"] == "fp32" else 2
    hbm = n * d * elem + (n * d * 4 if "bwd" in row["kernel"] else 4 * n * 4)
    bounds = {k: v / (gpu.sms * clk) for k, v in totals.items()}
    bounds["L2"] = l2 / gpu.l2_bytes_s
    bounds["atomics"] = atom / (gpu.l2_bytes_s * ATOMIC_FRACTION_OF_L2)
    bounds["HBM"] = hbm / gpu.hbm_bytes_s
    sm = makespan(durations, gpu.sms * ctas)
    sm_ideal = max(bounds[k] for k in SM_PIPES)
    bounds["waves"] = sm
    t = max(sm, bounds["L2"], bounds["atomics"], bounds["HBM"])
    limit = max(("waves", "L2", "atomics", "HBM"), key=lambda k: bounds[k])
    if limit == "waves":  # the SM bound: name the pipe, and whether the tail adds to it
        limit = max(SM_PIPES, key=lambda k: bounds[k])
    return {
        "s": t + DEVICE_OP_S,
        "bounds": bounds,
        "limit": limit,
        "ctas": ctas,
        "why": why,
        "eff": eff,
        "wave_factor": sm / sm_ideal if sm_ideal else 1.0,
    }


def predict_call(
    data: dict, call: dict, gpu: Gpu, interval: float = ISSUE_INTERVAL, eff: float | None = None
) -> dict:
    """Predicted fwd+bwd seconds of one call: max(device, host)."""
    kernels = []
    for lk in call["launches"]:
        row = data["kernels"][lk["kernel"]]
        kt = kernel_time(row, lk["programs"], gpu, call["n"], data["d"], interval, eff)
        kernels.append({"kernel": lk["kernel"], **kt})
    ops = data.get("ops", {}).get(call["loss"]) or OPS_FALLBACK[call["loss"]]
    n_ops = ops["aten"] + ops["triton"]
    device = sum(k["s"] for k in kernels) + max(n_ops - len(kernels), 0) * DEVICE_OP_S
    host = ops["aten"] * HOST_ATEN_S + ops["triton"] * HOST_TRITON_S
    return {
        "s": max(device, host),
        "device_s": device,
        "host_s": host,
        "sym_s": sum(k["s"] for k in kernels),
        "kernels": kernels,
        "bound": "host" if host > device else "device",
    }


def find_call(data: dict, loss: str, dtype: str, arch: int, n: int) -> dict | None:
    for c in data["calls"]:
        if (c["loss"], c["dtype"], c["arch"], c["n"]) == (loss, dtype, arch, n):
            return c
    return None


def fit_interval(calib: dict) -> float:
    """ISSUE_INTERVAL at which the calibration call's prediction is the measured time
    (bisection: the prediction does not decrease as the interval grows)."""
    cal = CALIBRATION
    call = find_call(calib, cal["loss"], cal["dtype"], GPUS[cal["gpu"]].arch, cal["n"])
    if call is None:
        raise SystemExit("the calibration file has no call for the calibration point")
    target = cal["ms"] * 1e-3
    lo, hi = 0.25, 256.0
    if predict_call(calib, call, GPUS[cal["gpu"]], lo)["s"] > target:
        raise SystemExit("the other bounds alone exceed the measured time: nothing to fit")
    for _ in range(60):
        mid = (lo + hi) / 2
        if predict_call(calib, call, GPUS[cal["gpu"]], mid)["s"] < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def calibration_rows(calib: dict, interval: float = ISSUE_INTERVAL) -> list[dict]:
    """The measured points of the calibration commit beside the model's predictions."""
    cal = CALIBRATION
    gpu = GPUS[cal["gpu"]]
    rows = []
    for pt in [{"what": "fwd+bwd (calibration)", "n": cal["n"], "ms": cal["ms"]}, *CHECKS]:
        call = find_call(calib, cal["loss"], cal["dtype"], gpu.arch, pt["n"])
        if call is None:
            continue
        p = predict_call(calib, call, gpu, interval)
        ms = (p["sym_s"] if "kernels only" in pt["what"] else p["s"]) * 1e3
        rows.append(
            {
                **pt,
                "pred_ms": ms,
                "ratio": ms / pt["ms"],
                "bound": p["bound"],
                "host_ms": p["host_s"] * 1e3,
                "device_ms": p["device_s"] * 1e3,
            }
        )
    return rows


# What a rewrite of the tile epilogue changes (``scaled``): the issued instructions, shuffles,
# barriers, LDG/shared traffic; not the tensor-core work, the exponentials, the operand tiles
# staged from L2 nor the atomics (the loss's own arithmetic and data movement).
EPILOGUE_KEYS = ("total", "shfl", "bar", "ldg", "lds", "sts", "ldg_bytes", "smem_bytes")


def scaled(data: dict, factor: float, regs: int | None = None) -> dict:
    """``data`` with every symmetric kernel's ``EPILOGUE_KEYS`` counts × ``factor`` (and, given
    ``regs``, that register count): what-if kernels for the targets."""
    out = json.loads(json.dumps(data))
    for row in out["kernels"].values():
        for c in [row["sass"]["straight"], *(lp["body"] for lp in row["sass"]["loops"])]:
            for k in EPILOGUE_KEYS:
                c[k] *= factor
        if regs is not None:
            row["regs"] = regs
    return out


def required_factor(data: dict, call: dict, gpu: Gpu, target_s: float, regs=None, interval=None):
    """Largest factor on the epilogue's counts at which ``call`` meets ``target_s`` (None: not
    even without an epilogue, i.e. the loss's own work or data movement is above the target)."""
    interval = ISSUE_INTERVAL if interval is None else interval

    def t(f):
        return predict_call(scaled(data, f, regs), call, gpu, interval)["s"]

    if t(1e-6) > target_s:
        return None
    lo, hi = 1e-6, 1.0
    while t(hi) <= target_s:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t(mid) <= target_s else (lo, mid)
    return lo
