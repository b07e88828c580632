"""Launchers of the Triton engine kernels: checks, allocation, tile choice, grid, strides.

No autograd here (that is ``flashcon.engine.register_backend_autograd``, wired in ``ops.py``)
and nothing that reads tensor data, so every launcher also runs on fake tensors (the
``triton_op`` fake implementation is the launcher itself, with the kernel launch skipped).
Nothing touches the GPU driver at import time: the architecture is read when a launcher runs.

Tile sizes come from a small fixed table per architecture (``CONFIGS``); with
``FLASHCON_AUTOTUNE=1`` the launchers autotune over a few configurations around it instead
(always-masked D tails then, since the chunk width is not known when the flags are chosen).

fp32 dot precision: "ieee" by default, "tf32" when ``torch.get_float32_matmul_precision()`` is
"high" or "medium" (equivalently ``torch.backends.cuda.matmul.allow_tf32 = True``). An fp32
caller then gets from the fused loss the same precision its own fp32 matmuls have: exact fp32
products by default (PyTorch's default), TF32 (≈ fp16-input accuracy, LOSSES.md §6) only where
the user opted in for speed. Under the interpreter the choice has no effect (numpy computes in
fp32); it matters on the GPU only.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from flashcon.engine import _interpreting

from . import lse as K

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_d: int  # D chunk of the similarity products
    block_do: int  # D chunk of the dq/dk outputs (backward only; 0 in the forward)
    num_warps: int
    num_stages: int


# (arch, kernel, input bits, D bucket) -> tiles. "narrow" is D ≤ 64, "wide" D > 64; the forward
# ignores the bucket (its register use does not grow with D: D is streamed in chunks).
# Checked spill-free and within shared memory by ``python -m flashcon.tools.kernel_report``.
CONFIGS: dict[tuple[int, str, int, str], TileConfig] = {
    # Forward, 16-bit: a 64×64 fp32 similarity tile over 8 warps (~190-230 registers with
    # every flag on). 128×64 over 8 warps spills once HAS_K1, HAS_SELF and MULTILABEL are all
    # on (a second exponent tile and the mask tiles), and so does 64×64 over 4 warps on sm_80.
    (80, "fwd", 16, "any"): TileConfig(64, 64, 64, 0, 8, 2),
    (90, "fwd", 16, "any"): TileConfig(64, 64, 64, 0, 8, 2),
    # Forward, fp32: "ieee" products are FMA in registers; 32×32 over 4 warps is spill-free
    # on both for every flag set (32×64 spills with HAS_SELF on sm_90; 8 warps cap ptxas at
    # 128 registers and spill).
    (80, "fwd", 32, "any"): TileConfig(32, 32, 32, 0, 4, 2),
    (90, "fwd", 32, "any"): TileConfig(32, 32, 32, 0, 4, 2),
    # Softplus pass, fp32: σ and softplus of every pair hold more live values than the LSE
    # update; at 32×32 over 4 warps one flag set spilled 8 B at sm_80's 255 registers.
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
    # Backward, fp32: G stays fp32 and "ieee" products are FMA in registers. 32×32 tiles with
    # a 32-wide output chunk over 2 warps, unpipelined, leave 4 of 192 fp32 specialisations
    # with a 16-byte spill (ptxas spills there below the register limit); 4 warps or two
    # stages spill in more of them. Known defect, listed by the kernel report.
    (80, "bwd", 32, "wide"): TileConfig(32, 32, 32, 32, 2, 1),
    (90, "bwd", 32, "wide"): TileConfig(32, 32, 32, 32, 2, 1),
    (80, "bwd", 32, "narrow"): TileConfig(32, 32, 32, 32, 2, 1),
    (90, "bwd", 32, "narrow"): TileConfig(32, 32, 32, 32, 2, 1),
}

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


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the fp32 products (see the module docstring); 16-bit: unused."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def pick_config(kind: str, arch: int, dtype: torch.dtype, d: int) -> TileConfig:
    """Tiles of ``kind`` 'fwd', 'sp' (the softplus pass; the forward's tiles unless the table
    has its own) or 'bwd'."""
    bits = 32 if dtype == torch.float32 else 16
    bucket = "any" if kind in ("fwd", "sp") else d_bucket(d)
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
) -> dict:
    """Compile-time flags the launchers pass (the kernel report enumerates the same set)."""
    chunk = cfg.block_d if kind == "fwd" else max(cfg.block_d, cfg.block_do)
    return {
        "HAS_K1": k1 > 0,
        "HAS_SELF": self_offset >= 0,
        # With a mask the labels are ignored (the contract), so the label test is not compiled.
        "MULTILABEL": bool(multilabel) and not has_pw,
        "HAS_PW": bool(has_pw),
        "EVEN_D": d % chunk == 0,
    }


def _pw_args(pos_weight: Tensor | None, like: Tensor, n: int, m: int) -> tuple:
    """(mask, i mod Bq [N], j mod Bk [M], Bk) of SupContrast's [Bq, Bk] mask; placeholders
    without one (never read: the kernel is compiled without HAS_PW)."""
    if pos_weight is None:
        return like, like, like, 1
    if pos_weight.dim() != 2 or pos_weight.numel() == 0:
        raise ValueError(
            f"pos_weight must be a non-empty [Bq, Bk] matrix, got {tuple(pos_weight.shape)}"
        )
    if pos_weight.numel() >= 2**31:
        raise ValueError(f"pos_weight has {pos_weight.numel()} entries; at most 2^31 - 1 supported")
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
            key.append("HAS_PW")
        if name != "_sp_fwd_kernel":
            key.append("HAS_K1")
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
    if not _interpreting() and not torch.compiler.is_compiling():
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
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, qlab, klab, d = _prep(q, k, qlab, klab)
    n, m = q.shape[0], k.shape[0]
    lse = q.new_empty((n,), dtype=torch.float32)
    psum = q.new_empty((n,), dtype=torch.float32)
    pcnt = q.new_empty((n,), dtype=torch.float32)
    if n == 0:
        return lse, psum, pcnt
    cfg = config or pick_config("fwd", arch_of(q.device), q.dtype, d)
    fl = flags("fwd", cfg, d, self_offset, k1, multilabel, pos_weight is not None)
    args = (
        q, k, qlab, klab, lse, psum, pcnt, n, m, d, q.stride(0), k.stride(0),
        max(self_offset, 0), float(scale), _log_w(w_pos), _log_w(w_neg), _log_w(k1),
        *_pw_args(pos_weight, lse, n, m),
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
    fl = flags("fwd", cfg, d, self_offset, 0.0, multilabel)
    del fl["HAS_K1"], fl["HAS_PW"]
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
    fl = flags("bwd", cfg, d, self_offset, k1, multilabel, pos_weight is not None)
    fl.update(MODE=mode, DOT_PREC=dot_precision(q.dtype))
    g0, stat, g1 = _stat_in(g0), _stat_in(stat), _stat_in(g1)
    tail = (
        n, m, d, q.stride(0), k.stride(0),
    )  # fmt: skip
    consts = (
        max(self_offset, 0), float(scale), _log_w(w_pos), _log_w(w_neg), _log_w(k1),
        *_pw_args(pos_weight, g0, n, m),
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
