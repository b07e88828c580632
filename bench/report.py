"""Benchmark output: the markdown table, the CSV and the log-log plots of ``bench/run.py``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

# CSV columns: run metadata first (the same on every row), then the point.
META_FIELDS = (
    "date",
    "git_sha",
    "device",
    "device_name",
    "torch",
    "triton",
    "flashcon",
    "python",
    "loss",
    "dtype",
    "D",
)
POINT_FIELDS = (
    "provider",
    "N",
    "M",
    "status",
    "note",
    "fwd_ms_p20",
    "fwd_ms_p50",
    "fwd_ms_p80",
    "bwd_ms_p20",
    "bwd_ms_p50",
    "bwd_ms_p80",
    "fwdbwd_ms_p20",
    "fwdbwd_ms_p50",
    "fwdbwd_ms_p80",
    "reps",
    "peak_mb",
    "mem_method",
    "fwd_gflops",
    "bwd_gflops",
    "fwdbwd_gflops",
    "mm_gflops",
    "frac_of_mm",
    "speedup_vs_reference",
    "loss_value",
    "rel_diff_vs_reference",
    "wall_s",
)


def _num(x, fmt: str = "{:.3g}", empty: str = "—") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)) or x == "":
        return empty
    return fmt.format(x)


def markdown_table(rows: list[dict]) -> str:
    """One line per point (N major, then provider), p50 times; failures show their status."""
    head = (
        "| provider | N | fwd ms | bwd ms | fwd+bwd ms | peak MB | GFLOP/s | of mm "
        "| vs reference | loss Δ vs ref | status |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("N") in (None, ""):
            continue
        ok = r["status"] == "ok"
        status = "ok" if ok else f"{r['status']}: {r.get('note', '')}".strip().rstrip(":")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["provider"],
                    str(r["N"]),
                    _num(r.get("fwd_ms_p50")) if ok else "—",
                    _num(r.get("bwd_ms_p50")) if ok else "—",
                    _num(r.get("fwdbwd_ms_p50")) if ok else "—",
                    _num(r.get("peak_mb"), "{:.4g}") if ok else "—",
                    _num(r.get("fwdbwd_gflops"), "{:.1f}") if ok else "—",
                    _num(r.get("frac_of_mm"), "{:.0%}") if ok else "—",
                    _num(r.get("speedup_vs_reference"), "{:.2f}×") if ok else "—",
                    _num(r.get("rel_diff_vs_reference"), "{:.1e}") if ok else "—",
                    status.replace("|", "/")[:80],
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def write_csv(path: Path, meta: dict, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=META_FIELDS + POINT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**meta, **{k: ("" if r.get(k) is None else r.get(k)) for k in r}})


def _series(rows: list[dict], provider: str, key: str) -> tuple[list[int], list[float]]:
    pts = [
        (r["N"], r[key])
        for r in rows
        if r["provider"] == provider and r["status"] == "ok" and r.get(key) not in (None, "")
    ]
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def _failures(rows: list[dict], provider: str) -> list[tuple[int, str]]:
    return [
        (r["N"], r["status"])
        for r in rows
        if r["provider"] == provider
        and r["status"] in ("oom", "timeout", "error")
        and r.get("N") not in (None, "")
    ]


def plot(rows: list[dict], title: str, time_png: Path, mem_png: Path, mm_floor: dict) -> None:
    """Log-log time (fwd, bwd, fwd+bwd; p50 line, p20–p80 band) and peak memory vs N.

    ``mm_floor`` maps N to the fwd+bwd time torch.mm would take for the model's flops: the
    floor the performance model measures against (dashed line on the fwd+bwd panel).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = list(dict.fromkeys(r["provider"] for r in rows if r.get("N") not in (None, "")))
    colors = {p: f"C{i}" for i, p in enumerate(providers)}

    fig, axes = plt.subplots(1, 3, figsize=(16, 5), sharey=True)
    for ax, mode, label in zip(axes, ("fwd", "bwd", "fwdbwd"), ("forward", "backward", "fwd+bwd")):
        for p in providers:
            n, t50 = _series(rows, p, f"{mode}_ms_p50")
            if not n:
                continue
            _, t20 = _series(rows, p, f"{mode}_ms_p20")
            _, t80 = _series(rows, p, f"{mode}_ms_p80")
            ax.plot(n, t50, "o-", color=colors[p], label=p, ms=4)
            if len(t20) == len(n) and len(t80) == len(n):
                ax.fill_between(n, t20, t80, color=colors[p], alpha=0.2, lw=0)
            for _, st in _failures(rows, p):
                ax.annotate(
                    st,
                    (n[-1], t50[-1]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=colors[p],
                )
                break
        if mode == "fwdbwd" and mm_floor:
            ns = sorted(mm_floor)
            ax.plot(ns, [mm_floor[x] for x in ns], "k--", lw=1, label="torch.mm floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (batch rows)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time, ms (p50; band p20–p80)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(time_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for p in providers:
        n, mb = _series(rows, p, "peak_mb")
        if not n:
            continue
        ax.plot(n, [max(m, 1e-3) for m in mb], "o-", color=colors[p], label=p, ms=4)
        for _, st in _failures(rows, p):
            ax.annotate(
                st,
                (n[-1], max(mb[-1], 1e-3)),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=colors[p],
            )
            break
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (batch rows)")
    ax.set_ylabel("peak memory above inputs, MB")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(mem_png, dpi=110)
    plt.close(fig)
