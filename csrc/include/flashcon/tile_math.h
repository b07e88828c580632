// Per-pair epilogue math of the streaming engine, shared by the CPU and CUDA kernels.
//
// Every function here is compiled for the host (used by csrc/cpu/) and, under nvcc, for the
// device (used by csrc/cuda/), so the CPU tests execute exactly the arithmetic the GPU kernels
// run. The formulas are the engine contract of python/flashcon/engine.py (docs/losses.md §0-§2):
//
//   lse_i  = log( Σ_{P(i)} m_ij [w_pos e^{scale s_ij} + k1 e^{-s_ij}]
//                 + Σ_{N(i)} w_neg e^{scale s_ij} )
//   G_ij   = g_lse_i e^{-lse_i} (c_ij scale e^{scale s_ij} - [P] m_ij k1 e^{-s_ij})
//            + g_psum_i m_ij      (c_ij = w_pos m_ij on P(i), w_neg on N(i))
//   sp_i   = Σ_{P(i)} m_ij softplus(eta_i - scale s_ij)
//   r_i    = Σ_{P(i)} m_ij σ(eta_i - scale s_ij)
//   G_ij   = -g_sp_i scale m_ij σ(eta_i - scale s_ij)
//
// Weights enter as logarithms (log 0 = -inf), so a weighted term is one exponent and an absent
// term is e^{-inf} = 0: no branch, and the kernels' inner loops stay vectorisable. Every
// exponential is max-shifted (online log-sum-exp) or of a non-positive argument.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define FLASHCON_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined so the CPU loops that call these functions vectorise.
#define FLASHCON_HD inline __attribute__((always_inline))
#else
#define FLASHCON_HD inline
#endif

namespace flashcon {
namespace tile_math {

template <typename T>
FLASHCON_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---- exponential ---------------------------------------------------------------------------
// Device: the hardware exp2-based expf. Host float: a branch-free Cody-Waite + degree-6
// polynomial (about 2 ulp), written so that a loop over it vectorises without -ffast-math
// (libm's expf call does not). Arguments below the smallest normal's log give exactly 0, which
// covers the -inf exponents of absent terms. Double: libm.
FLASHCON_HD float fexp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float lo = -87.33654f, hi = 88.72283f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  // Round-to-nearest by the 1.5·2^23 trick: exact under strict IEEE arithmetic.
  const float magic = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float y = p * two_n;
  return x != x ? x : (x < lo ? 0.0f : y);
#endif
}

FLASHCON_HD double fexp(double x) { return exp(x); }

FLASHCON_HD float flog(float x) { return logf(x); }
FLASHCON_HD double flog(double x) { return log(x); }
FLASHCON_HD float flog1p(float x) { return log1pf(x); }
FLASHCON_HD double flog1p(double x) { return log1p(x); }

// ---- weights -------------------------------------------------------------------------------
// log of a non-negative weight, -inf for 0 (the term is absent).
template <typename T>
FLASHCON_HD T log_weight(double w) {
  return w > 0 ? static_cast<T>(log(w)) : neg_inf<T>();
}

// ---- positive weights ----------------------------------------------------------------------
// m_ij >= 0 is the positive weight of pair (i, j) (engine contract v2): from class labels
// [l_i == l_j], from int64 label bitmasks [(l_i & l_j) != 0], or read from a [Bq, Bk] matrix
// as pos_weight[i mod Bq, j mod Bk]. The pair is a positive when m_ij > 0, a negative when
// m_ij == 0; the anchor's own column (excl) is neither and carries no mass.
enum PosMode : int { kLabels = 0, kMultiLabel = 1, kPosWeight = 2 };

template <typename T>
FLASHCON_HD T label_weight(int64_t li, int64_t lj, bool multilabel) {
  return (multilabel ? (li & lj) != 0 : li == lj) ? T(1) : T(0);
}

// m_ij as it enters psum, pcnt and the g_psum term: 0 on the anchor's own column.
template <typename T>
FLASHCON_HD T pos_mass(T m, bool excl) {
  return excl ? T(0) : m;
}

// Exponent of pair (i, j)'s main term: scale·s + log c_ij with c_ij = w_pos·m_ij on positives
// (log m_ij = logm; 0 for label positives), w_neg on negatives, and -inf on the anchor's own
// column (neither positive nor negative).
template <typename T>
FLASHCON_HD T lse_term(T s, T m, T logm, bool excl, T scale, T lw_pos, T lw_neg) {
  const T lw = excl ? neg_inf<T>()
                    : (m > T(0) ? lw_pos + logm : (m == T(0) ? lw_neg : neg_inf<T>()));
  return scale * s + lw;
}

// Exponent of TCL's k1 term log(k1·m_ij) - s (positives only; -inf elsewhere or when k1 = 0).
template <typename T>
FLASHCON_HD T k1_term(T s, T m, T logm, bool excl, T lk1) {
  return (!excl && m > T(0)) ? lk1 + logm - s : neg_inf<T>();
}

// ---- online log-sum-exp --------------------------------------------------------------------
// State (m, sum): the running log-sum-exp is m + log(sum), sum measured relative to e^m.
// Moving to a larger shift m_new rescales sum; (-inf, 0) is the empty state, and
// e^{-inf - (-inf)} is never formed.
template <typename T>
FLASHCON_HD T lse_rescale(T m_old, T sum_old, T m_new) {
  return m_old == neg_inf<T>() ? T(0) : sum_old * fexp(m_old - m_new);
}

template <typename T>
FLASHCON_HD void lse_merge(T& m, T& sum, T m2, T sum2) {
  const T mn = m2 > m ? m2 : m;
  if (mn == neg_inf<T>()) return;
  sum = lse_rescale(m, sum, mn) + lse_rescale(m2, sum2, mn);
  m = mn;
}

// -inf only for a row with no term (sum exactly 0); a NaN term's NaN sum stays NaN (the
// contract: NaN in, NaN out, never "no term").
template <typename T>
FLASHCON_HD T lse_finish(T m, T sum) {
  return (m == neg_inf<T>() || sum == T(0)) ? neg_inf<T>() : m + flog(sum);
}

// The shift the backward uses for e^{t - lse}: a row with no term (lse = -inf) has only -inf
// exponents, so any finite shift gives its (zero) gradient without NaN.
template <typename T>
FLASHCON_HD T finite_or_zero(T x) {
  return (x - x == T(0)) ? x : T(0);
}

// ---- per-pair gradient of the lse op -------------------------------------------------------
// G_ij = g_lse·(scale·e^{t - l} - e^{t1 - l}) + m_ij·g_psum, t the main exponent, t1 the k1
// exponent, l the row's finite lse.
template <typename T>
FLASHCON_HD T lse_pair_grad(T s, T m, T logm, bool excl, T g_lse, T l, T g_psum, T scale,
                            T lw_pos, T lw_neg, T lk1, bool has_k1) {
  T g = scale * fexp(lse_term(s, m, logm, excl, scale, lw_pos, lw_neg) - l);
  if (has_k1) g -= fexp(k1_term(s, m, logm, excl, lk1) - l);
  return g_lse * g + pos_mass(m, excl) * g_psum;
}

// ---- softplus / sigmoid (SINCERE's second pass) --------------------------------------------
// softplus(x) = max(x, 0) + log1p(e^{-|x|}); σ(x) from e^{-|x|} <= 1, never overflowing.
template <typename T>
FLASHCON_HD T softplus(T x) {
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + flog1p(fexp(-ax));
}

template <typename T>
FLASHCON_HD T sigmoid(T x) {
  const T ax = x < T(0) ? -x : x;
  const T e = fexp(-ax);
  const T inv = T(1) / (T(1) + e);
  return x >= T(0) ? inv : e * inv;
}

// The exponent of the softplus pass: eta_i - scale·s_ij.
template <typename T>
FLASHCON_HD T sp_arg(T s, T eta, T scale) {
  return eta - scale * s;
}

// G_ij of the softplus op: -g_sp·scale·m_ij·σ(eta_i - scale·s_ij) (mm = pos_mass(m, excl)).
template <typename T>
FLASHCON_HD T sp_pair_grad(T s, T mm, T g_sp, T eta, T scale) {
  return mm != T(0) ? -g_sp * scale * mm * sigmoid(sp_arg(s, eta, scale)) : T(0);
}

// ---- symmetric path, static shift ----------------------------------------------------------
// With q = k = z, one exponential e_ij = e^{scale·s_ij - A} (A = scale·max‖z‖², so e <= 1)
// serves row i and row j; the weights multiply it instead of entering the exponent, scaled by
// the largest one (chat = c/c_max <= 1), so every term is <= 1 and the sums cannot overflow.
// TCL's k1 terms use f_ij = e^{-s_ij - R²} (R² = max‖z‖²) the same way. The caller checks that
// the smallest possible product stays a normal number (see csrc/cpu/symmetric.cpp).
//
// chat_ij: c_ij / c_max (0 on the own column and on pairs with no term).
template <typename T>
FLASHCON_HD T sym_coef(T m, T cpos, T cneg) {
  return m > T(0) ? cpos * m : (m == T(0) ? cneg : T(0));
}

// k1 weight m_ij / m_max of the positive pair (0 elsewhere).
template <typename T>
FLASHCON_HD T sym_kcoef(T m, T inv_mmax) {
  return m > T(0) ? m * inv_mmax : T(0);
}

// G_ij from the static-shift exponentials and the row's folded constants
// rho_i = g_lse_i·scale·c_max·e^{A - lse_i} and kappa_i = g_lse_i·k1·m_max·e^{R² - lse_i}.
template <typename T>
FLASHCON_HD T sym_lse_pair_grad(T s, T e, T f, T m, T rho, T kappa, T g_psum, T cpos, T cneg,
                                T inv_mmax) {
  return rho * sym_coef(m, cpos, cneg) * e - kappa * sym_kcoef(m, inv_mmax) * f + m * g_psum;
}

// Column j of row i is the anchor's own column (excluded from everything).
FLASHCON_HD bool is_self(int64_t i, int64_t j, int64_t self_offset) {
  return self_offset >= 0 && j == i + self_offset;
}

}  // namespace tile_math
}  // namespace flashcon
