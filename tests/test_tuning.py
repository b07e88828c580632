"""The tuned table of the symmetric kernels: its keys, the launchers' use of it, and the
tuner's orchestration with stand-in compile and timing functions (the timing itself needs a
GPU: ``python -m flashcon.tools.tune``)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from flashcon.backends import torch_stream as TS  # noqa: E402
from flashcon.testing import assert_close_rel  # noqa: E402
from flashcon.tools import tune as T  # noqa: E402
from flashcon.triton_kernels import config, sym_launch, tuning  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLAGS = {"MODE": 0, "HAS_K1": False, "MULTILABEL": False, "HAS_PW": False, "DOT_PREC": "3xtf32"}


def test_keys_and_buckets():
    k = tuning.key(90, "sym_fwd", torch.bfloat16, 128, 5000, {**FLAGS, "DOT_PREC": "ieee"})
    assert k == "sm90|sym_fwd|bf16|d128|MODE=0,HAS_K1=0,MULTILABEL=0,HAS_PW=0,DOT_PREC=ieee|n16384"
    assert [tuning.n_bucket(n) for n in (1, 4096, 4097, 65536, 65537)] == [
        "n4096", "n4096", "n16384", "n65536", "n65536+",
    ]  # fmt: skip
    assert [tuning.d_bucket(d) for d in (1, 64, 65, 128, 129)] == [
        "d64", "d64", "d128", "d128", "dwide",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="kind"):
        tuning.key(90, "fwd", torch.bfloat16, 128, 1, FLAGS)


def test_legal_choices():
    res_fwd = tuning.Choice(64, 128, 0, 8, 2, True)
    res_bwd = tuning.Choice(64, 128, 128, 8, 2, True)
    assert tuning.legal(res_fwd, "sym_fwd", torch.bfloat16, 128, False)
    assert not tuning.legal(res_fwd, "sym_fwd", torch.float32, 128, False)  # 16-bit rows only
    assert not tuning.legal(res_fwd, "sym_fwd", torch.bfloat16, 129, False)  # D > block_d
    assert not tuning.legal(res_fwd, "sym_bwd", torch.bfloat16, 128, False)  # no output chunk
    assert tuning.legal(res_bwd, "sym_bwd", torch.bfloat16, 128, False)
    assert not tuning.legal(res_bwd, "sym_bwd", torch.bfloat16, 128, True)  # a mask streams
    streamed = tuning.Choice(64, 32, 32, 8, 2, False, chunk=4)
    assert not tuning.legal(streamed, "sym_bwd", torch.float32, 128, False)  # one tile each


@pytest.mark.parametrize("kind", tuning.KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_candidates_are_legal_distinct_and_hold_the_fixed_table(kind, dtype):
    cands = tuning.candidates(kind, dtype, 128)
    assert len(cands) >= 4 and len(set(cands)) == len(cands)
    assert all(tuning.legal(c, kind, dtype, 128, False) for c in cands)
    cfg, resident = config.sym_tiles(kind, 90, dtype, 128)
    fixed = tuning.Choice(
        cfg.block_m, cfg.block_d, cfg.block_do, cfg.num_warps, cfg.num_stages, resident
    )
    assert fixed in cands


def _table(tmp_path, entries, monkeypatch):
    path = tmp_path / "tuned.json"
    tuning.write(entries, {"device": "test"}, path)
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    return path


def test_table_round_trip_and_lookup(tmp_path, monkeypatch):
    c = tuning.Choice(32, 32, 0, 4, 3, False, chunk=2, maxnreg=False)
    k = tuning.key(80, "sym_fwd", torch.float32, 16, 100, FLAGS)
    _table(tmp_path, {k: {"choice": c.as_dict(), "ms": 1.0}}, monkeypatch)
    assert tuning.lookup(80, "sym_fwd", torch.float32, 16, 100, FLAGS) == c
    # Another N bucket, dtype, kernel, flag set or architecture: the fixed table.
    assert tuning.lookup(80, "sym_fwd", torch.float32, 16, 5000, FLAGS) is None
    assert tuning.lookup(80, "sym_fwd", torch.bfloat16, 16, 100, FLAGS) is None
    assert tuning.lookup(80, "sym_bwd", torch.float32, 16, 100, FLAGS) is None
    assert tuning.lookup(80, "sym_fwd", torch.float32, 16, 100, {**FLAGS, "HAS_K1": True}) is None
    assert tuning.lookup(90, "sym_fwd", torch.float32, 16, 100, FLAGS) is None
    monkeypatch.setenv(tuning.TABLE_ENV, "off")
    assert tuning.lookup(80, "sym_fwd", torch.float32, 16, 100, FLAGS) is None
    monkeypatch.setenv(tuning.TABLE_ENV, str(tmp_path / "none.json"))
    assert tuning.load() == {}


def test_table_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        tuning.write({"a|b|c|d|e|f": {"choice": {"block": 64, "colour": 1}}}, {}, tmp_path / "t")
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"version": 0, "entries": {}}))
    with pytest.raises(ValueError, match="version"):
        tuning.load(path)


def test_the_shipped_table_is_readable_and_legal():
    table = tuning.load(tuning.TABLE)  # {} until a GPU run has written one
    for base, by_n in table.items():
        arch, kind, dtype, dbucket, _ = base.split("|")
        tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        d = {"d64": 64, "d128": 128}.get(dbucket, 256)
        for choice in by_n.values():
            assert tuning.legal(choice, kind, tdtype, d, False), (base, choice)


def test_launchers_take_the_tuned_choice(tmp_path, monkeypatch):
    """A tuned entry for this launch's key reaches the kernels (tiles, partner runs, warps)
    and the results still hold against the float64 contract; other keys keep the table."""
    n, d = 130, 16
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(3)))
    lab = torch.arange(n) % 5
    arch = config.arch_of(torch.device(DEVICE))
    prec = config.dot_precision(torch.float32)
    fwd = tuning.Choice(16, 16, 0, 2, 1, False, chunk=3, maxnreg=False)
    bwd = tuning.Choice(16, 16, 16, 2, 1, False)
    fl = {**FLAGS, "DOT_PREC": prec}
    entries = {
        tuning.key(arch, "sym_fwd", torch.float32, d, n, fl): {"choice": fwd.as_dict(), "ms": 1},
        tuning.key(arch, "sym_bwd", torch.float32, d, n, fl): {"choice": bwd.as_dict(), "ms": 1},
    }
    _table(tmp_path, entries, monkeypatch)
    seen = []
    real = sym_launch._launch_sym

    def spy(name, n_, cfg, fl_, args):
        seen.append((name, cfg))
        return real(name, n_, cfg, fl_, args)

    monkeypatch.setattr(sym_launch, "_launch_sym", spy)
    zd, labd = z.to(DEVICE), lab.to(DEVICE)
    lse, psum, pcnt = sym_launch.sym_lse_fwd(zd, labd, 10.0, 1.0, 1.0, 0.0)
    want = TS.sym_lse_fwd(z.double(), lab, 10.0, 1.0, 1.0, 0.0, False, None)
    for name, got, exp in zip(("lse", "psum", "pcnt"), (lse, psum, pcnt), want):
        assert_close_rel(got.cpu(), exp, 2e-6, name)
    g = torch.randn(n, generator=torch.Generator().manual_seed(4))
    dz = sym_launch.sym_lse_bwd(g.to(DEVICE), g.to(DEVICE), zd, labd, lse, 10.0, 1.0, 1.0, 0.0)
    exp = TS.sym_lse_bwd(
        g.double(), g.double(), z.double(), lab, lse.cpu().double(), 10.0, 1.0, 1.0, 0.0, False,
        None,
    )  # fmt: skip
    assert_close_rel(dz.cpu(), exp, 5e-6, "dz")
    cfgs = dict(seen)
    assert cfgs["_sym_fwd_kernel"] == config.TileConfig(16, 16, 16, 0, 2, 1, 3, False)
    assert cfgs["_sym_bwd_kernel"] == config.TileConfig(16, 16, 16, 16, 2, 1, 0, True)
    # With k1 (another flag set) the fixed table's tiles.
    seen.clear()
    sym_launch.sym_lse_fwd(zd, labd, 10.0, 1.0, 1.0, 5.0)
    default, _ = config.sym_tiles("sym_fwd", arch, torch.float32, d)
    assert dict(seen)["_sym_fwd_kernel"] == default


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_tune_picks_the_fastest_compiled_candidate_within_the_budget():
    work = [(f"key{i}", T.Task("lse", "sym_fwd", "bf16", n)) for i, n in enumerate((1, 2, 3))]
    cands = {t: [tuning.Choice(64, 64, 0, w, 2, False) for w in (2, 4, 8)] for _, t in work}
    clock = _Clock()
    compiled = []

    def compile_all(pairs):
        compiled.extend(pairs)
        # warps = 8 fails to compile for the first task: never timed.
        return {
            i: "shared memory" for i, (t, c) in enumerate(pairs) if t.n == 1 and c.num_warps == 8
        }

    timed = []

    def measure(task, c):
        assert compiled, "timed before everything was compiled"
        timed.append((task.n, c.num_warps))
        clock.t += 10.0
        if task.n == 2 and c.num_warps == 4:
            return None  # a failed launch is no winner
        return {2: 3e-3, 4: 2e-3, 8: 1e-3}[c.num_warps] * task.n

    def default(task):
        return cands[task][0]

    entries = T.tune(
        work, lambda t: cands[t], compile_all, measure, default, budget_s=45.0, clock=clock
    )
    assert len(compiled) == 9
    assert (1, 8) not in timed
    assert entries["key0"]["choice"]["num_warps"] == 4 and entries["key0"]["failed"] == 1
    assert entries["key0"]["ms"] == pytest.approx(2.0) and entries["key0"]["default_ms"] == 3.0
    assert entries["key1"]["choice"]["num_warps"] == 8 and entries["key1"]["timed"] == 2
    # 50 s of timing after two keys, over the 45 s budget: the third is not taken.
    assert "key2" not in entries


def test_tasks_cover_every_family_kernel_dtype_and_size():
    ts = T.tasks()
    assert len(ts) == len(T.FAMILIES) * 2 * len(T.DTYPES) * len(T.NS) == len(set(ts))
    assert ts[0] == T.Task("lse", "sym_fwd", "bf16", max(T.NS))
    # The keys of the tasks are distinct: one entry each.
    keys = {tuning.key(90, t.kind, T._torch_dtype(t.dtype), t.d, t.n, t.flags("p")) for t in ts}
    assert len(keys) == len(ts)
