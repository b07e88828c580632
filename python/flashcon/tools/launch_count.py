"""Count the device operations a call issues: Triton launches plus the ATen ops that would
launch a kernel, and the host synchronisations.

At small N a loss step on a GPU costs what its launches cost (each ~5 µs of host time and a
kernel of its own), so the count is a property worth guarding without a GPU: the host code
is the same under ``TRITON_INTERPRET=1`` on CPU tensors as on a GPU.

How ops are counted (a ``TorchDispatchMode``, which sees every ATen op below autograd, forward
and backward):

- free: views and aliases (``OpOverload.is_view``, ``_unsafe_view``, ``detach``, ``alias``,
  ``lift_fresh``) and allocations (``empty*``, ``new_empty*``): no kernel;
- a host synchronisation: ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``),
  ``nonzero`` and friends (their output size is data-dependent);
- every other ATen op is one device operation (a fill, a copy, an elementwise op, a reduction);
- ``flashcon::`` custom ops are looked through (their Python implementation runs under the
  mode); each Triton kernel launch of the launchers (``flashcon.triton_kernels``'s
  ``lse_launch``, ``sym_launch`` and ``fused_launch``) is one device operation, and what the
  interpreter does to run it is not counted.

    python -m flashcon.tools.launch_count                     # on a GPU machine
    TRITON_INTERPRET=1 python -m flashcon.tools.launch_count  # without one

(the four 'all'-mode losses, B = 64, V = 2, D = 32, forward + backward).
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FREE = {
    "_unsafe_view",
    "alias",
    "detach",
    "lift_fresh",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
}
SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.inside_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "flashcon":
            from torch._library.custom_ops import _maybe_get_opdef

            opdef = _maybe_get_opdef(func)
            if opdef is not None:  # a Python op: count what it does
                with self:
                    return opdef._init_fn(*args, **kwargs)
            self.ops[f"flashcon::{func.overloadpacket.__name__}"] += 1  # a C++ op
            return func(*args, **kwargs)
        if not self.inside_launch:
            name = func.overloadpacket.__name__
            if name in SYNC:
                self.syncs[name] += 1
            elif not (func.is_view or name in FREE):
                self.ops[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def _count_launches(counter: _Counter) -> Iterator[None]:
    """Count each launch of the Triton launchers as one operation (and nothing inside it)."""
    # The modules that launch: a tree from before the launchers were split by trade (the cost
    # model counts such trees) has one, ``launch``. It is looked for first: under an editable
    # install a module the counted tree lacks resolves to this checkout's.
    try:
        from flashcon.triton_kernels import launch

        launchers = (launch,)
    except ImportError:
        try:
            from flashcon.triton_kernels import fused_launch, lse_launch, sym_launch
        except ImportError:
            yield
            return
        launchers = (lse_launch, sym_launch, fused_launch)
    saved = [mod.wrap_triton for mod in launchers]
    real = saved[0]

    def wrap(kernel):
        wrapped = real(kernel)
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        class _Grid:
            def __getitem__(self, grid):
                run = wrapped[grid]

                def launch_(*a, **kw):
                    counter.ops[f"triton:{name}"] += 1
                    counter.inside_launch += 1
                    try:
                        return run(*a, **kw)
                    finally:
                        counter.inside_launch -= 1

                return launch_

        return _Grid()

    # Each launcher looks ``wrap_triton`` up in its own module when it launches.
    for mod in launchers:
        mod.wrap_triton = wrap
    try:
        yield
    finally:
        for mod, own in zip(launchers, saved):
            mod.wrap_triton = own


def count_device_ops(fn: Callable[[], object]) -> tuple[collections.Counter, collections.Counter]:
    """(device operations by name, host synchronisations by name) of one call of ``fn``."""
    counter = _Counter()
    with _count_launches(counter), counter:
        fn()
    return counter.ops, counter.syncs


def loss_step(
    name: str, labels: str = "classes", b: int = 64, v: int = 2, d: int = 32
) -> Callable[[], None]:
    """One forward + backward of loss ``name`` ('supcon', 'ntxent', 'sincere', 'tcl') on
    backend='triton', 'all' mode, with class ids or ``labels='multi-hot'`` [B, 5] labels."""
    import flashcon

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(b, v, d, generator=g), dim=-1)
    f = f.to(dev).requires_grad_(True)
    if labels == "multi-hot":
        lab = (torch.rand(b, 5, generator=g) < 0.3).to(dev)
    else:
        lab = torch.randint(0, 10, (b,), generator=g).to(dev)
    call = {
        "supcon": lambda: flashcon.supcon_loss(f, lab, backend="triton"),
        "ntxent": lambda: flashcon.ntxent_loss(f, backend="triton"),
        "sincere": lambda: flashcon.sincere_loss(f, lab, backend="triton"),
        "tcl": lambda: flashcon.tcl_loss(f, lab, backend="triton"),
    }[name]
    return lambda: call().backward()


def main() -> int:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        # The switch is read when the kernels are decorated, at ``import flashcon``.
        print("no CUDA device: run with TRITON_INTERPRET=1 (the kernels then run on the CPU)")
        return 2
    for name in ("supcon", "ntxent", "sincere", "tcl"):
        step = loss_step(name)
        step()  # the first call compiles/imports; count the second
        ops, syncs = count_device_ops(step)
        print(f"{name}: {sum(ops.values())} device operations, {sum(syncs.values())} host syncs")
        for op, k in ops.most_common():
            print(f"  {k:4d}  {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
