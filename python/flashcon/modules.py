"""``nn.Module`` wrappers of the functional losses (drop-in for the official modules)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _validate as V
from . import functional as F
from .queue import MemoryQueue


class ContrastiveLoss(nn.Module):
    """What the loss modules share: the temperature, the backend and distributed gathering,
    passed to their functional loss with the call's ``queue``.

    Args:
        temperature: τ.
        backend: as the functional losses' ``backend`` (default ``'auto'``).
        gather_distributed: gather the global batch from every rank of ``group`` (see
            :func:`flashcon.supcon_loss`).
        group: the process group (default: the world).
    """

    def __init__(
        self,
        temperature: float,
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
    ) -> None:
        super().__init__()
        self.temperature = V.check_temperature(temperature, "temperature")
        self.backend = backend
        self.gather_distributed = bool(gather_distributed)
        self.group = group

    def _common(self, queue: MemoryQueue | None) -> dict:
        """The functional loss's keyword arguments every module passes."""
        return {
            "temperature": self.temperature,
            "backend": self.backend,
            "gather_distributed": self.gather_distributed,
            "group": self.group,
            "queue": queue,
        }


class SupConLoss(ContrastiveLoss):
    """Drop-in for SupContrast's ``SupConLoss``: ``forward(features, labels=None, mask=None)``.

    It takes what SupContrast takes: features ``[B, V, ...]`` (trailing dimensions
    flattened) or ``[N, D]``, labels ``[B]`` or ``[B, 1]``, integer or integral floating.
    Where it differs: the loss is returned in fp32 for fp16/bf16 features (fp64 for fp64),
    where SupContrast returns the features' dtype; an anchor whose mask weights sum to less
    than 1e-6 is divided by that sum, where SupContrast divides by 1 (see
    :func:`flashcon.supcon_loss`'s ``mask``).

    Args:
        temperature: τ (default 0.07).
        contrast_mode: ``'all'`` (default) or ``'one'``.
        base_temperature: τ_b (default 0.07); the loss is scaled by τ/τ_b.
        variant: ``'out'`` (default, L_out) or ``'in'`` (L_in).
        backend: as the functional losses' ``backend`` (default ``'auto'``).
        gather_distributed: gather the global batch from every rank of ``group`` (see
            :func:`flashcon.supcon_loss`).
        group: the process group (default: the world).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        contrast_mode: str = "all",
        base_temperature: float = 0.07,
        variant: str = "out",
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
    ) -> None:
        super().__init__(temperature, backend, gather_distributed, group)
        self.base_temperature = V.check_temperature(base_temperature, "base_temperature")
        self.contrast_mode = V.check_choice(contrast_mode, "contrast_mode", ("all", "one"))
        self.variant = V.check_choice(variant, "variant", ("out", "in"))

    def forward(
        self,
        features: Tensor,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        queue: MemoryQueue | None = None,
    ) -> Tensor:
        """The loss of :func:`flashcon.supcon_loss` with this module's options.

        Args:
            features: ``[B, V, D]`` (``[B, V, ...]`` is flattened to it) or ``[N, D]``.
            labels: class ids ``[B]`` or ``[B, 1]`` (integer or integral floating), multi-hot
                bool ``[B, L]`` or ``None`` (SimCLR).
            mask: SupContrast's ``[B, B]`` positive weights (exclusive with ``labels``).
            queue: an optional :class:`flashcon.MemoryQueue` of extra contrast columns.
        """
        return F.supcon_loss(
            features,
            labels,
            mask,
            base_temperature=self.base_temperature,
            contrast_mode=self.contrast_mode,
            variant=self.variant,
            **self._common(queue),
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"contrast_mode={self.contrast_mode!r}, variant={self.variant!r}, "
            f"backend={self.backend!r}"
        )


class NTXentLoss(ContrastiveLoss):
    """NT-Xent / SimCLR: ``forward(features [B, V, D])``.

    Args:
        temperature: τ (default 0.5).
        backend: as the functional losses' ``backend`` (default ``'auto'``).
        gather_distributed: gather the global batch from every rank of ``group`` (see
            :func:`flashcon.supcon_loss`). As lightly's ``NTXentLoss``: without an
            initialised process group the loss runs as a single process, and where
            ``torch.distributed`` is not available at all the constructor raises. (The
            functional :func:`flashcon.ntxent_loss` and the other losses raise without a
            process group instead.)
        group: the process group (default: the world).
    """

    def __init__(
        self,
        temperature: float = 0.5,
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
    ) -> None:
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed=True but torch.distributed is not available in this torch "
                "build; pass gather_distributed=False"
            )
        super().__init__(temperature, backend, gather_distributed, group)

    def forward(self, features: Tensor, *, queue: MemoryQueue | None = None) -> Tensor:
        """The loss of :func:`flashcon.ntxent_loss` with this module's options.

        Args:
            features: ``[B, V, D]``.
            queue: an optional :class:`flashcon.MemoryQueue` of extra contrast columns.
        """
        # lightly gathers only where a process group is initialised (one process otherwise).
        gather = self.gather_distributed and torch.distributed.is_initialized()
        return F.ntxent_loss(features, **{**self._common(queue), "gather_distributed": gather})


class SINCERELoss(ContrastiveLoss):
    """SINCERE: ``forward(features, labels)``.

    Args:
        temperature: τ (default 0.07).
        backend: as the functional losses' ``backend`` (default ``'auto'``).
        gather_distributed: gather the global batch from every rank of ``group`` (see
            :func:`flashcon.supcon_loss`).
        group: the process group (default: the world).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
    ) -> None:
        super().__init__(temperature, backend, gather_distributed, group)

    def forward(
        self, features: Tensor, labels: Tensor, *, queue: MemoryQueue | None = None
    ) -> Tensor:
        """The loss of :func:`flashcon.sincere_loss` with this module's options.

        Args:
            features: ``[B, V, D]`` or ``[N, D]``.
            labels: class ids ``[B]`` or multi-hot bool ``[B, L]``.
            queue: an optional :class:`flashcon.MemoryQueue` of extra contrast columns.
        """
        return F.sincere_loss(features, labels, **self._common(queue))


class GenSCLLoss(ContrastiveLoss):
    """GenSCL: ``forward(features, soft_labels)`` with soft labels ``[B, K]`` or ``[B, V, K]``.

    Args:
        temperature: τ (default 0.07).
        base_temperature: τ_b (default 0.07); the loss is scaled by τ/τ_b.
        backend: as the functional losses' ``backend`` (default ``'auto'``).
        gather_distributed: gather the global batch from every rank of ``group`` (see
            :func:`flashcon.supcon_loss`).
        group: the process group (default: the world).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        base_temperature: float = 0.07,
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
    ) -> None:
        super().__init__(temperature, backend, gather_distributed, group)
        self.base_temperature = V.check_temperature(base_temperature, "base_temperature")

    def forward(
        self, features: Tensor, soft_labels: Tensor, *, queue: MemoryQueue | None = None
    ) -> Tensor:
        """The loss of :func:`flashcon.genscl_loss` with this module's options.

        Args:
            features: ``[B, V, D]`` or ``[N, D]``.
            soft_labels: non-negative ``[B, K]`` or ``[B, V, K]``.
            queue: an optional :class:`flashcon.MemoryQueue` holding soft labels.
        """
        return F.genscl_loss(
            features, soft_labels, base_temperature=self.base_temperature, **self._common(queue)
        )


class TCLLoss(ContrastiveLoss):
    """Tuned Contrastive Learning: ``forward(features, labels)``.

    Args:
        temperature: τ (default 0.1).
        k1: weight of the positives' e^{−s} term (default 5000).
        k2: weight of the negatives (default 1).
        backend: as the functional losses' ``backend`` (default ``'auto'``).
        gather_distributed: gather the global batch from every rank of ``group`` (see
            :func:`flashcon.supcon_loss`).
        group: the process group (default: the world).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        k1: float = 5000.0,
        k2: float = 1.0,
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
    ) -> None:
        super().__init__(temperature, backend, gather_distributed, group)
        self.k1 = V.check_nonneg(k1, "k1")
        self.k2 = V.check_nonneg(k2, "k2")

    def forward(
        self, features: Tensor, labels: Tensor, *, queue: MemoryQueue | None = None
    ) -> Tensor:
        """The loss of :func:`flashcon.tcl_loss` with this module's options.

        Args:
            features: ``[B, V, D]`` or ``[N, D]``.
            labels: class ids ``[B]`` or multi-hot bool ``[B, L]``.
            queue: an optional :class:`flashcon.MemoryQueue` of extra contrast columns.
        """
        return F.tcl_loss(features, labels, k1=self.k1, k2=self.k2, **self._common(queue))


class ESupConLoss(ContrastiveLoss):
    """ESupCon: owns ``prototypes`` ``[K, D]`` (an ``nn.Parameter``), which double as a classifier.

    ``forward(features, labels)`` returns the loss; ``logits(z)`` the classifier logits
    z·u_k/τ (p(y=k|z) = softmax over k); ``predict(z)`` the arg-max class.

    Args:
        num_classes: K, the number of prototypes.
        dim: D, the embedding width.
        temperature: τ (default 0.1).
        base_temperature: τ_b (default ``None``: τ_b = τ).
        prototype_anchors: also use the prototypes as anchors (default ``True``).
        backend: as the functional losses' ``backend`` (default ``'auto'``).
        gather_distributed: gather the global batch from every rank of ``group`` (see
            :func:`flashcon.supcon_loss`).
        group: the process group (default: the world).
        device: where the prototypes are created.
        dtype: their dtype (default: torch's default floating dtype).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        temperature: float = 0.1,
        base_temperature: float | None = None,
        prototype_anchors: bool = True,
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
        super().__init__(temperature, backend, gather_distributed, group)
        self.base_temperature = (
            None
            if base_temperature is None
            else V.check_temperature(base_temperature, "base_temperature")
        )
        self.prototype_anchors = bool(prototype_anchors)
        w = torch.empty(num_classes, dim, device=device, dtype=dtype)
        nn.init.normal_(w, std=1.0 / math.sqrt(dim))
        self.prototypes = nn.Parameter(w)

    def forward(
        self, features: Tensor, labels: Tensor, *, queue: MemoryQueue | None = None
    ) -> Tensor:
        """The loss of :func:`flashcon.esupcon_loss` against this module's prototypes.

        Args:
            features: ``[B, V, D]`` or ``[N, D]``.
            labels: class ids in ``[0, K)`` ``[B]`` or multi-hot bool ``[B, L]`` (L <= K).
            queue: an optional :class:`flashcon.MemoryQueue` of extra contrast columns.
        """
        return F.esupcon_loss(
            features,
            labels,
            self.prototypes,
            base_temperature=self.base_temperature,
            prototype_anchors=self.prototype_anchors,
            **self._common(queue),
        )

    def logits(self, z: Tensor) -> Tensor:
        """Classifier logits z·u_k/τ ``[N, K]``.

        Args:
            z: ``[N, D]`` embeddings.
        """
        return F.esupcon_logits(z, self.prototypes, self.temperature)

    @torch.no_grad()
    def predict(self, z: Tensor) -> Tensor:
        """The arg-max class ``[N]`` of each embedding (no gradient).

        Args:
            z: ``[N, D]`` embeddings.
        """
        return self.logits(z).argmax(dim=1)
