// The forward kernels' shared part and the streamed forward kernel (kernels.cuh).
#pragma once

#include "common.cuh"

namespace flashcon {
namespace cuda {

// ---- forward: lse op (MODE kLse) and softplus pass (MODE kSp) ------------------------------
// Per-thread state of the forward: row i = r0 + threadIdx/2, the half of each tile's columns
// this thread takes, and its running statistics (a1, a2: psum, pcnt | sp, r).
struct FwdRow {
  int r, half;
  int64_t i, ql;
  bool ok;
  float eta, m, sum, a1, a2;
};

template <int MODE>
__device__ __forceinline__ FwdRow fwd_row(const Params& p, int64_t r0) {
  FwdRow x;
  x.r = threadIdx.x / 2;
  x.half = threadIdx.x % 2;
  x.i = r0 + x.r;
  x.ok = x.i < p.n;
  x.ql = x.ok ? p.qlab[x.i] : 0;
  x.eta = (MODE == kSp && x.ok) ? p.eta[x.i] : 0.f;
  x.m = tm::neg_inf<float>();
  x.sum = x.a1 = x.a2 = 0.f;
  return x;
}

// Column labels of the tile at c0 into lab (threads < 64).
__device__ __forceinline__ void load_col_labels(const int64_t* lab, int64_t n, int64_t c0,
                                                int64_t* dst) {
  if (threadIdx.x < kBN) {
    const int64_t j = c0 + threadIdx.x;
    dst[threadIdx.x] = j < n ? lab[j] : 0;
  }
}

// Fold the tile of similarities s (columns c0...) into the thread's half-row.
template <int MODE>
__device__ __forceinline__ void fwd_tile(const Params& p, const float (*s)[kBN + kSPad],
                                         const int64_t* lab_c, int64_t c0, FwdRow& x) {
  if (!x.ok) return;
  const int64_t i = x.i;
  if constexpr (MODE == kLse) {
    // One sweep evaluates each pair's exponent (kept in t) and the tile's max; the second sums
    // the terms relative to the new running max. TCL's k1 terms are recomputed there.
    float t[32];
    float mt = tm::neg_inf<float>();
#pragma unroll
    for (int cc = 0; cc < 32; ++cc) {
      const int c = x.half * 32 + cc;
      const int64_t j = c0 + c;
      float tv = tm::neg_inf<float>();
      if (j < p.m) {
        const float sv = s[x.r][c];
        const bool excl = tm::is_self(i, j, p.self_offset);
        float w, lw;
        pair_weight(p, i, j, x.ql, lab_c[c], w, lw);
        const float mm = tm::pos_mass(w, excl);
        x.a1 += mm * sv;
        x.a2 += mm;
        tv = tm::lse_term(sv, w, lw, excl, p.scale, p.lw_pos, p.lw_neg);
        if (p.has_k1) mt = fmaxf(mt, tm::k1_term(sv, w, lw, excl, p.lk1));
      }
      t[cc] = tv;
      mt = fmaxf(mt, tv);
    }
    if (mt != tm::neg_inf<float>()) {
      const float mn = fmaxf(x.m, mt);
      float acc = 0.f;
#pragma unroll
      for (int cc = 0; cc < 32; ++cc) acc += tm::fexp(t[cc] - mn);
      if (p.has_k1) {
        for (int cc = 0; cc < 32; ++cc) {
          const int c = x.half * 32 + cc;
          const int64_t j = c0 + c;
          if (j >= p.m) break;
          const bool excl = tm::is_self(i, j, p.self_offset);
          float w, lw;
          pair_weight(p, i, j, x.ql, lab_c[c], w, lw);
          acc += tm::fexp(tm::k1_term(s[x.r][c], w, lw, excl, p.lk1) - mn);
        }
      }
      x.sum = tm::lse_rescale(x.m, x.sum, mn) + acc;
      x.m = mn;
    }
  } else {
    for (int c = x.half * 32; c < x.half * 32 + 32; ++c) {
      const int64_t j = c0 + c;
      if (j >= p.m) break;
      const bool excl = tm::is_self(i, j, p.self_offset);
      float w, lw;
      pair_weight(p, i, j, x.ql, lab_c[c], w, lw);
      const float mm = tm::pos_mass(w, excl);
      if (mm != 0.f) {
        const float arg = tm::sp_arg(s[x.r][c], x.eta, p.scale);
        x.a1 += mm * tm::softplus(arg);
        x.a2 += mm * tm::sigmoid(arg);
      }
    }
  }
}

// Merge the two half-rows (threads 2r and 2r+1 share a warp) and write the row's outputs.
template <int MODE>
__device__ __forceinline__ void fwd_finish(const Params& p, FwdRow& x) {
  const float m2 = __shfl_xor_sync(0xffffffffu, x.m, 1);
  const float sum2 = __shfl_xor_sync(0xffffffffu, x.sum, 1);
  x.a1 += __shfl_xor_sync(0xffffffffu, x.a1, 1);
  x.a2 += __shfl_xor_sync(0xffffffffu, x.a2, 1);
  if (MODE == kLse) tm::lse_merge(x.m, x.sum, m2, sum2);
  if (x.ok && x.half == 0) {
    if (MODE == kLse) {
      p.out0[x.i] = tm::lse_finish(x.m, x.sum);
      p.out1[x.i] = x.a1;
      p.out2[x.i] = x.a2;
    } else {
      p.out0[x.i] = x.a1;
      p.out1[x.i] = x.a2;
    }
  }
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(Params p) {
  FLASHCON_SMEM(Smem<T>, sm);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  FwdRow x = fwd_row<MODE>(p, r0);
  for (int64_t c0 = 0; c0 < p.m; c0 += kBN) {
    load_col_labels(p.klab, p.m, c0, sm.lab_c);
    tile_product(sm, q, p.n, k, p.m, p.d, r0, c0, p.vec);
    fwd_tile<MODE>(p, sm.s, sm.lab_c, c0, x);
    __syncthreads();
  }
  fwd_finish<MODE>(p, x);
}

}  // namespace cuda
}  // namespace flashcon
