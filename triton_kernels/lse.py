"""Triton kernels of the streaming engine: masked log-sum-exp, SINCERE's softplus pass, backward.

The four functions of the engine contract (``flashcon.engine``; executable statement in
``flashcon.backends.torch_stream``) over anchors ``q [N, D]`` and columns ``k [M, D]``:

- ``lse_fwd``: lse_i = log(Σ_{P(i)} [w_pos e^{scale·s_ij} + k1 e^{−s_ij}] + Σ_{N(i)} w_neg e^{scale·s_ij}),
  psum_i = Σ_{P(i)} s_ij, pcnt_i = |P(i)|  (docs/losses.md §0, §4.2 for the k1 stream);
- ``sp_fwd``: sp_i = Σ_{P(i)} softplus(η_i − scale·s_ij), r_i = Σ_{P(i)} σ(η_i − scale·s_ij)
  (SINCERE's second pass, docs/losses.md §2);
- ``lse_bwd`` / ``sp_bwd``: G_ij as in the contract, dq = G·k, dk = Gᵀ·q.

Tiling
------
Forward (``_lse_fwd_kernel``, ``_sp_fwd_kernel``): one program per BLOCK_M anchor rows streams
over BLOCK_N column tiles. Each similarity tile s = q_blk·k_tileᵀ is accumulated in fp32 over D
in BLOCK_D chunks (``_sim_tile``), so D is unbounded and no [BLOCK_M, D] register tile exists.
The lse is an online log-sum-exp: a running max m_i and a sum l_i rescaled by e^{m_old − m_new}
whenever the max grows; every exponent, including TCL's k1 term log(k1) − s_ij, is shifted by
the same running max, so nothing is exponentiated unshifted (fp16/bf16 logits overflow e^x
above 11.09, docs/losses.md §6).

Weights enter as log-weights (log 0 = −inf): a zero weight then contributes exactly e^{−inf} = 0
and the rest of the row is unchanged. The weighted sum costs one exponential per pair whatever
the weights are, so the weights are runtime values; the flags that change the work per pair
are compile-time: ``HAS_K1`` (TCL's second exponential stream), ``HAS_SELF`` (the self-column
compare), ``MULTILABEL`` (bitmask labels: positive when they share a bit), ``HAS_PW`` (a
mask's weights), ``EVEN_D`` (no D-tail masks) and ``GATED`` (the fallback of the symmetric
path, ``sym.py``: the kernel returns at once unless the int32 at ``gate_ptr`` is 0). ``MODE``
selects the lse or softplus gradient in the backward kernels.

Saved for backward: only the O(N) row statistics (lse, or η and r); s is recomputed.

Backward (deterministic, no atomics): two kernels per op.
``_bwd_dq_kernel`` owns BLOCK_M anchor rows × BLOCK_DO output features and streams over column
tiles: recompute s, form G (fp32), dq_blk += G·k_tile[:, d-chunk]. ``_bwd_dk_kernel`` owns
BLOCK_N columns × BLOCK_DO features and streams over anchor-row tiles: it recomputes the same
[BLOCK_M, BLOCK_N] tile (same operand order as the forward, so bit-identical s and an lse
consistent with it) and accumulates dk_blk += Gᵀ·q_tile[:, d-chunk]. Every output element is written once by one program, in a fixed
summation order: results are bitwise reproducible. The price is recomputing s twice (and once
more per extra D-out chunk when D > BLOCK_DO), instead of atomically adding partial dk tiles.

Precision: tile products accumulate in fp32 (``tl.dot`` with an fp32 accumulator); statistics
are fp32; G is rounded to the input dtype for the tensor-core products G·k and Gᵀ·q (as the
flash-attention backward does with its probabilities). For fp32 inputs ``DOT_PREC`` is
"3xtf32" (three TF32 tensor-core products of split operands, ``_mma``), or "tf32" where
PyTorch's own fp32 matmul precision allows TF32 (see ``config.dot_precision``).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's CPU interpreter multiplies bfloat16 tiles wrongly in ``tl.dot`` (it computes on the
# raw 16-bit patterns); under the interpreter bf16 operands are widened to fp32 first, which
# gives the same result (bf16 products are exact in fp32, accumulation is fp32 either way).
# Read once at import, without touching any GPU; compiled kernels never take this path.
WIDEN_BF16: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# TF32 rounding of an fp32 bit pattern (``_mma``'s "3xtf32"): add half a unit of the 10th
# mantissa bit, clear the 13 bits below it (to nearest, ties away from zero).
TF32_HALF: tl.constexpr = tl.constexpr(0x1000)
TF32_MASK: tl.constexpr = tl.constexpr(0xFFFFE000)

# Mode of the backward kernels.
MODE_LSE = 0
MODE_SP = 1


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a·b with fp32 accumulation (see WIDEN_BF16).

    DOT_PREC "3xtf32" (fp32 inputs): each operand is split into TF32 halves, x = hi + lo with
    hi = tf32(x) and lo = tf32(x − hi) (x − hi is exact in fp32; tf32() rounds to 10 mantissa
    bits, to nearest, ties away from zero), and a_lo·b_hi + a_hi·b_lo + a_hi·b_hi runs as
    three TF32 tensor-core products into a fresh accumulator, the small terms first, which is
    then added to ``acc``. The products of TF32 values are exact in fp32; what is lost is
    a_lo·b_lo and lo's rounding, each at most 2^-22 of |a|·|b|. Tensor cores add with
    truncation: summing each call's products apart and adding them once, rounded, keeps that
    bias to the call's own few additions instead of every addition of a D loop (emulated at
    D = 1024, s ≈ 0.9: mean error −7e-6 into one running accumulator, −1e-7 this way).
    A NaN keeps its bits as hi (its rounding can carry into ±0: the NaN GPUs produce,
    0x7FFFFFFF, would become a silent 0); ±inf gives inf or NaN; a finite |x| within 2^-12
    of FLT_MAX rounds hi to inf and its products to NaN (such an x overflows any similarity).

    The split is written out, not left to ``tl.dot``'s own "tf32x3", so that Triton's
    interpreter (which computes every ``tl.dot`` in fp32, rounding to nearest) runs the same
    arithmetic; inline, not in a helper, because the interpreter pays about 0.3 ms per helper
    call, which four calls per product made a third of the fp32 tests' time."""
    if DOT_PREC == "3xtf32":
        a_hi = (a.to(tl.uint32, bitcast=True) + TF32_HALF) & TF32_MASK
        b_hi = (b.to(tl.uint32, bitcast=True) + TF32_HALF) & TF32_MASK
        a_hi = tl.where(a == a, a_hi.to(tl.float32, bitcast=True), a)
        b_hi = tl.where(b == b, b_hi.to(tl.float32, bitcast=True), b)
        a_lo = ((a - a_hi).to(tl.uint32, bitcast=True) + TF32_HALF) & TF32_MASK
        b_lo = ((b - b_hi).to(tl.uint32, bitcast=True) + TF32_HALF) & TF32_MASK
        a_lo = a_lo.to(tl.float32, bitcast=True)
        b_lo = b_lo.to(tl.float32, bitcast=True)
        part = tl.dot(a_lo, b_hi, tl.zeros_like(acc), input_precision="tf32")
        part = tl.dot(a_hi, b_lo, part, input_precision="tf32")
        part = tl.dot(a_hi, b_hi, part, input_precision="tf32")
        acc += part
    elif WIDEN_BF16 and a.dtype == tl.bfloat16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _sim_tile(
    a_ptr,
    b_ptr,
    offs_a,
    offs_b,
    mask_a,
    mask_b,
    stride_a,
    stride_b,
    D,
    BA: tl.constexpr,
    BB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """fp32 [BA, BB] = a[offs_a, :] · b[offs_b, :]ᵀ, streamed over D in BLOCK_D chunks.

    Rows outside the tensors load as 0 (their similarities are masked by the caller).
    """
    acc = tl.zeros([BA, BB], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    # A scalar int64 base per tile (row·stride passes 2^31 once N·D does) plus int32 offsets
    # inside the tile: half the registers of an int64 pointer per element.
    a0 = tl.min(offs_a, axis=0)
    b0 = tl.min(offs_b, axis=0)
    a_base = a_ptr + a0.to(tl.int64) * stride_a
    b_base = b_ptr + b0.to(tl.int64) * stride_b
    a_off = (offs_a - a0)[:, None] * stride_a
    b_off = (offs_b - b0)[:, None] * stride_b
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        if EVEN_D:
            a = tl.load(a_base + a_off + d[None, :], mask=mask_a[:, None], other=0.0)
            b = tl.load(b_base + b_off + d[None, :], mask=mask_b[:, None], other=0.0)
        else:
            d_ok = d[None, :] < D
            a = tl.load(a_base + a_off + d[None, :], mask=mask_a[:, None] & d_ok, other=0.0)
            b = tl.load(b_base + b_off + d[None, :], mask=mask_b[:, None] & d_ok, other=0.0)
        acc = _mma(a, tl.trans(b), acc, DOT_PREC)
    return acc


@triton.jit
def _same(a, b, MULTILABEL: tl.constexpr):
    """Positive-pair test of broadcast label tiles: equal class ids, or bitmasks that share a bit."""
    if MULTILABEL:
        return (a & b) != 0
    return a == b


@triton.jit
def _pos_weight(offs_m, offs_n, row_ok, col_ok, pw_ptr, pw_ridx_ptr, pw_cidx_ptr, pw_cols):
    """SupContrast's mask read per tile: m_ij = pos_weight[i mod Bq, j mod Bk] (fp32).

    The launcher passes i mod Bq and j mod Bk as int32 vectors (O(N + M)): an integer
    remainder by a runtime divisor in the tile loop costs a called subroutine (stack frame).
    """
    ri = tl.load(pw_ridx_ptr + offs_m, mask=row_ok, other=0)
    ci = tl.load(pw_cidx_ptr + offs_n, mask=col_ok, other=0)
    # int32 offsets (the launcher checks Bq·Bk < 2^31): an int64 offset per tile element
    # doubles the registers of the load.
    ptrs = pw_ptr + (ri[:, None] * pw_cols + ci[None, :])
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _pair_masks(rows, cols, row_ok, col_ok, same, self_offset, HAS_SELF: tl.constexpr):
    """(positive, negative) masks of a tile; ``rows``/``cols`` broadcast to the tile shape."""
    valid = row_ok & col_ok
    if HAS_SELF:
        valid = valid & (cols != rows + self_offset)
    return valid & same, valid & (same == 0)


@triton.jit
def _pair_weights(
    offs_m, offs_n, row_ok, col_ok, qlab, klab, self_offset, pw_ptr, pw_ridx_ptr, pw_cidx_ptr,
    pw_cols, HAS_SELF: tl.constexpr, MULTILABEL: tl.constexpr, HAS_PW: tl.constexpr,
):  # fmt: skip
    """(positive, negative, m_ij, log m_ij) of a tile, the same in the forward and both
    backward kernels: m_ij is 1 on label positives or the mask's weight; its log enters the
    exponents, m_ij itself psum, pcnt and the g_psum term."""
    same = _same(qlab[:, None], klab[None, :], MULTILABEL)
    if HAS_PW:
        w = _pos_weight(offs_m, offs_n, row_ok, col_ok, pw_ptr, pw_ridx_ptr, pw_cidx_ptr, pw_cols)
        same = w > 0
    pos, neg = _pair_masks(
        offs_m[:, None], offs_n[None, :], row_ok[:, None], col_ok[None, :], same, self_offset,
        HAS_SELF,
    )  # fmt: skip
    if HAS_PW:
        mw = tl.where(pos, w, 0.0)
        logm = tl.log(tl.where(pos, w, 1.0))
    else:
        mw = pos.to(tl.float32)
        logm = tl.zeros_like(mw)
    return pos, neg, mw, logm


@triton.jit
def _fp32(scale, log_w_pos, log_w_neg, log_k1):
    """The runtime scalars pinned to fp32: Inductor launches (torch.compile) pass them as fp64,
    and the loop-carried statistics must keep one type."""
    return (
        tl.cast(scale, tl.float32),
        tl.cast(log_w_pos, tl.float32),
        tl.cast(log_w_neg, tl.float32),
        tl.cast(log_k1, tl.float32),
    )


@triton.jit
def _sigmoid_softplus(x):
    """σ(x) and softplus(x) without overflow: both from z = e^{−|x|} ∈ (0, 1]."""
    z = tl.exp(-tl.abs(x))
    # Approximate (2-ulp) division: the IEEE-rounded one is a called subroutine on NVIDIA GPUs,
    # and its call saves registers to the stack (reported as spills).
    inv = tl.fdiv(tl.full(z.shape, 1.0, tl.float32), 1.0 + z, ieee_rounding=False)
    sig = tl.where(x >= 0, inv, z * inv)
    # log1p(z): log(1 + z) loses z's digits when z < ~1e-4; the series is exact there.
    log1p_z = tl.where(z < 1e-4, z * (1.0 - 0.5 * z), tl.log(1.0 + z))
    sp = tl.maximum(x, 0.0) + log1p_z
    return sig, sp


@triton.jit
def _lse_fwd_kernel(
    q_ptr,
    k_ptr,
    qlab_ptr,
    klab_ptr,
    lse_ptr,
    psum_ptr,
    pcnt_ptr,
    N,
    M,
    D,
    stride_qm,
    stride_km,
    self_offset,
    scale,
    log_w_pos,
    log_w_neg,
    log_k1,
    pw_ptr,
    pw_ridx_ptr,
    pw_cidx_ptr,
    pw_cols,
    gate_ptr,
    HAS_K1: tl.constexpr,
    HAS_SELF: tl.constexpr,
    MULTILABEL: tl.constexpr,
    HAS_PW: tl.constexpr,
    GATED: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    scale, log_w_pos, log_w_neg, log_k1 = _fp32(scale, log_w_pos, log_w_neg, log_k1)
    if GATED:
        if tl.load(gate_ptr) != 0:
            return  # the symmetric kernels did this work (sym.py)
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    qlab = tl.load(qlab_ptr + offs_m, mask=row_ok, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    psum = tl.zeros([BLOCK_M], dtype=tl.float32)
    pcnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        klab = tl.load(klab_ptr + offs_n, mask=col_ok, other=0)
        s = _sim_tile(
            q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, stride_qm, stride_km, D,
            BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PREC,
        )  # fmt: skip
        pos, neg, mw, logm = _pair_weights(
            offs_m, offs_n, row_ok, col_ok, qlab, klab, self_offset, pw_ptr, pw_ridx_ptr,
            pw_cidx_ptr, pw_cols, HAS_SELF, MULTILABEL, HAS_PW,
        )  # fmt: skip
        # Exponent of each term of the weighted sum; −inf where the pair has no term.
        t = tl.where(pos, scale * s + log_w_pos + logm, float("-inf"))
        t = tl.where(neg, scale * s + log_w_neg, t)
        m_new = tl.maximum(m_i, tl.max(t, axis=1))
        if HAS_K1:
            # TCL's k1·e^{−s} term (no temperature): exponent log(k1) − s, same running max.
            t1 = tl.where(pos, log_k1 + logm - s, float("-inf"))
            m_new = tl.maximum(m_new, tl.max(t1, axis=1))
        # A row with no term yet keeps m = −inf; shift by 0 there so that no −inf − (−inf)
        # (NaN) is formed: every e^{t − 0} with t = −inf is 0 and l stays 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(t - m_use[:, None]), axis=1)
        if HAS_K1:
            l_i += tl.sum(tl.exp(t1 - m_use[:, None]), axis=1)
        m_i = m_new
        psum += tl.sum(tl.where(pos, mw * s, 0.0), axis=1)
        pcnt += tl.sum(mw, axis=1)

    # l_i = 0 exactly when m_i = −inf (no term): lse = −inf, as the contract says (log is
    # taken of 1 there so that no log 0 is evaluated). A NaN term leaves l_i NaN: "!= 0"
    # keeps it (NaN in, NaN out), where "> 0" would have called it "no term".
    has = l_i != 0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + offs_m, lse, mask=row_ok)
    tl.store(psum_ptr + offs_m, psum, mask=row_ok)
    tl.store(pcnt_ptr + offs_m, pcnt, mask=row_ok)


@triton.jit
def _sp_fwd_kernel(
    q_ptr,
    k_ptr,
    qlab_ptr,
    klab_ptr,
    eta_ptr,
    sp_ptr,
    r_ptr,
    N,
    M,
    D,
    stride_qm,
    stride_km,
    self_offset,
    scale,
    HAS_SELF: tl.constexpr,
    MULTILABEL: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    qlab = tl.load(qlab_ptr + offs_m, mask=row_ok, other=0)
    eta = tl.load(eta_ptr + offs_m, mask=row_ok, other=0.0)

    sp = tl.zeros([BLOCK_M], dtype=tl.float32)
    r = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        klab = tl.load(klab_ptr + offs_n, mask=col_ok, other=0)
        s = _sim_tile(
            q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, stride_qm, stride_km, D,
            BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PREC,
        )  # fmt: skip
        same = _same(qlab[:, None], klab[None, :], MULTILABEL)
        pos, _ = _pair_masks(
            offs_m[:, None], offs_n[None, :], row_ok[:, None], col_ok[None, :], same,
            self_offset, HAS_SELF,
        )  # fmt: skip
        # η = −inf (no negatives) gives x = −inf: σ = 0 and softplus = 0, no NaN.
        x = eta[:, None] - scale * s
        sig, spl = _sigmoid_softplus(x)
        sp += tl.sum(tl.where(pos, spl, 0.0), axis=1)
        r += tl.sum(tl.where(pos, sig, 0.0), axis=1)

    tl.store(sp_ptr + offs_m, sp, mask=row_ok)
    tl.store(r_ptr + offs_m, r, mask=row_ok)


@triton.jit
def _grad_tile(
    s,
    pos,
    neg,
    g0,
    stat,
    g1,
    scale,
    log_w_pos,
    log_w_neg,
    log_k1,
    logm,
    mw,
    MODE: tl.constexpr,
    HAS_K1: tl.constexpr,
):
    """G tile (fp32) from a similarity tile and the anchors' statistics broadcast to it.

    MODE_LSE: g0 = g_lse, stat = lse (−inf replaced by 0), g1 = g_psum;
        G = g0·(scale·w·e^{scale·s − lse} − [P]·k1·e^{−s − lse}) + g1·[P].
    MODE_SP: g0 = g_sp, stat = η;  G = −g0·scale·σ(η − scale·s)·[P].
    """
    if MODE == 0:
        # Same exponents as the forward; absent terms are −inf and give exactly 0, and so
        # does every pair of a row whose lse is −inf (stat = 0 there, all terms −inf).
        t = tl.where(pos, scale * s + log_w_pos + logm, float("-inf"))
        t = tl.where(neg, scale * s + log_w_neg, t)
        g = scale * tl.exp(t - stat)
        if HAS_K1:
            g -= tl.exp(tl.where(pos, log_k1 + logm - s, float("-inf")) - stat)
        g = g0 * g + tl.where(pos, g1 * mw, 0.0)
    else:
        sig, _ = _sigmoid_softplus(stat - scale * s)
        g = tl.where(pos, -(g0 * scale) * sig, 0.0)
    return g


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    qlab_ptr,
    klab_ptr,
    g0_ptr,
    stat_ptr,
    g1_ptr,
    dq_ptr,
    N,
    M,
    D,
    stride_qm,
    stride_km,
    stride_dqm,
    self_offset,
    scale,
    log_w_pos,
    log_w_neg,
    log_k1,
    pw_ptr,
    pw_ridx_ptr,
    pw_cidx_ptr,
    pw_cols,
    gate_ptr,
    MODE: tl.constexpr,
    HAS_K1: tl.constexpr,
    HAS_SELF: tl.constexpr,
    MULTILABEL: tl.constexpr,
    HAS_PW: tl.constexpr,
    GATED: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """dq[rows, d-chunk] = Σ over column tiles of G_tile · k_tile[:, d-chunk]."""
    scale, log_w_pos, log_w_neg, log_k1 = _fp32(scale, log_w_pos, log_w_neg, log_k1)
    if GATED:
        if tl.load(gate_ptr) != 0:
            return
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    qlab = tl.load(qlab_ptr + offs_m, mask=row_ok, other=0)
    g0 = tl.load(g0_ptr + offs_m, mask=row_ok, other=0.0)
    stat = tl.load(stat_ptr + offs_m, mask=row_ok, other=0.0)
    g1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if MODE == 0:
        stat = tl.where(stat == float("-inf"), 0.0, stat)
        g1 = tl.load(g1_ptr + offs_m, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        klab = tl.load(klab_ptr + offs_n, mask=col_ok, other=0)
        s = _sim_tile(
            q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, stride_qm, stride_km, D,
            BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PREC,
        )  # fmt: skip
        pos, neg, mw, logm = _pair_weights(
            offs_m, offs_n, row_ok, col_ok, qlab, klab, self_offset, pw_ptr, pw_ridx_ptr,
            pw_cidx_ptr, pw_cols, HAS_SELF, MULTILABEL, HAS_PW,
        )  # fmt: skip
        g = _grad_tile(
            s, pos, neg, g0[:, None], stat[:, None], g1[:, None], scale, log_w_pos,
            log_w_neg, log_k1, logm, mw, MODE, HAS_K1,
        )  # fmt: skip
        k_ptrs = k_ptr + offs_n.to(tl.int64)[:, None] * stride_km + offs_do[None, :]
        if EVEN_D:
            kd = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            kd = tl.load(k_ptrs, mask=col_ok[:, None] & (offs_do[None, :] < D), other=0.0)
        acc = _mma(g.to(kd.dtype), kd, acc, DOT_PREC)

    dq_ptrs = dq_ptr + offs_m.to(tl.int64)[:, None] * stride_dqm + offs_do[None, :]
    out_ok = row_ok[:, None] & (offs_do[None, :] < D)
    tl.store(dq_ptrs, acc.to(dq_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _bwd_dk_kernel(
    q_ptr,
    k_ptr,
    qlab_ptr,
    klab_ptr,
    g0_ptr,
    stat_ptr,
    g1_ptr,
    dk_ptr,
    N,
    M,
    D,
    stride_qm,
    stride_km,
    stride_dkm,
    self_offset,
    scale,
    log_w_pos,
    log_w_neg,
    log_k1,
    pw_ptr,
    pw_ridx_ptr,
    pw_cidx_ptr,
    pw_cols,
    gate_ptr,
    MODE: tl.constexpr,
    HAS_K1: tl.constexpr,
    HAS_SELF: tl.constexpr,
    MULTILABEL: tl.constexpr,
    HAS_PW: tl.constexpr,
    GATED: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """dk[cols, d-chunk] = Σ over anchor-row tiles of Gᵀ_tile · q_tile[:, d-chunk].

    Here the program owns BLOCK_N columns and streams BLOCK_M anchor rows; each G tile is
    formed as [BLOCK_M, BLOCK_N] exactly as in the dq kernel and enters the product transposed.
    """
    scale, log_w_pos, log_w_neg, log_k1 = _fp32(scale, log_w_pos, log_w_neg, log_k1)
    if GATED:
        if tl.load(gate_ptr) != 0:
            return
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < M
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    klab = tl.load(klab_ptr + offs_n, mask=col_ok, other=0)

    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        qlab = tl.load(qlab_ptr + offs_m, mask=row_ok, other=0)
        g0 = tl.load(g0_ptr + offs_m, mask=row_ok, other=0.0)
        stat = tl.load(stat_ptr + offs_m, mask=row_ok, other=0.0)
        g1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        if MODE == 0:
            stat = tl.where(stat == float("-inf"), 0.0, stat)
            g1 = tl.load(g1_ptr + offs_m, mask=row_ok, other=0.0)
        # The tile is computed as in the forward and dq kernels, s = q_tile · k_blkᵀ with q as
        # the left operand, and transposed afterwards: the same operations in the same order
        # give the same s, so e^{scale·s − lse} is consistent with the forward's lse. (A
        # directly computed sᵀ = k·qᵀ may differ in the last bit, which scale·|s| amplifies
        # into the gradient for large-norm features.)
        s = _sim_tile(
            q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, stride_qm, stride_km, D,
            BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PREC,
        )  # fmt: skip
        pos, neg, mw, logm = _pair_weights(
            offs_m, offs_n, row_ok, col_ok, qlab, klab, self_offset, pw_ptr, pw_ridx_ptr,
            pw_cidx_ptr, pw_cols, HAS_SELF, MULTILABEL, HAS_PW,
        )  # fmt: skip
        g = _grad_tile(
            s, pos, neg, g0[:, None], stat[:, None], g1[:, None], scale, log_w_pos,
            log_w_neg, log_k1, logm, mw, MODE, HAS_K1,
        )  # fmt: skip
        q_ptrs = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm + offs_do[None, :]
        if EVEN_D:
            qd = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            qd = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_do[None, :] < D), other=0.0)
        acc = _mma(tl.trans(g.to(qd.dtype)), qd, acc, DOT_PREC)

    dk_ptrs = dk_ptr + offs_n.to(tl.int64)[:, None] * stride_dkm + offs_do[None, :]
    out_ok = col_ok[:, None] & (offs_do[None, :] < D)
    tl.store(dk_ptrs, acc.to(dk_ptr.dtype.element_ty), mask=out_ok)
