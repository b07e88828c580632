"""From the engine's row statistics to a loss: the contrast columns of a call, the streams of
the spec table, the per-row combinations and the reduction (docs/losses.md §0).

What every loss of ``flashcon.functional`` (and ``flashcon.pml``) does around the engine, in
PyTorch, so that autograd composes it with the engine ops. Which kernels run is decided once
per call by :func:`flashcon.engine.route`; the streams here go through the returned route.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from . import distributed as D
from .engine import Route
from .queue import MemoryQueue
from .specs import LOSS_SPECS


def acc_dtype(x: Tensor) -> torch.dtype:
    """The statistics (and loss) dtype of ``x``'s loss: fp64 for fp64, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def stream(
    r: Route, spec: str, stat: str, q, k, qlab, klab, self_offset: int, t: float, options=None,
    multilabel: bool = False, pos_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The spec table's streamed log-sum-exp ``stat`` of loss ``spec`` (its weights, from
    ``options`` where they name a loss option) at temperature ``t``."""
    weights = LOSS_SPECS[spec].stream(stat).weights(options or {})
    return r.lse(q, k, qlab, klab, self_offset, 1.0 / t, weights, multilabel, pos_weight)


def fused_loss(
    r: Route, spec: str, loss: str, z: Tensor, labels: Tensor | None, views: int, t: float,
    multilabel: bool, weight: float, options=None,
) -> Tensor:  # fmt: skip
    """The whole loss by the engine's fused op: ``weight`` times the mean of the rows' terms.

    ``labels``: the per-sample labels as validated (int64 [B], multi-hot bool [B, L], or None
    for sample ids): the op expands them over the views itself and divides by N on the
    device (a float argument that depended on N would make torch.compile recompile for every
    batch size). Its kernels give NaN for non-finite features themselves."""
    (one,) = LOSS_SPECS[spec].streams  # a fused loss streams one log-sum-exp
    w_pos, w_neg, k1 = one.weights(options or {})
    eng = r.engine
    assert eng is not None and eng.fused is not None, "route() chose the fused op"
    args = (views, loss, 1.0 / t, w_pos, w_neg, k1, multilabel, weight)
    return eng.fused(z.contiguous(), labels, *args)[0]


def nan_if_nonfinite(value: Tensor, *inputs: Tensor | None) -> Tensor:
    """``value``, or NaN when any floating input holds NaN or ±Inf (never a finite number,
    whichever terms the non-finite entries happen to reach), without a host sync."""
    finite = None
    for x in inputs:
        if isinstance(x, Tensor) and x.is_floating_point():
            ok = torch.isfinite(x).all()
            finite = ok if finite is None else finite & ok
    if finite is None:
        return value
    return torch.where(finite, value, torch.full_like(value, float("nan")))


def anchors(z: Tensor, y: Tensor, na: int) -> tuple[Tensor, Tensor]:
    """The first ``na`` rows as anchors; the very same tensors when they are all the rows."""
    if na == z.shape[0]:
        return z, y
    return z[:na], y[:na]


@dataclasses.dataclass
class Contrast:
    """The contrast columns of this call: the (global) batch rows, then the queue rows."""

    cols: Tensor
    labels: Tensor
    offset: int  # this rank's first row among the columns: its anchors' self offset
    world: int  # W (1 without gather_distributed)
    n_batch: int  # rows of the (global) batch, queue excluded
    soft: Tensor | None = None  # normalised soft labels of the columns (GenSCL)


def contrast(
    z: Tensor, y: Tensor, *, gather: bool, group, queue: MemoryQueue | NegativesOnly | None,
    soft: Tensor | None = None, multilabel: bool = False,
) -> Contrast:  # fmt: skip
    """The columns: this rank's rows, or every rank's (gathered with gradients), then the
    queue's rows (no gradient)."""
    cols, labels, offset, world = z, y, 0, 1
    if gather:
        world, _ = D.world_and_rank(group)
        cols, offset = D.gather_rows(z, group)
        labels, _ = D.gather_rows(y, group)
        if soft is not None:
            soft, _ = D.gather_rows(soft, group)
    n_batch = cols.shape[0]
    if queue is not None:
        qz, qy = queue.check_for(z, soft=soft is not None, multilabel=multilabel)
        cols = torch.cat([cols, qz])
        if soft is not None:
            qy = qy.to(soft.dtype)
            soft = torch.cat([soft, qy / qy.norm(dim=1, keepdim=True)])
        else:
            labels = torch.cat([labels, qy.to(labels.dtype)])
    return Contrast(cols, labels, offset, world, n_batch, soft)


class NegativesOnly:
    """A queue view whose rows are negatives of everything (SimCLR: other samples)."""

    def __init__(self, queue: MemoryQueue) -> None:
        self.queue = queue

    def check_for(self, z: Tensor, soft: bool, multilabel: bool = False) -> tuple[Tensor, Tensor]:
        qz, qy = self.queue.check_for(z, soft=False, multilabel=self.queue.multilabel)
        # Distinct negative ids never equal a (non-negative) sample id, nor each other.
        return qz, -1 - torch.arange(qz.shape[0], device=qz.device)


def sample_ids(b: int, device, gather: bool, group) -> Tensor:
    """SimCLR labels: a sample id unique across ranks (the queue's rows carry −1)."""
    ids = torch.arange(b, device=device)
    if gather:
        _, rank = D.world_and_rank(group)
        ids = ids + rank * (1 << 40)
    return ids


def reduce_rows(rows_sum: Tensor, n_anchors_global, world: int) -> Tensor:
    """W·(1/N_global)·Σ_{local anchors} ℓ_i; the plain mean on one process."""
    return rows_sum * (world / n_anchors_global)


def check_streaming(r: Route, gather: bool, what: str) -> None:
    if r.engine is None and gather:
        raise ValueError(
            f"{what}: gather_distributed=True needs a streaming backend "
            "('auto', 'triton', 'cuda', 'cpu' or 'torch'), not 'reference'"
        )


def finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def out_rows(
    lse: Tensor, psum: Tensor, pcnt: Tensor, t: float, one_term: Tensor | bool = False
) -> Tensor:
    """SupCon L_out per row: LSE_i − Q_i/C_i with Q_i = psum_i/τ; 0 without positives.

    ``one_term``: the rows (a bool tensor, or True for every row) whose log-sum-exp has a
    single term, their one positive: there LSE_i = ℓ_ip = Q_i/C_i, so the row is exactly 0
    (and so is its gradient), but the two sides come from different roundings (the engine's
    shifted sum, the closed form) and would not cancel exactly.
    """
    has = pcnt > 0
    # pcnt is a count for labels but a sum of weights (possibly < 1) for a mask.
    row = finite_or_zero(lse) - psum / (t * torch.where(has, pcnt, torch.ones_like(pcnt)))
    return torch.where(keep(has, one_term), row, torch.zeros_like(row))


def keep(has: Tensor, one_term: Tensor | bool) -> Tensor:
    """The rows whose computed loss is kept: those with a positive, less the one-term rows."""
    if isinstance(one_term, Tensor):
        return has & ~one_term
    return torch.zeros_like(has) if one_term else has
