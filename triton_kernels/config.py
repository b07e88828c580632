"""Tile configuration and launch policy of the Triton engine kernels: which tiles, flags, dot
precision and launch options a launch gets (the launchers: ``lse_launch``, ``sym_launch``,
``fused_launch``; the tuned table of the symmetric kernels: ``tuning``).

Nothing touches the GPU driver at import time: the architecture is read when a launcher runs.
The launchers reach everything here through the module (``from . import config as C``,
``C.arch_of(…)``) when they run, so a patch of ``config.arch_of`` (or of the schedule
constants) reaches every launcher.

Tile sizes come from a small fixed table per architecture (``CONFIGS``); with
``FLASHCON_AUTOTUNE=1`` the general launchers autotune over a few configurations around it
instead (``_autotune_configs``; always-masked D tails then, since the chunk width is not known
when the flags are chosen).

fp32 dot precision (``dot_precision``): every fp32 tile product runs on tensor cores.
"3xtf32" by default: each operand split into two TF32 halves and three TF32 products
(``lse._mma``), at most 3·2^-22 of |a|·|b| per product against fp32's 2^-24. The fp32
parity tests hold at their tolerances on the interpreter, which runs the same split with
round-to-nearest additions (tests/test_triton_sym.py::test_fp32_products_split_into_tf32);
the GPU's tensor cores add with truncation, which ``_mma`` confines to each call's own sums,
and its tolerances are for ``pytest -m gpu`` to confirm. "tf32", one TF32 product
(≈ fp16-input accuracy), where PyTorch allows TF32 for fp32 matmuls
(``torch.set_float32_matmul_precision("high")`` or "medium",
``torch.backends.cuda.matmul.allow_tf32 = True`` or ``.fp32_precision = "tf32"``): an fp32
caller gets the speed it opted into for its own matmuls, no more. Read when a launcher runs
(once, at tracing, for a torch.compile'd graph).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton

from flashcon.registration import interpreting


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_d: int  # D chunk of the similarity products
    block_do: int  # D chunk of the dq/dk outputs (backward only; 0 in the forward)
    num_warps: int
    num_stages: int
    chunk: int = 0  # symmetric kernels: partner blocks per program at most (0: sym_chunk's)
    maxnreg: bool = True  # the eager launches let ptxas use MAXNREG registers


# (arch, kernel, input bits, D bucket) -> tiles. "narrow" is D ≤ 64, "wide" D > 64; the general
# forward ignores the bucket (its register use does not grow with D: D is streamed in chunks).
# "res" holds the symmetric kernels' resident variants (whole D in registers, sym_tiles).
# Checked spill-free and within shared memory by ``python -m flashcon.tools.kernel_report``.
CONFIGS: dict[tuple[int, str, int, str], TileConfig] = {
    # Forward, 16-bit: a 64×64 fp32 similarity tile over 8 warps (~190-230 registers with
    # every flag on). 128×64 over 8 warps spills once HAS_K1, HAS_SELF and MULTILABEL are all
    # on (a second exponent tile and the mask tiles), and so does 64×64 over 4 warps on sm_80.
    (80, "fwd", 16, "any"): TileConfig(64, 64, 64, 0, 8, 2),
    (90, "fwd", 16, "any"): TileConfig(64, 64, 64, 0, 8, 2),
    # Forward, fp32: tensor-core products ("3xtf32": both operands' TF32 halves live beside
    # the tile), 32×32 over 4 warps, which keeps the grid of 32-row programs small N needs
    # (the symmetric kernels below take 64-row tiles on sm_90, where partner runs keep the
    # grid full; on sm_80 64×64 spills).
    (80, "fwd", 32, "any"): TileConfig(32, 32, 32, 0, 4, 2),
    (90, "fwd", 32, "any"): TileConfig(32, 32, 32, 0, 4, 2),
    # Softplus pass, fp32: σ and softplus of every pair hold more live values than the LSE
    # update; at 32×32 over 4 warps one flag set spilled 8 B at sm_80's 255 registers (IEEE
    # products then).
    (80, "sp", 32, "any"): TileConfig(32, 32, 16, 0, 4, 2),
    (90, "sp", 32, "any"): TileConfig(32, 32, 16, 0, 4, 2),
    # Backward, 16-bit, wide D: s, G and the 64×128 fp32 output accumulator live together;
    # 8 warps hold them in ~170 registers, 4 warps spill.
    (80, "bwd", 16, "wide"): TileConfig(64, 64, 64, 128, 8, 2),
    (90, "bwd", 16, "wide"): TileConfig(64, 64, 64, 128, 8, 2),
    # Narrow D (≤ 64): one 64-wide output chunk covers D (no recompute per chunk); 32-column
    # tiles keep 4 warps well under the register limit (64×64 sits at it and spills for
    # some flag sets).
    (80, "bwd", 16, "narrow"): TileConfig(64, 32, 64, 64, 4, 2),
    (90, "bwd", 16, "narrow"): TileConfig(64, 32, 64, 64, 4, 2),
    # Backward, fp32: G stays fp32 (split into TF32 halves for G·k). 32×32 tiles with a
    # 32-wide output chunk over 2 warps, unpipelined (64×64 over 8 warps spilled on sm_90 with
    # a mask).
    (80, "bwd", 32, "wide"): TileConfig(32, 32, 32, 32, 2, 1),
    (90, "bwd", 32, "wide"): TileConfig(32, 32, 32, 32, 2, 1),
    (80, "bwd", 32, "narrow"): TileConfig(32, 32, 32, 32, 2, 1),
    (90, "bwd", 32, "narrow"): TileConfig(32, 32, 32, 32, 2, 1),
    # Symmetric path (sym.py): square tiles (block_m = block_n, rows and columns are one
    # partition of z). Forward: no running max, so the 16-bit tile is the general forward's.
    (80, "sym_fwd", 16, "any"): TileConfig(64, 64, 64, 0, 8, 2),
    (90, "sym_fwd", 16, "any"): TileConfig(64, 64, 64, 0, 8, 2),
    # fp32: as the backward's fp32 rows below.
    (80, "sym_fwd", 32, "any"): TileConfig(32, 32, 32, 0, 4, 2),
    (90, "sym_fwd", 32, "any"): TileConfig(64, 64, 32, 0, 8, 2),
    # Backward: H (fp32 and in the input dtype) stays live over the D-out chunks; each chunk
    # is two products whose results go straight to atomic adds (no accumulator carried).
    (80, "sym_bwd", 16, "any"): TileConfig(64, 64, 64, 64, 8, 2),
    (90, "sym_bwd", 16, "any"): TileConfig(64, 64, 64, 64, 8, 2),
    # fp32 (three TF32 products): 64×64 over 8 warps on sm_90 (warpgroup MMA, HGMMA), which
    # spills on sm_80 (its MMA operands sit in registers): 32×32 there.
    (80, "sym_bwd", 32, "any"): TileConfig(32, 32, 32, 32, 4, 1),
    (90, "sym_bwd", 32, "any"): TileConfig(64, 64, 32, 32, 8, 2),
    # Resident variants (RESIDENT, D <= block_d): a program keeps its row block Z_I (and in
    # the backward its dZ_I) for its run of partner blocks, and loads each Z_J once. block_d
    # is the largest D they take; the launcher narrows it to 64 for D <= 64 (sym_tiles).
    (80, "sym_fwd", 16, "res"): TileConfig(64, 64, 128, 0, 8, 2),
    (90, "sym_fwd", 16, "res"): TileConfig(64, 64, 128, 0, 8, 2),
    (80, "sym_bwd", 16, "res"): TileConfig(64, 64, 128, 128, 8, 2),
    (90, "sym_bwd", 16, "res"): TileConfig(64, 64, 128, 128, 8, 2),
}
# Partner blocks per symmetric program: at most SYM_CHUNK, fewer while the grid would have
# under SYM_PROGRAMS programs (so a small N still fills every SM).
SYM_CHUNK = 16
SYM_PROGRAMS = 1024
# FLASHCON_SYM_SCHEDULE=tiles: the earlier schedule (one tile per program, both blocks
# streamed, no resident variant), for A/B timing (bench provider flashcon-triton-tiles); the
# results agree to rounding. Read whenever a launcher runs: each eager call, but only once,
# at tracing, for a torch.compile'd graph (no guard: set it before compiling).
SCHEDULE_ENV = "FLASHCON_SYM_SCHEDULE"


def _one_tile_schedule() -> bool:
    mode = os.environ.get(SCHEDULE_ENV, "runs")
    if mode not in ("runs", "tiles"):
        raise ValueError(f"{SCHEDULE_ENV} must be 'runs' or 'tiles', got {mode!r}")
    return mode == "tiles"


ARCHS = (80, 90)
MAXNREG = 255  # registers per thread the eager launches allow ptxas (launch_options)


def launch_options(maxnreg: bool = True) -> dict:
    """Launch options of an eager launch beyond tiles, warps and stages: ``maxnreg`` (MAXNREG)
    when ``maxnreg`` is set, not interpreting and not compiling. ptxas otherwise sizes the
    register budget for occupancy and spills a few bytes in some specialisations with
    registers to spare; the kernel report compiles with the same option. (Inductor does not
    forward this launch option: under torch.compile the kernels get ptxas' default budget.)
    Every launch takes its options from here (the general, symmetric and small kernels'),
    except the autotuned ones (``FLASHCON_AUTOTUNE=1``), which pass none."""
    if maxnreg and not interpreting() and not torch.compiler.is_compiling():
        return {"maxnreg": MAXNREG}
    return {}


def _autotune_enabled() -> bool:
    return os.environ.get("FLASHCON_AUTOTUNE", "0") == "1"


def arch_of(device: torch.device) -> int:
    """Table key for ``device``: 90 for sm_90 and newer, else 80 (also the interpreter's)."""
    if device.type != "cuda":
        return 80
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def d_bucket(d: int) -> str:
    return "narrow" if d <= 64 else "wide"


# What dot_precision can give fp32 inputs (the kernel report compiles each).
FP32_PRECISIONS = ("3xtf32", "tf32")


def dot_precision(dtype: torch.dtype) -> str:
    """``DOT_PREC`` of the tile products (see the module docstring): "3xtf32" or "tf32" for
    fp32 inputs; 16-bit inputs ignore it (their products are exact in fp32)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if _tf32_allowed() else "3xtf32"


def _tf32_allowed() -> bool:
    """Whether PyTorch lets fp32 matmuls use TF32. ``torch.backends.cuda.matmul.fp32_precision``
    reflects both of PyTorch's APIs ("tf32" after ``set_float32_matmul_precision("high")``,
    ``allow_tf32 = True`` or ``fp32_precision = "tf32"``); the older getter raises once the
    newer API was used, so it serves only a PyTorch without the attribute."""
    new = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if new is not None:
        return new == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def pick_config(kind: str, arch: int, dtype: torch.dtype, d: int) -> TileConfig:
    """Tiles of ``kind`` 'fwd', 'sp' (the softplus pass; the forward's tiles unless the table
    has its own), 'bwd', 'sym_fwd' or 'sym_bwd'."""
    bits = 32 if dtype == torch.float32 else 16
    bucket = "any" if kind in ("fwd", "sp", "sym_fwd", "sym_bwd") else d_bucket(d)
    if kind == "sp":
        return CONFIGS.get((arch, "sp", bits, bucket), CONFIGS[(arch, "fwd", bits, bucket)])
    return CONFIGS[(arch, kind, bits, bucket)]


def flags(
    kind: str,
    cfg: TileConfig,
    d: int,
    self_offset: int,
    k1: float,
    multilabel: bool = False,
    has_pw: bool = False,
    gated: bool = False,
) -> dict:
    """Compile-time flags the launchers pass (the kernel report enumerates the same set).

    ``kind`` 'sp' gives the softplus pass's (no weights, no k1, no gate), 'sym' the symmetric
    kernels' (no self offset: the own column is always excluded; no gate flag: they always
    read theirs)."""
    chunk = cfg.block_d if kind == "fwd" else max(cfg.block_d, cfg.block_do)
    fl = {
        "HAS_K1": k1 > 0,
        "HAS_SELF": self_offset >= 0,
        # With a mask the labels are ignored (the contract), so the label test is not compiled.
        "MULTILABEL": bool(multilabel) and not has_pw,
        "HAS_PW": bool(has_pw),
        "GATED": bool(gated),
        "EVEN_D": d % chunk == 0,
    }
    if kind == "sp":
        del fl["HAS_K1"], fl["HAS_PW"], fl["GATED"]
    if kind == "sym":
        del fl["HAS_SELF"], fl["GATED"]
    return fl


def sym_chunk(nb):
    """Partner blocks per program of a symmetric launch over ``nb`` row blocks (an int, or a
    SymInt under torch.compile: no guard on its value)."""
    if _one_tile_schedule():
        return 1
    pairs = nb * (nb // 2 + 1)
    return torch.sym_max(1, torch.sym_min(SYM_CHUNK, pairs // SYM_PROGRAMS))


def sym_tiles(
    kind: str, arch: int, dtype: torch.dtype, d: int, has_pw: bool = False
) -> tuple[TileConfig, bool]:
    """(tiles, resident) of the symmetric ``kind`` 'sym_fwd' or 'sym_bwd' for (padded) D.
    The backward with a mask streams: its two weight tiles beside the resident blocks spill
    on sm_90 at D = 128 (kernel report)."""
    bits = 32 if dtype == torch.float32 else 16
    res = CONFIGS.get((arch, kind, bits, "res"))
    if _one_tile_schedule():
        res = None
    # D = 0 streams (its loops over D run zero times); a resident block would load BLOCK_D
    # columns of an empty tensor.
    if res is not None and 0 < d <= res.block_d and not (has_pw and kind == "sym_bwd"):
        width = resident_width(d, res.block_d)
        return dataclasses.replace(res, block_d=width, block_do=width if res.block_do else 0), True
    return pick_config(kind, arch, dtype, d), False


def resident_width(d: int, block_d: int) -> int:
    """The D chunk a resident block of at most ``block_d`` columns takes for (padded) D: 64
    where D fits in it, so D <= 64 does not hold 128-wide tiles."""
    return 64 if d <= 64 else block_d


def _autotune_configs(kind: str) -> list[triton.Config]:
    """The configurations ``FLASHCON_AUTOTUNE=1`` tries for the general kernels of ``kind``
    'fwd' (the forward and the softplus pass) or 'bwd'."""
    out = []
    if kind == "fwd":
        for bm, bn, bd, w in (
            (128, 64, 64, 8),
            (64, 64, 64, 4),
            (128, 128, 32, 8),
            (64, 128, 64, 8),
        ):
            for st in (2, 3):
                out.append(
                    triton.Config(
                        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st
                    )
                )
    else:
        for bm, bn, bd, bdo, w in ((64, 64, 64, 128, 8), (64, 64, 64, 64, 4), (128, 64, 32, 64, 8)):
            for st in (1, 2):
                meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DO": bdo}
                out.append(triton.Config(meta, num_warps=w, num_stages=st))
    return out
