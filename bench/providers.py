"""Benchmark providers: the inputs of each loss, the callables that compute it, the flop model.

A *provider* is one way of computing a loss:

- ``flashcon-<backend>`` for each streaming backend (``triton``, ``cuda``, ``cpu``, ``torch``):
  ``flashcon.<loss>_loss(..., backend=<backend>)``;
- ``reference``: the dense implementation ``flashcon.reference.<loss>_loss`` in eager PyTorch
  (the same oracle the tests use), which builds the N×M logits;
- ``reference-compile``: ``torch.compile`` of that dense reference;
- ``chunked-compile``: a plain PyTorch SupCon loop over row chunks, each chunk compiled with
  ``torch.compile`` and checkpointed (``bench/chunked.py``): what a user gets from
  ``torch.compile`` without a streaming kernel (supcon and ntxent only);
- ``pml``: pytorch-metric-learning's ``SupConLoss`` (supcon only), see :func:`_pml_loss`.

Every provider of a loss computes the same number on the same inputs (the benchmark records
each point's loss value and its relative difference from ``reference`` to show it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("supcon", "ntxent", "sincere", "genscl", "tcl", "esupcon")
STREAMING = ("triton", "cuda", "cpu", "torch")
# The fused backends with a symmetric 'all'-mode path (each unordered tile pair once), also
# run through their general kernels (``engine.set_symmetric(False)``) to show both paths.
SYMMETRIC = ("triton", "cpu")
PROVIDERS = (
    *(f"flashcon-{b}" for b in STREAMING),
    *(f"flashcon-{b}-general" for b in SYMMETRIC),
    # The Triton symmetric path on its earlier schedule (one tile pair per program, both
    # blocks streamed): the A/B of the partner-run and resident kernels (triton_kernels/sym.py).
    "flashcon-triton-tiles",
    "reference",
    "reference-compile",
    "chunked-compile",
    "pml",
)

# Number of classes for the labels (and of soft-label columns / prototypes): CIFAR-100-like.
NUM_CLASSES = 100

# Loss options used by every provider. SupCon runs with τ_b = τ = 0.1 so that it is exactly
# pytorch-metric-learning's SupConLoss(temperature=0.1), which has no base-temperature scale.
LOSS_KWARGS: dict[str, dict[str, float]] = {
    "supcon": {"temperature": 0.1, "base_temperature": 0.1},
    "ntxent": {"temperature": 0.5},
    "sincere": {"temperature": 0.07},
    "genscl": {"temperature": 0.07, "base_temperature": 0.07},
    "tcl": {"temperature": 0.1},
    "esupcon": {"temperature": 0.1},
}


def canonical(name: str) -> str:
    """Accept bare backend names (``torch``) for ``flashcon-torch``."""
    return f"flashcon-{name}" if name in STREAMING else name


def num_classes(n: int) -> int:
    # At least two members per class, so that every anchor has a positive (pml's mean skips
    # anchors without one; flashcon's counts them as 0: the two agree only when none exists).
    return max(1, min(NUM_CLASSES, n // 2))


def columns(loss: str, n: int) -> int:
    """M, the number of contrast columns of each anchor row."""
    return n + NUM_CLASSES if loss == "esupcon" else n


def pairs(loss: str, n: int) -> int:
    """Entries of the similarity matrices the loss streams over (N·M in the flop model).

    ESupCon adds the prototype anchors (K rows against the N samples). SINCERE's second pass
    over the same N×N matrix is not counted: flop/s measure useful work, not passes.
    """
    if loss == "esupcon":
        return n * columns(loss, n) + NUM_CLASSES * n
    return n * n


def flops(loss: str, n: int, d: int, mode: str) -> float:
    """The performance model of docs/design.md: 2·N·M·D forward, 6·N·M·D backward, 8·N·M·D both."""
    per_pair = {"fwd": 2, "bwd": 6, "fwdbwd": 8}[mode]
    return float(per_pair) * pairs(loss, n) * d


def availability(provider: str, loss: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``provider`` can run ``loss`` on ``device``, and why not."""
    if provider not in PROVIDERS:
        return False, f"unknown provider (choose from {', '.join(PROVIDERS)})"
    if provider.startswith("flashcon-"):
        import flashcon
        from flashcon.engine import BackendUnavailableError

        backend = provider.removeprefix("flashcon-").removesuffix("-general")
        backend = backend.removesuffix("-tiles")
        if backend == "triton" and device.type != "cuda":
            # resolve_backend accepts CPU tensors under TRITON_INTERPRET=1: that interpreter
            # is a correctness tool, far too slow to be worth timing.
            return False, "needs a CUDA device (the Triton interpreter is not benchmarked)"
        try:
            flashcon.resolve_backend(backend, device)
        except BackendUnavailableError as e:
            return False, str(e)
        return True, ""
    if provider == "pml":
        if loss != "supcon":
            return False, "pytorch-metric-learning's SupConLoss is SupCon only"
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError as e:
            return False, f"pytorch-metric-learning is not installed ({e})"
        return True, ""
    if provider == "chunked-compile" and loss not in ("supcon", "ntxent"):
        return False, "the chunked baseline is written for SupCon / NT-Xent only"
    return True, ""


def make_inputs(
    loss: str, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[tuple, list[torch.Tensor]]:
    """Deterministic inputs of ``loss`` with N = ``n`` embedding rows.

    Returns (positional args of ``<loss>_loss``, the leaf tensors that receive gradients).
    Features are L2-normalised rows (as the losses expect); every class has ≥ 2 members.
    """
    g = torch.Generator().manual_seed(seed + n)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1)
    k = num_classes(n)
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    if loss == "ntxent":
        if n % 2:
            raise ValueError("ntxent needs an even N (two views per sample)")
        feats = z.view(n // 2, 2, d).to(device=device, dtype=dtype).requires_grad_()
        return (feats,), [feats]
    feats = z.to(device=device, dtype=dtype).requires_grad_()
    y = y.to(device)
    if loss == "genscl":
        # Mixup-style soft labels: each row mixes its class with another one.
        lam = torch.rand(n, 1, generator=g)
        other = y.cpu()[torch.randperm(n, generator=g)]
        soft = lam * F.one_hot(y.cpu(), NUM_CLASSES) + (1 - lam) * F.one_hot(other, NUM_CLASSES)
        return (feats, soft.to(device=device, dtype=dtype)), [feats]
    if loss == "esupcon":
        protos = torch.randn(NUM_CLASSES, d, generator=g).to(device=device, dtype=dtype)
        protos.requires_grad_()
        return (feats, y, protos), [feats, protos]
    return (feats, y), [feats]


def _pml_loss(temperature: float) -> Callable:
    """pytorch-metric-learning's SupConLoss, fed ``[N, D]`` embeddings and labels (V = 1).

    Its semantics: cosine similarity (it normalises the embeddings itself; ours are already
    unit rows), logits = cos/τ, no base-temperature scale (hence τ_b = τ in LOSS_KWARGS),
    denominator over every other sample, mean over anchors with a positive (flashcon: over all
    anchors, with 0 for those without; the inputs give every anchor a positive). So it
    computes the same quantity as ``supcon_loss(z, y, temperature=τ, base_temperature=τ)``,
    densely: the N×N similarity matrix and its pos/neg masks are materialised.
    """
    from pytorch_metric_learning.losses import SupConLoss

    crit = SupConLoss(temperature=temperature)
    return lambda feats, labels: crit(feats, labels)


def _general_path(fn: Callable, *args, **kwargs):
    """``fn`` with the symmetric path off: the general kernels, chosen at the forward (the
    backward follows the ops the forward recorded)."""
    from flashcon import engine

    engine.set_symmetric(False)
    try:
        return fn(*args, **kwargs)
    finally:
        engine.set_symmetric(True)


def make_loss_fn(provider: str, loss: str) -> Callable:
    """The callable ``f(*inputs) -> scalar loss`` of ``provider`` for ``loss``."""
    import flashcon
    from flashcon import reference

    kwargs = LOSS_KWARGS[loss]
    if provider.startswith("flashcon-"):
        fn = getattr(flashcon, f"{loss}_loss")
        backend = provider.removeprefix("flashcon-")
        if backend.endswith("-general"):
            return functools.partial(
                _general_path, fn, **kwargs, backend=backend[: -len("-general")]
            )
        if backend.endswith("-tiles"):
            # Each point runs in its own worker process: the switch holds for its forward
            # and backward calls, and for nothing else.
            from flashcon.triton_kernels import config

            os.environ[config.SCHEDULE_ENV] = "tiles"
            backend = backend[: -len("-tiles")]
        return functools.partial(fn, **kwargs, backend=backend)
    if provider == "reference":
        return functools.partial(getattr(reference, f"{loss}_loss"), **kwargs)
    if provider == "reference-compile":
        return functools.partial(torch.compile(getattr(reference, f"{loss}_loss")), **kwargs)
    if provider == "chunked-compile":
        from chunked import chunked_supcon_loss

        if loss == "ntxent":
            t = kwargs["temperature"]
            return lambda feats: chunked_supcon_loss(feats, None, temperature=t, base_temperature=t)
        return functools.partial(chunked_supcon_loss, **kwargs)
    if provider == "pml":
        return _pml_loss(kwargs["temperature"])
    raise ValueError(f"unknown provider {provider!r}")
