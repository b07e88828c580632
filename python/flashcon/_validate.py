"""Input validation shared by the public API and the reference implementations.

Every check raises ``ValueError`` (bad value or shape) or ``TypeError`` (bad dtype/type) with a
message that names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _eager() -> bool:
    """Checks that read tensor values run in eager mode only: under torch.compile they would
    force a graph break (the shapes and dtypes are still checked there)."""
    return not torch.compiler.is_compiling()


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def flatten_features(features: Tensor, name: str = "features") -> tuple[Tensor, int, int]:
    """Validate features and flatten views view-major.

    ``[B, V, D]`` becomes ``[V·B, D]`` (``torch.cat(features.unbind(1))``, as the official code);
    ``[N, D]`` is one view per sample. Returns (z, B, V).
    """
    check_tensor(features, name)
    if features.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {features.dtype}"
        )
    if features.dim() == 3:
        b, v, d = features.shape
        z = features.transpose(0, 1).reshape(v * b, d)
    elif features.dim() == 2:
        b, d = features.shape
        v = 1
        z = features
    else:
        raise ValueError(
            f"{name} must have shape [B, V, D] or [N, D], got {features.dim()} dimensions "
            f"{tuple(features.shape)}"
        )
    if b == 0 or v == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(features.shape)})")
    if d == 0:
        raise ValueError(f"{name} has feature dimension D = 0 (shape {tuple(features.shape)})")
    return z, b, v


def merge_trailing(features: Tensor, name: str = "features") -> Tensor:
    """``[B, V, ...]`` with more than three dimensions becomes ``[B, V, D]``, the trailing
    dimensions flattened (SupContrast's ``features.view(B, V, -1)``); other shapes unchanged."""
    check_tensor(features, name)
    if features.dim() > 3:
        return features.reshape(features.shape[0], features.shape[1], -1)
    return features


def class_ids(labels: object, name: str = "labels", *, column: bool = False) -> object:
    """Class ids given the way SupContrast and pytorch-metric-learning take them, as int64.

    Floating labels with integral values become int64 (both compare labels by equality; a
    non-integral or non-finite float label raises rather than being truncated). With
    ``column=True`` a non-bool ``[B, 1]`` becomes ``[B]`` (SupContrast reads
    ``labels.view(-1, 1)``). Anything else (None, integer ids, multi-hot bool) is returned
    unchanged for the usual checks.
    """
    if not isinstance(labels, Tensor) or labels.dtype == torch.bool:
        return labels
    if column and labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if not labels.is_floating_point():
        return labels
    if _eager() and labels.numel() > 0:
        ok = torch.isfinite(labels) & (labels == labels.trunc()) & (labels.abs() < 2.0**62)
        if not bool(ok.all()):
            bad = labels[~ok][0].item()
            raise ValueError(
                f"{name} are compared as class ids: floating {name} must hold integral values, "
                f"got {bad}"
            )
    return labels.long()


def check_multiview(features: Tensor, name: str = "features") -> None:
    check_tensor(features, name)
    if features.dim() != 3:
        raise ValueError(
            f"{name} must have shape [B, V, D] (positives are the other views of a sample), "
            f"got shape {tuple(features.shape)}"
        )


def _same_device(x: Tensor, ref: Tensor, name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but features are on {ref.device}")


def check_labels(
    labels: Tensor | None,
    b: int,
    ref: Tensor,
    *,
    required: bool = False,
    num_classes: int | None = None,
    name: str = "labels",
) -> Tensor | None:
    """Validate integer class labels ``[B]``; returns them as int64 (or None)."""
    if labels is None:
        if required:
            raise ValueError(f"{name} is required for this loss")
        return None
    check_tensor(labels, name)
    if labels.dtype == torch.bool or labels.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of class ids, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(
            f"{name} must have shape [B] (class ids) or be a multi-hot bool [B, L], "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != b:
        raise ValueError(f"{name} has {labels.shape[0]} entries but features have B = {b} samples")
    _same_device(labels, ref, name)
    labels = labels.long()
    if num_classes is not None and labels.numel() > 0 and _eager():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) to index the prototypes, "
                f"got values in [{lo}, {hi}]"
            )
    return labels


MAX_LABELS = 64


def pack_multihot(y: Tensor) -> Tensor:
    """Multi-hot ``[B, L]`` (L <= 64) to int64 bitmasks: bit l set when label l is present.

    Two samples are positives when their bitmasks share a bit (``a & b != 0``).
    """
    bits = torch.bitwise_left_shift(
        torch.ones((), dtype=torch.long, device=y.device),
        torch.arange(y.shape[1], device=y.device),
    )
    return (y.long() * bits).sum(dim=1)  # distinct bits: the sum is the bitwise OR


def check_label_input(
    labels: Tensor | None,
    b: int,
    ref: Tensor,
    *,
    required: bool = False,
    num_classes: int | None = None,
    name: str = "labels",
    pack: bool = True,
) -> tuple[Tensor | None, bool]:
    """Integer class ids ``[B]`` or a multi-hot bool ``[B, L]`` (L <= 64).

    Returns (labels, multilabel): int64 class ids, or int64 bitmasks when multi-hot (the
    validated bool ``[B, L]`` itself with ``pack=False``: a fused kernel packs it).
    """
    if isinstance(labels, Tensor) and labels.dtype == torch.bool and labels.dim() == 2:
        if labels.shape[0] != b:
            raise ValueError(f"{name} has {labels.shape[0]} rows but features have B = {b} samples")
        n_lab = labels.shape[1]
        if n_lab == 0 or n_lab > MAX_LABELS:
            raise ValueError(
                f"multi-hot {name} must have 1 to {MAX_LABELS} label columns, got {n_lab}"
            )
        if num_classes is not None and n_lab > num_classes:
            raise ValueError(
                f"multi-hot {name} have {n_lab} label columns but there are only "
                f"{num_classes} prototypes"
            )
        _same_device(labels, ref, name)
        return (pack_multihot(labels) if pack else labels), True
    if isinstance(labels, Tensor) and labels.dim() == 2:
        raise TypeError(
            f"{name} of shape [B, L] must be a multi-hot bool tensor, got dtype {labels.dtype}"
        )
    return check_labels(
        labels, b, ref, required=required, num_classes=num_classes, name=name
    ), False


def check_mask(mask: Tensor, b: int, ref: Tensor, name: str = "mask") -> Tensor:
    check_tensor(mask, name)
    if mask.dim() != 2 or tuple(mask.shape) != (b, b):
        raise ValueError(f"{name} must have shape [B, B] = [{b}, {b}], got {tuple(mask.shape)}")
    _same_device(mask, ref, name)
    if mask.is_floating_point():
        # Both checks read data: eager only (under torch.compile they would be a
        # data-dependent branch).
        if _eager() and (not torch.isfinite(mask).all() or (mask < 0).any()):
            raise ValueError(f"{name} must hold finite, non-negative positive weights")
    elif mask.dtype not in _INT_DTYPES and mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool, integer or floating tensor, got {mask.dtype}")
    return mask


def check_soft_labels(soft_labels: Tensor, b: int, v: int, ref: Tensor) -> Tensor:
    """Validate GenSCL soft labels ``[B, K]`` or ``[B, V, K]``; returns ``[V·B, K]`` view-major."""
    name = "soft_labels"
    check_tensor(soft_labels, name)
    if not soft_labels.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {soft_labels.dtype}")
    _same_device(soft_labels, ref, name)
    if soft_labels.dim() == 2:
        if soft_labels.shape[0] != b:
            raise ValueError(
                f"{name} has {soft_labels.shape[0]} rows but features have B = {b} samples"
            )
        y = soft_labels.repeat(v, 1)
    elif soft_labels.dim() == 3:
        if soft_labels.shape[0] != b or soft_labels.shape[1] != v:
            raise ValueError(
                f"{name} of shape [B, V, K] must have B = {b}, V = {v}, "
                f"got {tuple(soft_labels.shape)}"
            )
        y = soft_labels.transpose(0, 1).reshape(v * b, soft_labels.shape[2])
    else:
        raise ValueError(
            f"{name} must have shape [B, K] or [B, V, K], got {tuple(soft_labels.shape)}"
        )
    if y.shape[1] == 0:
        raise ValueError(f"{name} has K = 0 classes")
    if not _eager():
        return y
    if not torch.isfinite(y).all():
        raise ValueError(f"{name} must be finite")
    if (y < 0).any():
        raise ValueError(f"{name} must be non-negative (label weights or probabilities)")
    if (y.sum(dim=1) <= 0).any():
        raise ValueError(f"{name} has an all-zero row; every sample needs some label mass")
    return y


def check_prototypes(prototypes: Tensor, ref: Tensor) -> int:
    name = "prototypes"
    check_tensor(prototypes, name)
    if not prototypes.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {prototypes.dtype}")
    if prototypes.dim() != 2:
        raise ValueError(f"{name} must have shape [K, D], got {tuple(prototypes.shape)}")
    if prototypes.shape[1] != ref.shape[1]:
        raise ValueError(
            f"{name} have width {prototypes.shape[1]} but features have D = {ref.shape[1]}"
        )
    if prototypes.shape[0] == 0:
        raise ValueError(f"{name} is empty (K = 0 classes)")
    _same_device(prototypes, ref, name)
    return prototypes.shape[0]


def _as_float(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        if isinstance(x, Tensor) and x.numel() == 1:
            return float(x)
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    return float(x)


def check_temperature(t: object, name: str = "temperature") -> float:
    if not _eager():
        return t  # type: ignore[return-value]  (traced: checked where the value is known)
    t = _as_float(t, name)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {t}")
    return t


def check_nonneg(x: object, name: str) -> float:
    if not _eager():
        return x  # type: ignore[return-value]
    x = _as_float(x, name)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x}")
    return x


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]
