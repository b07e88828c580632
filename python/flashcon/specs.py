"""The loss-spec table: what each loss asks of the streaming engine.

Every backend implements the same four engine functions (``flashcon.engine``); a loss is a
list of streamed log-sum-exps (each a weighting of positives, negatives and TCL's k1 term, see
``engine.lse_fwd``), optionally SINCERE's softplus pass, and a per-row combination done in
PyTorch with the closed-form target terms (docs/losses.md §0, §3). Adding a loss is adding a row
here and its combination in ``functional``; adding a backend is implementing the four engine
functions. Every backend reads the weights from this table; the fused Triton losses (SupCon
L_out, NT-Xent, TCL, SINCERE) carry their row combination in their kernels.
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
    """A loss's streamed log-sum-exps, named by the statistic each gives; the per-row
    combination with the closed-form terms is the loss's own (``flashcon.functional``, and the
    fused kernels' row code for the losses they cover)."""

    name: str
    streams: tuple[Stream, ...]

    def stream(self, stat: str) -> Stream:
        for s in self.streams:
            if s.stat == stat:
                return s
        raise KeyError(f"{self.name} has no stream {stat!r}")


LOSS_SPECS: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("supcon_out", (Stream("lse"),)),
        LossSpec("supcon_in", (Stream("lse"), Stream("lse_pos", 1.0, 0.0))),
        # SupContrast's mask: the weighted pass gives the positives' sums (psum, pcnt).
        LossSpec("supcon_mask", (Stream("lse"), Stream("lse_pos", 1.0, 0.0))),
        LossSpec("ntxent", (Stream("lse"),)),  # as supcon_out, the label a sample id
        # SINCERE: η over the negatives, then the softplus pass over the positives.
        LossSpec("sincere", (Stream("eta", 0.0, 1.0),)),
        LossSpec("genscl", (Stream("lse"),)),  # every column weighted alike
        LossSpec("tcl", (Stream("log_d", 1.0, "k2", "k1"),)),
        # Samples and prototypes as columns; the prototypes as anchors in a second call.
        LossSpec("esupcon", (Stream("lse"),)),
    )
}
