"""gather_distributed: W ranks (gloo, CPU) against the single process on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from flashcon.testing import (
    DIST_CASES,
    _dist_worker,
    assert_close,
    available_backends,
    dist_inputs,
    dist_loss,
    value_and_grads,
)

BACKENDS = ["torch", *available_backends("cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [[3, 5], [4, 1, 6]], ids=["W2-uneven", "W3-uneven"])
def test_matches_single_process(sizes, backend, tmp_path):
    world = len(sizes)
    out = str(tmp_path / "res")
    mp.spawn(
        _dist_worker,
        args=(world, str(tmp_path / "init"), out, backend, sizes),
        nprocs=world,
        join=True,
    )
    ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    for case, opts in DIST_CASES:
        parts = dist_inputs(case, sizes)
        whole = {
            k: (parts[0][k] if k == "prototypes" else torch.cat([p[k] for p in parts]))
            for k in parts[0]
        }
        ref_val, ref_g = value_and_grads(dist_loss(case, None, **opts), whole)
        vals = torch.stack([ranks[r][case][0] for r in range(world)])
        # The mean over ranks of the returned values is the single-process loss.
        assert_close(vals.mean(), ref_val, atol=1e-9, rtol=1e-9, name=f"{case} value")
        # Each rank's feature gradient is W × the single-process gradient of its rows.
        start = 0
        for r, s in enumerate(sizes):
            g = ranks[r][case][1]["features"]
            assert_close(
                g,
                world * ref_g["features"][start : start + s],
                atol=1e-9,
                rtol=1e-8,
                name=f"{case} rank {r} dfeatures",
            )
            start += s
        if "prototypes" in ref_g:
            # Replicated prototypes: DDP's average of the ranks' gradients is the exact one.
            mean_g = torch.stack([ranks[r][case][1]["prototypes"] for r in range(world)]).mean(0)
            assert_close(mean_g, ref_g["prototypes"], atol=1e-9, rtol=1e-8, name=f"{case} dprotos")


def test_gather_needs_process_group():
    from flashcon import supcon_loss

    with pytest.raises(RuntimeError, match="init_process_group"):
        supcon_loss(torch.randn(4, 2, 8), torch.arange(4), gather_distributed=True, backend="torch")


def test_gather_rejects_reference_backend():
    from flashcon import supcon_loss

    with pytest.raises(ValueError, match="streaming backend"):
        supcon_loss(
            torch.randn(4, 2, 8), torch.arange(4), gather_distributed=True, backend="reference"
        )
