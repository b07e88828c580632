"""Pure-PyTorch chunked streaming implementation of the engine contract (``backend='torch'``).

Rows are processed in chunks against all columns, so the largest temporary is
``chunk × M`` (``FLASHCON_TORCH_CHUNK_ELEMS`` elements, default 2^21), never N×M. The backward
recomputes each chunk's similarities from q, k and the saved row statistics. This file is also
the executable statement of the engine contract (see ``flashcon.engine``): the Triton and C++
kernels compute exactly these functions, tile by tile.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Row statistics are float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n: int, m: int) -> int:
    budget = int(os.environ.get("FLASHCON_TORCH_CHUNK_ELEMS", 1 << 21))
    return max(1, min(n, budget // max(m, 1)))


def _tile(q, k, qlab, klab, r0: int, r1: int, self_offset: int, multilabel: bool, pos_weight):
    """Similarities, positive weights m_ij (0 off P(i)) and the negative mask of rows [r0, r1).

    Computed in the statistics dtype. With ``pos_weight`` (a ``[Bq, Bk]`` matrix) the weight of
    (i, j) is ``pos_weight[i % Bq, j % Bk]`` and labels are ignored; otherwise it is 1 where the
    labels match (``multilabel``: share a bit) and 0 elsewhere. The self column is excluded.
    """
    acc = stat_dtype(q.dtype)
    qc = q[r0:r1].to(acc)
    s = qc @ k.to(acc).T
    m_cols = k.shape[0]
    valid = torch.ones(s.shape, dtype=torch.bool, device=q.device)
    if self_offset >= 0:
        rows = torch.arange(r1 - r0, device=q.device)
        cols = rows + r0 + self_offset
        ok = cols < m_cols
        valid[rows[ok], cols[ok]] = False
    if pos_weight is not None:
        bq, bk = pos_weight.shape
        ri = torch.arange(r0, r1, device=q.device) % bq
        ci = torch.arange(m_cols, device=q.device) % bk
        w = pos_weight.to(acc)[ri][:, ci]
    elif multilabel:
        w = ((qlab[r0:r1, None] & klab[None, :]) != 0).to(acc)
    else:
        w = (qlab[r0:r1, None] == klab[None, :]).to(acc)
    w = torch.where(valid, w, torch.zeros_like(w))
    return qc, s, w, (w == 0) & valid


def _log_terms(s, w, neg, scale, w_pos, w_neg, k1):
    """The exponents of every term of the weighted partition sum, −inf where absent."""
    ninf = torch.full_like(s, _NEG_INF)
    pos = w > 0
    logw = torch.log(torch.where(pos, w, torch.ones_like(w)))
    t = ninf
    if w_pos > 0:
        t = torch.where(pos, scale * s + math.log(w_pos) + logw, t)
    if w_neg > 0:
        t = torch.where(neg, scale * s + math.log(w_neg), t)
    terms = [t]
    if k1 > 0:
        terms.append(torch.where(pos, math.log(k1) + logw - s, ninf))
    return terms


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
    pos_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    n, m = q.shape[0], k.shape[0]
    acc = stat_dtype(q.dtype)
    lse = torch.empty(n, dtype=acc, device=q.device)
    psum = torch.empty(n, dtype=acc, device=q.device)
    pcnt = torch.empty(n, dtype=acc, device=q.device)
    step = _chunk_rows(n, m)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        _, s, w, neg = _tile(q, k, qlab, klab, r0, r1, self_offset, multilabel, pos_weight)
        terms = _log_terms(s, w, neg, scale, w_pos, w_neg, k1)
        lse[r0:r1] = torch.logsumexp(torch.cat(terms, dim=1), dim=1)
        psum[r0:r1] = (w * s).sum(dim=1)
        pcnt[r0:r1] = w.sum(dim=1)
    return lse, psum, pcnt


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
    pos_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    n, m = q.shape[0], k.shape[0]
    acc = stat_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    kf = k.to(acc)
    step = _chunk_rows(n, m)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qc, s, w, neg = _tile(q, k, qlab, klab, r0, r1, self_offset, multilabel, pos_weight)
        l = lse[r0:r1, None]
        # A row with an empty sum (lse = −inf) has no terms, hence no gradient.
        l = torch.where(torch.isfinite(l), l, torch.zeros_like(l))
        terms = _log_terms(s, w, neg, scale, w_pos, w_neg, k1)
        # ∂lse/∂s = scale·softmax over the e^{scale s} terms − softmax over the k1 e^{−s} terms.
        g = scale * torch.exp(terms[0] - l)
        if k1 > 0:
            g = g - torch.exp(terms[1] - l)
        g = g_lse[r0:r1, None] * g + g_psum[r0:r1, None] * w
        dq[r0:r1] = g @ kf
        dk += g.T @ qc
    return dq.to(q.dtype), dk.to(k.dtype)


def sp_fwd(
    q: Tensor,
    k: Tensor,
    qlab: Tensor,
    klab: Tensor,
    eta: Tensor,
    self_offset: int,
    scale: float,
    multilabel: bool = False,
    pos_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    n, m = q.shape[0], k.shape[0]
    acc = stat_dtype(q.dtype)
    sp = torch.empty(n, dtype=acc, device=q.device)
    r = torch.empty(n, dtype=acc, device=q.device)
    step = _chunk_rows(n, m)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        _, s, w, _ = _tile(q, k, qlab, klab, r0, r1, self_offset, multilabel, pos_weight)
        x = eta[r0:r1, None] - scale * s
        # log(1 + e^x) exactly (F.softplus returns x above 20: float64 would see the e^-20).
        sp[r0:r1] = (w * torch.logaddexp(x, torch.zeros_like(x))).sum(dim=1)
        r[r0:r1] = (w * torch.sigmoid(x)).sum(dim=1)
    return sp, r


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
    pos_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    n, m = q.shape[0], k.shape[0]
    acc = stat_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    kf = k.to(acc)
    step = _chunk_rows(n, m)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qc, s, w, _ = _tile(q, k, qlab, klab, r0, r1, self_offset, multilabel, pos_weight)
        x = eta[r0:r1, None] - scale * s
        g = -scale * g_sp[r0:r1, None] * w * torch.sigmoid(x)
        dq[r0:r1] = g @ kf
        dk += g.T @ qc
    return dq.to(q.dtype), dk.to(k.dtype)


# The symmetric path's contract ('all' mode: q = k = z, self_offset = 0, dz = dq + dk). These
# state it executably for the tests of the backends that implement it with tile pairs.


def sym_lse_fwd(z, lab, scale, w_pos, w_neg, k1, multilabel=False, pos_weight=None):
    return lse_fwd(z, z, lab, lab, 0, scale, w_pos, w_neg, k1, multilabel, pos_weight)


def sym_lse_bwd(
    g_lse, g_psum, z, lab, lse, scale, w_pos, w_neg, k1, multilabel=False, pos_weight=None
):
    dq, dk = lse_bwd(
        g_lse, g_psum, z, z, lab, lab, lse, 0, scale, w_pos, w_neg, k1, multilabel, pos_weight
    )
    return dq + dk


def sym_sp_fwd(z, lab, eta, scale, multilabel=False, pos_weight=None):
    return sp_fwd(z, z, lab, lab, eta, 0, scale, multilabel, pos_weight)


def sym_sp_bwd(g_sp, z, lab, eta, scale, multilabel=False, pos_weight=None):
    dq, dk = sp_bwd(g_sp, z, z, lab, lab, eta, 0, scale, multilabel, pos_weight)
    return dq + dk
