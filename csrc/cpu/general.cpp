// The general (rectangular) path of the CPU kernels: the ops lse_fwd, lse_bwd, sp_fwd and
// sp_bwd for any q [N, D], k [M, D] and self_offset (engine_cpu.h says what the files share).
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
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "engine_cpu.h"

namespace flashcon {
namespace cpu {
namespace {

// Tile shape: kRows anchors × kCols columns (kRows·kCols·4 B = 256 KiB of S per thread).
constexpr int64_t kRows = 128;
constexpr int64_t kCols = 512;

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

// The softplus pass on prepared operands: sp, r and dq, dk in the statistics dtype.
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

}  // namespace

// ---- ops -----------------------------------------------------------------------------------

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

std::tuple<at::Tensor, at::Tensor> sp_fwd(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& qlab, const at::Tensor& klab,
                                          const at::Tensor& eta, int64_t self_offset,
                                          double scale, bool multilabel,
                                          const OptTensor& pos_weight) {
  const Operands o = prepare("sp_fwd", q, k, qlab, klab, multilabel, pos_weight);
  check_stat("sp_fwd", "eta", eta, q);
  return sp_fwd_impl(o, eta, self_offset, scale);
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

}  // namespace cpu
}  // namespace flashcon
