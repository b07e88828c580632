"""``flashcon::triton_*`` ops: the Triton launchers as ``torch.library.triton_op``s.

Same argument order and types as the torch backend's ops in ``flashcon.engine``. ``triton_op``
registers each function itself as the fake implementation (the ``wrap_triton`` launches are
skipped on fake tensors), so ``torch.compile`` sees through to the kernels and no separate
``register_fake`` is needed. :func:`flashcon.engine.register_backend_autograd` connects each
forward to its backward op; ``OPS`` is what ``flashcon.engine`` discovers for backend='triton'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashcon.engine import register_backend_autograd

from . import launch


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
) -> tuple[Tensor, Tensor, Tensor]:
    return launch.lse_fwd(q, k, qlab, klab, self_offset, scale, w_pos, w_neg, k1)


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
) -> tuple[Tensor, Tensor]:
    return launch.lse_bwd(g_lse, g_psum, q, k, qlab, klab, lse, self_offset, scale, w_pos, w_neg, k1)


@torch.library.triton_op("flashcon::triton_sp_fwd", mutates_args=())
def sp_fwd_op(
    q: Tensor, k: Tensor, qlab: Tensor, klab: Tensor, eta: Tensor, self_offset: int, scale: float
) -> tuple[Tensor, Tensor]:
    return launch.sp_fwd(q, k, qlab, klab, eta, self_offset, scale)


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
) -> tuple[Tensor, Tensor]:
    return launch.sp_bwd(g_sp, q, k, qlab, klab, eta, self_offset, scale)


OPS = (lse_fwd_op, lse_bwd_op, sp_fwd_op, sp_bwd_op)
register_backend_autograd(*OPS)
