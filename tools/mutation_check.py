"""Plant known mistakes in a scratch copy of flashcon and check that the tests catch each one.

Usage (from the repository root, after ``make test`` has built the venv and the extension)::

    .venv/bin/python tools/mutation_check.py                 # every mutant, default selection
    .venv/bin/python tools/mutation_check.py --only genscl_unnormalised,one_mode_over_views
    .venv/bin/python tools/mutation_check.py --tests tests/test_oracle.py tests/test_reference.py

The scratch copy is a package tree ``<tmp>/pkg/flashcon`` (``python/flashcon`` with the built
``_C`` extension, plus ``triton_kernels`` as ``flashcon.triton_kernels``, the layout setup.py's
``package_dir`` installs) and ``<tmp>/tests``. ``PYTHONPATH=<tmp>/pkg`` puts it ahead of the
venv's editable install; the script checks that the scratch copy is what gets imported.

Each mutant is a list of textual edits (old → new, each asserted to occur exactly once). A
mistake the reference shares with the streaming code is planted in both, as it would be made
by one misreading of docs/losses.md; a kernel mistake is planted in one backend. For each mutant the
script runs the pytest selection on the scratch copy and records which tests failed; it prints
a markdown table: mutant → caught by (test ids) / NOT CAUGHT. It exits non-zero when a mutant
is not caught or the unmutated selection does not pass. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_TESTS = [
    "tests/test_oracle.py",
    "tests/test_queue.py::test_queue_and_multihot_on_kernel_backends",
    "tests/test_positives.py::test_low_precision_masks_and_multihot",
]


@dataclasses.dataclass(frozen=True)
class Edit:
    path: str  # repository path: python/flashcon/... or triton_kernels/...
    old: str
    new: str


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    edits: tuple[Edit, ...]


REF = "python/flashcon/reference.py"
FUN = "python/flashcon/functional.py"
SPECS = "python/flashcon/specs.py"
STREAM = "python/flashcon/backends/torch_stream.py"
TRITON_LSE = "triton_kernels/lse.py"

MUTANTS = [
    Mutant(
        "genscl_unnormalised",
        "GenSCL: soft labels not L2-normalised (reference + functional)",
        (
            Edit(
                REF,
                "    y_hat = y / y.norm(dim=1, keepdim=True)\n"
                "    yc_hat = ycols / ycols.norm(dim=1, keepdim=True)\n",
                "    y_hat = y\n    yc_hat = ycols\n",
            ),
            Edit(
                FUN,
                "    y_hat = y / y.norm(dim=1, keepdim=True)\n    # Every other column",
                "    y_hat = y\n    # Every other column",
            ),
            Edit(
                FUN,
                "soft = torch.cat([soft, qy / qy.norm(dim=1, keepdim=True)])",
                "soft = torch.cat([soft, qy])",
            ),
        ),
    ),
    Mutant(
        "one_mode_over_views",
        "SupCon 'one' mode: mean over the N = B·V views instead of the B anchors "
        "(reference + functional)",
        (
            Edit(
                REF,
                "    rows, _ = _supcon_rows(logits, pos_w, valid, variant)\n"
                "    return (temperature / base_temperature) * rows.mean()",
                "    rows, _ = _supcon_rows(logits, pos_w, valid, variant)\n"
                "    return (temperature / base_temperature) * rows.sum() / n",
            ),
            Edit(
                FUN,
                '    n_global = c.n_batch // v if contrast_mode == "one" else c.n_batch',
                "    n_global = c.n_batch",
            ),
            Edit(
                FUN,
                "    return ((t / tb) * rows.mean()).to(_acc(z))",
                "    return ((t / tb) * rows.sum() / z.shape[0]).to(_acc(z))",
            ),
        ),
    ),
    Mutant(
        "supcon_in_without_log_c",
        "SupCon L_in without its + log C_i term (reference + functional)",
        (
            Edit(REF, "        row = lse - lse_p + torch.log(c_safe)", "        row = lse - lse_p"),
            Edit(
                FUN,
                "_finite_or_zero(lse_p) + torch.log(pcnt.clamp_min(1))",
                "_finite_or_zero(lse_p)",
            ),
            Edit(FUN, "_finite_or_zero(lse_p) + log_c", "_finite_or_zero(lse_p)"),
        ),
    ),
    Mutant(
        "mask_weights_ignored",
        "SupContrast mask: weights read as 0/1 (reference + functional)",
        (
            Edit(
                REF,
                "w_b = V.check_mask(mask, b, z).to(z.dtype)",
                "w_b = (V.check_mask(mask, b, z) > 0).to(z.dtype)",
            ),
            Edit(
                FUN,
                "w = V.check_mask(mask, b, z).to(_acc(z)).contiguous()",
                "w = (V.check_mask(mask, b, z) > 0).to(_acc(z)).contiguous()",
            ),
        ),
    ),
    Mutant(
        "sincere_eta_over_positives",
        "SINCERE: η over every other column (positives too) instead of the negatives "
        "(reference + the spec table every backend reads)",
        (
            Edit(
                REF,
                "    neg = ~same\n    eta, has_neg = _safe_logsumexp(logits, neg)",
                "    neg = not_self\n    eta, has_neg = _safe_logsumexp(logits, neg)",
            ),
            Edit(SPECS, '(Stream("eta", 0.0, 1.0),)', '(Stream("eta", 1.0, 1.0),)'),
        ),
    ),
    Mutant(
        "esupcon_absent_prototypes_counted",
        "ESupCon: prototypes of classes absent from the batch counted in the mean "
        "(reference + functional)",
        (
            Edit(
                REF, "        count += int(present.sum())", "        count += int(present.numel())"
            ),
            Edit(
                FUN,
                "        count = count + (pcnt_p > 0).sum().to(count.dtype)",
                "        count = count + pcnt_p.numel()",
            ),
        ),
    ),
    Mutant(
        "ntxent_positives_pairs_of_samples",
        "NT-Xent / SimCLR: sample ids i // 2, so samples 2k and 2k+1 are positives "
        "(reference + functional)",
        (
            Edit(
                REF,
                "            y = torch.arange(b, device=z.device)\n",
                "            y = torch.arange(b, device=z.device) // 2\n",
            ),
            Edit(
                FUN,
                "    ids = torch.arange(b, device=device)\n",
                "    ids = torch.arange(b, device=device) // 2\n",
            ),
        ),
    ),
    Mutant(
        "torch_tcl_k1_with_tau",
        "torch backend: TCL's k1 term e^{−s/τ} instead of e^{−s}",
        (
            Edit(
                STREAM,
                "torch.where(pos, math.log(k1) + logw - s, ninf)",
                "torch.where(pos, math.log(k1) + logw - scale * s, ninf)",
            ),
        ),
    ),
    Mutant(
        "torch_mask_count_binary",
        "torch backend: C_i counts the mask's positive pairs instead of summing their weights",
        (
            Edit(
                STREAM,
                "        pcnt[r0:r1] = w.sum(dim=1)",
                "        pcnt[r0:r1] = (w > 0).to(acc).sum(dim=1)",
            ),
        ),
    ),
    Mutant(
        "torch_sincere_backward_sigmoid",
        "torch backend: SINCERE backward uses σ(ℓ − η) instead of σ(η − ℓ)",
        (
            Edit(
                STREAM,
                "        g = -scale * g_sp[r0:r1, None] * w * torch.sigmoid(x)",
                "        g = -scale * g_sp[r0:r1, None] * w * torch.sigmoid(-x)",
            ),
        ),
    ),
    Mutant(
        "triton_multihot_equal_bitmasks",
        "Triton kernels: multi-hot positives need equal label sets instead of a shared label",
        (Edit(TRITON_LSE, "        return (a & b) != 0", "        return a == b"),),
    ),
    Mutant(
        "triton_mask_weights_dropped",
        "Triton kernels: the mask's weights dropped from Σ w·ℓ and Σ w (positives count 1)",
        (
            Edit(
                TRITON_LSE, "        mw = tl.where(pos, w, 0.0)", "        mw = pos.to(tl.float32)"
            ),
        ),
    ),
]


def _scratch_path(scratch: Path, repo_path: str) -> Path:
    if repo_path.startswith("python/flashcon/"):
        return scratch / "pkg" / "flashcon" / repo_path[len("python/flashcon/") :]
    if repo_path.startswith("triton_kernels/"):
        return scratch / "pkg" / "flashcon" / "triton_kernels" / repo_path[len("triton_kernels/") :]
    return scratch / repo_path


def make_scratch() -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="flashcon-mutants-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "python" / "flashcon", scratch / "pkg" / "flashcon", ignore=ignore)
    shutil.copytree(
        ROOT / "triton_kernels", scratch / "pkg" / "flashcon" / "triton_kernels", ignore=ignore
    )
    shutil.copytree(ROOT / "tests", scratch / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", scratch / "pyproject.toml")
    if not list((scratch / "pkg" / "flashcon").glob("_C*.so")):
        raise SystemExit("python/flashcon/_C*.so is missing: build the extension first (make test)")
    return scratch


def _env(scratch: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch / "pkg") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["TRITON_INTERPRET"] = "1"
    # A backend that cannot load is a failure, not a smaller grid.
    env.setdefault("FLASHCON_REQUIRE", "cpu,triton")
    return env


def check_imports_scratch(scratch: Path, python: str) -> None:
    code = (
        "import flashcon, flashcon.triton_kernels as t, flashcon._C as c; "
        "print(flashcon.__file__); print(t.__file__); print(c.__file__)"
    )
    out = subprocess.run(
        [python, "-c", code], cwd=scratch, env=_env(scratch), capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"importing flashcon from the scratch copy failed:\n{out.stderr}")
    files = out.stdout.split()
    bad = [f for f in files if not Path(f).resolve().is_relative_to(scratch.resolve())]
    if bad or len(files) != 3:
        raise SystemExit(f"not the scratch copy: {files} (scratch {scratch})")
    print(f"scratch copy imported: {files[0]}, {files[1]}, {files[2]}")


def apply(scratch: Path, mutant: Mutant) -> dict[Path, str]:
    """Apply every edit (each must match exactly once); returns the original texts."""
    originals: dict[Path, str] = {}
    for e in mutant.edits:
        p = _scratch_path(scratch, e.path)
        text = p.read_text()
        originals.setdefault(p, text)
        n = text.count(e.old)
        if n != 1:
            raise SystemExit(
                f"{mutant.name}: {e.path}: the text to replace occurs {n} times:\n{e.old}"
            )
        p.write_text(text.replace(e.old, e.new))
    return originals


def restore(originals: dict[Path, str]) -> None:
    for p, text in originals.items():
        p.write_text(text)


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)")


def run_tests(
    scratch: Path, pytest: str, tests: list[str], timeout: int
) -> tuple[int, list[str], str]:
    cmd = [pytest, "-q", "-p", "no:cacheprovider", "-rfE", "--tb=no", *tests]
    try:
        out = subprocess.run(
            cmd, cwd=scratch, env=_env(scratch), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, ["(timed out)"], ""
    failed = []
    for line in out.stdout.splitlines():
        m = _FAILED.match(line)
        if m:
            failed.append(m.group(2))
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    return out.returncode, failed, summary


def _caught_by(failed: list[str], limit: int = 4) -> str:
    names = [f.replace("tests/", "") for f in failed]
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    if len(names) > limit:
        shown += f" (+{len(names) - limit} more)"
    return shown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="pytest selection")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.what}")
        return 0
    mutants = MUTANTS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.name for m in MUTANTS}
        if unknown:
            raise SystemExit(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in MUTANTS if m.name in wanted]
    venv_bin = ROOT / ".venv" / "bin"
    python = str(venv_bin / "python") if (venv_bin / "python").exists() else sys.executable
    pytest = str(venv_bin / "pytest") if (venv_bin / "pytest").exists() else "pytest"
    scratch = make_scratch()
    try:
        check_imports_scratch(scratch, python)
        for m in mutants:  # every edit applies to the pristine copy before anything runs
            restore(apply(scratch, m))
        t0 = time.time()
        rc, failed, summary = run_tests(scratch, pytest, args.tests, args.timeout)
        print(f"unmutated: {summary} ({time.time() - t0:.0f} s)")
        if rc != 0:
            print("the unmutated selection does not pass:", *failed, sep="\n  ")
            return 2
        rows = []
        for m in mutants:
            originals = apply(scratch, m)
            t0 = time.time()
            try:
                rc, failed, summary = run_tests(scratch, pytest, args.tests, args.timeout)
            finally:
                restore(originals)
            caught = rc != 0
            files = sorted({e.path for e in m.edits})
            rows.append((m, files, caught, failed, summary))
            verdict = f"caught ({len(failed)} failed)" if caught else "NOT CAUGHT"
            print(f"{m.name}: {verdict}; {summary} ({time.time() - t0:.0f} s)", flush=True)
        print()
        print("| mutant | planted in | caught by |")
        print("|---|---|---|")
        for m, files, caught, failed, summary in rows:
            where = ", ".join(f"`{f}`" for f in files)
            by = _caught_by(failed) if caught else "**NOT CAUGHT**"
            if caught and not failed:
                by = f"pytest exit status non-zero: {summary}"
            print(f"| `{m.name}`: {m.what} | {where} | {by} |")
        missed = [m.name for m, _, caught, _, _ in rows if not caught]
        print()
        print(
            f"{len(rows) - len(missed)}/{len(rows)} mutants caught"
            + (f"; NOT CAUGHT: {', '.join(missed)}" if missed else "")
        )
        return 1 if missed else 0
    finally:
        if args.keep:
            print(f"scratch copy kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
