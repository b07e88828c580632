"""Benchmark output: the markdown table, the CSV and the log-log plots of ``bench/run.py``.

Nothing here imports torch: ``tools/gpu_check.py`` reads the CSVs with it before any GPU
work starts.
"""

from __future__ import annotations

import csv
import math
import subprocess
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
    "threads",
    "import_torch_s",
    "import_flashcon_s",
    "imports_triton",
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
    "speedup_vs_reference_compile",
    "loss_value",
    "rel_diff_vs_reference",
    "wall_s",
)
# The dense baselines every point is compared with: provider -> CSV column of the speed-up
# (the baseline's fwd+bwd p50 over the point's, at the same N).
BASELINES = {
    "reference": "speedup_vs_reference",
    "reference-compile": "speedup_vs_reference_compile",
}
# CSV columns read back as integers, and as text; the others as numbers where they parse.
INT_FIELDS = ("N", "M", "reps", "D", "threads")
TEXT_FIELDS = (
    *(f for f in META_FIELDS if f not in ("D", "threads", "import_torch_s", "import_flashcon_s")),
    "provider",
    "status",
    "note",
    "mem_method",
)


def git_sha(repo: Path) -> str:
    """Short commit of ``repo``, with ``+dirty`` when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def flop_unit(device: str) -> tuple[str, float]:
    """Flop-rate unit of a device's tables and the divisor that takes GFLOP/s to it.

    GPUs run at 10-1000 TFLOP/s and CPUs at 10-1000 GFLOP/s: each reads best in its own unit.
    The CSV keeps GFLOP/s (``*_gflops``) on every device."""
    return ("TFLOP/s", 1e3) if str(device).startswith("cuda") else ("GFLOP/s", 1.0)


def rel_diff(value: float, ref: float) -> float:
    if not (math.isfinite(value) and math.isfinite(ref)):
        return math.nan
    return abs(value - ref) / max(abs(ref), 1e-12)


def add_comparisons(rows: list[dict], mm_gflops: dict[int, float]) -> None:
    """Fill in what needs the whole N column: the fraction of torch.mm's rate (``mm_gflops``
    maps N to it), the speed-ups over the dense baselines and the loss value's difference
    from the eager reference's."""
    ok = [r for r in rows if r.get("status") == "ok"]
    base = {p: {r["N"]: r for r in ok if r["provider"] == p} for p in BASELINES}
    for r in ok:
        if mm_gflops.get(r["N"]):
            r["mm_gflops"] = mm_gflops[r["N"]]
            r["frac_of_mm"] = r["fwdbwd_gflops"] / r["mm_gflops"]
        for provider, column in BASELINES.items():
            b = base[provider].get(r["N"])
            if b is not None:
                r[column] = b["fwdbwd_ms_p50"] / r["fwdbwd_ms_p50"]
        ref = base["reference"].get(r["N"])
        if ref is not None and r.get("loss_value") is not None:
            if ref.get("loss_value") is not None:
                r["rel_diff_vs_reference"] = rel_diff(r["loss_value"], ref["loss_value"])


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV written by :func:`write_csv`, numbers parsed back (empty cells: None)."""
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    rows = []
    for r in raw:
        row: dict = {}
        for k, v in r.items():
            if v is None or v == "":
                row[k] = None
                continue
            if k in TEXT_FIELDS:
                row[k] = v
                continue
            try:
                row[k] = int(v) if k in INT_FIELDS else float(v)
            except ValueError:
                row[k] = v
        rows.append(row)
    return rows


def num(x, fmt: str = "{:.3g}", empty: str = "—") -> str:
    """A table cell: ``x`` formatted, or ``empty`` for a missing or non-finite value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)) or x == "":
        return empty
    return fmt.format(x)


def markdown_table(rows: list[dict], device: str = "cpu") -> str:
    """One line per point (in the order given), p50 times; failures show their status.

    The flop rate is in TFLOP/s on GPUs and GFLOP/s on CPUs (:func:`flop_unit`)."""
    unit, div = flop_unit(device)
    head = (
        f"| provider | N | fwd ms | bwd ms | fwd+bwd ms | peak MB | {unit} | of mm "
        "| vs eager dense | vs compiled dense | loss Δ vs ref | status |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("N") in (None, ""):
            continue
        ok = r["status"] == "ok"
        status = "ok" if ok else f"{r['status']}: {r.get('note') or ''}".strip().rstrip(":")
        rate = r.get("fwdbwd_gflops")
        cells = [
            num(r.get("fwd_ms_p50")),
            num(r.get("bwd_ms_p50")),
            num(r.get("fwdbwd_ms_p50")),
            num(r.get("peak_mb"), "{:.4g}"),
            num(None if rate is None else rate / div, "{:.1f}"),
            num(r.get("frac_of_mm"), "{:.0%}"),
            num(r.get("speedup_vs_reference"), "{:.2f}×"),
            num(r.get("speedup_vs_reference_compile"), "{:.2f}×"),
            num(r.get("rel_diff_vs_reference"), "{:.1e}"),
        ]
        if not ok:
            cells = ["—"] * len(cells)
        row = [r["provider"], str(r["N"]), *cells, status.replace("|", "/")[:80]]
        lines.append("| " + " | ".join(row) + " |")
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


def plot(rows: list[dict], title: str, time_png: Path, mem_png: Path, mm_floor: dict) -> bool:
    """Log-log time (fwd, bwd, fwd+bwd; p50 line, p20–p80 band) and peak memory vs N.

    ``mm_floor`` maps N to the fwd+bwd time torch.mm would take for the model's flops: the
    floor the performance model measures against (dashed line on the fwd+bwd panel).
    Returns False, drawing nothing, where matplotlib is not installed (a GPU machine with
    torch only): the table and the CSV do not need it.
    """
    try:
        import matplotlib
    except ImportError:
        return False

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
    if axes[-1].get_legend_handles_labels()[0]:
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
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(mem_png, dpi=110)
    plt.close(fig)
    return True
