"""``flashcon::triton_*`` ops: the Triton launchers as ``torch.library.triton_op``s.

Same argument order and types as the torch backend's ops in ``flashcon.engine``, including
the trailing ``multilabel`` (bitmask labels, a kernel flag) and ``pos_weight`` (SupContrast's
``mask``, read per tile by the log-sum-exp kernels, flag ``HAS_PW``; the corners no loss calls,
a mask with k1 > 0 or in the softplus pass, run ``torch_stream``, see ``_torch_path``). The
symmetric ('all'-mode) ops ``flashcon::triton_sym_*`` (``SYM_OPS``) run ``sym.py``'s tile-pair
kernels (with the same corners on ``torch_stream``). ``triton_op``
registers each function itself as the fake implementation (the ``wrap_triton`` launches are
skipped on fake tensors), so ``torch.compile`` sees through to the kernels and no separate
``register_fake`` is needed. :func:`flashcon.registration.register_backend_autograd` connects each
forward to its backward op; ``OPS`` is what ``flashcon.engine`` discovers for backend='triton'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashcon.registration import register_backend_autograd, register_symmetric

from . import fused_launch, lse_launch, sym_launch


def _torch_path():
    # Positive weights together with TCL's k1 term, or in the softplus pass, are no loss's
    # call (only SupCon takes a mask, with k1 = 0): those contract corners run the chunked
    # PyTorch implementation (O(chunk × M) memory) instead of more kernel specialisations.
    from flashcon.backends import torch_stream

    return torch_stream


@torch.library.triton_op("flashcon::triton_lse_fwd", mutates_args=())
def lse_fwd_op(
    q: Tensor,
    k: Tensor,
    qlab: Tensor,
    klab: Tensor,
    self_offset: int,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool,
    pos_weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    if pos_weight is not None and k1 > 0:
        return _torch_path().lse_fwd(
            q, k, qlab, klab, self_offset, scale, w_pos, w_neg, k1, multilabel, pos_weight
        )
    return lse_launch.lse_fwd(
        q, k, qlab, klab, self_offset, scale, w_pos, w_neg, k1, multilabel, pos_weight=pos_weight
    )


@torch.library.triton_op("flashcon::triton_lse_bwd", mutates_args=())
def lse_bwd_op(
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
    multilabel: bool,
    pos_weight: Tensor | None,
) -> tuple[Tensor, Tensor]:
    args = (g_lse, g_psum, q, k, qlab, klab, lse, self_offset, scale, w_pos, w_neg, k1, multilabel)
    if pos_weight is not None and k1 > 0:
        return _torch_path().lse_bwd(*args, pos_weight)
    return lse_launch.lse_bwd(*args, pos_weight=pos_weight)


@torch.library.triton_op("flashcon::triton_sp_fwd", mutates_args=())
def sp_fwd_op(
    q: Tensor,
    k: Tensor,
    qlab: Tensor,
    klab: Tensor,
    eta: Tensor,
    self_offset: int,
    scale: float,
    multilabel: bool,
    pos_weight: Tensor | None,
) -> tuple[Tensor, Tensor]:
    args = (q, k, qlab, klab, eta, self_offset, scale, multilabel)
    if pos_weight is not None:
        return _torch_path().sp_fwd(*args, pos_weight)
    return lse_launch.sp_fwd(*args)


@torch.library.triton_op("flashcon::triton_sp_bwd", mutates_args=())
def sp_bwd_op(
    g_sp: Tensor,
    q: Tensor,
    k: Tensor,
    qlab: Tensor,
    klab: Tensor,
    eta: Tensor,
    self_offset: int,
    scale: float,
    multilabel: bool,
    pos_weight: Tensor | None,
) -> tuple[Tensor, Tensor]:
    args = (g_sp, q, k, qlab, klab, eta, self_offset, scale, multilabel)
    if pos_weight is not None:
        return _torch_path().sp_bwd(*args, pos_weight)
    return lse_launch.sp_bwd(*args)


OPS = (lse_fwd_op, lse_bwd_op, sp_fwd_op, sp_bwd_op)
register_backend_autograd(*OPS)


@torch.library.triton_op("flashcon::triton_sym_lse_fwd", mutates_args=())
def sym_lse_fwd_op(
    z: Tensor,
    lab: Tensor,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool,
    pos_weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (z, lab, scale, w_pos, w_neg, k1, multilabel, pos_weight)
    if pos_weight is not None and k1 > 0:
        return _torch_path().sym_lse_fwd(*args)
    return sym_launch.sym_lse_fwd(*args)


@torch.library.triton_op("flashcon::triton_sym_lse_bwd", mutates_args=())
def sym_lse_bwd_op(
    g_lse: Tensor,
    g_psum: Tensor,
    z: Tensor,
    lab: Tensor,
    lse: Tensor,
    scale: float,
    w_pos: float,
    w_neg: float,
    k1: float,
    multilabel: bool,
    pos_weight: Tensor | None,
) -> Tensor:
    args = (g_lse, g_psum, z, lab, lse, scale, w_pos, w_neg, k1, multilabel, pos_weight)
    if pos_weight is not None and k1 > 0:
        return _torch_path().sym_lse_bwd(*args)
    return sym_launch.sym_lse_bwd(*args)


@torch.library.triton_op("flashcon::triton_sym_sp_fwd", mutates_args=())
def sym_sp_fwd_op(
    z: Tensor,
    lab: Tensor,
    eta: Tensor,
    scale: float,
    multilabel: bool,
    pos_weight: Tensor | None,
) -> tuple[Tensor, Tensor]:
    if pos_weight is not None:
        return _torch_path().sym_sp_fwd(z, lab, eta, scale, multilabel, pos_weight)
    return sym_launch.sym_sp_fwd(z, lab, eta, scale, multilabel)


@torch.library.triton_op("flashcon::triton_sym_sp_bwd", mutates_args=())
def sym_sp_bwd_op(
    g_sp: Tensor,
    z: Tensor,
    lab: Tensor,
    eta: Tensor,
    scale: float,
    multilabel: bool,
    pos_weight: Tensor | None,
) -> Tensor:
    if pos_weight is not None:
        return _torch_path().sym_sp_bwd(g_sp, z, lab, eta, scale, multilabel, pos_weight)
    return sym_launch.sym_sp_bwd(g_sp, z, lab, eta, scale, multilabel)


SYM_OPS = (sym_lse_fwd_op, sym_lse_bwd_op, sym_sp_fwd_op, sym_sp_bwd_op)
register_symmetric(*SYM_OPS, fakes=False)


@torch.library.triton_op("flashcon::triton_fused_fwd", mutates_args=())
def fused_fwd_op(
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
    return fused_launch.fused_fwd(
        z, labels, views, loss, scale, w_pos, w_neg, k1, multilabel, weight
    )


@torch.library.triton_op("flashcon::triton_fused_bwd", mutates_args=())
def fused_bwd_op(
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
    return fused_launch.fused_bwd(
        g, z, lab, stats, plan, gates, loss, scale, w_pos, w_neg, k1, multilabel, weight
    )


def _fused_setup(ctx, inputs, output):
    z, _, _, *args = inputs
    _, stats, plan, gates, lab = output
    ctx.save_for_backward(z, lab, stats, plan, gates)
    ctx.args = args
    # Only the loss value is differentiable; no zero gradients are made for the others.
    ctx.mark_non_differentiable(stats, plan, gates, lab)
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, g_loss, g_stats, g_plan, g_gates, g_lab):
    z, lab, stats, plan, gates = ctx.saved_tensors
    dz = fused_bwd_op(g_loss, z, lab, stats, plan, gates, *ctx.args)
    return (dz,) + (None,) * 9


torch.library.register_autograd(fused_fwd_op, _fused_backward, setup_context=_fused_setup)
