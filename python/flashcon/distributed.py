"""Global contrast across ranks: gather every rank's rows, with gradients, uneven sizes allowed.

With ``gather_distributed=True`` each rank's anchors are contrasted against the global batch
(every rank's embeddings, gathered with autograd); the rank's own rows sit at its offset among
the columns, which becomes the engine's ``self_offset``. Only the columns are gathered
(O(N_global·D)); nothing N_local × N_global is ever materialised.

Semantics (exact): with W ranks and N_global anchors in all, rank r returns
``W · (1/N_global) · Σ_{its anchors} ℓ_i``. The mean over ranks of the returned values is the
single-process loss on the concatenated batch, and backpropagating every rank's value gives
each rank W × the single-process gradient of its features (the gather's backward sums the
contributions of every rank), which DistributedDataParallel's gradient averaging turns into
exactly the single-process parameter gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _check(group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "gather_distributed=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )


def world_and_rank(group=None) -> tuple[int, int]:
    """(world size W, this process's rank) in ``group``; raises without a process group.

    Args:
        group: the process group (default: the world).
    """
    _check(group)
    return dist.get_world_size(group), dist.get_rank(group)


def gather_rows(x: Tensor, group=None) -> tuple[Tensor, int]:
    """Concatenate ``x`` (rows) from every rank in rank order; returns (rows, own offset).

    Row counts may differ between ranks (rows are padded for the collective and the padding is
    dropped). When ``x`` requires grad the gather is differentiable: the gradient reaching each
    rank's ``x`` is the sum over ranks of the gradients of their copies.

    Args:
        x: this rank's rows ``[n_r, ...]`` (same trailing shape and dtype on every rank).
        group: the process group (default: the world).
    """
    world, rank = world_and_rank(group)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes_t = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes_t, n, group=group)
    sizes = [int(s) for s in sizes_t]
    m = max(sizes)
    pad = x
    if x.shape[0] < m:
        pad = torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
    pad = pad.contiguous()
    if x.requires_grad:
        from torch.distributed.nn.functional import all_gather as ag_autograd

        parts = ag_autograd(pad, group=group)
    else:
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad, group=group)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    return out, sum(sizes[:rank])
