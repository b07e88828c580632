"""The printed report: the launched specialisations' resources and hot-loop SASS, the
calibration check, the predictions per call, each kernel's bounds, and what the issue's
targets need."""

from __future__ import annotations

from .hardware import GPUS, SM_PIPES
from .launches import LOSSES
from .model import (
    CALIBRATION,
    ISSUE_INTERVAL,
    calibration_rows,
    find_call,
    occupancy,
    predict_call,
    required_factor,
    scaled,
)
from .sass import per_program, per_tile


def print_kernels(data: dict, n_ref: int = 65536) -> None:
    """Registers, shared memory, CTAs/SM and the hot loop's SASS per warp per tile (and the
    SASS executed per tile at ``n_ref``: the straight-line code shared over a program's run)."""
    width = max((len(k) for k in data["kernels"]), default=20)
    head = (
        f"{'specialisation':{width}}  regs smem(B) CTAs/SM (limit) | hot loop per warp per "
        f"tile: total MMA MUFU BAR SHFL LDG LDGSTS atom | per tile at N={n_ref} | loop"
    )
    print(head)
    print("-" * len(head))
    for label, row in sorted(data["kernels"].items(), key=lambda x: (x[1]["arch"], x[0])):
        ctas, why = occupancy(row["regs"], row["shared"], row["warps"], row["arch"])
        c = per_tile(row["sass"])
        lk = next(
            (
                lk
                for call in data["calls"]
                for lk in call["launches"]
                if lk["kernel"] == label and call["n"] == n_ref
            ),
            None,
        )
        exe = "-"
        if lk is not None:
            tiles = sum(t * k for t, k in lk["programs"])
            tot = sum(k * per_program(row["sass"], t)["total"] for t, k in lk["programs"] if t)
            exe = f"{tot / tiles:.0f}"
        src = next(
            (lp["source"] for lp in row["sass"]["loops"] if lp["trip"] == "tiles"),
            "(one tile per program: the whole program)",
        )
        counts = " ".join(
            f"{c[k]:.0f}" for k in ("mma", "mufu", "bar", "shfl", "ldg", "ldgsts", "atom")
        )
        print(
            f"{label:{width}}  {row['regs']:4} {row['shared']:7} {ctas:2} ({why}) | "
            f"{c['total']:.0f}: {counts} | {exe} | {src}"
        )


def prediction_table(
    data: dict, gpus=("H100", "H200"), interval: float = ISSUE_INTERVAL, eff: float | None = None
) -> list[dict]:
    rows = []
    for call in data["calls"]:
        for g in gpus:
            gpu = GPUS[g]
            if gpu.arch != call["arch"]:
                continue
            p = predict_call(data, call, gpu, interval, eff)
            rows.append(
                {
                    "loss": call["loss"],
                    "dtype": call["dtype"],
                    "n": call["n"],
                    "gpu": g,
                    "ms": p["s"] * 1e3,
                    "device_ms": p["device_s"] * 1e3,
                    "host_ms": p["host_s"] * 1e3,
                    "sym_ms": p["sym_s"] * 1e3,
                    "bound": p["bound"],
                    "kernels": [
                        {
                            "kernel": k["kernel"],
                            "ms": k["s"] * 1e3,
                            "limit": k["limit"],
                            "ctas": k["ctas"],
                            "issue_eff": k["eff"],
                            "wave_factor": k["wave_factor"],
                            "bounds_ms": {b: v * 1e3 for b, v in k["bounds"].items()},
                        }
                        for k in p["kernels"]
                    ],
                }
            )
    return rows


def print_predictions(rows: list[dict]) -> None:
    ns = sorted({r["n"] for r in rows})
    gpus = sorted({r["gpu"] for r in rows})
    cols = [(g, n) for g in gpus for n in ns]
    print(f"{'loss':8} {'dtype':5} " + " ".join(f"{g + ' N=' + str(n):>16}" for g, n in cols))
    keys = sorted(
        {(r["loss"], r["dtype"]) for r in rows},
        key=lambda x: (LOSSES.index(x[0]) if x[0] in LOSSES else 9, x[1]),
    )
    for loss, dtype in keys:
        cells = []
        for g, n in cols:
            r = next(
                (
                    r
                    for r in rows
                    if (r["loss"], r["dtype"], r["gpu"], r["n"]) == (loss, dtype, g, n)
                ),
                None,
            )
            if r is None:
                cells.append(f"{'-':>16}")
                continue
            lim = (
                "host"
                if r["bound"] == "host"
                else "/".join(dict.fromkeys(k["limit"] for k in r["kernels"]))
            )
            cells.append(f"{r['ms']:7.3g} ms {lim[:6]:>6}")
        print(f"{loss:8} {dtype:5} " + " ".join(cells))


def print_bounds(rows: list[dict], loss="supcon", dtype="bf16", gpu="H200") -> None:
    keys = (*SM_PIPES, "L2", "atomics", "HBM", "waves")
    print(f"{'N':>6} {'kernel':34} {'ms':>8} CTAs eff  " + " ".join(f"{k:>8}" for k in keys))
    for r in rows:
        if (r["loss"], r["dtype"], r["gpu"]) != (loss, dtype, gpu):
            continue
        for k in r["kernels"]:
            b = k["bounds_ms"]
            print(
                f"{r['n']:6} {k['kernel'].split(']')[0] + ']':34.34} {k['ms']:8.3f} "
                f"{k['ctas']:4} {k['issue_eff']:.2f} " + " ".join(f"{b[x]:8.3f}" for x in keys)
            )
        print(f"{'':6} {'step: device / host':34} {r['device_ms']:8.3f} / {r['host_ms']:.3f} ms")


def print_calibration(calib: dict, interval: float = ISSUE_INTERVAL) -> list[dict]:
    rows = calibration_rows(calib, interval)
    cal = CALIBRATION
    print(
        f"counts: main {calib['commit'][:12]} (Triton {calib['triton']}), "
        f"{cal['loss']} {cal['dtype']} D={calib['d']}, {GPUS[cal['gpu']].name}; "
        f"ISSUE_INTERVAL = {interval:.2f} cycles"
    )
    print(
        f"{'point':34} {'N':>6} {'measured':>9} {'predicted':>10} {'ratio':>6}  bound "
        f"(device / host ms)"
    )
    for r in rows:
        ok = ""
        if "calibration" in r["what"]:
            ok = "  within ±30 %" if abs(r["ratio"] - 1) <= 0.3 else "  OUTSIDE ±30 %"
        print(
            f"{r['what']:34} {r['n']:6} {r['ms']:7.3g}ms {r['pred_ms']:8.3g}ms "
            f"{r['ratio']:6.2f}  {r['bound']} ({r['device_ms']:.3g} / {r['host_ms']:.3g}){ok}"
        )
    return rows


# Issue 25's targets (H200, SupCon bf16, D = 128, 'all' mode, fwd+bwd).
TARGETS = {65536: 8e-3, 16384: 0.8e-3}


def print_targets(data: dict, interval: float) -> None:
    """The instruction counts at which the model meets issue 25's targets, or the floor the
    other bounds set when it cannot."""
    gpu = GPUS["H200"]
    for n, target in TARGETS.items():
        call = find_call(data, "supcon", "bf16", gpu.arch, n)
        if call is None:
            continue
        hots = []
        for lk in call["launches"]:
            row = data["kernels"][lk["kernel"]]
            hot = per_tile(row["sass"])
            hots.append((row["kernel"].strip("_").split("_kernel")[0], hot["total"]))
        for regs, what in ((None, "at today's occupancy"), (128, "at 2 CTAs/SM (<= 128 regs)")):
            f = required_factor(data, call, gpu, target, regs, interval)
            if f is None:
                p = predict_call(scaled(data, 1e-6, regs), call, gpu, interval)
                why = ", ".join(
                    f"{k['kernel'].split('[')[0]} {k['limit']} {k['s'] * 1e3:.3g} ms"
                    for k in p["kernels"]
                )
                print(
                    f"N = {n}: <= {target * 1e3:g} ms {what}: out of reach; without any "
                    f"epilogue {p['s'] * 1e3:.3g} ms ({why})"
                )
                continue
            need = ", ".join(f"{k} <= {v * f:.0f}" for k, v in hots)
            print(
                f"N = {n}: <= {target * 1e3:g} ms {what}: epilogue counts x {f:.2f}: "
                f"hot loop SASS per warp per tile {need}"
            )
