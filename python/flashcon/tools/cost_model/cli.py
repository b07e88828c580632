"""Static GPU cost model of the symmetric 'all'-mode kernels (no GPU needed).

The command line, ``python -m flashcon.tools.cost_model``: counts collected (compiled, from
``--from-json``, or from another checkout with ``--tree``), the report printed, counts and
predictions written with ``--json``. The commands: the package's docstring."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

from .compiling import collect, collect_tree
from .hardware import DEVICE_OP_S, GPUS, HOST_ATEN_S, HOST_TRITON_S
from .launches import D_DEFAULT, DTYPES, LOSSES, NS
from .model import CALIBRATION_FILE, ISSUE_INTERVAL, fit_interval, kernel_time
from .report import (
    prediction_table,
    print_bounds,
    print_calibration,
    print_kernels,
    print_predictions,
    print_targets,
)


def main(argv=None) -> int:
    # prog: the tool's name on the usage line (from argv[0] it would be __main__.py).
    p = argparse.ArgumentParser(prog="cost_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=("bf16", "fp16", "fp32"))
    p.add_argument("--archs", nargs="+", type=int, default=[80, 90], choices=(80, 90))
    p.add_argument("--ns", nargs="+", type=int, default=list(NS))
    p.add_argument("--d", type=int, default=D_DEFAULT)
    p.add_argument("--json", help="write counts and predictions here")
    p.add_argument("--from-json", help="read counts from a file --json wrote (no compile)")
    p.add_argument("--tree", help="model another checkout (its launchers and kernels)")
    p.add_argument("--calibration-json", help="write the collected counts as a calibration file")
    p.add_argument("--calibration", default=str(CALIBRATION_FILE), help="calibration counts")
    p.add_argument("--fit", action="store_true", help="refit ISSUE_INTERVAL on the calibration")
    p.add_argument("--no-ops", action="store_true", help="skip counting device operations")
    p.add_argument("-j", "--jobs", type=int, default=1, help="parallel compiles")
    p.add_argument("--collect-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.from_json:
        # Compiling needs the kernels as jit functions: no interpreter (before they are
        # imported, as kernel_report does).
        os.environ["TRITON_INTERPRET"] = "0"
    if args.collect_worker:
        data = collect(
            args.losses,
            args.dtypes,
            args.archs,
            args.ns,
            args.d,
            not args.no_ops,
            os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or None,
            args.jobs,
        )
        Path(args.collect_worker).write_text(json.dumps(data))
        return 0
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        data = data.get("counts", data)
    elif args.tree:
        passthrough = [
            "--losses",
            *args.losses,
            "--dtypes",
            *args.dtypes,
            "--archs",
            *map(str, args.archs),
            "--ns",
            *map(str, args.ns),
            "--d",
            str(args.d),
            "-j",
            str(args.jobs),
        ]
        if args.no_ops:
            passthrough.append("--no-ops")
        data = collect_tree(Path(args.tree).resolve(), passthrough)
    else:
        data = collect(
            args.losses, args.dtypes, args.archs, args.ns, args.d, not args.no_ops, None, args.jobs
        )
    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    data["command"] = env + shlex.join(
        ["python", "-m", "flashcon.tools.cost_model", *(argv if argv is not None else sys.argv[1:])]
    )
    if args.calibration_json:
        Path(args.calibration_json).write_text(json.dumps(data, separators=(",", ":")) + "\n")
    calib = (
        json.loads(Path(args.calibration).read_text()) if Path(args.calibration).exists() else None
    )
    interval = ISSUE_INTERVAL
    if args.fit:
        if calib is None:
            raise SystemExit(f"no calibration counts at {args.calibration}")
        interval = fit_interval(calib)
        print(f"fitted ISSUE_INTERVAL = {interval:.2f} cycles (module: {ISSUE_INTERVAL})")
    print(
        f"\n== Specialisations launched (main {data['commit'][:12]}, Triton {data['triton']}, "
        f"maxnreg {data['maxnreg']}, D = {data['d']})"
    )
    print_kernels(data)
    cal_rows = []
    if calib is not None:
        print("\n== Calibration check (one fitted constant; the other points are not fitted)")
        cal_rows = print_calibration(calib, interval)
    rows = prediction_table(data, interval=interval)
    if rows:
        print(
            "\n== Predicted forward + backward (ms; what bounds each call: host, or each "
            "symmetric kernel's limit)"
        )
        print_predictions(rows)
        print("\n== Bounds per symmetric kernel, SupCon bf16, H200 (ms)")
        print_bounds(rows)
        if calib is not None:
            cal_eff = [
                kernel_time(
                    calib["kernels"][lk["kernel"]],
                    lk["programs"],
                    GPUS["H200"],
                    65536,
                    calib["d"],
                    interval,
                )["eff"]
                for c in calib["calls"]
                for lk in c["launches"]
                if c["n"] == 65536
            ]
            e = min(cal_eff) if cal_eff else None
            if e is not None:
                alt = prediction_table(data, ("H200",), interval, e)
                print(
                    f"\n== Sensitivity: issue efficiency {e:.2f} (the calibration kernels') "
                    "whatever the occupancy (H200)"
                )
                print_predictions([r for r in alt if r["loss"] == "supcon"])
        print("\n== What the issue's targets need, by this model (H200, SupCon bf16)")
        print_targets(data, interval)
    if args.json:
        out = {
            "counts": data,
            "predictions": rows,
            "calibration": cal_rows,
            "constants": {
                "ISSUE_INTERVAL": interval,
                "DEVICE_OP_S": DEVICE_OP_S,
                "HOST_TRITON_S": HOST_TRITON_S,
                "HOST_ATEN_S": HOST_ATEN_S,
                "gpus": {k: dataclasses.asdict(v) for k, v in GPUS.items()},
            },
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0
