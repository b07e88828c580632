"""Launchers of the fused 'all'-mode losses: a whole loss in a handful of launches
(``fused.py``): the small kernels that replace the PyTorch epilogue (prep, plan, finish and
their backward), the symmetric kernels (``sym_launch``) and their gated general fallback
(``lse_launch``). Nothing reaches the host: the gates are read on the device.

The other launchers' functions are called through their modules (``sym_launch._launch_sym``,
``lse_launch.lse_fwd``), so a test that patches one there sees these launches too.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from . import config as C
from . import fused as F
from . import lse as K
from . import lse_launch, sym_launch
from .arguments import _log_w, _prep, _pw_args, _sym_prep, _unused

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
    kern = wrap_triton(getattr(F, name))
    opts = C.launch_options()  # as the other launches, and as the kernel report compiles them
    kern[grid](*args, **meta, num_warps=SMALL_WARPS, num_stages=SMALL_STAGES, **opts)


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
        RANGE=sym_launch.SYM_RANGE, HAS_K1=k1 > 0, HAS_TERMS=has_terms, BLOCK_P=_PLAN_BLOCK,
    )  # fmt: skip
    # The general kernel runs (and writes) only where the gate is 0.
    lse_g, psum_g, pcnt_g = lse_launch.lse_fwd(
        z, z, lab, lab, 0, scale, w_pos, w_neg, k1, multilabel, gate=gates
    )
    cfg, fl = sym_launch._sym_setup("sym_fwd", z, d, k1, multilabel, False, K.MODE_LSE, None)
    sym_launch._launch_sym(
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
    cfg, fl = sym_launch._sym_setup("sym_fwd", z, d, 0.0, multilabel, False, K.MODE_SP, None)
    sym_launch._launch_sym(
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
        cfg, fl = sym_launch._sym_setup("sym_bwd", z, d, 0.0, multilabel, False, K.MODE_SP, None)
        sym_launch._launch_sym(
            "_sym_bwd_kernel", n, cfg, fl,
            (z, lab, vec[4], stats[0], _unused(dev), _unused(dev), bgates[4:], dz, n, d,
             z.stride(0), dz.stride(0), float(scale), *_pw_args(None, dz, n, n)),
        )  # fmt: skip
    # The general kernels run (and write dq, dk) only where the backward gate is 0.
    dq, dk = lse_launch._backward(
        K.MODE_LSE, vec[3], stats[0], vec[2], z, z, lab, lab, 0, scale, w_pos, w_neg, k1,
        multilabel, None, None, bgates,
    )  # fmt: skip
    cfg, fl = sym_launch._sym_setup("sym_bwd", z, d, k1, multilabel, False, K.MODE_LSE, None)
    sym_launch._launch_sym(
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
