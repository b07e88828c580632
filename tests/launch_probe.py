"""Records every Triton launch the launchers make and runs torch's access analysis on it.

Run as a script (``tests/test_launch_args.py`` does, in a subprocess): the kernels must be
plain ``JITFunction``s, so ``TRITON_INTERPRET`` must be unset, and Triton's active driver is
replaced by one that only names a GPU target (the analysis generates TTIR, it runs nothing).
Prints one JSON object: the launches analysed and the problems found.

The property checked is the one torch.compile relies on when it functionalises a
``wrap_triton`` launch (``torch._higher_order_ops.triton_kernel_wrap``): it clones each
argument the analysis reports written, runs the kernel on the clones and copies every clone
back. So (a) every buffer a launcher reads back must be reported written (else the kernel's
results are dropped), and (b) no argument reported written may share storage with another
argument (else one clone's copy-back overwrites the other's: the loss was 0 on a GPU), and
(c) no input is reported written (a copy per call for nothing, and (b) waiting to happen: the
analysis traces a stored address back through a called ``@triton.jit`` function's result to
every argument of that call, so an address built from a helper's result marks its inputs).
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

ARCH = int(os.environ.get("PROBE_ARCH", "90"))


class _TargetOnly:
    """Triton driver stand-in: the analysis only asks which target to generate TTIR for."""

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def __getattr__(self, name):
        raise RuntimeError(f"no GPU here: the analysis asked the driver for {name!r}")


triton.runtime.driver.set_active(_TargetOnly())

from torch._higher_order_ops import triton_kernel_wrap as TKW  # noqa: E402

from flashcon.triton_kernels import fused_launch, lse_launch, sym_launch  # noqa: E402

LAUNCHERS = (lse_launch, sym_launch, fused_launch)

# What each kernel's launcher reads back after the launch (pointer parameter names).
OUTPUTS = {
    "_lse_fwd_kernel": ("lse_ptr", "psum_ptr", "pcnt_ptr"),
    "_sp_fwd_kernel": ("sp_ptr", "r_ptr"),
    "_bwd_dq_kernel": ("dq_ptr",),
    "_bwd_dk_kernel": ("dk_ptr",),
    "_sym_fwd_kernel": ("out_ptr",),
    "_sym_bwd_kernel": ("dz_ptr",),
    "_prep_kernel": ("part_ptr", "sums_ptr", "lab_ptr"),
    "_plan_kernel": ("plan_ptr", "gate_ptr", "out_ptr"),
    "_bwd_prep_kernel": ("vec_ptr", "gate_ptr", "dz_ptr"),
    "_bwd_finish_kernel": ("out_ptr",),
}


def outputs(name: str, const: dict) -> tuple[str, ...]:
    if name == "_finish_kernel":
        if const["LOSS"] == 1 and const["STAGE"] == 0:  # SINCERE's η: zeroes the sp sums
            return ("stats_ptr", "zero_ptr")
        return ("stats_ptr", "out_ptr", "plan_ptr")
    return OUTPUTS[name]


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg", "num_ctas")

_records: list[tuple] = []


class _Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _records.append((self.kernel, args, kwargs))

        return launch


for _mod in LAUNCHERS:
    _mod.wrap_triton = _Recorder  # each launcher looks the name up in its module at call time


def _written(kernel, kwargs: dict) -> list[str]:
    """Names of the tensor arguments torch's analysis reports written (both entry points)."""
    if hasattr(TKW, "identify_accessed_tensors"):
        acc = TKW.identify_accessed_tensors(kernel, kwargs, {})
        names = [dep.name for dep in acc.read_writes.writes]
    else:  # older torch
        fn = TKW.identify_mutated_tensors
        extra = ({},) if len(inspect.signature(fn).parameters) > 2 else ()
        names = list(fn(kernel, kwargs, *extra))
    return [n for n in names if isinstance(kwargs.get(n), torch.Tensor)]


class _Fallback(logging.Handler):
    """The analysis falls back to "every argument written" with a warning on any exception:
    such a result proves nothing, so it is a failure here."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _inputs(n, d, dtype, mode):
    g = torch.Generator().manual_seed(n + d)
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    lab = torch.randint(0, 4, (n,), generator=g)
    pw = torch.rand(3, 5, generator=g) if mode == "pos_weight" else None
    return z, lab, pw


def record_all() -> None:
    """Every launcher over the flag space the loss paths and the Triton tests reach."""
    vec = lambda n: torch.rand(n)  # noqa: E731
    for dtype, d, mode, k1, det in itertools.product(
        (torch.float32, torch.bfloat16),
        (32, 33),  # EVEN_D and masked D tails
        ("labels", "multilabel", "pos_weight"),
        (0.0, 5.0),
        (False, True),  # use_deterministic_algorithms: the symmetric launchers step aside
    ):
        torch.use_deterministic_algorithms(det)
        n = 40
        z, lab, pw = _inputs(n, d, dtype, mode)
        ml = mode == "multilabel"
        k, klab = _inputs(24, d, dtype, mode)[:2]
        w = (1.0, 2.0, k1)
        for off in (-1, 0, 3):
            lse_launch.lse_fwd(z, k, lab, klab, off, 5.0, *w, ml, pos_weight=pw)
            lse_launch.lse_bwd(
                vec(n), vec(n), z, k, lab, klab, vec(n), off, 5.0, *w, ml, pos_weight=pw
            )
            if pw is None and k1 == 0:
                lse_launch.sp_fwd(z, k, lab, klab, vec(n), off, 5.0, ml)
                lse_launch.sp_bwd(vec(n), z, k, lab, klab, vec(n), off, 5.0, ml)
        sym_launch.sym_lse_fwd(z, lab, 5.0, *w, ml, pos_weight=pw)
        sym_launch.sym_lse_bwd(vec(n), vec(n), z, lab, vec(n), 5.0, *w, ml, pos_weight=pw)
        if pw is None and k1 == 0:
            sym_launch.sym_sp_fwd(z, lab, vec(n), 5.0, ml)
            sym_launch.sym_sp_bwd(vec(n), z, lab, vec(n), 5.0, ml)
        if pw is None and not det:  # the fused losses (fused.py)
            for loss, wk in (("out", w), ("sincere", (0.0, 1.0, 0.0))):
                if loss == "sincere" and k1 > 0:
                    continue
                # Per-sample labels of 20 samples × 2 views: class ids, multi-hot or none.
                labels = torch.rand(20, 5) < 0.4 if ml else lab[:20]
                for lab_in in (labels, None) if not ml else (labels,):
                    value, stats, plan, gates, rows = fused_launch.fused_fwd(
                        z, lab_in, 2, loss, 5.0, *wk, ml, 0.1
                    )
                    fused_launch.fused_bwd(
                        torch.rand(()), z, rows, stats, plan, gates, loss, 5.0, *wk, ml, 0.1
                    )
    torch.use_deterministic_algorithms(False)


def analyse() -> dict:
    handler = _Fallback()
    logging.getLogger(TKW.__name__).addHandler(handler)
    problems: list[str] = []
    seen: dict[tuple, list[str]] = {}
    kernels = set()
    for kernel, args, kwargs in _records:
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        kernels.add(name)
        params = dict(zip(kernel.arg_names, args))
        const = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
        kw = {**params, **const}
        # One analysis per specialisation (constexpr flags and pointer dtypes).
        key = (
            name,
            tuple(sorted((k, v) for k, v in const.items())),
            tuple(str(v.dtype) for v in params.values() if isinstance(v, torch.Tensor)),
        )
        if key not in seen:
            handler.messages.clear()
            seen[key] = _written(kernel, kw)
            if handler.messages:
                problems.append(f"{name} {const}: analysis fell back: {handler.messages[0]}")
        written = seen[key]
        for out in outputs(name, const):
            if out not in written:
                problems.append(f"{name} {const}: output {out} not reported written {written}")
        tensors = {k: v for k, v in params.items() if isinstance(v, torch.Tensor)}
        for w in written:
            if w not in outputs(name, const):
                problems.append(f"{name} {const}: input {w} reported written")
            ptr = tensors[w].untyped_storage().data_ptr()
            for other, t in tensors.items():
                if other != w and t.untyped_storage().data_ptr() == ptr:
                    problems.append(
                        f"{name} {const}: written argument {w} shares storage with {other}"
                    )
    return {
        "launches": len(_records),
        "analyses": len(seen),
        "kernels": sorted(kernels),
        "problems": sorted(set(problems)),
    }


if __name__ == "__main__":
    record_all()
    json.dump(analyse(), sys.stdout)
