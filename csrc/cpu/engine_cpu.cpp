// CPU kernels of the flashcon:: ops: the streaming engine of python/flashcon/engine.py.
//
// Tiling. Anchor rows are split into blocks of kRows, handed to threads by at::parallel_for;
// each block streams over column tiles of kCols. A tile of similarities S = Q_blk·K_tileᵀ is
// one BLAS product (at::mm_out on the tile: MKL/OpenBLAS, single-threaded inside the parallel
// region), written to a per-thread kRows×kCols buffer; the epilogue of each of its rows runs the
// shared per-pair math of flashcon/tile_math.h in place. Nothing N×M exists: the extra memory
// is the tile buffers, plus in the backward one M×D partial dK per extra thread.
//
// Forward: an online (max-shifted) log-sum-exp per row, in float32 (float64 for float64
// inputs); psum and pcnt ride along. Backward: recompute S, form G in place, then
// dQ_blk += G·K_tile and dK_tile += Gᵀ·Q_blk (two more BLAS products). dK is accumulated per
// chunk of row blocks: the chunks are fixed by (N, thread count) and each has its own
// accumulator, summed in chunk order at the end, so results are bitwise reproducible at a
// fixed thread count. float16/bfloat16 inputs are converted to float32 once (O(N·D)).
//
// Vectorisation: the row epilogues are compiled for AVX-512, AVX2 and baseline x86-64
// (function multi-versioning picks one at load time). Their reductions run over fixed lane
// arrays so the compiler can vectorise them without reassociating sums (-ffast-math is not
// used); the float exponential is tile_math's polynomial, which vectorises where libm's does not.
//
// Positive weights (contract v2): each row epilogue is instantiated for class labels, int64
// label bitmasks and a [Bq, Bk] pos_weight matrix (read per tile through the row's slice and
// the column indices j mod Bk; its logarithm is taken once, O(Bq·Bk)).
//
// The symmetric 'all'-mode ops (sym_*) are at the end of this file: tile pairs computed once,
// a static exponential shift, and a round-robin schedule that needs no dZ copies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "flashcon/checks.h"
#include "flashcon/tile_math.h"

namespace flashcon {
namespace cpu {
namespace {

namespace tm = flashcon::tile_math;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define FLASHCON_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FLASHCON_CLONES
#endif
#define FLASHCON_INLINE inline __attribute__((always_inline))
#define FLASHCON_INLINE_LAMBDA __attribute__((always_inline))

// Tile shape: kRows anchors × kCols columns (kRows·kCols·4 B = 256 KiB of S per thread).
constexpr int64_t kRows = 128;
constexpr int64_t kCols = 512;

template <typename T>
constexpr int lanes() {
  return 64 / sizeof(T);  // one AVX-512 register
}

template <typename T>
struct LseParams {
  T scale, lw_pos, lw_neg, lk1;
  bool has_k1;
};

// Row r of a tile: its similarities s[0, n) (overwritten), the column labels and the row label
// (kLabels / kMultiLabel), or the row's slice of pos_weight and its logarithm with the column
// indices j mod Bk (kPosWeight), and the row's own column inside the tile (-1 when it is not in
// this tile).
template <typename T>
struct TileRow {
  T* s;
  int64_t n;
  const int64_t* kl;
  int64_t ql;
  const T* pw;
  const T* lpw;
  const int64_t* jk;
  int64_t self_j;
};

// m_ij and log m_ij of column c (log m is only used where m > 0; 0 for label positives).
template <int MODE, typename T>
FLASHCON_INLINE void pair_weight(const TileRow<T>& r, int64_t c, T& m, T& logm) {
  if constexpr (MODE == tm::kPosWeight) {
    const int64_t x = r.jk[c];
    m = r.pw[x];
    logm = r.lpw[x];
  } else {
    m = tm::label_weight<T>(r.ql, r.kl[c], MODE == tm::kMultiLabel);
    logm = T(0);
  }
}

// Instantiates BODY for the positive-weight mode known at run time (inside one clone).
#define FLASHCON_MODE_SWITCH(mode, BODY)        \
  switch (mode) {                               \
    case tm::kLabels: {                         \
      constexpr int MODE = tm::kLabels;         \
      BODY;                                     \
      break;                                    \
    }                                           \
    case tm::kMultiLabel: {                     \
      constexpr int MODE = tm::kMultiLabel;     \
      BODY;                                     \
      break;                                    \
    }                                           \
    default: {                                  \
      constexpr int MODE = tm::kPosWeight;      \
      BODY;                                     \
      break;                                    \
    }                                           \
  }

// ---- forward: online masked log-sum-exp ----------------------------------------------------
template <int MODE, typename T>
FLASHCON_INLINE void lse_fwd_row_impl(const TileRow<T>& row, T* t1, const LseParams<T>& p, T& m,
                                      T& sum, T& psum, T& pcnt) {
  constexpr int W = lanes<T>();
  T* s = row.s;
  const int64_t n = row.n;
  // Pass 1: exponents of every term (in place), the tile's max, psum and pcnt.
  T mx[W], ps[W], pc[W];
  for (int l = 0; l < W; ++l) mx[l] = tm::neg_inf<T>(), ps[l] = T(0), pc[l] = T(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    for (int l = 0; l < W; ++l) {
      const int64_t c = j + l;
      const T v = s[c];
      T w, lw;
      pair_weight<MODE>(row, c, w, lw);
      const bool excl = c == row.self_j;
      const T mm = tm::pos_mass(w, excl);
      ps[l] += mm * v;
      pc[l] += mm;
      T t = tm::lse_term(v, w, lw, excl, p.scale, p.lw_pos, p.lw_neg);
      if (p.has_k1) {
        const T u = tm::k1_term(v, w, lw, excl, p.lk1);
        t1[c] = u;
        mx[l] = u > mx[l] ? u : mx[l];
      }
      s[c] = t;
      mx[l] = t > mx[l] ? t : mx[l];
    }
  }
  T m_tile = tm::neg_inf<T>(), ps_t = T(0), pc_t = T(0);
  for (int l = 0; l < W; ++l) {
    m_tile = mx[l] > m_tile ? mx[l] : m_tile;
    ps_t += ps[l];
    pc_t += pc[l];
  }
  for (; j < n; ++j) {
    const T v = s[j];
    T w, lw;
    pair_weight<MODE>(row, j, w, lw);
    const bool excl = j == row.self_j;
    const T mm = tm::pos_mass(w, excl);
    ps_t += mm * v;
    pc_t += mm;
    const T t = tm::lse_term(v, w, lw, excl, p.scale, p.lw_pos, p.lw_neg);
    if (p.has_k1) {
      t1[j] = tm::k1_term(v, w, lw, excl, p.lk1);
      m_tile = t1[j] > m_tile ? t1[j] : m_tile;
    }
    s[j] = t;
    m_tile = t > m_tile ? t : m_tile;
  }
  psum += ps_t;
  pcnt += pc_t;
  if (m_tile == tm::neg_inf<T>()) return;  // no term in this tile
  // Pass 2: Σ e^{t - m_new}, m_new the running max.
  const T m_new = m_tile > m ? m_tile : m;
  T acc[W];
  for (int l = 0; l < W; ++l) acc[l] = T(0);
  j = 0;
  for (; j + W <= n; j += W) {
    for (int l = 0; l < W; ++l) {
      T e = tm::fexp(s[j + l] - m_new);
      if (p.has_k1) e += tm::fexp(t1[j + l] - m_new);
      acc[l] += e;
    }
  }
  T acc_t = T(0);
  for (int l = 0; l < W; ++l) acc_t += acc[l];
  for (; j < n; ++j) {
    acc_t += tm::fexp(s[j] - m_new);
    if (p.has_k1) acc_t += tm::fexp(t1[j] - m_new);
  }
  sum = tm::lse_rescale(m, sum, m_new) + acc_t;
  m = m_new;
}

template <typename T>
FLASHCON_INLINE void lse_fwd_row_any(int mode, const TileRow<T>& row, T* t1,
                                     const LseParams<T>& p, T& m, T& sum, T& psum, T& pcnt) {
  FLASHCON_MODE_SWITCH(mode, (lse_fwd_row_impl<MODE>(row, t1, p, m, sum, psum, pcnt)))
}

FLASHCON_CLONES void lse_fwd_row(int mode, const TileRow<float>& row, float* t1,
                                 const LseParams<float>& p, float& m, float& sum, float& psum,
                                 float& pcnt) {
  lse_fwd_row_any(mode, row, t1, p, m, sum, psum, pcnt);
}
FLASHCON_CLONES void lse_fwd_row(int mode, const TileRow<double>& row, double* t1,
                                 const LseParams<double>& p, double& m, double& sum,
                                 double& psum, double& pcnt) {
  lse_fwd_row_any(mode, row, t1, p, m, sum, psum, pcnt);
}

// ---- backward of the lse op: G in place ----------------------------------------------------
template <bool kHasK1, int MODE, typename T>
FLASHCON_INLINE void lse_bwd_row_impl(const TileRow<T>& row, const LseParams<T>& p, T g_lse, T l,
                                      T g_psum) {
  T* s = row.s;
  const int64_t self_j = row.self_j;
  for (int64_t j = 0; j < row.n; ++j) {
    T w, lw;
    pair_weight<MODE>(row, j, w, lw);
    s[j] = tm::lse_pair_grad(s[j], w, lw, j == self_j, g_lse, l, g_psum, p.scale, p.lw_pos,
                             p.lw_neg, p.lk1, kHasK1);
  }
}

template <typename T>
FLASHCON_INLINE void lse_bwd_row_any(int mode, const TileRow<T>& row, const LseParams<T>& p,
                                     T g_lse, T l, T g_psum) {
  if (p.has_k1) {
    FLASHCON_MODE_SWITCH(mode, (lse_bwd_row_impl<true, MODE>(row, p, g_lse, l, g_psum)))
  } else {
    FLASHCON_MODE_SWITCH(mode, (lse_bwd_row_impl<false, MODE>(row, p, g_lse, l, g_psum)))
  }
}

FLASHCON_CLONES void lse_bwd_row(int mode, const TileRow<float>& row, const LseParams<float>& p,
                                 float g_lse, float l, float g_psum) {
  lse_bwd_row_any(mode, row, p, g_lse, l, g_psum);
}
FLASHCON_CLONES void lse_bwd_row(int mode, const TileRow<double>& row,
                                 const LseParams<double>& p, double g_lse, double l,
                                 double g_psum) {
  lse_bwd_row_any(mode, row, p, g_lse, l, g_psum);
}

// ---- softplus pass (SINCERE) ---------------------------------------------------------------
template <int MODE, typename T>
FLASHCON_INLINE void sp_fwd_row_impl(const TileRow<T>& row, T eta, T scale, T& sp, T& r) {
  constexpr int W = lanes<T>();
  T a[W], b[W];
  for (int l = 0; l < W; ++l) a[l] = T(0), b[l] = T(0);
  int64_t j = 0;
  for (; j + W <= row.n; j += W) {
    for (int l = 0; l < W; ++l) {
      const int64_t c = j + l;
      T w, lw;
      pair_weight<MODE>(row, c, w, lw);
      const T mm = tm::pos_mass(w, c == row.self_j);
      const T x = tm::sp_arg(row.s[c], eta, scale);
      a[l] += mm != T(0) ? mm * tm::softplus(x) : T(0);
      b[l] += mm != T(0) ? mm * tm::sigmoid(x) : T(0);
    }
  }
  T at = T(0), bt = T(0);
  for (int l = 0; l < W; ++l) at += a[l], bt += b[l];
  for (; j < row.n; ++j) {
    T w, lw;
    pair_weight<MODE>(row, j, w, lw);
    const T mm = tm::pos_mass(w, j == row.self_j);
    const T x = tm::sp_arg(row.s[j], eta, scale);
    at += mm != T(0) ? mm * tm::softplus(x) : T(0);
    bt += mm != T(0) ? mm * tm::sigmoid(x) : T(0);
  }
  sp += at;
  r += bt;
}

template <int MODE, typename T>
FLASHCON_INLINE void sp_bwd_row_impl(const TileRow<T>& row, T g_sp, T eta, T scale) {
  for (int64_t j = 0; j < row.n; ++j) {
    T w, lw;
    pair_weight<MODE>(row, j, w, lw);
    row.s[j] = tm::sp_pair_grad(row.s[j], tm::pos_mass(w, j == row.self_j), g_sp, eta, scale);
  }
}

FLASHCON_CLONES void sp_fwd_row(int mode, const TileRow<float>& row, float eta, float scale,
                                float& sp, float& r) {
  FLASHCON_MODE_SWITCH(mode, (sp_fwd_row_impl<MODE>(row, eta, scale, sp, r)))
}
FLASHCON_CLONES void sp_fwd_row(int mode, const TileRow<double>& row, double eta, double scale,
                                double& sp, double& r) {
  FLASHCON_MODE_SWITCH(mode, (sp_fwd_row_impl<MODE>(row, eta, scale, sp, r)))
}
FLASHCON_CLONES void sp_bwd_row(int mode, const TileRow<float>& row, float g_sp, float eta,
                                float scale) {
  FLASHCON_MODE_SWITCH(mode, (sp_bwd_row_impl<MODE>(row, g_sp, eta, scale)))
}
FLASHCON_CLONES void sp_bwd_row(int mode, const TileRow<double>& row, double g_sp, double eta,
                                double scale) {
  FLASHCON_MODE_SWITCH(mode, (sp_bwd_row_impl<MODE>(row, g_sp, eta, scale)))
}

// ---- tiles ---------------------------------------------------------------------------------

// Operands in the compute dtype (float32 for half/bfloat16 inputs), labels as int64, and the
// positive weights (pos_weight in the statistics dtype and its logarithm) when given.
struct Operands {
  at::Tensor q, k, ql, kl, pw, lpw;
  int64_t n, m, d, bq = 1, bk = 1;
  int mode = tm::kLabels;
};

Operands prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& qlab,
                 const at::Tensor& klab, bool multilabel,
                 const std::optional<at::Tensor>& pos_weight) {
  const Problem pr = check_qk(op, q, k, qlab, klab, c10::DeviceType::CPU);
  const auto acc = stat_dtype(q.scalar_type());
  Operands o;
  // Detached: the ops sit below autograd (engine.py registers their gradients), and the tile
  // products below are plain ATen calls that must not record a graph.
  o.q = q.detach().to(acc).contiguous();
  const bool same = k.data_ptr() == q.data_ptr() && k.sizes() == q.sizes();
  o.k = same ? o.q : k.detach().to(acc).contiguous();
  o.ql = qlab.to(at::kLong).contiguous();
  o.kl = klab.to(at::kLong).contiguous();
  o.pw = prepare_pos_weight(op, pos_weight, q);
  o.lpw = log_pos_weight(o.pw);
  o.mode = pos_mode(multilabel, o.pw);
  if (o.pw.defined()) {
    o.bq = o.pw.size(0);
    o.bk = o.pw.size(1);
  }
  o.n = pr.n;
  o.m = pr.m;
  o.d = pr.d;
  return o;
}

// Visits every (row block, column tile) of rows [r_begin, r_end): computes S into `buf`
// (row-major [br, bc]) and calls row_fn(i, TileRow) for each row, then tile_fn(r0, br, c0, bc,
// S) once the rows are done (the backward's products).
template <typename T, typename RowFn, typename TileFn>
void stream_rows(const Operands& o, int64_t self_offset, int64_t r0, int64_t br, T* buf,
                 RowFn&& row_fn, TileFn&& tile_fn) {
  const auto opts = o.q.options();
  const at::Tensor qb = o.q.narrow(0, r0, br);
  const int64_t* ql = o.ql.data_ptr<int64_t>();
  const int64_t* kl = o.kl.data_ptr<int64_t>();
  const T* pw = o.pw.defined() ? o.pw.data_ptr<T>() : nullptr;
  const T* lpw = o.lpw.defined() ? o.lpw.data_ptr<T>() : nullptr;
  std::vector<int64_t> jk(o.mode == tm::kPosWeight ? kCols : 0);
  for (int64_t c0 = 0; c0 < o.m; c0 += kCols) {
    const int64_t bc = std::min(kCols, o.m - c0);
    at::Tensor s = at::from_blob(buf, {br, bc}, opts);
    const at::Tensor kt = o.k.narrow(0, c0, bc);
    if (o.d == 0) {
      s.zero_();
    } else {
      at::mm_out(s, qb, kt.t());
    }
    if (!jk.empty()) {
      for (int64_t c = 0; c < bc; ++c) jk[c] = (c0 + c) % o.bk;
    }
    for (int64_t r = 0; r < br; ++r) {
      const int64_t i = r0 + r;
      int64_t self_j = self_offset >= 0 ? i + self_offset - c0 : -1;
      if (self_j < 0 || self_j >= bc) self_j = -1;
      const int64_t prow = pw ? (i % o.bq) * o.bk : 0;
      row_fn(r, TileRow<T>{buf + r * bc, bc, kl + c0, ql[i], pw ? pw + prow : nullptr,
                           lpw ? lpw + prow : nullptr, jk.data(), self_j});
    }
    tile_fn(c0, bc, s, qb, kt);
  }
}

int64_t num_blocks(int64_t n) { return (n + kRows - 1) / kRows; }

template <typename T>
LseParams<T> lse_params(double scale, double w_pos, double w_neg, double k1) {
  return {static_cast<T>(scale), tm::log_weight<T>(w_pos), tm::log_weight<T>(w_neg),
          tm::log_weight<T>(k1), k1 > 0};
}

// ---- ops -----------------------------------------------------------------------------------

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_fwd_impl(const Operands& o,
                                                            int64_t self_offset, double scale,
                                                            double w_pos, double w_neg,
                                                            double k1) {
  at::Tensor lse = at::empty({o.n}, o.q.options());
  at::Tensor psum = at::empty({o.n}, o.q.options());
  at::Tensor pcnt = at::empty({o.n}, o.q.options());
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "flashcon_lse_fwd_cpu", [&] {
    using T = scalar_t;
    const auto p = lse_params<T>(scale, w_pos, w_neg, k1);
    T* lse_p = lse.data_ptr<T>();
    T* psum_p = psum.data_ptr<T>();
    T* pcnt_p = pcnt.data_ptr<T>();
    at::parallel_for(0, num_blocks(o.n), 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> buf(kRows * kCols), t1(p.has_k1 ? kCols : 0);
      std::vector<T> m(kRows), sum(kRows), ps(kRows), pc(kRows);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kRows, br = std::min(kRows, o.n - r0);
        std::fill(m.begin(), m.end(), tm::neg_inf<T>());
        std::fill(sum.begin(), sum.end(), T(0));
        std::fill(ps.begin(), ps.end(), T(0));
        std::fill(pc.begin(), pc.end(), T(0));
        stream_rows<T>(
            o, self_offset, r0, br, buf.data(),
            [&](int64_t r, const TileRow<T>& row) {
              lse_fwd_row(o.mode, row, t1.data(), p, m[r], sum[r], ps[r], pc[r]);
            },
            [](int64_t, int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&) {});
        for (int64_t r = 0; r < br; ++r) {
          lse_p[r0 + r] = tm::lse_finish(m[r], sum[r]);
          psum_p[r0 + r] = ps[r];
          pcnt_p[r0 + r] = pc[r];
        }
      }
    });
  });
  return {lse, psum, pcnt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_fwd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& qlab,
                                                       const at::Tensor& klab, int64_t self_offset,
                                                       double scale, double w_pos, double w_neg,
                                                       double k1, bool multilabel,
                                                       const OptTensor& pos_weight) {
  check_weights("lse_fwd", w_pos, w_neg, k1);
  const Operands o = prepare("lse_fwd", q, k, qlab, klab, multilabel, pos_weight);
  return lse_fwd_impl(o, self_offset, scale, w_pos, w_neg, k1);
}

// The backward driver shared by both ops: row_grad(i, TileRow) turns a row of S into G in place.
// Rows are split into `chunks` fixed ranges of row blocks; chunk c accumulates dK into its own
// buffer (chunk 0 straight into dk), summed in chunk order at the end.
template <typename T, typename RowGrad>
std::tuple<at::Tensor, at::Tensor> backward(const Operands& o, int64_t self_offset,
                                            RowGrad&& row_grad) {
  at::Tensor dq = at::zeros({o.n, o.d}, o.q.options());
  at::Tensor dk = at::zeros({o.m, o.d}, o.k.options());
  const int64_t nb = num_blocks(o.n);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(nb, at::get_num_threads()));
  at::Tensor parts = chunks > 1 ? at::zeros({chunks - 1, o.m, o.d}, o.k.options()) : at::Tensor();
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<T> buf(kRows * kCols);
    for (int64_t c = c_begin; c < c_end; ++c) {
      at::Tensor acc = c == 0 ? dk : parts.select(0, c - 1);
      for (int64_t b = c * nb / chunks; b < (c + 1) * nb / chunks; ++b) {
        const int64_t r0 = b * kRows, br = std::min(kRows, o.n - r0);
        at::Tensor dqb = dq.narrow(0, r0, br);
        stream_rows<T>(
            o, self_offset, r0, br, buf.data(),
            [&](int64_t r, const TileRow<T>& row) { row_grad(r0 + r, row); },
            [&](int64_t c0, int64_t bc, const at::Tensor& g, const at::Tensor& qb,
                const at::Tensor& kt) {
              if (o.d == 0) return;
              dqb.addmm_(g, kt);
              acc.narrow(0, c0, bc).addmm_(g.t(), qb);
            });
      }
    }
  });
  for (int64_t c = 1; c < chunks; ++c) dk.add_(parts.select(0, c - 1));
  return {dq, dk};
}

// dq, dk in the statistics dtype.
std::tuple<at::Tensor, at::Tensor> lse_bwd_impl(const Operands& o, const at::Tensor& g_lse,
                                                const at::Tensor& g_psum, const at::Tensor& lse,
                                                int64_t self_offset, double scale, double w_pos,
                                                double w_neg, double k1) {
  const at::Tensor gl = g_lse.detach().contiguous(), gp = g_psum.detach().contiguous();
  const at::Tensor ls = lse.detach().contiguous();
  at::Tensor dq, dk;
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "flashcon_lse_bwd_cpu", [&] {
    using T = scalar_t;
    const auto p = lse_params<T>(scale, w_pos, w_neg, k1);
    const T* glp = gl.data_ptr<T>();
    const T* gpp = gp.data_ptr<T>();
    const T* lsp = ls.data_ptr<T>();
    std::tie(dq, dk) = backward<T>(o, self_offset, [&](int64_t i, const TileRow<T>& row) {
      lse_bwd_row(o.mode, row, p, glp[i], tm::finite_or_zero(lsp[i]), gpp[i]);
    });
  });
  return {dq, dk};
}

std::tuple<at::Tensor, at::Tensor> lse_bwd(const at::Tensor& g_lse, const at::Tensor& g_psum,
                                           const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& qlab, const at::Tensor& klab,
                                           const at::Tensor& lse, int64_t self_offset,
                                           double scale, double w_pos, double w_neg, double k1,
                                           bool multilabel, const OptTensor& pos_weight) {
  check_weights("lse_bwd", w_pos, w_neg, k1);
  const Operands o = prepare("lse_bwd", q, k, qlab, klab, multilabel, pos_weight);
  check_stat("lse_bwd", "g_lse", g_lse, q);
  check_stat("lse_bwd", "g_psum", g_psum, q);
  check_stat("lse_bwd", "lse", lse, q);
  auto [dq, dk] = lse_bwd_impl(o, g_lse, g_psum, lse, self_offset, scale, w_pos, w_neg, k1);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> sp_fwd_impl(const Operands& o, const at::Tensor& eta,
                                               int64_t self_offset, double scale) {
  const at::Tensor et = eta.detach().contiguous();
  at::Tensor sp = at::zeros({o.n}, o.q.options());
  at::Tensor r = at::zeros({o.n}, o.q.options());
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "flashcon_sp_fwd_cpu", [&] {
    using T = scalar_t;
    const T* etp = et.data_ptr<T>();
    T* spp = sp.data_ptr<T>();
    T* rp = r.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    at::parallel_for(0, num_blocks(o.n), 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> buf(kRows * kCols);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kRows, br = std::min(kRows, o.n - r0);
        stream_rows<T>(
            o, self_offset, r0, br, buf.data(),
            [&](int64_t rr, const TileRow<T>& row) {
              const int64_t i = r0 + rr;
              sp_fwd_row(o.mode, row, etp[i], sc, spp[i], rp[i]);
            },
            [](int64_t, int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&) {});
      }
    });
  });
  return {sp, r};
}

std::tuple<at::Tensor, at::Tensor> sp_fwd(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& qlab, const at::Tensor& klab,
                                          const at::Tensor& eta, int64_t self_offset,
                                          double scale, bool multilabel,
                                          const OptTensor& pos_weight) {
  const Operands o = prepare("sp_fwd", q, k, qlab, klab, multilabel, pos_weight);
  check_stat("sp_fwd", "eta", eta, q);
  return sp_fwd_impl(o, eta, self_offset, scale);
}

std::tuple<at::Tensor, at::Tensor> sp_bwd_impl(const Operands& o, const at::Tensor& g_sp,
                                               const at::Tensor& eta, int64_t self_offset,
                                               double scale) {
  const at::Tensor gs = g_sp.detach().contiguous(), et = eta.detach().contiguous();
  at::Tensor dq, dk;
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "flashcon_sp_bwd_cpu", [&] {
    using T = scalar_t;
    const T* gsp = gs.data_ptr<T>();
    const T* etp = et.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    std::tie(dq, dk) = backward<T>(o, self_offset, [&](int64_t i, const TileRow<T>& row) {
      sp_bwd_row(o.mode, row, gsp[i], etp[i], sc);
    });
  });
  return {dq, dk};
}

std::tuple<at::Tensor, at::Tensor> sp_bwd(const at::Tensor& g_sp, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& qlab,
                                          const at::Tensor& klab, const at::Tensor& eta,
                                          int64_t self_offset, double scale, bool multilabel,
                                          const OptTensor& pos_weight) {
  const Operands o = prepare("sp_bwd", q, k, qlab, klab, multilabel, pos_weight);
  check_stat("sp_bwd", "g_sp", g_sp, q);
  check_stat("sp_bwd", "eta", eta, q);
  auto [dq, dk] = sp_bwd_impl(o, g_sp, eta, self_offset, scale);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type())};
}

// ---- symmetric path ('all' mode: q = k = z, self_offset = 0) -------------------------------
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

}  // namespace
}  // namespace cpu
}  // namespace flashcon

TORCH_LIBRARY_IMPL(flashcon, CPU, m) {
  m.impl("lse_fwd", &flashcon::cpu::lse_fwd);
  m.impl("lse_bwd", &flashcon::cpu::lse_bwd);
  m.impl("sp_fwd", &flashcon::cpu::sp_fwd);
  m.impl("sp_bwd", &flashcon::cpu::sp_bwd);
  m.impl("sym_lse_fwd", &flashcon::cpu::sym_lse_fwd);
  m.impl("sym_lse_bwd", &flashcon::cpu::sym_lse_bwd);
  m.impl("sym_sp_fwd", &flashcon::cpu::sym_sp_fwd);
  m.impl("sym_sp_bwd", &flashcon::cpu::sym_sp_bwd);
}
