"""Memory: the largest tensor a loss creates, forward and backward, is O(N·D) or one chunk of
the torch backend; never N×N (N×M with a queue or prototypes). Every loss, with a mask, soft or
multi-hot labels, prototypes or a queue, on the torch and C++ CPU backends; the torch backend's
chunking at a larger N; the Triton kernels and their launchers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashcon
from flashcon import MemoryQueue
from flashcon.testing import available_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import unit  # noqa: E402

STREAMING = ["torch", *available_backends("cpu")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces (outputs of every dispatched op)."""

    # Compiled (non-interpreted) launches arrive as the triton_kernel_wrapper_mutation
    # higher-order op; it only mutates preallocated outputs, so it is passed through.
    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.where = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.where = t.numel(), str(func)
        return out


# ---------------------------------------------------------------------------------------------
# Every loss and input kind: O(N·D) buffers, one chunk of the torch backend, or the user's mask.

_MEM_B, _MEM_D, _CHUNK = 256, 8, 1 << 14  # N = 512: N² = 262144 elements


def _mem_cases() -> dict:
    b, d = _MEM_B, _MEM_D
    g = torch.Generator().manual_seed(27)
    y = torch.randint(0, 10, (b,), generator=g)
    mh = torch.rand(b, 12, generator=g) < 0.2
    q = MemoryQueue(256, d)
    q.push(unit(128, 2, d, seed=28, dtype=torch.float32), torch.randint(0, 10, (128,), generator=g))
    qs = MemoryQueue(256, d, num_soft_classes=10)
    qs.push(unit(128, 2, d, seed=29, dtype=torch.float32), torch.rand(128, 10, generator=g))
    soft = torch.rand(b, 2, 10, generator=g)
    p = torch.randn(10, d, generator=g, requires_grad=True)
    mask = torch.rand(b, b, generator=g)
    return {
        "supcon_mask": (b * b, lambda f, be: flashcon.supcon_loss(f, None, mask, backend=be)),
        "supcon_in_one_multihot": (
            0,
            lambda f, be: flashcon.supcon_loss(
                f, mh, variant="in", contrast_mode="one", backend=be
            ),
        ),
        "ntxent_queue": (0, lambda f, be: flashcon.ntxent_loss(f, queue=q, backend=be)),
        "sincere_multihot": (0, lambda f, be: flashcon.sincere_loss(f, mh, backend=be)),
        "genscl_queue": (0, lambda f, be: flashcon.genscl_loss(f, soft, queue=qs, backend=be)),
        "tcl": (0, lambda f, be: flashcon.tcl_loss(f, y, backend=be)),
        "esupcon_queue": (0, lambda f, be: flashcon.esupcon_loss(f, y, p, queue=q, backend=be)),
    }


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("case", list(_mem_cases()))
def test_no_n_by_n_tensor(case, backend, monkeypatch):
    monkeypatch.setenv("FLASHCON_TORCH_CHUNK_ELEMS", str(_CHUNK))
    user_size, fn = _mem_cases()[case]
    f = unit(_MEM_B, 2, _MEM_D, seed=30, dtype=torch.float32).requires_grad_(True)
    n = 2 * _MEM_B
    rec = _LargestAllocation()
    with rec:
        fn(f, backend).backward()
    # O(N·D) buffers, one chunk of the torch backend, or the user's own [B, B] mask.
    allowed = max(4 * n * _MEM_D, 2 * _CHUNK, user_size)
    assert allowed < n * n // 3  # N×N = 262144; allowed: 32768, or 65536 with the mask
    assert rec.largest <= allowed, f"largest tensor {rec.largest} > {allowed}"


# ---------------------------------------------------------------------------------------------
# The torch backend at N = 2048 (its chunk: 65536 elements).


def test_torch_backend_peak_is_one_chunk(monkeypatch):
    """The largest temporary is one chunk (chunk_rows × M), not N × M."""
    n, d = 2048, 16
    monkeypatch.setenv("FLASHCON_TORCH_CHUNK_ELEMS", str(1 << 16))
    f = torch.randn(n // 2, 2, d, requires_grad=True)
    y = torch.randint(0, 10, (n // 2,))
    rec = _LargestAllocation()
    with rec:
        flashcon.supcon_loss(f, y, backend="torch").backward()
    assert rec.largest <= max(n * d, 1 << 16) * 2, rec.largest
    assert rec.largest < n * n // 8


# ---------------------------------------------------------------------------------------------
# The Triton backend (its interpreter without a GPU): nothing N×M, in forward or backward.


def test_triton_no_n_by_m_allocation():
    # Only the triton package itself may be missing; an import error in flashcon's kernels fails.
    pytest.importorskip("triton")
    from flashcon.triton_kernels import lse_launch

    # N = M = 512: an N×M tensor (262 144 elements) is 4× the bound (4·N·D), and the 16-bit
    # tiles give 8 row blocks (N = 2048 took ~110 s in the interpreter).
    n_b, v, d = 256, 2, 32
    n = n_b * v
    # fp16 takes the large 16-bit tiles: a quarter of fp32's interpreted programs.
    x = torch.nn.functional.normalize(torch.randn(n_b, v, d), dim=-1).to(DEVICE, torch.float16)
    x.requires_grad_(True)
    y = torch.randint(0, 50, (n_b,)).to(DEVICE)
    rec = _LargestAllocation()
    with rec:
        flashcon.supcon_loss(x, y, backend="triton").backward()
    # The launchers run inside the ops; record them too (their allocations are the kernels').
    with rec:
        z = x.detach().reshape(n, d)
        lab = y.repeat(v)
        lse, _, _ = lse_launch.lse_fwd(z, z, lab, lab, 0, 10.0, 1.0, 1.0, 5.0)
        lse_launch.lse_bwd(lse, lse, z, z, lab, lab, lse, 0, 10.0, 1.0, 1.0, 5.0)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert rec.largest <= 4 * n * d, (
        f"largest tensor has {rec.largest} elements (from {rec.where}); N·D = {n * d}, "
        f"N·M = {n * n}"
    )
