"""README promises that no other test checks.

- the modules forward every option (and ``queue=``) to the functional losses;
- multi-hot labels and queues on the C++ CPU and Triton (interpreter) backends, every loss;
- ``gather_distributed`` with multi-hot labels, with a queue, with ``group=``, under
  ``torch.compile``, and its refusal of ``mask=`` (two gloo processes);
- ``FLASHCON_SYMMETRIC=0`` turns the symmetric path off; ``backend='auto'`` is the C++ CPU
  backend for CPU tensors;
- multi-label ESupCon up to 64 prototypes, and a clear error above;
- masks and multi-hot labels in fp16 and bf16;
- ``torch.compile(fullgraph=True)`` with a mask or a queue;
- bitwise determinism of the CPU backend: the symmetric path at 1 and 2 threads, every path
  run to run;
- no N×N tensor for any loss, mask, soft labels, prototypes or queue (largest allocation).

Run as a script (``python tests/test_promises.py --rank R ...``) this file is the worker of the
distributed test, so that the worker needs no importable test module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashcon
from flashcon import MemoryQueue
from flashcon import reference as R
from flashcon.testing import assert_close, available_backends

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import oracle as O  # noqa: E402

DT = torch.float64
CPU = available_backends("cpu")
TRITON = available_backends("triton")
STREAMING = ["torch", *CPU]


def _unit(*shape: int, seed: int, dtype: torch.dtype = DT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=DT), dim=-1)
    return f.to(dtype)


def _multihot(b: int, n_labels: int, seed: int, density: float = 0.4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n_labels, generator=g) < density


def _grad(value: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(value, leaves)


# ---------------------------------------------------------------------------------------------
# Modules forward their options.

B, V, D = 6, 2, 5
_F = _unit(B, V, D, seed=1)
_Y = torch.tensor([0, 1, 0, 2, 1, 1])
_SOFT = torch.rand(B, 3, generator=torch.Generator().manual_seed(2), dtype=DT)

# (module, functional, arguments after the features, one option with a non-default value)
MODULE_OPTIONS = [
    ("SupConLoss", "supcon_loss", (_Y,), {"temperature": 0.2}),
    ("SupConLoss", "supcon_loss", (_Y,), {"base_temperature": 0.3}),
    ("SupConLoss", "supcon_loss", (_Y,), {"contrast_mode": "one"}),
    ("SupConLoss", "supcon_loss", (_Y,), {"variant": "in"}),
    ("NTXentLoss", "ntxent_loss", (), {"temperature": 0.2}),
    ("SINCERELoss", "sincere_loss", (_Y,), {"temperature": 0.2}),
    ("GenSCLLoss", "genscl_loss", (_SOFT,), {"temperature": 0.2}),
    ("GenSCLLoss", "genscl_loss", (_SOFT,), {"base_temperature": 0.3}),
    ("TCLLoss", "tcl_loss", (_Y,), {"temperature": 0.2}),
    ("TCLLoss", "tcl_loss", (_Y,), {"k1": 3.0}),
    ("TCLLoss", "tcl_loss", (_Y,), {"k2": 2.0}),
    ("ESupConLoss", "esupcon_loss", (_Y,), {"temperature": 0.2}),
    ("ESupConLoss", "esupcon_loss", (_Y,), {"base_temperature": 0.3}),
    ("ESupConLoss", "esupcon_loss", (_Y,), {"prototype_anchors": False}),
]


def _module(name: str, options: dict, backend: str) -> torch.nn.Module:
    cls = getattr(flashcon, name)
    if name == "ESupConLoss":
        torch.manual_seed(5)
        return cls(3, D, dtype=DT, backend=backend, **options)
    return cls(backend=backend, **options)


def _functional(name: str, module: torch.nn.Module, args: tuple, **kw) -> torch.Tensor:
    fn = getattr(flashcon, name)
    if name == "esupcon_loss":
        return fn(_F, *args, module.prototypes, **kw)
    return fn(_F, *args, **kw)


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize(
    "module, functional, args, options",
    MODULE_OPTIONS,
    ids=[f"{m}-{next(iter(o))}" for m, _, _, o in MODULE_OPTIONS],
)
def test_module_forwards_option(module, functional, args, options, backend):
    crit = _module(module, options, backend)
    got = crit(_F, *args)
    same = _functional(functional, crit, args, backend=backend, **options)
    default = _functional(functional, crit, args, backend=backend)
    assert torch.equal(got, same)
    assert abs(float((got - default).detach())) > 1e-3, "the option did not change the loss"


@pytest.mark.parametrize(
    "module, functional, args",
    [
        ("SupConLoss", "supcon_loss", (_Y,)),
        ("NTXentLoss", "ntxent_loss", ()),
        ("SINCERELoss", "sincere_loss", (_Y,)),
        ("GenSCLLoss", "genscl_loss", (_SOFT,)),
        ("TCLLoss", "tcl_loss", (_Y,)),
        ("ESupConLoss", "esupcon_loss", (_Y,)),
    ],
)
def test_module_forwards_backend_and_queue(module, functional, args):
    q = MemoryQueue(8, D, dtype=DT, num_soft_classes=3 if module == "GenSCLLoss" else None)
    q.push(_unit(4, D, seed=9), _SOFT[:4] if module == "GenSCLLoss" else _Y[:4])
    crit = _module(module, {}, "reference")
    assert torch.equal(crit(_F, *args), _functional(functional, crit, args, backend="reference"))
    with_queue = crit(_F, *args, queue=q)
    assert torch.equal(
        with_queue, _functional(functional, crit, args, backend="reference", queue=q)
    )
    assert abs(float(with_queue - crit(_F, *args))) > 1e-3, "the queue was not used"


def test_supcon_module_all_options_together():
    opts = {"temperature": 0.2, "base_temperature": 0.3, "contrast_mode": "one", "variant": "in"}
    crit = flashcon.SupConLoss(**opts, backend="reference")
    assert torch.equal(crit(_F, _Y), R.supcon_loss(_F, _Y, **opts))
    assert abs(float(crit(_F, _Y) - O.supcon(_F, _Y, **opts))) < 1e-13


def test_esupcon_module_classifier():
    crit = flashcon.ESupConLoss(4, D, temperature=0.25, dtype=DT)
    z = _F[:, 0]
    u = torch.nn.functional.normalize(crit.prototypes.detach(), dim=1)
    logits = crit.logits(z)
    assert_close(logits, z @ u.T / 0.25, atol=1e-14, rtol=0, name="logits")
    assert torch.equal(crit.predict(z), (z @ u.T).argmax(dim=1))
    crit(_F, _Y).backward()
    assert crit.prototypes.grad is not None and crit.prototypes.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Multi-hot labels and queues beyond SupCon on the torch backend: the C++ CPU and Triton
# (interpreter) backends, float32, against the float64 reference on the same inputs.

# Measured (fp32, these inputs, cpu and triton): value error ≤ 7.4e-7 on losses up to 11,
# gradient error ≤ 1.1e-6; tolerances 5e-6 (value) and 1e-5 (gradient), 7× and 9× those.
FP32_TOL, FP32_GRAD_TOL = 5e-6, 1e-5


def _queue(kind: str, seed: int) -> MemoryQueue:
    if kind == "soft":
        q = MemoryQueue(12, D, num_soft_classes=3)
        q.push(_unit(5, 2, D, seed=seed, dtype=torch.float32), torch.rand(5, 3))
    elif kind == "multihot":
        q = MemoryQueue(12, D, multilabel=True)
        q.push(_unit(5, 2, D, seed=seed, dtype=torch.float32), _multihot(5, 4, seed))
    else:
        q = MemoryQueue(12, D)
        q.push(_unit(5, 2, D, seed=seed, dtype=torch.float32), torch.randint(0, 3, (5,)))
    return q


QUEUE_CASES = {
    "supcon": ("int", lambda m, f, y, p, q: m.supcon_loss(f, y, queue=q)),
    "supcon_in_one": (
        "int",
        lambda m, f, y, p, q: m.supcon_loss(f, y, queue=q, variant="in", contrast_mode="one"),
    ),
    "supcon_multihot": ("multihot", lambda m, f, y, p, q: m.supcon_loss(f, y, queue=q)),
    "ntxent": ("int", lambda m, f, y, p, q: m.ntxent_loss(f, queue=q)),
    "sincere": ("int", lambda m, f, y, p, q: m.sincere_loss(f, y, queue=q)),
    "sincere_multihot": ("multihot", lambda m, f, y, p, q: m.sincere_loss(f, y, queue=q)),
    "genscl": ("soft", lambda m, f, y, p, q: m.genscl_loss(f, y, queue=q)),
    "tcl": ("int", lambda m, f, y, p, q: m.tcl_loss(f, y, queue=q, k1=3.0, k2=2.0)),
    "tcl_multihot": (
        "multihot",
        lambda m, f, y, p, q: m.tcl_loss(f, y, queue=q, k1=3.0, k2=2.0),
    ),
    "esupcon": ("int", lambda m, f, y, p, q: m.esupcon_loss(f, y, p, queue=q)),
    "esupcon_multihot": ("multihot", lambda m, f, y, p, q: m.esupcon_loss(f, y, p, queue=q)),
}


def _labels(kind: str, seed: int):
    if kind == "soft":
        return torch.rand(B, 3, generator=torch.Generator().manual_seed(seed))
    if kind == "multihot":
        return _multihot(B, 4, seed)
    return torch.tensor([0, 1, 0, 2, 1, 0])


class _Backend:
    """``flashcon`` with ``backend=`` bound, used where the cases take a module."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __getattr__(self, name: str):
        fn = getattr(flashcon, name)
        return lambda *a, **kw: fn(*a, backend=self.backend, **kw)


@pytest.mark.parametrize("backend", [*CPU, *TRITON])
@pytest.mark.parametrize("case", list(QUEUE_CASES))
def test_queue_and_multihot_on_kernel_backends(case, backend):
    kind, fn = QUEUE_CASES[case]
    q = _queue(kind, seed=3)
    f = _unit(B, V, D, seed=4, dtype=torch.float32).requires_grad_(True)
    p = (1.5 * torch.randn(4, D, generator=torch.Generator().manual_seed(6))).requires_grad_(True)
    y = _labels(kind, seed=7)
    value = fn(_Backend(backend), f, y, p, q)
    f64 = f.detach().double().requires_grad_(True)
    p64 = p.detach().double().requires_grad_(True)
    y64 = y.double() if kind == "soft" else y
    q64 = MemoryQueue(
        12,
        D,
        dtype=DT,
        num_soft_classes=3 if kind == "soft" else None,
        multilabel=kind == "multihot",
    )
    q64.load_state_dict(q.state_dict())  # the same rows, in float64
    expected = fn(R, f64, y64, p64, q64)
    assert_close(value, expected, atol=FP32_TOL, rtol=0, name=f"{case} value")
    leaves = (f, p) if "esupcon" in case else (f,)
    leaves64 = (f64, p64) if "esupcon" in case else (f64,)
    for g, e in zip(_grad(value, *leaves), _grad(expected, *leaves64)):
        assert_close(g, e, atol=FP32_GRAD_TOL, rtol=0, name=f"{case} gradient")
    # The queue is used: without it the loss changes.
    assert abs(float(value) - float(fn(R, f64, y64, p64, None))) > 1e-3


# ---------------------------------------------------------------------------------------------
# gather_distributed: two gloo processes; ranks hold 3 and 5 samples.

DIST_SIZES = (3, 5)
DIST_K = 3


def _dist_inputs(rank: int) -> dict:
    b = DIST_SIZES[rank]
    return {
        "f": _unit(b, 2, D, seed=100 + rank),
        "y": torch.randint(0, DIST_K, (b,), generator=torch.Generator().manual_seed(200 + rank)),
        "mh": _multihot(b, DIST_K, 300 + rank),
        "soft": torch.rand(b, 3, generator=torch.Generator().manual_seed(400 + rank), dtype=DT),
    }


def _dist_queues() -> dict:
    """The same queues on every rank (as when each pushes the gathered batch)."""
    q_int, q_mh = MemoryQueue(8, D, dtype=DT), MemoryQueue(8, D, multilabel=True, dtype=DT)
    q_soft = MemoryQueue(8, D, num_soft_classes=3, dtype=DT)
    feats = _unit(4, D, seed=500)
    q_int.push(feats, torch.tensor([0, 1, 2, 1]))
    q_mh.push(feats, _multihot(4, DIST_K, 501))
    q_soft.push(feats, torch.rand(4, 3, generator=torch.Generator().manual_seed(502), dtype=DT))
    return {"int": q_int, "mh": q_mh, "soft": q_soft}


DIST_PROTOS = 1.5 * torch.randn(DIST_K, D, generator=torch.Generator().manual_seed(600), dtype=DT)

DIST_CASES = {
    "supcon_multihot": lambda x, p, q, **kw: flashcon.supcon_loss(x["f"], x["mh"], **kw),
    "supcon_in_one_multihot": lambda x, p, q, **kw: flashcon.supcon_loss(
        x["f"], x["mh"], variant="in", contrast_mode="one", **kw
    ),
    # SINCERE at τ = 0.2 keeps η − ℓ below 20, where the reference's softplus is exact
    # (tests/test_oracle.py::test_sincere_softplus_beyond_threshold).
    "sincere_multihot": lambda x, p, q, **kw: flashcon.sincere_loss(
        x["f"], x["mh"], temperature=0.2, **kw
    ),
    "tcl_multihot": lambda x, p, q, **kw: flashcon.tcl_loss(x["f"], x["mh"], k1=3.0, **kw),
    "esupcon_multihot": lambda x, p, q, **kw: flashcon.esupcon_loss(x["f"], x["mh"], p, **kw),
    "supcon_queue": lambda x, p, q, **kw: flashcon.supcon_loss(
        x["f"], x["y"], queue=q["int"], **kw
    ),
    "ntxent_queue": lambda x, p, q, **kw: flashcon.ntxent_loss(x["f"], queue=q["int"], **kw),
    "genscl_queue": lambda x, p, q, **kw: flashcon.genscl_loss(
        x["f"], x["soft"], queue=q["soft"], **kw
    ),
    "sincere_multihot_queue": lambda x, p, q, **kw: flashcon.sincere_loss(
        x["f"], x["mh"], queue=q["mh"], temperature=0.2, **kw
    ),
    "esupcon_queue": lambda x, p, q, **kw: flashcon.esupcon_loss(
        x["f"], x["y"], p, queue=q["int"], **kw
    ),
}


def _value_and_grads(fn, x: dict, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = dict(x, f=x["f"].detach().clone().requires_grad_(True))
    p = DIST_PROTOS.clone().requires_grad_(True)
    value = fn(x, p, _dist_queues(), **kw)
    gf, gp = torch.autograd.grad(value, (x["f"], p), allow_unused=True, materialize_grads=True)
    return value.detach(), gf, gp


def _dist_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # Every rank creates both groups, in the same order; each rank then gathers in its own.
    groups = [dist.new_group([0]), dist.new_group([1])]
    x = _dist_inputs(rank)
    res: dict = {}
    for backend in STREAMING:
        for name, fn in DIST_CASES.items():
            res[name, backend] = _value_and_grads(fn, x, backend=backend, gather_distributed=True)
        mine = groups[rank]
        try:
            res["group", backend] = _value_and_grads(
                DIST_CASES["supcon_queue"], x, backend=backend, gather_distributed=True, group=mine
            )
        except Exception as e:  # reported by test_gather_group_*
            res["group", backend] = f"{type(e).__name__}: {str(e)[:2000]}"
        try:
            flashcon.supcon_loss(
                x["f"],
                None,
                torch.ones(len(x["y"]), len(x["y"])),
                backend=backend,
                gather_distributed=True,
            )
            res["mask", backend] = "accepted"
        except ValueError as e:
            res["mask", backend] = f"ValueError: {e}"
        # torch.compile of a gathered loss: one graph, the eager value and gradients.
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

        def gathered(x, p, q, **kw):
            return flashcon.supcon_loss(x["f"], x["mh"], **kw)

        compiled = torch.compile(gathered, backend=counter, fullgraph=True)
        try:
            res["compile", backend] = _value_and_grads(
                compiled, x, backend=backend, gather_distributed=True
            ) + (counter.frame_count,)
        except Exception as e:  # reported by test_gather_under_compile
            res["compile", backend] = f"{type(e).__name__}: {str(e)[:2000]}"
    torch.save(res, f"{out_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _single(fn, parts: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return _value_and_grads(fn, whole, backend="reference")


@pytest.fixture(scope="session")
def dist_results(shared_once) -> list[dict]:
    # The two gloo processes run once per run, by whichever pytest-xdist worker asks first.
    tmp = shared_once("gloo-pair", _run_gloo_pair)
    return [torch.load(f"{tmp / 'res'}.{r}") for r in range(len(DIST_SIZES))]


def _run_gloo_pair(tmp: Path) -> None:
    world = len(DIST_SIZES)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE),
                "--rank",
                str(r),
                "--world",
                str(world),
                "--init",
                str(tmp / "init"),
                "--out",
                str(tmp / "res"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"


def _check_gathered(ranks: list, key, fn, members: list[int], name: str) -> None:
    """Mean of the ranks' values = the single-process loss of their concatenated batch; each
    rank's gradient = W × that loss's gradient of its rows; mean prototype gradient exact."""
    w = len(members)
    val, gf, gp = _single(fn, [_dist_inputs(r) for r in members])
    vals = torch.stack([ranks[r][key][0] for r in members])
    assert_close(vals.mean(), val, atol=1e-12, rtol=0, name=f"{name} value")
    start = 0
    for r in members:
        b = DIST_SIZES[r]
        assert_close(
            ranks[r][key][1],
            w * gf[start : start + b],
            atol=1e-12,
            rtol=0,
            name=f"{name} rank {r} dfeatures",
        )
        start += b
    mean_gp = torch.stack([ranks[r][key][2] for r in members]).mean(0)
    assert_close(mean_gp, gp, atol=1e-12, rtol=0, name=f"{name} dprototypes")


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("case", list(DIST_CASES))
def test_gather_multihot_and_queue(dist_results, case, backend):
    _check_gathered(dist_results, (case, backend), DIST_CASES[case], [0, 1], case)


@pytest.mark.parametrize("backend", STREAMING)
def test_gather_uses_the_group_argument(dist_results, backend):
    # Rank 0 gathers in the group {0}: its single-process loss, not the world's.
    got = dist_results[0]["group", backend]
    assert not isinstance(got, str), got
    _check_gathered(dist_results, ("group", backend), DIST_CASES["supcon_queue"], [0], "{0}")
    world_val = dist_results[0]["supcon_queue", backend][0]
    assert abs(float(world_val - got[0])) > 1e-3


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.xfail(
    strict=True,
    reason="torch.distributed.nn.functional.all_gather's gloo backward (_AlltoAll) passes the "
    "group rank i as the global src of dist.scatter: in a group whose ranks are not 0..k-1 "
    "(rank 1 alone in group {1}) the backward raises 'Global rank 0 is not part of group'",
)
def test_gather_group_of_a_later_rank(dist_results, backend):
    got = dist_results[1]["group", backend]
    assert not isinstance(got, str), got
    _check_gathered(dist_results, ("group", backend), DIST_CASES["supcon_queue"], [1], "{1}")


@pytest.mark.parametrize("backend", STREAMING)
def test_gather_rejects_mask(dist_results, backend):
    for r in range(len(DIST_SIZES)):
        msg = dist_results[r]["mask", backend]
        assert msg.startswith("ValueError") and "mask" in msg and "gather" in msg, msg


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.xfail(
    strict=True,
    reason="flashcon.distributed.gather_rows branches on the gathered row counts "
    "(`if x.shape[0] < m`, python/flashcon/distributed.py:59): under torch.compile they are "
    "data-dependent (unbacked) sizes and fullgraph tracing fails",
)
def test_gather_under_compile(dist_results, backend):
    for r in range(len(DIST_SIZES)):
        got = dist_results[r]["compile", backend]
        assert not isinstance(got, str), f"rank {r}: {got}"
        frames = got[3]
        assert frames == 1, f"rank {r}: {frames} graphs"
    compiled = [dict(dist_results[r], x=dist_results[r]["compile", backend][:3]) for r in range(2)]
    _check_gathered(compiled, "x", DIST_CASES["supcon_multihot"], [0, 1], "compiled")


# ---------------------------------------------------------------------------------------------
# FLASHCON_SYMMETRIC=0 and backend='auto'.


class _OpNames(TorchDispatchMode):
    """Records the names of the flashcon ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("flashcon."):
            self.names.add(str(func).split(".")[1])
        return func(*args, **(kwargs or {}))


_SYM_SCRIPT = """
import json, sys, torch, flashcon
from torch.utils._python_dispatch import TorchDispatchMode

class Names(TorchDispatchMode):
    names = set()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("flashcon."):
            Names.names.add(str(func).split(".")[1])
        return func(*args, **(kwargs or {}))

g = torch.Generator().manual_seed(11)
f = torch.nn.functional.normalize(torch.randn(20, 2, 6, generator=g), dim=-1)
y = torch.arange(20) % 3
ref = flashcon.reference.supcon_loss(f.double(), y)
out = {"enabled": flashcon.engine.symmetric_enabled()}
for backend in sys.argv[1:]:
    Names.names = set()
    x = f.clone().requires_grad_(True)
    with Names():
        v = flashcon.supcon_loss(x, y, backend=backend)
        v.backward()
    out[backend] = [sorted(Names.names), abs(float(v) - float(ref))]
print(json.dumps(out))
"""


def _sym_report(env_value: str | None) -> dict:
    """In a fresh process: whether the symmetric path is on, the flashcon ops an 'all'-mode
    SupCon ran on each kernel backend, and its error against the reference."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FLASHCON_SYMMETRIC", None)
    if env_value is not None:
        env["FLASHCON_SYMMETRIC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _SYM_SCRIPT, *CPU, *TRITON],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (CPU or TRITON), reason="no kernel backend with a symmetric path")
def test_flashcon_symmetric_env_switch():
    off = _sym_report("0")
    assert off["enabled"] is False
    before = flashcon.engine.symmetric_enabled()
    flashcon.engine.set_symmetric(True)  # this process: the switch's default
    try:
        for backend in [*CPU, *TRITON]:
            names, err = off[backend]
            # The symmetric path's ops: sym_* (and Triton's whole-loss fused_*, built on it).
            assert names and not any("sym" in n or "fused" in n for n in names), (backend, names)
            assert err < 1e-5, (backend, err)
            rec = _OpNames()
            f = _unit(20, 2, 6, seed=11, dtype=torch.float32).requires_grad_(True)
            with rec:
                flashcon.supcon_loss(f, torch.arange(20) % 3, backend=backend).backward()
            assert any("sym" in n or "fused" in n for n in rec.names), (backend, rec.names)
    finally:
        flashcon.engine.set_symmetric(before)


def test_auto_backend_is_cpu_for_cpu_tensors():
    expected = "cpu" if CPU else "torch"
    assert flashcon.resolve_backend("auto", torch.device("cpu")) == expected
    f = _unit(B, V, D, seed=12, dtype=torch.float32)
    for loss, args in [("supcon_loss", (_Y,)), ("sincere_loss", (_Y,)), ("ntxent_loss", ())]:
        rec = _OpNames()
        fa = f.clone().requires_grad_(True)
        with rec:
            va = getattr(flashcon, loss)(fa, *args)
            va.backward()
        fc = f.clone().requires_grad_(True)
        vc = getattr(flashcon, loss)(fc, *args, backend=expected)
        vc.backward()
        assert torch.equal(va, vc) and torch.equal(fa.grad, fc.grad)
        assert rec.names, "no flashcon op ran"
        if expected == "cpu":  # the C++ ops: neither torch_* nor triton_*
            assert not any(n.startswith(("torch_", "triton_")) for n in rec.names), rec.names
        else:
            assert all(n.startswith("torch_") for n in rec.names), rec.names


# ---------------------------------------------------------------------------------------------
# Multi-label ESupCon: at most 64 prototypes.


@pytest.mark.parametrize("backend", ["reference", *STREAMING])
def test_multilabel_esupcon_64_prototypes(backend):
    y = _multihot(8, 64, seed=13, density=0.05)
    y[0, 63] = y[1, 63] = True  # label 63: the int64 sign bit of the bitmask
    y[2, :] = False
    y[2, 62] = True
    f = _unit(8, 2, D, seed=14).requires_grad_(True)
    p = torch.randn(64, D, generator=torch.Generator().manual_seed(15), dtype=DT)
    p.requires_grad_(True)
    kw = {"backend": backend} if backend != "reference" else {}
    fn = R.esupcon_loss if backend == "reference" else flashcon.esupcon_loss
    value = fn(f, y, p, **kw)
    expected = O.esupcon(f, y, p)
    assert_close(value, expected, atol=4e-14, rtol=0, name="value")
    for g, e in zip(_grad(value, f, p), _grad(expected, f, p)):
        assert_close(g, e, atol=4e-14, rtol=0, name="gradient")
    with pytest.raises(ValueError, match="64"):
        fn(f.detach(), y, torch.randn(65, D, dtype=DT), **kw)


# ---------------------------------------------------------------------------------------------
# Masks and multi-hot labels in fp16 and bf16: against the float64 reference on the same
# rounded inputs (features and mask). Measured worst absolute errors over these cases (losses
# ~6, gradients up to 1.34):
#   loss: fp16 8.9e-7, bf16 7.4e-7 (every backend; statistics are fp32);
#   gradient, fp16: torch/cpu 7.6e-4, triton 8.4e-4; bf16: torch/cpu 5.2e-3, triton 1.13e-2.
#   The dense reference in fp32 with its gradient rounded to the dtype: 4.7e-4 / 3.8e-3.
# Tolerances: loss 5e-6; gradient 2e-3 (fp16) and 2.5e-2 (bf16), 2.2-2.4× the worst measured.
LOWP_GRAD_TOL = {torch.float16: 2e-3, torch.bfloat16: 2.5e-2}

LOWP_CASES = {
    "supcon_mask": lambda m, f, y, mask: m.supcon_loss(f, None, mask, temperature=0.1),
    "supcon_in_one_mask": lambda m, f, y, mask: m.supcon_loss(
        f, None, mask, temperature=0.1, variant="in", contrast_mode="one"
    ),
    "supcon_multihot": lambda m, f, y, mask: m.supcon_loss(f, y, temperature=0.1),
    "sincere_multihot": lambda m, f, y, mask: m.sincere_loss(f, y, temperature=0.1),
    "tcl_multihot": lambda m, f, y, mask: m.tcl_loss(f, y, k1=3.0),
}


@pytest.mark.parametrize("backend", [*STREAMING, *TRITON])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(LOWP_CASES))
def test_low_precision_masks_and_multihot(case, dtype, backend):
    fn = LOWP_CASES[case]
    b = 9
    f = _unit(b, 2, 8, seed=16, dtype=dtype).requires_grad_(True)
    g = torch.Generator().manual_seed(17)
    mask = (torch.rand(b, b, generator=g) * (torch.rand(b, b, generator=g) < 0.5)).to(dtype)
    y = _multihot(b, 5, seed=18)
    value = fn(_Backend(backend), f, y, mask)
    assert value.dtype == torch.float32
    f64 = f.detach().double().requires_grad_(True)
    expected = fn(R, f64, y, mask.double())
    assert_close(value, expected, atol=5e-6, rtol=0, name="value")
    (grad,) = _grad(value, f)
    (eg,) = _grad(expected, f64)
    assert grad.dtype == dtype
    assert_close(grad, eg, atol=LOWP_GRAD_TOL[dtype], rtol=0, name="gradient")


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) with a mask or a queue.


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_matches_eager(fn, f: torch.Tensor) -> int:
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    fc, fe = f.clone().requires_grad_(True), f.clone().requires_grad_(True)
    vc, ve = compiled(fc), fn(fe)
    vc.backward()
    ve.backward()
    assert_close(vc, ve, atol=1e-6, rtol=0, name="value")
    assert_close(fc.grad, fe.grad, atol=1e-6, rtol=0, name="gradient")
    return counter.frame_count


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("backend", STREAMING)
def test_compile_with_mask(backend):
    """(The mask's data checks run in eager mode only: under torch.compile they would be a
    data-dependent branch, which fullgraph tracing rejects.)"""
    mask = torch.rand(B, B, generator=torch.Generator().manual_seed(19))
    f = _unit(B, V, D, seed=20, dtype=torch.float32)
    assert (
        _compiled_matches_eager(lambda f: flashcon.supcon_loss(f, None, mask, backend=backend), f)
        == 1
    )


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("kind", ["int", "soft", "multihot"])
def test_compile_with_queue(kind, backend):
    q = _queue(kind, seed=21)
    y = _labels(kind, seed=22)
    f = _unit(B, V, D, seed=23, dtype=torch.float32)
    if kind == "soft":
        fn = lambda f: flashcon.genscl_loss(f, y, queue=q, backend=backend)  # noqa: E731
    else:
        fn = lambda f: flashcon.sincere_loss(f, y, queue=q, backend=backend)  # noqa: E731
    assert _compiled_matches_eager(fn, f) == 1


# ---------------------------------------------------------------------------------------------
# Determinism of the CPU backend.

_DET_B = 150  # 300 rows: several tiles per row and column


def _det_cases() -> dict:
    g = torch.Generator().manual_seed(24)
    y = torch.randint(0, 5, (_DET_B,), generator=g)
    mh = torch.rand(_DET_B, 6, generator=g) < 0.3
    mask = torch.rand(_DET_B, _DET_B, generator=g)
    soft = torch.rand(_DET_B, 4, generator=g)
    p = torch.randn(5, 16, generator=g)
    q = MemoryQueue(64, 16)
    q.push(_unit(32, 2, 16, seed=25, dtype=torch.float32), torch.randint(0, 5, (32,), generator=g))
    return {
        # 'all' mode: the symmetric path
        "supcon": (True, lambda f: flashcon.supcon_loss(f, y, backend="cpu")),
        "supcon_in": (True, lambda f: flashcon.supcon_loss(f, y, variant="in", backend="cpu")),
        "supcon_mask": (True, lambda f: flashcon.supcon_loss(f, None, mask, backend="cpu")),
        "supcon_multihot": (True, lambda f: flashcon.supcon_loss(f, mh, backend="cpu")),
        "ntxent": (True, lambda f: flashcon.ntxent_loss(f, backend="cpu")),
        "sincere": (True, lambda f: flashcon.sincere_loss(f, y, backend="cpu")),
        "genscl": (True, lambda f: flashcon.genscl_loss(f, soft, backend="cpu")),
        "tcl": (True, lambda f: flashcon.tcl_loss(f, y, backend="cpu")),
        # rectangular: the general path
        "supcon_one": (
            False,
            lambda f: flashcon.supcon_loss(f, y, contrast_mode="one", backend="cpu"),
        ),
        "supcon_queue": (False, lambda f: flashcon.supcon_loss(f, y, queue=q, backend="cpu")),
        "esupcon": (False, lambda f: flashcon.esupcon_loss(f, y, p, backend="cpu")),
    }


def _run_at(threads: int, fn, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fx = f.clone().requires_grad_(True)
        v = fn(fx)
        v.backward()
        return v.detach(), fx.grad
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not CPU, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("case", list(_det_cases()))
def test_cpu_bitwise_deterministic(case):
    symmetric, fn = _det_cases()[case]
    f = _unit(_DET_B, 2, 16, seed=26, dtype=torch.float32)
    first = _run_at(2, fn, f)
    again = _run_at(2, fn, f)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), "run to run"
    if symmetric:  # README: "the symmetric path at any thread count"
        one = _run_at(1, fn, f)
        assert torch.equal(first[0], one[0]), "value differs between 1 and 2 threads"
        assert torch.equal(first[1], one[1]), "gradient differs between 1 and 2 threads"


# ---------------------------------------------------------------------------------------------
# Memory: the largest tensor any loss creates, forward and backward, is O(N·D) or one chunk.


class _Largest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.biggest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.biggest = max(self.biggest, t.numel())
        return out


_MEM_B, _MEM_D, _CHUNK = 256, 8, 1 << 14  # N = 512: N² = 262144 elements


def _mem_cases() -> dict:
    b, d = _MEM_B, _MEM_D
    g = torch.Generator().manual_seed(27)
    y = torch.randint(0, 10, (b,), generator=g)
    mh = torch.rand(b, 12, generator=g) < 0.2
    q = MemoryQueue(256, d)
    q.push(
        _unit(128, 2, d, seed=28, dtype=torch.float32), torch.randint(0, 10, (128,), generator=g)
    )
    qs = MemoryQueue(256, d, num_soft_classes=10)
    qs.push(_unit(128, 2, d, seed=29, dtype=torch.float32), torch.rand(128, 10, generator=g))
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
    f = _unit(_MEM_B, 2, _MEM_D, seed=30, dtype=torch.float32).requires_grad_(True)
    n = 2 * _MEM_B
    rec = _Largest()
    with rec:
        fn(f, backend).backward()
    # O(N·D) buffers, one chunk of the torch backend, or the user's own [B, B] mask.
    allowed = max(4 * n * _MEM_D, 2 * _CHUNK, user_size)
    assert allowed < n * n // 3  # N×N = 262144; allowed: 32768, or 65536 with the mask
    assert rec.biggest <= allowed, f"largest tensor {rec.biggest} > {allowed}"


# ---------------------------------------------------------------------------------------------


def _main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="worker of test_gather_*")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    _dist_worker(a.rank, a.world, a.init, a.out)


if __name__ == "__main__":
    import torch._dynamo.testing  # noqa: F401  (the compile case's counter)

    _main(sys.argv[1:])
