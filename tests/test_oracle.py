"""flashcon.reference and the public API against an independent oracle (tests/oracle.py).

(a) Hand-derived values: inputs of two to four unit vectors whose similarities are 0 or ±1,
    so each loss is a closed form in e; the oracle and ``flashcon.reference`` must give it to
    1e-12.
(b) Every loss × option on small random float64 inputs: ``flashcon.reference`` and the public
    API on ``backend='torch'`` and ``'cpu'`` against the oracle, value and gradients (the
    oracle's gradients are autograd through its scalar graph).

Measured on this grid (float64, all three backends): value errors against the oracle at most
3.6e-15 and gradient errors at most 4.4e-15 absolute (losses up to 15, gradients up to 7.4), so
the grid compares at 4e-14 absolute: about 9× the worst measured error.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch

import flashcon
from flashcon.testing import assert_close, available_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oracle as O  # noqa: E402

E = math.e
DT = torch.float64
ATOL, RTOL = 4e-14, 0.0


def _f(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=DT)


def _api(loss: str, backend: str):
    """The public function of ``loss`` on ``backend`` ('reference' is flashcon.reference)."""
    mod = flashcon.reference if backend == "reference" else flashcon
    fn = getattr(mod, f"{loss}_loss")
    if backend == "reference":
        return fn
    return functools.partial(fn, backend=backend)


# ---------------------------------------------------------------------------------------------
# (a) Hand-derived values.

# H3: four single-view samples, z1 = z2 = (1, 0), z3 = (0, 1), z4 = (−1, 0), so
# s12 = 1, s13 = 0, s14 = −1, s23 = 0, s24 = −1, s34 = 0; with τ = 1 the logits are the s.
H3 = _f([[1, 0], [1, 0], [0, 1], [-1, 0]])
LG = math.log(E + 1 + 1 / E)  # log-sum-exp of the logits {1, 0, −1}: anchors 1 and 2 of H3


def _check_hand(expected: float, oracle_value: torch.Tensor, reference_value: torch.Tensor):
    assert abs(oracle_value.item() - expected) <= 1e-12 * max(1.0, abs(expected))
    assert abs(reference_value.item() - expected) <= 1e-12 * max(1.0, abs(expected))


@pytest.mark.parametrize("variant", ["out", "in"])
def test_hand_supcon(variant):
    y = torch.tensor([0, 0, 0, 1])
    # Anchors 1, 2: A = {1, 0, −1}, positives {1, 0} (C = 2).
    #   L_out: LG − (1 + 0)/2.   L_in: LG − log(e^1 + e^0) + log 2.
    # Anchor 3: A = {0, 0, 0}: log 3; positives {0, 0}: L_out log 3 − 0; L_in log 3 − log 2
    #   + log 2. Anchor 4: no positive: 0, counted (N_a = 4). τ = τ_b = 1: no scale.
    if variant == "out":
        expected = (2 * (LG - 0.5) + math.log(3)) / 4
    else:
        expected = (2 * (LG - math.log(E + 1) + math.log(2)) + math.log(3)) / 4
    kw = dict(temperature=1.0, base_temperature=1.0, variant=variant)
    _check_hand(expected, O.supcon(H3, y, **kw), flashcon.reference.supcon_loss(H3, y, **kw))
    # τ_b = 2 halves the loss (scale τ/τ_b).
    kw["base_temperature"] = 2.0
    _check_hand(expected / 2, O.supcon(H3, y, **kw), flashcon.reference.supcon_loss(H3, y, **kw))


@pytest.mark.parametrize("variant", ["out", "in"])
def test_hand_supcon_weighted_asymmetric_mask(variant):
    mask = torch.zeros(4, 4, dtype=DT)
    mask[0] = torch.tensor([5.0, 2.0, 1.0, 0.0])  # the self weight 5 is ignored
    mask[3, 0] = 1.0  # asymmetric: 4 → 1 is positive, 1 → 4 is not
    # Anchor 1: logits {1, 0, −1} with weights {2, 1, 0}, W = 3:
    #   L_out: LG − (2·1 + 1·0)/3;   L_in: LG − log(2e + 1) + log 3.
    # Anchor 4: logits to 1, 2, 3: {−1, −1, 0}, LSE = log(2/e + 1); weight 1 on column 1:
    #   L_out = L_in = log(1 + 2/e) + 1.   Anchors 2, 3: no weight: 0, counted.
    tail = math.log(1 + 2 / E) + 1
    if variant == "out":
        expected = (LG - 2 / 3 + tail) / 4
    else:
        expected = (LG - math.log(2 * E + 1) + math.log(3) + tail) / 4
    kw = dict(temperature=1.0, base_temperature=1.0, variant=variant)
    _check_hand(
        expected,
        O.supcon(H3, mask=mask, **kw),
        flashcon.reference.supcon_loss(H3, mask=mask, **kw),
    )


def test_hand_supcon_multihot():
    y = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    # Label sets {0}, {0, 1}, {1}, {}: P(1) = {2}, P(2) = {1, 3}, P(3) = {2}, P(4) = ∅.
    # Anchor 1: LG − 1.  Anchor 2: logits to 1, 3, 4 are {1, 0, −1}: LG − (1 + 0)/2.
    # Anchor 3: logits {0, 0, 0}, positive logit 0: log 3.  Anchor 4: 0, counted.
    expected = (2 * LG - 1.5 + math.log(3)) / 4
    kw = dict(temperature=1.0, base_temperature=1.0)
    _check_hand(expected, O.supcon(H3, y, **kw), flashcon.reference.supcon_loss(H3, y, **kw))


def test_hand_sincere():
    y = torch.tensor([0, 0, 0, 1])
    # Anchor 1: negatives {4}: η = −1; positives 2 (logit 1), 3 (logit 0):
    #   (softplus(−1 − 1) + softplus(−1 − 0))/2.  Anchor 2: the same.
    # Anchor 3: η = s34 = 0; positives 1, 2 with logit 0: softplus(0) = log 2.
    # Anchor 4: no positive: 0. Mean over the 4 embeddings.
    anchor1 = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2
    expected = (2 * anchor1 + math.log(2)) / 4
    _check_hand(
        expected,
        O.sincere(H3, y, temperature=1.0),
        flashcon.reference.sincere_loss(H3, y, temperature=1.0),
    )


def test_hand_tcl():
    f = _f([[1, 0], [1, 0], [0, 1]])
    y = torch.tensor([0, 0, 1])
    # τ = 1/2. Anchor 1: positive 2 (s = 1, ℓ = 2): e^2 + k1·e^{−1}; negative 3 (s = 0):
    # k2·e^0. ℓ_1 = log(e^2 + 3/e + 2) − 2 with k1 = 3, k2 = 2. Anchor 2: the same.
    # Anchor 3: no positive: 0. Mean over 3.
    expected = 2 * (math.log(E**2 + 3 / E + 2) - 2) / 3
    kw = dict(temperature=0.5, k1=3.0, k2=2.0)
    _check_hand(expected, O.tcl(f, y, **kw), flashcon.reference.tcl_loss(f, y, **kw))


def test_hand_genscl_soft_labels_are_normalised():
    f = _f([[1, 0], [1, 0], [0, 1]])
    soft = _f([[1, 0], [1, 1], [1, 0]])
    r = 1 / math.sqrt(2)
    eps = O.GENSCL_EPS
    # ŷ = (1, 0), (1, 1)/√2, (1, 0): m12 = m23 = 1/√2, m13 = 1. τ = 1/2: ℓ12 = 2, ℓ13 = ℓ23 = 0.
    # Anchor 1: LSE = log(e^2 + 1); (m12·(LSE − 2) + m13·(LSE − 0)) / (m12 + m13 + ε).
    # Anchor 2: LSE = log(e^2 + 1); (r·(LSE − 2) + r·LSE) / (2r + ε).
    # Anchor 3: logits {0, 0}: LSE = log 2; (1 + r)·log 2 / (1 + r + ε).
    # Unnormalised labels would weigh anchor 1's columns 1 : 1 instead of r : 1.
    lse = math.log(E**2 + 1)
    a1 = (r * (lse - 2) + lse) / (r + 1 + eps)
    a2 = (r * (lse - 2) + r * lse) / (2 * r + eps)
    a3 = (1 + r) * math.log(2) / (1 + r + eps)
    expected = (a1 + a2 + a3) / 3
    kw = dict(temperature=0.5, base_temperature=0.5)
    _check_hand(expected, O.genscl(f, soft, **kw), flashcon.reference.genscl_loss(f, soft, **kw))


def test_hand_ntxent_and_supcon_one_mode():
    # B = 2, V = 2: sample 0 views (1, 0), (0, 1); sample 1 views (1, 0), (−1, 0).
    # View-major rows r0 = (1, 0), r1 = (1, 0), r2 = (0, 1), r3 = (−1, 0); positives (r0, r2),
    # (r1, r3). τ = 1.
    f = torch.tensor([[[1, 0], [0, 1]], [[1, 0], [-1, 0]]], dtype=DT)
    # r0: logits to r1, r2, r3 = {1, 0, −1}: LG − 0.   r1: {1, 0, −1}: LG − (−1).
    # r2: {0, 0, 0}: log 3 − 0.   r3: {−1, −1, 0}: log(1 + 2/e) − (−1).
    expected = (LG + LG + 1 + math.log(3) + math.log(1 + 2 / E) + 1) / 4
    _check_hand(
        expected,
        O.ntxent(f, temperature=1.0),
        flashcon.reference.ntxent_loss(f, temperature=1.0),
    )
    # 'one' mode: anchors r0 and r1 only, mean over B = 2 (not over the N = 4 views).
    one = (LG + LG + 1) / 2
    kw = dict(temperature=1.0, base_temperature=1.0, contrast_mode="one")
    _check_hand(one, O.supcon(f, **kw), flashcon.reference.supcon_loss(f, **kw))


@pytest.mark.parametrize("prototype_anchors", [True, False])
def test_hand_esupcon(prototype_anchors):
    f = _f([[1, 0], [0, 1]])
    y = torch.tensor([0, 1])
    protos = _f([[2, 0], [0, 3], [-1, 0]])  # u = (1, 0), (0, 1), (−1, 0); class 2 is absent
    # τ = 1. Sample 1: columns z2 (0), u0 (1, positive), u1 (0), u2 (−1):
    #   log(e + 2 + 1/e) − 1.   Sample 2: z1 (0), u0 (0), u1 (1, positive), u2 (0):
    #   log(e + 3) − 1.   Prototype 0: samples {1 (positive), 0}: log(e + 1) − 1; prototype 1
    #   the same; prototype 2 has no sample: not an anchor. Mean over 4 anchors (or 2).
    samples = math.log(E + 2 + 1 / E) - 1 + math.log(E + 3) - 1
    if prototype_anchors:
        expected = (samples + 2 * (math.log(E + 1) - 1)) / 4
    else:
        expected = samples / 2
    kw = dict(temperature=1.0, prototype_anchors=prototype_anchors)
    _check_hand(
        expected,
        O.esupcon(f, y, protos, **kw),
        flashcon.reference.esupcon_loss(f, y, protos, **kw),
    )


# ---------------------------------------------------------------------------------------------
# (b) The grid: every loss × option against the oracle.


def _unit(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=DT), dim=-1)


def _multihot(b: int, n_labels: int, g: torch.Generator) -> torch.Tensor:
    y = torch.rand(b, n_labels, generator=g) < 0.4
    y[0] = False  # a sample with no label: no positive
    y[1, 0] = y[2, 0] = True  # at least one shared label
    return y


def _queue(kind: str, d: int, g: torch.Generator) -> tuple[flashcon.MemoryQueue, tuple]:
    """A queue that has wrapped around (7 rows pushed into 5 slots, then 4 more), and the
    oracle's view of it: the rows it must hold, with their labels."""
    feats1, feats2 = _unit(7, d, g=g), _unit(2, 2, d, g=g)
    if kind == "soft":
        q = flashcon.MemoryQueue(5, d, num_soft_classes=3, dtype=DT)
        lab1, lab2 = (
            torch.rand(7, 3, generator=g, dtype=DT),
            torch.rand(2, 3, generator=g, dtype=DT),
        )
        lab2_rows = lab2.repeat(2, 1)
    elif kind == "multihot":
        q = flashcon.MemoryQueue(5, d, multilabel=True, dtype=DT)
        lab1, lab2 = torch.rand(7, 3, generator=g) < 0.5, torch.rand(2, 3, generator=g) < 0.5
        lab2_rows = lab2.repeat(2, 1)
    else:
        q = flashcon.MemoryQueue(5, d, dtype=DT)
        lab1, lab2 = torch.randint(0, 4, (7,), generator=g), torch.randint(0, 4, (2,), generator=g)
        lab2_rows = lab2.repeat(2)
    q.push(feats1, lab1)
    q.push(feats2, lab2)
    # The 5 newest rows: the last one of the first push, then the 4 of the second (view-major).
    rows = torch.cat([feats1[-1:], torch.cat(feats2.unbind(1))])
    labels = torch.cat([lab1[-1:], lab2_rows])
    return q, (rows, labels)


# Each case: (loss, inputs, options). Inputs name what is built by _case_inputs.
CASES = {}
for _variant in ("out", "in"):
    for _mode in ("all", "one"):
        for _inp in ("labels", "simclr", "mask", "mask_asym", "multihot", "one_view", "v3"):
            if _mode == "one" and _inp == "one_view":
                continue  # 'one' mode needs views to differ from 'all'
            CASES[f"supcon-{_variant}-{_mode}-{_inp}"] = (
                "supcon",
                _inp,
                {"temperature": 0.1, "contrast_mode": _mode, "variant": _variant},
            )
CASES["supcon-tau_b"] = ("supcon", "labels", {"temperature": 0.3, "base_temperature": 0.2})
CASES["supcon-default-options"] = ("supcon", "labels", {})
for _inp in ("labels", "multihot", "simclr"):
    CASES[f"supcon-queue-{_inp}"] = ("supcon", f"{_inp}+queue", {"temperature": 0.1})
CASES["supcon-in-one-queue"] = (
    "supcon",
    "labels+queue",
    {"temperature": 0.1, "contrast_mode": "one", "variant": "in"},
)
CASES["ntxent-v2"] = ("ntxent", "simclr", {})
CASES["ntxent-v3-tau"] = ("ntxent", "v3", {"temperature": 0.2})
CASES["ntxent-queue"] = ("ntxent", "simclr+queue", {"temperature": 0.3})
# SINCERE at τ >= 0.2: η − ℓ stays below 20 (see test_sincere_softplus_beyond_threshold).
for _inp in ("labels", "multihot", "one_view", "v3", "same_class"):
    CASES[f"sincere-{_inp}"] = ("sincere", _inp, {"temperature": 0.2})
CASES["sincere-queue"] = ("sincere", "labels+queue", {"temperature": 0.25})
CASES["sincere-queue-multihot"] = ("sincere", "multihot+queue", {"temperature": 0.25})
CASES["genscl-shared"] = ("genscl", "soft", {"temperature": 0.1})
CASES["genscl-per-view"] = ("genscl", "soft_per_view", {"temperature": 0.1})
CASES["genscl-per-view-orthogonal"] = ("genscl", "soft_orthogonal", {"temperature": 0.1})
CASES["genscl-tau_b"] = ("genscl", "soft", {"temperature": 0.3, "base_temperature": 0.07})
CASES["genscl-queue"] = ("genscl", "soft+queue", {"temperature": 0.1})
for _k1, _k2 in ((5000.0, 1.0), (0.0, 1.0), (3.0, 2.0), (10.0, 0.0)):
    CASES[f"tcl-k1={_k1:g}-k2={_k2:g}"] = ("tcl", "labels", {"k1": _k1, "k2": _k2})
CASES["tcl-multihot"] = ("tcl", "multihot", {"k1": 3.0, "k2": 2.0, "temperature": 0.2})
CASES["tcl-one-view"] = ("tcl", "one_view", {"k1": 50.0})
CASES["tcl-queue"] = ("tcl", "labels+queue", {"k1": 3.0, "k2": 2.0})
CASES["tcl-queue-multihot"] = ("tcl", "multihot+queue", {"k1": 3.0, "k2": 2.0})
for _pa in (True, False):
    CASES[f"esupcon-anchors={_pa}"] = ("esupcon", "protos", {"prototype_anchors": _pa})
    CASES[f"esupcon-multihot-anchors={_pa}"] = (
        "esupcon",
        "multihot+protos",
        {"prototype_anchors": _pa},
    )
CASES["esupcon-tau_b"] = ("esupcon", "protos", {"temperature": 0.2, "base_temperature": 0.1})
CASES["esupcon-queue"] = ("esupcon", "protos+queue", {})
CASES["esupcon-queue-multihot"] = ("esupcon", "multihot+protos+queue", {})


def _case_inputs(name: str) -> tuple[dict, tuple | None, flashcon.MemoryQueue | None]:
    """(inputs, the oracle's queue, the library's queue) of a case, from a per-case seed."""
    loss, kind, _ = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    b, v, d = 5, 2, 4
    parts = set(kind.split("+"))
    x: dict = {}
    if "one_view" in parts:
        x["features"] = _unit(7, d, g=g)
        x["labels"] = torch.tensor([0, 1, 0, 2, 1, 1, 3])  # classes 2 and 3: no positive
    elif "v3" in parts:
        x["features"] = _unit(4, 3, d, g=g)
        if loss != "ntxent":
            x["labels"] = torch.tensor([0, 1, 0, 2])
    else:
        x["features"] = _unit(b, v, d, g=g)
    if "labels" in parts or "protos" in parts and "multihot" not in parts:
        x["labels"] = torch.tensor([0, 1, 0, 2, 1])
    if "same_class" in parts:
        x["labels"] = torch.zeros(b, dtype=torch.long)  # no negative anywhere
    if "multihot" in parts:
        x["labels"] = _multihot(b, 3, g)
    if "mask" in parts or "mask_asym" in parts:
        m = torch.rand(b, b, generator=g, dtype=DT) * (torch.rand(b, b, generator=g) < 0.6)
        m[3] = 0.0  # a sample without positives
        if "mask" in parts:
            m = (m + m.T) / 2
        x["mask"] = m
    if "soft" in parts:
        x["soft_labels"] = torch.rand(b, 3, generator=g, dtype=DT)
    if "soft_per_view" in parts:
        x["soft_labels"] = torch.rand(b, v, 3, generator=g, dtype=DT)
    if "soft_orthogonal" in parts:
        s = torch.rand(b, v, 3, generator=g, dtype=DT)
        s[:, :, 2] = 0.0
        s[0] = torch.tensor([0.0, 0.0, 1.0], dtype=DT)  # orthogonal to every other row: M = 0
        s[1, 1] = torch.tensor([0.0, 0.0, 2.0], dtype=DT)  # one view of sample 1 shares it
        x["soft_labels"] = s
    if "protos" in parts:
        k = 4 if "multihot" not in parts else 3
        x["prototypes"] = 1.5 * torch.randn(k, d, generator=g, dtype=DT)  # class 3 absent
    oq = lq = None
    if "queue" in parts:
        qkind = "soft" if loss == "genscl" else "multihot" if "multihot" in parts else "int"
        lq, oq = _queue(qkind, d, g)
    return x, oq, lq


def _grads(value: torch.Tensor, x: dict) -> dict:
    keys = [k for k in ("features", "prototypes") if k in x]
    if not value.requires_grad:  # a loss that is 0 whatever the features (no anchor counts)
        return {k: torch.zeros_like(x[k]) for k in keys}
    gs = torch.autograd.grad(value, [x[k] for k in keys], allow_unused=True, materialize_grads=True)
    return dict(zip(keys, gs))


def _leafs(x: dict) -> dict:
    out = dict(x)
    for k in ("features", "prototypes"):
        if k in out:
            out[k] = out[k].detach().clone().requires_grad_(True)
    return out


def _positional(loss: str, x: dict) -> tuple:
    if loss == "supcon":
        return (x["features"], x.get("labels"), x.get("mask"))
    if loss == "ntxent":
        return (x["features"],)
    if loss == "genscl":
        return (x["features"], x["soft_labels"])
    if loss == "esupcon":
        return (x["features"], x["labels"], x["prototypes"])
    return (x["features"], x["labels"])


@functools.cache
def _oracle_result(name: str) -> tuple[torch.Tensor, dict]:
    loss, _, options = CASES[name]
    x, oq, _ = _case_inputs(name)
    x = _leafs(x)
    value = O.LOSSES[loss](*_positional(loss, x), queue=oq, **options)
    return value.detach(), {k: g.detach() for k, g in _grads(value, x).items()}


BACKENDS = ["reference", "torch", *available_backends("cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_against_oracle(name, backend):
    loss, _, options = CASES[name]
    expected, expected_grads = _oracle_result(name)
    x, _, lq = _case_inputs(name)
    x = _leafs(x)
    kw = dict(options)
    if lq is not None:
        kw["queue"] = lq
    value = _api(loss, backend)(*_positional(loss, x), **kw)
    assert value.dtype == DT
    assert_close(value, expected, atol=ATOL, rtol=RTOL, name=f"{name} value")
    for key, g in _grads(value, x).items():
        assert_close(g, expected_grads[key], atol=ATOL, rtol=RTOL, name=f"{name} d/d{key}")


def test_grid_covers_every_loss_and_option():
    losses = {loss for loss, _, _ in CASES.values()}
    assert losses == set(O.LOSSES)
    opts = [(loss, kind, tuple(sorted(o))) for loss, kind, o in CASES.values()]
    assert any(o[0] == "supcon" and "mask_asym" in o[1] for o in opts)
    assert {k for _, _, o in CASES.values() for k in o} >= {
        "temperature",
        "base_temperature",
        "contrast_mode",
        "variant",
        "k1",
        "k2",
        "prototype_anchors",
    }
    assert sum("queue" in kind for _, kind, _ in CASES.values()) >= 10


# ---------------------------------------------------------------------------------------------
# A finding of the oracle: torch's softplus returns x itself above its threshold of 20, an
# error of log1p(e^{−x}) ≈ e^{−x} (up to 2e-9 per term) that float64 should not have.


def _sincere_threshold_input() -> tuple[torch.Tensor, torch.Tensor, float]:
    # Anchor 1's positive is anti-parallel and its negative parallel: η − ℓ = 2/τ = 20.5.
    f = _f([[1, 0], [-1, 0], [1, 0]])
    return f, torch.tensor([0, 0, 1]), 2 / 20.5


def test_sincere_threshold_input_by_hand():
    f, y, t = _sincere_threshold_input()
    # 1/τ = 10.25. Anchor 1: positive ℓ = −10.25, negative ℓ = 10.25: softplus(20.5).
    # Anchor 2 (−1, 0): positive and negative both at ℓ = −10.25: softplus(0) = log 2.
    # Anchor 3: no positive: 0. Mean over 3.
    expected = (20.5 + math.log1p(math.exp(-20.5)) + math.log(2)) / 3
    assert abs(O.sincere(f, y, temperature=t).item() - expected) < 1e-13


@pytest.mark.parametrize("backend", BACKENDS)
def test_sincere_softplus_beyond_threshold(backend):
    """softplus(20.5) in float64: torch's F.softplus returns 20.5 there (threshold 20, an error
    of e^-20.5 = 1.2e-9); every backend computes log(1 + e^x) exactly."""
    f, y, t = _sincere_threshold_input()
    expected = O.sincere(f, y, temperature=t)
    got = _api("sincere", backend)(f, y, temperature=t)
    assert_close(got, expected, atol=ATOL, rtol=RTOL, name="sincere value")
