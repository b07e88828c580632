"""What a loss call launches, read from the launchers of the tree being modelled: the
symmetric kernels of one forward + backward, their specialisations (kernel_report ``Spec``),
grids and the programs' runs of partner tiles."""

from __future__ import annotations

# The calls modelled by default (the command line's --d, --ns, --losses, --dtypes).
D_DEFAULT = 128
NS = (4096, 16384, 65536)
LOSSES = ("supcon", "ntxent", "tcl", "sincere")
DTYPES = ("bf16", "fp32")
TCL_K1 = 5000.0  # tcl_loss's default k1 (functional.py): HAS_K1 on


# (kernel kind, MODE, k1) of the symmetric launches of one forward + backward, in order
# (fused_launch.fused_fwd / fused_bwd; the sym_launch.sym_* launchers launch the same kernels).
LOSS_KERNELS = {
    "supcon": (("fwd", 0, 0.0), ("bwd", 0, 0.0)),
    "ntxent": (("fwd", 0, 0.0), ("bwd", 0, 0.0)),
    "tcl": (("fwd", 0, TCL_K1), ("bwd", 0, TCL_K1)),
    "sincere": (("fwd", 0, 0.0), ("fwd", 1, 0.0), ("bwd", 1, 0.0), ("bwd", 0, 0.0)),
}


def schedule(nb: int, chunk: int) -> list[list[int]]:
    """Programs of a symmetric launch over ``nb`` row blocks in launch order (x fastest), as
    runs [tiles, programs]: program (I, c) takes the distances [c·chunk, (c+1)·chunk) ∩
    [0, NB // 2], less NB / 2 for I >= NB / 2 of an even NB (sym.py ``_partners``; the one-tile
    schedule of a986ea9 is chunk 1, its skipped duplicate a 0-tile program)."""
    half = nb // 2
    even = int(2 * half == nb)
    runs: list[list[int]] = []
    for c in range(-(-(half + 1) // chunk)):
        t0 = c * chunk
        for tiles, k in (
            (min(t0 + chunk, half + 1) - t0, half),
            (min(t0 + chunk, half + 1 - even) - t0, nb - half),
        ):
            tiles = max(tiles, 0)
            if k and runs and runs[-1][0] == tiles:
                runs[-1][1] += k
            elif k:
                runs.append([tiles, k])
    return runs


def launched(loss: str, dtype: str, arch: int, n: int, d: int) -> list[dict]:
    """The symmetric launches of one fwd+bwd of ``loss``: kernel_report Spec, grid and the
    programs' tiles, from the importable ``flashcon.triton_kernels.config`` (the tiles and their
    policy)."""
    import torch

    from flashcon.tools import kernel_report as KR
    from flashcon.triton_kernels import sym as S

    # The tiles and their policy: ``config``, or in a tree from before the launchers were split
    # by trade (a986ea9) its one ``launch`` module. That one is looked for first: under an
    # editable install a module the modelled tree lacks resolves to this checkout's.
    try:
        from flashcon.triton_kernels import launch as C
    except ImportError:
        from flashcon.triton_kernels import config as C

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = []
    for kind, mode, k1 in LOSS_KERNELS[loss]:
        name = f"_sym_{kind}_kernel"
        if hasattr(C, "sym_tiles"):
            cfg, resident = C.sym_tiles(f"sym_{kind}", arch, tdtype, d, False)
        else:  # a986ea9: streamed tiles, one per program
            cfg, resident = C.pick_config(f"sym_{kind}", arch, tdtype, d), None
        fl = {"MODE": mode, **C.flags("sym", cfg, d, 0, k1, False, False)}
        if resident is not None:
            fl["RESIDENT"] = resident
        nb = -(-n // cfg.block_m)
        chunk = 1
        if hasattr(C, "sym_chunk") and (kind == "fwd" or resident):
            chunk = int(C.sym_chunk(nb))
        if chunk == 1 and "CHUNK" in getattr(S, name).arg_names:
            fl["CHUNK"] = 1  # Triton makes an integer argument equal to 1 a constant
        c = (cfg.block_m, cfg.block_n, cfg.block_d, cfg.block_do, cfg.num_warps, cfg.num_stages)
        spec = KR.Spec(name, arch, dtype, C.dot_precision(tdtype), "call", tuple(fl.items()), c)
        runs = schedule(nb, chunk)
        out.append(
            {
                "spec": spec,
                "grid": [nb, -(-(nb // 2 + 1) // chunk)],
                "chunk": chunk,
                "programs": runs,
            }
        )
    return out
