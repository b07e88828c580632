"""Public functional API: validate, flatten views, pick the backend, combine row statistics.

Every loss returns a scalar: the mean over anchors of the per-anchor loss (as the official
code does; the papers write a sum). Features are used as given (the official losses do not
normalise inside the loss; L2-normalise your projections first). ``[B, V, D]`` features are
flattened view-major; ``[N, D]`` features are one view per sample.

The streamed work (row statistics over the N×M similarity matrix) is done by the engine of the
chosen backend; the O(N·D) closed-form parts and the reductions are done here, in PyTorch, so
autograd composes them with the engine ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from . import _validate as V
from . import reference as R
from .combine import (
    NegativesOnly,
    acc_dtype,
    anchors,
    check_streaming,
    contrast,
    finite_or_zero,
    fused_loss,
    keep,
    nan_if_nonfinite,
    out_rows,
    reduce_rows,
    sample_ids,
    stream,
)
from .engine import route
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


_F = TypeVar("_F", bound=Callable[..., Tensor])


def _no_autocast(fn: _F) -> _F:
    """Wrap a public loss: autocast is turned off inside, so statistics stay fp32 (fp64 for
    fp64 input) and the closed-form matmuls are not downcast; the loss comes back in fp32 and
    gradients in the input dtype. (Each loss gives NaN for non-finite input itself:
    :func:`flashcon.combine.nan_if_nonfinite`, or the fused kernels.)"""

    @functools.wraps(fn)
    def wrapper(features, *args, **kwargs):
        dev = features.device.type if isinstance(features, Tensor) else "cpu"
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(features, *args, **kwargs)
        return fn(features, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


_DIST_DOC = """
        gather_distributed: contrast this rank's anchors against the global batch gathered
            (with gradients) from every rank of ``group``; see ``flashcon.distributed`` for
            the exact scaling (rank r returns W·(1/N_global)·Σ_{its anchors} ℓ_i). Needs an
            initialised ``torch.distributed`` process group and a streaming backend (not
            ``'reference'``).
        group: the process group to gather over (default: the world); used only with
            ``gather_distributed=True``.
        queue: a :class:`flashcon.MemoryQueue` whose rows are appended as extra contrast
            columns (no gradient, never an anchor, never self). It must hold the loss's kind of
            labels: class ids, multi-hot (``MemoryQueue(..., multilabel=True)``) or soft labels
            (GenSCL, ``num_soft_classes=K``). NT-Xent treats its rows as negatives.
        backend: ``'auto'`` (default: for CUDA tensors Triton if it imports, else the CUDA
            extension, else ``'torch'``; for CPU tensors the C++ CPU kernels if built, else
            ``'torch'``), ``'triton'`` (CUDA tensors; CPU tensors only under
            ``TRITON_INTERPRET=1``), ``'cuda'``, ``'cpu'``, ``'torch'`` (chunked PyTorch, any
            device) or ``'reference'`` (the dense oracle). A backend named here that cannot
            run raises :class:`flashcon.BackendUnavailableError` saying why;
            ``python -m flashcon.info`` lists what runs in this install.

    Returns the scalar loss in fp32 (fp64 for fp64 features; ``'reference'`` computes and
    returns in the features' dtype); gradients reach the features (and ESupCon's prototypes) in
    their dtype. Autocast is turned off inside; NaN or ±Inf in the features (or prototypes)
    gives a NaN loss.
"""


@_no_autocast
def supcon_loss(
    features: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    variant: str = "out",
    backend: str = "auto",
    gather_distributed: bool = False,
    group=None,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), SupContrast's ``SupConLoss``.

    Args:
        features: ``[B, V, D]`` (V views of B samples, flattened view-major; ``[B, V, ...]``
            with more dimensions is flattened to ``[B, V, D]``, as SupContrast does) or
            ``[N, D]`` (one view each); fp16, bf16 or fp32 on every backend, fp64 on
            ``'cpu'``, ``'torch'`` and ``'reference'`` (the GPU backends refuse it). Not
            normalised inside.
        labels: class ids ``[B]`` or ``[B, 1]`` (integer, or floating with integral values;
            SupContrast compares them by equality), or multi-hot bool ``[B, L]`` (L <= 64;
            two samples are positives when they share a label; a bool ``[B, 1]`` is multi-hot
            too). ``labels=None`` and ``mask=None`` gives SimCLR (the other views of a sample
            are its positives).
        mask: SupContrast's ``[B, B]`` positive weights (bool, integer or non-negative float,
            possibly asymmetric), tiled over the views; every streaming backend reads it per
            tile (nothing N×N is built). Exclusive with ``labels``; cannot be combined with
            ``gather_distributed`` or ``queue``. An anchor's weighted sum is divided by its
            total weight, however small; SupContrast divides by 1 where that total is below
            1e-6 (its guard for anchors without positives), which scales such an anchor's
            loss down by its total weight. A total of 0 gives 0 in both.
        temperature: τ (default 0.07, as SupContrast).
        base_temperature: τ_b; the loss is scaled by τ/τ_b, as SupContrast does (its recipe
            ``--temp 0.1`` keeps τ_b = 0.07, a ×1.43 gradient scale). Pass τ_b = τ to remove it.
        contrast_mode: ``'all'`` (every view is an anchor) or ``'one'`` (view 0 only).
        variant: ``'out'`` (L_out, the paper's and code's loss) or ``'in'`` (L_in).

    Anchors without positives contribute 0 and still count in the mean (SupContrast HEAD;
    its 2020 code returned NaN). An anchor whose only column is its positive (a batch of one
    sample and two views) gives exactly 0.
    """
    features = V.merge_trailing(features, "features")
    labels = V.class_ids(labels, "labels", column=True)
    z, b, v = V.flatten_features(features, "features")
    t = V.check_temperature(temperature, "temperature")
    tb = V.check_temperature(base_temperature, "base_temperature")
    V.check_choice(contrast_mode, "contrast_mode", ("all", "one"))
    V.check_choice(variant, "variant", ("out", "in"))
    if labels is not None and mask is not None:
        raise ValueError("supcon_loss: pass either labels or mask, not both")
    extras = mask is not None or queue is not None or gather_distributed
    r = route(
        backend, z.device, all_mode=contrast_mode == "all", extras=extras,
        fusable=variant == "out",
    )  # fmt: skip
    check_streaming(r, gather_distributed, "supcon_loss")
    if r.engine is None:
        value = R.supcon_loss(
            features,
            labels,
            mask,
            temperature=t,
            base_temperature=tb,
            contrast_mode=contrast_mode,
            variant=variant,
            queue=queue,
        )
        return nan_if_nonfinite(value, features, mask)
    if mask is not None:
        gather = gather_distributed
        value = _supcon_masked(r, z, b, mask, t, tb, contrast_mode, variant, gather, queue)
        return nan_if_nonfinite(value, features, mask)
    y, ml = V.check_label_input(labels, b, z, pack=False)
    if r.fused:
        return fused_loss(r, "supcon_out", "out", z, y, v, t, ml, t / tb)
    if ml:
        y = V.pack_multihot(y)
    if y is None:
        y = sample_ids(b, z.device, gather_distributed, group)
    y = y.repeat(v)
    columns = NegativesOnly(queue) if queue is not None and labels is None else queue
    c = contrast(z, y, gather=gather_distributed, group=group, queue=columns, multilabel=ml)
    na = b if contrast_mode == "one" else z.shape[0]
    q, qlab = anchors(z, y, na)
    spec = f"supcon_{variant}"
    lse, psum, pcnt = stream(r, spec, "lse", q, c.cols, qlab, c.labels, c.offset, t, multilabel=ml)
    one_term = c.cols.shape[0] == 2  # every anchor has one column (besides itself)
    if variant == "out":
        rows = out_rows(lse, psum, pcnt, t, one_term)
    else:
        lse_p = stream(r, spec, "lse_pos", q, c.cols, qlab, c.labels, c.offset, t, multilabel=ml)[0]
        has = pcnt > 0
        rows = finite_or_zero(lse) - finite_or_zero(lse_p) + torch.log(pcnt.clamp_min(1))
        rows = torch.where(keep(has, one_term), rows, torch.zeros_like(rows))
    n_global = c.n_batch // v if contrast_mode == "one" else c.n_batch
    value = (t / tb) * reduce_rows(rows.sum(), n_global, c.world)
    return nan_if_nonfinite(value.to(acc_dtype(z)), features)


def _supcon_masked(r, z, b, mask, t, tb, contrast_mode, variant, gather, queue) -> Tensor:
    """SupCon with SupContrast's [B, B] positive weights, streamed: the engine reads the weights
    per tile (``pos_weight``), nothing N×N is built. Two passes: the LSE over A(i) does not
    depend on the mask; the weighted pass gives Σ_j w_ij ℓ_ij, Σ_j w_ij and L_in's
    log Σ_j w_ij e^{ℓ_ij}."""
    if gather or queue is not None:
        raise ValueError(
            "supcon_loss(mask=...) covers this rank's batch only: it cannot be combined with "
            "gather_distributed or a queue; pass labels instead"
        )
    w = V.check_mask(mask, b, z).to(acc_dtype(z)).contiguous()
    na = b if contrast_mode == "one" else z.shape[0]
    zeros = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    q, qlab = anchors(z, zeros, na)
    lse, _, _ = stream(r, "supcon_mask", "lse", q, z, qlab, zeros, 0, t)
    lse_p, psum, pcnt = stream(r, "supcon_mask", "lse_pos", q, z, qlab, zeros, 0, t, pos_weight=w)
    one_term = z.shape[0] == 2
    if variant == "out":
        rows = out_rows(lse, psum, pcnt, t, one_term)
    else:
        has = pcnt > 0
        log_c = torch.log(torch.where(has, pcnt, torch.ones_like(pcnt)))
        rows = finite_or_zero(lse) - finite_or_zero(lse_p) + log_c
        rows = torch.where(keep(has, one_term), rows, torch.zeros_like(rows))
    return ((t / tb) * rows.mean()).to(acc_dtype(z))


@_no_autocast
def ntxent_loss(
    features: Tensor,
    *,
    temperature: float = 0.5,
    backend: str = "auto",
    gather_distributed: bool = False,
    group=None,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """NT-Xent / SimCLR (Chen et al. 2020): positives are the other views of the same sample.

    No base-temperature scaling (this equals ``supcon_loss(labels=None, base_temperature=τ)``).
    Queue rows are negatives (their labels are ignored).

    Args:
        features: ``[B, V, D]`` (V views of B samples; dtypes as :func:`supcon_loss`).
        temperature: τ (default 0.5, SupContrast's SimCLR setting).
    """
    V.check_multiview(features, "features")
    return supcon_loss(
        features,
        None,
        None,
        temperature=temperature,
        base_temperature=temperature,
        backend=backend,
        gather_distributed=gather_distributed,
        group=group,
        queue=queue,
    )


@_no_autocast
def sincere_loss(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.07,
    backend: str = "auto",
    gather_distributed: bool = False,
    group=None,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """SINCERE (Feeney & Hughes 2023): each positive against the negatives only.

    ℓ_i = (1/C_i) Σ_{p∈P(i)} softplus(η_i − ℓ_ip), η_i = log Σ_{n∈N(i)} e^{ℓ_in}; mean over
    all N = B·V embeddings, no base temperature. An anchor with no positive gives 0 (the
    official code gives NaN); one with no negative gives 0.

    Args:
        features: ``[B, V, D]`` or ``[N, D]`` (dtypes as :func:`supcon_loss`).
        labels: integer class ids ``[B]`` or multi-hot bool ``[B, L]`` (L <= 64); required.
        temperature: τ (default 0.07, the official code's).
    """
    z, b, v = V.flatten_features(features, "features")
    t = V.check_temperature(temperature, "temperature")
    extras = queue is not None or gather_distributed
    r = route(backend, z.device, extras=extras, fusable=True)
    check_streaming(r, gather_distributed, "sincere_loss")
    if r.engine is None:
        value = R.sincere_loss(features, labels, temperature=t, queue=queue)
        return nan_if_nonfinite(value, features)
    y, ml = V.check_label_input(labels, b, z, required=True, pack=False)
    if r.fused:
        return fused_loss(r, "sincere", "sincere", z, y, v, t, ml, 1.0)
    y = (V.pack_multihot(y) if ml else y).repeat(v)
    c = contrast(z, y, gather=gather_distributed, group=group, queue=queue, multilabel=ml)
    eta, _, pcnt = stream(r, "sincere", "eta", z, c.cols, y, c.labels, c.offset, t, multilabel=ml)
    sp, _ = r.sp(z, c.cols, y, c.labels, eta, c.offset, 1.0 / t, ml)
    rows = sp / pcnt.clamp_min(1)
    value = reduce_rows(rows.sum(), c.n_batch, c.world).to(acc_dtype(z))
    return nan_if_nonfinite(value, features)


@_no_autocast
def genscl_loss(
    features: Tensor,
    soft_labels: Tensor,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    backend: str = "auto",
    gather_distributed: bool = False,
    group=None,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """GenSCL (Kim et al. 2022): cross-entropy of label cosine similarity vs latent softmax.

    With one-hot labels this is SupCon L_out. The streamed pass reads 16-bit features through
    an fp32 copy, the one the closed-form terms use, so the two parts' nearly cancelling
    gradients are summed before they are rounded to the features' dtype (at the cost of the
    16-bit kernels' speed).

    Args:
        features: ``[B, V, D]`` or ``[N, D]`` (dtypes as :func:`supcon_loss`).
        soft_labels: non-negative floating ``[B, K]`` (shared by the views) or ``[B, V, K]``
            (per view, e.g. independent mixup of each view), every row with some mass. Receive
            no gradient. A queue must hold soft labels (``MemoryQueue(...,
            num_soft_classes=K)``).
        temperature: τ (default 0.07, the class default; its training script uses
            ``--temp 0.1``).
        base_temperature: τ_b (default 0.07); the loss is scaled by τ/τ_b.
    """
    z, b, v = V.flatten_features(features, "features")
    t = V.check_temperature(temperature, "temperature")
    tb = V.check_temperature(base_temperature, "base_temperature")
    r = route(backend, z.device)
    check_streaming(r, gather_distributed, "genscl_loss")
    if r.engine is None:
        value = R.genscl_loss(
            features, soft_labels, temperature=t, base_temperature=tb, queue=queue
        )
        return nan_if_nonfinite(value, features, soft_labels)
    acc = acc_dtype(z)
    y = V.check_soft_labels(soft_labels, b, v, z).detach().to(acc)
    y_hat = y / y.norm(dim=1, keepdim=True)
    # Every other column is in the softmax: one label for all, positives weighted like negatives.
    dummy = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    c = contrast(z, dummy, gather=gather_distributed, group=group, queue=queue, soft=y_hat)
    # The engine and the closed forms read one cast of the features: the two parts' gradients
    # nearly cancel (exactly, for one column), so they must be summed before the one rounding
    # to the features' dtype. With a cast each they were rounded apart: 16-bit gradients 2-3x
    # their output rounding, 2^-5 in bf16 where the exact gradient is 0.
    zf = z.to(acc)
    cf = zf if c.cols is z else c.cols.to(acc)  # the very same tensor: the symmetric path
    col_dummy = dummy
    if cf is not zf:
        col_dummy = torch.zeros(cf.shape[0], dtype=torch.long, device=z.device)
    lse, _, _ = stream(r, "genscl", "lse", zf, cf, dummy, col_dummy, c.offset, t)
    # Closed forms (docs/losses.md §3.2) over the columns C (self included, then subtracted):
    # M_i = ŷ_i·Σ_{j∈C} ŷ_j − ŷ_i·ŷ_i,  A_i = ((ŷ_i Ŷ_Cᵀ Z_C)·z_i − (ŷ_i·ŷ_i)‖z_i‖²)/τ.
    self_m = (y_hat * y_hat).sum(dim=1)
    big_m = y_hat @ c.soft.sum(dim=0) - self_m
    sq = (zf * zf).sum(dim=1)
    a = (((y_hat @ (c.soft.T @ cf)) * zf).sum(dim=1) - self_m * sq) / t
    # The closed forms subtract the self term from sums over all columns, so they carry a
    # rounding error of order eps·(1 + ‖Σŷ‖) in M_i and eps·max|ℓ| in A_i, which the
    # 1/(M_i + 1e-8) below amplifies. (1) An M_i below that noise is 0 (with A_i = 0: since
    # m_ij >= 0, M_i = 0 means every m_ij = 0): such an anchor has no label overlap and gives
    # exactly 0, as in the dense computation. (2) |A_i| <= M_i·max_j|ℓ_ij| bounds the value;
    # the clamp is applied to the value only, the gradient stays the closed form's.
    eps = torch.finfo(acc).eps
    noise = 16 * eps * (1 + c.soft.sum(dim=0).norm())
    live = big_m > noise
    big_m = torch.where(live, big_m, torch.zeros_like(big_m))
    bound = big_m * sq.sqrt() * (cf * cf).sum(dim=1).max().sqrt() / t
    a = a + (torch.minimum(torch.maximum(a, -bound), bound) - a).detach()
    a = torch.where(live, a, torch.zeros_like(a))
    rows = (big_m * finite_or_zero(lse) - a) / (big_m + 1e-8)
    # One column per anchor: M_i·(LSE_i − ℓ_ij)/(M_i + ε) = 0 exactly, as for SupCon.
    rows = torch.where(keep(live, cf.shape[0] == 2), rows, torch.zeros_like(rows))
    value = ((t / tb) * reduce_rows(rows.sum(), c.n_batch, c.world)).to(acc)
    return nan_if_nonfinite(value, features, soft_labels)


@_no_autocast
def tcl_loss(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.1,
    k1: float = 5000.0,
    k2: float = 1.0,
    backend: str = "auto",
    gather_distributed: bool = False,
    group=None,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """Tuned Contrastive Learning (Animesh & Chandraker).

    ℓ_i = log D_i − Q_i/C_i with D_i = Σ_P e^{ℓ} + k1·Σ_P e^{−s} + k2·Σ_N e^{ℓ}; the k1 term
    uses e^{−s} without τ, as the official code does. Row form (the official code divides
    entry [i, j] by D_j, which gives the same batch mean for label-defined positives). No
    positives: 0 (official code: NaN).

    Args:
        features: ``[B, V, D]`` or ``[N, D]`` (dtypes as :func:`supcon_loss`).
        labels: integer class ids ``[B]`` or multi-hot bool ``[B, L]`` (L <= 64); required.
        temperature: τ (default 0.1, the official code's).
        k1: weight of the positives' e^{−s} term, >= 0 (default 5000).
        k2: weight of the negatives, >= 0 (default 1).
    """
    z, b, v = V.flatten_features(features, "features")
    t = V.check_temperature(temperature, "temperature")
    k1 = V.check_nonneg(k1, "k1")
    k2 = V.check_nonneg(k2, "k2")
    r = route(backend, z.device, extras=queue is not None or gather_distributed, fusable=True)
    check_streaming(r, gather_distributed, "tcl_loss")
    if r.engine is None:
        value = R.tcl_loss(features, labels, temperature=t, k1=k1, k2=k2, queue=queue)
        return nan_if_nonfinite(value, features)
    y, ml = V.check_label_input(labels, b, z, required=True, pack=False)
    opts = {"k1": k1, "k2": k2}
    if r.fused:
        return fused_loss(r, "tcl", "out", z, y, v, t, ml, 1.0, opts)
    y = (V.pack_multihot(y) if ml else y).repeat(v)
    c = contrast(z, y, gather=gather_distributed, group=group, queue=queue, multilabel=ml)
    log_d, psum, pcnt = stream(
        r, "tcl", "log_d", z, c.cols, y, c.labels, c.offset, t, opts, multilabel=ml
    )
    # D_i has one term where the row's only positive is its only weighted column.
    one_term = (pcnt == 1) & (k1 == 0 and (k2 == 0 or c.cols.shape[0] == 2))
    rows = out_rows(log_d, psum, pcnt, t, one_term)
    value = reduce_rows(rows.sum(), c.n_batch, c.world).to(acc_dtype(z))
    return nan_if_nonfinite(value, features)


def esupcon_logits(features: Tensor, prototypes: Tensor, temperature: float = 0.1) -> Tensor:
    """ESupCon's classifier logits z·u_k/τ, u_k = w_k/‖w_k‖: p(y=k|z) = softmax_k(logits).

    Args:
        features: ``[N, D]`` embeddings z.
        prototypes: ``[K, D]`` class weights w_k (cast to the features' dtype).
        temperature: τ (default 0.1).
    """
    V.check_tensor(features, "features")
    if features.dim() != 2:
        raise ValueError(f"features must have shape [N, D], got {tuple(features.shape)}")
    V.check_prototypes(prototypes, features)
    t = V.check_temperature(temperature, "temperature")
    return R.esupcon_logits(features, prototypes.to(features.dtype), t)


@_no_autocast
def esupcon_loss(
    features: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    *,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    prototype_anchors: bool = True,
    backend: str = "auto",
    gather_distributed: bool = False,
    group=None,
    queue: MemoryQueue | None = None,
) -> Tensor:
    """ESupCon: SupCon over samples and learnable class prototypes (docs/losses.md §5).

    This is flashcon's definition following Aljundi et al. (AAAI 2023), whose code is not
    public: prototypes u_k = w_k/‖w_k‖ are extra columns (positive for their class) of every
    sample anchor and, with ``prototype_anchors=True``, anchors of their own against the
    samples (only classes with a sample among the columns). Scaled by τ/τ_b (τ_b = τ by
    default), mean over all anchors.

    Args:
        features: ``[B, V, D]`` or ``[N, D]`` (dtypes as :func:`supcon_loss`).
        labels: integer ids in ``[0, K)`` ``[B]``, or multi-hot bool ``[B, L]`` with L <= K
            (label l is prototype l; at most 64 prototypes then).
        prototypes: ``[K, D]`` class weights (normalised inside; receive gradient). With
            ``gather_distributed`` they are the same on every rank (as under DDP); every rank
            computes the prototype anchors and weighs them by 1/W.
        temperature: τ (default 0.1).
        base_temperature: τ_b (default ``None``: τ_b = τ, no scaling).
        prototype_anchors: also use the prototypes as anchors against the samples (default
            ``True``).
    """
    z, b, v = V.flatten_features(features, "features")
    t = V.check_temperature(temperature, "temperature")
    tb = t
    if base_temperature is not None:
        tb = V.check_temperature(base_temperature, "base_temperature")
    k_cls = V.check_prototypes(prototypes, z)
    r = route(backend, z.device)
    check_streaming(r, gather_distributed, "esupcon_loss")
    if r.engine is None:
        value = R.esupcon_loss(
            features,
            labels,
            prototypes,
            temperature=t,
            base_temperature=tb,
            prototype_anchors=prototype_anchors,
            queue=queue,
        )
        return nan_if_nonfinite(value, features, prototypes)
    y, ml = V.check_label_input(labels, b, z, required=True, num_classes=k_cls)
    y = y.repeat(v)
    u = (prototypes / prototypes.norm(dim=1, keepdim=True)).to(z.dtype)
    cls = R.prototype_labels(k_cls, ml, z.device)
    c = contrast(z, y, gather=gather_distributed, group=group, queue=queue, multilabel=ml)
    cols = torch.cat([c.cols, u], dim=0)
    col_lab = torch.cat([c.labels, cls])
    lse, psum, pcnt = stream(r, "esupcon", "lse", z, cols, y, col_lab, c.offset, t, multilabel=ml)
    total = out_rows(lse, psum, pcnt, t, cols.shape[0] == 2).sum()
    count = torch.full((), c.n_batch, dtype=lse.dtype, device=z.device)
    if prototype_anchors:
        # Every prototype is a row; those of classes with no sample among the columns have no
        # positive, give 0 and are not counted (a static shape, so this stays compile-friendly).
        lse_p, psum_p, pcnt_p = stream(
            r, "esupcon", "lse", u, c.cols, cls, c.labels, -1, t, multilabel=ml
        )
        # Each rank computes every prototype anchor: weigh them 1/W so they count once.
        one_col = c.cols.shape[0] == 1
        total = total + out_rows(lse_p, psum_p, pcnt_p, t, one_col).sum() / c.world
        count = count + (pcnt_p > 0).sum().to(count.dtype)
    value = ((t / tb) * reduce_rows(total, count, c.world)).to(acc_dtype(z))
    return nan_if_nonfinite(value, features, prototypes)


# Every loss takes the same distribution / queue / backend arguments; document them once.
for _fn in (supcon_loss, ntxent_loss, sincere_loss, genscl_loss, tcl_loss, esupcon_loss):
    _fn.__doc__ = (_fn.__doc__ or "").rstrip() + "\n\n    Common arguments:" + _DIST_DOC
