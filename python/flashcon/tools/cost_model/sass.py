"""Reading SASS: instructions and branch targets, loops as backward branches' ranges, their
Python loops and trip counts from the line table, instruction classes and counts per warp, a
program's counts and traffic, the hot (partner) loop."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from pathlib import Path

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


def add_counts(a: dict, b: dict, k: float = 1.0) -> dict:
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
        c = add_counts(c, lp["body"], executions(sass["loops"], i, tiles))
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
                    c = add_counts(c, sub["body"], executions(loops, j, 1))
            return c
    return None


def per_tile(sass: dict) -> dict:
    """Counts per warp per tile: the hot loop's, or (no partner loop) the whole program's."""
    hot = hot_loop(sass)
    if hot is not None:
        return hot
    return per_program(sass, 1)
