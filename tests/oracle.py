"""A second, deliberately slow implementation of every loss, written from docs/losses.md alone.

Each loss is computed anchor by anchor and pair by pair with float64 scalars: one dot product
per pair, then `exp`, `log` and sums over Python lists. Nothing is shared with
``flashcon.reference`` or ``flashcon.functional`` (neither is imported), so a mistake made in
both of them cannot hide here. The values are 0-dim float64 tensors built from the features
(and prototypes) by ordinary torch scalar operations, so ``torch.autograd`` gives exact
gradients of this definition on small inputs (N <= 12 keeps a call well under a second).

Conventions (README, docs/losses.md §0):

- ``[B, V, D]`` features are flattened view-major: row ``v·B + i`` is view v of sample i.
  ``[N, D]`` features are N samples with one view each.
- Labels are given per sample: integer ids ``[B]`` or a multi-hot bool ``[B, L]`` (two rows
  are positives when they share at least one label). A row is never its own positive nor its
  own negative.
- ``mask`` (SupCon only) is SupContrast's ``[B, B]`` positive-weight matrix: the pair (row of
  sample i, column of sample j) has weight ``mask[i, j]``, whatever the views; the anchor's own
  column is excluded.
- ``queue=(features [Q, D], labels)`` appends Q columns that are never anchors and never
  anyone's own column; ``labels`` are integer ids ``[Q]``, multi-hot bool ``[Q, L]``, soft
  labels ``[Q, K]`` (GenSCL), or ``None`` (NT-Xent: every queue row is a negative).
- Every loss returns the mean over its anchors of the per-anchor loss. An anchor without a
  positive contributes 0 and still counts in the mean (README "Deliberate differences").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GENSCL_EPS = 1e-8  # docs/losses.md §3.1: m_ij / (M_i + 1e-8)


# ---------------------------------------------------------------------------------------------
# Scalar building blocks (each one line of mathematics).


def _log_sum_exp(values: list[Tensor]) -> Tensor:
    """log Σ e^x over a non-empty list of scalars, shifted by the largest value (a constant)."""
    shift = max(float(x.detach()) for x in values)
    total = sum(torch.exp(x - shift) for x in values)
    return shift + torch.log(total)


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x), written so that e^x never overflows."""
    if float(x.detach()) > 0:
        return x + torch.log1p(torch.exp(-x))
    return torch.log1p(torch.exp(x))


def _rows(features: Tensor) -> tuple[list[Tensor], int, int]:
    """The embeddings as a list of rows, view-major, with (B, V)."""
    if features.dim() == 3:
        b, v, _ = features.shape
        rows = [features[i, view] for view in range(v) for i in range(b)]
        return rows, b, v
    if features.dim() == 2:
        return [features[i] for i in range(features.shape[0])], features.shape[0], 1
    raise ValueError(f"features must be [B, V, D] or [N, D], got {tuple(features.shape)}")


def _label_of(labels: Tensor, i: int) -> int | frozenset[int]:
    """Sample i's label: an int, or the set of its labels for a multi-hot bool row."""
    if labels.dtype == torch.bool and labels.dim() == 2:
        return frozenset(int(c) for c in range(labels.shape[1]) if bool(labels[i, c]))
    return int(labels[i])


def _same(a: int | frozenset[int] | None, b: int | frozenset[int] | None) -> bool:
    """Are two labels positives? Equal ids, or multi-hot sets that share a label."""
    if a is None or b is None:
        return False
    if isinstance(a, frozenset):
        return len(a & b) > 0
    return a == b


class _Column:
    """One contrast column: its embedding and label; ``own`` is the anchor row it belongs to."""

    def __init__(self, vec: Tensor, label, own: int | None) -> None:
        self.vec = vec
        self.label = label
        self.own = own


def _columns(rows: list[Tensor], row_labels: list, queue) -> list[_Column]:
    cols = [_Column(rows[r], row_labels[r], r) for r in range(len(rows))]
    if queue is not None:
        q_feats, q_labels = queue
        for r in range(q_feats.shape[0]):
            lab = None if q_labels is None else _label_of(q_labels, r)
            cols.append(_Column(q_feats[r], lab, None))
    return cols


def _row_labels(labels: Tensor | None, b: int, v: int) -> list:
    """Per flattened row: the label of its sample (view-major)."""
    if labels is None:
        return [None] * (b * v)
    return [_label_of(labels, r % b) for r in range(b * v)]


# ---------------------------------------------------------------------------------------------
# SupCon (docs/losses.md §1), NT-Xent (§1.4)


def supcon(
    features: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    variant: str = "out",
    queue=None,
) -> Tensor:
    """SupCon L_out / L_in, SupContrast's reduction (docs/losses.md §1.2, §1.4).

    For anchor i with positive weights w_ij over its columns A(i) (all but its own):
      L_out: ℓ_i = c·( LSE_i − Σ_j w_ij ℓ_ij / W_i ),
      L_in:  ℓ_i = c·( LSE_i − log Σ_j w_ij e^{ℓ_ij} + log W_i ),
    with ℓ_ij = z_i·z_j/τ, LSE_i = log Σ_{j∈A(i)} e^{ℓ_ij}, W_i = Σ_j w_ij, c = τ/τ_b;
    ℓ_i = 0 when W_i = 0. Labels give w ∈ {0, 1}; labels = mask = None gives w = 1 for the
    other views of the same sample (SimCLR). 'one' mode: the anchors are view 0 (rows 0..B−1).
    """
    rows, b, v = _rows(features)
    n = len(rows)
    row_labels = _row_labels(labels, b, v)
    cols = _columns(rows, row_labels, queue)
    tau = temperature
    scale = temperature / base_temperature

    def weight(a: int, col: _Column) -> float:
        if mask is not None:  # a queue column never comes with a mask
            return float(mask[a % b, col.own % b])
        if labels is None:
            return 1.0 if col.own is not None and col.own % b == a % b else 0.0
        return 1.0 if _same(row_labels[a], col.label) else 0.0

    anchors = list(range(n)) if contrast_mode == "all" else list(range(b))
    total = torch.zeros((), dtype=torch.float64)
    for a in anchors:
        logits, pos = [], []
        for col in cols:
            if col.own == a:
                continue
            logit = torch.dot(rows[a], col.vec) / tau
            logits.append(logit)
            w = weight(a, col)
            if w != 0.0:
                pos.append((w, logit))
        if not pos:
            continue  # no positive: 0, counted in the mean
        lse = _log_sum_exp(logits)
        w_sum = sum(w for w, _ in pos)
        if variant == "out":
            target = sum(w * logit for w, logit in pos) / w_sum
            total = total + scale * (lse - target)
        else:
            log_pos = _log_sum_exp([math.log(w) + logit for w, logit in pos])
            total = total + scale * (lse - log_pos + math.log(w_sum))
    return total / len(anchors)


def ntxent(features: Tensor, *, temperature: float = 0.5, queue=None) -> Tensor:
    """NT-Xent / SimCLR: positives are the other views of a sample; queue rows are negatives.

    ℓ_i = LSE_i − (1/(V−1)) Σ_{other views p} ℓ_ip, no base-temperature scale, mean over N.
    """
    rows, b, v = _rows(features)
    cols = _columns(rows, [None] * len(rows), None if queue is None else (queue[0], None))
    tau = temperature
    total = torch.zeros((), dtype=torch.float64)
    for a in range(len(rows)):
        logits, pos = [], []
        for col in cols:
            if col.own == a:
                continue
            logit = torch.dot(rows[a], col.vec) / tau
            logits.append(logit)
            if col.own is not None and col.own % b == a % b:
                pos.append(logit)
        if pos:
            total = total + _log_sum_exp(logits) - sum(pos) / len(pos)
    return total / len(rows)


# ---------------------------------------------------------------------------------------------
# SINCERE (docs/losses.md §2)


def sincere(features: Tensor, labels: Tensor, *, temperature: float = 0.07, queue=None) -> Tensor:
    """ℓ_i = (1/C_i) Σ_{p∈P(i)} −log( e^{ℓ_ip} / (e^{ℓ_ip} + Σ_{n∈N(i)} e^{ℓ_in}) ), mean over N.

    Written as softplus(η_i − ℓ_ip), η_i = log Σ_{n∈N(i)} e^{ℓ_in}. C_i = 0 gives 0; with no
    negative every term is −log 1 = 0.
    """
    rows, b, v = _rows(features)
    row_labels = _row_labels(labels, b, v)
    cols = _columns(rows, row_labels, queue)
    tau = temperature
    total = torch.zeros((), dtype=torch.float64)
    for a in range(len(rows)):
        pos, neg = [], []
        for col in cols:
            if col.own == a:
                continue
            logit = torch.dot(rows[a], col.vec) / tau
            (pos if _same(row_labels[a], col.label) else neg).append(logit)
        if not pos or not neg:
            continue
        eta = _log_sum_exp(neg)
        total = total + sum(_softplus(eta - p) for p in pos) / len(pos)
    return total / len(rows)


# ---------------------------------------------------------------------------------------------
# GenSCL (docs/losses.md §3)


def _unit(y: Tensor) -> Tensor:
    return y / torch.sqrt(sum(y[k] * y[k] for k in range(y.shape[0])))


def genscl(
    features: Tensor,
    soft_labels: Tensor,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    queue=None,
) -> Tensor:
    """ℓ_i = c·Σ_{j∈A(i)} m_ij (LSE_i − ℓ_ij) / (M_i + 1e-8), mean over N.

    m_ij = ŷ_i·ŷ_j with ŷ = y/‖y‖₂ (cosine of the soft labels), M_i = Σ_{j∈A(i)} m_ij,
    c = τ/τ_b. Soft labels ``[B, K]`` are shared by the views; ``[B, V, K]`` are per view.
    """
    rows, b, v = _rows(features)
    soft = soft_labels.to(torch.float64)
    if soft.dim() == 2:
        row_y = [_unit(soft[r % b]) for r in range(b * v)]
    else:
        row_y = [_unit(soft[r % b, r // b]) for r in range(b * v)]
    cols = [_Column(rows[r], row_y[r], r) for r in range(len(rows))]
    if queue is not None:
        q_feats, q_soft = queue
        for r in range(q_feats.shape[0]):
            cols.append(_Column(q_feats[r], _unit(q_soft[r].to(torch.float64)), None))
    tau = temperature
    scale = temperature / base_temperature
    total = torch.zeros((), dtype=torch.float64)
    for a in range(len(rows)):
        logits, sims = [], []
        for col in cols:
            if col.own == a:
                continue
            logits.append(torch.dot(rows[a], col.vec) / tau)
            sims.append(torch.dot(row_y[a], col.label))
        lse = _log_sum_exp(logits)
        m_sum = sum(sims)
        cross = sum(m * (lse - logit) for m, logit in zip(sims, logits))
        total = total + scale * cross / (m_sum + GENSCL_EPS)
    return total / len(rows)


# ---------------------------------------------------------------------------------------------
# TCL (docs/losses.md §4)


def tcl(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.1,
    k1: float = 5000.0,
    k2: float = 1.0,
    queue=None,
) -> Tensor:
    """ℓ_i = log D_i − (1/C_i) Σ_{p∈P(i)} ℓ_ip, mean over N (row form of the denominator).

    D_i = Σ_{p∈P(i)} e^{ℓ_ip} + k1·Σ_{p∈P(i)} e^{−s_ip} + k2·Σ_{n∈N(i)} e^{ℓ_in}; the k1 term
    is e^{−s} of the raw cosine, without τ (the official code). C_i = 0 gives 0.
    """
    rows, b, v = _rows(features)
    row_labels = _row_labels(labels, b, v)
    cols = _columns(rows, row_labels, queue)
    tau = temperature
    total = torch.zeros((), dtype=torch.float64)
    for a in range(len(rows)):
        pos_logits, terms = [], []
        for col in cols:
            if col.own == a:
                continue
            s = torch.dot(rows[a], col.vec)
            if _same(row_labels[a], col.label):
                pos_logits.append(s / tau)
                terms.append(s / tau)
                if k1 > 0:
                    terms.append(math.log(k1) - s)
            elif k2 > 0:
                terms.append(math.log(k2) + s / tau)
        if not pos_logits:
            continue
        total = total + _log_sum_exp(terms) - sum(pos_logits) / len(pos_logits)
    return total / len(rows)


# ---------------------------------------------------------------------------------------------
# ESupCon (docs/losses.md §5)


def esupcon(
    features: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    *,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    prototype_anchors: bool = True,
    queue=None,
) -> Tensor:
    """SupCon L_out over samples and normalised class prototypes u_k = w_k/‖w_k‖.

    Sample anchor i: columns are the other samples (and queue rows) and all K prototypes;
    positives are same-class samples and the prototype(s) of its class(es):
    ℓ_i = LSE⁺_i − (Σ_{p∈P⁺(i)} ℓ_ip)/|P⁺(i)|.
    Prototype anchor k (``prototype_anchors``, only for a class with a sample among the
    columns): columns are the samples (and queue rows), positives those of class k:
    ℓ_k = LSE_k − Q_k/C_k. Loss: (τ/τ_b) × mean over all anchors, τ_b = τ by default.
    With multi-hot labels prototype k carries label k alone.
    """
    rows, b, v = _rows(features)
    row_labels = _row_labels(labels, b, v)
    multi = labels.dtype == torch.bool and labels.dim() == 2
    sample_cols = _columns(rows, row_labels, queue)
    protos = [_unit(prototypes[k].to(torch.float64)) for k in range(prototypes.shape[0])]
    proto_labels = [frozenset([k]) if multi else k for k in range(len(protos))]
    tau = temperature
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    total = torch.zeros((), dtype=torch.float64)
    n_anchors = len(rows)
    for a in range(len(rows)):
        logits, pos = [], []
        cols = sample_cols + [_Column(u, lab, None) for u, lab in zip(protos, proto_labels)]
        for col in cols:
            if col.own == a:
                continue
            logit = torch.dot(rows[a], col.vec) / tau
            logits.append(logit)
            if _same(row_labels[a], col.label):
                pos.append(logit)
        if pos:
            total = total + scale * (_log_sum_exp(logits) - sum(pos) / len(pos))
    if prototype_anchors:
        for u, lab in zip(protos, proto_labels):
            logits, pos = [], []
            for col in sample_cols:
                logit = torch.dot(u, col.vec) / tau
                logits.append(logit)
                if _same(lab, col.label):
                    pos.append(logit)
            if not pos:
                continue  # class absent from the columns: not an anchor
            n_anchors += 1
            total = total + scale * (_log_sum_exp(logits) - sum(pos) / len(pos))
    return total / n_anchors


LOSSES = {
    "supcon": supcon,
    "ntxent": ntxent,
    "sincere": sincere,
    "genscl": genscl,
    "tcl": tcl,
    "esupcon": esupcon,
}
