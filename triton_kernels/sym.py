"""Triton kernels of the symmetric 'all'-mode path: each unordered tile pair computed once.

In 'all' mode the anchors and the columns are one tensor z [N, D] (self column excluded), so
s_ij = s_ji. The blocks of BLOCK rows are paired on a circulant schedule: program (I, t)
takes blocks I and J = (I + t) mod NB for t = 0 … NB // 2 (with an even NB the pair at
distance NB / 2 is taken once, by I < NB / 2), so every unordered pair {I, J} is one program
and every program has one tile. On the tile S = Z_I·Z_Jᵀ:

- pairs (i, j) with i ∈ I, j ∈ J are visited once; a diagonal tile (t = 0) keeps its strict
  upper triangle j > i only, so no pair is visited twice and the own column never;
- the forward adds pair (i, j)'s terms to row i's sums (along the tile's rows) and pair
  (j, i)'s to row j's (along its columns): ``tl.atomic_add`` into fp32 sums;
- the backward forms H_ij = G_ij + G_ji from both rows' statistics and adds H·Z_J to dZ_I and
  Hᵀ·Z_I to dZ_J (``tl.atomic_add`` of fp32 [BLOCK, BLOCK_DO] chunks).

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

The plan vector (fp32, ``launch.sym_plan``): [A, R², c_pos, c_neg, 1/m_max].
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lse import _mma, _same, _sigmoid_softplus, _sim_tile


@triton.jit
def _tile_pair(NB, HALF):
    """(I, J, t, skip) of this program: block J = (I + t) mod NB; ``skip`` for the duplicate
    distance-NB/2 pair of an even NB."""
    bi = tl.program_id(0)
    t = tl.program_id(1)
    skip = (t == HALF) & (bi >= HALF) & (2 * HALF == NB)
    bj = bi + t
    bj = tl.where(bj >= NB, bj - NB, bj)
    return bi, bj, t, skip


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
def _pair_tile(
    bi, bj, t, z_ptr, lab_ptr, N, D, stride_z, pw_ptr, pw_ridx_ptr, pw_cidx_ptr, pw_cols,
    MULTILABEL: tl.constexpr, HAS_PW: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows of blocks I and J, their bounds, S = Z_I·Z_Jᵀ (fp32) and the pair weights; the
    forward and the backward build the same tile, so the backward's s is the forward's."""
    offs_i = bi * BLOCK + tl.arange(0, BLOCK)
    offs_j = bj * BLOCK + tl.arange(0, BLOCK)
    ok_i = offs_i < N
    ok_j = offs_j < N
    s = _sim_tile(
        z_ptr, z_ptr, offs_i, offs_j, ok_i, ok_j, stride_z, stride_z, D,
        BLOCK, BLOCK, BLOCK_D, EVEN_D, DOT_PREC,
    )  # fmt: skip
    m_ij, m_ji, valid = _sym_weights(
        offs_i, offs_j, ok_i, ok_j, t, lab_ptr, pw_ptr, pw_ridx_ptr, pw_cidx_ptr, pw_cols,
        MULTILABEL, HAS_PW,
    )  # fmt: skip
    return offs_i, offs_j, ok_i, ok_j, s, m_ij, m_ji, valid


@triton.jit
def _coef(m, valid, c_pos, c_neg):
    """Normalised weight of a pair's main term: c_pos·m on positives, c_neg on negatives."""
    return tl.where(m > 0, c_pos * m, tl.where(valid, c_neg, 0.0))


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
    MODE: tl.constexpr,
    HAS_K1: tl.constexpr,
    MULTILABEL: tl.constexpr,
    HAS_PW: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Adds the tile's terms to the sums out[c, i] (fp32 [4, N], zero-initialised).

    MODE_LSE: out = (Σ c·e, Σ (m/m_max)·f, psum, pcnt); MODE_SP: out = (sp, r)."""
    scale = tl.cast(scale, tl.float32)
    bi, bj, t, skip = _tile_pair(NB, HALF)
    if skip:
        return
    if tl.load(gate_ptr) == 0:
        return
    offs_i, offs_j, ok_i, ok_j, s, m_ij, m_ji, valid = _pair_tile(
        bi, bj, t, z_ptr, lab_ptr, N, D, stride_z, pw_ptr, pw_ridx_ptr, pw_cidx_ptr, pw_cols,
        MULTILABEL, HAS_PW, EVEN_D, DOT_PREC, BLOCK, BLOCK_D,
    )  # fmt: skip
    if MODE == 0:
        shift = tl.load(plan_ptr)
        c_pos = tl.load(plan_ptr + 2)
        c_neg = tl.load(plan_ptr + 3)
        # One exponential for both rows of the pair (<= 1 by the choice of the shift).
        e = tl.exp(scale * s - shift)
        row1 = tl.sum(_coef(m_ij, valid, c_pos, c_neg) * e, axis=1)
        col1 = tl.sum(_coef(m_ji, valid, c_pos, c_neg) * e, axis=0)
        tl.atomic_add(out_ptr + offs_i, row1, mask=ok_i, sem="relaxed")
        tl.atomic_add(out_ptr + offs_j, col1, mask=ok_j, sem="relaxed")
        if HAS_K1:
            r2 = tl.load(plan_ptr + 1)
            inv_mmax = tl.load(plan_ptr + 4)
            f = tl.exp(-s - r2) * inv_mmax
            tl.atomic_add(out_ptr + N + offs_i, tl.sum(m_ij * f, axis=1), mask=ok_i, sem="relaxed")
            tl.atomic_add(out_ptr + N + offs_j, tl.sum(m_ji * f, axis=0), mask=ok_j, sem="relaxed")
        out3 = out_ptr + 2 * N
        tl.atomic_add(out3 + offs_i, tl.sum(m_ij * s, axis=1), mask=ok_i, sem="relaxed")
        tl.atomic_add(out3 + offs_j, tl.sum(m_ji * s, axis=0), mask=ok_j, sem="relaxed")
        out4 = out_ptr + 3 * N
        tl.atomic_add(out4 + offs_i, tl.sum(m_ij, axis=1), mask=ok_i, sem="relaxed")
        tl.atomic_add(out4 + offs_j, tl.sum(m_ji, axis=0), mask=ok_j, sem="relaxed")
    else:
        eta_i = tl.load(eta_ptr + offs_i, mask=ok_i, other=0.0)
        eta_j = tl.load(eta_ptr + offs_j, mask=ok_j, other=0.0)
        # η = −inf (a row without negatives) gives σ = softplus = 0, no NaN.
        sig, spl = _sigmoid_softplus(eta_i[:, None] - scale * s)
        pos = m_ij > 0
        row_sp = tl.sum(tl.where(pos, m_ij * spl, 0.0), axis=1)
        row_r = tl.sum(tl.where(pos, m_ij * sig, 0.0), axis=1)
        tl.atomic_add(out_ptr + offs_i, row_sp, mask=ok_i, sem="relaxed")
        tl.atomic_add(out_ptr + N + offs_i, row_r, mask=ok_i, sem="relaxed")
        sig, spl = _sigmoid_softplus(eta_j[None, :] - scale * s)
        pos = m_ji > 0
        col_sp = tl.sum(tl.where(pos, m_ji * spl, 0.0), axis=0)
        col_r = tl.sum(tl.where(pos, m_ji * sig, 0.0), axis=0)
        tl.atomic_add(out_ptr + offs_j, col_sp, mask=ok_j, sem="relaxed")
        tl.atomic_add(out_ptr + N + offs_j, col_r, mask=ok_j, sem="relaxed")


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
    MODE: tl.constexpr,
    HAS_K1: tl.constexpr,
    MULTILABEL: tl.constexpr,
    HAS_PW: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """dZ_I += H·Z_J and dZ_J += Hᵀ·Z_I into fp32 dz (zero-initialised), H_ij = G_ij + G_ji.

    MODE_LSE: u = ρ (g_lse·scale·c_max·e^{A − lse}), v = κ (g_lse·k1·m_max·e^{R² − lse}),
    w = g_psum;  G_ij = ρ_i·c_ij·e_ij − κ_i·(m_ij/m_max)·f_ij + g_psum_i·m_ij.
    MODE_SP: u = g_sp, v = η;  G_ij = −scale·g_sp_i·m_ij·σ(η_i − scale·s_ij).
    """
    scale = tl.cast(scale, tl.float32)
    bi, bj, t, skip = _tile_pair(NB, HALF)
    if skip:
        return
    if tl.load(gate_ptr) == 0:
        return
    offs_i, offs_j, ok_i, ok_j, s, m_ij, m_ji, valid = _pair_tile(
        bi, bj, t, z_ptr, lab_ptr, N, D, stride_z, pw_ptr, pw_ridx_ptr, pw_cidx_ptr, pw_cols,
        MULTILABEL, HAS_PW, EVEN_D, DOT_PREC, BLOCK, BLOCK_D,
    )  # fmt: skip
    u_i = tl.load(u_ptr + offs_i, mask=ok_i, other=0.0)
    u_j = tl.load(u_ptr + offs_j, mask=ok_j, other=0.0)
    v_i = tl.load(v_ptr + offs_i, mask=ok_i, other=0.0)
    v_j = tl.load(v_ptr + offs_j, mask=ok_j, other=0.0)
    if MODE == 0:
        shift = tl.load(plan_ptr)
        c_pos = tl.load(plan_ptr + 2)
        c_neg = tl.load(plan_ptr + 3)
        w_i = tl.load(w_ptr + offs_i, mask=ok_i, other=0.0)
        w_j = tl.load(w_ptr + offs_j, mask=ok_j, other=0.0)
        # Every factor beside ρ and κ is <= 1 (e, the normalised weights, f·m), and the
        # launcher bounds |ρ|, |κ| by a quarter of fp32's range: nothing here overflows.
        e = tl.exp(scale * s - shift)
        h = u_i[:, None] * (_coef(m_ij, valid, c_pos, c_neg) * e)
        h += u_j[None, :] * (_coef(m_ji, valid, c_pos, c_neg) * e)
        if HAS_K1:
            r2 = tl.load(plan_ptr + 1)
            inv_mmax = tl.load(plan_ptr + 4)
            f = tl.exp(-s - r2) * inv_mmax
            h -= v_i[:, None] * (m_ij * f)
            h -= v_j[None, :] * (m_ji * f)
        h += w_i[:, None] * m_ij + w_j[None, :] * m_ji
    else:
        sig, _ = _sigmoid_softplus(v_i[:, None] - scale * s)
        h = tl.where(m_ij > 0, u_i[:, None] * m_ij * sig, 0.0)
        sig, _ = _sigmoid_softplus(v_j[None, :] - scale * s)
        h += tl.where(m_ji > 0, u_j[None, :] * m_ji * sig, 0.0)
        h = -scale * h
    hz = h.to(z_ptr.dtype.element_ty)
    ht = tl.trans(hz)
    rows_i = offs_i.to(tl.int64)[:, None]
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
