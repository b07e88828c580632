"""How a backend's engine ops become differentiable and traceable: the autograd and fake
(shape-only) registrations every backend shares.

The lowest layer above the ops themselves: the backends (``flashcon.engine``'s torch ops, the
C++ extension's, ``flashcon.triton_kernels.ops``) call these helpers when their ops are
defined, and nothing here imports a backend or the engine. The contract the ops implement is
``flashcon.engine``'s docstring.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .backends import torch_stream


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): Triton kernels then run on
    CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _stat(g: Tensor | None, like: Tensor) -> Tensor:
    if g is None:
        return torch.zeros_like(like)
    return g.to(like.dtype).contiguous()


def register_backend_autograd(lse_fwd_op, lse_bwd_op, sp_fwd_op, sp_bwd_op) -> None:
    """Connect forward ops to their backward ops with ``torch.library.register_autograd``.

    Args:
        lse_fwd_op: the backend's ``lse_fwd`` op.
        lse_bwd_op: its ``lse_bwd`` op.
        sp_fwd_op: its ``sp_fwd`` op.
        sp_bwd_op: its ``sp_bwd`` op.
    """

    def lse_setup(ctx, inputs, output):
        q, k, qlab, klab, self_offset, scale, w_pos, w_neg, k1, multilabel, pos_weight = inputs
        ctx.save_for_backward(q, k, qlab, klab, output[0], pos_weight)
        ctx.args = (self_offset, scale, w_pos, w_neg, k1, multilabel)

    def lse_backward(ctx, g_lse, g_psum, g_pcnt):
        q, k, qlab, klab, lse, pos_weight = ctx.saved_tensors
        g_l, g_p = _stat(g_lse, lse), _stat(g_psum, lse)
        dq, dk = lse_bwd_op(g_l, g_p, q, k, qlab, klab, lse, *ctx.args, pos_weight)
        return (dq, dk) + (None,) * 9

    torch.library.register_autograd(lse_fwd_op, lse_backward, setup_context=lse_setup)

    def sp_setup(ctx, inputs, output):
        q, k, qlab, klab, eta, self_offset, scale, multilabel, pos_weight = inputs
        ctx.save_for_backward(q, k, qlab, klab, eta, output[1], pos_weight)
        ctx.args = (self_offset, scale, multilabel)

    def sp_backward(ctx, g_sp, g_r):
        q, k, qlab, klab, eta, r, pos_weight = ctx.saved_tensors
        g = _stat(g_sp, eta)
        dq, dk = sp_bwd_op(g, q, k, qlab, klab, eta, *ctx.args, pos_weight)
        # ∂sp_i/∂eta_i = r_i; r itself is treated as a constant (no second-order terms).
        return dq, dk, None, None, g * r, None, None, None, None

    torch.library.register_autograd(sp_fwd_op, sp_backward, setup_context=sp_setup)


def register_symmetric(sym_lse_fwd, sym_lse_bwd, sym_sp_fwd, sym_sp_bwd, fakes=True) -> None:
    """Autograd of a backend's symmetric ops, and their fake implementations unless the ops
    bring their own.

    Args:
        sym_lse_fwd: the backend's ``sym_lse_fwd`` op.
        sym_lse_bwd: its ``sym_lse_bwd`` op.
        sym_sp_fwd: its ``sym_sp_fwd`` op.
        sym_sp_bwd: its ``sym_sp_bwd`` op.
        fakes: register fake implementations (``False`` for ``triton_op``s, which are their
            own fakes).
    """
    if fakes:

        @torch.library.register_fake(sym_lse_fwd)
        def _(z, *args):
            return _fake_stats(z, 3)

        @torch.library.register_fake(sym_lse_bwd)
        def _(g_lse, g_psum, z, *args):
            return torch.empty_like(z)

        @torch.library.register_fake(sym_sp_fwd)
        def _(z, *args):
            return _fake_stats(z, 2)

        @torch.library.register_fake(sym_sp_bwd)
        def _(g_sp, z, *args):
            return torch.empty_like(z)

    def lse_setup(ctx, inputs, output):
        z, lab, scale, w_pos, w_neg, k1, multilabel, pos_weight = inputs
        ctx.save_for_backward(z, lab, output[0], pos_weight)
        ctx.args = (scale, w_pos, w_neg, k1, multilabel)

    def lse_backward(ctx, g_lse, g_psum, g_pcnt):
        z, lab, lse, pos_weight = ctx.saved_tensors
        dz = sym_lse_bwd(_stat(g_lse, lse), _stat(g_psum, lse), z, lab, lse, *ctx.args, pos_weight)
        return (dz,) + (None,) * 7

    torch.library.register_autograd(sym_lse_fwd, lse_backward, setup_context=lse_setup)

    def sp_setup(ctx, inputs, output):
        z, lab, eta, scale, multilabel, pos_weight = inputs
        ctx.save_for_backward(z, lab, eta, output[1], pos_weight)
        ctx.args = (scale, multilabel)

    def sp_backward(ctx, g_sp, g_r):
        z, lab, eta, r, pos_weight = ctx.saved_tensors
        g = _stat(g_sp, eta)
        dz = sym_sp_bwd(g, z, lab, eta, *ctx.args, pos_weight)
        return dz, None, g * r, None, None, None

    torch.library.register_autograd(sym_sp_fwd, sp_backward, setup_context=sp_setup)


def _fake_stats(q: Tensor, n_out: int) -> tuple[Tensor, ...]:
    acc = torch_stream.stat_dtype(q.dtype)
    return tuple(q.new_empty((q.shape[0],), dtype=acc) for _ in range(n_out))


def register_fakes(lse_fwd_op, lse_bwd_op, sp_fwd_op, sp_bwd_op) -> None:
    """Register shape-only implementations used by torch.compile and meta tensors.

    Args:
        lse_fwd_op: the backend's ``lse_fwd`` op.
        lse_bwd_op: its ``lse_bwd`` op.
        sp_fwd_op: its ``sp_fwd`` op.
        sp_bwd_op: its ``sp_bwd`` op.
    """

    @torch.library.register_fake(lse_fwd_op)
    def _(q, k, *args):
        return _fake_stats(q, 3)

    @torch.library.register_fake(lse_bwd_op)
    def _(g_lse, g_psum, q, k, *args):
        return torch.empty_like(q), torch.empty_like(k)

    @torch.library.register_fake(sp_fwd_op)
    def _(q, k, *args):
        return _fake_stats(q, 2)

    @torch.library.register_fake(sp_bwd_op)
    def _(g_sp, q, k, *args):
        return torch.empty_like(q), torch.empty_like(k)
