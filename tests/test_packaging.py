"""The project packages: a wheel built without build isolation installs and runs elsewhere.

The wheel is built from a copy of the source tree (so the working tree's in-place extension and
``build/`` stay untouched) as the README's install builds it on a machine without a GPU and
without ``TORCH_CUDA_ARCH_LIST``: the CPU kernels only, saying so, then installed
into a fresh virtual environment that reuses this environment's torch and Triton through a
``.pth`` line (no download, no index). A ``.pth`` line adds a directory to ``sys.path`` without
running the ``.pth`` files inside it, so this environment's editable flashcon (an import hook
installed by such a file) cannot shadow the wheel; the tests check which flashcon is imported.
Most of the run time is the C++ build of the CPU kernels.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch

import flashcon

# About 1.5 min of CPU, nearly all the C++ compile: the wheel and its venv are built once per
# run, by whichever pytest-xdist worker asks first (conftest's shared_once).
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "python", "triton_kernels", "csrc")


def _env(unset: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLASHCON_", "PYTHON")) and k not in unset
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def _run(
    cmd: list[str], cwd: pathlib.Path, timeout: int = 120, unset: tuple[str, ...] = (), **extra
) -> str:
    p = subprocess.run(
        cmd, cwd=cwd, env=_env(unset, **extra), capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


_SETUP_LINE = "[flashcon setup] building the "


def _setup_decision(**env: str) -> str:
    """The line ``setup.py`` prints about what it builds (``--name`` builds nothing)."""
    unset = tuple(k for k, v in env.items() if v is None)
    extra = {k: v for k, v in env.items() if v is not None}
    out = _run([sys.executable, "setup.py", "--name"], cwd=ROOT, unset=unset, **extra)
    lines = [ln for ln in out.splitlines() if ln.startswith(_SETUP_LINE)]
    assert len(lines) == 1, out
    return lines[0]


def test_build_without_a_gpu_or_architectures_is_cpu_only():
    line = _setup_decision(TORCH_CUDA_ARCH_LIST=None, CUDA_VISIBLE_DEVICES="")
    assert line.startswith(_SETUP_LINE + "CPU kernels only: no GPU is visible"), line
    assert "TORCH_CUDA_ARCH_LIST" in line and "FLASHCON_FORCE_CUDA=1" in line, line
    line = _setup_decision(TORCH_CUDA_ARCH_LIST=None, FLASHCON_CPU_ONLY="1")
    assert line == _SETUP_LINE + "CPU kernels only (FLASHCON_CPU_ONLY is set)", line


def test_build_with_architectures_wants_cuda():
    # Asked for by an architecture list or FLASHCON_FORCE_CUDA, the CUDA kernels are built
    # where torch and nvcc allow it, and otherwise the line says why not (never "no GPU").
    for env in (
        {"TORCH_CUDA_ARCH_LIST": "9.0", "CUDA_VISIBLE_DEVICES": ""},
        {"TORCH_CUDA_ARCH_LIST": None, "CUDA_VISIBLE_DEVICES": "", "FLASHCON_FORCE_CUDA": "1"},
    ):
        try:
            line = _setup_decision(**env)
        except AssertionError as e:  # FORCE_CUDA where CUDA cannot be built: the build fails
            assert env.get("FLASHCON_FORCE_CUDA") and "cannot be built" in str(e), e
            continue
        assert "no GPU is visible" not in line, (env, line)
        if torch.version.cuda and shutil.which("nvcc"):
            assert line.startswith(_SETUP_LINE + "CPU and CUDA kernels"), (env, line)
            arch = env["TORCH_CUDA_ARCH_LIST"] or "8.0;9.0"
            assert f"TORCH_CUDA_ARCH_LIST={arch};" in line, (env, line)


@pytest.fixture(scope="session")
def wheel(shared_once) -> pathlib.Path:
    tmp = shared_once("packaging-wheel", _build_wheel)
    wheels = sorted((tmp / "dist").glob("flashcon-*.whl"))
    assert len(wheels) == 1, f"expected one flashcon wheel, got {wheels}"
    return wheels[0]


def _build_wheel(tmp: pathlib.Path) -> None:
    src = tmp / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=skip)
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    log = _run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps"]
        + ["--no-index", "--no-cache-dir", "-w", str(dist), str(src)],
        cwd=tmp,
        timeout=900,
        unset=("TORCH_CUDA_ARCH_LIST",),
        CUDA_VISIBLE_DEVICES="",
        # This environment's ninja (the dev extras install it) for the parallel build.
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    )
    (tmp / "build.log").write_text(log)


@pytest.fixture(scope="session")
def venv_python(wheel: pathlib.Path, shared_once) -> pathlib.Path:
    venv = shared_once("packaging-venv", lambda d: _install(wheel, d)) / "venv"
    return venv / "bin" / "python"


def _install(wheel: pathlib.Path, root: pathlib.Path) -> None:
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    py = venv / "bin" / "python"
    purelib = pathlib.Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv
        ).strip()
    )
    here = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (purelib / "reuse_dev_site_packages.pth").write_text("\n".join(here) + "\n")
    # This environment's pip, run by the new interpreter, installs into the new environment;
    # --ignore-installed: never uninstall the editable flashcon it can see through the .pth.
    _run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed"]
        + [str(wheel)],
        cwd=venv,
    )
    assert (purelib / "flashcon" / "__init__.py").is_file()


def test_default_build_says_what_it_builds(wheel: pathlib.Path):
    log = (wheel.parent.parent / "build.log").read_text()
    assert _SETUP_LINE + "CPU kernels only: no GPU is visible" in log, log[-3000:]
    assert "-gencode" not in log, "a CUDA compile ran"


def test_wheel_contents(wheel: pathlib.Path):
    names = zipfile.ZipFile(wheel).namelist()
    assert "flashcon/triton_kernels/__init__.py" in names
    assert "flashcon/triton_kernels/ops.py" in names
    assert [n for n in names if n.startswith("flashcon/_C") and n.endswith(".so")], names
    assert not [n for n in names if n.startswith("triton_kernels/")], names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"flashcon"}, tops
    assert "flashcon/py.typed" in names  # PEP 561: the package's annotations are for users
    licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert len(licenses) == 1, names
    meta = zipfile.ZipFile(wheel).read(licenses[0].replace("licenses/LICENSE", "METADATA"))
    assert b"License-Expression: Apache-2.0" in meta
    assert b"Apache License" in zipfile.ZipFile(wheel).read(licenses[0])


_CHECK = """
import json, torch, flashcon, flashcon.info, flashcon.triton_kernels
torch.manual_seed(0)
f = torch.nn.functional.normalize(torch.randn(16, 2, 32, dtype=torch.float64), dim=-1)
y = torch.randint(0, 4, (16,))
losses = {}
for backend in ("cpu", "torch", "reference"):
    f1 = f.clone().requires_grad_()
    loss = flashcon.supcon_loss(f1, y, backend=backend)
    loss.backward()
    losses[backend] = [loss.item(), f1.grad.abs().sum().item()]
print(json.dumps({
    "flashcon": flashcon.__file__,
    "triton_kernels": flashcon.triton_kernels.__file__,
    "torch": torch.__file__,
    "auto_cpu": flashcon.resolve_backend("auto", torch.device("cpu")),
    "losses": losses,
    "info": flashcon.info.collect(),
}))
"""


def test_installed_wheel_runs_every_cpu_backend(venv_python: pathlib.Path):
    venv = venv_python.parent.parent
    out = json.loads(_run([str(venv_python), "-c", _CHECK], cwd=venv))
    # The wheel's flashcon (not this environment's editable one), this environment's torch.
    assert pathlib.Path(out["flashcon"]).is_relative_to(venv), out["flashcon"]
    assert pathlib.Path(out["triton_kernels"]).is_relative_to(venv), out["triton_kernels"]
    assert pathlib.Path(out["torch"]).resolve() == pathlib.Path(torch.__file__).resolve()
    assert out["auto_cpu"] == "cpu", "the wheel's C++ CPU kernels are not used by 'auto'"
    facts = out["info"]
    assert pathlib.Path(facts["flashcon"]["path"]).is_relative_to(venv)
    assert facts["extension"]["loaded"] and not facts["extension"]["cuda_kernels"]
    assert facts["backends"]["cpu"]["available"] and not facts["backends"]["cuda"]["available"]
    assert facts["auto"]["cpu"] == "cpu"
    ref_loss, ref_grad = out["losses"]["reference"]
    for backend in ("cpu", "torch"):
        loss, grad = out["losses"][backend]
        assert loss == pytest.approx(ref_loss, rel=1e-10), backend
        assert grad == pytest.approx(ref_grad, rel=1e-10), backend


def test_installed_wheel_info(venv_python: pathlib.Path):
    venv = venv_python.parent.parent
    text = _run([str(venv_python), "-m", "flashcon.info"], cwd=venv)
    for name in ("triton", "cuda", "cpu", "torch", "reference"):
        assert f"\n  {name} " in text, f"{name} missing from:\n{text}"
    assert "CPU kernels only" in text, text
    assert "flashcon._C was built without CUDA kernels" in text, text
    assert "auto        CPU tensors -> cpu;" in text, text
    assert f"flashcon    {flashcon.__version__} ({venv}/" in text, text
