"""The loss-spec table: what each loss asks of the streaming engine.

Every backend implements the same four engine functions (``flashcon.engine``); a loss is a
list of streamed log-sum-exps (each a weighting of positives, negatives and TCL's k1 term, see
``engine.lse_fwd``), optionally SINCERE's softplus pass, and a per-row combination done in
PyTorch with the closed-form target terms (docs/losses.md §0, §3). Adding a loss is adding a row
here and its combination in ``functional``; adding a backend is implementing the four engine
functions: the table serves both.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stream:
    """One streamed masked log-sum-exp: lse_i = log(Σ_P [w_pos e^ℓ + k1 e^{−s}] + Σ_N w_neg e^ℓ).

    Weights are numbers or the name of a loss option (``"k2"``, ``"k1"``).
    """

    stat: str
    w_pos: float | str = 1.0
    w_neg: float | str = 1.0
    k1: float | str = 0.0

    def weights(self, options: dict[str, float]) -> tuple[float, float, float]:
        get = lambda w: float(options[w]) if isinstance(w, str) else float(w)  # noqa: E731
        return get(self.w_pos), get(self.w_neg), get(self.k1)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    name: str
    streams: tuple[Stream, ...]
    softplus_pass: bool  # SINCERE's second pass over positives
    closed_form: str  # the O(N·D) part done in PyTorch
    saved: str  # per-row statistics kept for the backward


LOSS_SPECS: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec(
            "supcon_out",
            (Stream("lse"),),
            False,
            "Q_i = psum_i/τ, C_i = pcnt_i (streamed alongside the LSE)",
            "lse",
        ),
        LossSpec(
            "supcon_in",
            (Stream("lse"), Stream("lse_pos", 1.0, 0.0)),
            False,
            "log C_i",
            "lse, lse_pos",
        ),
        LossSpec(
            "supcon_mask",
            (Stream("lse"), Stream("lse_pos", 1.0, 0.0)),
            False,
            "weighted Q_i = psum_i/τ and C_i = pcnt_i from the pos_weight pass",
            "lse, lse_pos",
        ),
        LossSpec("ntxent", (Stream("lse"),), False, "as supcon_out, label = sample id", "lse"),
        LossSpec(
            "sincere",
            (Stream("eta", 0.0, 1.0),),
            True,
            "1/C_i",
            "eta, r (= Σ_P σ(η − ℓ))",
        ),
        LossSpec(
            "genscl",
            (Stream("lse"),),
            False,
            "M_i = ŷ_i·Σŷ − 1, A_i = (ŷ_iᵀ(ŶᵀZ)z_i − ‖z_i‖²)/τ",
            "lse",
        ),
        LossSpec("tcl", (Stream("log_d", 1.0, "k2", "k1"),), False, "Q_i, C_i", "log_d"),
        LossSpec(
            "esupcon",
            (Stream("lse"),),
            False,
            "Q_i, C_i over samples ∪ prototypes; prototype rows as a second call",
            "lse",
        ),
    )
}
