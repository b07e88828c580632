"""The streaming engine: its contract, its ``torch.library`` ops and backend dispatch.

Contract (every backend implements exactly these four functions)
----------------------------------------------------------------
Anchors ``q [N, D]`` with labels ``qlab [N]`` (int64) against columns ``k [M, D]`` with labels
``klab [M]``. Column j is anchor i's own column when ``self_offset >= 0`` and
``j == i + self_offset``; it is excluded from everything. Every other column has a *positive
weight* m_ij >= 0 and is a *positive* (j ∈ P(i)) when m_ij > 0, a *negative* (j ∈ N(i))
otherwise:

- class labels (``multilabel=False``, ``pos_weight=None``): m_ij = [qlab_i == klab_j];
- multi-label (``multilabel=True``): labels are int64 bitmasks, m_ij = [(qlab_i & klab_j) != 0];
- ``pos_weight`` ``[Bq, Bk]`` given: m_ij = pos_weight[i mod Bq, j mod Bk] and labels are
  ignored (SupContrast's ``mask``, tiled over the views; read per tile, never expanded).

``s_ij = q_i·k_j`` is accumulated in the statistics dtype (float64 for float64 inputs,
float32 otherwise). The last two arguments of every function are ``multilabel: bool`` and
``pos_weight: Tensor | None``.

``lse_fwd(q, k, qlab, klab, self_offset, scale, w_pos, w_neg, k1, ...) -> (lse, psum, pcnt)``
    lse_i  = log( Σ_{j∈P(i)} m_ij·[w_pos·e^{scale·s_ij} + k1·e^{−s_ij}]
                  + Σ_{j∈N(i)} w_neg·e^{scale·s_ij} )
             (−inf when the sum has no term: every weight of the row's columns is 0);
    psum_i = Σ_j m_ij·s_ij;  pcnt_i = Σ_j m_ij  (|P(i)| for labels).
    One masked, max-shifted online log-sum-exp covers SupCon's LSE over A(i) (1, 1, 0),
    L_in's LSE over positives (1, 0, 0), SINCERE's η over negatives (0, 1, 0) and TCL's
    partition function (1, k2, k1); psum/pcnt give the closed-form target terms.
``lse_bwd(g_lse, g_psum, q, k, qlab, klab, lse, self_offset, scale, w_pos, w_neg, k1, ...)``
    -> (dq, dk) with
    G_ij = g_lse_i·e^{−lse_i}·( c_ij·scale·e^{scale·s_ij} − [j∈P(i)]·m_ij·k1·e^{−s_ij} )
           + g_psum_i·m_ij,    with c_ij = w_pos·m_ij on P(i), w_neg on N(i);
    rows with lse_i = −inf have no terms and get no gradient. dq = G·k, dk = Gᵀ·q.
``sp_fwd(q, k, qlab, klab, eta, self_offset, scale, ...) -> (sp, r)``
    sp_i = Σ_{j∈P(i)} m_ij·softplus(eta_i − scale·s_ij),
    r_i  = Σ_{j∈P(i)} m_ij·σ(eta_i − scale·s_ij)   (SINCERE's second pass; r_i = ∂sp_i/∂eta_i).
``sp_bwd(g_sp, q, k, qlab, klab, eta, self_offset, scale, ...) -> (dq, dk)``
    G_ij = −g_sp_i·scale·m_ij·σ(eta_i − scale·s_ij);  dq = G·k, dk = Gᵀ·q.

Symmetric path (optional per backend; issue "half the work in 'all' mode")
    ``sym_lse_fwd(z, lab, scale, w_pos, w_neg, k1, multilabel, pos_weight)``,
    ``sym_lse_bwd(g_lse, g_psum, z, lab, lse, scale, w_pos, w_neg, k1, multilabel,
    pos_weight) -> dz``, ``sym_sp_fwd(z, lab, eta, scale, multilabel, pos_weight)`` and
    ``sym_sp_bwd(g_sp, z, lab, eta, scale, multilabel, pos_weight) -> dz`` are the same
    functions with q = k = z, qlab = klab = lab, self_offset = 0 and dz = dq + dk. Because
    s_ij = s_ji, a backend computes each unordered tile pair once (4·N²·D flops for
    forward + backward instead of 8·N²·D). ``torch_stream.sym_*`` state them executably.
    Backends with such ops: the C++ CPU kernels (``flashcon::sym_*``, deterministic) and
    Triton (``flashcon::triton_sym_*``, ``triton_kernels/sym.py``, atomic adds; the general
    kernels under ``torch.use_deterministic_algorithms``).

Fused whole losses (optional per backend; Triton's ``flashcon::triton_fused_fwd``)
    ``fused(z, labels, views, loss, scale, w_pos, w_neg, k1, multilabel, weight) -> (value,
    stats, plan, gates, rows' labels)``: a whole 'all'-mode loss from the symmetric path in a
    few launches, for the losses whose per-row term is closed-form in the statistics. ``z``
    is view-major with ``views`` views of B samples; ``labels`` are the samples' (int64 [B],
    multi-hot bool [B, L], or None for sample ids), expanded over the views by the op.
    ``loss='out'`` gives (weight/N)·Σ_i [pcnt_i > 0]·(lse_i − scale·psum_i/pcnt_i) (lse with
    weights (w_pos, w_neg, k1); −inf lse counts 0): SupCon L_out, NT-Xent, TCL;
    ``loss='sincere'`` gives (weight/N)·Σ_i sp_i/max(pcnt_i, 1) with eta the lse of weights
    (0, 1, 0). NaN when any row of z is non-finite. Differentiable in ``value`` (the other
    outputs are the backward's inputs). Not used with masks, queues, gathering, or
    deterministic algorithms (checked when the forward runs: the backward of a loss computed
    before ``torch.use_deterministic_algorithms(True)`` still uses atomics).

Gradients reach q and k only (labels and weights get none; eta's producer is reached through
autograd via r). Every output is O(N + M); nothing N×M exists in any backend. ``dq``/``dk``
have the dtype of ``q``/``k``; statistics have the statistics dtype.

Each backend registers the four functions as ops (``flashcon::<backend>_lse_fwd`` …, or the
C++ ``flashcon::lse_fwd`` dispatched by device); ``flashcon.registration`` connects
each forward op to its backward op, and :func:`get_engine` returns the pair of differentiable
callables the losses use.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from .backends import torch_stream
from .registration import (
    interpreting,
    register_backend_autograd,
    register_fakes,
    register_symmetric,
)

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "reference")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Engine:
    """The four engine ops of one backend (already connected to autograd)."""

    name: str
    lse: Callable[..., tuple[Tensor, Tensor, Tensor]]
    sp: Callable[..., tuple[Tensor, Tensor]]
    sym_lse: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None
    sym_sp: Callable[..., tuple[Tensor, Tensor]] | None = None
    fused: Callable[..., tuple[Tensor, ...]] | None = None
    # The symmetric ops combine tile pairs with atomic adds (not bitwise reproducible).
    sym_atomic: bool = False


_SYMMETRIC = os.environ.get("FLASHCON_SYMMETRIC", "1") != "0"


def set_symmetric(enabled: bool) -> None:
    """Use (default) or bypass the backends' symmetric 'all'-mode path (for comparisons).

    Also settable with the environment variable ``FLASHCON_SYMMETRIC=0`` at import.

    Args:
        enabled: ``True`` to use the symmetric path where a backend has one.
    """
    global _SYMMETRIC
    _SYMMETRIC = bool(enabled)


def symmetric_enabled() -> bool:
    """Whether 'all'-mode losses take the backends' symmetric path (see :func:`set_symmetric`)."""
    return _SYMMETRIC


# --------------------------------------------------------------------------------------------
# backend='torch': the chunked PyTorch implementation as opaque custom ops.
# --------------------------------------------------------------------------------------------


# The chunked PyTorch functions are the ops themselves: their annotations are the schema.
_TORCH_OPS = tuple(
    torch.library.custom_op(f"flashcon::torch_{fn.__name__}", fn, mutates_args=())
    for fn in (torch_stream.lse_fwd, torch_stream.lse_bwd, torch_stream.sp_fwd, torch_stream.sp_bwd)
)
register_fakes(*_TORCH_OPS)
register_backend_autograd(*_TORCH_OPS)


# --------------------------------------------------------------------------------------------
# Backend discovery and selection.
# --------------------------------------------------------------------------------------------


# Discovery runs once. The C++ extension is discovered when flashcon is imported. Triton
# (whose ops import Triton and Inductor: seconds and ~150 MB) is discovered at import where
# it can run — a GPU is visible, the interpreter is on, or Triton is already imported — and
# otherwise on first demand (a CUDA tensor, backend='triton', flashcon.info), which on a
# machine without a GPU is never inside a torch.compile trace of a real run.
_OPS: dict[str, tuple | None] = {"torch": None}
_SYM_OPS: dict[str, tuple | None] = {}
_FUSED_OPS: dict[str, Callable] = {}
_WHY: dict[str, str] = {}
_CPP_HAS_CUDA = False


def _discover_cpp() -> None:
    global _CPP_HAS_CUDA
    from . import _ext

    if not _ext.load():
        _OPS["cpp"] = None
        _WHY["cpp"] = f"the C++ extension flashcon._C is not available: {_ext.why_unavailable()}"
        return
    ops = torch.ops.flashcon
    fwd_bwd = (ops.lse_fwd.default, ops.lse_bwd.default, ops.sp_fwd.default, ops.sp_bwd.default)
    register_fakes(*fwd_bwd)
    register_backend_autograd(*fwd_bwd)
    _OPS["cpp"] = fwd_bwd
    if hasattr(ops, "sym_lse_fwd"):
        sym = (
            ops.sym_lse_fwd.default,
            ops.sym_lse_bwd.default,
            ops.sym_sp_fwd.default,
            ops.sym_sp_bwd.default,
        )
        register_symmetric(*sym)
        _SYM_OPS["cpp"] = sym
    _CPP_HAS_CUDA = _ext.has_cuda_kernels()


def _discover_triton() -> None:
    if "triton" in _OPS:
        return
    _OPS["triton"] = None
    try:
        import triton  # noqa: F401
    except ImportError as e:
        _WHY["triton"] = f"triton is not installed ({e}); pip install triton"
        return
    try:
        from .triton_kernels import ops as tops
    except ImportError as e:
        _WHY["triton"] = f"flashcon.triton_kernels could not be imported: {e}"
        return
    _OPS["triton"] = tops.OPS
    _SYM_OPS["triton"] = tops.SYM_OPS
    _FUSED_OPS["triton"] = tops.fused_fwd_op


def _triton_wanted_at_import() -> bool:
    if "triton" in sys.modules or interpreting():
        return True
    try:
        return torch.cuda.is_available()  # the device count: no CUDA context is created
    except Exception:  # noqa: BLE001 - a broken driver means no GPU here, not a broken import
        return False


def triton_available() -> tuple[bool, str]:
    """(True, '') when the Triton kernels imported, else (False, why). Imports them on the
    first call where they were not imported with flashcon (no GPU visible)."""
    _discover_triton()
    if _OPS.get("triton") is None:
        return False, _WHY.get("triton", "not discovered")
    return True, ""


def cpp_available(device_type: str) -> tuple[bool, str]:
    """(True, '') when the C++ extension has kernels for ``device_type``, else (False, why).

    Args:
        device_type: ``'cpu'`` or ``'cuda'``.
    """
    if _OPS.get("cpp") is None:
        return False, _WHY.get("cpp", "not discovered")
    if device_type == "cuda" and not _CPP_HAS_CUDA:
        return False, "flashcon._C was built without CUDA kernels (see setup.py's switches)"
    return True, ""


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` ('auto' or a name) to a concrete backend for tensors on ``device``.

    'auto' picks, for CUDA tensors, Triton if it imports, else the CUDA extension, else
    'torch'; for CPU tensors the C++ CPU kernels if built, else 'torch'. Touches no GPU.

    Args:
        backend: one of :data:`BACKENDS`.
        device: the device of the loss's tensors.

    Raises:
        ValueError: an unknown name.
        BackendUnavailableError: a named backend that cannot run there, saying why.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
        )
    dev = device.type
    if backend == "auto":
        if dev == "cuda":
            if triton_available()[0]:
                return "triton"
            if cpp_available("cuda")[0]:
                return "cuda"
            return "torch"
        if dev == "cpu" and cpp_available("cpu")[0]:
            return "cpu"
        return "torch"
    if backend in ("reference", "torch"):
        return backend
    if backend == "triton":
        ok, why = triton_available()
        if not ok:
            raise BackendUnavailableError(f"backend='triton' is unavailable: {why}")
        if dev != "cuda" and not interpreting():
            raise BackendUnavailableError(
                f"backend='triton' needs CUDA tensors (got {dev}); set TRITON_INTERPRET=1 to "
                "run the kernels on the CPU through Triton's interpreter"
            )
        return backend
    if backend == "cuda":
        if dev != "cuda":
            raise BackendUnavailableError(f"backend='cuda' needs CUDA tensors, got {dev} tensors")
        ok, why = cpp_available("cuda")
        if not ok:
            raise BackendUnavailableError(f"backend='cuda' is unavailable: {why}")
        return backend
    # backend == "cpu"
    if dev != "cpu":
        raise BackendUnavailableError(f"backend='cpu' needs CPU tensors, got {dev} tensors")
    ok, why = cpp_available("cpu")
    if not ok:
        raise BackendUnavailableError(f"backend='cpu' is unavailable: {why}")
    return backend


def get_engine(backend: str) -> Engine:
    """The differentiable engine callables of a concrete backend name.

    Args:
        backend: ``'triton'``, ``'cuda'``, ``'cpu'`` or ``'torch'`` (not ``'auto'`` or
            ``'reference'``: resolve those with :func:`resolve_backend` first).
    """
    key = {"torch": "torch", "cpu": "cpp", "cuda": "cpp", "triton": "triton"}.get(backend)
    if key is None:
        raise ValueError(f"no streaming engine for backend {backend!r}")
    if key == "triton":
        _discover_triton()
    ops = _OPS.get(key)
    if ops is None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable")
    sym = _SYM_OPS.get(key)
    return Engine(
        name=backend,
        lse=ops[0],
        sp=ops[2],
        sym_lse=sym[0] if sym else None,
        sym_sp=sym[2] if sym else None,
        fused=_FUSED_OPS.get(key),
        sym_atomic=key == "triton",
    )


@dataclasses.dataclass(frozen=True)
class Route:
    """How one loss call runs, decided once by :func:`route`.

    ``engine`` is None for ``'reference'`` (the dense oracle computes the loss); ``symmetric``:
    'all'-mode streams (the anchors are the columns) take the engine's symmetric ops;
    ``fused``: the whole loss is the engine's fused op."""

    backend: str
    engine: Engine | None
    symmetric: bool
    fused: bool

    def lse(
        self, q, k, qlab, klab, self_offset: int, scale: float, weights, multilabel=False,
        pos_weight=None,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """The contract's ``lse_fwd`` with ``weights`` = (w_pos, w_neg, k1): the symmetric op
        where this call is 'all' mode (the same tensors as anchors and columns)."""
        eng = _streaming(self)
        if self.symmetric and q is k and qlab is klab and self_offset == 0:
            return eng.sym_lse(
                q.contiguous(), qlab.contiguous(), scale, *weights, multilabel, pos_weight
            )
        return eng.lse(
            q.contiguous(), k.contiguous(), qlab.contiguous(), klab.contiguous(), self_offset,
            scale, *weights, multilabel, pos_weight,
        )  # fmt: skip

    def sp(self, q, k, qlab, klab, eta, self_offset: int, scale: float, multilabel=False):
        """The contract's ``sp_fwd`` (SINCERE's second pass), symmetric where it applies."""
        eng = _streaming(self)
        if self.symmetric and q is k and qlab is klab and self_offset == 0:
            return eng.sym_sp(q.contiguous(), qlab.contiguous(), eta, scale, multilabel, None)
        return eng.sp(
            q.contiguous(), k.contiguous(), qlab, klab, eta, self_offset, scale, multilabel, None
        )


def _streaming(r: Route) -> Engine:
    if r.engine is None:
        raise ValueError(f"backend {r.backend!r} has no streaming engine")
    return r.engine


def route(
    backend: str, device: torch.device, *, all_mode: bool = True, extras: bool = False,
    fusable: bool = False,
) -> Route:  # fmt: skip
    """The one decision of which kernels compute a loss call.

    Reads the backend choice (:func:`resolve_backend`), the symmetric switch
    (:func:`set_symmetric`), ``torch.use_deterministic_algorithms`` (atomic symmetric ops
    step aside for the deterministic general kernels) and whether the loss may run as the
    engine's fused op: ``fusable`` (the loss has a fused form), 'all' mode (``all_mode``),
    and no mask, queue or gathering (``extras``).

    Args:
        backend: one of :data:`BACKENDS`.
        device: the device of the loss's tensors.
        all_mode: every embedding is an anchor against all the others (SupCon's 'all').
        extras: the call has a mask, a queue or distributed gathering.
        fusable: the loss has a whole-loss fused form (SupCon L_out, NT-Xent, SINCERE, TCL).
    """
    concrete = resolve_backend(backend, device)
    if concrete == "reference":
        return Route(concrete, None, False, False)
    eng = get_engine(concrete)
    deterministic = eng.sym_atomic and torch.are_deterministic_algorithms_enabled()
    symmetric = eng.sym_lse is not None and symmetric_enabled() and not deterministic
    fused = fusable and symmetric and eng.fused is not None and all_mode and not extras
    return Route(concrete, eng, symmetric, fused)


_OPS["torch"] = _TORCH_OPS
_discover_cpp()
if _triton_wanted_at_import():
    _discover_triton()
