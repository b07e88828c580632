"""Triton kernels of the symmetric 'all'-mode path: each unordered tile pair computed once.

In 'all' mode the anchors and the columns are one tensor z [N, D] (self column excluded), so
s_ij = s_ji. The blocks of BLOCK rows are paired on a circulant schedule: block I meets
J = (I + t) mod NB for t = 0 … NB // 2 (with an even NB the pair at distance NB / 2 is taken
once, by I < NB / 2), so every unordered pair {I, J} is one tile. Program (I, c) takes the
run t ∈ [c·CHUNK, (c + 1)·CHUNK) ∩ [0, NB // 2] of block I's partners, less the distance
NB / 2 for I >= NB / 2 (``_partners``). The launcher picks CHUNK <= 16, fewer while the grid
would have under 1024 programs (``config.sym_chunk``), and 1 for the streamed backward. On
the tile S = Z_I·Z_Jᵀ:

- pairs (i, j) with i ∈ I, j ∈ J are visited once; a diagonal tile (t = 0) keeps its strict
  upper triangle j > i only, so no pair is visited twice and the own column never;
- the forward adds pair (i, j)'s terms to row i's sums (along the tile's rows: kept in
  registers over the run, one ``tl.atomic_add`` at its end) and pair (j, i)'s to row j's
  (along its columns: ``tl.atomic_add`` per tile) into fp32 sums;
- the backward forms H_ij = G_ij + G_ji from both rows' statistics and adds H·Z_J to dZ_I and
  Hᵀ·Z_I to dZ_J.

Resident variant (``RESIDENT``, 16-bit inputs with D <= 128, ``config.sym_tiles``): Z_I is
loaded once per program, each Z_J once per tile and used for both S and H·Z_J, and dZ_I stays
in fp32 registers over the run: one [BLOCK, D] atomic add per tile (the partner's Hᵀ·Z_I) and
one per program. The streamed variant (fp32, larger D, the backward with a mask) loads both
blocks in BLOCK_D chunks for S; its backward takes one tile per program and reloads both
blocks per BLOCK_DO output chunk, with two atomic adds per chunk.

That is 4·N²·D flops for forward + backward against the general kernels' 10·N²·D.

Combining and determinism: the sums and dZ receive their contributions from up to NB
programs through fp32 atomic adds, in an order the hardware picks: results agree with the
general path to rounding but are **not bitwise reproducible** run to run. With
``torch.use_deterministic_algorithms(True)`` the launchers use the general kernels, which are.

Static shift (MODE_LSE). Every term of row i's sum is shifted by the same A = scale·R²,
R² = max_i ‖z_i‖² (so scale·s_ij − A <= 0), so ONE exponential e_ij = e^{scale·s_ij − A} serves
row i and row j; TCL's k1 terms use f_ij = e^{−s_ij − R²}. Weights are normalised by their
largest value (c_pos = w_pos/c_max, c_neg = w_neg/c_max, 1/m_max). The launcher checks on the
device that no term can fall below e^{−80} (fp32's exponential flushes to 0 below e^{−87.3});
where one could (tiny temperatures, large norms, widely spread mask weights) the int32 gate is
0, these kernels return at once and the general kernels, compiled with ``GATED``, run instead
(the backward's gate also requires the row constants ρ, κ within a quarter of fp32's range).
The decision never reaches the host: no synchronisation, and nothing for torch.compile to
guard on. The softplus pass (MODE_SP, SINCERE) has no shift: its per-pair functions depend on
η_i, so a pair costs two σ/softplus evaluations and shares only the product.

The plan vector (fp32, ``sym_launch.sym_plan``): [A, R², c_pos, c_neg, 1/m_max].
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lse import _mma, _same, _sigmoid_softplus, _sim_tile

# e^x = 2^{x·log2 e}: the GPU's exponential is a base-2 instruction after a multiply by log2 e;
# folding log2 e into the scale and the shifts (once per program) saves that multiply per pair.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _partners(NB, HALF, CHUNK):
    """(I, t0, t1) of this program: block I and its partners J = (I + t) mod NB for
    t0 <= t < t1, a run of at most CHUNK of the distances 0 … NB // 2 (for an even NB the
    distance NB / 2 belongs to I < NB / 2 only, so no unordered pair is taken twice)."""
    bi = tl.program_id(0)
    t0 = tl.program_id(1) * CHUNK
    dup = ((bi >= HALF) & (2 * HALF == NB)).to(tl.int32)
    t1 = tl.minimum(t0 + CHUNK, HALF + 1 - dup)
    return bi, t0, t1


@triton.jit
def _block(b, N, BLOCK: tl.constexpr):
    offs = b * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def _load_block(z_ptr, b, ok, stride_z, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr):  # fmt: skip
    """Rows of block ``b`` whole (D <= BLOCK_D): [BLOCK, BLOCK_D], zero outside z."""
    d = tl.arange(0, BLOCK_D)
    # A scalar int64 base (row·stride passes 2^31 once N·D does), int32 offsets in the tile.
    base = z_ptr + (b * BLOCK).to(tl.int64) * stride_z
    ptrs = base + tl.arange(0, BLOCK)[:, None] * stride_z + d[None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    return tl.load(ptrs, mask=ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _sym_weights(
    offs_i, offs_j, ok_i, ok_j, t, lab_ptr, pw_ptr, pw_ridx_ptr, pw_cidx_ptr, pw_cols,
    MULTILABEL: tl.constexpr, HAS_PW: tl.constexpr,
):  # fmt: skip
    """(m_ij, m_ji, valid) of a tile: fp32 positive weights of the pairs (i, j) and (j, i)
    (0 on negatives and outside ``valid``); ``valid`` is the pairs the tile owns."""
    valid = ok_i[:, None] & ok_j[None, :]
    valid = valid & ((t > 0) | (offs_j[None, :] > offs_i[:, None]))
    if HAS_PW:
        # SupContrast's mask may be asymmetric: m_ij = pw[i mod Bq, j mod Bk] and
        # m_ji = pw[j mod Bq, i mod Bk] are two reads.
        ri = tl.load(pw_ridx_ptr + offs_i, mask=ok_i, other=0)
        ci = tl.load(pw_cidx_ptr + offs_i, mask=ok_i, other=0)
        rj = tl.load(pw_ridx_ptr + offs_j, mask=ok_j, other=0)
        cj = tl.load(pw_cidx_ptr + offs_j, mask=ok_j, other=0)
        m_ij = tl.load(pw_ptr + (ri[:, None] * pw_cols + cj[None, :]), mask=valid, other=0.0)
        m_ji = tl.load(pw_ptr + (rj[None, :] * pw_cols + ci[:, None]), mask=valid, other=0.0)
        m_ij = tl.where(m_ij > 0, m_ij, 0.0)
        m_ji = tl.where(m_ji > 0, m_ji, 0.0)
    else:
        li = tl.load(lab_ptr + offs_i, mask=ok_i, other=0)
        lj = tl.load(lab_ptr + offs_j, mask=ok_j, other=0)
        m_ij = (valid & _same(li[:, None], lj[None, :], MULTILABEL)).to(tl.float32)
        m_ji = m_ij
    return m_ij, m_ji, valid


@triton.jit
def _coef(m, valid, c_pos, c_neg):
    """Normalised weight of a pair's main term: c_pos·m on positives, c_neg on negatives."""
    return tl.where(m > 0, c_pos * m, tl.where(valid, c_neg, 0.0))


@triton.jit
def _pair_sim(
    z_ptr, zi, bj, offs_i, offs_j, ok_i, ok_j, D, stride_z,
    RESIDENT: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(S = Z_I·Z_Jᵀ in fp32, Z_J): with ``RESIDENT`` Z_I is the program's resident block and
    Z_J is loaded whole, once (the backward reuses it); else both are streamed over D in
    BLOCK_D chunks and Z_J is not returned (``zi`` comes back in its place)."""
    if RESIDENT:
        zj = _load_block(z_ptr, bj, ok_j, stride_z, D, BLOCK, BLOCK_D, EVEN_D)
        s = _mma(zi, tl.trans(zj), tl.zeros([BLOCK, BLOCK], dtype=tl.float32), DOT_PREC)
        return s, zj
    s = _sim_tile(
        z_ptr, z_ptr, offs_i, offs_j, ok_i, ok_j, stride_z, stride_z, D,
        BLOCK, BLOCK, BLOCK_D, EVEN_D, DOT_PREC,
    )  # fmt: skip
    return s, zi


@triton.jit
def _pair_tile(
    z_ptr, zi, bj, t, offs_i, offs_j, ok_i, ok_j, D, stride_z, lab_ptr, pw_ptr, pw_ridx_ptr,
    pw_cidx_ptr, pw_cols, MULTILABEL: tl.constexpr, HAS_PW: tl.constexpr,
    RESIDENT: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(S, Z_J (see _pair_sim), m_ij, m_ji, valid) of block I's tile with block J: the forward
    and the backward build the same tile, so the backward's s is the forward's."""
    s, zj = _pair_sim(
        z_ptr, zi, bj, offs_i, offs_j, ok_i, ok_j, D, stride_z, RESIDENT, EVEN_D, DOT_PREC,
        BLOCK, BLOCK_D,
    )  # fmt: skip
    m_ij, m_ji, valid = _sym_weights(
        offs_i, offs_j, ok_i, ok_j, t, lab_ptr, pw_ptr, pw_ridx_ptr, pw_cidx_ptr, pw_cols,
        MULTILABEL, HAS_PW,
    )  # fmt: skip
    return s, zj, m_ij, m_ji, valid


@triton.jit
def _plan_base2(plan_ptr, scale):
    """(scale2, shift2, c_pos, c_neg, r2l, 1/m_max) of the plan vector, the exponents in base 2
    (LOG2E): e = 2^{scale2·s − shift2} = e^{scale·s − A}, f = 2^{−(s·log2 e + r2l)} = e^{−s − R²}."""
    scale2 = scale * LOG2E
    shift2 = tl.load(plan_ptr) * LOG2E
    c_pos = tl.load(plan_ptr + 2)
    c_neg = tl.load(plan_ptr + 3)
    r2l = tl.load(plan_ptr + 1) * LOG2E
    inv_mmax = tl.load(plan_ptr + 4)
    return scale2, shift2, c_pos, c_neg, r2l, inv_mmax


@triton.jit
def _sym_fwd_kernel(
    z_ptr,
    lab_ptr,
    eta_ptr,
    plan_ptr,
    gate_ptr,
    out_ptr,
    N,
    D,
    stride_z,
    scale,
    pw_ptr,
    pw_ridx_ptr,
    pw_cidx_ptr,
    pw_cols,
    NB,
    HALF,
    CHUNK,
    MODE: tl.constexpr,
    HAS_K1: tl.constexpr,
    MULTILABEL: tl.constexpr,
    HAS_PW: tl.constexpr,
    EVEN_D: tl.constexpr,
    RESIDENT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Adds the terms of block I's tiles with its partners to the sums out[c, i] (fp32 [4, N],
    zero-initialised): block I's share accumulates in registers over the partners and is
    added once; each partner's share is added per tile.

    MODE_LSE: out = (Σ c·e, Σ (m/m_max)·f, psum, pcnt); MODE_SP: out = (sp, r)."""
    scale = tl.cast(scale, tl.float32)
    if tl.load(gate_ptr) == 0:
        return
    bi, t0, t1 = _partners(NB, HALF, CHUNK)
    if t1 <= t0:
        return
    offs_i, ok_i = _block(bi, N, BLOCK)
    if RESIDENT:
        zi = _load_block(z_ptr, bi, ok_i, stride_z, D, BLOCK, BLOCK_D, EVEN_D)
    else:
        zi = 0
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK], dtype=tl.float32)
    acc4 = tl.zeros([BLOCK], dtype=tl.float32)
    if MODE == 0:
        scale2, shift2, c_pos, c_neg, r2l, inv_mmax = _plan_base2(plan_ptr, scale)
        eta_i = acc1
    else:
        eta_i = tl.load(eta_ptr + offs_i, mask=ok_i, other=0.0)
    for t in range(t0, t1):
        bj, offs_j, ok_j = _partner(bi, t, N, NB, BLOCK)
        s, _, m_ij, m_ji, valid = _pair_tile(
            z_ptr, zi, bj, t, offs_i, offs_j, ok_i, ok_j, D, stride_z, lab_ptr, pw_ptr,
            pw_ridx_ptr, pw_cidx_ptr, pw_cols, MULTILABEL, HAS_PW, RESIDENT, EVEN_D, DOT_PREC,
            BLOCK, BLOCK_D,
        )  # fmt: skip
        if MODE == 0:
            # One exponential for both rows of the pair (<= 1 by the choice of the shift).
            e = tl.exp2(scale2 * s - shift2)
            acc1 += tl.sum(_coef(m_ij, valid, c_pos, c_neg) * e, axis=1)
            col = tl.sum(_coef(m_ji, valid, c_pos, c_neg) * e, axis=0)
            tl.atomic_add(out_ptr + offs_j, col, mask=ok_j, sem="relaxed")
            if HAS_K1:
                f = tl.exp2(-(s * LOG2E + r2l)) * inv_mmax
                acc2 += tl.sum(m_ij * f, axis=1)
                col = tl.sum(m_ji * f, axis=0)
                tl.atomic_add(out_ptr + N + offs_j, col, mask=ok_j, sem="relaxed")
            acc3 += tl.sum(m_ij * s, axis=1)
            tl.atomic_add(out_ptr + 2 * N + offs_j, tl.sum(m_ji * s, axis=0), mask=ok_j,
                          sem="relaxed")  # fmt: skip
            acc4 += tl.sum(m_ij, axis=1)
            tl.atomic_add(out_ptr + 3 * N + offs_j, tl.sum(m_ji, axis=0), mask=ok_j,
                          sem="relaxed")  # fmt: skip
        else:
            eta_j = tl.load(eta_ptr + offs_j, mask=ok_j, other=0.0)
            # η = −inf (a row without negatives) gives σ = softplus = 0, no NaN.
            sig, spl = _sigmoid_softplus(eta_i[:, None] - scale * s)
            pos = m_ij > 0
            acc1 += tl.sum(tl.where(pos, m_ij * spl, 0.0), axis=1)
            acc2 += tl.sum(tl.where(pos, m_ij * sig, 0.0), axis=1)
            sig, spl = _sigmoid_softplus(eta_j[None, :] - scale * s)
            pos = m_ji > 0
            col_sp = tl.sum(tl.where(pos, m_ji * spl, 0.0), axis=0)
            col_r = tl.sum(tl.where(pos, m_ji * sig, 0.0), axis=0)
            tl.atomic_add(out_ptr + offs_j, col_sp, mask=ok_j, sem="relaxed")
            tl.atomic_add(out_ptr + N + offs_j, col_r, mask=ok_j, sem="relaxed")
    tl.atomic_add(out_ptr + offs_i, acc1, mask=ok_i, sem="relaxed")
    if MODE == 0:
        if HAS_K1:
            tl.atomic_add(out_ptr + N + offs_i, acc2, mask=ok_i, sem="relaxed")
        tl.atomic_add(out_ptr + 2 * N + offs_i, acc3, mask=ok_i, sem="relaxed")
        tl.atomic_add(out_ptr + 3 * N + offs_i, acc4, mask=ok_i, sem="relaxed")
    else:
        tl.atomic_add(out_ptr + N + offs_i, acc2, mask=ok_i, sem="relaxed")


@triton.jit
def _partner(bi, t, N, NB, BLOCK: tl.constexpr):
    """(J, its rows, their bounds) of block I's partner at distance t."""
    bj = bi + t
    bj = tl.where(bj >= NB, bj - NB, bj)
    offs_j, ok_j = _block(bj, N, BLOCK)
    return bj, offs_j, ok_j


@triton.jit
def _bwd_tile(
    z_ptr, zi, bj, t, offs_i, ok_i, offs_j, ok_j, u_i, v_i, w_i, lab_ptr, u_ptr, v_ptr,
    w_ptr, D, stride_z, scale, scale2, shift2, c_pos, c_neg, r2l, inv_mmax, pw_ptr,
    pw_ridx_ptr, pw_cidx_ptr, pw_cols, MODE: tl.constexpr, HAS_K1: tl.constexpr,
    MULTILABEL: tl.constexpr, HAS_PW: tl.constexpr, EVEN_D: tl.constexpr,
    RESIDENT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(H in the input dtype, Z_J (see _pair_sim)) of block I's tile with its partner J.

    The rows of J come in, not out: torch's launch analysis (torch.compile) traces a stored
    address back through a called function's result to every argument of the call, so an
    address built from this function's results would mark u, v and w as written."""
    s, zj, m_ij, m_ji, valid = _pair_tile(
        z_ptr, zi, bj, t, offs_i, offs_j, ok_i, ok_j, D, stride_z, lab_ptr, pw_ptr,
        pw_ridx_ptr, pw_cidx_ptr, pw_cols, MULTILABEL, HAS_PW, RESIDENT, EVEN_D, DOT_PREC,
        BLOCK, BLOCK_D,
    )  # fmt: skip
    u_j = tl.load(u_ptr + offs_j, mask=ok_j, other=0.0)
    v_j = tl.load(v_ptr + offs_j, mask=ok_j, other=0.0)
    if MODE == 0:
        w_j = tl.load(w_ptr + offs_j, mask=ok_j, other=0.0)
        # Every factor beside ρ and κ is <= 1 (e, the normalised weights, f·m), and the
        # launcher bounds |ρ|, |κ| by a quarter of fp32's range: nothing here overflows.
        e = tl.exp2(scale2 * s - shift2)
        h = u_i[:, None] * (_coef(m_ij, valid, c_pos, c_neg) * e)
        h += u_j[None, :] * (_coef(m_ji, valid, c_pos, c_neg) * e)
        if HAS_K1:
            f = tl.exp2(-(s * LOG2E + r2l)) * inv_mmax
            h -= v_i[:, None] * (m_ij * f)
            h -= v_j[None, :] * (m_ji * f)
        h += w_i[:, None] * m_ij + w_j[None, :] * m_ji
    else:
        sig, _ = _sigmoid_softplus(v_i[:, None] - scale * s)
        h = tl.where(m_ij > 0, u_i[:, None] * m_ij * sig, 0.0)
        sig, _ = _sigmoid_softplus(v_j[None, :] - scale * s)
        h += tl.where(m_ji > 0, u_j[None, :] * m_ji * sig, 0.0)
        h = -scale * h
    return h.to(z_ptr.dtype.element_ty), zj


@triton.jit
def _sym_bwd_kernel(
    z_ptr,
    lab_ptr,
    u_ptr,
    v_ptr,
    w_ptr,
    plan_ptr,
    gate_ptr,
    dz_ptr,
    N,
    D,
    stride_z,
    stride_dz,
    scale,
    pw_ptr,
    pw_ridx_ptr,
    pw_cidx_ptr,
    pw_cols,
    NB,
    HALF,
    CHUNK,
    MODE: tl.constexpr,
    HAS_K1: tl.constexpr,
    MULTILABEL: tl.constexpr,
    HAS_PW: tl.constexpr,
    EVEN_D: tl.constexpr,
    RESIDENT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """dZ_I += H·Z_J and dZ_J += Hᵀ·Z_I into fp32 dz (zero-initialised), H_ij = G_ij + G_ji.

    With ``RESIDENT`` (D <= BLOCK_D, one chunk) the program takes its run of partners J with
    Z_I and block I's dZ in registers: per tile one load (Z_J, shared by S and H·Z_J) and one
    atomic add (the partner's Hᵀ·Z_I); block I's dZ is added once at the end. Without it
    (fp32, D above the resident limit, a mask, an explicit config, the 'tiles' schedule) the
    program computes the first tile of its run only, so the launcher's CHUNK must be 1: both
    blocks are streamed over D for S and again per BLOCK_DO output chunk, two atomic adds.

    MODE_LSE: u = ρ (g_lse·scale·c_max·e^{A − lse}), v = κ (g_lse·k1·m_max·e^{R² − lse}),
    w = g_psum;  G_ij = ρ_i·c_ij·e_ij − κ_i·(m_ij/m_max)·f_ij + g_psum_i·m_ij.
    MODE_SP: u = g_sp, v = η;  G_ij = −scale·g_sp_i·m_ij·σ(η_i − scale·s_ij).
    """
    scale = tl.cast(scale, tl.float32)
    if tl.load(gate_ptr) == 0:
        return
    bi, t0, t1 = _partners(NB, HALF, CHUNK)
    if t1 <= t0:
        return
    offs_i, ok_i = _block(bi, N, BLOCK)
    u_i = tl.load(u_ptr + offs_i, mask=ok_i, other=0.0)
    v_i = tl.load(v_ptr + offs_i, mask=ok_i, other=0.0)
    rows_i = offs_i.to(tl.int64)[:, None]
    if MODE == 0:
        scale2, shift2, c_pos, c_neg, r2l, inv_mmax = _plan_base2(plan_ptr, scale)
        w_i = tl.load(w_ptr + offs_i, mask=ok_i, other=0.0)
    else:
        scale2, shift2, c_pos, c_neg, r2l, inv_mmax = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        w_i = u_i
    if RESIDENT:
        zi = _load_block(z_ptr, bi, ok_i, stride_z, D, BLOCK, BLOCK_D, EVEN_D)
        d = tl.arange(0, BLOCK_D)
        dzi = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        for t in range(t0, t1):
            bj, offs_j, ok_j = _partner(bi, t, N, NB, BLOCK)
            hz, zj = _bwd_tile(
                z_ptr, zi, bj, t, offs_i, ok_i, offs_j, ok_j, u_i, v_i, w_i, lab_ptr, u_ptr,
                v_ptr, w_ptr, D, stride_z, scale, scale2, shift2, c_pos, c_neg, r2l, inv_mmax,
                pw_ptr, pw_ridx_ptr, pw_cidx_ptr, pw_cols,
                MODE, HAS_K1, MULTILABEL, HAS_PW, EVEN_D, RESIDENT, DOT_PREC, BLOCK, BLOCK_D,
            )  # fmt: skip
            dzi = _mma(hz, zj, dzi, DOT_PREC)
            dzj = _mma(tl.trans(hz), zi, tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32), DOT_PREC)
            in_j = ok_j[:, None] if EVEN_D else ok_j[:, None] & (d[None, :] < D)
            rows_j = offs_j.to(tl.int64)[:, None]
            tl.atomic_add(dz_ptr + rows_j * stride_dz + d[None, :], dzj, mask=in_j, sem="relaxed")
        in_i = ok_i[:, None] if EVEN_D else ok_i[:, None] & (d[None, :] < D)
        tl.atomic_add(dz_ptr + rows_i * stride_dz + d[None, :], dzi, mask=in_i, sem="relaxed")
    else:
        bj, offs_j, ok_j = _partner(bi, t0, N, NB, BLOCK)
        hz, _ = _bwd_tile(
            z_ptr, 0, bj, t0, offs_i, ok_i, offs_j, ok_j, u_i, v_i, w_i, lab_ptr, u_ptr, v_ptr,
            w_ptr, D, stride_z, scale, scale2, shift2, c_pos, c_neg, r2l, inv_mmax, pw_ptr,
            pw_ridx_ptr, pw_cidx_ptr, pw_cols,
            MODE, HAS_K1, MULTILABEL, HAS_PW, EVEN_D, RESIDENT, DOT_PREC, BLOCK, BLOCK_D,
        )  # fmt: skip
        ht = tl.trans(hz)
        rows_j = offs_j.to(tl.int64)[:, None]
        for c0 in range(0, D, BLOCK_DO):
            offs_do = c0 + tl.arange(0, BLOCK_DO)
            if EVEN_D:
                in_i = ok_i[:, None]
                in_j = ok_j[:, None]
            else:
                in_i = ok_i[:, None] & (offs_do[None, :] < D)
                in_j = ok_j[:, None] & (offs_do[None, :] < D)
            zi = tl.load(z_ptr + rows_i * stride_z + offs_do[None, :], mask=in_i, other=0.0)
            zj = tl.load(z_ptr + rows_j * stride_z + offs_do[None, :], mask=in_j, other=0.0)
            acc = tl.zeros([BLOCK, BLOCK_DO], dtype=tl.float32)
            tl.atomic_add(
                dz_ptr + rows_i * stride_dz + offs_do[None, :], _mma(hz, zj, acc, DOT_PREC),
                mask=in_i, sem="relaxed",
            )  # fmt: skip
            tl.atomic_add(
                dz_ptr + rows_j * stride_dz + offs_do[None, :], _mma(ht, zi, acc, DOT_PREC),
                mask=in_j, sem="relaxed",
            )  # fmt: skip
