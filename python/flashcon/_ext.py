"""Lazy loading of the compiled extension ``flashcon._C``.

A missing extension is normal (``FLASHCON_SKIP_EXT=1`` builds, source checkouts): the torch
backend serves. An extension that exists but fails to load is reported with a warning naming
the torch and CUDA versions it needs, never silently replaced.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

_state: dict[str, object] = {}


def load() -> bool:
    """Import ``flashcon._C`` once (registering its ops); True when it is usable."""
    if "ok" in _state:
        return bool(_state["ok"])
    spec = importlib.util.find_spec("flashcon._C")
    if spec is None:
        _state.update(ok=False, why="it was not built (install without FLASHCON_SKIP_EXT)")
        return False
    try:
        from . import _C  # noqa: F401  (importing registers the flashcon:: ops)
    except (ImportError, OSError) as e:
        why = (
            f"flashcon._C exists but failed to load: {e}. It must be built against the torch "
            f"you run (torch {torch.__version__}, CUDA {torch.version.cuda}); rebuild with "
            "`pip install --no-build-isolation -e .`"
        )
        warnings.warn(why, RuntimeWarning, stacklevel=2)
        _state.update(ok=False, why=why)
        return False
    _state.update(ok=True, why="")
    return True


def why_unavailable() -> str:
    load()
    return str(_state.get("why", ""))


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    if not load():
        return False
    return bool(torch.ops.flashcon.has_cuda())
