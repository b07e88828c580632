"""Ahead-of-time build report of the Triton engine kernels (no GPU needed).

Compiles every kernel specialisation the launchers of ``flashcon.triton_kernels`` can
choose — each kernel × compile-time flag combination × input dtype (fp32 once per dot
precision) × D bucket of the tile table × architecture — with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``, then reads each cubin with the ``cuobjdump`` shipped in
Triton's wheel: registers, stack/local memory (spills), shared memory, and whether the SASS
holds tensor-core instructions (HMMA; HGMMA on sm_90).

Exits non-zero on a compile failure, any spill, shared memory over the architecture's limit
(sm_80: 163 KB, sm_90: 227 KB dynamic), or a tile product without tensor-core instructions
(every product is one: 16-bit inputs directly, fp32 ones as "3xtf32" or "tf32", see
``config.dot_precision``).

    python -m flashcon.tools.kernel_report            # everything, both architectures
    python -m flashcon.tools.kernel_report --arch 90 --quick -j 2

Must run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled); the tool
clears it for its own process before importing the kernels.

The specialisations one loss call launches, their occupancy, hot-loop SASS counts and a
predicted GPU time: ``python -m flashcon.tools.cost_model`` (compiles through this module's
``Spec`` and ``_signature``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32")
KERNELS = (
    "_lse_fwd_kernel",
    "_sp_fwd_kernel",
    "_bwd_dq_kernel",
    "_bwd_dk_kernel",
    "_sym_fwd_kernel",
    "_sym_bwd_kernel",
    "_prep_kernel",
    "_plan_kernel",
    "_finish_kernel",
    "_bwd_prep_kernel",
    "_bwd_finish_kernel",
)
SYM_KERNELS = ("_sym_fwd_kernel", "_sym_bwd_kernel")
# fused.py's small kernels around the symmetric path: no tile products, fixed tiles
# (fused_launch._ROWS × fused_launch._COLS, 4 warps); the flag sets the launchers pass.
SMALL_KERNELS = {
    "_prep_kernel": [{"N_SUMS": 4, "LABELS": lab} for lab in (0, 1, 2)],
    "_plan_kernel": [{"HAS_K1": k1, "HAS_TERMS": True} for k1 in (False, True)],
    "_finish_kernel": [
        {"LOSS": 0, "STAGE": 0, "HAS_K1": False},
        {"LOSS": 0, "STAGE": 0, "HAS_K1": True},
        {"LOSS": 1, "STAGE": 0, "HAS_K1": False},
        {"LOSS": 1, "STAGE": 1, "HAS_K1": False},
    ],
    "_bwd_prep_kernel": [
        {"LOSS": 0, "HAS_K1": False},
        {"LOSS": 0, "HAS_K1": True},
        {"LOSS": 1, "HAS_K1": False},
    ],
    "_bwd_finish_kernel": [{}],
}
# The small kernels whose pointers have the input dtype (the others are fp32 throughout).
TYPED_SMALL = ("_prep_kernel", "_bwd_finish_kernel")


@dataclasses.dataclass(frozen=True)
class Spec:
    kernel: str
    arch: int
    dtype: str
    prec: str
    bucket: str
    flags: tuple[tuple[str, object], ...]
    cfg: tuple[int, int, int, int, int, int]  # block_m, block_n, block_d, block_do, warps, stages

    @property
    def label(self) -> str:
        fl = ",".join(f"{k}={int(v)}" for k, v in self.flags)
        prec = f"/{self.prec}" if self.dtype == "fp32" else ""
        bm, bn, bd, bdo, w, st = self.cfg
        tiles = f"{bm}x{bn}x{bd}" + (f"/{bdo}" if bdo else "") + f" w{w} s{st}"
        return f"{self.kernel.strip('_')}[{self.dtype}{prec},{self.bucket},{fl}] {tiles}"


def _clear_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        os.environ["TRITON_INTERPRET"] = "0"


def specs(archs, quick: bool) -> list[Spec]:
    """Every specialisation the launchers can pick (``quick``: the heaviest flag set only)."""
    _clear_interpreter()
    import torch

    from flashcon.triton_kernels import config as C
    from flashcon.triton_kernels import fused_launch as FL

    out: list[Spec] = []
    seen = set()
    for arch, dtype in itertools.product(archs, DTYPES):
        bits = 32 if dtype == "fp32" else 16
        precs = C.FP32_PRECISIONS if dtype == "fp32" else ("ieee",)
        for kernel, prec in itertools.product(KERNELS, precs):
            if kernel in SMALL_KERNELS:
                continue
            sym = kernel in SYM_KERNELS
            kind = "fwd" if "fwd" in kernel else "bwd"
            buckets = ("any",) if kind == "fwd" or sym else ("narrow", "wide")
            tdtype = {16: torch.float16, 32: torch.float32}[bits]
            if sym and (arch, f"sym_{kind}", bits, "res") in C.CONFIGS:
                # Resident tiles for D <= 64 and D <= 128, streamed ones above.
                buckets = ("res64", "res128", "any")
            for bucket in buckets:
                resident = bucket.startswith("res")
                if sym:
                    c, resident = C.sym_tiles(
                        f"sym_{kind}", arch, tdtype, int(bucket[3:]) if resident else 1 << 20
                    )
                else:
                    c = C.pick_config(
                        "sp" if kernel == "_sp_fwd_kernel" else kind,
                        arch,
                        tdtype,
                        64 if bucket in ("narrow", "any") else 128,
                    )
                cfg = (c.block_m, c.block_n, c.block_d, c.block_do, c.num_warps, c.num_stages)
                modes = (0, 1) if kind == "bwd" or sym else (None,)
                for mode in modes:
                    has_k1 = kernel == "_lse_fwd_kernel" or mode == 0
                    grid = {
                        "HAS_K1": (False, True),
                        "HAS_SELF": (True,) if quick else (False, True),
                        "MULTILABEL": (False, True),
                        "HAS_PW": (False, True),
                        # The symmetric path's fallback (lse kernels only, self_offset 0).
                        "GATED": (True,) if quick else (False, True),
                        "EVEN_D": (False,) if quick else (False, True),
                    }
                    if not has_k1:
                        grid["HAS_K1"] = (False,)
                        grid["HAS_PW"] = (False,)  # the softplus pass never gets a mask
                        grid["GATED"] = (False,)
                    if sym:  # no self offset (always excluded) and no gate flag
                        grid["HAS_SELF"] = (True,)
                        grid["GATED"] = (False,)
                    for vals in itertools.product(*grid.values()):
                        fl = dict(zip(grid, vals))
                        if fl["HAS_PW"] and (fl["MULTILABEL"] or fl["HAS_K1"]):
                            # A mask replaces the labels (launchers clear MULTILABEL); with k1
                            # the ops run torch_stream (see triton_kernels/ops.py).
                            continue
                        if fl["GATED"] and not fl["HAS_SELF"]:
                            continue
                        heavy = fl["HAS_PW"] or (fl["MULTILABEL"] and (fl["HAS_K1"] or not has_k1))
                        if quick and not heavy:
                            continue  # quick: the heaviest set with labels, and with a mask
                        if kernel == "_sp_fwd_kernel":
                            del fl["HAS_K1"], fl["HAS_PW"], fl["GATED"]
                        if sym:
                            del fl["HAS_SELF"], fl["GATED"]
                            d = int(bucket[3:]) if resident else 1 << 20
                            tiles = C.sym_tiles(f"sym_{kind}", arch, tdtype, d, fl["HAS_PW"])
                            if tiles != (c, resident):
                                continue  # these flags take other tiles at this D
                            fl["RESIDENT"] = resident
                        elif kernel != "_sp_fwd_kernel" and mode == 1:
                            del fl["GATED"]
                        if mode is not None:
                            fl = {"MODE": mode, **fl}
                        for chunk in _chunk_values(kernel, fl.get("RESIDENT", False), quick):
                            flt = tuple(fl.items()) + chunk
                            # Buckets with identical tiles are one compiled kernel.
                            key = (kernel, arch, dtype, prec, flt, cfg)
                            if key in seen:
                                continue
                            seen.add(key)
                            out.append(Spec(kernel, arch, dtype, prec, bucket, flt, cfg))
        out += [sp for sp in _tuned_specs(arch, dtype) if sp not in out]
        for kernel, flag_sets in SMALL_KERNELS.items():
            if dtype != "fp32" and kernel not in TYPED_SMALL:
                continue
            for fl in flag_sets:
                rows = FL._PREP_ROWS if kernel == "_prep_kernel" else FL._ROWS
                cfg = (rows, 0, FL._COLS, 0, FL.SMALL_WARPS, FL.SMALL_STAGES)
                out.append(Spec(kernel, arch, dtype, "-", "any", tuple(fl.items()), cfg))
    return out


def _tuned_specs(arch: int, dtype: str) -> list[Spec]:
    """The specialisations of the tuned table's entries (``triton_kernels/tuning.py``) for
    ``arch`` and ``dtype``: the launchers pick those too."""
    from flashcon.triton_kernels import tuning

    out = []
    for base, by_n in tuning.load().items():
        t_arch, kind, t_dtype, dbucket, flagstr = base.split("|")
        if t_arch != f"sm{arch}" or t_dtype != dtype:
            continue
        flags = dict(kv.split("=") for kv in flagstr.split(","))
        prec = flags.pop("DOT_PREC")
        kernel = f"_{kind}_kernel"
        for choice in by_n.values():
            d = {"d64": 64, "d128": 128}.get(dbucket, 1 << 20)
            fl = {"MODE": int(flags["MODE"])}
            fl.update({k: flags[k] == "1" for k in ("HAS_K1", "MULTILABEL", "HAS_PW")})
            t = choice.tile_config(d)
            cfg = (t.block_m, t.block_n, t.block_d, t.block_do, t.num_warps, t.num_stages)
            chunks = _chunk_values(kernel, choice.resident, False)
            for even, chunk in itertools.product((False, True), chunks):
                flt = tuple({**fl, "EVEN_D": even, "RESIDENT": choice.resident}.items()) + chunk
                out.append(Spec(kernel, arch, dtype, prec, f"tuned-{dbucket}", flt, cfg))
    return out


def _chunk_values(kernel: str, resident: bool, quick: bool) -> list[tuple]:
    """The symmetric kernels' CHUNK as the runtime passes it: Triton makes an integer argument
    equal to 1 a compile-time constant, and CHUNK is 1 in every streamed backward and in the
    others below 64 row blocks; else a runtime i32 (no entry). Quick: the resident ones."""
    if kernel not in SYM_KERNELS:
        return [()]
    if kernel == "_sym_bwd_kernel" and not resident:
        return [(("CHUNK", 1),)]
    if quick and not resident:
        return [()]
    return [(), (("CHUNK", 1),)]


def _signature(fn, spec: Spec) -> tuple[dict, dict, dict]:
    ptr = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[spec.dtype]
    bm, bn, bd, bdo, _, _ = spec.cfg
    const = dict(spec.flags)
    if spec.kernel in SMALL_KERNELS:
        return _small_signature(fn, spec, ptr, const)
    if "GATED" in fn.arg_names:
        const.setdefault("GATED", False)
    if "BLOCK" in fn.arg_names:  # the symmetric kernels' square tiles
        const.update(DOT_PREC=spec.prec, BLOCK=bm, BLOCK_D=bd)
    else:
        const.update(DOT_PREC=spec.prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    if "BLOCK_DO" in fn.arg_names:
        const["BLOCK_DO"] = bdo
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "dq_ptr", "dk_ptr", "z_ptr"):
            sig[name] = ptr
        elif name in ("qlab_ptr", "klab_ptr", "lab_ptr"):
            sig[name] = "*i64"
        elif name in ("pw_ridx_ptr", "pw_cidx_ptr", "gate_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("scale", "log_w_pos", "log_w_neg", "log_k1"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        # What the runtime specialises on: torch allocations are 16-byte aligned, and the
        # launchers pad D to a multiple of 16 (``arguments.D_ALIGN``), so D and the row strides
        # of the inputs and outputs are multiples of 16.
        aligned = name == "D" or name.startswith("stride")
        if sig[name].startswith("*") or aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def _small_signature(fn, spec: Spec, ptr: str, const: dict) -> tuple[dict, dict, dict]:
    from flashcon.triton_kernels import fused_launch, sym_launch

    const["BLOCK_R"] = spec.cfg[0]
    if "BLOCK_D" in fn.arg_names:
        const["BLOCK_D"] = spec.cfg[2]
    if "RANGE" in fn.arg_names:
        const["RANGE"] = sym_launch.SYM_RANGE
    if "BLOCK_P" in fn.arg_names:
        const.pop("BLOCK_R")
        const["BLOCK_P"] = fused_launch._PLAN_BLOCK
    floats = ("scale", "c_pos", "c_neg", "log_cmax", "log_spread", "log_k1", "weight")
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name == "z_ptr" or (
            spec.kernel == "_bwd_finish_kernel" and name in ("out_ptr", "dq_ptr", "dk_ptr")
        ):
            sig[name] = ptr
        elif name in ("gate_ptr", "fgate_ptr"):
            sig[name] = "*i32"
        elif name == "lab_in_ptr":  # multi-hot labels arrive as uint8 [B, L]
            sig[name] = "*u8" if const.get("LABELS") == 1 else "*i64"
        elif name == "lab_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in floats or name == "BIG":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        # As the runtime specialises them: the launchers pass 16-byte aligned buffers, and D
        # (padded) and the strides of padded buffers are multiples of 16.
        if sig[name].startswith("*") or name in _ALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


_ALIGNED_INTS = ("D", "stride_z", "stride_dz", "stride_dq", "stride_dk")


def launch_maxnreg() -> int:
    from flashcon.triton_kernels import config

    return config.MAXNREG


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_one(spec: Spec) -> dict:
    """Compile one specialisation and read its resources; never raises (errors are rows)."""
    _clear_interpreter()
    row = {"label": spec.label, "arch": spec.arch, "spec": spec}
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from flashcon.triton_kernels import fused as F
        from flashcon.triton_kernels import lse as K
        from flashcon.triton_kernels import sym as S

        mod = S if spec.kernel in SYM_KERNELS else F if spec.kernel in SMALL_KERNELS else K
        fn = getattr(mod, spec.kernel)
        sig, const, attrs = _signature(fn, spec)
        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
        _, _, _, _, warps, stages = spec.cfg
        t0 = time.time()
        ck = triton.compile(
            src,
            target=GPUTarget("cuda", spec.arch, 32),
            options={"num_warps": warps, "num_stages": stages, "maxnreg": launch_maxnreg()},
        )
        row["compile_s"] = time.time() - t0
        cubin = ck.asm["cubin"]
        row["shared"] = int(ck.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(cubin)
            cuobjdump = str(_tools() / "cuobjdump")
            res = subprocess.run(
                [cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True
            ).stdout
            sass = subprocess.run(
                [cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True
            ).stdout
        fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
        row["regs"] = int(fields.get("REG", -1))
        row["stack"] = int(fields.get("STACK", 0))
        row["local"] = int(fields.get("LOCAL", 0))
        row["shared"] = max(row["shared"], int(fields.get("SHARED", 0)))
        row["hmma"] = len(re.findall(r"\bHMMA\b", sass))
        row["hgmma"] = len(re.findall(r"\bHGMMA\b", sass))
        row["ffma"] = len(re.findall(r"\bFFMA\b", sass))
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
    return row


def verdict(row: dict) -> list[str]:
    spec: Spec = row["spec"]
    if "error" in row:
        return [f"compile failed: {row['error']}"]
    bad = []
    if row["stack"] or row["local"]:
        bad.append(f"spills (stack {row['stack']} B, local {row['local']} B)")
    if row["shared"] > SHARED_LIMIT[spec.arch]:
        bad.append(f"shared {row['shared']} B > {SHARED_LIMIT[spec.arch]} B")
    has_products = spec.kernel not in SMALL_KERNELS
    if has_products and not (row["hmma"] or row["hgmma"]):
        bad.append("no tensor-core instruction (HMMA/HGMMA) for a tile product")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, choices=(80, 90), action="append", help="repeatable")
    p.add_argument("--quick", action="store_true", help="one (heaviest) flag set per kernel")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--kernel", choices=KERNELS, action="append", help="restrict (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, action="append", help="restrict (repeatable)")
    args = p.parse_args(argv)
    archs = tuple(args.arch or (80, 90))
    todo = specs(archs, args.quick)
    if args.kernel:
        todo = [s for s in todo if s.kernel in args.kernel]
    if args.dtype:
        todo = [s for s in todo if s.dtype in args.dtype]
    print(f"compiling {len(todo)} specialisations for sm_{', sm_'.join(map(str, archs))} "
          f"with {args.jobs} jobs", flush=True)  # fmt: skip
    rows = []
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        futs = [ex.submit(compile_one, s) for s in todo]
        for i, f in enumerate(cf.as_completed(futs), 1):
            row = f.result()
            rows.append(row)
            status = "FAIL" if verdict(row) else "ok"
            print(f"[{i}/{len(todo)} {time.time() - t0:6.1f}s] {status:4} sm_{row['arch']} "
                  f"{row['label']}", file=sys.stderr, flush=True)  # fmt: skip
    rows.sort(key=lambda r: (r["arch"], r["label"]))
    width = max(len(r["label"]) for r in rows) if rows else 10
    head = (
        f"{'kernel specialisation':{width}}  arch   regs  spill(B)  smem(B)  HMMA  HGMMA  verdict"
    )
    print(head)
    print("-" * len(head))
    failed = 0
    for r in rows:
        bad = verdict(r)
        failed += bool(bad)
        if "error" in r:
            print(f"{r['label']:{width}}  sm_{r['arch']}  {'-':>4}  {'-':>8}  {'-':>7}  {'-':>4}  "
                  f"{'-':>5}  FAIL: {'; '.join(bad)}")  # fmt: skip
            continue
        spill = r["stack"] + r["local"]
        mark = "ok" if not bad else "FAIL: " + "; ".join(bad)
        if not bad and r["spec"].kernel in SMALL_KERNELS:
            mark = "ok (no tile products)"
        print(f"{r['label']:{width}}  sm_{r['arch']}  {r['regs']:>4}  {spill:>8}  "
              f"{r['shared']:>7}  {r['hmma']:>4}  {r['hgmma']:>5}  {mark}")  # fmt: skip
    print(f"{len(rows)} specialisations, {failed} failing, {time.time() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    _clear_interpreter()
    sys.exit(main())
