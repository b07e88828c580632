"""Checks and argument preparation of the Triton launchers: input checks, the padded
contiguous operands, the placeholders of unused pointer arguments, the mask's arguments and
the host constants (log-weights, fp32 statistics).

Nothing here reads tensor data, so every launcher also runs on fake tensors (the
``triton_op`` fake implementation is the launcher itself, with the kernel launch skipped).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _check_pos_weight(pos_weight: Tensor) -> None:
    if pos_weight.dim() != 2 or pos_weight.numel() == 0:
        raise ValueError(
            f"pos_weight must be a non-empty [Bq, Bk] matrix, got {tuple(pos_weight.shape)}"
        )
    if pos_weight.numel() >= 2**31:
        raise ValueError(f"pos_weight has {pos_weight.numel()} entries; at most 2^31 - 1 supported")


def _unused(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The placeholder of a pointer argument the kernel is compiled not to touch: a buffer of
    its own, never another argument's storage.

    torch.compile functionalises a ``wrap_triton`` launch by cloning every argument that
    torch's access analysis (``torch._higher_order_ops.triton_kernel_wrap``) reports written,
    running the kernel on the clones and copying each clone back. The analysis is conservative
    (an atomic makes every pointer it may reach "written"), so an output passed again as a
    placeholder was cloned twice and the untouched placeholder clone, copied back last, erased
    the kernel's results: the loss was 0 under torch.compile on a GPU. ``tests/test_launch_args.py``
    checks every launch for such aliasing without a GPU. An allocation launches nothing."""
    return torch.empty(1, dtype=dtype, device=device)


def _pw_args(pos_weight: Tensor | None, like: Tensor, n: int, m: int) -> tuple:
    """(mask, i mod Bq [N], j mod Bk [M], Bk) of SupContrast's [Bq, Bk] mask; placeholders
    without one (never read: the kernel is compiled without HAS_PW)."""
    if pos_weight is None:
        dev = like.device
        return _unused(dev), _unused(dev, torch.int32), _unused(dev, torch.int32), 1
    _check_pos_weight(pos_weight)
    pw = pos_weight.to(device=like.device, dtype=torch.float32).contiguous()
    ridx = torch.arange(n, device=like.device, dtype=torch.int32) % pw.shape[0]
    cidx = torch.arange(m, device=like.device, dtype=torch.int32) % pw.shape[1]
    return pw, ridx, cidx, pw.shape[1]


# --------------------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, qlab: Tensor, klab: Tensor) -> None:
    if q.dtype == torch.float64 or k.dtype == torch.float64:
        raise TypeError(
            "backend='triton' does not support float64 inputs; use backend='torch' or "
            "backend='cpu' (they compute in float64), or cast to float32"
        )
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"need q [N, D] and k [M, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if qlab.shape != (q.shape[0],) or klab.shape != (k.shape[0],):
        raise ValueError(
            f"labels must be qlab [N] and klab [M], got {tuple(qlab.shape)} and "
            f"{tuple(klab.shape)} for N={q.shape[0]}, M={k.shape[0]}"
        )
    if qlab.dtype != torch.int64 or klab.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {qlab.dtype} and {klab.dtype}")
    devs = {t.device for t in (q, k, qlab, klab)}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")


# D is padded with zero columns to a multiple of 16 elements (zeros change no dot product):
# the row strides then are multiples of 16 bytes, so Triton specialises every load to 16-byte
# vectors. Unaligned rows (D = 7, 130, …) would load element by element, with one pointer
# register per element, which spills every tile size worth having. The copy is O(N·D) and
# only happens for such D.
D_ALIGN = 16


def _prep(q: Tensor, k: Tensor, qlab: Tensor, klab: Tensor):
    _check(q, k, qlab, klab)
    d = q.shape[1]
    dp = -(-d // D_ALIGN) * D_ALIGN
    if dp != d:
        q = torch.nn.functional.pad(q, (0, dp - d))
        k = torch.nn.functional.pad(k, (0, dp - d))
    return q.contiguous(), k.contiguous(), qlab.contiguous(), klab.contiguous(), dp


def _log_w(w: float) -> float:
    # A zero weight is a −inf log-weight: its terms vanish exactly (see lse.py).
    return math.log(w) if w > 0 else float("-inf")


def _stat_in(x: Tensor) -> Tensor:
    return x.to(torch.float32).contiguous()


def _sym_prep(z: Tensor, lab: Tensor):
    z, _, lab, _, d = _prep(z, z, lab, lab)
    return z, lab, d
