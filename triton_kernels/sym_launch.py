"""Launchers of the symmetric ('all'-mode) path: ``sym.py``'s tile-pair kernels for q = k = z,
each unordered tile pair computed once, with the general kernels (``lse_launch``) as the
fallback the device chooses (``sym_plan``: the static shift's constants and its gate).

Tiles: the tuned table (``tuning``) where it has the launch's key, else ``config``'s fixed
table (``config.sym_tiles``: resident or streamed); partner runs: ``config.sym_chunk``. Under
``torch.use_deterministic_algorithms`` the general kernels run instead (these combine with
atomic adds).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from . import config as C
from . import lse as K
from . import lse_launch, tuning
from . import sym as S
from .arguments import _check_pos_weight, _pw_args, _stat_in, _sym_prep, _unused
from .config import TileConfig

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


def _launch_sym(name: str, n: int, cfg: TileConfig, fl: dict, args: tuple) -> None:
    nb = triton.cdiv(n, cfg.block_m)
    tiles = {"BLOCK": cfg.block_m, "BLOCK_D": cfg.block_d}
    if name == "_sym_bwd_kernel":
        tiles["BLOCK_DO"] = cfg.block_do
    kern = wrap_triton(getattr(S, name))
    # Program (I, c) pairs block I with blocks (I + t) mod NB, t in [c·chunk, (c+1)·chunk)
    # ∩ [0, NB // 2] (sym.py). The streamed backward computes the first tile of its run only
    # (a loop around it spilled on sm_80): its chunk must be 1. A tuned chunk replaces
    # sym_chunk's rule.
    chunk = 1
    if name == "_sym_fwd_kernel" or fl["RESIDENT"]:
        chunk = cfg.chunk if cfg.chunk > 0 else C.sym_chunk(nb)
    kern[(nb, triton.cdiv(nb // 2 + 1, chunk))](
        *args, NB=nb, HALF=nb // 2, CHUNK=chunk, **fl, **tiles,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **C.launch_options(cfg.maxnreg),
    )  # fmt: skip


def _sym_setup(kind, z, d, k1, multilabel, has_pw, mode, config) -> tuple[TileConfig, dict]:
    """Tiles and compile-time flags of a symmetric launch: ``config`` a ``TileConfig`` (the
    streamed variant with those tiles) or a ``tuning.Choice``; ``None``: the tuned table's
    choice for this launch where it has one (``tuning``), else the fixed table's."""
    arch, prec = C.arch_of(z.device), C.dot_precision(z.dtype)
    if isinstance(config, tuning.Choice) and not tuning.legal(config, kind, z.dtype, d, has_pw):
        raise ValueError(f"{config} cannot run {kind} for {z.dtype}, D = {d}")
    if config is None and not C._one_tile_schedule():
        key_flags = {
            "MODE": mode, "HAS_K1": k1 > 0, "MULTILABEL": bool(multilabel) and not has_pw,
            "HAS_PW": bool(has_pw), "DOT_PREC": prec,
        }  # fmt: skip
        choice = tuning.lookup(arch, kind, z.dtype, d, z.shape[0], key_flags)
        if choice is not None and tuning.legal(choice, kind, z.dtype, d, has_pw):
            config = choice
    if isinstance(config, tuning.Choice):
        cfg, resident = config.tile_config(d), config.resident
    elif config is None:
        cfg, resident = C.sym_tiles(kind, arch, z.dtype, d, has_pw)
    else:
        cfg, resident = config, False
    fl = C.flags("sym", cfg, d, 0, k1, multilabel, has_pw)
    fl.update(MODE=mode, DOT_PREC=prec, RESIDENT=resident)
    return cfg, fl


def sym_lse_fwd(
    z: Tensor,
    lab: Tensor,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool = False,
    pos_weight: Tensor | None = None,
    config: TileConfig | tuning.Choice | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``lse_fwd(z, z, lab, lab, 0, …)`` with each tile pair computed once (sym.py)."""
    z, lab, d = _sym_prep(z, lab)
    n = z.shape[0]
    general = (z, z, lab, lab, 0, scale, w_pos, w_neg, k1, multilabel)
    if n == 0 or _deterministic():
        return lse_launch.lse_fwd(*general, pos_weight=pos_weight)
    plan = sym_plan(z, scale, w_pos, w_neg, k1, pos_weight)
    gate = plan.ok.to(torch.int32).reshape(1)
    # The fallback: runs (and writes) only where the plan failed.
    lse_g, psum_g, pcnt_g = lse_launch.lse_fwd(*general, pos_weight=pos_weight, gate=gate)
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
    config: TileConfig | tuning.Choice | None = None,
) -> Tensor:
    """dz = dq + dk of ``lse_bwd(…, z, z, lab, lab, lse, 0, …)``, tile pairs computed once."""
    d_true = z.shape[1]
    z, lab, d = _sym_prep(z, lab)
    n = z.shape[0]
    general = (z, z, lab, lab, 0, scale, w_pos, w_neg, k1, multilabel, None)
    if n == 0 or _deterministic():
        dq, dk = lse_launch._backward(K.MODE_LSE, g_lse, lse, g_psum, *general, pos_weight)
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
    dq, dk = lse_launch._backward(K.MODE_LSE, g_lse, lse, g_psum, *general, pos_weight, gate)
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
    config: TileConfig | tuning.Choice | None = None,
) -> tuple[Tensor, Tensor]:
    """``sp_fwd(z, z, lab, lab, eta, 0, …)`` with each tile pair computed once."""
    z, lab, d = _sym_prep(z, lab)
    n = z.shape[0]
    if n == 0 or _deterministic():
        return lse_launch.sp_fwd(z, z, lab, lab, eta, 0, scale, multilabel)
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
    config: TileConfig | tuning.Choice | None = None,
) -> Tensor:
    """dz = dq + dk of ``sp_bwd(g_sp, z, z, lab, lab, eta, 0, …)``, tile pairs computed once."""
    d_true = z.shape[1]
    z, lab, d = _sym_prep(z, lab)
    n = z.shape[0]
    if n == 0 or d == 0 or _deterministic():
        dq, dk = lse_launch.sp_bwd(g_sp, z, z, lab, lab, eta, 0, scale, multilabel)
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
