"""Build script for flashcon.

The pure-Python package lives in ``python/flashcon``; the Triton kernels in ``triton_kernels/``
are installed as ``flashcon.triton_kernels`` (never as a top-level ``triton_kernels``: that
name belongs to Triton's own package). The C++ extension ``flashcon._C`` always builds its CPU
kernels. It adds the CUDA kernels when they are wanted — a GPU is visible, or
``TORCH_CUDA_ARCH_LIST`` names the architectures, or ``FLASHCON_FORCE_CUDA=1`` — and can be
built: torch is a CUDA build and nvcc's major version matches torch's CUDA major version. No
GPU is needed to build them, but they cost minutes of nvcc per architecture, so a machine that
shows no GPU and names no architecture gets the CPU kernels only. The build says which, in one
line that ``pip install`` shows without ``-v`` where a terminal is attached.

Environment switches (read at build time):

``FLASHCON_SKIP_EXT=1``
    Build no extension at all (pure Python; the ``torch`` and ``triton`` backends still work).
``FLASHCON_CPU_ONLY=1``
    Build the extension with its CPU kernels only, even when CUDA could be built.
``FLASHCON_FORCE_CUDA=1``
    Build the CUDA kernels even with no GPU visible and no architecture list (then for
    ``8.0;9.0``), and fail the build instead of dropping them when they cannot be built.
``TORCH_CUDA_ARCH_LIST``
    Architectures of the CUDA kernels; setting it asks for them. Unset, the visible GPUs'. The
    kernels need sm_80 or newer (cp.async, bfloat16 tensor cores): a list (or, unset, a visible
    GPU) below 8.0 builds the CPU kernels only (an error under ``FLASHCON_FORCE_CUDA``).
``CUDA_HOME``
    CUDA toolkit root. When unset it is derived from the real ``nvcc`` (following wrapper
    scripts), because torch's guess from a wrapper on the PATH can point at a folder with no
    ``cudart``.
``MAX_JOBS``
    Parallel compile jobs; default: capped by cores and by memory (about 3 GiB per nvcc job).

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch you run.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[flashcon setup] {msg}", file=sys.stderr)


def _announce(msg: str) -> None:
    """``_log``, and the same line on the terminal: pip hides a build's output without ``-v``,
    and what is built (and how to change it) decides whether the install takes minutes."""
    _log(msg)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"[flashcon setup] {msg}\n")
    except OSError:
        pass  # no controlling terminal (CI, a service): the log line above is all there is


def _gpu_visible(torch) -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver must not break the build
        return False


def _real_nvcc() -> str | None:
    """Path of the real nvcc binary, following a shell wrapper's ``exec`` line if there is one."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return nvcc
    if head.startswith(b"#!"):
        m = re.search(rb"exec\s+(\S+/nvcc)\b", head)
        if m:
            return os.path.realpath(m.group(1).decode())
    return nvcc


def _cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = _real_nvcc()
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(c, "bin", "nvcc")
        ):
            return c
    return None


def _nvcc_major(cuda_home: str) -> int | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def _max_jobs() -> None:
    if os.environ.get("MAX_JOBS"):
        return
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    jobs = max(1, min(os.cpu_count() or 1, int(mem_gib // 3)))
    os.environ["MAX_JOBS"] = str(jobs)


def _old_archs(torch) -> list[str]:
    """Target architectures below sm_80 (the CUDA kernels use cp.async and bf16 tensor cores):
    from TORCH_CUDA_ARCH_LIST, or the visible GPUs when it is unset."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if listed:
        archs = [a for a in re.split(r"[;\s]+", listed) if a]
        old = []
        for a in archs:
            m = re.match(r"(\d+)\.(\d+)", a)
            if m and (int(m.group(1)), int(m.group(2))) < (8, 0):
                old.append(a)
        return old
    try:
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken driver must not break the build
        return []
    return [f"{a}.{b}" for a, b in caps if (a, b) < (8, 0)]


def _extensions() -> tuple[list, dict]:
    if _flag("FLASHCON_SKIP_EXT"):
        _log("FLASHCON_SKIP_EXT set: building no extension")
        return [], {}

    # CUDA_HOME must be settled before torch.utils.cpp_extension is imported: it reads it once.
    cuda_home = _cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home
    _max_jobs()

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-DFLASHCON_WITH_CPU"]
    ld_flags = ["-fopenmp"]

    want_cuda = not _flag("FLASHCON_CPU_ONLY") and bool(cuda_sources)
    if _flag("FLASHCON_CPU_ONLY"):
        _announce("building the CPU kernels only (FLASHCON_CPU_ONLY is set)")
    why_not = None
    asked = _flag("FLASHCON_FORCE_CUDA") or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if want_cuda and not asked and not _gpu_visible(torch):
        _announce(
            "building the CPU kernels only: no GPU is visible and TORCH_CUDA_ARCH_LIST is "
            "unset (the CUDA kernels add minutes of nvcc per architecture; to build them, set "
            "TORCH_CUDA_ARCH_LIST, e.g. '8.0;9.0', or FLASHCON_FORCE_CUDA=1)"
        )
        want_cuda = False
    elif want_cuda:
        if torch.version.cuda is None:
            why_not = "torch is not a CUDA build"
        elif cuda_home is None:
            why_not = "no CUDA toolkit (nvcc with cuda_runtime.h) was found; set CUDA_HOME"
        else:
            major = _nvcc_major(cuda_home)
            torch_major = int(torch.version.cuda.split(".")[0])
            if major != torch_major:
                why_not = f"nvcc CUDA {major} does not match torch's CUDA {torch.version.cuda}"
            elif old := _old_archs(torch):
                why_not = (
                    f"the CUDA kernels need sm_80 or newer, and the targets include "
                    f"{', '.join(old)} (set TORCH_CUDA_ARCH_LIST to 8.0 or newer)"
                )
    if want_cuda and why_not:
        if _flag("FLASHCON_FORCE_CUDA"):
            raise RuntimeError(f"FLASHCON_FORCE_CUDA is set but CUDA cannot be built: {why_not}")
        _announce(f"building the CPU kernels only: {why_not}")
        want_cuda = False

    if want_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not _gpu_visible(torch):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        _announce(
            f"building the CPU and CUDA kernels (CUDA_HOME={os.environ.get('CUDA_HOME')}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')}; "
            "minutes of nvcc per architecture; FLASHCON_CPU_ONLY=1 skips them)"
        )
        ext = CUDAExtension(
            "flashcon._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags + ["-DFLASHCON_WITH_CUDA"],
                "nvcc": [
                    "-O3",
                    "-std=c++20",
                    "-DFLASHCON_WITH_CUDA",
                    "--use_fast_math",
                    "-lineinfo",
                    "--expt-relaxed-constexpr",
                ],
            },
            extra_link_args=ld_flags,
            py_limited_api=False,
        )
    else:
        ext = CppExtension(
            "flashcon._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=ld_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "flashcon",
        "flashcon.tools",
        "flashcon.tools.cost_model",
        "flashcon.backends",
        "flashcon.triton_kernels",
    ],
    package_dir={"": "python", "flashcon.triton_kernels": "triton_kernels"},
    package_data={
        "flashcon": ["py.typed"],
        "flashcon.tools.cost_model": ["*.json"],
        # The symmetric kernels' tuned table (triton_kernels/tuning.py), once a GPU run wrote it.
        "flashcon.triton_kernels": ["tuned.json"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
