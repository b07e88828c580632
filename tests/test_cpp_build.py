"""Resource usage of the compiled CUDA kernels of flashcon._C (no GPU needed).

Reads the cubins embedded in the extension with ``cuobjdump --dump-resource-usage`` (the CUDA
toolkit's, or the copy Triton's wheel ships) and fails on any spill (stack frame or local
memory) and on a missing sm_80 or sm_90 build. Skipped when the extension was built CPU-only.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

import flashcon
from flashcon.testing import available_backends


def _extension() -> str | None:
    found = glob.glob(os.path.join(os.path.dirname(flashcon.__file__), "_C*.so"))
    return found[0] if found else None


def _cuobjdump() -> str | None:
    cands = [shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cands.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    try:
        import triton

        cands.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        )
    except ImportError:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _resource_table() -> dict[str, list[dict]]:
    so = _extension()
    # available_backends raises where FLASHCON_REQUIRE names the backend (make test: cpu).
    if not available_backends("cpu") or so is None:
        pytest.skip("flashcon._C is not built")
    if not available_backends("cuda"):
        pytest.skip("flashcon._C was built CPU-only (no CUDA kernels to inspect)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (CUDA toolkit or triton wheel)")
    out = subprocess.run(
        [tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True
    ).stdout
    table: dict[str, list[dict]] = {}
    arch = None
    func = None
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            table.setdefault(arch, [])
            continue
        m = re.search(r"Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if "REG:" in line and arch and func:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            table[arch].append({"name": func, **{k: int(v) for k, v in vals.items()}})
    return table


def test_both_architectures_are_built():
    table = _resource_table()
    for arch in ("sm_80", "sm_90"):
        assert table.get(arch), f"no {arch} kernels in flashcon._C (got {sorted(table)})"
    names = {k["name"] for k in table["sm_80"]}
    for kernel in ("fwd_kernel", "bwd_kernel"):
        assert any(kernel in n for n in names), f"{kernel} missing from the sm_80 build"


def test_no_spills():
    table = _resource_table()
    bad = [
        f"{arch} {k['name']}: REG {k['REG']} STACK {k['STACK']} LOCAL {k['LOCAL']}"
        for arch, kernels in table.items()
        for k in kernels
        if k.get("STACK", 0) > 0 or k.get("LOCAL", 0) > 0
    ]
    assert not bad, "kernels with stack frames / local memory (spills):\n" + "\n".join(bad)


def test_print_resource_usage(capsys):
    """Prints the table, and checks every row parsed: registers within the 255 a thread may
    address, shared memory within an sm_80 block's 163 KiB."""
    table = _resource_table()
    for arch, kernels in table.items():
        for k in kernels:
            assert {"REG", "STACK", "SHARED", "LOCAL"} <= set(k), f"{arch} {k}: unparsed fields"
            assert 0 < k["REG"] <= 255, f"{arch} {k['name']}: REG {k['REG']}"
            assert k["SHARED"] <= 163 * 1024, f"{arch} {k['name']}: SHARED {k['SHARED']}"
    with capsys.disabled():
        print()
        for arch, kernels in sorted(table.items()):
            for k in kernels:
                name = (
                    subprocess.run(
                        ["c++filt", k["name"]], capture_output=True, text=True
                    ).stdout.strip()
                    if shutil.which("c++filt")
                    else k["name"]
                )
                print(
                    f"  {arch} REG {k['REG']:3d} STACK {k['STACK']} SHARED {k['SHARED']:6d} "
                    f"{name.replace('flashcon::cuda::(anonymous namespace)::', '')}"
                )


def _sass_by_kernel() -> dict[tuple[str, str], list[str]]:
    """{(arch, demangled kernel name): opcodes} from ``cuobjdump -sass``."""
    _resource_table()  # the same skips
    out = subprocess.run(
        [_cuobjdump(), "-sass", _extension()], capture_output=True, text=True, check=True
    ).stdout
    names = {}
    if shutil.which("c++filt"):
        mangled = sorted(set(re.findall(r"Function : (\S+)", out)))
        demangled = subprocess.run(
            ["c++filt"], input="\n".join(mangled), capture_output=True, text=True
        ).stdout.splitlines()
        names = dict(zip(mangled, demangled))
    table: dict[tuple[str, str], list[str]] = {}
    arch = func = None
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            func = names.get(m.group(1), m.group(1))
            table[arch, func] = []
            continue
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and func:
            table[arch, func].append(m.group(1))
    return table


def test_tensor_core_code_shape():
    """Every 16-bit kernel multiplies on tensor cores (HMMA) from operands loaded with ldmatrix
    (LDSM) and makes no generic-address load: nvcc emits bfloat16 WMMA loads with generic
    addresses unless told they are shared (kernels.cuh: ld_frag), which cost ~140 registers per
    thread. The resident kernels copy tiles with cp.async (LDGSTS) and wait for them (DEPBAR)."""
    table = _sass_by_kernel()
    checked = 0
    for (arch, name), ops in table.items():
        if "__half" not in name and "bfloat16" not in name:
            continue
        heads = {op.split(".")[0] for op in ops}
        assert "HMMA" in heads, f"{arch} {name}: no HMMA"
        assert "LDSM" in heads, f"{arch} {name}: no LDSM"
        assert "LD" not in heads, f"{arch} {name}: generic-address loads"
        if "_res_kernel" in name:
            assert "LDGSTS" in heads and "DEPBAR" in heads, f"{arch} {name}: no cp.async"
        checked += 1
    # 2 architectures × 2 dtypes × (streamed fwd: 2 modes; streamed bwd: 2 modes × 3 directions
    # × 2 chunk counts; resident fwd: 2 modes × 2 widths; resident bwd: 2 × 3 × 2 widths).
    assert checked == 2 * 2 * (2 + 12 + 4 + 12), f"{checked} 16-bit kernels found"


def test_setup_refuses_targets_below_sm80(monkeypatch):
    """setup.py builds the CUDA kernels only for sm_80 and newer (they use cp.async and bf16
    tensor cores): an older entry of TORCH_CUDA_ARCH_LIST, or an older visible GPU when the list
    is unset, is named (and the build falls back to the CPU kernels, or fails under
    FLASHCON_FORCE_CUDA). A build for them would stop at a PTX assembler error instead."""
    import ast
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "setup.py")) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_old_archs")
    ns = {"os": os, "re": re}
    exec(compile(ast.Module([fn], []), "setup.py", "exec"), ns)

    def fake_torch(caps):
        cuda = types.SimpleNamespace(
            device_count=lambda: len(caps), get_device_capability=lambda i: caps[i]
        )
        return types.SimpleNamespace(cuda=cuda)

    cases = [("8.0;9.0", [], []), ("7.5;8.0", [], ["7.5"]), ("8.6 9.0+PTX", [], []),
             ("7.0 7.5", [], ["7.0", "7.5"]), ("", [(7, 5)], ["7.5"]), ("", [(9, 0)], []),
             ("", [], [])]  # fmt: skip
    for listed, caps, old in cases:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", listed)
        assert ns["_old_archs"](fake_torch(caps)) == old, (listed, caps)
