"""Dense reference implementations of every loss (the test oracle and the benchmark baseline).

Each function builds the full N×M logit matrix and applies the formulas of docs/losses.md directly,
in the dtype of its input (call it with float64 tensors for an oracle). They share the public
functions' signatures and argument documentation, less the ``backend``, ``gather_distributed``
and ``group`` arguments (one process only), and validate their input the same way.

Policies (the same in every backend):
- an anchor without positives contributes 0 and still counts in the mean (SupContrast HEAD);
- SINCERE with no negatives gives 0 for that anchor; with no positives, 0 (the official code
  gives NaN there);
- TCL with no positives gives 0 (the official code gives NaN);
- nothing returns NaN for finite input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as V
from .queue import MemoryQueue

__all__ = [
    "supcon_loss",
    "ntxent_loss",
    "sincere_loss",
    "genscl_loss",
    "tcl_loss",
    "esupcon_loss",
    "esupcon_logits",
]

_NEG_INF = float("-inf")


def _safe_logsumexp(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise log Σ_{keep} e^x; rows with nothing kept give −inf without NaN gradients.

    Returns (lse, row_has_any). The gradient of a row with nothing kept is exactly zero.
    """
    any_kept = keep.any(dim=1)
    masked = x.masked_fill(~keep, _NEG_INF)
    # Rows with nothing kept get a harmless finite row so logsumexp's backward stays finite.
    masked = torch.where(any_kept[:, None], masked, torch.zeros_like(masked))
    lse = torch.logsumexp(masked, dim=1)
    return torch.where(any_kept, lse, torch.full_like(lse, _NEG_INF)), any_kept


def _self_mask(n_rows: int, n_cols: int, self_offset: int | None, device) -> Tensor:
    """Bool [n_rows, n_cols]: True at each anchor's own column (i + self_offset)."""
    m = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=device)
    if self_offset is not None:
        rows = torch.arange(n_rows, device=device)
        cols = rows + self_offset
        ok = cols < n_cols
        m[rows[ok], cols[ok]] = True
    return m


def _match(a: Tensor, b: Tensor, multilabel: bool) -> Tensor:
    """[len(a), len(b)] positives: equal class ids, or multi-label bitmasks sharing a bit."""
    if multilabel:
        return (a[:, None] & b[None, :]) != 0
    return a[:, None] == b[None, :]


def prototype_labels(k: int, multilabel: bool, device) -> Tensor:
    """The labels of ESupCon's K prototypes: class ids, or one bit each for multi-label data
    (the streamed loss uses it too).

    Args:
        k: the number of prototypes.
        multilabel: bitmask labels (one bit per prototype; at most 64).
        device: where the labels are made.
    """
    cls = torch.arange(k, device=device)
    if not multilabel:
        return cls
    if k > V.MAX_LABELS:
        raise ValueError(f"multi-label ESupCon supports at most {V.MAX_LABELS} prototypes, got {k}")
    return torch.bitwise_left_shift(torch.ones_like(cls), cls)


def _label_columns(
    z: Tensor, y: Tensor, queue: MemoryQueue | None, multilabel: bool = False
) -> tuple[Tensor, Tensor]:
    """Contrast columns (the batch, then the queue rows) and their labels."""
    if queue is None:
        return z, y
    qz, qy = queue.check_for(z, soft=False, multilabel=multilabel)
    return torch.cat([z, qz]), torch.cat([y, qy])


def _supcon_rows(
    logits: Tensor, pos_w: Tensor, valid: Tensor, variant: str
) -> tuple[Tensor, Tensor]:
    """Per-anchor SupCon loss (before the τ/τ_b scale) from dense logits.

    ``pos_w`` holds the positive weights (0 where not positive, self already removed),
    ``valid`` the contrast set A(i). Returns (loss_i, has_pos_i).
    """
    lse, _ = _safe_logsumexp(logits, valid)
    c = pos_w.sum(dim=1)
    has_pos = c > 0
    c_safe = torch.where(has_pos, c, torch.ones_like(c))
    if variant == "out":
        target = (pos_w * logits.masked_fill(~valid, 0.0)).sum(dim=1) / c_safe
        row = lse - target
    else:
        # L_in: −log( (1/C) Σ_p w_p e^{ℓ_p} / Σ_a e^{ℓ_a} ).
        logw = torch.log(pos_w.clamp_min(0)).masked_fill(pos_w <= 0, _NEG_INF)
        lse_p, _ = _safe_logsumexp(logits + torch.where(pos_w > 0, logw, 0.0), pos_w > 0)
        row = lse - lse_p + torch.log(c_safe)
    # An anchor whose only column is its positive has loss exactly 0 (LSE = ℓ_p); with a
    # weight w the computed target w·ℓ_p/w could be an ulp off it.
    one_term = valid.sum(dim=1) == 1
    row = torch.where(has_pos & ~one_term, row, torch.zeros_like(row))
    return row, has_pos


def supcon_loss(
    features: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    variant: str = "out",
    queue: MemoryQueue | None = None,
) -> Tensor:
    """Dense SupCon (docs/losses.md §1): L_out or L_in, 'all' or 'one' contrast mode.

    Arguments as :func:`flashcon.supcon_loss`.
    """
    features = V.merge_trailing(features, "features")
    labels = V.class_ids(labels, "labels", column=True)
    z, b, v = V.flatten_features(features, "features")
    V.check_temperature(temperature, "temperature")
    V.check_temperature(base_temperature, "base_temperature")
    V.check_choice(contrast_mode, "contrast_mode", ("all", "one"))
    V.check_choice(variant, "variant", ("out", "in"))
    n = z.shape[0]
    if labels is not None and mask is not None:
        raise ValueError("supcon_loss: pass either labels or mask, not both")
    if mask is not None:
        if queue is not None:
            raise ValueError("supcon_loss: mask= cannot be combined with a queue")
        w_b = V.check_mask(mask, b, z).to(z.dtype)
    else:
        y, ml = V.check_label_input(labels, b, z)
        if y is None:
            y = torch.arange(b, device=z.device)
        w_b = _match(y, y, ml).to(z.dtype)
    w = w_b.repeat(v, v)  # view-major: row i ↦ sample i mod B
    n_anchor = b if contrast_mode == "one" else n
    q = z[:n_anchor]
    cols = z
    if queue is not None:
        qz, qy = queue.check_for(z, soft=False, multilabel=ml)
        cols = torch.cat([z, qz])
        if labels is None:  # SimCLR: queue rows are other samples, i.e. negatives
            w = torch.cat([w, torch.zeros(n, qz.shape[0], dtype=z.dtype)], dim=1)
        else:
            y_rows = y.repeat(v)
            w = torch.cat([w, _match(y_rows, qy, ml).to(z.dtype)], dim=1)
    logits = q @ cols.T / temperature
    self_m = _self_mask(n_anchor, cols.shape[0], 0, z.device)
    valid = ~self_m
    pos_w = w[:n_anchor] * valid
    rows, _ = _supcon_rows(logits, pos_w, valid, variant)
    return (temperature / base_temperature) * rows.mean()


def ntxent_loss(
    features: Tensor, *, temperature: float = 0.5, queue: MemoryQueue | None = None
) -> Tensor:
    """Dense NT-Xent / SimCLR: SupCon with the sample id as label, no base-temperature scale.

    Arguments as :func:`flashcon.ntxent_loss`.
    """
    V.check_multiview(features, "features")
    return supcon_loss(
        features, None, None, temperature=temperature, base_temperature=temperature, queue=queue
    )


def sincere_loss(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.07,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """Dense SINCERE (docs/losses.md §2): each positive against the negatives only.

    Arguments as :func:`flashcon.sincere_loss`.
    """
    z, b, v = V.flatten_features(features, "features")
    V.check_temperature(temperature, "temperature")
    y, ml = V.check_label_input(labels, b, z, required=True)
    y = y.repeat(v)
    n = z.shape[0]
    cols, ycols = _label_columns(z, y, queue, ml)
    logits = z @ cols.T / temperature
    not_self = ~_self_mask(n, cols.shape[0], 0, z.device)
    same = _match(y, ycols, ml)
    pos = same & not_self
    neg = ~same
    eta, has_neg = _safe_logsumexp(logits, neg)
    eta_safe = torch.where(has_neg, eta, torch.zeros_like(eta))
    # log(1 + e^x) exactly in every dtype (F.softplus returns x itself above x = 20: an error
    # of up to e^-20 that float64 would show).
    x = eta_safe[:, None] - logits
    terms = torch.logaddexp(x, torch.zeros_like(x))
    terms = torch.where(pos & has_neg[:, None], terms, torch.zeros_like(terms))
    c = pos.sum(dim=1).to(z.dtype)
    rows = terms.sum(dim=1) / c.clamp_min(1)
    return rows.mean()


def genscl_loss(
    features: Tensor,
    soft_labels: Tensor,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """Dense GenSCL (docs/losses.md §3): cross-entropy of label cosine similarity vs latent softmax.

    Arguments as :func:`flashcon.genscl_loss`.
    """
    z, b, v = V.flatten_features(features, "features")
    V.check_temperature(temperature, "temperature")
    V.check_temperature(base_temperature, "base_temperature")
    y = V.check_soft_labels(soft_labels, b, v, z).to(z.dtype).detach()
    n = z.shape[0]
    cols, ycols = z, y
    if queue is not None:
        qz, qy = queue.check_for(z, soft=True)
        cols, ycols = torch.cat([z, qz]), torch.cat([y, qy.to(z.dtype)])
    y_hat = y / y.norm(dim=1, keepdim=True)
    yc_hat = ycols / ycols.norm(dim=1, keepdim=True)
    not_self = ~_self_mask(n, cols.shape[0], 0, z.device)
    m = (y_hat @ yc_hat.T) * not_self
    big_m = m.sum(dim=1)
    logits = z @ cols.T / temperature
    lse, has_any = _safe_logsumexp(logits, not_self)
    lse_safe = torch.where(has_any, lse, torch.zeros_like(lse))
    a = (m * logits).sum(dim=1)
    # M_i = 0 means every m_ij = 0: the row is 0. (There M_i + 1e-8 would be 0 in fp16, where
    # 1e-8 underflows: 0/0.)
    has = big_m > 0
    rows = (big_m * lse_safe - a) / torch.where(has, big_m + 1e-8, torch.ones_like(big_m))
    return (temperature / base_temperature) * rows.mean()


def tcl_loss(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.1,
    k1: float = 5000.0,
    k2: float = 1.0,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """Dense TCL (docs/losses.md §4), row form; the k1 term uses e^{−s} without τ, as the code does.

    Arguments as :func:`flashcon.tcl_loss`.
    """
    z, b, v = V.flatten_features(features, "features")
    V.check_temperature(temperature, "temperature")
    V.check_nonneg(k1, "k1")
    V.check_nonneg(k2, "k2")
    y, ml = V.check_label_input(labels, b, z, required=True)
    y = y.repeat(v)
    n = z.shape[0]
    cols, ycols = _label_columns(z, y, queue, ml)
    s = z @ cols.T
    logits = s / temperature
    not_self = ~_self_mask(n, cols.shape[0], 0, z.device)
    same = _match(y, ycols, ml)
    pos = same & not_self
    neg = ~same
    # log D_i as one log-sum-exp over three sub-streams (docs/losses.md §4.2).
    streams = [logits]
    keeps = [pos]
    if k1 > 0:
        streams.append(torch.log(torch.tensor(k1, dtype=z.dtype)) - s)
        keeps.append(pos)
    if k2 > 0:
        streams.append(torch.log(torch.tensor(k2, dtype=z.dtype)) + logits)
        keeps.append(neg)
    log_d, _ = _safe_logsumexp(torch.cat(streams, dim=1), torch.cat(keeps, dim=1))
    c = pos.sum(dim=1).to(z.dtype)
    has_pos = c > 0
    q_sum = (logits * pos).sum(dim=1)
    rows = torch.where(
        has_pos,
        torch.where(has_pos, log_d, torch.zeros_like(log_d)) - q_sum / c.clamp_min(1),
        torch.zeros_like(log_d),
    )
    return rows.mean()


def esupcon_logits(features: Tensor, prototypes: Tensor, temperature: float = 0.1) -> Tensor:
    """Classifier logits z·u_k/τ with u_k = w_k/‖w_k‖ (p(y=k|z) = softmax_k of these).

    Arguments as :func:`flashcon.esupcon_logits` (not validated here).
    """
    u = prototypes / prototypes.norm(dim=1, keepdim=True)
    return features @ u.T / temperature


def esupcon_loss(
    features: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    *,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    prototype_anchors: bool = True,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """Dense ESupCon (docs/losses.md §5, flashcon's definition): samples and class prototypes.

    Arguments as :func:`flashcon.esupcon_loss`.
    """
    z, b, v = V.flatten_features(features, "features")
    V.check_temperature(temperature, "temperature")
    if base_temperature is None:
        base_temperature = temperature
    V.check_temperature(base_temperature, "base_temperature")
    k_cls = V.check_prototypes(prototypes, z)
    y, ml = V.check_label_input(labels, b, z, required=True, num_classes=k_cls)
    y = y.repeat(v)
    n = z.shape[0]
    u = prototypes / prototypes.norm(dim=1, keepdim=True)
    u = u.to(z.dtype)
    cls = prototype_labels(k_cls, ml, z.device)
    # Sample anchors against [samples; queue; prototypes].
    samples, sample_lab = _label_columns(z, y, queue, ml)
    cols = torch.cat([samples, u], dim=0)
    col_lab = torch.cat([sample_lab, cls])
    logits = z @ cols.T / temperature
    valid = ~_self_mask(n, cols.shape[0], 0, z.device)
    pos = _match(y, col_lab, ml) & valid
    rows, _ = _supcon_rows(logits, pos.to(z.dtype), valid, "out")
    total = rows.sum()
    count = n
    if prototype_anchors:
        present = _match(cls, sample_lab, ml).any(dim=1)  # a class with a sample among columns
        up = u[present]
        lab_p = cls[present]
        logits_p = up @ samples.T / temperature
        valid_p = torch.ones_like(logits_p, dtype=torch.bool)
        pos_p = _match(lab_p, sample_lab, ml).to(z.dtype)
        rows_p, _ = _supcon_rows(logits_p, pos_p, valid_p, "out")
        total = total + rows_p.sum()
        count += int(present.sum())
    return (temperature / base_temperature) * total / count
