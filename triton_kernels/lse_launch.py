"""Launchers of the general kernels (``lse.py``): q [N, D] against k [M, D], the log-sum-exp
forward, the softplus pass and their dq/dk backward. Also the fallback the symmetric and
fused launchers gate on the device (``sym_launch``, ``fused_launch``).

No autograd here (that is ``flashcon.registration.register_backend_autograd``, wired in
``ops.py``) and nothing that reads tensor data, so every launcher also runs on fake tensors
(the ``triton_op`` fake implementation is the launcher itself, with the kernel launch
skipped). Tiles, flags, dot precision and launch options: ``config``; argument checks and
preparation: ``arguments``.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from . import config as C
from . import lse as K
from .arguments import _log_w, _prep, _pw_args, _stat_in, _unused
from .config import TileConfig

# --------------------------------------------------------------------------------------------
# Kernel handles: plain JIT kernels with the table's tiles, or autotuned ones on request.
# --------------------------------------------------------------------------------------------

_TUNED: dict[str, object] = {}


def _kernel(name: str):
    fn = getattr(K, name)
    if not C._autotune_enabled():
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
        _TUNED[name] = triton.autotune(configs=C._autotune_configs(kind), key=key)(fn)
    return _TUNED[name]


def _launch(name: str, kind: str, rows: int, d: int, cfg: TileConfig, fl: dict, args: tuple):
    """Launch kernel ``name`` over ``rows`` (and D-out chunks for the backward)."""
    kern = wrap_triton(_kernel(name))
    if C._autotune_enabled():
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
    opts = C.launch_options()
    kern[grid](*args, **fl, **tiles, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **opts)


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
    cfg = config or C.pick_config("fwd", C.arch_of(q.device), q.dtype, d)
    fl = C.flags(
        "fwd", cfg, d, self_offset, k1, multilabel, pos_weight is not None, gate is not None
    )
    args = (
        q, k, qlab, klab, lse, psum, pcnt, n, m, d, q.stride(0), k.stride(0),
        max(self_offset, 0), float(scale), _log_w(w_pos), _log_w(w_neg), _log_w(k1),
        *_pw_args(pos_weight, lse, n, m), _unused(q.device, torch.int32) if gate is None else gate,
    )  # fmt: skip
    _launch("_lse_fwd_kernel", "fwd", n, d, cfg, {**fl, "DOT_PREC": C.dot_precision(q.dtype)}, args)
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
    cfg = config or C.pick_config("sp", C.arch_of(q.device), q.dtype, d)
    fl = C.flags("sp", cfg, d, self_offset, 0.0, multilabel)
    args = (
        q, k, qlab, klab, _stat_in(eta), sp, r, n, m, d, q.stride(0), k.stride(0),
        max(self_offset, 0), float(scale),
    )  # fmt: skip
    _launch("_sp_fwd_kernel", "fwd", n, d, cfg, {**fl, "DOT_PREC": C.dot_precision(q.dtype)}, args)
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
    cfg = config or C.pick_config("bwd", C.arch_of(q.device), q.dtype, d)
    fl = C.flags(
        "bwd", cfg, d, self_offset, k1, multilabel, pos_weight is not None, gate is not None
    )
    fl.update(MODE=mode, DOT_PREC=C.dot_precision(q.dtype))
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
