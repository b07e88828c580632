"""The launch arguments torch.compile depends on, checked without a GPU.

Under torch.compile every ``wrap_triton`` launch is functionalised: torch's access analysis
decides which arguments the kernel writes, clones those, runs the kernel on the clones and
copies each clone back. A launcher that passed an output again as the placeholder of an unused
pointer made the loss 0 under torch.compile on an H200 (the placeholder's untouched clone was
copied back last). ``launch_probe.py`` records every launch of every launcher over the flag
space, runs the analysis on the real arguments (TTIR only, for an sm_90 target) and reports
(a) outputs the analysis does not see written and (b) written arguments sharing storage with
another argument. It runs in a subprocess: the kernels must not be the interpreter's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
PROBE = Path(__file__).with_name("launch_probe.py")
KERNELS = [
    "_bwd_finish_kernel",
    "_bwd_prep_kernel",
    "_finish_kernel",
    "_prep_kernel",
    "_plan_kernel",
    "_bwd_dk_kernel",
    "_bwd_dq_kernel",
    "_lse_fwd_kernel",
    "_sp_fwd_kernel",
    "_sym_bwd_kernel",
    "_sym_fwd_kernel",
]


@pytest.fixture(scope="session")
def probe(shared_once) -> dict:
    def make(d: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        out = subprocess.run(
            [sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=900
        )
        assert out.returncode == 0, out.stderr[-4000:]
        (d / "probe.json").write_text(out.stdout)

    # Once per run, whichever pytest-xdist worker asks first.
    return json.loads((shared_once("launch_probe", make) / "probe.json").read_text())


def test_every_kernel_is_analysed(probe):
    assert set(KERNELS) <= set(probe["kernels"]), probe["kernels"]
    assert probe["analyses"] >= 100, probe  # the flag space, not a handful of launches


def test_no_aliased_written_argument_and_every_output_written(probe):
    problems = probe["problems"]
    assert not problems, f"{len(problems)} problems, e.g.:\n" + "\n".join(problems[:20])
