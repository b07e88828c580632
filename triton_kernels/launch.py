"""Launchers of the Triton engine kernels: checks, allocation, tile choice, grid, strides.

The general kernels (``lse.py``) take q [N, D] against k [M, D]; the symmetric 'all'-mode
launchers (``sym_*``) run ``sym.py``'s tile-pair kernels, with the general kernels as the
fallback the device chooses (``sym_plan``: the static shift's constants and its gate).

No autograd here (that is ``flashcon.registration.register_backend_autograd``, wired in ``ops.py``)
and nothing that reads tensor data, so every launcher also runs on fake tensors (the
``triton_op`` fake implementation is the launcher itself, with the kernel launch skipped).
Nothing touches the GPU driver at import time: the architecture is read when a launcher runs.

Tile sizes come from a small fixed table per architecture (``CONFIGS``); with
``FLASHCON_AUTOTUNE=1`` the launchers autotune over a few configurations around it instead
(always-masked D tails then, since the chunk width is not known when the flags are chosen).

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
import math
import os

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from flashcon.registration import interpreting

from . import fused as F
from . import lse as K
from . import sym as S
from . import tuning

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


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
MAXNREG = 255  # registers per thread the eager launches allow ptxas (see _launch)


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


def _check_pos_weight(pos_weight: Tensor) -> None:
    if pos_weight.dim() != 2 or pos_weight.numel() == 0:
        raise ValueError(
            f"pos_weight must be a non-empty [Bq, Bk] matrix, got {tuple(pos_weight.shape)}"
        )
    if pos_weight.numel() >= 2**31:
        raise ValueError(f"pos_weight has {pos_weight.numel()} entries; at most 2^31 - 1 supported")


def _unused(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The placeholder of a pointer argument the kernel is compiled not to touch: a buffer of
    its own, never another argument's storage.

    torch.compile functionalises a ``wrap_triton`` launch by cloning every argument that
    torch's access analysis (``torch._higher_order_ops.triton_kernel_wrap``) reports written,
    running the kernel on the clones and copying each clone back. The analysis is conservative
    (an atomic makes every pointer it may reach "written"), so an output passed again as a
    placeholder was cloned twice and the untouched placeholder clone, copied back last, erased
    the kernel's results: the loss was 0 under torch.compile on a GPU. ``tests/test_launch_args.py``
    checks every launch for such aliasing without a GPU. An allocation launches nothing."""
    return torch.empty(1, dtype=dtype, device=device)


def _pw_args(pos_weight: Tensor | None, like: Tensor, n: int, m: int) -> tuple:
    """(mask, i mod Bq [N], j mod Bk [M], Bk) of SupContrast's [Bq, Bk] mask; placeholders
    without one (never read: the kernel is compiled without HAS_PW)."""
    if pos_weight is None:
        dev = like.device
        return _unused(dev), _unused(dev, torch.int32), _unused(dev, torch.int32), 1
    _check_pos_weight(pos_weight)
    pw = pos_weight.to(device=like.device, dtype=torch.float32).contiguous()
    ridx = torch.arange(n, device=like.device, dtype=torch.int32) % pw.shape[0]
    cidx = torch.arange(m, device=like.device, dtype=torch.int32) % pw.shape[1]
    return pw, ridx, cidx, pw.shape[1]


# --------------------------------------------------------------------------------------------
# Checks.
# --------------------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, qlab: Tensor, klab: Tensor) -> None:
    if q.dtype == torch.float64 or k.dtype == torch.float64:
        raise TypeError(
            "backend='triton' does not support float64 inputs; use backend='torch' or "
            "backend='cpu' (they compute in float64), or cast to float32"
        )
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"need q [N, D] and k [M, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if qlab.shape != (q.shape[0],) or klab.shape != (k.shape[0],):
        raise ValueError(
            f"labels must be qlab [N] and klab [M], got {tuple(qlab.shape)} and "
            f"{tuple(klab.shape)} for N={q.shape[0]}, M={k.shape[0]}"
        )
    if qlab.dtype != torch.int64 or klab.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {qlab.dtype} and {klab.dtype}")
    devs = {t.device for t in (q, k, qlab, klab)}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")


# D is padded with zero columns to a multiple of 16 elements (zeros change no dot product):
# the row strides then are multiples of 16 bytes, so Triton specialises every load to 16-byte
# vectors. Unaligned rows (D = 7, 130, …) would load element by element, with one pointer
# register per element, which spills every tile size worth having. The copy is O(N·D) and
# only happens for such D.
D_ALIGN = 16


def _prep(q: Tensor, k: Tensor, qlab: Tensor, klab: Tensor):
    _check(q, k, qlab, klab)
    d = q.shape[1]
    dp = -(-d // D_ALIGN) * D_ALIGN
    if dp != d:
        q = torch.nn.functional.pad(q, (0, dp - d))
        k = torch.nn.functional.pad(k, (0, dp - d))
    return q.contiguous(), k.contiguous(), qlab.contiguous(), klab.contiguous(), dp


def _log_w(w: float) -> float:
    # A zero weight is a −inf log-weight: its terms vanish exactly (see lse.py).
    return math.log(w) if w > 0 else float("-inf")


def _stat_in(x: Tensor) -> Tensor:
    return x.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------
# Kernel handles: plain JIT kernels with the table's tiles, or autotuned ones on request.
# --------------------------------------------------------------------------------------------

_TUNED: dict[str, object] = {}


def _autotune_configs(kind: str) -> list[triton.Config]:
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


def _kernel(name: str):
    fn = getattr(K, name)
    if not _autotune_enabled():
        return fn
    if name not in _TUNED:
        kind = "fwd" if "fwd" in name else "bwd"
        key = ["D", "HAS_SELF", "MULTILABEL", "DOT_PREC"]
        if name != "_sp_fwd_kernel":
            # GATED: a gated launch may return at once; its timings must not pick the tiles
            # of the ungated kernel.
            key += ["HAS_PW", "HAS_K1", "GATED"]
        if kind == "bwd":
            key.append("MODE")
        _TUNED[name] = triton.autotune(configs=_autotune_configs(kind), key=key)(fn)
    return _TUNED[name]


def _launch(name: str, kind: str, rows: int, d: int, cfg: TileConfig, fl: dict, args: tuple):
    """Launch kernel ``name`` over ``rows`` (and D-out chunks for the backward)."""
    kern = wrap_triton(_kernel(name))
    if _autotune_enabled():
        fl = {**fl, "EVEN_D": False}

        def grid(meta):
            first = triton.cdiv(rows, meta["BLOCK_M" if name != "_bwd_dk_kernel" else "BLOCK_N"])
            return (first,) if kind == "fwd" else (first, triton.cdiv(d, meta["BLOCK_DO"]))

        kern[grid](*args, **fl)
        return
    tiles = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d}
    own = cfg.block_n if name == "_bwd_dk_kernel" else cfg.block_m
    if kind == "fwd":
        grid = (triton.cdiv(rows, own),)
    else:
        tiles["BLOCK_DO"] = cfg.block_do
        grid = (triton.cdiv(rows, own), triton.cdiv(d, cfg.block_do))
    extra = {}
    if not interpreting() and not torch.compiler.is_compiling():
        # ptxas otherwise sizes the register budget for occupancy and spills a few bytes in
        # some specialisations with registers to spare; the kernel report compiles with the
        # same option. (Inductor does not forward this launch option: under torch.compile the
        # kernels get ptxas' default budget.)
        extra["maxnreg"] = MAXNREG
    kern[grid](*args, **fl, **tiles, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra)


# --------------------------------------------------------------------------------------------
# The four engine functions.
# --------------------------------------------------------------------------------------------


def lse_fwd(
    q: Tensor,
    k: Tensor,
    qlab: Tensor,
    klab: Tensor,
    self_offset: int,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool = False,
    config: TileConfig | None = None,
    pos_weight: Tensor | None = None,
    gate: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``gate`` (int32 [1], the symmetric path's): the kernel runs only where it holds 0 and
    leaves the outputs unwritten otherwise."""
    q, k, qlab, klab, d = _prep(q, k, qlab, klab)
    n, m = q.shape[0], k.shape[0]
    lse = q.new_empty((n,), dtype=torch.float32)
    psum = q.new_empty((n,), dtype=torch.float32)
    pcnt = q.new_empty((n,), dtype=torch.float32)
    if n == 0:
        return lse, psum, pcnt
    cfg = config or pick_config("fwd", arch_of(q.device), q.dtype, d)
    fl = flags("fwd", cfg, d, self_offset, k1, multilabel, pos_weight is not None, gate is not None)
    args = (
        q, k, qlab, klab, lse, psum, pcnt, n, m, d, q.stride(0), k.stride(0),
        max(self_offset, 0), float(scale), _log_w(w_pos), _log_w(w_neg), _log_w(k1),
        *_pw_args(pos_weight, lse, n, m), _unused(q.device, torch.int32) if gate is None else gate,
    )  # fmt: skip
    _launch("_lse_fwd_kernel", "fwd", n, d, cfg, {**fl, "DOT_PREC": dot_precision(q.dtype)}, args)
    return lse, psum, pcnt


def sp_fwd(
    q: Tensor,
    k: Tensor,
    qlab: Tensor,
    klab: Tensor,
    eta: Tensor,
    self_offset: int,
    scale: float,
    multilabel: bool = False,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor]:
    q, k, qlab, klab, d = _prep(q, k, qlab, klab)
    n, m = q.shape[0], k.shape[0]
    sp = q.new_empty((n,), dtype=torch.float32)
    r = q.new_empty((n,), dtype=torch.float32)
    if n == 0:
        return sp, r
    cfg = config or pick_config("sp", arch_of(q.device), q.dtype, d)
    fl = flags("sp", cfg, d, self_offset, 0.0, multilabel)
    args = (
        q, k, qlab, klab, _stat_in(eta), sp, r, n, m, d, q.stride(0), k.stride(0),
        max(self_offset, 0), float(scale),
    )  # fmt: skip
    _launch("_sp_fwd_kernel", "fwd", n, d, cfg, {**fl, "DOT_PREC": dot_precision(q.dtype)}, args)
    return sp, r


def _backward(
    mode,
    g0,
    stat,
    g1,
    q,
    k,
    qlab,
    klab,
    self_offset,
    scale,
    w_pos,
    w_neg,
    k1,
    multilabel,
    config,
    pos_weight=None,
    gate=None,
):
    d_true = q.shape[1]
    q, k, qlab, klab, d = _prep(q, k, qlab, klab)
    n, m = q.shape[0], k.shape[0]
    # dq, dk have the padded width; the zero columns of q and k give exact zeros there and the
    # caller gets a view of the true width.
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    if d == 0 or n == 0 or m == 0:
        return dq.zero_()[:, :d_true], dk.zero_()[:, :d_true]  # fmt: skip
    cfg = config or pick_config("bwd", arch_of(q.device), q.dtype, d)
    fl = flags("bwd", cfg, d, self_offset, k1, multilabel, pos_weight is not None, gate is not None)
    fl.update(MODE=mode, DOT_PREC=dot_precision(q.dtype))
    g0, stat, g1 = _stat_in(g0), _stat_in(stat), _stat_in(g1)
    tail = (
        n, m, d, q.stride(0), k.stride(0),
    )  # fmt: skip
    consts = (
        max(self_offset, 0), float(scale), _log_w(w_pos), _log_w(w_neg), _log_w(k1),
        *_pw_args(pos_weight, g0, n, m), _unused(q.device, torch.int32) if gate is None else gate,
    )  # fmt: skip
    _launch(
        "_bwd_dq_kernel", "bwd", n, d, cfg, fl,
        (q, k, qlab, klab, g0, stat, g1, dq, *tail, dq.stride(0), *consts),
    )  # fmt: skip
    _launch(
        "_bwd_dk_kernel", "bwd", m, d, cfg, fl,
        (q, k, qlab, klab, g0, stat, g1, dk, *tail, dk.stride(0), *consts),
    )  # fmt: skip
    if d != d_true:
        dq, dk = dq[:, :d_true], dk[:, :d_true]
    return dq, dk


def lse_bwd(
    g_lse: Tensor,
    g_psum: Tensor,
    q: Tensor,
    k: Tensor,
    qlab: Tensor,
    klab: Tensor,
    lse: Tensor,
    self_offset: int,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool = False,
    config: TileConfig | None = None,
    pos_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    return _backward(
        K.MODE_LSE, g_lse, lse, g_psum, q, k, qlab, klab, self_offset, scale, w_pos, w_neg, k1,
        multilabel, config, pos_weight,
    )  # fmt: skip


def sp_bwd(
    g_sp: Tensor,
    q: Tensor,
    k: Tensor,
    qlab: Tensor,
    klab: Tensor,
    eta: Tensor,
    self_offset: int,
    scale: float,
    multilabel: bool = False,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor]:
    # The softplus pass has no weights, no k1 and no second statistic: g1 is unused (pass
    # any [N] fp32 vector), log-weights are placeholders.
    return _backward(
        K.MODE_SP, g_sp, eta, g_sp, q, k, qlab, klab, self_offset, scale, 1.0, 1.0, 0.0,
        multilabel, config,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The symmetric ('all'-mode) path: sym.py's tile-pair kernels, with the general kernels as
# the fallback the device picks (see sym.py).
# --------------------------------------------------------------------------------------------

# Largest spread of the static shift's terms, ln(largest/smallest) (sym.py): e^{-80} ≈ 1.8e-35
# is a normal fp32 number; fp32's exponential flushes to 0 below e^{-87.3}.
SYM_RANGE = 80.0


@dataclasses.dataclass(frozen=True)
class SymPlan:
    """The static shift's constants, all device tensors (no host synchronisation).

    ``vec``: the kernels' fp32 [A, R², c_pos, c_neg, 1/m_max]; ``l1``/``l2`` (float64): log of
    the factor that turns the kernels' sums back into the sums of the contract (lse_i =
    log(e^{l1}·Σ1_i + e^{l2}·Σ2_i)); ``range1`` = 2A + log(c_max/c_min) and ``range2`` =
    2R² + log(m_max/m_min): the largest spread (ln) of the terms of each stream; ``ok``: bool,
    both spreads in [0, ``SYM_RANGE``] (False for NaN; a negative spread means scale < 0)."""

    vec: Tensor
    l1: Tensor
    l2: Tensor
    range1: Tensor
    range2: Tensor
    ok: Tensor


def sym_plan(
    z: Tensor, scale: float, w_pos: float, w_neg: float, k1: float, pos_weight: Tensor | None
) -> SymPlan:
    if pos_weight is not None:
        _check_pos_weight(pos_weight)
    dev, f64 = z.device, torch.float64
    # The shift the kernels subtract is the fp32 value (in base 2: fl(fl(A)·log2 e), within an
    # ulp of it, ~1e-6 in the lse at A = 40): l1 and l2 use the same rounding.
    r2 = z.float().square().sum(1).amax()
    shift = (scale * r2).float()
    r2, shift64 = r2.to(f64), shift.to(f64)
    pw = (
        torch.ones((1, 1), dtype=f64, device=dev)
        if pos_weight is None
        else pos_weight.to(device=dev, dtype=f64)
    )
    pos = pw > 0
    any_pos = pos.any()
    inf = torch.full((), math.inf, dtype=f64, device=dev)
    zero = torch.zeros((), dtype=f64, device=dev)
    # Over the positive entries only (a NaN or negative entry is no positive, as in the kernels).
    pmax = torch.where(any_pos, torch.where(pos, pw, -inf).amax(), 1.0)
    pmin = torch.where(any_pos, torch.where(pos, pw, inf).amin(), 1.0)
    # Largest and smallest weight of a main term: w_pos·m on positives, w_neg on negatives.
    use_pos = any_pos & (w_pos > 0)
    cmax = torch.maximum(torch.where(use_pos, w_pos * pmax, zero), zero + max(w_neg, 0.0))
    cmin = torch.minimum(
        torch.where(use_pos, w_pos * pmin, inf), inf if w_neg <= 0 else zero + w_neg
    )
    has1 = cmax > 0
    cmax = torch.where(has1, cmax, 1.0)
    range1 = torch.where(has1, 2 * shift64 + torch.log(cmax / cmin), zero)
    has_k1 = any_pos & (k1 > 0)
    range2 = torch.where(has_k1, 2 * r2 + torch.log(pmax / pmin), zero)
    ok = (range1 >= 0) & (range1 <= SYM_RANGE) & (range2 >= 0) & (range2 <= SYM_RANGE)
    vec = torch.stack(
        [
            shift64,
            r2,
            torch.where(has1, w_pos / cmax, zero),
            torch.where(has1, w_neg / cmax, zero),
            1.0 / pmax,
        ]
    ).float()
    l1 = torch.log(cmax) + shift64
    l2 = torch.log(k1 * pmax) + vec[1].to(f64) if k1 > 0 else zero
    return SymPlan(vec, l1, l2, range1, range2, ok)


def _deterministic() -> bool:
    # The symmetric kernels combine with atomic adds (sym.py); the general ones do not.
    return torch.are_deterministic_algorithms_enabled()


def sym_chunk(nb):
    """Partner blocks per program of a symmetric launch over ``nb`` row blocks (an int, or a
    SymInt under torch.compile: no guard on its value)."""
    if _one_tile_schedule():
        return 1
    pairs = nb * (nb // 2 + 1)
    return torch.sym_max(1, torch.sym_min(SYM_CHUNK, pairs // SYM_PROGRAMS))


def _launch_sym(name: str, n: int, cfg: TileConfig, fl: dict, args: tuple) -> None:
    nb = triton.cdiv(n, cfg.block_m)
    tiles = {"BLOCK": cfg.block_m, "BLOCK_D": cfg.block_d}
    if name == "_sym_bwd_kernel":
        tiles["BLOCK_DO"] = cfg.block_do
    extra = {}
    if cfg.maxnreg and not interpreting() and not torch.compiler.is_compiling():
        extra["maxnreg"] = MAXNREG
    kern = wrap_triton(getattr(S, name))
    # Program (I, c) pairs block I with blocks (I + t) mod NB, t in [c·chunk, (c+1)·chunk)
    # ∩ [0, NB // 2] (sym.py). The streamed backward computes the first tile of its run only
    # (a loop around it spilled on sm_80): its chunk must be 1. A tuned chunk replaces
    # sym_chunk's rule.
    chunk = 1
    if name == "_sym_fwd_kernel" or fl["RESIDENT"]:
        chunk = cfg.chunk if cfg.chunk > 0 else sym_chunk(nb)
    kern[(nb, triton.cdiv(nb // 2 + 1, chunk))](
        *args, NB=nb, HALF=nb // 2, CHUNK=chunk, **fl, **tiles,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
    )  # fmt: skip


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
        width = 64 if d <= 64 else res.block_d
        return dataclasses.replace(res, block_d=width, block_do=width if res.block_do else 0), True
    return pick_config(kind, arch, dtype, d), False


def _sym_setup(kind, z, d, k1, multilabel, has_pw, mode, config) -> tuple[TileConfig, dict]:
    """Tiles and compile-time flags of a symmetric launch: ``config`` a ``TileConfig`` (the
    streamed variant with those tiles) or a ``tuning.Choice``; ``None``: the tuned table's
    choice for this launch where it has one (``tuning``), else the fixed table's."""
    arch, prec = arch_of(z.device), dot_precision(z.dtype)
    if config is None and not _one_tile_schedule():
        key_flags = {
            "MODE": mode, "HAS_K1": k1 > 0, "MULTILABEL": bool(multilabel) and not has_pw,
            "HAS_PW": bool(has_pw), "DOT_PREC": prec,
        }  # fmt: skip
        choice = tuning.lookup(arch, kind, z.dtype, d, z.shape[0], key_flags)
        if choice is not None and tuning.legal(choice, kind, z.dtype, d, has_pw):
            config = choice
    if isinstance(config, tuning.Choice):
        if not tuning.legal(config, kind, z.dtype, d, has_pw):
            raise ValueError(f"{config} cannot run {kind} for {z.dtype}, D = {d}")
        c = config
        width = c.block_d
        if c.resident and d <= 64:
            width = 64  # as sym_tiles narrows the resident block for D <= 64
        do = width if (c.resident and c.block_do) else c.block_do
        cfg = TileConfig(c.block, c.block, width, do, c.num_warps, c.num_stages, c.chunk, c.maxnreg)
        resident = c.resident
    elif config is None:
        cfg, resident = sym_tiles(kind, arch, z.dtype, d, has_pw)
    else:
        cfg, resident = config, False
    fl = flags("sym", cfg, d, 0, k1, multilabel, has_pw)
    fl.update(MODE=mode, DOT_PREC=prec, RESIDENT=resident)
    return cfg, fl


def _sym_prep(z: Tensor, lab: Tensor):
    z, _, lab, _, d = _prep(z, z, lab, lab)
    return z, lab, d


def sym_lse_fwd(
    z: Tensor,
    lab: Tensor,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool = False,
    pos_weight: Tensor | None = None,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``lse_fwd(z, z, lab, lab, 0, …)`` with each tile pair computed once (sym.py)."""
    z, lab, d = _sym_prep(z, lab)
    n = z.shape[0]
    general = (z, z, lab, lab, 0, scale, w_pos, w_neg, k1, multilabel)
    if n == 0 or _deterministic():
        return lse_fwd(*general, pos_weight=pos_weight)
    plan = sym_plan(z, scale, w_pos, w_neg, k1, pos_weight)
    gate = plan.ok.to(torch.int32).reshape(1)
    # The fallback: runs (and writes) only where the plan failed.
    lse_g, psum_g, pcnt_g = lse_fwd(*general, pos_weight=pos_weight, gate=gate)
    sums = torch.zeros((4, n), dtype=torch.float32, device=z.device)
    cfg, fl = _sym_setup(
        "sym_fwd", z, d, k1, multilabel, pos_weight is not None, K.MODE_LSE, config
    )
    args = (
        z, lab, _unused(z.device), plan.vec, gate, sums, n, d, z.stride(0), float(scale),
        *_pw_args(pos_weight, sums, n, n),
    )  # fmt: skip
    _launch_sym("_sym_fwd_kernel", n, cfg, fl, args)
    ninf = torch.full((), -math.inf, dtype=torch.float64, device=z.device)
    s1, s2 = sums[0].double(), sums[1].double()
    x1 = torch.where(s1 > 0, plan.l1 + torch.log(s1), ninf)
    x2 = torch.where(s2 > 0, plan.l2 + torch.log(s2), ninf) if k1 > 0 else ninf
    lse = torch.logaddexp(x1, x2).float()
    ok = gate.bool()
    return (
        torch.where(ok, lse, lse_g),
        torch.where(ok, sums[2], psum_g),
        torch.where(ok, sums[3], pcnt_g),
    )


def sym_lse_bwd(
    g_lse: Tensor,
    g_psum: Tensor,
    z: Tensor,
    lab: Tensor,
    lse: Tensor,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool = False,
    pos_weight: Tensor | None = None,
    config: TileConfig | None = None,
) -> Tensor:
    """dz = dq + dk of ``lse_bwd(…, z, z, lab, lab, lse, 0, …)``, tile pairs computed once."""
    d_true = z.shape[1]
    z, lab, d = _sym_prep(z, lab)
    n = z.shape[0]
    general = (z, z, lab, lab, 0, scale, w_pos, w_neg, k1, multilabel, None)
    if n == 0 or _deterministic():
        dq, dk = _backward(K.MODE_LSE, g_lse, lse, g_psum, *general, pos_weight)
        return (dq + dk)[:, :d_true]
    plan = sym_plan(z, scale, w_pos, w_neg, k1, pos_weight)
    # Row constants ρ_i = g_lse·scale·c_max·e^{A − lse_i}, κ_i = g_lse·k1·m_max·e^{R² − lse_i}.
    # The exponents are clamped to the largest a row with a term of that stream can have: a
    # row above it has no such term, and its constant only ever multiplies zero weights.
    l = lse.to(torch.float64)
    fin = torch.isfinite(l)
    g = g_lse.to(torch.float64)
    rho = torch.where(fin, g * scale * torch.exp(torch.minimum(plan.l1 - l, plan.range1)), 0.0)
    kap = torch.where(fin, g * torch.exp(torch.minimum(plan.l2 - l, plan.range2)), 0.0)
    # A kernel adds two such constants (times factors <= 1): a quarter of fp32's range.
    big = torch.finfo(torch.float32).max / 4
    ok = plan.ok & (rho.abs() <= big).all() & (kap.abs() <= big).all()  # False for NaN
    rho, kap = rho.float(), kap.float()
    gate = ok.to(torch.int32).reshape(1)
    dq, dk = _backward(K.MODE_LSE, g_lse, lse, g_psum, *general, pos_weight, gate)
    dz = torch.zeros((n, d), dtype=torch.float32, device=z.device)
    cfg, fl = _sym_setup(
        "sym_bwd", z, d, k1, multilabel, pos_weight is not None, K.MODE_LSE, config
    )
    args = (
        z, lab, rho, kap, _stat_in(g_psum), plan.vec, gate, dz, n, d, z.stride(0), dz.stride(0),
        float(scale), *_pw_args(pos_weight, dz, n, n),
    )  # fmt: skip
    _launch_sym("_sym_bwd_kernel", n, cfg, fl, args)
    # The general outputs are unwritten where the gate is 1; where() never reads them there.
    out = torch.where(gate.bool(), dz, dq.float() + dk.float()).to(z.dtype)
    return out[:, :d_true]


def sym_sp_fwd(
    z: Tensor,
    lab: Tensor,
    eta: Tensor,
    scale: float,
    multilabel: bool = False,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """``sp_fwd(z, z, lab, lab, eta, 0, …)`` with each tile pair computed once."""
    z, lab, d = _sym_prep(z, lab)
    n = z.shape[0]
    if n == 0 or _deterministic():
        return sp_fwd(z, z, lab, lab, eta, 0, scale, multilabel)
    sums = torch.zeros((2, n), dtype=torch.float32, device=z.device)
    gate = torch.ones(1, dtype=torch.int32, device=z.device)
    cfg, fl = _sym_setup("sym_fwd", z, d, 0.0, multilabel, False, K.MODE_SP, config)
    args = (
        z, lab, _stat_in(eta), _unused(z.device), gate, sums, n, d, z.stride(0), float(scale),
        *_pw_args(None, sums, n, n),
    )  # fmt: skip
    _launch_sym("_sym_fwd_kernel", n, cfg, fl, args)
    # Separate tensors: an op's outputs may not alias each other.
    return sums[0].clone(), sums[1].clone()


def sym_sp_bwd(
    g_sp: Tensor,
    z: Tensor,
    lab: Tensor,
    eta: Tensor,
    scale: float,
    multilabel: bool = False,
    config: TileConfig | None = None,
) -> Tensor:
    """dz = dq + dk of ``sp_bwd(g_sp, z, z, lab, lab, eta, 0, …)``, tile pairs computed once."""
    d_true = z.shape[1]
    z, lab, d = _sym_prep(z, lab)
    n = z.shape[0]
    if n == 0 or d == 0 or _deterministic():
        dq, dk = sp_bwd(g_sp, z, z, lab, lab, eta, 0, scale, multilabel)
        return (dq + dk)[:, :d_true]
    dz = torch.zeros((n, d), dtype=torch.float32, device=z.device)
    gate = torch.ones(1, dtype=torch.int32, device=z.device)
    cfg, fl = _sym_setup("sym_bwd", z, d, 0.0, multilabel, False, K.MODE_SP, config)
    g = _stat_in(g_sp)
    args = (
        z, lab, g, _stat_in(eta), _unused(z.device), _unused(z.device), gate, dz, n, d,
        z.stride(0), dz.stride(0), float(scale), *_pw_args(None, dz, n, n),
    )  # fmt: skip
    _launch_sym("_sym_bwd_kernel", n, cfg, fl, args)
    return dz.to(z.dtype)[:, :d_true]


# --------------------------------------------------------------------------------------------
# Whole 'all'-mode losses in a handful of launches (fused.py): the symmetric kernels, their
# gated general fallback, and the small kernels that replace the PyTorch epilogue.
# --------------------------------------------------------------------------------------------

FUSED_LOSSES = {"out": F.LOSS_OUT, "sincere": F.LOSS_SINCERE}
# Tiles of the small kernels (fused.py; spill-free in the kernel report at 4 warps).
_ROWS = 64
_COLS = 64
_PREP_ROWS = 32  # the prep kernel's row blocks (its [rows, D chunk] loads: half the rows)
_PLAN_BLOCK = 1024  # partials the one-program plan kernel reduces per step
SMALL_WARPS, SMALL_STAGES = 4, 1


def _fused_constants(w_pos: float, w_neg: float, k1: float) -> tuple[float, ...]:
    """(c_pos, c_neg, log c_max, log(c_max/c_min), log k1, has terms) of ``sym_plan`` without a
    mask (m_max = m_min = 1): host floats, so the prep kernel computes only R², A and the gate."""
    use_pos = w_pos > 0
    cmax = max(w_pos if use_pos else 0.0, max(w_neg, 0.0))
    cmin = min(w_pos if use_pos else math.inf, w_neg if w_neg > 0 else math.inf)
    if cmax <= 0:
        return 0.0, 0.0, 0.0, 0.0, _log_w(k1), False
    return w_pos / cmax, w_neg / cmax, math.log(cmax), math.log(cmax / cmin), _log_w(k1), True


def _fused_code(loss: str) -> int:
    if loss not in FUSED_LOSSES:
        raise ValueError(f"fused loss must be one of {sorted(FUSED_LOSSES)}, got {loss!r}")
    return FUSED_LOSSES[loss]


def _fused_labels(labels: Tensor | None, b: int, multilabel: bool, dev) -> tuple:
    """(LABELS flag, input, L, row stride) of the prep kernel's label expansion."""
    if labels is None:
        return F.LABELS_IDS, _unused(dev, torch.int64), 0, 0
    if multilabel:
        if labels.dtype != torch.bool or labels.dim() != 2 or labels.shape[0] != b:
            raise ValueError(f"multi-hot labels must be bool [{b}, L], got {labels.dtype} "
                             f"{tuple(labels.shape)}")  # fmt: skip
        if not 0 < labels.shape[1] <= 64:
            raise ValueError(f"multi-hot labels need 1 to 64 columns, got {labels.shape[1]}")
        u8 = labels.contiguous().view(torch.uint8)
        return F.LABELS_MULTIHOT, u8, labels.shape[1], u8.stride(0)
    if labels.dtype != torch.int64 or labels.shape != (b,):
        raise ValueError(f"labels must be int64 [{b}], got {labels.dtype} {tuple(labels.shape)}")
    return F.LABELS_CLASSES, labels.contiguous(), 0, 0


def _small(name: str, grid: tuple, args: tuple, **meta) -> None:
    extra = {}
    if not interpreting() and not torch.compiler.is_compiling():
        extra["maxnreg"] = MAXNREG  # as _launch, and as the kernel report compiles them
    kern = wrap_triton(getattr(F, name))
    kern[grid](*args, **meta, num_warps=SMALL_WARPS, num_stages=SMALL_STAGES, **extra)


def fused_fwd(
    z: Tensor,
    labels: Tensor | None,
    views: int,
    loss: str,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool,
    weight: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A whole 'all'-mode loss (fused.py): (loss, stats [4, N], plan [16], gates int32 [8],
    labels int64 [N]).

    ``z`` [N, D] holds ``views`` views of B = N / views samples, view-major; ``labels`` are
    the samples' labels: int64 class ids [B], a multi-hot bool [B, L] (L <= 64, with
    ``multilabel``), or None for sample ids (SimCLR). The prep kernel expands (and packs) them
    to the rows' labels, returned for the backward.

    ``loss`` 'out': (weight/N)·Σ_i [C_i > 0]·(LSE_i − scale·psum_i/C_i) with the LSE of
    weights (w_pos, w_neg, k1); 'sincere': (weight/N)·Σ_i sp_i/max(C_i, 1) with η the LSE of
    weights (0, 1, 0). NaN when any row of z is non-finite. ``stats``, ``plan`` and ``gates``
    are what :func:`fused_bwd` reads. No float argument depends on N: under torch.compile a
    new batch size does not recompile."""
    code = _fused_code(loss)
    n, dev = z.shape[0], z.device
    if views < 1 or n % views:
        raise ValueError(f"{n} rows are not {views} views of equally many samples")
    b = n // views
    kind, lab_in, n_lab, stride_lab = _fused_labels(labels, b, multilabel, dev)
    lab = torch.empty((n,), dtype=torch.int64, device=dev)
    z, _, _, _, d = _prep(z, z, lab, lab)
    stats = torch.empty((4, n), dtype=torch.float32, device=dev)
    plan = torch.empty((F.PLAN_SIZE,), dtype=torch.float32, device=dev)
    gates = torch.empty((8,), dtype=torch.int32, device=dev)  # fused.py: [0] gate, [4] one
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=dev), stats, plan, gates, lab
    out = torch.empty((), dtype=torch.float32, device=dev)
    c_pos, c_neg, log_cmax, log_spread, log_k1, has_terms = _fused_constants(w_pos, w_neg, k1)
    sums = torch.empty((4, n), dtype=torch.float32, device=dev)
    p = triton.cdiv(n, _PREP_ROWS)
    part = torch.empty((2 * p,), dtype=torch.float32, device=dev)  # [R² partials | bad flags]
    _small(
        "_prep_kernel", (p,),
        (z, lab_in, part, sums, lab, n, d, z.stride(0), b, n_lab, stride_lab),
        N_SUMS=4, LABELS=kind, BLOCK_R=_PREP_ROWS, BLOCK_D=_COLS,
    )  # fmt: skip
    _small(
        "_plan_kernel", (1,),
        (part, plan, gates, out, p, float(scale), c_pos, c_neg, log_cmax, log_spread, log_k1),
        RANGE=SYM_RANGE, HAS_K1=k1 > 0, HAS_TERMS=has_terms, BLOCK_P=_PLAN_BLOCK,
    )  # fmt: skip
    # The general kernel runs (and writes) only where the gate is 0.
    lse_g, psum_g, pcnt_g = lse_fwd(
        z, z, lab, lab, 0, scale, w_pos, w_neg, k1, multilabel, gate=gates
    )
    cfg, fl = _sym_setup("sym_fwd", z, d, k1, multilabel, False, K.MODE_LSE, None)
    _launch_sym(
        "_sym_fwd_kernel", n, cfg, fl,
        (z, lab, _unused(dev), plan, gates, sums, n, d, z.stride(0), float(scale),
         *_pw_args(None, sums, n, n)),
    )  # fmt: skip
    rows = (triton.cdiv(n, _ROWS),)
    fin = {"HAS_K1": k1 > 0, "BLOCK_R": _ROWS}
    if code == F.LOSS_OUT:
        _small(
            "_finish_kernel", rows,
            (sums, lse_g, psum_g, pcnt_g, plan, gates, stats, out, _unused(dev), n, float(scale),
             float(weight)),
            LOSS=F.LOSS_OUT, STAGE=0, **fin,
        )  # fmt: skip
        return out, stats, plan, gates, lab
    # SINCERE: η, then the softplus pass (no fallback: its gate is the constant gates[4]).
    sp_sums = torch.empty((2, n), dtype=torch.float32, device=dev)
    _small(
        "_finish_kernel", rows,
        (sums, lse_g, psum_g, pcnt_g, plan, gates, stats, _unused(dev), sp_sums, n, float(scale),
         float(weight)),
        LOSS=F.LOSS_SINCERE, STAGE=0, **fin,
    )  # fmt: skip
    cfg, fl = _sym_setup("sym_fwd", z, d, 0.0, multilabel, False, K.MODE_SP, None)
    _launch_sym(
        "_sym_fwd_kernel", n, cfg, fl,
        (z, lab, stats[0], _unused(dev), gates[4:], sp_sums, n, d, z.stride(0), float(scale),
         *_pw_args(None, sp_sums, n, n)),
    )  # fmt: skip
    _small(
        "_finish_kernel", rows,
        (sp_sums, _unused(dev), _unused(dev), _unused(dev), plan, gates, stats, out,
         _unused(dev), n, float(scale), float(weight)),
        LOSS=F.LOSS_SINCERE, STAGE=1, **fin,
    )  # fmt: skip
    return out, stats, plan, gates, lab


def fused_bwd(
    g: Tensor,
    z: Tensor,
    lab: Tensor,
    stats: Tensor,
    plan: Tensor,
    gates: Tensor,
    loss: str,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool,
    weight: float,
) -> Tensor:
    """dz of :func:`fused_fwd`'s loss for the incoming gradient ``g`` (a 0-d tensor)."""
    code = _fused_code(loss)
    d_true = z.shape[1]
    z, lab, d = _sym_prep(z, lab)
    n = z.shape[0]
    dev = z.device
    out = torch.empty((n, d_true), dtype=z.dtype, device=dev)
    if n == 0 or d == 0:
        return out
    vec = torch.empty((5, n), dtype=torch.float32, device=dev)
    bgates = torch.empty((8,), dtype=torch.int32, device=dev)
    dz = torch.empty((n, d), dtype=torch.float32, device=dev)
    rows = triton.cdiv(n, _ROWS)
    _small(
        "_bwd_prep_kernel", (rows,),
        (g.to(torch.float32).reshape(1), stats, plan, gates, vec, bgates, dz, n, d,
         vec.stride(0), dz.stride(0), float(scale), float(weight),
         torch.finfo(torch.float32).max / 4),
        LOSS=code, HAS_K1=k1 > 0, BLOCK_R=_ROWS, BLOCK_D=_COLS,
    )  # fmt: skip
    if code == F.LOSS_SINCERE:
        cfg, fl = _sym_setup("sym_bwd", z, d, 0.0, multilabel, False, K.MODE_SP, None)
        _launch_sym(
            "_sym_bwd_kernel", n, cfg, fl,
            (z, lab, vec[4], stats[0], _unused(dev), _unused(dev), bgates[4:], dz, n, d,
             z.stride(0), dz.stride(0), float(scale), *_pw_args(None, dz, n, n)),
        )  # fmt: skip
    # The general kernels run (and write dq, dk) only where the backward gate is 0.
    dq, dk = _backward(
        K.MODE_LSE, vec[3], stats[0], vec[2], z, z, lab, lab, 0, scale, w_pos, w_neg, k1,
        multilabel, None, None, bgates,
    )  # fmt: skip
    cfg, fl = _sym_setup("sym_bwd", z, d, k1, multilabel, False, K.MODE_LSE, None)
    _launch_sym(
        "_sym_bwd_kernel", n, cfg, fl,
        (z, lab, vec[0], vec[1], vec[2], plan, bgates, dz, n, d, z.stride(0), dz.stride(0),
         float(scale), *_pw_args(None, dz, n, n)),
    )  # fmt: skip
    _small(
        "_bwd_finish_kernel", (rows, triton.cdiv(d_true, _COLS)),
        (dz, dq, dk, bgates, out, n, d_true, dz.stride(0), dq.stride(0), dk.stride(0),
         out.stride(0)),
        BLOCK_R=_ROWS, BLOCK_D=_COLS,
    )  # fmt: skip
    return out
