"""Tile configurations of the symmetric kernels measured on a GPU, read by the launchers.

The symmetric kernels (``sym.py``) are what the fast paths run: every 'all'-mode loss on
``backend='triton'`` and the fused losses. Their tiles come from ``config.CONFIGS`` (a fixed
table chosen by compile-time evidence) unless the tuned table beside this file
(``tuned.json``) has an entry for the launch's key:

    (architecture, kernel, dtype, D bucket, N bucket, compile-time flags)

An entry is a :class:`Choice`: tile rows, D chunks, warps, stages, the partner-run length,
resident or streamed, and whether ptxas gets the full register budget. The table is written
by ``python -m flashcon.tools.tune`` on a GPU (``make gpu-check`` runs it): every candidate of
a small pruned space (:func:`candidates`) is compiled first, in parallel processes, then
timed with CUDA events, and the fastest per key is kept. No tuning ever happens inside a
user's call: a key the table lacks takes the fixed table.

The N bucket is read only when the table holds an entry for the rest of the key, so with no
entry for a launch nothing here depends on N (under ``torch.compile`` nothing is guarded on
it); with one, a new bucket is a new specialisation.

``FLASHCON_TUNED_TABLE``: a path to read instead of ``tuned.json``, or ``off`` for the fixed
table only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from .config import TileConfig, resident_width

TABLE = Path(__file__).with_name("tuned.json")
TABLE_ENV = "FLASHCON_TUNED_TABLE"
VERSION = 1
# Upper ends of the N buckets (the last one is open): the sizes the tuner times.
N_BUCKETS = (4096, 16384, 65536)
# The compile-time flags that select a specialisation of the symmetric kernels (EVEN_D and
# RESIDENT follow from D and the choice itself).
KEY_FLAGS = ("MODE", "HAS_K1", "MULTILABEL", "HAS_PW", "DOT_PREC")
KINDS = ("sym_fwd", "sym_bwd")


@dataclasses.dataclass(frozen=True)
class Choice:
    """One configuration of a symmetric kernel.

    ``block``: rows (= columns) of a tile; ``block_d``: the D chunk of the products (the
    resident variant's largest D); ``block_do``: the backward's output chunk (0 in the
    forward); ``chunk``: partner blocks per program at most (0: the launcher's rule);
    ``maxnreg``: let ptxas use 255 registers (else its default budget)."""

    block: int
    block_d: int
    block_do: int
    num_warps: int
    num_stages: int
    resident: bool
    chunk: int = 0
    maxnreg: bool = True

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def tile_config(self, d: int) -> TileConfig:
        """The launch's tiles for (padded) D: a resident block narrows as the fixed table's
        does (``config.sym_tiles``)."""
        width = resident_width(d, self.block_d) if self.resident else self.block_d
        do = width if self.resident and self.block_do else self.block_do
        return TileConfig(
            self.block, self.block, width, do, self.num_warps, self.num_stages, self.chunk,
            self.maxnreg,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Choice:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown tuned-table fields {sorted(unknown)}")
        return cls(**d)


def d_bucket(d: int) -> str:
    return "d64" if d <= 64 else "d128" if d <= 128 else "dwide"


def n_bucket(n) -> str:
    for top in N_BUCKETS:
        if n <= top:
            return f"n{top}"
    return f"n{N_BUCKETS[-1]}+"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def flag_key(fl: dict) -> str:
    return ",".join(f"{k}={_flag_value(fl[k])}" for k in KEY_FLAGS)


def _flag_value(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def base_key(arch: int, kind: str, dtype: torch.dtype, d: int, fl: dict) -> str:
    """The key without its N bucket."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return f"sm{arch}|{kind}|{dtype_name(dtype)}|{d_bucket(d)}|{flag_key(fl)}"


def key(arch: int, kind: str, dtype: torch.dtype, d: int, n, fl: dict) -> str:
    return f"{base_key(arch, kind, dtype, d, fl)}|{n_bucket(n)}"


def _split(full: str) -> tuple[str, str]:
    base, _, nb = full.rpartition("|")
    return base, nb


_CACHE: dict[str, tuple[float, dict[str, dict[str, Choice]]]] = {}


def _path() -> Path | None:
    where = os.environ.get(TABLE_ENV, "")
    if where == "off":
        return None
    return Path(where) if where else TABLE


def load(path: Path | None = None) -> dict[str, dict[str, Choice]]:
    """The table as {base key: {N bucket: Choice}} (empty when the file does not exist)."""
    path = _path() if path is None else path
    if path is None or not path.exists():
        return {}
    stamp = path.stat().st_mtime
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    data = json.loads(path.read_text())
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: tuned table version {data.get('version')}, need {VERSION}")
    table: dict[str, dict[str, Choice]] = {}
    for full, entry in data.get("entries", {}).items():
        base, nb = _split(full)
        table.setdefault(base, {})[nb] = Choice.from_dict(entry["choice"])
    _CACHE[str(path)] = (stamp, table)
    return table


def lookup(arch: int, kind: str, dtype: torch.dtype, d: int, n, fl: dict) -> Choice | None:
    """The tuned choice of a launch, or None (the fixed table applies)."""
    by_n = load().get(base_key(arch, kind, dtype, d, fl))
    if not by_n:
        return None
    return by_n.get(n_bucket(n))


def write(entries: dict[str, dict], meta: dict, path: Path = TABLE) -> None:
    """Write the table: ``entries`` {full key: {"choice": Choice dict, "ms": float, ...}}."""
    for full, entry in entries.items():
        Choice.from_dict(entry["choice"])  # refuse what load() would refuse
        if full.count("|") != 5:
            raise ValueError(f"malformed key {full!r}")
    data = {"version": VERSION, "meta": meta, "entries": dict(sorted(entries.items()))}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    _CACHE.pop(str(path), None)


def legal(choice: Choice, kind: str, dtype: torch.dtype, d: int, has_pw: bool) -> bool:
    """Whether the kernels can run ``choice``: resident blocks hold 16-bit rows of D <=
    block_d (and not the backward with a mask); the streamed backward takes one tile per
    program (chunk 1); the backward has an output chunk, the forward none."""
    if (choice.block_do > 0) != (kind == "sym_bwd"):
        return False
    if choice.resident:
        if dtype == torch.float32 or not 0 < d <= choice.block_d:
            return False
        if kind == "sym_bwd" and (has_pw or choice.block_do != choice.block_d):
            return False
    elif kind == "sym_bwd" and choice.chunk not in (0, 1):
        return False
    return True


def candidates(kind: str, dtype: torch.dtype, d: int, has_pw: bool = False) -> list[Choice]:
    """The pruned space the tuner times: the fixed table's neighbours in one direction at a
    time (tile rows, warps, stages, resident or streamed, partner-run length, register
    budget), the legal ones only."""
    wide = 128 if d > 64 else 64
    bwd = kind == "sym_bwd"
    if dtype == torch.float32:
        bases = [
            Choice(64, 32, 32 if bwd else 0, 8, 2, False),
            Choice(32, 32, 32 if bwd else 0, 4, 2, False),
        ]
    else:
        bases = [
            Choice(64, wide, wide if bwd else 0, 8, 2, True),
            Choice(64, 64, 64 if bwd else 0, 8, 2, False),
        ]
    out: list[Choice] = []
    for base in bases:
        variants = [
            base,
            dataclasses.replace(base, num_stages=3),
            dataclasses.replace(base, num_warps=4),
            dataclasses.replace(base, maxnreg=False),
        ]
        if base.resident or not bwd:
            variants += [dataclasses.replace(base, chunk=4), dataclasses.replace(base, chunk=8)]
        if base.block == 64 and not bwd:
            variants.append(dataclasses.replace(base, block=128))
        for c in variants:
            if legal(c, kind, dtype, d, has_pw) and c not in out:
                out.append(c)
    return out
