"""The drop-ins behave like the code they replace, where that code is exact.

Cases found by running the peers' own tests and code (SupContrast, lightly, the official
GenSCL) against flashcon: rows whose only column is their positive, GenSCL in 16 bits,
SupContrast's input forms, lightly's ``gather_distributed`` without a process group, and the
documented differences (mask rows of tiny weight). The pytorch-metric-learning stand-in is
tested in ``tests/test_pml.py``. Without a GPU the Triton kernels run through Triton's
interpreter (conftest).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import flashcon
from flashcon.testing import assert_close, available_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oracle as O  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STREAMING = ["torch", *available_backends("cpu", "triton")]
ALL = ["reference", *STREAMING]


def _unit(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# --------------------------------------------------------------------------------------------
# A row whose only column is its positive: exactly 0, value and gradient (SupContrast gives 0;
# lightly's tests expect exactly 0 for a batch of one sample). Each loss's case, on every
# backend; on Triton the 'all'-mode SupCon, NT-Xent and TCL run the fused kernels' own row code.

ONE_COLUMN = {
    # B = 1 sample, V = 2 views: each row's one column is its other view.
    "supcon": lambda f, be: flashcon.supcon_loss(f, torch.tensor([3]), backend=be),
    "supcon-in": lambda f, be: flashcon.supcon_loss(f, torch.tensor([3]), variant="in", backend=be),
    "supcon-one": lambda f, be: flashcon.supcon_loss(
        f, torch.tensor([3]), contrast_mode="one", backend=be
    ),
    "supcon-mask": lambda f, be: flashcon.supcon_loss(f, mask=torch.tensor([[0.3]]), backend=be),
    "ntxent": lambda f, be: flashcon.ntxent_loss(f, temperature=0.1, backend=be),
    "tcl-k1-0": lambda f, be: flashcon.tcl_loss(f, torch.tensor([3]), k1=0.0, backend=be),
    "genscl": lambda f, be: flashcon.genscl_loss(f, torch.tensor([[0.2, 0.7]]), backend=be),
    # One sample against its own class's prototype: both anchors have one column.
    "esupcon": lambda f, be: flashcon.esupcon_loss(
        f[:, 0], torch.tensor([0]), 3 * f[:, 1], backend=be
    ),
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("loss", list(ONE_COLUMN))
def test_one_column_rows_are_exactly_zero(loss, backend):
    for seed in range(4):
        f = _unit(1, 2, 8, seed=seed, dtype=torch.float32).to(DEVICE).requires_grad_(True)
        value = ONE_COLUMN[loss](f, backend)
        (grad,) = torch.autograd.grad(value, f)
        assert value.item() == 0.0, (seed, value.item())
        assert torch.count_nonzero(grad).item() == 0, (seed, grad.abs().max().item())


@pytest.mark.parametrize("backend", ALL)
def test_tcl_without_weighted_negatives_is_exactly_zero(backend):
    # k1 = k2 = 0: D_i is the one positive's term, so ℓ_i = 0 whatever the batch (N = 8).
    f = _unit(4, 2, 8, seed=1, dtype=torch.float32).to(DEVICE).requires_grad_(True)
    value = flashcon.tcl_loss(f, torch.arange(4), k1=0.0, k2=0.0, backend=backend)
    (grad,) = torch.autograd.grad(value, f)
    assert value.item() == 0.0
    assert torch.count_nonzero(grad).item() == 0


# --------------------------------------------------------------------------------------------
# GenSCL in 16 bits.


def test_genscl_reference_fp16_without_label_overlap_is_finite():
    # Sample 2's soft label overlaps no other sample's: M_2 = 0, where M_2 + 1e-8 is 0 in
    # fp16 (the reference computes in the input dtype). The official GenSCL is finite here.
    soft = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    f = _unit(3, 1, 8, seed=0).half()
    exact = O.genscl(f.double(), soft, temperature=0.5)
    for backend in ALL:
        value = flashcon.genscl_loss(
            f.to(DEVICE), soft.half().to(DEVICE), temperature=0.5, backend=backend
        )
        assert torch.isfinite(value), backend
        # The reference computes in fp16; the streaming backends' statistics are fp32.
        tol = 5e-3 if backend == "reference" else 1e-5
        assert_close(value.cpu(), exact, atol=tol, rtol=tol, name=f"{backend} value")


def _within_one_rounding(g: torch.Tensor, exact: torch.Tensor, dtype, what: str) -> None:
    """Each entry within half an ulp (in ``dtype``) of the exact gradient, plus fp32-level
    slack: the gradient was computed accurately and rounded once."""
    fi = torch.finfo(dtype)
    ulp = fi.eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(fi.tiny))))
    err = (g.double() - exact).abs()
    bound = 0.5 * ulp + 2.0**-18 * exact.abs().max()
    worst = int(torch.argmax(err / bound))
    assert bool((err <= bound).all()), (
        f"{what}: entry {worst} off by {err.flatten()[worst].item():.3g} = "
        f"{(err / ulp).flatten()[worst].item():.3g} ulp of {exact.flatten()[worst].item():.6g}"
    )


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_genscl_16bit_gradient_is_rounded_once(dtype, backend):
    # One-hot labels (GenSCL is SupCon L_out there). The engine's and the closed form's
    # gradients nearly cancel; summed before rounding, every entry is within half an ulp of
    # the exact gradient of the rounded inputs (they were 2-3x that, rounded apart).
    b = 8 if backend == "triton" else 24
    for seed in range(2):
        f64 = _unit(b, 2, 16, seed=seed)
        labels = torch.randint(0, 5, (b,), generator=torch.Generator().manual_seed(seed))
        soft = torch.nn.functional.one_hot(labels, 5).double()
        f = f64.to(dtype).to(DEVICE).requires_grad_(True)
        flashcon.genscl_loss(f, soft.to(DEVICE), temperature=0.1, backend=backend).backward()
        fr = f.detach().cpu().double().requires_grad_(True)
        flashcon.genscl_loss(fr, soft, temperature=0.1, backend="reference").backward()
        _within_one_rounding(f.grad.cpu(), fr.grad, dtype, f"seed {seed}")


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_genscl_16bit_two_samples_one_class_is_exactly_zero(dtype, backend):
    # B = 2, V = 1, one class: the exact loss and gradient are 0 (bf16 gave 2^-5 = 0.031).
    for seed in range(3):
        f = _unit(2, 8, seed=seed).to(dtype).to(DEVICE).requires_grad_(True)
        value = flashcon.genscl_loss(f, torch.ones(2, 1, device=DEVICE), backend=backend)
        (grad,) = torch.autograd.grad(value, f)
        assert value.item() == 0.0
        assert torch.count_nonzero(grad).item() == 0, grad.abs().max().item()


# --------------------------------------------------------------------------------------------
# SupContrast's input forms: labels [B, 1], integral float labels, features [B, V, ...].


@pytest.mark.parametrize("backend", ALL)
def test_supcon_takes_supcontrast_inputs(backend):
    f = _unit(6, 2, 12, seed=3, dtype=torch.float32).to(DEVICE)
    labels = torch.tensor([0, 1, 0, 2, 1, 0], device=DEVICE)
    crit = flashcon.SupConLoss(temperature=0.1, backend=backend)
    want = crit(f, labels)
    exact = O.supcon(f.cpu().double(), labels.cpu(), temperature=0.1)
    assert_close(want.cpu(), exact, atol=1e-5, rtol=1e-5, name="canonical")
    assert torch.equal(crit(f, labels[:, None]), want)  # [B, 1]
    assert torch.equal(crit(f, labels.double()), want)  # integral floats
    assert torch.equal(crit(f, labels.float()[:, None]), want)
    # [B, V, 3, 4]: flattened to [B, V, 12] (SupContrast's features.view(B, V, -1)).
    assert torch.equal(crit(f.reshape(6, 2, 3, 4), labels), want)
    with pytest.raises(ValueError, match="integral"):
        crit(f, labels.double() + 0.5)  # would be truncated: refused


# --------------------------------------------------------------------------------------------
# lightly: gather_distributed=True without a process group runs as one process.


@pytest.mark.parametrize("backend", STREAMING)
def test_ntxent_module_gathers_only_with_a_process_group(backend):
    assert not torch.distributed.is_initialized()
    f = _unit(5, 2, 8, seed=4).to(DEVICE).float()
    single = flashcon.NTXentLoss(temperature=0.2, backend=backend)(f)
    gathered = flashcon.NTXentLoss(temperature=0.2, backend=backend, gather_distributed=True)(f)
    assert torch.equal(gathered, single)
    assert_close(single.cpu(), O.ntxent(f.cpu().double(), temperature=0.2), atol=1e-6, rtol=1e-6)
    # The functional form (and every other loss) still refuses the impossible request.
    with pytest.raises(RuntimeError, match="init_process_group"):
        flashcon.ntxent_loss(f, gather_distributed=True, backend=backend)


# --------------------------------------------------------------------------------------------
# Documented differences.


def _supcontrast_masked(f: torch.Tensor, mask: torch.Tensor, t: float) -> float:
    """SupContrast's rule for mask rows (dense, 'all' mode, τ_b = 0.07): the weighted sum of
    log-probabilities divided by the row's weight sum, or by 1 where that sum is < 1e-6."""
    b, v, _ = f.shape
    z = torch.cat(f.unbind(1))
    logits = z @ z.T / t
    off = ~torch.eye(b * v, dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(~off, float("-inf")), 1, True)
    w = mask.repeat(v, v) * off
    w_sum = w.sum(1)
    rows = (w * log_prob).sum(1) / torch.where(w_sum < 1e-6, torch.ones_like(w_sum), w_sum)
    return (-(t / 0.07) * rows).mean().item()


@pytest.mark.parametrize("backend", ALL)
def test_mask_row_of_tiny_weight_is_divided_by_its_sum(backend):
    # Rows 0 and 3 (sample 0's views) have weights summing to 6e-7 (< 1e-6): flashcon divides
    # by that sum, as for any other row; SupContrast divides by 1 there, which scales those
    # rows' losses by 6e-7.
    f = _unit(3, 2, 8, seed=5, dtype=torch.float32).to(DEVICE)
    mask = torch.tensor([[0.0, 3e-7, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 1.0]], dtype=f.dtype)
    value = flashcon.supcon_loss(f, mask=mask.to(DEVICE), temperature=0.1, backend=backend)
    exact = O.supcon(f.cpu().double(), mask=mask.double(), temperature=0.1)
    assert_close(value.cpu(), exact, atol=1e-5, rtol=1e-5)
    assert abs(value.item() - _supcontrast_masked(f.cpu().double(), mask.double(), 0.1)) > 0.1
    for doc in (flashcon.supcon_loss.__doc__, flashcon.SupConLoss.__doc__):
        assert "1e-6" in doc and "divides by 1" in doc


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_supcon_module_returns_fp32_for_16bit_features(dtype):
    f = _unit(4, 2, 8, seed=6).to(dtype).to(DEVICE)
    assert flashcon.SupConLoss()(f, torch.tensor([0, 1, 0, 1], device=DEVICE)).dtype == (
        torch.float32
    )
    assert "fp32" in flashcon.SupConLoss.__doc__
