"""A streaming stand-in for pytorch-metric-learning's ``SupConLoss``.

Code written for that library swaps in by changing one import::

    # was: from pytorch_metric_learning.losses import SupConLoss
    from flashcon.pml import SupConLoss
    loss = SupConLoss(temperature=0.1)(embeddings, labels)
    loss = SupConLoss(temperature=0.1)(embeddings, labels, ref_emb=ref, ref_labels=ref_labels)

Where pytorch-metric-learning is installed the class is one of its losses (a
``BaseMetricLossFunction``), so its wrappers take it: ``DistributedLossWrapper`` (both modes)
and ``CrossBatchMemory`` (without a miner). Without the library it is a plain ``nn.Module``
with the same call.

Its semantics, kept here exactly:

- embeddings (and ``ref_emb``) are L2-normalised (its default ``CosineSimilarity`` distance);
- the columns are ``ref_emb`` when given, else the embeddings themselves. An anchor's own
  pair is left out where the library leaves it out: when the columns are the embeddings, and
  whenever ``ref_labels`` is the very same tensor as ``labels`` (the library then drops pair
  (i, i), whatever ``ref_emb`` holds); with other ``ref_labels`` no pair is a self pair;
- each anchor's loss is the SupCon L_out term (no base-temperature scaling);
- the reduction averages the anchors whose loss is above 0 (its ``AvgNonZeroReducer``). That
  count is decided exactly, not from the rounded losses: an anchor counts when it has a
  positive and at least two columns (one column, its positive, gives exactly 0);
- a batch with no positive pair or no negative pair, or with at most one of each, gives 0;
- ``indices_tuple`` is taken when it holds the labels' pairs less at most one (self) pair
  per anchor, which is what ``CrossBatchMemory`` (without a miner) and
  ``DistributedLossWrapper(efficient=True)`` pass; other pair sets (miners) are refused.

Where it differs: NaN or ±Inf anywhere in ``embeddings`` or ``ref_emb`` gives NaN (the library
returns NaN for non-finite ``embeddings`` but can return 0 when only ``ref_emb`` is bad); the
loss is computed in fp32 (fp64 for fp64 input) and returned in the embeddings' dtype, as the
library returns it; only its default distance and reducer are accepted.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validate as V
from .combine import nan_if_nonfinite, out_rows, stream
from .engine import route

try:  # pytorch-metric-learning is optional: its wrappers need its base class.
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import BaseMetricLossFunction
    from pytorch_metric_learning.reducers import AvgNonZeroReducer
except ImportError:  # pragma: no cover - exercised where the library is absent
    CosineSimilarity = AvgNonZeroReducer = BaseMetricLossFunction = None

HAS_PML = BaseMetricLossFunction is not None
_Base = BaseMetricLossFunction if HAS_PML else nn.Module

_ALTERNATIVES = (
    "mined pairs cannot be streamed: keep past batches as extra columns with a "
    "flashcon.MemoryQueue (flashcon.supcon_loss(..., queue=queue)), contrast against every "
    "rank's batch with gather_distributed=True, or use pytorch_metric_learning.losses."
    "SupConLoss for mined pairs"
)


class SupConLoss(_Base):
    """pytorch-metric-learning's ``SupConLoss``, streamed (semantics in the module docstring).

    Args:
        temperature: τ (default 0.1, the library's).
        backend: a streaming backend, as the functional losses' ``backend`` (default
            ``'auto'``; ``'reference'`` is refused).
        distance: the library's ``CosineSimilarity()`` (its default, and the only distance
            streamed; its ``p`` is honoured, ``power`` must be 1) or None.
        reducer: the library's ``AvgNonZeroReducer()`` (its default, and the only reduction
            here) or None. For the mean over every anchor (the library's ``MeanReducer``)
            use ``flashcon.supcon_loss(normalize(x), labels, temperature=t,
            base_temperature=t)``.
        collect_stats: as the library's (no statistics are recorded here).
        embedding_regularizer: must be None (add ``w * regularizer(embeddings)`` to the loss
            yourself).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        backend: str = "auto",
        *,
        distance=None,
        reducer=None,
        collect_stats: bool | None = None,
        embedding_regularizer=None,
    ) -> None:
        if embedding_regularizer is not None:
            raise ValueError(
                "flashcon.pml.SupConLoss takes no embedding_regularizer: add it to the loss "
                "yourself (loss + weight * regularizer(embeddings))"
            )
        if HAS_PML:
            super().__init__(distance=distance, reducer=reducer, collect_stats=collect_stats)
            self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)
        else:
            super().__init__()
            for name, obj in (("distance", distance), ("reducer", reducer)):
                if obj is not None:
                    raise ValueError(
                        f"{name}= takes a pytorch-metric-learning object, and the library is "
                        "not installed; leave it None (its default is what is computed)"
                    )
            self.collect_stats = bool(collect_stats)
        self._p = _check_distance(getattr(self, "distance", None))
        _check_reducer(getattr(self, "reducer", None))
        self.temperature = V.check_temperature(temperature, "temperature")
        self.backend = backend

    # The library's constructor asks for these when no distance or reducer is given.
    def get_default_distance(self):
        """The library's ``CosineSimilarity()``, as its SupConLoss."""
        return CosineSimilarity()

    def get_default_reducer(self):
        """The library's ``AvgNonZeroReducer()``, as its SupConLoss."""
        return AvgNonZeroReducer()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple=None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """The loss, in the embeddings' dtype (computed in fp32; fp64 for fp64 embeddings).

        Args:
            embeddings: ``[N, D]``, L2-normalised inside.
            labels: class ids ``[N]`` (integer, or floating with integral values; required).
                Moved to the embeddings' device, as the library does.
            indices_tuple: None, or pairs ``(a1, p, a2, n)`` / triplets ``(a, p, n)`` that are
                the labels' pairs less at most one self pair per anchor (what
                ``CrossBatchMemory`` passes); other pair sets raise.
            ref_emb: optional ``[M, D]`` reference embeddings used as the columns.
            ref_labels: their class ids ``[M]`` (required with ``ref_emb``; the very tensor
                ``labels`` drops each anchor's pair (i, i), as the library does).
        """
        same = ref_labels is labels
        z = V.check_tensor(embeddings, "embeddings")
        if z.dim() != 2:
            raise ValueError(f"embeddings must have shape [N, D], got {tuple(z.shape)}")
        if labels is None:
            raise ValueError(
                "flashcon.pml.SupConLoss needs labels [N] (pairs alone are not streamed; use "
                "pytorch_metric_learning.losses.SupConLoss for them)"
            )
        y = _labels(labels, z, z.shape[0], "labels")
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError("ref_labels was given without ref_emb")
            k, ky, same = z, y, True
        else:
            k = V.check_tensor(ref_emb, "ref_emb")
            if k.dim() != 2 or k.shape[1] != z.shape[1]:
                raise ValueError(f"ref_emb must have shape [M, {z.shape[1]}], got {tuple(k.shape)}")
            if k.dtype != z.dtype or k.device != z.device:
                raise TypeError(
                    f"ref_emb ({k.dtype}, {k.device}) must match embeddings ({z.dtype}, {z.device})"
                )
            if ref_labels is None:
                raise ValueError("ref_labels is required with ref_emb")
            if same and k.shape[0] != z.shape[0]:
                raise ValueError(
                    f"ref_labels (the labels tensor) has {z.shape[0]} entries but ref_emb has "
                    f"{k.shape[0]} rows"
                )
            ky = y if same else _labels(ref_labels, z, k.shape[0], "ref_labels")
        r = route(self.backend, z.device)
        if r.engine is None:
            raise ValueError("flashcon.pml.SupConLoss streams: backend='reference' is refused")
        t = self.temperature
        q = nn.functional.normalize(z, p=self._p, dim=1)
        kn = q if k is z else nn.functional.normalize(k, p=self._p, dim=1)
        if indices_tuple is None:
            groups = [(None, kn, ky, 0 if same else -1)]
        else:
            pairs = _as_pairs(indices_tuple)
            n_pos, n_neg = len(pairs[0]), len(pairs[2])
            # The library returns 0 for these before it looks at the pairs.
            if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
                return nan_if_nonfinite((q.sum() + kn.sum()) * 0, z, k).to(z.dtype)
            groups = _pair_groups(pairs, y, ky, kn)
        total = count = pos = neg = 0
        for rows, cols, col_lab, self_offset in groups:
            qg, yg = (q, y) if rows is None else (q[rows], y[rows])
            lse, psum, pcnt = stream(r, "supcon_out", "lse", qg, cols, yg, col_lab, self_offset, t)
            n_cols = cols.shape[0] - (1 if self_offset == 0 else 0)
            total = total + out_rows(lse, psum, pcnt, t, n_cols == 1).sum()
            # AvgNonZeroReducer: the anchors whose exact loss is > 0 (a positive among at
            # least two columns), whatever their rounded values.
            count = count + (pcnt > 0).sum() * int(n_cols >= 2)
            pos = pos + pcnt.sum()
            neg = neg + (n_cols * qg.shape[0] - pcnt.sum())
        out = total / count.clamp_min(1).to(total.dtype)
        if indices_tuple is None:
            # No positive pair, or no negative pair, or at most one of each: 0, as the library.
            degenerate = (pos == 0) | (neg == 0) | ((pos <= 1) & (neg <= 1))
            out = torch.where(degenerate, torch.zeros_like(out), out)
        return nan_if_nonfinite(out, z, None if k is z else k).to(z.dtype)


def _check_distance(distance) -> float:
    """The norm's p of an accepted distance (the library's CosineSimilarity, power 1)."""
    if distance is None:
        return 2.0
    if type(distance) is not CosineSimilarity or distance.power != 1:
        raise ValueError(
            "flashcon.pml.SupConLoss streams dot products of normalised embeddings: distance "
            f"must be CosineSimilarity() (the default) with power 1, got {distance!r}; for "
            "other distances use pytorch_metric_learning.losses.SupConLoss"
        )
    return float(distance.p)


def _check_reducer(reducer) -> None:
    if reducer is None:
        return
    if type(reducer) is not AvgNonZeroReducer or reducer.low != 0 or reducer.high is not None:
        raise ValueError(
            "flashcon.pml.SupConLoss averages the anchors with a loss above 0: reducer must "
            f"be AvgNonZeroReducer() (the default), got {reducer!r}; for the mean over every "
            "anchor use flashcon.supcon_loss(normalize(x), labels, temperature=t, "
            "base_temperature=t)"
        )


def _labels(labels: object, z: Tensor, n: int, name: str) -> Tensor:
    """Class ids [n] as int64 on the embeddings' device (the library moves them there)."""
    lab = V.check_tensor(labels, name)
    lab = V.class_ids(lab.to(z.device), name)
    return V.check_labels(lab, n, z, required=True, name=name)


def _refuse(why: str) -> ValueError:
    return ValueError(
        "flashcon.pml.SupConLoss streams every pair of the labels: indices_tuple must be the "
        "labels' pairs less at most one self pair per anchor (as CrossBatchMemory without a "
        f"miner passes them), but {why}; {_ALTERNATIVES}"
    )


def _pair_keys(a: Tensor, p: Tensor, n: int, m: int, kind: str) -> Tensor:
    """The set of pairs (a_i, p_i) as sorted distinct keys a·m + p (the library keeps a set:
    it writes them into a mask). Pair lists come sorted from torch.where: no sort then."""
    if not (isinstance(a, Tensor) and isinstance(p, Tensor)) or a.shape != p.shape or a.dim() != 1:
        raise _refuse(f"its {kind} pairs are not two 1-D index tensors of one length")
    if a.numel() == 0:
        return a.new_zeros((0,), dtype=torch.long)
    a, p = a.long(), p.long()
    if bool((a < 0).any() | (a >= n).any() | (p < 0).any() | (p >= m).any()):
        raise _refuse(f"its {kind} pairs index outside [0, {n}) x [0, {m})")
    keys = a * m + p
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
        keys = torch.unique(keys)
    return keys


def _as_pairs(indices_tuple) -> tuple:
    """(a1, p, a2, n) of pairs or of triplets (a, p, n), as the library's convert_to_pairs."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise _refuse("it is neither pairs (a1, p, a2, n) nor triplets (a, p, n)")
    if not all(isinstance(x, Tensor) for x in indices_tuple):
        raise _refuse("its entries are not index tensors")
    if len(indices_tuple) == 3:
        a, p, neg = indices_tuple
        return a, p, a, neg
    return tuple(indices_tuple)


def _pair_groups(pairs: tuple, y: Tensor, ky: Tensor, k: Tensor) -> list:
    """The anchors of the pairs ``(a1, p, a2, n)`` as streamable groups.

    Accepts the labels' pairs with, for some anchors, one same-label column left out (their
    self pair; distinct columns), and anchors with no pair at all (the library gives them 0
    and does not count them; e.g. anchors without a positive or a negative in triplets).
    Returns groups ``(rows, columns, column labels, self_offset)``: the anchors with a
    left-out column against the columns permuted so that anchor r's left-out column is
    column r (self_offset 0), the others against all columns (self_offset −1). The check
    reads the pair lists (the size of the pair set); the loss itself is streamed."""
    a1, p, a2, ng = pairs
    n, m = y.shape[0], ky.shape[0]
    pos = _pair_keys(a1, p, n, m, "positive").to(y.device)
    negk = _pair_keys(a2, ng, n, m, "negative").to(y.device)
    pa, pp, na, nc = pos // m, pos % m, negk // m, negk % m
    if not bool((y[pa] == ky[pp]).all()):
        raise _refuse("some positive pairs have different labels")
    if not bool((y[na] != ky[nc]).all()):
        raise _refuse("some negative pairs have equal labels")
    ids = torch.unique(torch.cat([y, ky]), return_inverse=True)[1]
    yc, kc = ids[:n], ids[n:]
    n_ids = int(ids.max()) + 1 if ids.numel() else 0
    full = torch.bincount(kc, minlength=n_ids)[yc]  # same-label columns of each anchor
    n_neg, n_pos = torch.bincount(na, minlength=n), torch.bincount(pa, minlength=n)
    present = (n_pos > 0) | (n_neg > 0)
    if bool((present & (n_neg != m - full)).any()):
        raise _refuse("some anchors lack negative pairs")
    miss = full - n_pos
    if bool((present & (miss != 0) & (miss != 1)).any()):
        raise _refuse("some anchors lack more than one positive pair")
    # The one left-out column: the sum of the anchor's same-label columns less those given.
    col_sum = torch.zeros(n_ids, dtype=torch.long, device=y.device)
    col_sum.scatter_add_(0, kc, torch.arange(m, device=y.device))
    given = torch.zeros(n, dtype=torch.long, device=y.device).scatter_add_(0, pa, pp)
    left_out = col_sum[yc] - given
    has = miss == 1
    rows_s = (present & has).nonzero().flatten()
    rows_r = (present & ~has).nonzero().flatten()
    groups = []
    if rows_s.numel():
        own = left_out[rows_s]
        if torch.unique(own).numel() != own.numel():
            raise _refuse("several anchors leave out the same column")
        if rows_s.numel() == n and torch.equal(own, torch.arange(n, device=y.device)):
            groups.append((None, k, ky, 0))  # the diagonal: no permutation
        else:
            rest = torch.ones(m, dtype=torch.bool, device=y.device)
            rest[own] = False
            perm = torch.cat([own, rest.nonzero().flatten()])
            groups.append((rows_s, k[perm], ky[perm], 0))
    if rows_r.numel():
        groups.append((None if rows_r.numel() == n else rows_r, k, ky, -1))
    return groups
