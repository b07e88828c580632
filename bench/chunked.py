"""A chunked SupCon baseline in plain PyTorch, compiled: the benchmark's ``chunked-compile``.

This is what a user can write without a streaming kernel: loop over blocks of anchor rows,
compute each block's N-wide logits, log-sum-exp and positive mean, and let ``torch.compile``
fuse the block. Each block is wrapped in activation checkpointing, so autograd keeps only the
block's inputs and the backward recomputes its logits: memory stays O(chunk·N), not O(N²).
It is not part of the package (flashcon's own PyTorch fallback is ``backend='torch'``).

Semantics: SupCon L_out, 'all' contrast mode, τ/τ_b scale, anchors without positives give 0
and count in the mean, the same as ``flashcon.reference.supcon_loss`` with integer labels.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Elements of one block of logits (chunk rows × N columns).
CHUNK_ELEMS = int(os.environ.get("BENCH_CHUNK_ELEMS", 1 << 22))


def _block_rows_loss(zc: Tensor, z: Tensor, yc: Tensor, y: Tensor, first: Tensor, inv_t: float):
    """Σ over the block's anchors of  LSE_{a≠i} ℓ_ia − mean_{p∈P(i)} ℓ_ip  (0 without positives)."""
    logits = (zc @ z.T).float() * inv_t
    rows = first + torch.arange(zc.shape[0], device=z.device)
    cols = torch.arange(z.shape[0], device=z.device)
    not_self = rows[:, None] != cols[None, :]
    pos = (yc[:, None] == y[None, :]) & not_self
    lse = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1)
    count = pos.sum(dim=1)
    pos_mean = torch.where(pos, logits, 0.0).sum(dim=1) / count.clamp_min(1)
    return torch.where(count > 0, lse - pos_mean, 0.0).sum()


@functools.cache
def _compiled_block():
    # One compiled graph per block shape; the block's first row is a tensor argument so that
    # the loop does not recompile for every block.
    return torch.compile(_block_rows_loss, dynamic=False)


def chunked_supcon_loss(
    features: Tensor,
    labels: Tensor | None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    chunk_elems: int = CHUNK_ELEMS,
) -> Tensor:
    """SupCon over ``features`` ``[N, D]`` (or ``[B, V, D]``, view-major) with integer labels.

    ``labels=None`` uses the sample index (SimCLR / NT-Xent positives).
    """
    if features.dim() == 3:
        b, v, _ = features.shape
        z = torch.cat(features.unbind(1))
    else:
        b, v = features.shape[0], 1
        z = features
    y = torch.arange(b, device=z.device) if labels is None else labels
    y = y.repeat(v)
    n = z.shape[0]
    chunk = max(1, min(n, chunk_elems // n))
    block = _compiled_block()
    total = z.new_zeros((), dtype=torch.float32)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        first = torch.tensor(r0, device=z.device)
        total = total + checkpoint(
            block, z[r0:r1], z, y[r0:r1], y, first, 1.0 / temperature, use_reentrant=False
        )
    return (temperature / base_temperature) * total / n
