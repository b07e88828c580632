// The symmetric path of the CPU kernels: the ops sym_lse_fwd, sym_lse_bwd, sym_sp_fwd and
// sym_sp_bwd, for 'all' mode (q = k = z, self_offset = 0); engine_cpu.h says what the files
// share.
//
// s_ij = s_ji, so each unordered pair of kSym-row blocks (I, J), I <= J, is visited once:
// S_IJ = Z_I·Z_Jᵀ is one product; the forward adds pair (i, j)'s terms to row i's statistics
// (along the rows of the tile) and pair (j, i)'s to row j's (along its columns; m_ji is read
// separately, so an asymmetric pos_weight is exact); the backward forms
// H_IJ = G_IJ + G_JIᵀ entry by entry from the statistics of both rows and applies
// dZ_I += H·Z_J, dZ_J += Hᵀ·Z_I. A diagonal tile (I = J) takes its strictly upper triangle
// only (the own column i = j is never visited), so no pair is counted twice.
//
// Schedule. The tile pairs run in rounds of a round-robin tournament over the blocks: inside
// a round no two tasks share a block, so the tasks write their statistics and dZ blocks with
// no race, no atomics and no per-thread copies of dZ (the extra memory is one kSym×kSym tile
// per thread). Every block receives its contributions in round order whatever the thread
// count, so the results are bitwise reproducible (at any thread count).
//
// Static shift. One exponential e_ij = exp(scale·s_ij − A), A = scale·R², R² = max_i ‖z_i‖²
// (so e_ij <= 1, computed in O(N·D)), serves both rows; the weights multiply it, normalised by
// the largest coefficient c_max (tile_math.h: sym_coef), and TCL's k1 terms use
// f_ij = exp(−s_ij − R²) with weights m_ij/m_max. Every term then lies in
// [exp(−range), 1] with range1 = 2A + log(c_max/c_min) (main terms) and
// range2 = 2R² + log(m_max/m_min) (k1 terms). The static path is taken when both ranges are
// at most 80 in float32 (exp(−80) ≈ 1.8e−35 stays a normal number; the float exponential
// flushes below −87.3) or 700 in float64: for unit-norm features and no pos_weight that is
// τ >= 0.025 (range1 = 2/τ), and any k1. Otherwise (tiny temperatures, large norms, widely
// spread weights) the op runs the general path with its per-row online max (q = k = z,
// dz = dq + dk), which never underflows. The backward also falls back when a row's folded
// constant g_lse·scale·c_max·e^{A − lse} would overflow. The softplus pass (SINCERE) needs
// no shift: its per-pair functions depend on eta_i, so it shares the products only.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "engine_cpu.h"

namespace flashcon {
namespace cpu {
namespace {

constexpr int64_t kSym = 256;  // rows of a symmetric block (a tile is kSym × kSym)

// The tasks of each round: pairs (I, J) with I <= J (I == J: a diagonal tile).
std::vector<std::vector<std::pair<int64_t, int64_t>>> round_robin(int64_t nb) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  const int64_t np = nb + (nb % 2);  // with an odd count, a dummy block: its partner's bye
  for (int64_t r = 0; r + 1 < np; ++r) {
    std::vector<std::pair<int64_t, int64_t>> tasks;
    for (int64_t k = 0; k < np / 2; ++k) {
      int64_t a, b;
      if (k == 0) {
        a = np - 1;
        b = r;
      } else {
        a = (r + k) % (np - 1);
        b = (r - k + np - 1) % (np - 1);
      }
      if (a >= nb) a = b;  // the bye: the block's diagonal tile
      if (b >= nb) b = a;
      tasks.emplace_back(std::min(a, b), std::max(a, b));
    }
    rounds.push_back(std::move(tasks));
  }
  if (nb % 2 == 0) {  // no byes: one more round of every diagonal tile
    std::vector<std::pair<int64_t, int64_t>> tasks;
    for (int64_t b = 0; b < nb; ++b) tasks.emplace_back(b, b);
    rounds.push_back(std::move(tasks));
  }
  return rounds;
}

// One row of a symmetric tile: S row s[0, n) (H written in place), the pair range [b0, n)
// (b0 = a + 1 on a diagonal tile, 0 elsewhere), and what gives m_ij (row i, column j) and m_ji.
template <typename T>
struct SymRow {
  T* s;
  int64_t b0, n;
  int64_t li;            // label of row i
  const int64_t* lj;     // labels of the tile's columns
  const T* pw_i;         // pos_weight row of i (pw + (i mod Bq)·Bk)
  int64_t ik;            // i mod Bk
  const int64_t* jk;     // j mod Bk of the tile's columns
  const int64_t* jq;     // (j mod Bq)·Bk of the tile's columns
  const T* pw;           // pos_weight
};

template <int MODE, typename T>
FLASHCON_INLINE void sym_weights(const SymRow<T>& r, int64_t b, T& m_ij, T& m_ji) {
  if constexpr (MODE == tm::kPosWeight) {
    m_ij = r.pw_i[r.jk[b]];
    m_ji = r.pw[r.jq[b] + r.ik];
  } else {
    m_ij = m_ji = tm::label_weight<T>(r.li, r.lj[b], MODE == tm::kMultiLabel);
  }
}

template <typename T>
struct SymLse {
  T scale, a, r2, cpos, cneg, inv_mmax;
  bool has_k1;
};

// Row i's sums (s1: main terms, s2: k1 terms, psum, pcnt) and column j's (arrays, += m_ji ...).
template <int MODE, bool K1, typename T>
FLASHCON_INLINE void sym_lse_fwd_row_impl(const SymRow<T>& r, const SymLse<T>& p, T* cs1, T* cs2,
                                          T* cps, T* cpc, T& s1, T& s2, T& ps, T& pc) {
  constexpr int W = lanes<T>();
  T a1[W], a2[W], a3[W], a4[W];
  for (int l = 0; l < W; ++l) a1[l] = a2[l] = a3[l] = a4[l] = T(0);
  auto pair = [&](int64_t b, T& x1, T& x2, T& x3, T& x4) FLASHCON_INLINE_LAMBDA {
    const T v = r.s[b];
    T m_ij, m_ji;
    sym_weights<MODE>(r, b, m_ij, m_ji);
    const T e = tm::fexp(p.scale * v - p.a);
    x1 += tm::sym_coef(m_ij, p.cpos, p.cneg) * e;
    cs1[b] += tm::sym_coef(m_ji, p.cpos, p.cneg) * e;
    if (K1) {
      const T f = tm::fexp(-v - p.r2);
      x2 += tm::sym_kcoef(m_ij, p.inv_mmax) * f;
      cs2[b] += tm::sym_kcoef(m_ji, p.inv_mmax) * f;
    }
    x3 += m_ij * v;
    x4 += m_ij;
    cps[b] += m_ji * v;
    cpc[b] += m_ji;
  };
  int64_t j = r.b0;
  for (; j + W <= r.n; j += W) {
    for (int l = 0; l < W; ++l) pair(j + l, a1[l], a2[l], a3[l], a4[l]);
  }
  T t1 = T(0), t2 = T(0), t3 = T(0), t4 = T(0);
  for (int l = 0; l < W; ++l) t1 += a1[l], t2 += a2[l], t3 += a3[l], t4 += a4[l];
  for (; j < r.n; ++j) pair(j, t1, t2, t3, t4);
  s1 += t1;
  s2 += t2;
  ps += t3;
  pc += t4;
}

// H row: G_ij (row i's constants) + G_ji (column j's constants), 0 before b0.
template <int MODE, bool K1, typename T>
FLASHCON_INLINE void sym_lse_bwd_row_impl(const SymRow<T>& r, const SymLse<T>& p, T rho_i,
                                          T kap_i, T gp_i, const T* rho_j, const T* kap_j,
                                          const T* gp_j) {
  for (int64_t b = 0; b < r.b0; ++b) r.s[b] = T(0);
  for (int64_t b = r.b0; b < r.n; ++b) {
    const T v = r.s[b];
    T m_ij, m_ji;
    sym_weights<MODE>(r, b, m_ij, m_ji);
    const T e = tm::fexp(p.scale * v - p.a);
    const T f = K1 ? tm::fexp(-v - p.r2) : T(0);
    r.s[b] = tm::sym_lse_pair_grad(v, e, f, m_ij, rho_i, kap_i, gp_i, p.cpos, p.cneg,
                                   p.inv_mmax) +
             tm::sym_lse_pair_grad(v, e, f, m_ji, rho_j[b], kap_j[b], gp_j[b], p.cpos, p.cneg,
                                   p.inv_mmax);
  }
}

// The softplus pass: row i with eta_i, column j with eta_j (two exponentials per pair).
template <int MODE, typename T>
FLASHCON_INLINE void sym_sp_fwd_row_impl(const SymRow<T>& r, T scale, T eta_i, const T* eta_j,
                                         T* csp, T* cr, T& sp, T& rr) {
  constexpr int W = lanes<T>();
  T a1[W], a2[W];
  for (int l = 0; l < W; ++l) a1[l] = a2[l] = T(0);
  auto pair = [&](int64_t b, T& x1, T& x2) FLASHCON_INLINE_LAMBDA {
    const T v = r.s[b];
    T m_ij, m_ji;
    sym_weights<MODE>(r, b, m_ij, m_ji);
    const T xi = tm::sp_arg(v, eta_i, scale), xj = tm::sp_arg(v, eta_j[b], scale);
    x1 += m_ij != T(0) ? m_ij * tm::softplus(xi) : T(0);
    x2 += m_ij != T(0) ? m_ij * tm::sigmoid(xi) : T(0);
    csp[b] += m_ji != T(0) ? m_ji * tm::softplus(xj) : T(0);
    cr[b] += m_ji != T(0) ? m_ji * tm::sigmoid(xj) : T(0);
  };
  int64_t j = r.b0;
  for (; j + W <= r.n; j += W) {
    for (int l = 0; l < W; ++l) pair(j + l, a1[l], a2[l]);
  }
  T t1 = T(0), t2 = T(0);
  for (int l = 0; l < W; ++l) t1 += a1[l], t2 += a2[l];
  for (; j < r.n; ++j) pair(j, t1, t2);
  sp += t1;
  rr += t2;
}

template <int MODE, typename T>
FLASHCON_INLINE void sym_sp_bwd_row_impl(const SymRow<T>& r, T scale, T g_i, T eta_i,
                                         const T* g_j, const T* eta_j) {
  for (int64_t b = 0; b < r.b0; ++b) r.s[b] = T(0);
  for (int64_t b = r.b0; b < r.n; ++b) {
    const T v = r.s[b];
    T m_ij, m_ji;
    sym_weights<MODE>(r, b, m_ij, m_ji);
    r.s[b] = tm::sp_pair_grad(v, m_ij, g_i, eta_i, scale) +
             tm::sp_pair_grad(v, m_ji, g_j[b], eta_j[b], scale);
  }
}

#define FLASHCON_SYM_CLONES(T)                                                                  \
  FLASHCON_CLONES void sym_lse_fwd_row(int mode, const SymRow<T>& r, const SymLse<T>& p,       \
                                       T* cs1, T* cs2, T* cps, T* cpc, T& s1, T& s2, T& ps,    \
                                       T& pc) {                                                 \
    if (p.has_k1) {                                                                             \
      FLASHCON_MODE_SWITCH(mode, (sym_lse_fwd_row_impl<MODE, true>(r, p, cs1, cs2, cps, cpc, \
                                                                   s1, s2, ps, pc)))           \
    } else {                                                                                    \
      FLASHCON_MODE_SWITCH(mode, (sym_lse_fwd_row_impl<MODE, false>(r, p, cs1, cs2, cps, cpc, \
                                                                    s1, s2, ps, pc)))          \
    }                                                                                           \
  }                                                                                             \
  FLASHCON_CLONES void sym_lse_bwd_row(int mode, const SymRow<T>& r, const SymLse<T>& p,       \
                                       T rho_i, T kap_i, T gp_i, const T* rho_j,               \
                                       const T* kap_j, const T* gp_j) {                        \
    if (p.has_k1) {                                                                             \
      FLASHCON_MODE_SWITCH(mode, (sym_lse_bwd_row_impl<MODE, true>(r, p, rho_i, kap_i, gp_i,  \
                                                                   rho_j, kap_j, gp_j)))       \
    } else {                                                                                    \
      FLASHCON_MODE_SWITCH(mode, (sym_lse_bwd_row_impl<MODE, false>(r, p, rho_i, kap_i, gp_i, \
                                                                    rho_j, kap_j, gp_j)))      \
    }                                                                                           \
  }                                                                                             \
  FLASHCON_CLONES void sym_sp_fwd_row(int mode, const SymRow<T>& r, T scale, T eta_i,           \
                                      const T* eta_j, T* csp, T* cr, T& sp, T& rr) {            \
    FLASHCON_MODE_SWITCH(mode, (sym_sp_fwd_row_impl<MODE>(r, scale, eta_i, eta_j, csp, cr, sp, \
                                                          rr)))                                \
  }                                                                                             \
  FLASHCON_CLONES void sym_sp_bwd_row(int mode, const SymRow<T>& r, T scale, T g_i, T eta_i,    \
                                      const T* g_j, const T* eta_j) {                           \
    FLASHCON_MODE_SWITCH(mode, (sym_sp_bwd_row_impl<MODE>(r, scale, g_i, eta_i, g_j, eta_j)))   \
  }

FLASHCON_SYM_CLONES(float)
FLASHCON_SYM_CLONES(double)

// Per-thread scratch of the symmetric drivers: the tile, column statistics and index arrays.
template <typename T>
struct SymScratch {
  std::vector<T> buf, c1, c2, c3, c4;
  std::vector<int64_t> jk, jq;
  void ensure() {
    if (!buf.empty()) return;
    buf.resize(kSym * kSym);
    for (auto* v : {&c1, &c2, &c3, &c4}) v->resize(kSym);
    jk.resize(kSym);
    jq.resize(kSym);
  }
};

// Runs tile(I, J, r0, br, c0, bc, S, row_of, scratch) for every tile pair, round by round.
// S = Z_I·Z_Jᵀ is in scratch.buf; row_of(a) builds the SymRow of the tile's row a.
template <typename T, typename TileFn>
void sym_drive(const Operands& o, TileFn&& tile) {
  const int64_t nb = (o.n + kSym - 1) / kSym;
  if (nb == 0) return;
  const auto rounds = round_robin(nb);
  std::vector<SymScratch<T>> scratch(std::max(1, at::get_num_threads()));
  const int64_t* lab = o.ql.data_ptr<int64_t>();
  const T* pw = o.pw.defined() ? o.pw.data_ptr<T>() : nullptr;
  for (const auto& tasks : rounds) {
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      SymScratch<T>& sc = scratch[at::get_thread_num()];
      sc.ensure();
      for (int64_t t = t0; t < t1; ++t) {
        const auto [bi, bj] = tasks[t];
        const int64_t r0 = bi * kSym, br = std::min(kSym, o.n - r0);
        const int64_t c0 = bj * kSym, bc = std::min(kSym, o.n - c0);
        at::Tensor s = at::from_blob(sc.buf.data(), {br, bc}, o.q.options());
        const at::Tensor zi = o.q.narrow(0, r0, br), zj = o.q.narrow(0, c0, bc);
        if (o.d == 0) {
          s.zero_();
        } else {
          at::mm_out(s, zi, zj.t());
        }
        if (pw) {
          for (int64_t b = 0; b < bc; ++b) {
            sc.jk[b] = (c0 + b) % o.bk;
            sc.jq[b] = ((c0 + b) % o.bq) * o.bk;
          }
        }
        const bool diag = bi == bj;
        auto row_of = [&](int64_t a) {
          const int64_t i = r0 + a;
          return SymRow<T>{sc.buf.data() + a * bc,
                           diag ? a + 1 : 0,
                           bc,
                           lab[i],
                           lab + c0,
                           pw ? pw + (i % o.bq) * o.bk : nullptr,
                           pw ? i % o.bk : 0,
                           sc.jk.data(),
                           sc.jq.data(),
                           pw};
        };
        tile(r0, br, c0, bc, s, zi, zj, row_of, sc);
      }
    });
  }
}

// Whether the static shift is exact in the statistics dtype, and its constants.
struct SymPlan {
  bool ok = false;
  double a = 0, r2 = 0, cmax = 1, mmax = 1, range1 = 0, range2 = 0;
  bool has1 = false, has_k1 = false;
};

SymPlan sym_plan(const Operands& o, double scale, double w_pos, double w_neg, double k1) {
  SymPlan p;
  p.r2 = o.n > 0 && o.d > 0 ? o.q.pow(2).sum(1).max().item<double>() : 0.0;
  p.a = scale * p.r2;
  // The positive weights that can occur: 1 for labels, pos_weight's positive entries.
  double pmin = 1, pmax = 1;
  bool any_pos = true;
  if (o.pw.defined()) {
    const at::Tensor pos = o.pw.to(at::kDouble).masked_select(o.pw > 0);
    any_pos = pos.numel() > 0;
    if (any_pos) {
      pmin = pos.min().item<double>();
      pmax = pos.max().item<double>();
    }
  }
  double cmin = std::numeric_limits<double>::infinity(), cmax = 0;
  if (w_pos > 0 && any_pos) {
    cmin = std::min(cmin, w_pos * pmin);
    cmax = std::max(cmax, w_pos * pmax);
  }
  if (w_neg > 0) cmin = std::min(cmin, w_neg), cmax = std::max(cmax, w_neg);
  p.has1 = cmax > 0;
  p.cmax = p.has1 ? cmax : 1.0;
  p.range1 = p.has1 ? 2 * p.a + std::log(cmax / cmin) : 0.0;
  p.has_k1 = k1 > 0 && any_pos;
  p.mmax = pmax;
  p.range2 = p.has_k1 ? 2 * p.r2 + std::log(pmax / pmin) : 0.0;
  const double limit = o.q.scalar_type() == at::kDouble ? 700.0 : 80.0;
  // A negative scale (no loss passes one; the op may be called directly) would make the
  // "shift" a lower bound: the general path then.
  p.ok = scale >= 0 && std::isfinite(p.range1) && std::isfinite(p.range2) &&
         p.range1 <= limit && p.range2 <= limit;
  return p;
}

template <typename T>
SymLse<T> sym_lse_params(const SymPlan& pl, double scale, double w_pos, double w_neg) {
  return {static_cast<T>(scale),
          static_cast<T>(pl.a),
          static_cast<T>(pl.r2),
          static_cast<T>(pl.has1 ? w_pos / pl.cmax : 0.0),
          static_cast<T>(pl.has1 ? w_neg / pl.cmax : 0.0),
          static_cast<T>(1.0 / pl.mmax),
          pl.has_k1};
}

Operands prepare_sym(const char* op, const at::Tensor& z, const at::Tensor& lab, bool multilabel,
                     const OptTensor& pos_weight) {
  return prepare(op, z, z, lab, lab, multilabel, pos_weight);
}

// The per-row constants of the static backward; false when one overflows the dtype.
template <typename T>
bool sym_row_constants(const SymPlan& pl, double scale, double k1, const T* gl, const T* ls,
                       int64_t n, T* rho, T* kap) {
  const double big = static_cast<double>(std::numeric_limits<T>::max());
  const double l1 = std::log(pl.cmax) + pl.a;
  const double l2 = pl.has_k1 ? std::log(k1 * pl.mmax) + pl.r2 : 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double l = static_cast<double>(ls[i]);
    if (!std::isfinite(l)) {  // a row with no term: no gradient through lse
      rho[i] = kap[i] = T(0);
      continue;
    }
    // Exponents clamped to the largest value a row with a term of that stream can have; a
    // row above it has no such term, and its constant only ever multiplies a zero weight.
    const double r = pl.has1 ? gl[i] * scale * std::exp(std::min(l1 - l, pl.range1)) : 0.0;
    const double k = pl.has_k1 ? gl[i] * std::exp(std::min(l2 - l, pl.range2)) : 0.0;
    if (!(std::abs(r) <= big && std::abs(k) <= big)) return false;
    rho[i] = static_cast<T>(r);
    kap[i] = static_cast<T>(k);
  }
  return true;
}

// dz += H·Z_J on block I and Hᵀ·Z_I on block J (the same block on a diagonal tile).
void sym_apply(at::Tensor& dz, int64_t r0, int64_t br, int64_t c0, int64_t bc,
               const at::Tensor& h, const at::Tensor& zi, const at::Tensor& zj) {
  if (zi.size(1) == 0) return;
  dz.narrow(0, r0, br).addmm_(h, zj);
  dz.narrow(0, c0, bc).addmm_(h.t(), zi);
}

}  // namespace

// ---- ops -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_lse_fwd(const at::Tensor& z,
                                                           const at::Tensor& lab, double scale,
                                                           double w_pos, double w_neg, double k1,
                                                           bool multilabel,
                                                           const OptTensor& pos_weight) {
  check_weights("sym_lse_fwd", w_pos, w_neg, k1);
  const Operands o = prepare_sym("sym_lse_fwd", z, lab, multilabel, pos_weight);
  const SymPlan pl = sym_plan(o, scale, w_pos, w_neg, k1);
  if (!pl.ok) return lse_fwd_impl(o, 0, scale, w_pos, w_neg, k1);  // general path
  at::Tensor s1 = at::zeros({o.n}, o.q.options()), s2 = at::zeros({o.n}, o.q.options());
  at::Tensor psum = at::zeros({o.n}, o.q.options()), pcnt = at::zeros({o.n}, o.q.options());
  at::Tensor lse = at::empty({o.n}, o.q.options());
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "flashcon_sym_lse_fwd_cpu", [&] {
    using T = scalar_t;
    const SymLse<T> p = sym_lse_params<T>(pl, scale, w_pos, w_neg);
    T* s1p = s1.data_ptr<T>();
    T* s2p = s2.data_ptr<T>();
    T* psp = psum.data_ptr<T>();
    T* pcp = pcnt.data_ptr<T>();
    sym_drive<T>(o, [&](int64_t r0, int64_t br, int64_t c0, int64_t bc, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, auto&& row_of,
                        SymScratch<T>& sc) {
      std::fill_n(sc.c1.data(), bc, T(0));
      std::fill_n(sc.c2.data(), bc, T(0));
      std::fill_n(sc.c3.data(), bc, T(0));
      std::fill_n(sc.c4.data(), bc, T(0));
      for (int64_t a = 0; a < br; ++a) {
        const int64_t i = r0 + a;
        sym_lse_fwd_row(o.mode, row_of(a), p, sc.c1.data(), sc.c2.data(), sc.c3.data(),
                        sc.c4.data(), s1p[i], s2p[i], psp[i], pcp[i]);
      }
      for (int64_t b = 0; b < bc; ++b) {
        s1p[c0 + b] += sc.c1[b];
        s2p[c0 + b] += sc.c2[b];
        psp[c0 + b] += sc.c3[b];
        pcp[c0 + b] += sc.c4[b];
      }
    });
    // lse_i = log(c_max·e^A·s1_i + k1·m_max·e^{R²}·s2_i), in double.
    T* lp = lse.data_ptr<T>();
    const double l1 = std::log(pl.cmax) + pl.a;
    const double l2 = pl.has_k1 ? std::log(k1 * pl.mmax) + pl.r2 : 0.0;
    const double ninf = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < o.n; ++i) {
      const double x1 = s1p[i] > 0 ? l1 + std::log(static_cast<double>(s1p[i])) : ninf;
      const double x2 =
          pl.has_k1 && s2p[i] > 0 ? l2 + std::log(static_cast<double>(s2p[i])) : ninf;
      const double mx = std::max(x1, x2);
      lp[i] = static_cast<T>(
          mx == ninf ? ninf : mx + std::log(std::exp(x1 - mx) + std::exp(x2 - mx)));
    }
  });
  return {lse, psum, pcnt};
}

at::Tensor sym_lse_bwd(const at::Tensor& g_lse, const at::Tensor& g_psum, const at::Tensor& z,
                       const at::Tensor& lab, const at::Tensor& lse, double scale, double w_pos,
                       double w_neg, double k1, bool multilabel, const OptTensor& pos_weight) {
  check_weights("sym_lse_bwd", w_pos, w_neg, k1);
  const Operands o = prepare_sym("sym_lse_bwd", z, lab, multilabel, pos_weight);
  check_stat("sym_lse_bwd", "g_lse", g_lse, z);
  check_stat("sym_lse_bwd", "g_psum", g_psum, z);
  check_stat("sym_lse_bwd", "lse", lse, z);
  const SymPlan pl = sym_plan(o, scale, w_pos, w_neg, k1);
  const at::Tensor gl = g_lse.detach().contiguous(), gp = g_psum.detach().contiguous();
  const at::Tensor ls = lse.detach().contiguous();
  at::Tensor rho = at::empty({o.n}, o.q.options()), kap = at::empty({o.n}, o.q.options());
  bool ok = pl.ok;
  if (ok) {
    AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "flashcon_sym_consts_cpu", [&] {
      ok = sym_row_constants<scalar_t>(pl, scale, k1, gl.data_ptr<scalar_t>(),
                                       ls.data_ptr<scalar_t>(), o.n, rho.data_ptr<scalar_t>(),
                                       kap.data_ptr<scalar_t>());
    });
  }
  if (!ok) {  // general path
    auto [dq, dk] = lse_bwd_impl(o, gl, gp, ls, 0, scale, w_pos, w_neg, k1);
    return dq.add_(dk).to(z.scalar_type());
  }
  at::Tensor dz = at::zeros({o.n, o.d}, o.q.options());
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "flashcon_sym_lse_bwd_cpu", [&] {
    using T = scalar_t;
    const SymLse<T> p = sym_lse_params<T>(pl, scale, w_pos, w_neg);
    const T* rp = rho.data_ptr<T>();
    const T* kp = kap.data_ptr<T>();
    const T* gpp = gp.data_ptr<T>();
    sym_drive<T>(o, [&](int64_t r0, int64_t br, int64_t c0, int64_t bc, const at::Tensor& s,
                        const at::Tensor& zi, const at::Tensor& zj, auto&& row_of,
                        SymScratch<T>&) {
      for (int64_t a = 0; a < br; ++a) {
        const int64_t i = r0 + a;
        sym_lse_bwd_row(o.mode, row_of(a), p, rp[i], kp[i], gpp[i], rp + c0, kp + c0, gpp + c0);
      }
      sym_apply(dz, r0, br, c0, bc, s, zi, zj);
    });
  });
  return dz.to(z.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sym_sp_fwd(const at::Tensor& z, const at::Tensor& lab,
                                              const at::Tensor& eta, double scale,
                                              bool multilabel, const OptTensor& pos_weight) {
  const Operands o = prepare_sym("sym_sp_fwd", z, lab, multilabel, pos_weight);
  check_stat("sym_sp_fwd", "eta", eta, z);
  const at::Tensor et = eta.detach().contiguous();
  at::Tensor sp = at::zeros({o.n}, o.q.options()), r = at::zeros({o.n}, o.q.options());
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "flashcon_sym_sp_fwd_cpu", [&] {
    using T = scalar_t;
    const T sc_ = static_cast<T>(scale);
    const T* ep = et.data_ptr<T>();
    T* spp = sp.data_ptr<T>();
    T* rp = r.data_ptr<T>();
    sym_drive<T>(o, [&](int64_t r0, int64_t br, int64_t c0, int64_t bc, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, auto&& row_of,
                        SymScratch<T>& sc) {
      std::fill_n(sc.c1.data(), bc, T(0));
      std::fill_n(sc.c2.data(), bc, T(0));
      for (int64_t a = 0; a < br; ++a) {
        const int64_t i = r0 + a;
        sym_sp_fwd_row(o.mode, row_of(a), sc_, ep[i], ep + c0, sc.c1.data(), sc.c2.data(),
                       spp[i], rp[i]);
      }
      for (int64_t b = 0; b < bc; ++b) {
        spp[c0 + b] += sc.c1[b];
        rp[c0 + b] += sc.c2[b];
      }
    });
  });
  return {sp, r};
}

at::Tensor sym_sp_bwd(const at::Tensor& g_sp, const at::Tensor& z, const at::Tensor& lab,
                      const at::Tensor& eta, double scale, bool multilabel,
                      const OptTensor& pos_weight) {
  const Operands o = prepare_sym("sym_sp_bwd", z, lab, multilabel, pos_weight);
  check_stat("sym_sp_bwd", "g_sp", g_sp, z);
  check_stat("sym_sp_bwd", "eta", eta, z);
  const at::Tensor gs = g_sp.detach().contiguous(), et = eta.detach().contiguous();
  at::Tensor dz = at::zeros({o.n, o.d}, o.q.options());
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "flashcon_sym_sp_bwd_cpu", [&] {
    using T = scalar_t;
    const T sc_ = static_cast<T>(scale);
    const T* gp = gs.data_ptr<T>();
    const T* ep = et.data_ptr<T>();
    sym_drive<T>(o, [&](int64_t r0, int64_t br, int64_t c0, int64_t bc, const at::Tensor& s,
                        const at::Tensor& zi, const at::Tensor& zj, auto&& row_of,
                        SymScratch<T>&) {
      for (int64_t a = 0; a < br; ++a) {
        const int64_t i = r0 + a;
        sym_sp_bwd_row(o.mode, row_of(a), sc_, gp[i], ep[i], gp + c0, ep + c0);
      }
      sym_apply(dz, r0, br, c0, bc, s, zi, zj);
    });
  });
  return dz.to(z.scalar_type());
}

}  // namespace cpu
}  // namespace flashcon
