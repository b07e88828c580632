"""A streaming stand-in for pytorch-metric-learning's ``SupConLoss``.

Code written for that library swaps in by changing one import::

    # was: from pytorch_metric_learning.losses import SupConLoss
    from flashcon.pml import SupConLoss
    loss = SupConLoss(temperature=0.1)(embeddings, labels)
    loss = SupConLoss(temperature=0.1)(embeddings, labels, ref_emb=ref, ref_labels=ref_labels)

Its semantics, kept here exactly: embeddings (and ``ref_emb``) are L2-normalised (its default
``CosineSimilarity`` distance); the columns are ``ref_emb`` when given (then no pair is a self
pair), else the embeddings themselves with the diagonal excluded; each anchor's loss is the
SupCon L_out term (no base-temperature scaling); the reduction averages the anchors whose loss
is non-zero (its ``AvgNonZeroReducer``), so anchors without positives do not count; a batch with
no positive pair or no negative pair gives 0. ``indices_tuple`` (mined pairs) selects
arbitrary pairs, which cannot be streamed: it raises.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validate as V
from .engine import get_engine, resolve_backend


class SupConLoss(nn.Module):
    """pytorch-metric-learning's ``SupConLoss``, streamed (semantics in the module docstring).

    Args:
        temperature: τ (default 0.1, the library's).
        backend: a streaming backend, as the functional losses' ``backend`` (default
            ``'auto'``; ``'reference'`` is refused).
    """

    def __init__(self, temperature: float = 0.1, backend: str = "auto") -> None:
        super().__init__()
        self.temperature = V.check_temperature(temperature, "temperature")
        self.backend = backend

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple=None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """The loss (fp32; fp64 for fp64 embeddings).

        Args:
            embeddings: ``[N, D]``, L2-normalised inside.
            labels: integer class ids ``[N]`` (required).
            indices_tuple: mined pairs; must be ``None`` (they cannot be streamed: raises).
            ref_emb: optional ``[M, D]`` reference embeddings used as the columns.
            ref_labels: their class ids ``[M]`` (required with ``ref_emb``).
        """
        if indices_tuple is not None:
            raise ValueError(
                "flashcon.pml.SupConLoss streams over all pairs and cannot take indices_tuple "
                "(mined pairs); use pytorch_metric_learning.losses.SupConLoss for mined pairs"
            )
        if labels is None:
            raise ValueError("flashcon.pml.SupConLoss needs labels [N]")
        z, n, _ = V.flatten_features(embeddings, "embeddings")
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must have shape [N, D], got {tuple(embeddings.shape)}")
        y = V.check_labels(labels, n, z, required=True)
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError("ref_labels was given without ref_emb")
            k, ky, self_offset = z, y, 0
        else:
            k, m, _ = V.flatten_features(ref_emb, "ref_emb")
            if ref_emb.dim() != 2 or k.shape[1] != z.shape[1]:
                raise ValueError(
                    f"ref_emb must have shape [M, {z.shape[1]}], got {tuple(ref_emb.shape)}"
                )
            ky = V.check_labels(ref_labels, m, z, required=True, name="ref_labels")
            self_offset = -1  # reference columns are other embeddings: no self pair
        eng = get_engine(resolve_backend(self.backend, z.device))  # 'reference' is refused
        t = self.temperature
        q = torch.nn.functional.normalize(z, dim=1)
        k = q if ref_emb is None else torch.nn.functional.normalize(k, dim=1)
        lse, psum, pcnt = eng.lse(
            q.contiguous(), k.contiguous(), y, ky, self_offset, 1 / t, 1, 1, 0, False, None
        )
        has = pcnt > 0
        rows = torch.where(has, lse - psum / (t * pcnt.clamp_min(1)), torch.zeros_like(lse))
        # AvgNonZeroReducer: the mean over anchors whose loss is > 0 (0 when there is none).
        nonzero = rows > 0
        count = nonzero.sum()
        loss = torch.where(nonzero, rows, torch.zeros_like(rows)).sum() / count.clamp_min(1)
        # No positive pair, or no negative pair, anywhere in the batch: 0, as the library does.
        n_cols = k.shape[0] - (1 if self_offset == 0 else 0)
        n_pos = pcnt.sum()
        n_neg = n_cols * q.shape[0] - n_pos
        degenerate = (n_pos == 0) | (n_neg == 0) | ((n_pos <= 1) & (n_neg <= 1))
        out = torch.where(degenerate, torch.zeros_like(loss), loss)
        return out.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
