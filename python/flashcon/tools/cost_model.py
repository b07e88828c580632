"""Static GPU cost model of the symmetric 'all'-mode kernels (no GPU needed).

For the symmetric kernels a loss step launches (SupCon, NT-Xent, TCL, SINCERE on
``backend='triton'``, 'all' mode), compiled ahead of time as ``kernel_report`` compiles them
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, the launchers' tiles,
warps, stages and ``maxnreg``), this reads the SASS (``nvdisasm --print-line-info`` from
Triton's wheel) and prints

- registers, shared memory and CTAs per SM (register, shared-memory, warp and CTA limits of
  the architecture, as CUDA's occupancy calculator rounds them);
- the hot loop's SASS per warp per tile: the loop is a backward branch's target range, matched
  to the Python ``for`` it came from by the line table, so its trip count is the source's
  (``range(t0, t1)``: the program's run of partner tiles; ``range(0, D, BLOCK_D)``: D chunks);
  total, MMA (HMMA/HGMMA), MUFU, BAR, SHFL, global loads (LDG, LDGSTS), atomics (RED/ATOM);
- a predicted forward + backward time on an H100 SXM and an H200 at N = 4096, 16 384 and
  65 536 (sm_90 code; the sm_80 compiles get the resource and SASS tables only).

The prediction per kernel launch (``kernel_time``) is the largest of

- the SM bound: each program's cycles on its SM = max(issue, tensor core, MUFU, SHFL,
  L1/shared-memory bytes), with k = CTAs/SM programs sharing an SM's pipes; the programs, in
  launch order, list-scheduled on SMs × k slots (``makespan``: waves and the partner runs'
  tail). Issue: 4 schedulers × 1 warp instruction per clock, times an efficiency
  min(1, w / ``ISSUE_INTERVAL``) for w resident warps per scheduler (a warp issues on average
  once every ``ISSUE_INTERVAL`` cycles of these kernels: occupancy limits latency hiding);
- the L2 bound (the L1-bypassing cp.async bytes that stage the operand tiles, less the
  pipeliner's predicated-off last prefetch per loop, plus the atomics' bytes, over the L2
  bandwidth), the atomic bound (the atomics' bytes over half of it: read-modify-write), and
  the HBM bound (each operand read and each output written once);

plus ``DEVICE_OP_S`` per launch. A step is the larger of the device time (the symmetric
kernels plus ``DEVICE_OP_S`` per other device operation) and the host time (device operations
of one fwd+bwd, counted by ``launch_count`` on the CPU, × ``HOST_ATEN_S`` / ``HOST_TRITON_S``):
at small N the host's launches are the step.

One constant is fitted, ``ISSUE_INTERVAL``, on the single GPU measurement there is (main
a986ea9 on an H200, Triton 3.6.0: SupCon bf16, D = 128, 'all' mode, fwd+bwd 34.5 ms at
N = 65 536; README "GPU"), from that commit's counts compiled with that Triton and stored in
``cost_model_a986ea9.json``; every other constant is a published figure or a stated
assumption, written where it is defined. The calibration check, and the run's other measured
points (not fitted), are printed.

    python -m flashcon.tools.cost_model -j 2                  # compile (cached), print
    python -m flashcon.tools.cost_model --json out.json       # ... and write the counts and
                                                              #     predictions
    python -m flashcon.tools.cost_model --from-json out.json  # reuse counts, no compile
    python -m flashcon.tools.cost_model --fit                 # refit ISSUE_INTERVAL
    # the stored calibration counts, regenerated from the measured commit with the measured
    # run's Triton (3.6.0, here installed with pip install --target /tmp/triton36):
    git worktree add /tmp/fc-a986 a986ea9
    PYTHONPATH=/tmp/triton36 python -m flashcon.tools.cost_model --tree /tmp/fc-a986 \
        --losses supcon --dtypes bf16 --archs 90 \
        --calibration-json python/flashcon/tools/cost_model_a986ea9.json --fit

Compiles are cached under ``$FLASHCON_COST_CACHE`` (default: the temp dir), keyed by the
kernel sources, the specialisation and Triton's version; each compile of a symmetric kernel
takes seconds. The report names the Triton it compiled with: the one the GPU run used (3.6.0 on
the H200 that measured a986ea9) gives the counts that machine runs. Predictions are predictions:
the first ``make gpu-check`` run tests them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import heapq
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Constants, with their sources.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    arch: int  # the kernels it runs (launch.arch_of: sm_90 and newer run the sm_90 table)
    sms: int
    clock_hz: float  # SM clock of the issue, MUFU, SHFL and shared-memory rates
    mma_flops: dict  # dense tensor-core flop/s by operand type
    hbm_bytes_s: float
    l2_bytes_s: float


# NVIDIA H100 Tensor Core GPU datasheet / Hopper whitepaper (H100 SXM5): 132 SMs; max boost
# 1.98 GHz (the clock of the 66.9 TFLOP/s FP32 peak: 132 SMs × 128 FP32 lanes × 2 × 1.98 GHz);
# dense tensor-core peak 989.4 TFLOP/s BF16/FP16 and 494.7 TFLOP/s TF32 (the datasheet's
# 1979 / 989 are with 2:4 sparsity; 989.4 = 132 × 4096 flop/clk × 1.83 GHz, the tensor
# clock); HBM3 3.35 TB/s. H200 SXM datasheet: the same GH100 compute (132 SMs, 989 TFLOP/s
# dense BF16) with HBM3e at 4.8 TB/s. L2: NVIDIA publishes no bandwidth; ~5.5 TB/s is what
# Chips and Cheese measured on an H100 PCIe (114 SMs, 1.755 GHz; "Nvidia's H100: Funny L2,
# and Tons of Bandwidth", 2023-07-02), taken as a lower estimate for both SXM parts (same
# 50 MB L2). An assumption, not a datasheet figure.
GPUS = {
    "H100": Gpu("H100 SXM", 90, 132, 1.98e9, {"bf16": 989.4e12, "tf32": 494.7e12}, 3.35e12, 5.5e12),
    "H200": Gpu("H200 SXM", 90, 132, 1.98e9, {"bf16": 989.4e12, "tf32": 494.7e12}, 4.8e12, 5.5e12),
}


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    regs_per_sm: int
    reg_unit: int  # registers are allocated per warp in units of this many
    warps_per_sm: int
    ctas_per_sm: int
    smem_per_sm: int  # bytes, the largest carveout
    smem_reserved: int  # bytes the driver reserves per CTA
    smem_unit: int  # allocation granularity
    schedulers: int


# CUDA C++ Programming Guide, "Compute Capabilities" table (cc 8.0 and 9.0): 64 K 32-bit
# registers per SM, 64 resident warps and 32 resident CTAs per SM; shared memory per SM up to
# 164 KB (8.0) / 228 KB (9.0), of which 1 KB per CTA is reserved for the system; 4 warp
# schedulers (SM sub-partitions) per SM. Register allocation unit (256 per warp) and shared
# memory granularity (128 B): CUDA occupancy calculator (cuda_occupancy.h).
ARCH = {
    80: ArchLimits(65536, 256, 64, 32, 164 * 1024, 1024, 128, 4),
    90: ArchLimits(65536, 256, 64, 32, 228 * 1024, 1024, 128, 4),
}

# Per SM per clock, cc 8.0 and 9.0 (CUDA C++ Programming Guide, "Arithmetic Instructions",
# throughput of native arithmetic instructions): 16 results of the MUFU functions (exp2, lg2,
# rcp, rsqrt, sin, cos), 32 warp-shuffle results; a scheduler issues one warp instruction per
# clock. L1 / shared memory (one SRAM): 128 bytes per clock per SM (shared memory's 32 banks ×
# 4 bytes; H100's 33 TB/s L1 = 132 SMs × 128 B × 1.98 GHz).
MUFU_PER_CLK = 16
SHFL_PER_CLK = 32
L1_BYTES_PER_CLK = 128
SM_PIPES = ("issue", "tensor", "mufu", "shfl", "L1")

# fp32 reductions into L2 (RED): a read-modify-write of each sector, taken as half the L2
# bandwidth. An assumption (NVIDIA publishes no atomic throughput); the bound is printed apart.
ATOMIC_FRACTION_OF_L2 = 0.5

# Device time a launch adds besides its work (launch, CTA rasterisation, drain): ~2 µs for
# back-to-back kernels on a stream. An assumption of the usual order.
DEVICE_OP_S = 2e-6
# Host time per device operation in eager mode: a Triton launch from Python ~20 µs (TritonBench
# wall time of a small Triton kernel on an H100: 18-23 µs per call, pytorch/helion#2538); an
# ATen op ~10 µs (dispatch, autograd bookkeeping and the CUDA launch). Assumptions of the
# usual order, not fitted.
HOST_TRITON_S = 20e-6
HOST_ATEN_S = 10e-6

# The one fitted constant: cycles between consecutive issues of one warp of these kernels
# (their dependency, barrier, shuffle, MUFU and load waits, on average). A scheduler holding w
# warps issues min(1, w / ISSUE_INTERVAL) instructions per clock. Fitted by ``--fit`` so that
# the counts of main a986ea9 (cost_model_a986ea9.json) give the measured 34.5 ms at
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
CALIBRATION_FILE = Path(__file__).with_name("cost_model_a986ea9.json")

# Device operations per fwd+bwd of the fused 'all'-mode losses (launch_count on the CPU at
# this code): the host bound where a run did not count them (--no-ops, e.g. on a machine whose
# Triton interpreter cannot run the kernels).
OPS_FALLBACK = {
    "supcon": {"aten": 2, "triton": 11},
    "ntxent": {"aten": 2, "triton": 11},
    "tcl": {"aten": 2, "triton": 11},
    "sincere": {"aten": 2, "triton": 14},
}

D_DEFAULT = 128
NS = (4096, 16384, 65536)
LOSSES = ("supcon", "ntxent", "tcl", "sincere")
DTYPES = ("bf16", "fp32")
TCL_K1 = 5000.0  # tcl_loss's default k1 (functional.py): HAS_K1 on

# --------------------------------------------------------------------------------------------
# SASS: instructions, loops, counts.
# --------------------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_BRANCHES = ("BRA", "JMP", "BRX", "JMX")


@dataclasses.dataclass
class Instr:
    addr: int
    op: str  # the mnemonic with its modifiers, e.g. "HGMMA.64x32x16.F32.BF16"
    args: str
    target: int | str | None = None  # branch target: an address, or a label until resolved
    src: tuple[str, int] | None = None  # (file, line) of the line table

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]


def parse_sass(text: str) -> list[Instr]:
    """Instructions of ``cuobjdump -sass`` or ``nvdisasm [--print-line-info]`` output (one
    function), branch targets resolved to addresses."""
    out: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    src = None
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            src = (m.group(1), int(m.group(2)))
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for lab in pending:
            labels[lab] = addr
        pending = []
        body = _PRED.sub("", m.group(2).strip())
        op, _, args = body.partition(" ")
        ins = Instr(addr, op, args.strip(), src=src)
        if ins.base in _BRANCHES:
            t = re.search(r"\(\s*(\.L_x_\d+)\s*\)", args) or re.search(r"0x([0-9a-f]+)", args)
            if t:
                ins.target = t.group(1) if t.group(1).startswith(".L") else int(t.group(1), 16)
        out.append(ins)
    for ins in out:
        if isinstance(ins.target, str):
            ins.target = labels.get(ins.target)
    return out


def live_code(instrs: list[Instr]) -> list[Instr]:
    """The instructions a program can execute: up to the last EXIT (after it come the
    self-branch that ends every function and alignment NOPs)."""
    last = max((i for i, ins in enumerate(instrs) if ins.base == "EXIT"), default=len(instrs) - 1)
    return instrs[: last + 1]


@dataclasses.dataclass
class Loop:
    start: int  # address of the first instruction (the backward branch's target)
    end: int  # address of the (last) backward branch
    parent: int | None = None  # index of the enclosing loop
    trip: object = 1  # "tiles" (the program's partner run), an int, or None (unknown)
    source: str = ""  # the matched Python loop, "file:line: for ... in range(...)"

    def contains(self, addr: int) -> bool:
        return self.start <= addr <= self.end


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Loops as backward branches' target ranges (one loop per target; nested by
    containment), outermost first."""
    ends: dict[int, int] = {}
    for ins in instrs:
        t = ins.target
        if isinstance(t, int) and t < ins.addr:
            ends[t] = max(ends.get(t, t), ins.addr)
    loops = [Loop(s, e) for s, e in sorted(ends.items(), key=lambda x: (x[0], -x[1]))]
    for i, lp in enumerate(loops):
        inside = [
            j
            for j, o in enumerate(loops)
            if j != i
            and o.contains(lp.start)
            and o.contains(lp.end)
            and (o.end - o.start) > (lp.end - lp.start)
        ]
        if inside:
            lp.parent = min(inside, key=lambda j: loops[j].end - loops[j].start)
    return loops


def owner(addr: int, loops: list[Loop]) -> int | None:
    """Index of the innermost loop holding an address (None: straight-line code)."""
    best = None
    for i, lp in enumerate(loops):
        if lp.contains(addr) and (
            best is None or lp.end - lp.start < loops[best].end - loops[best].start
        ):
            best = i
    return best


_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1, "F32x4": 16, "F32x2": 8}
COUNT_KEYS = (
    "total",
    "mma",
    "mufu",
    "bar",
    "shfl",
    "ldg",
    "ldgsts",
    "tma",
    "atom",
    "stg",
    "lds",
    "sts",
)
BYTE_KEYS = (
    "mma_flops_bf16",
    "mma_flops_tf32",
    "ldg_bytes",
    "ldgsts_bytes",
    "atom_bytes",
    "smem_bytes",
)


def _lane_bytes(op: str, default: int = 4) -> int:
    for mod in op.split(".")[1:]:
        if mod in _WIDTH:
            return _WIDTH[mod]
    return default


def _mma_flops(op: str) -> tuple[str, float]:
    """(operand type, flops per warp) of one MMA instruction: HGMMA.MxNxK is a warpgroup's
    M×N×K product (a quarter per warp), HMMA.MNK one warp's."""
    kind = "tf32" if ".TF32" in op else "bf16"
    m = re.match(r"[A-Z]GMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        a, b, c = map(int, m.groups())
        return kind, 2.0 * a * b * c / 4
    m = re.match(r"[A-Z]MMA\.(\d+)", op)
    if m:
        dims = {
            "16816": (16, 8, 16),
            "1688": (16, 8, 8),
            "884": (8, 8, 4),
            "1684": (16, 8, 4),
            "16832": (16, 8, 32),
        }.get(m.group(1), (16, 8, 16))
        return kind, 2.0 * math.prod(dims)
    return kind, 0.0


def count(instrs: list[Instr]) -> dict:
    """SASS counts (per warp) of a list of instructions, and their flops and bytes."""
    c = dict.fromkeys(COUNT_KEYS, 0) | dict.fromkeys(BYTE_KEYS, 0.0)
    for ins in instrs:
        b, op = ins.base, ins.op
        c["total"] += 1
        if b in ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA"):
            c["mma"] += 1
            kind, fl = _mma_flops(op)
            c[f"mma_flops_{kind}"] += fl
        elif b == "MUFU":
            c["mufu"] += 1
        elif b == "BAR":
            c["bar"] += 1
        elif b == "SHFL":
            c["shfl"] += 1
        elif b == "LDG":
            c["ldg"] += 1
            c["ldg_bytes"] += 32 * _lane_bytes(op)
        elif b == "LDGSTS":
            # cp.async: .BYPASS (cache-global, the 16-byte operand tiles) goes to L2; the
            # cache-all form (small vectors: labels, row statistics) through L1, as LDG does.
            c["ldgsts"] += 1
            c["ldgsts_bytes" if ".BYPASS" in op else "ldg_bytes"] += 32 * _lane_bytes(op)
        elif b.startswith("UTMALDG") or b == "UBLKCP":
            c["tma"] += 1
        elif b in ("RED", "REDG", "ATOM", "ATOMG"):
            c["atom"] += 1
            c["atom_bytes"] += 32 * _lane_bytes(op)
        elif b == "STG":
            c["stg"] += 1
        elif b in ("LDS", "LDSM"):
            c["lds"] += 1
            c["smem_bytes"] += 32 * (_ldsm_bytes(op) if b == "LDSM" else _lane_bytes(op))
        elif b in ("STS", "STSM"):
            c["sts"] += 1
            c["smem_bytes"] += 32 * (_ldsm_bytes(op) if b == "STSM" else _lane_bytes(op))
    return c


def _ldsm_bytes(op: str) -> int:
    """Bytes per lane of LDSM/STSM (.x1/.x2/.x4 8×8 16-bit matrices: 4, 8, 16 B per lane)."""
    m = re.search(r"\.(\d)$", op) or re.search(r"\.M88\.(\d)", op)
    return 4 * int(m.group(1)) if m else 4


def _add(a: dict, b: dict, k: float = 1.0) -> dict:
    return {key: a.get(key, 0) + k * b.get(key, 0) for key in set(a) | set(b)}


# --------------------------------------------------------------------------------------------
# Loops to Python loops (the line table), trip counts.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PyLoop:
    file: str
    line: int
    lines: frozenset  # body lines outside nested loops
    text: str
    args: list  # range() arguments as expression source


def python_loops(path: str) -> list[PyLoop]:
    try:
        src = Path(path).read_text()
    except OSError:
        return []
    tree = ast.parse(src)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.For) or not isinstance(node.iter, ast.Call):
            continue
        fn = ast.unparse(node.iter.func)
        if fn not in ("range", "tl.range"):
            continue  # tl.static_range unrolls: straight-line code
        body = set(range(node.body[0].lineno, node.body[-1].end_lineno + 1))
        for sub in ast.walk(node):
            if sub is not node and isinstance(sub, ast.For):
                body -= set(range(sub.lineno, sub.end_lineno + 1))
        text = f"for {ast.unparse(node.target)} in {ast.unparse(node.iter)}"
        out.append(
            PyLoop(
                path,
                node.lineno,
                frozenset(body | {node.lineno}),
                text,
                [ast.unparse(a) for a in node.iter.args],
            )
        )
    return out


def trip_of(pyloop: PyLoop, names: dict) -> object:
    """Iterations of a Python loop: "tiles" when they are the program's partner run
    (``t1 - t0``; evaluated with runs of 1 and 2), else the count at these names."""

    def n(tiles: int) -> int:
        env = {**names, "t0": 0, "t1": tiles}
        vals = [eval(a, {"__builtins__": {}}, env) for a in pyloop.args]  # noqa: S307
        return len(range(*vals))

    try:
        one, two = n(1), n(2)
    except Exception:  # noqa: BLE001 - an unknown name: an unknown trip count
        return None
    return "tiles" if (one, two) == (1, 2) else one


def classify_loops(instrs: list[Instr], loops: list[Loop], names: dict) -> None:
    """Match each SASS loop to the Python loop whose body lines its own instructions carry
    most often; set its trip count and source."""
    cache: dict[str, list[PyLoop]] = {}
    for i, lp in enumerate(loops):
        votes: dict[tuple, int] = {}
        for ins in instrs:
            if ins.src is None or owner(ins.addr, loops) != i:
                continue
            f, line = ins.src
            if f not in cache:
                cache[f] = python_loops(f)
            for pl in cache[f]:
                if line in pl.lines:
                    votes[(f, pl.line)] = votes.get((f, pl.line), 0) + 1
        if not votes:
            lp.trip, lp.source = None, "unmatched"
            continue
        f, line = max(votes, key=votes.get)
        pl = next(p for p in cache[f] if p.line == line)
        lp.trip = trip_of(pl, names)
        lp.source = f"{Path(f).name}:{line}: {pl.text}"


def analyse(text: str, names: dict) -> dict:
    """Counts of one compiled kernel's SASS: straight-line code (once per program) and each
    loop's own body (per iteration), with the loops' matched sources and trip counts."""
    instrs = live_code(parse_sass(text))
    loops = find_loops(instrs)
    classify_loops(instrs, loops, names)
    groups: list[list[Instr]] = [[] for _ in loops]
    straight = []
    for ins in instrs:
        o = owner(ins.addr, loops)
        (straight if o is None else groups[o]).append(ins)
    return {
        "straight": count(straight),
        "loops": [
            {
                "start": lp.start,
                "end": lp.end,
                "parent": lp.parent,
                "trip": lp.trip,
                "source": lp.source,
                "body": count(g),
            }
            for lp, g in zip(loops, groups)
        ],
    }


def executions(loops: list[dict], i: int, tiles: int) -> float:
    """Iterations of loop i in a program with ``tiles`` partner tiles (nested: the product
    along its parents; an unknown trip count counts once)."""
    t = loops[i]["trip"]
    n = tiles if t == "tiles" else (1 if t is None else t)
    p = loops[i]["parent"]
    return n * (executions(loops, p, tiles) if p is not None else 1)


def per_program(sass: dict, tiles: int) -> dict:
    """Counts per warp of one program that takes ``tiles`` tiles."""
    c = dict(sass["straight"])
    for i, lp in enumerate(sass["loops"]):
        c = _add(c, lp["body"], executions(sass["loops"], i, tiles))
    return c


def traffic(sass: dict, tiles: int, stages: int) -> dict:
    """Bytes one warp of a program moves: ``l2`` (the L1-bypassing LDGSTS that stage operand
    tiles, and the atomics, which are performed in L2), ``atom``, and ``l1`` (everything through
    the SM's L1/shared-memory SRAM: LDG, which serves the labels and row vectors mostly from
    L1, shared loads and stores, and the LDGSTS writes). With ``num_stages`` >= 2 Triton's
    pipeliner loads iteration 0 before a loop and iteration i + 1 inside iteration i, so the
    last iteration's in-loop loads are predicated off: one per loop entry is not counted."""
    loops = sass["loops"]
    st = sass["straight"]
    out = {"l2": st["ldgsts_bytes"] + st["atom_bytes"], "atom": st["atom_bytes"]}
    out["l1"] = st["ldg_bytes"] + st["ldgsts_bytes"] + st["smem_bytes"]
    for i, lp in enumerate(loops):
        b = lp["body"]
        n = executions(loops, i, tiles)
        p = lp["parent"]
        entries = executions(loops, p, tiles) if p is not None else 1
        staged = max(n - entries, 0) if stages >= 2 else n
        out["l2"] += staged * b["ldgsts_bytes"] + n * b["atom_bytes"]
        out["atom"] += n * b["atom_bytes"]
        out["l1"] += n * (b["ldg_bytes"] + b["smem_bytes"]) + staged * b["ldgsts_bytes"]
    return out


def hot_loop(sass: dict) -> dict | None:
    """The partner loop (trip "tiles"), with its nested loops' counts per iteration; None when
    the kernel has none (one tile per program: the whole program is the tile's code)."""
    loops = sass["loops"]
    for i, lp in enumerate(loops):
        if lp["trip"] == "tiles":
            c = dict(lp["body"])
            for j, sub in enumerate(loops):
                k = j
                while loops[k]["parent"] is not None and loops[k]["parent"] != i:
                    k = loops[k]["parent"]
                if j != i and loops[k]["parent"] == i:
                    c = _add(c, sub["body"], executions(loops, j, 1))
            return c
    return None


def per_tile(sass: dict) -> dict:
    """Counts per warp per tile: the hot loop's, or (no partner loop) the whole program's."""
    hot = hot_loop(sass)
    if hot is not None:
        return hot
    return per_program(sass, 1)


# --------------------------------------------------------------------------------------------
# Occupancy.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# What a call launches (read from the launchers of the tree being modelled).
# --------------------------------------------------------------------------------------------

# (kernel kind, MODE, k1) of the symmetric launches of one forward + backward, in order
# (launch.fused_fwd / fused_bwd; the older sym_* launchers launch the same kernels).
LOSS_KERNELS = {
    "supcon": (("fwd", 0, 0.0), ("bwd", 0, 0.0)),
    "ntxent": (("fwd", 0, 0.0), ("bwd", 0, 0.0)),
    "tcl": (("fwd", 0, TCL_K1), ("bwd", 0, TCL_K1)),
    "sincere": (("fwd", 0, 0.0), ("fwd", 1, 0.0), ("bwd", 1, 0.0), ("bwd", 0, 0.0)),
}


def schedule(nb: int, chunk: int) -> list[list[int]]:
    """Programs of a symmetric launch over ``nb`` row blocks in launch order (x fastest), as
    runs [tiles, programs]: program (I, c) takes the distances [c·chunk, (c+1)·chunk) ∩
    [0, NB // 2], less NB / 2 for I >= NB / 2 of an even NB (sym.py ``_partners``; the one-tile
    schedule of a986ea9 is chunk 1, its skipped duplicate a 0-tile program)."""
    half = nb // 2
    even = int(2 * half == nb)
    runs: list[list[int]] = []
    for c in range(-(-(half + 1) // chunk)):
        t0 = c * chunk
        for tiles, k in (
            (min(t0 + chunk, half + 1) - t0, half),
            (min(t0 + chunk, half + 1 - even) - t0, nb - half),
        ):
            tiles = max(tiles, 0)
            if k and runs and runs[-1][0] == tiles:
                runs[-1][1] += k
            elif k:
                runs.append([tiles, k])
    return runs


def launched(loss: str, dtype: str, arch: int, n: int, d: int) -> list[dict]:
    """The symmetric launches of one fwd+bwd of ``loss``: kernel_report Spec, grid and the
    programs' tiles, from the importable ``flashcon.triton_kernels.launch``."""
    import torch

    from flashcon.tools import kernel_report as KR
    from flashcon.triton_kernels import launch
    from flashcon.triton_kernels import sym as S

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = []
    for kind, mode, k1 in LOSS_KERNELS[loss]:
        name = f"_sym_{kind}_kernel"
        if hasattr(launch, "sym_tiles"):
            cfg, resident = launch.sym_tiles(f"sym_{kind}", arch, tdtype, d, False)
        else:  # a986ea9: streamed tiles, one per program
            cfg, resident = launch.pick_config(f"sym_{kind}", arch, tdtype, d), None
        fl = {"MODE": mode, **launch.flags("sym", cfg, d, 0, k1, False, False)}
        if resident is not None:
            fl["RESIDENT"] = resident
        nb = -(-n // cfg.block_m)
        chunk = 1
        if hasattr(launch, "sym_chunk") and (kind == "fwd" or resident):
            chunk = int(launch.sym_chunk(nb))
        if chunk == 1 and "CHUNK" in getattr(S, name).arg_names:
            fl["CHUNK"] = 1  # Triton makes an integer argument equal to 1 a constant
        c = (cfg.block_m, cfg.block_n, cfg.block_d, cfg.block_do, cfg.num_warps, cfg.num_stages)
        spec = KR.Spec(
            name, arch, dtype, launch.dot_precision(tdtype), "call", tuple(fl.items()), c
        )
        runs = schedule(nb, chunk)
        out.append(
            {
                "spec": spec,
                "grid": [nb, -(-(nb // 2 + 1) // chunk)],
                "chunk": chunk,
                "programs": runs,
            }
        )
    return out


def _cache_dir() -> Path:
    p = Path(os.environ.get("FLASHCON_COST_CACHE", Path(tempfile.gettempdir()) / "flashcon-cost"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def _sources_hash() -> str:
    from flashcon.triton_kernels import launch

    h = hashlib.sha256()
    for f in (Path(launch.__file__).parent / name for name in ("sym.py", "lse.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def compile_kernel(spec, d: int) -> dict:
    """Compile one specialisation as kernel_report does and analyse its SASS (the compile is
    cached: resources and SASS text)."""
    os.environ["TRITON_INTERPRET"] = "0"
    import triton

    from flashcon.tools import kernel_report as KR

    key = hashlib.sha256(
        repr((spec, triton.__version__, KR.launch_maxnreg(), _sources_hash())).encode()
    ).hexdigest()[:20]
    path = _cache_dir() / f"{spec.kernel.strip('_')}-sm{spec.arch}-{key}.json"
    if not path.exists():
        path.write_text(json.dumps(_compile(spec)))
    row = json.loads(path.read_text())
    sass = row.pop("sass_text")
    names = {k: v for k, v in row.pop("constexprs").items() if isinstance(v, int)} | {"D": d}
    row["sass"] = analyse(sass, names)
    return row


def _compile(spec) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashcon.tools import kernel_report as KR
    from flashcon.triton_kernels import sym as S

    fn = getattr(S, spec.kernel)
    sig, const, attrs = KR._signature(fn, spec)
    warps, stages = spec.cfg[4], spec.cfg[5]
    ck = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
        target=GPUTarget("cuda", spec.arch, 32),
        options={"num_warps": warps, "num_stages": stages, "maxnreg": KR.launch_maxnreg()},
    )
    tools = KR._tools()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        res = subprocess.run(
            [str(tools / "cuobjdump"), "-res-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [str(tools / "nvdisasm"), "--print-line-info", "-c", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    return {
        "kernel": spec.kernel,
        "arch": spec.arch,
        "dtype": spec.dtype,
        "prec": spec.prec,
        "flags": dict(spec.flags),
        "cfg": list(spec.cfg),
        "warps": warps,
        "regs": int(fields.get("REG", -1)),
        "stack": int(fields.get("STACK", 0)),
        "local": int(fields.get("LOCAL", 0)),
        "shared": max(int(ck.metadata.shared), int(fields.get("SHARED", 0))),
        "constexprs": {k: v for k, v in const.items() if isinstance(v, (bool, int, str))},
        "sass_text": sass,
    }


def kernel_label(row: dict) -> str:
    fl = ",".join(f"{k}={int(v)}" for k, v in row["flags"].items())
    bm, bn, bd, bdo, w, st = row["cfg"]
    prec = f"/{row['prec']}" if row["dtype"] == "fp32" else ""
    tiles = f"{bm}x{bn}x{bd}" + (f"/{bdo}" if bdo else "") + f" w{w} s{st}"
    return f"{row['kernel'].strip('_')}[{row['dtype']}{prec},{fl}] {tiles} sm_{row['arch']}"


def count_ops(pythonpath: str | None = None) -> dict:
    """Device operations of one fwd+bwd per loss ('all' mode, backend='triton'), by
    ``launch_count`` under the interpreter: {loss: {"aten": k, "triton": k}}. Only
    ``pythonpath`` is on the path (not an outer PYTHONPATH's Triton: the interpreter runs the
    environment's own)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    script = Path(__file__).with_name("launch_count.py")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900
    ).stdout
    ops: dict = {}
    loss = None
    for line in out.splitlines():
        m = re.match(r"(\w+): (\d+) device operations", line)
        if m:
            loss = m.group(1)
            ops[loss] = {"aten": 0, "triton": 0}
            continue
        m = re.match(r"\s+(\d+)\s+(\S+)", line)
        if m and loss:
            ops[loss]["triton" if m.group(2).startswith("triton:") else "aten"] += int(m.group(1))
    if not ops:
        raise RuntimeError(f"launch_count printed no counts:\n{out[-2000:]}")
    return ops


def _commit(tree: Path) -> str:
    r = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    sha = r.stdout.strip() or "unknown"
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--", "triton_kernels"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return sha + ("+modified" if dirty else "")


def collect(
    losses, dtypes, archs, ns, d: int, ops: bool = True, pythonpath=None, jobs: int = 1
) -> dict:
    """Counts JSON of the importable package: the specialisations each call launches, their
    resources and SASS counts, the launches' programs, and the device operations per loss."""
    import concurrent.futures as cf

    import triton

    from flashcon.tools import kernel_report as KR
    from flashcon.triton_kernels import launch

    tree = Path(launch.__file__).resolve().parent.parent
    data = {
        "commit": _commit(tree),
        "triton": triton.__version__,
        "maxnreg": KR.launch_maxnreg(),
        "d": d,
        "kernels": {},
        "calls": [],
        "ops": count_ops(pythonpath) if ops else {},
        "compile": (
            "kernel_report._signature / Spec of each launch; triton.compile(ASTSource, "
            "target=GPUTarget('cuda', arch, 32), options num_warps, num_stages (the launcher's "
            "tiles) and maxnreg); nvdisasm --print-line-info, cuobjdump -res-usage"
        ),
    }
    todo = [
        (loss, dtype, arch, n) for loss in losses for dtype in dtypes for arch in archs for n in ns
    ]
    calls = {key: launched(*key, d) for key in todo}
    specs = list(dict.fromkeys(lk["spec"] for lks in calls.values() for lk in lks))
    if jobs > 1:
        with cf.ProcessPoolExecutor(max_workers=jobs) as ex:
            rows = dict(zip(specs, ex.map(compile_kernel, specs, [d] * len(specs))))
    else:
        rows = {spec: compile_kernel(spec, d) for spec in specs}
    for (loss, dtype, arch, n), lks in calls.items():
        launches = []
        for lk in lks:
            row = rows[lk["spec"]]
            label = kernel_label(row)
            data["kernels"][label] = row
            launches.append(
                {
                    "kernel": label,
                    "grid": lk["grid"],
                    "chunk": lk["chunk"],
                    "programs": lk["programs"],
                }
            )
        data["calls"].append(
            {"loss": loss, "dtype": dtype, "arch": arch, "n": n, "launches": launches}
        )
    return data


def collect_tree(tree: Path, argv: list[str]) -> dict:
    """``collect`` for another checkout (e.g. a worktree of the measured commit): its
    ``python/flashcon`` and ``triton_kernels`` as a package under the cache, this file run
    there with that package first on the path."""
    sha = _commit(tree)
    pkg = _cache_dir() / f"tree-{sha[:12]}"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(
        tree / "python" / "flashcon",
        pkg / "flashcon",
        ignore=shutil.ignore_patterns("_C*.so", "__pycache__"),
    )
    shutil.copytree(
        tree / "triton_kernels",
        pkg / "flashcon" / "triton_kernels",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    out = pkg / "counts.json"
    # The checkout's package first; an existing PYTHONPATH (e.g. another Triton) after it.
    path = os.pathsep.join(p for p in (str(pkg), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(
        os.environ, PYTHONPATH=path, TRITON_INTERPRET="0", FLASHCON_COST_CACHE=str(_cache_dir())
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--collect-worker", str(out), *argv]
    subprocess.run(cmd, env=env, check=True)
    data = json.loads(out.read_text())
    data["commit"] = sha
    return data


# --------------------------------------------------------------------------------------------
# Prediction.
# --------------------------------------------------------------------------------------------


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
        totals = _add(totals, cy, k)
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


def predicted_ms(report: dict, loss: str, dtype: str, n: int, device_name: str) -> float | None:
    """The prediction of a ``--json`` report for a measured point (``device_name`` as torch
    names the GPU, e.g. "NVIDIA H200"), or None: for ``make gpu-check`` to print beside it."""
    gpu = next((g for g in GPUS if g in device_name), None)
    dtype = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)
    for r in report.get("predictions", []):
        if (r["loss"], r["dtype"], r["n"], r["gpu"]) == (loss, dtype, n, gpu):
            return r["ms"]
    return None


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


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}" if s * 1e3 < 100 else f"{s * 1e3:.0f}"


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
