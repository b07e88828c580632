// The backward kernels' shared part and the streamed backward kernel (kernels.cuh).
#pragma once

#include "common.cuh"

namespace flashcon {
namespace cuda {

// ---- backward ------------------------------------------------------------------------------
// TRANS = false: rows are anchors (output dq), tiles stream over columns of k.
// TRANS = true:  rows are columns of k (output dk), tiles stream over anchors of q.
// SYM (q = k = z, qlab = klab, self_offset = 0; TRANS = false): output dz = dq + dk in one
//   launch, dz_a = Σ_b (G_ab + G_ba)·z_b: S_ab = S_ba serves both terms, so S is computed once
//   per tile instead of once in each of two launches.

// Per-pair gradient G_ij of anchor i (statistics a, b, c) and column j.
template <int MODE>
__device__ __forceinline__ float pair_grad(const Params& p, int64_t i, int64_t j, int64_t li,
                                           int64_t lj, float s, float a, float b, float c) {
  const bool excl = tm::is_self(i, j, p.self_offset);
  float w, lw;
  pair_weight(p, i, j, li, lj, w, lw);
  if (MODE == kLse)
    return tm::lse_pair_grad(s, w, lw, excl, a, b, c, p.scale, p.lw_pos, p.lw_neg, p.lk1,
                             p.has_k1);
  return tm::sp_pair_grad(s, tm::pos_mass(w, excl), a, b, p.scale);
}

// Statistics of anchor ia into slot t: lse op g_lse, finite lse, g_psum; sp op g_sp, eta
// (zeros past the last anchor).
template <int MODE>
__device__ __forceinline__ void load_stats(const Params& p, int t, int64_t ia, bool ok, float* a,
                                           float* b, float* c) {
  a[t] = ok ? p.g_lse[ia] : 0.f;
  if (MODE == kLse) {
    b[t] = ok ? tm::finite_or_zero(p.lse[ia]) : 0.f;
    c[t] = ok ? p.g_psum[ia] : 0.f;
  } else {
    b[t] = ok ? p.eta[ia] : 0.f;
    c[t] = 0.f;
  }
}

// The backward's operands: the output's rows and the tiles' columns, and their counts.
template <typename T>
struct BwdOperands {
  const T* rows_x;
  const T* cols_x;
  int64_t n_rows, n_cols;
};

template <typename T, bool TRANS>
__device__ __forceinline__ BwdOperands<T> bwd_operands(const Params& p) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  return {TRANS ? k : q, TRANS ? q : k, TRANS ? p.m : p.n, TRANS ? p.n : p.m};
}

// Labels of the row block (threads < 64), once per CTA.
template <bool TRANS, typename SM>
__device__ __forceinline__ void bwd_row_labels(const Params& p, SM& sm, int64_t r0,
                                               int64_t n_rows) {
  if (threadIdx.x < kBM) {
    const int64_t g = r0 + threadIdx.x;
    sm.lab_r[threadIdx.x] = g < n_rows ? (TRANS ? p.klab[g] : p.qlab[g]) : 0;
  }
}

// The tile's column labels and the anchors' statistics (threads < 64): the rows' (the tile's
// columns' when TRANS) in row_*, and for SYM the columns' too, in col_*.
template <int MODE, bool TRANS, bool SYM, typename SM>
__device__ __forceinline__ void bwd_tile_stats(const Params& p, SM& sm, int64_t r0, int64_t c0,
                                               int64_t n_cols) {
  if (threadIdx.x < kBN) {
    const int t = threadIdx.x;
    const int64_t g = c0 + t;
    const bool ok = g < n_cols;
    sm.lab_c[t] = ok ? (TRANS ? p.qlab[g] : p.klab[g]) : 0;
    const int64_t ia = TRANS ? g : r0 + t;
    load_stats<MODE>(p, t, ia, ia < p.n, sm.row_a, sm.row_b, sm.row_c);
    if (SYM) load_stats<MODE>(p, t, g, ok, sm.col_a, sm.col_b, sm.col_c);
  }
}

// G of the tile from S (sm.s), once per tile: in place (float32), or into sm.p in the input
// dtype for the tensor-core product. Zero outside [n_rows) × [n_cols).
template <typename T, int MODE, bool TRANS, bool SYM, typename SM>
__device__ __forceinline__ void bwd_tile_grad(const Params& p, SM& sm, int64_t r0, int64_t c0,
                                              int64_t n_rows, int64_t n_cols) {
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int a = e / kBN, b = e % kBN;
    const int64_t ga = r0 + a, gb = c0 + b;
    const int64_t i = TRANS ? gb : ga, j = TRANS ? ga : gb;
    const int si = TRANS ? b : a;  // index of anchor i in the statistics arrays
    float g = 0.f;
    if (ga < n_rows && gb < n_cols) {
      const float sv = sm.s[a][b];
      // Labels of anchor i and column j (the tile's rows are columns of k when TRANS).
      const int64_t li = TRANS ? sm.lab_c[b] : sm.lab_r[a];
      const int64_t lj = TRANS ? sm.lab_r[a] : sm.lab_c[b];
      g = pair_grad<MODE>(p, i, j, li, lj, sv, sm.row_a[si], sm.row_b[si], sm.row_c[si]);
      if (SYM) g += pair_grad<MODE>(p, j, i, lj, li, sv, sm.col_a[b], sm.col_b[b], sm.col_c[b]);
    }
    if constexpr (IsFloat<T>::value) {
      sm.s[a][b] = g;
    } else {
      sm.p[a][b] = from_f<T>(g);
    }
  }
}

// Write a 16-bit CTA's accumulator chunk (rows r0..., D columns dv...) through sm.s. Starts
// and ends with a barrier (sm.s is free before, and read by every thread after).
template <typename T, typename SM>
__device__ __forceinline__ void bwd_store_chunk(const Params& p, SM& sm, const AccFrag (&acc)[4],
                                                int64_t r0, int64_t n_rows, int64_t dv) {
  __syncthreads();
  store_acc(sm.s, acc);
  __syncthreads();
  T* out = static_cast<T*>(p.grad);
  for (int e = threadIdx.x; e < kBM * kBD; e += kThreads) {
    const int a = e / kBD, c = e % kBD;
    const int64_t gr = r0 + a, gc = dv + c;
    if (gr < n_rows && gc < p.d) out[gr * p.d + gc] = from_f<T>(sm.s[a][c]);
  }
}

// The streamed backward: the CTA's output is rows [r0, r0 + 64) × D columns
// [dv0, dv0 + 64·NCH); A and B stream through the staging slices, V_h through sm.u.v.
template <typename T, int MODE, bool TRANS, bool SYM, int NCH>
__global__ void __launch_bounds__(kThreads, 2) bwd_kernel(Params p) {
  using G = Geo<T>;
  FLASHCON_SMEM(Smem<T>, sm);
  const auto [rows_x, cols_x, n_rows, n_cols] = bwd_operands<T, TRANS>(p);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t dv0 = static_cast<int64_t>(blockIdx.y) * (kBD * NCH);
  const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
  const int warp = threadIdx.x / 32;
  float acc[NCH][4][8];
  AccFrag facc[NCH][4];
  if constexpr (G::kF32) {
#pragma unroll
    for (int h = 0; h < NCH; ++h)
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b) acc[h][a][b] = 0.f;
  } else {
#pragma unroll
    for (int h = 0; h < NCH; ++h)
#pragma unroll
      for (int b = 0; b < 4; ++b) nvcuda::wmma::fill_fragment(facc[h][b], 0.f);
  }
  bwd_row_labels<TRANS>(p, sm, r0, n_rows);
  for (int64_t c0 = 0; c0 < n_cols; c0 += kBN) {
    bwd_tile_stats<MODE, TRANS, SYM>(p, sm, r0, c0, n_cols);
    tile_product(sm, rows_x, n_rows, cols_x, n_cols, p.d, r0, c0, p.vec);
    bwd_tile_grad<T, MODE, TRANS, SYM>(p, sm, r0, c0, n_rows, n_cols);
    // acc[h] += G · V_h, V_h = the tile's vectors, D columns [dv0 + 64h, dv0 + 64h + 64).
#pragma unroll
    for (int h = 0; h < NCH; ++h) {
      const int64_t dv = dv0 + h * kBD;
      if (dv >= p.d) break;
      if (h > 0) __syncthreads();  // every warp is done with V_{h-1}
      stage<T, kBD>(sm.u.v, cols_x, n_cols, p.d, c0, dv, p.vec);
      __syncthreads();
      if constexpr (G::kF32) {
#pragma unroll 4
        for (int kk = 0; kk < kBN; ++kk) {
          float gv[4], vv[8];
#pragma unroll
          for (int a = 0; a < 4; ++a) gv[a] = sm.s[ty * 4 + a][kk];
#pragma unroll
          for (int b = 0; b < 8; ++b) vv[b] = sm.u.v[kk][tx + 8 * b];
#pragma unroll
          for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int b = 0; b < 8; ++b) acc[h][a][b] = fmaf(gv[a], vv[b], acc[h][a][b]);
        }
      } else {
        mma_ab(facc[h], &sm.p[warp * 16][0], G::kPLd, &sm.u.v[0][0], G::kVLd);
      }
    }
    __syncthreads();
  }
  // Write the 64 × (64·NCH) output block.
#pragma unroll
  for (int h = 0; h < NCH; ++h) {
    const int64_t dv = dv0 + h * kBD;
    if (dv >= p.d) break;
    if constexpr (G::kF32) {
      T* out = static_cast<T*>(p.grad);
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          const int64_t gr = r0 + ty * 4 + a, gc = dv + tx + 8 * b;
          if (gr < n_rows && gc < p.d) out[gr * p.d + gc] = acc[h][a][b];
        }
    } else {
      bwd_store_chunk<T>(p, sm, facc[h], r0, n_rows, dv);
    }
  }
}

}  // namespace cuda
}  // namespace flashcon
