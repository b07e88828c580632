"""The prediction a cost-model report (``--json``) holds for a measured point.

Standard library only and no relative imports: ``tools/gpu_check.py`` loads this file by path,
without importing the flashcon package (which imports torch).
"""

from __future__ import annotations

# torch's dtype names to the report's.
DTYPE_SHORT = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def predicted_ms(report: dict, loss: str, dtype: str, n: int, device_name: str) -> float | None:
    """The prediction of a ``--json`` report for a measured point (``device_name`` as torch
    names the GPU, e.g. "NVIDIA H200": the report's GPU whose name it holds), or None: for
    ``make gpu-check`` to print beside it."""
    dtype = DTYPE_SHORT.get(dtype, dtype)
    for r in report.get("predictions", []):
        if (r["loss"], r["dtype"], r["n"]) == (loss, dtype, n) and r["gpu"] in device_name:
            return r["ms"]
    return None
