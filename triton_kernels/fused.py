"""The small kernels around the symmetric path that make a whole 'all'-mode loss a handful of
launches (``fused_launch.fused_fwd`` / ``fused_bwd``).

A loss step on the symmetric path used to be two large kernels and ~190 tiny PyTorch ops
(the static shift's plan, the log-sum-exp epilogue, the per-row loss, the reduction, their
autograd, the backward's row constants): on a GPU those cost more than the kernels at every
N below ~10⁵. Here they are five small kernels, and nothing reaches the host:

- ``_prep_kernel`` (row blocks): each block's largest finite ‖z_i‖² and whether a row is
  non-finite (partials), the rows' labels (sample b = r mod B's class id, multi-hot bitmask or
  id), and the rows' symmetric sums zeroed.
- ``_plan_kernel`` (one program over the partials): R², the plan ``[A, R², c_pos, c_neg,
  1/m_max, l1, l2, range1, range2, bad, E1, E2]`` whose first five entries the symmetric
  kernels read (sym.py), the int32 gates (``[0]``: the symmetric kernels run where it is 1,
  the general ``GATED`` kernels where it is 0; ``[4]``, 16 bytes on so that its pointer stays
  aligned as the kernel report compiles it: the constant 1 that gates SINCERE's softplus
  pass, which has no fallback); zeroes the loss and E1, E2.
- ``_finish_kernel`` (row blocks): the per-row statistics from the symmetric sums (gate 1) or
  the general kernel's outputs (gate 0), the per-row loss of docs/losses.md, its block sum added
  to the loss (fp32 atomics), and the largest backward row factors without the incoming
  gradient (E1, E2: atomic max), so the backward gate needs no reduction over rows.
- ``_bwd_prep_kernel`` (row blocks): the backward gate and the row constants of both kernel
  families from the scalar incoming gradient; zeroes the fp32 dz the symmetric backward adds
  into.
- ``_bwd_finish_kernel`` (row blocks × D chunks): dz (symmetric) plus dq + dk (general, gate
  0), cast to the input dtype, without the padding columns.

Losses (``LOSS``): ``OUT`` is ℓ_i = [C_i > 0]·(LSE_i − psum_i/(τ·C_i)) — SupCon L_out,
NT-Xent (labels are sample ids) and TCL (its D_i is the LSE with weights (1, k2, k1)) —
and exactly 0 where the LSE has a single term, the row's one positive (``_one_term``).
``SINCERE`` runs the finish twice: stage 0 makes η_i (the LSE over negatives) and zeroes the
softplus sums, stage 1 reduces ℓ_i = sp_i / max(C_i, 1). The loss is (weight/N)·Σ_i ℓ_i
(weight = τ/τ_b for SupCon, 1 otherwise; the 1/N is taken on the device so that no float
argument depends on the batch size), NaN when any feature is non-finite. Its last bits
depend on the order the blocks' atomic adds arrive in, like the symmetric sums'.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOSS_OUT = 0
LOSS_SINCERE = 1
# The prep kernel's label input: int64 class ids [B], multi-hot [B, L] (as uint8), none (the
# sample id r mod B, SimCLR). Row r = v·B + b of the view-major z gets sample b's label.
LABELS_CLASSES = 0
LABELS_MULTIHOT = 1
LABELS_IDS = 2

# plan layout (fp32): the first five entries are sym.py's plan vector.
# [A, R², c_pos, c_neg, 1/m_max, l1, l2, range1, range2, bad, E1, E2]; E1, E2: the finish's
# largest backward row factors.
PLAN_SIZE = 16
# stats (fp32 [4, N]): LSE (η for SINCERE), C, r (SINCERE), psum. The backward's row vectors
# (fp32 [5, N]): ρ, κ, g_psum, g_lse, g_sp.


@triton.jit
def _prep_kernel(
    z_ptr,
    lab_in_ptr,
    part_ptr,
    sums_ptr,
    lab_ptr,
    N,
    D,
    stride_z,
    B,
    L,
    stride_lab,
    N_SUMS: tl.constexpr,
    LABELS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One block of rows: its largest finite ‖z_i‖² and whether a row is non-finite (into
    ``part[pid]`` and ``part[P + pid]``), the rows' labels, and the rows' sums zeroed."""
    pid = tl.program_id(0)
    r0 = pid * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    ok = rows < N
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    # A scalar int64 base per row block, int32 offsets inside it (as lse._sim_tile).
    base = z_ptr + r0.to(tl.int64) * stride_z + tl.arange(0, BLOCK_R)[:, None] * stride_z
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
        x = x.to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    # NaN and ±Inf fail "< inf"; the shift is taken over the finite rows.
    fin = sq < float("inf")
    tl.store(part_ptr + pid, tl.max(tl.where(ok & fin, sq, 0.0), axis=0))
    tl.store(part_ptr + tl.num_programs(0) + pid, tl.max((ok & ~fin).to(tl.float32), axis=0))
    # The rows' labels (int64): sample b = r mod B's class id, bitmask, or id.
    smp = rows % B
    if LABELS == 0:
        lab = tl.load(lab_in_ptr + smp, mask=ok, other=0)
    elif LABELS == 1:
        cols = tl.arange(0, 64)
        hot = tl.load(
            lab_in_ptr + smp[:, None] * stride_lab + cols[None, :],
            mask=ok[:, None] & (cols[None, :] < L), other=0,
        )  # fmt: skip
        bit = tl.full([64], 1, tl.int64) << cols.to(tl.int64)
        # Distinct bits: the sum is the bitwise OR.
        lab = tl.sum(tl.where(hot != 0, bit[None, :], 0), axis=1)
    else:
        lab = smp.to(tl.int64)
    tl.store(lab_ptr + rows, lab, mask=ok)
    zero = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k in tl.static_range(N_SUMS):
        tl.store(sums_ptr + k * N + rows, zero, mask=ok)


@triton.jit
def _plan_kernel(
    part_ptr,
    plan_ptr,
    gate_ptr,
    out_ptr,
    P,
    scale,
    c_pos,
    c_neg,
    log_cmax,
    log_spread,
    log_k1,
    RANGE: tl.constexpr,
    HAS_K1: tl.constexpr,
    HAS_TERMS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program: R² and "bad" over the prep kernel's P partials, the plan and the gates;
    zeroes the accumulators the finish kernels add into (the loss, E1, E2)."""
    # Scalars arrive as fp64 from Inductor: pin them to fp32.
    scale = tl.cast(scale, tl.float32)
    c_pos = tl.cast(c_pos, tl.float32)
    c_neg = tl.cast(c_neg, tl.float32)
    log_cmax = tl.cast(log_cmax, tl.float32)
    log_spread = tl.cast(log_spread, tl.float32)
    log_k1 = tl.cast(log_k1, tl.float32)
    r2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    bad = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        r2 = tl.maximum(r2, tl.load(part_ptr + offs, mask=offs < P, other=0.0))
        bad = tl.maximum(bad, tl.load(part_ptr + P + offs, mask=offs < P, other=0.0))
    r2s = tl.max(r2, axis=0)
    any_bad = tl.max(bad, axis=0)
    # The shift the symmetric kernels subtract is this fp32 value; l1 uses the same rounding.
    a = scale * r2s
    if HAS_TERMS:
        range1 = 2.0 * a + log_spread
    else:
        range1 = a * 0.0
    if HAS_K1:
        range2 = 2.0 * r2s
        l2 = log_k1 + r2s
    else:
        range2 = a * 0.0
        l2 = a * 0.0
    ok_plan = (range1 >= 0.0) & (range1 <= RANGE) & (range2 >= 0.0) & (range2 <= RANGE)
    ok_plan = ok_plan & (any_bad == 0.0)
    tl.store(plan_ptr + 0, a)
    tl.store(plan_ptr + 1, r2s)
    tl.store(plan_ptr + 2, c_pos)
    tl.store(plan_ptr + 3, c_neg)
    tl.store(plan_ptr + 4, a * 0.0 + 1.0)
    tl.store(plan_ptr + 5, log_cmax + a)
    tl.store(plan_ptr + 6, l2)
    tl.store(plan_ptr + 7, range1)
    tl.store(plan_ptr + 8, range2)
    tl.store(plan_ptr + 9, any_bad)
    tl.store(plan_ptr + 10, a * 0.0)
    tl.store(plan_ptr + 11, a * 0.0)
    tl.store(out_ptr, a * 0.0)
    tl.store(gate_ptr, ok_plan.to(tl.int32))
    tl.store(gate_ptr + 4, ok_plan.to(tl.int32) * 0 + 1)


@triton.jit
def _lse_of_sums(s1, s2, l1, l2, HAS_K1: tl.constexpr):
    """log(e^{l1}·s1 + e^{l2}·s2): the symmetric kernels' shifted sums back to the LSE of the
    contract (−inf without any term)."""
    ninf = float("-inf")
    x1 = tl.where(s1 > 0, l1 + tl.log(tl.where(s1 > 0, s1, 1.0)), ninf)
    if HAS_K1:
        x2 = tl.where(s2 > 0, l2 + tl.log(tl.where(s2 > 0, s2, 1.0)), ninf)
        m = tl.maximum(x1, x2)
        m_use = tl.where(m == ninf, 0.0, m)
        tot = tl.exp(x1 - m_use) + tl.exp(x2 - m_use)
        return tl.where(m == ninf, ninf, m_use + tl.log(tl.where(m == ninf, 1.0, tot)))
    return x1


@triton.jit
def _one_term(pcnt, plan_ptr, N, HAS_K1: tl.constexpr):
    """The 'out' rows whose LSE has a single term, their one positive: no k1 term, and no
    weighted negative (N = 2, one column per row; or negatives of weight 0: c_neg = 0)."""
    if HAS_K1:
        return pcnt < 0.0  # never (a count): all False
    c_neg = tl.load(plan_ptr + 3)
    return (pcnt == 1.0) & ((N == 2) | (c_neg == 0.0))


@triton.jit
def _finish_kernel(
    sums_ptr,
    lse_g_ptr,
    psum_g_ptr,
    pcnt_g_ptr,
    plan_ptr,
    gate_ptr,
    stats_ptr,
    out_ptr,
    zero_ptr,
    N,
    scale,
    weight,
    LOSS: tl.constexpr,
    STAGE: tl.constexpr,
    HAS_K1: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """LOSS_OUT, or LOSS_SINCERE stage 0: the LSE pass's statistics (from the symmetric sums
    or the general kernel's outputs) into ``stats``; OUT also reduces the loss. SINCERE stage
    1: reduces sp_i / max(C_i, 1) from the softplus sums and saves r."""
    scale = tl.cast(scale, tl.float32)
    # The mean's 1/N is taken here: the op's float arguments do not depend on the batch size
    # (torch.compile would specialise on them and recompile for every new N).
    factor = tl.cast(weight, tl.float32) / N
    l1 = tl.load(plan_ptr + 5)
    l2 = tl.load(plan_ptr + 6)
    range1 = tl.load(plan_ptr + 7)
    range2 = tl.load(plan_ptr + 8)
    bad = tl.load(plan_ptr + 9)
    sym = tl.load(gate_ptr) != 0
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    e1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    e2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    if (LOSS == 1) and (STAGE == 1):
        sp = tl.load(sums_ptr + rows, mask=ok, other=0.0)
        r = tl.load(sums_ptr + N + rows, mask=ok, other=0.0)
        pcnt = tl.load(stats_ptr + N + rows, mask=ok, other=0.0)
        eta = tl.load(stats_ptr + rows, mask=ok, other=0.0)
        inv_c = 1.0 / tl.maximum(pcnt, 1.0)
        total += tl.where(ok, sp * inv_c, 0.0)
        tl.store(stats_ptr + 2 * N + rows, r, mask=ok)
        # g_eta_i = g·factor·r_i/max(C_i, 1): the LSE backward's row factor.
        fin = (eta > float("-inf")) & (eta < float("inf"))
        x = tl.where(fin, tl.minimum(l1 - eta, range1), 0.0)
        e1 = tl.maximum(e1, tl.where(ok & fin, tl.abs(r * inv_c) * tl.exp(x), 0.0))
    else:
        s1 = tl.load(sums_ptr + rows, mask=ok, other=0.0)
        s2 = tl.load(sums_ptr + N + rows, mask=ok, other=0.0)
        lse_s = _lse_of_sums(s1, s2, l1, l2, HAS_K1)
        psum_s = tl.load(sums_ptr + 2 * N + rows, mask=ok, other=0.0)
        pcnt_s = tl.load(sums_ptr + 3 * N + rows, mask=ok, other=0.0)
        lse_g = tl.load(lse_g_ptr + rows, mask=ok & ~sym, other=0.0)
        psum_g = tl.load(psum_g_ptr + rows, mask=ok & ~sym, other=0.0)
        pcnt_g = tl.load(pcnt_g_ptr + rows, mask=ok & ~sym, other=0.0)
        lse = tl.where(sym, lse_s, lse_g)
        psum = tl.where(sym, psum_s, psum_g)
        pcnt = tl.where(sym, pcnt_s, pcnt_g)
        tl.store(stats_ptr + rows, lse, mask=ok)
        tl.store(stats_ptr + N + rows, pcnt, mask=ok)
        tl.store(stats_ptr + 3 * N + rows, psum, mask=ok)
        fin = (lse > float("-inf")) & (lse < float("inf"))
        if LOSS == 0:
            # A row whose LSE has one term, its one positive, is exactly 0 (so is its
            # gradient: _bwd_prep_kernel); computed, the two sides would not cancel exactly.
            has = (pcnt > 0) & ~_one_term(pcnt, plan_ptr, N, HAS_K1)
            c = tl.where(has, pcnt, 1.0)
            row = tl.where(fin, lse, 0.0) - scale * psum / c
            total += tl.where(ok & has, row, 0.0)
            # |ρ_i|/|g·factor·scale| and |κ_i|/|g·factor| of a row with a gradient.
            live = ok & has & fin
            x1 = tl.where(live, tl.minimum(l1 - lse, range1), 0.0)
            e1 = tl.maximum(e1, tl.where(live, tl.exp(x1), 0.0))
            if HAS_K1:
                x2 = tl.where(live, tl.minimum(l2 - lse, range2), 0.0)
                e2 = tl.maximum(e2, tl.where(live, tl.exp(x2), 0.0))
    if (LOSS == 1) and (STAGE == 0):
        zero = tl.zeros([BLOCK_R], dtype=tl.float32)
        tl.store(zero_ptr + rows, zero, mask=ok)
        tl.store(zero_ptr + N + rows, zero, mask=ok)
    else:
        # Zeroed by the plan kernel. fp32 atomics: the last bits of the loss depend on the
        # order the blocks arrive in, as the symmetric sums' do (deterministic algorithms
        # take the general path).
        part = factor * tl.sum(total, axis=0)
        part = tl.where(bad != 0, float("nan"), part)
        tl.atomic_add(out_ptr, part, sem="relaxed")
        tl.atomic_max(plan_ptr + 10, tl.max(e1, axis=0), sem="relaxed")
        tl.atomic_max(plan_ptr + 11, tl.max(e2, axis=0), sem="relaxed")


@triton.jit
def _bwd_prep_kernel(
    g_ptr,
    stats_ptr,
    plan_ptr,
    fgate_ptr,
    vec_ptr,
    gate_ptr,
    dz_ptr,
    N,
    D,
    stride_vec,
    stride_dz,
    scale,
    weight,
    BIG,
    LOSS: tl.constexpr,
    HAS_K1: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row vectors (fp32 [5, N]): ρ, κ, g_psum for the symmetric backward; g_lse (with
    g_psum and the saved LSE) for the general one; g_sp for SINCERE's softplus pass. The
    backward gate: the forward's, and |ρ_i|, |κ_i| within ``BIG`` (a quarter of fp32's range:
    the symmetric backward adds two such constants, times factors <= 1)."""
    scale = tl.cast(scale, tl.float32)
    factor = tl.cast(weight, tl.float32) / N  # as in _finish_kernel
    BIG = tl.cast(BIG, tl.float32)
    pid = tl.program_id(0)
    gf = tl.load(g_ptr).to(tl.float32) * factor
    l1 = tl.load(plan_ptr + 5)
    l2 = tl.load(plan_ptr + 6)
    range1 = tl.load(plan_ptr + 7)
    range2 = tl.load(plan_ptr + 8)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    lse = tl.load(stats_ptr + rows, mask=ok, other=0.0)
    pcnt = tl.load(stats_ptr + N + rows, mask=ok, other=0.0)
    fin = (lse > float("-inf")) & (lse < float("inf"))
    if LOSS == 0:
        has = (pcnt > 0) & ~_one_term(pcnt, plan_ptr, N, HAS_K1)
        g_lse = tl.where(has & fin, gf, 0.0)
        g_psum = tl.where(has, -gf * scale / tl.where(has, pcnt, 1.0), 0.0)
        g_sp = tl.zeros([BLOCK_R], dtype=tl.float32)
        bound1 = tl.abs(gf) * scale * tl.load(plan_ptr + 10)
        bound2 = tl.abs(gf) * tl.load(plan_ptr + 11)
    else:
        r = tl.load(stats_ptr + 2 * N + rows, mask=ok, other=0.0)
        g_sp = gf / tl.maximum(pcnt, 1.0)
        g_lse = tl.where(fin, g_sp * r, 0.0)
        g_psum = tl.zeros([BLOCK_R], dtype=tl.float32)
        bound1 = tl.abs(gf) * scale * tl.load(plan_ptr + 10)
        bound2 = bound1 * 0.0
    x1 = tl.where(fin, tl.minimum(l1 - lse, range1), 0.0)
    rho = tl.where(fin, g_lse * scale * tl.exp(x1), 0.0)
    if HAS_K1:
        x2 = tl.where(fin, tl.minimum(l2 - lse, range2), 0.0)
        kap = tl.where(fin, g_lse * tl.exp(x2), 0.0)
    else:
        kap = tl.zeros([BLOCK_R], dtype=tl.float32)
    tl.store(vec_ptr + rows, rho, mask=ok)
    tl.store(vec_ptr + stride_vec + rows, kap, mask=ok)
    tl.store(vec_ptr + 2 * stride_vec + rows, g_psum, mask=ok)
    tl.store(vec_ptr + 3 * stride_vec + rows, g_lse, mask=ok)
    tl.store(vec_ptr + 4 * stride_vec + rows, g_sp, mask=ok)
    if pid == 0:
        # Not (x <= BIG) rather than x > BIG: a NaN bound fails the gate.
        gate = (tl.load(fgate_ptr) != 0) & (bound1 <= BIG) & (bound2 <= BIG)
        tl.store(gate_ptr, gate.to(tl.int32))
        tl.store(gate_ptr + 4, gate.to(tl.int32) * 0 + 1)
    zero = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    base = dz_ptr + (pid * BLOCK_R).to(tl.int64) * stride_dz
    base += tl.arange(0, BLOCK_R)[:, None] * stride_dz
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(base + d[None, :], zero, mask=ok[:, None] & (d[None, :] < D))


@triton.jit
def _bwd_finish_kernel(
    dz_ptr,
    dq_ptr,
    dk_ptr,
    gate_ptr,
    out_ptr,
    N,
    D_OUT,
    stride_dz,
    stride_dq,
    stride_dk,
    stride_o,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = dz (+ dq + dk where the gate is 0), in the input dtype, D_OUT columns."""
    r0 = tl.program_id(0) * BLOCK_R
    local = tl.arange(0, BLOCK_R)[:, None]
    ok = (r0 + local) < N
    general = tl.load(gate_ptr) == 0
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = ok & (d[None, :] < D_OUT)
    r64 = r0.to(tl.int64)
    val = tl.load(dz_ptr + r64 * stride_dz + (local * stride_dz + d[None, :]), mask=m, other=0.0)
    if general:
        dq = tl.load(dq_ptr + r64 * stride_dq + (local * stride_dq + d[None, :]), mask=m, other=0.0)
        dk = tl.load(dk_ptr + r64 * stride_dk + (local * stride_dk + d[None, :]), mask=m, other=0.0)
        val += dq.to(tl.float32) + dk.to(tl.float32)
    dst = out_ptr + r64 * stride_o + (local * stride_o + d[None, :])
    tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=m)
