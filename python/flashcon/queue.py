"""A labelled memory queue: past embeddings served as extra contrast columns.

MoCo-style training contrasts each batch against the last Q embeddings as well as against the
batch. :class:`MemoryQueue` keeps them (detached: they receive no gradient) with their integer
labels, multi-hot labels or soft labels, and every loss takes it as ``queue=``: the queue rows
are appended to the contrast columns, never an anchor and never anyone's own column. Push
*after* computing the loss, so a batch is not contrasted with itself twice.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validate as V


class MemoryQueue(nn.Module):
    """Ring buffer of the last ``size`` embeddings and their labels.

    Args:
        size: capacity Q (rows, i.e. embeddings: a ``[B, V, D]`` push adds B·V rows).
        dim: embedding width D.
        num_soft_classes: when given, the queue stores soft labels ``[Q, K]`` (GenSCL) instead
            of integer labels.
        multilabel: the queue stores multi-hot labels (pushed as bool ``[B, L]``, kept as
            int64 bitmasks) for losses called with multi-hot labels.
        dtype: dtype of the stored embeddings (and soft labels), default fp32; rows are cast
            to the features' dtype when a loss reads them.
        device: where the buffers live; must be the features' device when a loss reads them.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        num_soft_classes: int | None = None,
        multilabel: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be >= 1, got size={size}, dim={dim}")
        self.size = int(size)
        self.soft = num_soft_classes is not None
        self.multilabel = bool(multilabel)
        if self.soft and self.multilabel:
            raise ValueError("a queue holds soft labels or multi-label bitmasks, not both")
        self.register_buffer("_feats", torch.zeros(size, dim, dtype=dtype, device=device))
        if self.soft:
            lab = torch.zeros(size, int(num_soft_classes), dtype=dtype, device=device)
        else:
            lab = torch.zeros(size, dtype=torch.long, device=device)
        self.register_buffer("_labels", lab)
        self.register_buffer("_ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("_count", torch.zeros((), dtype=torch.long, device=device))

    def __len__(self) -> int:
        return int(self._count)

    @property
    def features(self) -> Tensor:
        """The stored embeddings ``[len(self), D]`` (no gradient)."""
        return self._feats[: len(self)]

    @property
    def labels(self) -> Tensor:
        """Their labels: integer ``[len(self)]`` (class ids, or int64 bitmasks of multi-hot
        labels) or soft ``[len(self), K]``."""
        return self._labels[: len(self)]

    @torch.no_grad()
    def push(self, features: Tensor, labels: Tensor | None = None) -> None:
        """Enqueue a batch (detached); once full, the oldest rows are overwritten.

        Args:
            features: ``[B, V, D]`` or ``[N, D]``, flattened view-major like the losses.
            labels: to match the queue's kind: class ids ``[B]``, multi-hot bool ``[B, L]``
                (a ``multilabel`` queue) or soft ``[B, K]`` / ``[B, V, K]``; may be omitted
                for a class-id queue used only as negatives (NT-Xent), whose rows then get
                label −1.
        """
        z, b, v = V.flatten_features(features, "features")
        if z.shape[1] != self._feats.shape[1]:
            raise ValueError(
                f"features have D = {z.shape[1]}, the queue D = {self._feats.shape[1]}"
            )
        if self.soft:
            if labels is None:
                raise ValueError("this queue stores soft labels: pass them to push()")
            y = V.check_soft_labels(labels, b, v, z)
        elif labels is None:
            y = torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)
        else:
            y, ml = V.check_label_input(labels, b, z)
            if ml != self.multilabel:
                raise ValueError(
                    "this queue stores "
                    + ("multi-hot labels: push bool [B, L]" if self.multilabel else "class ids")
                )
            y = y.repeat(v)
        z = z.detach().to(self._feats.dtype)
        y = y.detach().to(self._labels.dtype)
        n = z.shape[0]
        if n >= self.size:  # only the newest rows fit
            z, y, n = z[-self.size :], y[-self.size :], self.size
        idx = (int(self._ptr) + torch.arange(n, device=z.device)) % self.size
        self._feats[idx] = z
        self._labels[idx] = y
        self._ptr.fill_((int(self._ptr) + n) % self.size)
        self._count.fill_(min(self.size, int(self._count) + n))

    def check_for(self, z: Tensor, soft: bool, multilabel: bool = False) -> tuple[Tensor, Tensor]:
        """The queue's (features, labels) to append to ``z``'s columns (used by the losses).

        Args:
            z: the loss's flattened features ``[N, D]`` (width, device and dtype are matched).
            soft: the loss needs soft labels (GenSCL).
            multilabel: the loss has multi-hot labels.
        """
        if not soft and multilabel != self.multilabel:
            raise ValueError(
                f"the loss has {'multi-hot' if multilabel else 'class-id'} labels but the queue "
                f"stores {'multi-hot' if self.multilabel else 'class-id'} labels"
            )
        if soft != self.soft:
            kind = "soft labels" if self.soft else "integer labels"
            raise ValueError(
                f"this loss needs a queue of {'soft' if soft else 'integer'} labels; "
                f"the queue holds {kind}"
            )
        if self._feats.shape[1] != z.shape[1]:
            raise ValueError(f"queue width {self._feats.shape[1]} != features D = {z.shape[1]}")
        if self._feats.device != z.device:
            raise ValueError(f"queue is on {self._feats.device} but features are on {z.device}")
        return self.features.to(z.dtype), self.labels
