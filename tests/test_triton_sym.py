"""The Triton symmetric ('all'-mode) path against the torch contract and the general kernels.

Without a GPU the kernels run through Triton's interpreter (conftest). Shapes cover one block,
odd and even block counts of the circulant tile-pair schedule (sym.py) with the table's tiles
(16-bit: 64, fp32: 32) and with 16-row tiles, D below, at and above a chunk.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flashcon
from flashcon import engine
from flashcon.backends import torch_stream as TS
from flashcon.testing import assert_close, assert_close_rel, assert_rounding_bound, make_inputs

# Only the triton package itself may be missing; an import error in flashcon's kernels fails.
pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flashcon.triton_kernels import config, lse_launch, ops, sym_launch  # noqa: E402
from flashcon.triton_kernels.lse import _mma  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = config.TileConfig(16, 16, 16, 16, 4, 1)
# N of 1, 2, 3, 37, 100 and 130: blocks of 32 rows (fp32 table) give NB = 1, 1, 1, 2, 4, 5
# and of 16 rows NB = 1, 1, 1, 3, 7, 9 (odd and even schedules); D of 1, 7, 16, 130, 33.
SHAPES = [(1, 7), (2, 1), (3, 7), (37, 130), (100, 16), (130, 33)]
WEIGHTS = [(1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 2.0, 50.0)]
POS_MODES = ["labels", "multilabel", "pos_weight"]
# fp32 against the float64 contract on the same inputs, relative to each result's largest entry
# (assert_close_rel). Measured on the interpreter over this file's grids: statistics 2.4e-7,
# gradients 7.6e-7 (5.9e-6 near the static shift's limit and on the fallback: SHIFT_DZ_TOL).
STAT_TOL = 2e-6
DZ_RTOL = 5e-6
SHIFT_DZ_TOL = 5e-5


def _inputs(n, d, dtype, mode, norm=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * n + d)
    z = norm * torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    pw, ml = None, mode == "multilabel"
    if ml:
        lab = torch.randint(0, 64, (n,), generator=g)  # bitmasks; 0 shares with nobody
    else:
        lab = torch.randint(0, 4, (n,), generator=g)
    if mode == "pos_weight":
        # An asymmetric [5, 4] mask with zeros (negatives) and weights in (0, 2).
        pw = 2 * torch.rand(5, 4, generator=g)
        pw = torch.where(torch.rand(5, 4, generator=g) < 0.4, torch.zeros_like(pw), pw)
    return z.to(dtype), lab, ml, pw, g


def _dev(*ts):
    return tuple(None if t is None else t.to(DEVICE) for t in ts)


def _check_lse(
    z, lab, scale, weights, ml, pw, g, config=None, tol=STAT_TOL, dz_tol=DZ_RTOL, contract_pw=None
):
    """Symmetric op vs the torch contract (float64 on the same inputs; ``contract_pw`` in
    place of ``pw`` there when given) and the general op."""
    args = (scale, *weights, ml, pw if contract_pw is None else contract_pw)
    zd, labd, pwd = _dev(z, lab, pw)
    dargs = (scale, *weights, ml, pwd)
    if config is None:
        got = ops.sym_lse_fwd_op(zd, labd, *dargs)
    else:
        got = sym_launch.sym_lse_fwd(zd, labd, *dargs, config=config)
    want = TS.sym_lse_fwd(z.double(), lab, *args)
    general = ops.lse_fwd_op(zd, zd, labd, labd, 0, *dargs)
    for name, a, e, c in zip(("lse", "psum", "pcnt"), got, want, general):
        assert a.dtype == torch.float32
        assert_close_rel(a.cpu(), e, tol, name)
        assert_close_rel(a.cpu(), c.cpu(), tol, f"{name} vs general op")
    n = z.shape[0]
    g_lse, g_psum = torch.randn(n, generator=g), torch.randn(n, generator=g)
    lse = want[0].float()
    if config is None:
        dz = ops.sym_lse_bwd_op(*_dev(g_lse, g_psum, z, lab, lse), *dargs)
    else:
        dz = sym_launch.sym_lse_bwd(*_dev(g_lse, g_psum, z, lab, lse), *dargs, config=config)
    exp = TS.sym_lse_bwd(g_lse.double(), g_psum.double(), z.double(), lab, lse.double(), *args)
    dq, dk = ops.lse_bwd_op(*_dev(g_lse, g_psum, z, z, lab, lab, lse), 0, *dargs)
    assert dz.dtype == z.dtype and dz.shape == z.shape
    assert_close_rel(dz.cpu(), exp, dz_tol, "dz")
    assert_close_rel(dz.cpu(), (dq + dk).cpu().double(), dz_tol, "dq+dk")


# A mask together with k1 runs torch_stream in the ops (no loss makes that call): it is
# checked through the ops, not with other tiles.
_LSE_GRID = [
    (w, m, t)
    for w in WEIGHTS
    for m in POS_MODES
    for t in ("table", "small")
    if not (t == "small" and m == "pos_weight" and w[2] > 0)
]


@pytest.mark.parametrize(
    "weights, mode, tiles",
    _LSE_GRID,
    ids=["wp{}-wn{}-k1{}-{}-{}".format(*w, m, t) for w, m, t in _LSE_GRID],
)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}D{}".format(*s))
def test_sym_lse_matches_contract_and_general(shape, weights, mode, tiles):
    """Unit-norm features at τ = 0.1: the static shift (range 20) serves every case."""
    z, lab, ml, pw, g = _inputs(*shape, torch.float32, mode)
    plan = sym_launch.sym_plan(z, 10.0, *weights, pw)
    assert bool(plan.ok), "these inputs must take the symmetric kernels"
    cfg = SMALL if tiles == "small" else None
    _check_lse(z, lab, 10.0, weights, ml, pw, g, config=cfg)


# Partner runs of the schedule (sym.py): chunk = max(1, min(SYM_CHUNK, pairs // SYM_PROGRAMS)),
# so the table's SYM_PROGRAMS gives one partner per program at these sizes; these give runs
# of 2 (some ending at the duplicate distance NB/2 of an even NB) and whole rows of partners.
# "resident" adds 16-row fp32 resident tiles (sym_tiles' "res" entries, D <= 128), whose
# parity with the contract is then checked at fp32's tolerances.
_RES16 = config.TileConfig(16, 16, 128, 128, 4, 1)
SCHEDULES = {"runs2": (2, None), "resident-runs2": (2, _RES16), "resident-runs16": (16, _RES16)}
# (shape, positives, weights): 16-row blocks give NB = 8 (even: the distance-NB/2 pair taken
# once) and 9 (odd); D = 130 is above the resident limit (streamed, 32-row table tiles:
# NB = 4, even).
_RUN_CASES = [
    ((120, 16), "labels", WEIGHTS[0]),
    ((130, 33), "multilabel", WEIGHTS[3]),
    ((100, 130), "pos_weight", WEIGHTS[0]),
]


@pytest.fixture
def schedule(request, monkeypatch):
    chunk, res = SCHEDULES[request.param]
    monkeypatch.setattr(config, "SYM_CHUNK", chunk)
    monkeypatch.setattr(config, "SYM_PROGRAMS", 1)
    arch = config.arch_of(torch.device(DEVICE))
    if res is not None:
        for kind in ("sym_fwd", "sym_bwd"):
            tiles = res if kind == "sym_bwd" else dataclasses.replace(res, block_do=0)
            monkeypatch.setitem(config.CONFIGS, (arch, kind, 32, "res"), tiles)
    # The tiles of every symmetric launch, to check which variant ran.
    seen = []
    real = sym_launch._launch_sym

    def spy(name, n, cfg, fl, args):
        seen.append((name, n, cfg, fl["RESIDENT"]))
        return real(name, n, cfg, fl, args)

    monkeypatch.setattr(sym_launch, "_launch_sym", spy)
    return res, seen


@pytest.mark.parametrize("schedule", list(SCHEDULES), indirect=True)
@pytest.mark.parametrize(
    "shape, mode, weights", _RUN_CASES, ids=["N120D16", "N130D33-multilabel-tcl", "N100D130-mask"]
)
def test_sym_partner_runs(shape, mode, weights, schedule):
    """Programs that take runs of partner blocks (block I's share kept in registers), streamed
    and resident, against the contract and the general kernels."""
    res, seen = schedule
    resident = res is not None and shape[1] <= 128
    # The streamed variant with 16-row tiles where no resident tiles are set (D <= 128).
    cfg = config.TileConfig(16, 16, 16, 16, 4, 1) if res is None and shape[1] <= 128 else None
    z, lab, ml, pw, g = _inputs(*shape, torch.float32, mode)
    _check_lse(z, lab, 10.0, weights, ml, pw, g, config=cfg)
    assert {s[0] for s in seen} == {"_sym_fwd_kernel", "_sym_bwd_kernel"}
    for _, n, tiles, res_ran in seen:
        nb = -(-n // tiles.block_m)
        assert nb >= 4 and config.sym_chunk(nb) > 1  # runs of more than one partner ran
        assert res_ran == resident


def test_one_tile_schedule_switch(monkeypatch):
    """FLASHCON_SYM_SCHEDULE=tiles (the bench's flashcon-triton-tiles A/B): one tile pair per
    program, streamed, read when the launcher runs; anything but 'runs'/'tiles' is an error."""
    cuda = config.TileConfig(64, 64, 128, 128, 8, 2)
    monkeypatch.setattr(config, "SYM_PROGRAMS", 1)
    assert config.sym_chunk(8) == config.SYM_CHUNK  # 8 blocks: 40 tile pairs, runs of 16
    assert config.sym_tiles("sym_bwd", 90, torch.bfloat16, 128) == (cuda, True)
    monkeypatch.setenv(config.SCHEDULE_ENV, "tiles")
    assert config.sym_chunk(8) == 1
    cfg, resident = config.sym_tiles("sym_bwd", 90, torch.bfloat16, 128)
    assert not resident and cfg == config.pick_config("sym_bwd", 90, torch.bfloat16, 128)
    monkeypatch.setenv(config.SCHEDULE_ENV, "pairs")
    with pytest.raises(ValueError, match="FLASHCON_SYM_SCHEDULE"):
        config.sym_chunk(8)


@pytest.mark.parametrize("case", ["static-near-limit", "tiny-temperature", "large-norms"])
@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("weights", WEIGHTS, ids=["all", "pos", "neg", "tcl"])
def test_sym_lse_shift_and_fallback(weights, mode, case):
    """Near the static shift's limit (2·scale·R² = 76 <= 80) and past it, where the gate sends
    the work to the general kernels (their per-row online max) on the device."""
    norm, scale = {
        "static-near-limit": (1.0, 38.0),
        "tiny-temperature": (1.0, 100.0),
        "large-norms": (4.0, 5.0),
    }[case]
    z, lab, ml, pw, g = _inputs(100, 7, torch.float32, mode, norm=norm)
    plan = sym_launch.sym_plan(z, scale, *weights, pw)
    r1, r2 = float(plan.range1), float(plan.range2)
    assert bool(plan.ok) == (max(r1, r2) <= sym_launch.SYM_RANGE), (r1, r2)
    # The spread is 2·scale·‖z‖² (76 near the limit, 200 and 160 past it) plus the log-spread
    # of the weights (log 2 for the TCL weights, up to ~4 for the random mask).
    assert 2 * scale * norm**2 - 1e-3 <= r1 <= 2 * scale * norm**2 + 5 or r1 == 0
    if case != "static-near-limit":
        assert not bool(plan.ok)
    elif mode != "pos_weight":
        assert bool(plan.ok)
    _check_lse(z, lab, scale, weights, ml, pw, g, dz_tol=SHIFT_DZ_TOL)


@pytest.mark.parametrize("tiles", ["table", "small"])
@pytest.mark.parametrize("mode", ["labels", "multilabel"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}D{}".format(*s))
def test_sym_sp_matches_contract_and_general(shape, mode, tiles):
    z, lab, ml, _, g = _inputs(*shape, torch.float32, mode, norm=2.0)
    eta = TS.sym_lse_fwd(z.double(), lab, 0.7, 0.0, 1.0, 0.0, ml)[0]  # −inf: no negatives
    cfg = {"config": SMALL} if tiles == "small" else {}
    zd, labd, etad = _dev(z, lab, eta.float())
    got = sym_launch.sym_sp_fwd(zd, labd, etad, 0.7, ml, **cfg)
    want = TS.sym_sp_fwd(z.double(), lab, eta, 0.7, ml)
    general = lse_launch.sp_fwd(zd, zd, labd, labd, etad, 0, 0.7, ml)
    for name, a, e, c in zip(("sp", "r"), got, want, general):
        assert_close_rel(a.cpu(), e, STAT_TOL, name)
        assert_close_rel(a.cpu(), c.cpu(), STAT_TOL, f"{name} vs general")
    g_sp = torch.randn(shape[0], generator=g)
    dz = sym_launch.sym_sp_bwd(*_dev(g_sp), zd, labd, etad, 0.7, ml, **cfg)
    exp = TS.sym_sp_bwd(g_sp.double(), z.double(), lab, eta, 0.7, ml)
    assert dz.dtype == z.dtype
    assert_close_rel(dz.cpu(), exp, DZ_RTOL, "dz")


def test_sym_sp_with_a_mask_runs_the_contract():
    z, lab, _, pw, g = _inputs(37, 7, torch.float32, "pos_weight")
    eta = torch.randn(37, generator=g)
    got = ops.sym_sp_fwd_op(*_dev(z, lab, eta), 0.7, False, *_dev(pw))
    want = TS.sym_sp_fwd(z, lab, eta, 0.7, False, pw)
    for a, e in zip(got, want):
        assert_close(a.cpu(), e, atol=1e-5, rtol=1e-5)
    dz = ops.sym_sp_bwd_op(*_dev(eta, z, lab, eta), 0.7, False, *_dev(pw))
    assert_close(dz.cpu(), TS.sym_sp_bwd(eta, z, lab, eta, 0.7, False, pw), atol=1e-5, rtol=1e-5)


# Units of rounding (assert_rounding_bound), measured: statistics 3.0 fp32 units (psum), dz 0.84
# units of its dtype.
LP_ULPS = {"stat": 16, torch.float16: 4, torch.bfloat16: 4}


@pytest.mark.parametrize("schedule", ["runs", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sym_low_precision(dtype, schedule, monkeypatch):
    """fp32 statistics, gradients in the input dtype; 16-bit tiles (64 rows: NB = 3), resident
    (D = 40 <= 128) on the default schedule, streamed one tile per program on 'tiles'."""
    monkeypatch.setenv(config.SCHEDULE_ENV, schedule)
    z, lab, ml, pw, g = _inputs(130, 40, dtype, "labels")
    zd, labd = _dev(z, lab)
    lse, psum, pcnt = ops.sym_lse_fwd_op(zd, labd, 10.0, 1.0, 1.0, 0.0, ml, pw)
    assert lse.dtype == torch.float32
    # Against float64 on the same rounded inputs: fp32 statistics, dz rounded to dtype.
    want = TS.sym_lse_fwd(z.double(), lab, 10.0, 1.0, 1.0, 0.0)
    for name, a, e in zip(("lse", "psum"), (lse, psum), want):
        assert_rounding_bound(a, e, dtype=torch.float32, ulps=LP_ULPS["stat"], name=name)
    g_lse = torch.randn(130, generator=g)
    dz = ops.sym_lse_bwd_op(*_dev(g_lse, g_lse, z, lab, lse.cpu()), 10.0, 1.0, 1.0, 0.0, ml, pw)
    assert dz.dtype == dtype
    g64, lse64 = g_lse.double(), lse.double().cpu()
    exp = TS.sym_lse_bwd(g64, g64, z.double(), lab, lse64, 10.0, 1.0, 1.0, 0.0)
    assert_rounding_bound(dz, exp, dtype=dtype, ulps=LP_ULPS[dtype], name="dz")


@pytest.mark.parametrize("case", ["no-positive-entry", "nan-entry", "zero-main-weights"])
def test_sym_lse_weight_corners(case):
    """A mask without a positive entry, TCL's k1 stream alone (w_pos = w_neg = 0: no main
    term), and a NaN mask entry (the API rejects non-finite masks; called directly, the
    symmetric kernels must treat it as the general kernels do: not a positive)."""
    z, lab, _, pw, g = _inputs(40, 5, torch.float32, "pos_weight")
    weights = (1.0, 1.0, 0.0)
    if case == "no-positive-entry":
        pw = torch.zeros_like(pw)
    elif case == "nan-entry":
        pw[1, 2] = float("nan")
    else:
        pw, weights = None, (0.0, 0.0, 5.0)
    assert bool(sym_launch.sym_plan(z, 10.0, *weights, pw).ok)
    # The NaN entry must read as a zero weight (a negative): the float64 contract with 0 there.
    contract_pw = pw.nan_to_num(0.0) if case == "nan-entry" else None
    _check_lse(z, lab, 10.0, weights, False, pw, g, contract_pw=contract_pw)


def test_sym_lse_negative_scale_takes_the_general_path():
    z, lab, _, _, g = _inputs(40, 5, torch.float32, "labels")
    assert not bool(sym_launch.sym_plan(z, -5.0, 1.0, 1.0, 0.0, None).ok)
    _check_lse(z, lab, -5.0, (1.0, 1.0, 0.0), False, None, g)


def test_sym_lse_backward_only_fallback():
    """The forward takes the tile pairs, the backward's folded constant g·e^{A − lse} leaves
    fp32's range: the general kernels give the gradient (equal to theirs bitwise)."""
    z, lab, _, _, _ = _inputs(40, 5, torch.float32, "labels")
    zd, labd = _dev(z, lab)
    args = (10.0, 1.0, 1.0, 0.0, False, None)
    lse = ops.sym_lse_fwd_op(zd, labd, *args)[0]
    g = torch.full((40,), 1e37, device=DEVICE)
    dz = ops.sym_lse_bwd_op(g, torch.zeros_like(g), zd, labd, lse, *args)
    dq, dk = ops.lse_bwd_op(g, torch.zeros_like(g), zd, zd, labd, labd, lse, 0, *args)
    assert torch.equal(dz, dq + dk)
    # ... and that gradient is the float64 contract's on the same inputs (lse included).
    g64 = g.double().cpu()
    exp = TS.sym_lse_bwd(g64, torch.zeros_like(g64), z.double(), lab, lse.double().cpu(), *args)
    assert_close_rel(dz.cpu(), exp, DZ_RTOL, "dz")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(0, 7), (5, 0)], ids=["N0", "D0"])
def test_sym_empty_shapes(shape, dtype):
    """bf16 with D = 0 must stream (a resident block would load columns of an empty tensor)."""
    z, lab, _, _, _ = _inputs(*shape, dtype, "labels")
    zd, labd = _dev(z, lab)
    args = (10.0, 1.0, 1.0, 0.0, False, None)
    lse, psum, pcnt = ops.sym_lse_fwd_op(zd, labd, *args)
    assert lse.shape == psum.shape == pcnt.shape == (shape[0],)
    general = ops.lse_fwd_op(zd, zd, labd, labd, 0, *args)
    for a, c in zip((lse, psum, pcnt), general):
        torch.testing.assert_close(a, c)
    sp = ops.sym_sp_fwd_op(zd, labd, lse, 10.0, False, None)
    for a, c in zip(sp, lse_launch.sp_fwd(zd, zd, labd, labd, lse, 0, 10.0, False)):
        assert a.shape == (shape[0],)
        torch.testing.assert_close(a, c)
    g = torch.ones(shape[0], device=DEVICE)
    dz = ops.sym_lse_bwd_op(g, g, zd, labd, lse, *args)
    assert dz.shape == shape and (dz == 0).all()
    dz = ops.sym_sp_bwd_op(g, zd, labd, lse, 10.0, False, None)
    assert dz.shape == shape and (dz == 0).all()


def test_sym_rows_without_terms():
    """Singleton classes, positives only: every lse is −inf, nothing flows back."""
    z, _, _, _, _ = _inputs(40, 5, torch.float32, "labels")
    lab = torch.arange(40)
    zd, labd = _dev(z, lab)
    lse, psum, pcnt = ops.sym_lse_fwd_op(zd, labd, 10.0, 1.0, 0.0, 0.0, False, None)
    assert torch.isneginf(lse).all() and (psum == 0).all() and (pcnt == 0).all()
    g = torch.ones(40, device=DEVICE)
    dz = ops.sym_lse_bwd_op(g, g, zd, labd, lse, 10.0, 1.0, 0.0, 0.0, False, None)
    assert (dz == 0).all()


def test_sym_non_finite_input_takes_the_general_path():
    """Delegation only: what the general kernels make of a NaN, against the contract, is
    test_robustness.py::test_ops_propagate_nan."""
    z, lab, _, _, _ = _inputs(37, 7, torch.float32, "labels")
    z[3, 2] = float("nan")
    zd, labd = _dev(z, lab)
    assert not bool(sym_launch.sym_plan(zd, 10.0, 1.0, 1.0, 0.0, None).ok)
    got = ops.sym_lse_fwd_op(zd, labd, 10.0, 1.0, 1.0, 0.0, False, None)
    general = ops.lse_fwd_op(zd, zd, labd, labd, 0, 10.0, 1.0, 1.0, 0.0, False, None)
    for a, c in zip(got, general):
        torch.testing.assert_close(a, c, rtol=0, atol=0, equal_nan=True)


def test_deterministic_algorithms_select_the_general_kernels():
    """The symmetric kernels add with atomics; under use_deterministic_algorithms the
    general (bitwise reproducible) kernels run instead, with their exact results."""
    z, lab, _, _, g = _inputs(70, 9, torch.float32, "labels")
    zd, labd = _dev(z, lab)
    args = (10.0, 1.0, 1.0, 0.0, False, None)
    general = ops.lse_fwd_op(zd, zd, labd, labd, 0, *args)
    g_lse = torch.randn(70, generator=g).to(DEVICE)
    dq, dk = ops.lse_bwd_op(g_lse, g_lse, zd, zd, labd, labd, general[0], 0, *args)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = ops.sym_lse_fwd_op(zd, labd, *args)
        dz = ops.sym_lse_bwd_op(g_lse, g_lse, zd, labd, general[0], *args)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, c in zip(got, general):
        assert torch.equal(a, c)
    assert torch.equal(dz, dq + dk)
    # ... which are the float64 contract's values.
    want = TS.sym_lse_fwd(z.double(), lab, *args)
    for name, a, e in zip(("lse", "psum", "pcnt"), got, want):
        assert_close_rel(a.cpu(), e, STAT_TOL, name)
    g64 = g_lse.double().cpu()
    exp = TS.sym_lse_bwd(g64, g64, z.double(), lab, general[0].double().cpu(), *args)
    assert_close_rel(dz.cpu(), exp, DZ_RTOL, "dz")


def test_sym_ops_are_the_engines_all_mode_path():
    eng = engine.get_engine("triton")
    assert eng.sym_lse is ops.SYM_OPS[0] and eng.sym_sp is ops.SYM_OPS[2]
    assert ops.sym_lse_fwd_op._qualname == "flashcon::triton_sym_lse_fwd"


@pytest.mark.parametrize("loss", ["supcon", "sincere", "tcl"])
def test_api_with_and_without_the_symmetric_path(loss, monkeypatch):
    """'all'-mode losses through the public API: symmetric and general kernels agree with the
    float64 reference, and the symmetric kernels run exactly when the path is on."""
    launched = []
    real = sym_launch._launch_sym

    def counting(name, *args, **kwargs):
        launched.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(sym_launch, "_launch_sym", counting)
    x = make_inputs(loss, 45, 2, 9, n_classes=5, dtype=torch.float32)
    f = x.pop("features")
    fn = getattr(flashcon, f"{loss}_loss")
    fr = f.double().clone().requires_grad_(True)
    ref = fn(
        fr,
        backend="reference",
        **{k: v.double() if v.is_floating_point() else v for k, v in x.items()},
    )
    ref.backward()
    try:
        for sym in (True, False):
            engine.set_symmetric(sym)
            fx = f.to(DEVICE).clone().requires_grad_(True)
            val = fn(fx, backend="triton", **{k: v.to(DEVICE) for k, v in x.items()})
            val.backward()
            kernels = set(launched)
            launched.clear()
            assert kernels == ({"_sym_fwd_kernel", "_sym_bwd_kernel"} if sym else set())
            # Measured: 4.4e-7 of the scale (loss and gradient).
            assert_close_rel(val.detach().cpu(), ref.detach(), 4e-6, "loss")
            assert_close_rel(fx.grad.cpu(), fr.grad, 4e-6, "dfeatures")
    finally:
        engine.set_symmetric(True)


# --------------------------------------------------------------------------------------------
# fp32 tile products on tensor cores: three TF32 products (config.dot_precision, lse._mma).
# Every fp32 parity test of the Triton kernels runs them (the interpreter computes the same
# split); these check the split itself and the sm_90 table's fp32 tiles.
# --------------------------------------------------------------------------------------------


def _tf32_ref(x: torch.Tensor) -> torch.Tensor:
    """float64: x rounded to 11 significant bits, to nearest, ties away from zero."""
    m, e = torch.frexp(x.double())  # |m| in [0.5, 1)
    r = torch.sign(m) * torch.floor(m.abs() * 2048 + 0.5)
    return torch.ldexp(r, e - 11)


@triton.jit
def _mma_probe(a_ptr, b_ptr, out_ptr, PREC: tl.constexpr, M: tl.constexpr, K: tl.constexpr,
               N: tl.constexpr):  # fmt: skip
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = _mma(a, b, tl.zeros([M, N], dtype=tl.float32), PREC)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc)


def _probe(a, b):
    """a·b through ``_mma`` with the fp32 precision the launchers pass, 64-row tiles (HGMMA
    on sm_90)."""
    prec = config.dot_precision(torch.float32)
    out = torch.empty(a.shape[0], b.shape[1], device=DEVICE)
    _mma_probe[(1,)](a.to(DEVICE), b.to(DEVICE), out, prec, a.shape[0], a.shape[1], b.shape[1])
    return out.cpu().double()


def test_fp32_products_split_into_tf32():
    """The split: hi = tf32(x) (ties away from zero), lo = tf32(x − hi), and a·b as
    a_lo·b_hi + a_hi·b_lo + a_hi·b_hi, within 3·2^-22 of |a|·|b| of the exact product; NaN
    stays NaN."""
    assert config.dot_precision(torch.float32) == "3xtf32"  # PyTorch's default precision
    assert config.dot_precision(torch.bfloat16) == "ieee"
    g = torch.Generator().manual_seed(3)
    # Exact probe of both roundings: x against c = 1 + 2^-12 (hi 1, lo 2^-12) gives
    # lo(x) + hi(x)·2^-12 + hi(x), each partial sum exact in fp32 for these x (checked).
    x = torch.cat([
        torch.tensor([1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11, 1 + 2**-11 - 2**-23, 0.0]),
        torch.randn(59, generator=g) * torch.logspace(-3, 3, 59),
    ])  # fmt: skip
    a = torch.zeros(64, 16)
    a[:, 0] = x
    b = torch.zeros(16, 16)
    b[0, :] = 1 + 2**-12
    hi = _tf32_ref(x)
    lo = _tf32_ref(x.double() - hi)
    assert hi[:4].tolist() == [1 + 2**-10, -(1 + 2**-10), 1 + 2**-9, 1.0]  # ties away
    want = lo + hi * 2**-12 + hi
    for partial in (lo, lo + hi * 2**-12, want):
        assert torch.equal(partial.float().double(), partial)
    assert torch.equal(_probe(a, b), want[:, None].expand(64, 16))
    # Random products: the split's sum to fp32 accumulation, the exact product to 3·2^-22.
    a = torch.randn(64, 32, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    b = torch.randn(32, 16, generator=g)
    out = _probe(a, b)
    a_hi, b_hi = _tf32_ref(a), _tf32_ref(b)
    a_lo, b_lo = _tf32_ref(a.double() - a_hi), _tf32_ref(b.double() - b_hi)
    split = a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi
    scale = a.double().abs() @ b.double().abs()
    assert ((out - split).abs() <= 3 * 32 * 2**-24 * scale).all()
    assert ((out - a.double() @ b.double()).abs() <= (3 * 2**-22 + 3 * 32 * 2**-24) * scale).all()
    # lo·lo is what is dropped: x = 1 + 1.5·2^-12 splits exactly (hi = 1, lo = 1.5·2^-12), so
    # Σ_16 x·x comes out as 16·(1 + 3·2^-12), without the 16·2.25·2^-24 an fp32 FMA keeps.
    x = torch.full((64, 16), 1 + 1.5 * 2**-12)
    assert (_probe(x, x[:16]) == 16 * (1 + 3 * 2**-12)).all()
    # NaN in either operand gives NaN, whatever its bits: rounding 0x7FFFFFFF (the NaN GPU
    # arithmetic produces) would carry into ±0; an inf gives a non-finite result.
    bits = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800000], dtype=torch.int32)
    a = torch.ones(64, 16)
    a[:4, 3] = bits.view(torch.float32)
    out = _probe(a, torch.ones(16, 16))
    assert out[:3].isnan().all() and not out[3].isfinite().any() and out[4:].eq(16).all()
    out = _probe(torch.ones(64, 16), a[:16].T.contiguous())
    assert out[:, :3].isnan().all() and not out[:, 3].isfinite().any() and out[:, 4:].eq(16).all()
    # TF32 wherever PyTorch allows it for fp32 matmuls, through either of its APIs (the older
    # getter raises once the newer API has been used).
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert config.dot_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert config.dot_precision(torch.float32) == "3xtf32"
        matmul.fp32_precision = old
        torch.set_float32_matmul_precision("high")
        assert config.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = old
    assert config.dot_precision(torch.float32) == "3xtf32"


@pytest.mark.gpu
def test_fp32_split_on_tensor_cores():
    """The same checks on the GPU, where the three products are TF32 tensor-core products
    (``make gpu-check`` runs ``pytest -m gpu``; without a GPU the test above covers them)."""
    test_fp32_products_split_into_tf32()


def test_fp32_sm90_tiles(monkeypatch):
    """sm_90's fp32 tiles (64 rows, 8 warps: the tensor-core products let them grow from
    sm_80's 32) against the contract at fp32's tolerances, forward and backward."""
    monkeypatch.setattr(config, "arch_of", lambda device: 90)
    seen = []
    real = sym_launch._launch_sym

    def spy(name, n, cfg, fl, args):
        seen.append((name, cfg.block_m, fl["DOT_PREC"]))
        return real(name, n, cfg, fl, args)

    monkeypatch.setattr(sym_launch, "_launch_sym", spy)
    z, lab, ml, pw, g = _inputs(200, 33, torch.float32, "multilabel")
    _check_lse(z, lab, 10.0, WEIGHTS[3], ml, pw, g)
    assert {s[0] for s in seen} == {"_sym_fwd_kernel", "_sym_bwd_kernel"}
    assert {s[1:] for s in seen} == {(64, "3xtf32")}
