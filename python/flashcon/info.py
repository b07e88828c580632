"""What this flashcon install can do: ``python -m flashcon.info`` (``--json`` for a dict).

Prints the versions (flashcon, torch, Triton, torch's CUDA), what the compiled extension
``flashcon._C`` holds and what built it, each backend with the reason when it cannot run, the
visible GPUs and their architecture, the backend ``backend='auto'`` picks for CPU and for CUDA
tensors, and whether the symmetric 'all'-mode path is on.

Every verdict comes from ``flashcon.engine`` (:func:`~flashcon.engine.resolve_backend`,
:func:`~flashcon.engine.get_engine`, :func:`~flashcon.engine.symmetric_enabled`), so it is what
the losses do. Importing this module touches no GPU driver; :func:`collect` queries the driver
(``torch.cuda.is_available`` and the device properties) and reports a broken one instead of
raising.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import struct
import sys
from typing import Any

import torch

import flashcon

from . import _ext, engine

# Where each backend runs: the device types whose tensors it takes.
_HOME = {
    "triton": ("cuda",),
    "cuda": ("cuda",),
    "cpu": ("cpu",),
    "torch": ("cpu", "cuda"),
    "reference": ("cpu", "cuda"),
}

_WHERE = {(n, d): f"{d.upper()} tensors" for n, homes in _HOME.items() for d in homes}
_WHERE["triton", "cpu"] = "CPU tensors (TRITON_INTERPRET=1)"

# Backends whose symmetric ops have no tile-pair kernels (csrc/cuda/engine_cuda.cu: the general
# forward with q = k = z and a one-launch dz backward).
_GENERAL_SYMMETRIC = ("cuda",)

_NVCC_RE = re.compile(rb"Cuda compilation tools, release ([0-9.]+), V([0-9.]+)")


def _elf_sections(path: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The raw contents of the named sections of a 64-bit ELF file ({} when it is not one)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # ELFCLASS64 only
        return {}
    end = "<" if data[5] == 1 else ">"
    shoff = struct.unpack_from(end + "Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name = struct.unpack_from(end + "I", data, base)[0]
        offset, size = struct.unpack_from(end + "QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    strtab = data[str_off : str_off + str_size]
    found: dict[str, bytes] = {}
    for i in range(shnum):
        name_off, offset, size = header(i)
        name = strtab[name_off : strtab.index(b"\0", name_off)].decode(errors="replace")
        if name in names:
            found[name] = data[offset : offset + size]
    return found


def _extension_build(path: str) -> dict[str, str | None]:
    """What the shared library itself records about its build.

    The host compiler is in the ELF ``.comment`` section; nvcc's version string is embedded in
    the CUDA kernels (``.nv_fatbin``). The torch version it was built against is not recorded.
    """
    out: dict[str, str | None] = {"compiler": None, "nvcc": None}
    try:
        sections = _elf_sections(path, (".comment", ".nv_fatbin"))
    except (OSError, struct.error, ValueError, IndexError):
        return out
    comment = sections.get(".comment", b"")
    compilers = [s.decode(errors="replace") for s in comment.split(b"\0") if s.strip()]
    if compilers:
        out["compiler"] = "; ".join(dict.fromkeys(compilers))
    m = _NVCC_RE.search(sections.get(".nv_fatbin", b""))
    if m:
        out["nvcc"] = f"CUDA {m.group(1).decode()} (nvcc V{m.group(2).decode()})"
    return out


def _extension() -> dict[str, Any]:
    here = os.path.dirname(flashcon.__file__)
    libs = sorted(f for f in os.listdir(here) if f.startswith("_C") and f.endswith((".so", ".pyd")))
    info: dict[str, Any] = {
        "path": os.path.join(here, libs[0]) if libs else None,
        "loaded": _ext.load(),
        "why_not": _ext.why_unavailable() or None,
        "cuda_kernels": _ext.has_cuda_kernels(),
        "compiler": None,
        "nvcc": None,
        "built_against_torch": None,  # not recorded by the build
    }
    if info["path"]:
        info.update(_extension_build(info["path"]))
    return info


def _triton() -> dict[str, Any]:
    try:
        import triton
    except ImportError as e:
        return {"version": None, "error": str(e)}
    return {"version": getattr(triton, "__version__", "unknown"), "error": None}


def _gpus() -> dict[str, Any]:
    try:
        if not torch.cuda.is_available():
            why = (
                "torch is not a CUDA build"
                if torch.version.cuda is None
                else "torch.cuda.is_available() is False (no GPU or no driver)"
            )
            return {"available": False, "devices": [], "error": why}
        devices = []
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "capability": f"{major}.{minor}",
                    "arch": f"sm_{major}{minor}",
                }
            )
        return {"available": True, "devices": devices, "error": None}
    except Exception as e:  # noqa: BLE001 - a broken driver is reported, not raised
        return {"available": False, "devices": [], "error": f"{type(e).__name__}: {e}"}


def _backends(gpu_visible: bool) -> dict[str, dict[str, Any]]:
    """Each backend's verdict from ``engine.resolve_backend`` on its home device types."""
    out: dict[str, dict[str, Any]] = {}
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for name in engine.BACKENDS:
        if name == "auto":
            continue
        devices, reasons = [], []
        homes = _HOME[name] + (("cpu",) if name == "triton" and interpreting else ())
        for dev in homes:
            try:
                engine.resolve_backend(name, torch.device(dev))
                devices.append(dev)
            except (engine.BackendUnavailableError, ValueError) as e:
                reasons.append(str(e))
        note = None
        if "cuda" in devices and "cpu" not in _HOME[name] and not gpu_visible:
            note = "no CUDA device is visible here"
        symmetric = None
        if name != "reference" and devices:
            symmetric = engine.get_engine(name).sym_lse is not None
        out[name] = {
            "available": bool(devices),
            "devices": devices,
            "reason": "; ".join(dict.fromkeys(reasons)) or None,
            "note": note,
            "symmetric_ops": symmetric,
        }
    return out


def collect() -> dict[str, Any]:
    """The facts :func:`main` prints, as a JSON-serialisable dict."""
    gpu = _gpus()
    backends = _backends(gpu["available"])
    return {
        "flashcon": {"version": flashcon.__version__, "path": os.path.dirname(flashcon.__file__)},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda},
        "triton": _triton(),
        "extension": _extension(),
        "gpu": gpu,
        "backends": backends,
        "auto": {dev: engine.resolve_backend("auto", torch.device(dev)) for dev in ("cpu", "cuda")},
        "symmetric": {
            "enabled": engine.symmetric_enabled(),
            "backends": [
                n for n, b in backends.items() if b["symmetric_ops"] and n not in _GENERAL_SYMMETRIC
            ],
        },
        "env": {
            k: os.environ.get(k)
            for k in ("FLASHCON_SYMMETRIC", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
        },
    }


def format_report(facts: dict[str, Any]) -> str:
    """The human-readable report of :func:`collect`'s facts.

    Args:
        facts: what :func:`collect` returned.
    """
    ext, gpu, tri = facts["extension"], facts["gpu"], facts["triton"]
    lines = [
        f"flashcon    {facts['flashcon']['version']} ({facts['flashcon']['path']})",
        f"python      {facts['python']} on {facts['platform']}",
        f"torch       {facts['torch']['version']} (CUDA {facts['torch']['cuda'] or 'none'})",
        f"triton      {tri['version'] or 'not importable: ' + str(tri['error'])}",
    ]
    if ext["loaded"]:
        kernels = "CPU + CUDA kernels" if ext["cuda_kernels"] else "CPU kernels only"
        lines.append(f"flashcon._C {kernels} ({ext['path']})")
    else:
        lines.append(f"flashcon._C not usable: {ext['why_not']}")
    if ext["path"]:
        lines.append(f"  compiler  {ext['compiler'] or 'not recorded'}")
        if ext["cuda_kernels"] or ext["nvcc"]:
            lines.append(f"  nvcc      {ext['nvcc'] or 'not recorded'}")
        lines.append("  torch     the version it was built against is not recorded")
    if gpu["available"]:
        for d in gpu["devices"]:
            lines.append(
                f"gpu {d['index']}       {d['name']} (compute capability {d['capability']})"
            )
    else:
        lines.append(f"gpu         none visible: {gpu['error']}")
    lines.append("backends")
    for name, b in facts["backends"].items():
        if b["available"]:
            where = " and ".join(_WHERE[name, d] for d in b["devices"])
            text = f"available for {where}"
            if b["note"]:
                text += f" ({b['note']})"
        else:
            text = f"unavailable: {b['reason']}"
        lines.append(f"  {name:<10}{text}")
    auto = facts["auto"]
    cuda_note = "" if gpu["available"] else " (no CUDA device visible)"
    lines.append(
        f"auto        CPU tensors -> {auto['cpu']}; CUDA tensors -> {auto['cuda']}{cuda_note}"
    )
    sym = facts["symmetric"]
    kernels = ", ".join(sym["backends"]) or "none"
    switch = "FLASHCON_SYMMETRIC=0 or flashcon.engine.set_symmetric(False)"
    if sym["enabled"]:
        lines.append(f"symmetric   on (tile-pair kernels here: {kernels}; off with {switch})")
    else:
        lines.append(f"symmetric   off ({switch}; tile-pair kernels here: {kernels})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report (or, with ``--json``, the facts as JSON); returns the exit status.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m flashcon.info", description="What this flashcon install can do."
    )
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    facts = collect()
    if args.json:
        json.dump(facts, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
