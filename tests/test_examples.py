"""Convergence on real data (scikit-learn's digits) with the training example's own code."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

from flashcon.testing import available_backends

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
_spec = importlib.util.spec_from_file_location("train_digits", _PATH)
train_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_digits)

FUSED = ["torch", *available_backends("cpu")]


@pytest.fixture(scope="module")
def data():
    return train_digits.load_data(0)


@pytest.mark.parametrize("loss", train_digits.LOSSES)
def test_short_run_learns(loss, data):
    r = train_digits.train(loss, epochs=4, data=data, seed=0)
    assert r["probe_acc"] >= 0.90, r["probe_acc"]
    first, last = r["steps"][:3], r["steps"][-3:]
    assert sum(last) < sum(first), (first, last)
    if loss == "esupcon":
        assert not math.isnan(r["proto_acc"]) and r["proto_acc"] > 0.5


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", [x for x in train_digits.LOSSES if x != "ce"])
def test_fused_curves_track_reference(loss, backend, data):
    ref = train_digits.train(loss, epochs=1, data=data, backend="reference", seed=1)["steps"]
    got = train_digits.train(loss, epochs=1, data=data, backend=backend, seed=1)["steps"]
    assert len(got) == len(ref)
    for step, (a, b) in enumerate(zip(got[:5], ref[:5])):
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-5, (step, a, b)


def test_ddp_example_matches_single_process():
    import subprocess
    import sys

    script = _PATH.parent / "ddp_supcon.py"
    out = subprocess.run(
        [sys.executable, str(script), "--world-size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max |DDP gradient" in out.stdout
