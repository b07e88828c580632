"""Compiling the launched specialisations as kernel_report does (cached: resources and SASS
text), counting a call's device operations, and collecting the counts JSON of the importable
package or of another checkout."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .launches import launched
from .sass import analyse


def _cache_dir() -> Path:
    p = Path(os.environ.get("FLASHCON_COST_CACHE", Path(tempfile.gettempdir()) / "flashcon-cost"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def _sources_hash() -> str:
    from flashcon.triton_kernels import sym

    h = hashlib.sha256()
    for f in (Path(sym.__file__).parent / name for name in ("sym.py", "lse.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def compile_kernel(spec, d: int) -> dict:
    """Compile one specialisation as kernel_report does and analyse its SASS (the compile is
    cached: resources and SASS text)."""
    os.environ["TRITON_INTERPRET"] = "0"
    import triton

    from flashcon.tools import kernel_report as KR

    key = hashlib.sha256(
        repr((spec, triton.__version__, KR.launch_maxnreg(), _sources_hash())).encode()
    ).hexdigest()[:20]
    path = _cache_dir() / f"{spec.kernel.strip('_')}-sm{spec.arch}-{key}.json"
    if not path.exists():
        path.write_text(json.dumps(_compile(spec)))
    row = json.loads(path.read_text())
    sass = row.pop("sass_text")
    names = {k: v for k, v in row.pop("constexprs").items() if isinstance(v, int)} | {"D": d}
    row["sass"] = analyse(sass, names)
    return row


def _compile(spec) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashcon.tools import kernel_report as KR
    from flashcon.triton_kernels import sym as S

    fn = getattr(S, spec.kernel)
    sig, const, attrs = KR._signature(fn, spec)
    warps, stages = spec.cfg[4], spec.cfg[5]
    ck = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
        target=GPUTarget("cuda", spec.arch, 32),
        options={"num_warps": warps, "num_stages": stages, "maxnreg": KR.launch_maxnreg()},
    )
    tools = KR._tools()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        res = subprocess.run(
            [str(tools / "cuobjdump"), "-res-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [str(tools / "nvdisasm"), "--print-line-info", "-c", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    return {
        "kernel": spec.kernel,
        "arch": spec.arch,
        "dtype": spec.dtype,
        "prec": spec.prec,
        "flags": dict(spec.flags),
        "cfg": list(spec.cfg),
        "warps": warps,
        "regs": int(fields.get("REG", -1)),
        "stack": int(fields.get("STACK", 0)),
        "local": int(fields.get("LOCAL", 0)),
        "shared": max(int(ck.metadata.shared), int(fields.get("SHARED", 0))),
        "constexprs": {k: v for k, v in const.items() if isinstance(v, (bool, int, str))},
        "sass_text": sass,
    }


def kernel_label(row: dict) -> str:
    fl = ",".join(f"{k}={int(v)}" for k, v in row["flags"].items())
    bm, bn, bd, bdo, w, st = row["cfg"]
    prec = f"/{row['prec']}" if row["dtype"] == "fp32" else ""
    tiles = f"{bm}x{bn}x{bd}" + (f"/{bdo}" if bdo else "") + f" w{w} s{st}"
    return f"{row['kernel'].strip('_')}[{row['dtype']}{prec},{fl}] {tiles} sm_{row['arch']}"


def count_ops(pythonpath: str | None = None) -> dict:
    """Device operations of one fwd+bwd per loss ('all' mode, backend='triton'), by
    ``launch_count`` under the interpreter: {loss: {"aten": k, "triton": k}}. Only
    ``pythonpath`` is on the path (not an outer PYTHONPATH's Triton: the interpreter runs the
    environment's own)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    script = Path(__file__).resolve().parent.parent / "launch_count.py"
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900
    ).stdout
    ops: dict = {}
    loss = None
    for line in out.splitlines():
        m = re.match(r"(\w+): (\d+) device operations", line)
        if m:
            loss = m.group(1)
            ops[loss] = {"aten": 0, "triton": 0}
            continue
        m = re.match(r"\s+(\d+)\s+(\S+)", line)
        if m and loss:
            ops[loss]["triton" if m.group(2).startswith("triton:") else "aten"] += int(m.group(1))
    if not ops:
        raise RuntimeError(f"launch_count printed no counts:\n{out[-2000:]}")
    return ops


def _commit(tree: Path) -> str:
    r = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    sha = r.stdout.strip() or "unknown"
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--", "triton_kernels"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return sha + ("+modified" if dirty else "")


def collect(
    losses, dtypes, archs, ns, d: int, ops: bool = True, pythonpath=None, jobs: int = 1
) -> dict:
    """Counts JSON of the importable package: the specialisations each call launches, their
    resources and SASS counts, the launches' programs, and the device operations per loss."""
    import concurrent.futures as cf

    import triton

    from flashcon.tools import kernel_report as KR
    from flashcon.triton_kernels import sym

    tree = Path(sym.__file__).resolve().parent.parent
    data = {
        "commit": _commit(tree),
        "triton": triton.__version__,
        "maxnreg": KR.launch_maxnreg(),
        "d": d,
        "kernels": {},
        "calls": [],
        "ops": count_ops(pythonpath) if ops else {},
        "compile": (
            "kernel_report._signature / Spec of each launch; triton.compile(ASTSource, "
            "target=GPUTarget('cuda', arch, 32), options num_warps, num_stages (the launcher's "
            "tiles) and maxnreg); nvdisasm --print-line-info, cuobjdump -res-usage"
        ),
    }
    todo = [
        (loss, dtype, arch, n) for loss in losses for dtype in dtypes for arch in archs for n in ns
    ]
    calls = {key: launched(*key, d) for key in todo}
    specs = list(dict.fromkeys(lk["spec"] for lks in calls.values() for lk in lks))
    if jobs > 1:
        with cf.ProcessPoolExecutor(max_workers=jobs) as ex:
            rows = dict(zip(specs, ex.map(compile_kernel, specs, [d] * len(specs))))
    else:
        rows = {spec: compile_kernel(spec, d) for spec in specs}
    for (loss, dtype, arch, n), lks in calls.items():
        launches = []
        for lk in lks:
            row = rows[lk["spec"]]
            label = kernel_label(row)
            data["kernels"][label] = row
            launches.append(
                {
                    "kernel": label,
                    "grid": lk["grid"],
                    "chunk": lk["chunk"],
                    "programs": lk["programs"],
                }
            )
        data["calls"].append(
            {"loss": loss, "dtype": dtype, "arch": arch, "n": n, "launches": launches}
        )
    return data


def collect_tree(tree: Path, argv: list[str]) -> dict:
    """``collect`` for another checkout (e.g. a worktree of the measured commit): its
    ``python/flashcon`` and ``triton_kernels`` as a package under the cache, this package run
    there (as the top-level ``cost_model``: that checkout's ``flashcon`` may have none) with
    that checkout's package first on the path."""
    sha = _commit(tree)
    pkg = _cache_dir() / f"tree-{sha[:12]}"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(
        tree / "python" / "flashcon",
        pkg / "flashcon",
        ignore=shutil.ignore_patterns("_C*.so", "__pycache__"),
    )
    shutil.copytree(
        tree / "triton_kernels",
        pkg / "flashcon" / "triton_kernels",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    out = pkg / "counts.json"
    # The checkout's package first, then the folder holding this package; an existing
    # PYTHONPATH (e.g. another Triton) after them.
    here = Path(__file__).resolve().parent
    path = os.pathsep.join(
        p for p in (str(pkg), str(here.parent), os.environ.get("PYTHONPATH", "")) if p
    )
    env = dict(
        os.environ, PYTHONPATH=path, TRITON_INTERPRET="0", FLASHCON_COST_CACHE=str(_cache_dir())
    )
    cmd = [sys.executable, "-m", here.name, "--collect-worker", str(out), *argv]
    subprocess.run(cmd, env=env, check=True)
    data = json.loads(out.read_text())
    data["commit"] = sha
    return data
