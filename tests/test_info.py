"""``python -m flashcon.info``: the facts it reports are the engine's, and the API agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import flashcon
import flashcon.functional
from flashcon import engine, info

BACKENDS = ("triton", "cuda", "cpu", "torch", "reference")


def _python(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCON_")}
    p = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_versions():
    facts = info.collect()
    assert facts["flashcon"]["version"] == flashcon.__version__
    assert facts["torch"] == {"version": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
    except ImportError:
        assert facts["triton"]["version"] is None and facts["triton"]["error"]
    else:
        assert facts["triton"] == {"version": triton.__version__, "error": None}
    json.dumps(facts)  # JSON-serialisable, as --json prints it


def test_backends_are_the_engines_verdicts():
    facts = info.collect()
    assert list(facts["backends"]) == list(BACKENDS)
    expected = {
        "triton": engine.triton_available()[0],
        "cuda": engine.cpp_available("cuda")[0],
        "cpu": engine.cpp_available("cpu")[0],
        "torch": True,
        "reference": True,
    }
    for name, b in facts["backends"].items():
        assert b["available"] == expected[name], (name, b)
        assert (b["reason"] is None) == b["available"], (name, b)
    assert facts["auto"] == {
        "cpu": engine.resolve_backend("auto", torch.device("cpu")),
        "cuda": engine.resolve_backend("auto", torch.device("cuda")),
    }
    assert facts["symmetric"]["enabled"] == engine.symmetric_enabled()
    if facts["backends"]["cpu"]["available"]:
        assert "cpu" in facts["symmetric"]["backends"]


def test_auto_is_what_the_losses_run(monkeypatch):
    """The backend a CPU loss with backend='auto' really runs is the one reported."""
    used = []
    real = flashcon.engine.get_engine

    def spy(name):
        used.append(name)
        return real(name)

    auto = info.collect()["auto"]  # before the spy: collect() asks every backend
    monkeypatch.setattr(flashcon.engine, "get_engine", spy)
    f = torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1)
    flashcon.supcon_loss(f, torch.randint(0, 3, (8,)))
    assert used == [auto["cpu"]]
    if torch.cuda.is_available():
        used.clear()
        flashcon.supcon_loss(f.cuda(), torch.randint(0, 3, (8,), device="cuda"))
        assert used == [auto["cuda"]]


def test_missing_extension_is_reported_with_its_reason(monkeypatch):
    monkeypatch.setitem(engine._OPS, "cpp", None)
    monkeypatch.setitem(engine._WHY, "cpp", "the extension is gone (test)")
    facts = info.collect()
    for name in ("cpu", "cuda"):
        b = facts["backends"][name]
        assert not b["available"]
        assert f"backend='{name}' is unavailable: the extension is gone (test)" in b["reason"]
    assert facts["auto"]["cpu"] == "torch"
    assert "cpu" not in facts["symmetric"]["backends"]
    report = info.format_report(facts)
    assert "  cpu       unavailable: backend='cpu' is unavailable: the extension is gone" in report
    assert "auto        CPU tensors -> torch;" in report


def test_symmetric_switch(monkeypatch):
    monkeypatch.setattr(engine, "_SYMMETRIC", False)
    assert info.collect()["symmetric"]["enabled"] is False
    assert "\nsymmetric   off (" in info.format_report(info.collect())
    monkeypatch.setattr(engine, "_SYMMETRIC", True)
    assert "\nsymmetric   on (" in info.format_report(info.collect())


def test_extension_build_record():
    ext = info.collect()["extension"]
    assert ext["loaded"] == engine.cpp_available("cpu")[0]
    if ext["path"] is None:
        assert not ext["loaded"] and ext["why_not"]
        return
    raw = open(ext["path"], "rb").read()
    assert ext["compiler"] and ext["compiler"].split("; ")[0].encode() in raw
    assert ext["cuda_kernels"] == engine.cpp_available("cuda")[0]
    if ext["cuda_kernels"]:
        # setup.py builds CUDA kernels only with nvcc's major equal to torch's CUDA major.
        assert ext["nvcc"].startswith(f"CUDA {torch.version.cuda.split('.')[0]}."), ext["nvcc"]
    else:
        assert ext["nvcc"] is None


def test_elf_sections_rejects_non_elf(tmp_path):
    p = tmp_path / "not_elf.so"
    p.write_bytes(b"not an ELF file at all" * 10)
    assert info._elf_sections(str(p), (".comment",)) == {}


def test_command_line_report():
    text = _python("-m", "flashcon.info")
    for name in BACKENDS:
        assert f"\n  {name:<10}" in text, f"backend {name} missing:\n{text}"
    cpu = flashcon.resolve_backend("auto", torch.device("cpu"))
    cuda = flashcon.resolve_backend("auto", torch.device("cuda"))
    assert f"auto        CPU tensors -> {cpu}; CUDA tensors -> {cuda}" in text, text
    assert f"torch       {torch.__version__} " in text, text
    assert f"flashcon    {flashcon.__version__} " in text, text


_NO_DRIVER = """
import sys, torch
def refuse(*a, **k):
    raise RuntimeError("driver touched")
for mod, names in ((torch.cuda, ("is_available", "device_count", "init", "_lazy_init",
                                 "get_device_name", "get_device_capability",
                                 "get_device_properties", "current_device")),
                   (torch._C, ("_cuda_getDeviceCount", "_cuda_init"))):
    for n in names:
        if hasattr(mod, n):
            setattr(mod, n, refuse)
import flashcon.info  # must not query the driver
sys.exit(flashcon.info.main(["--json"]))
"""


def test_import_touches_no_driver_and_json_output():
    facts = json.loads(_python("-c", _NO_DRIVER))
    # collect() did query the (refusing) driver and reported it instead of raising.
    assert facts["gpu"] == {
        "available": False,
        "devices": [],
        "error": "RuntimeError: driver touched",
    }
    assert set(facts["backends"]) == set(BACKENDS)
    assert facts["auto"]["cpu"] == flashcon.resolve_backend("auto", torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_is_reported():
    facts = info.collect()
    assert facts["gpu"]["available"]
    major, minor = torch.cuda.get_device_capability(0)
    assert facts["gpu"]["devices"][0]["arch"] == f"sm_{major}{minor}"
    assert facts["gpu"]["devices"][0]["name"] == torch.cuda.get_device_name(0)
