// CUDA kernels of the flashcon:: ops: the streaming engine of python/flashcon/engine.py.
//
// Tiling. A CTA of 128 threads owns 64 rows; it streams over 64-column tiles. Each tile of
// similarities S = A·Bᵀ is built in shared memory from 64×32 slices of A and B staged through
// shared memory: with tensor cores (WMMA 16×16×16, fp32 accumulate) for float16/bfloat16, with
// a 4×8 register micro-tile of FMAs for float32. The per-pair math is flashcon/tile_math.h,
// the same functions the CPU kernels run.
//
// Forward (lse and softplus passes): one CTA per 64 anchors, two threads per row, each keeping
// an online max-shifted log-sum-exp (or the softplus/sigmoid sums) over half of every tile;
// the halves are merged with a shuffle at the end.
//
// Backward: dQ and dK are two launches of one kernel, each CTA owning a 64-row block of its
// output and a 64-wide slice of D, so no two CTAs write the same element: no atomics, and
// results are bitwise reproducible. The dQ launch recomputes S = Q_blk·K_tileᵀ, forms G in
// shared memory and accumulates G·K_tile; the dK launch recomputes Sᵀ = K_blk·Q_tileᵀ and
// accumulates Gᵀ·Q_tile. S is recomputed once per D slice (one slice for D <= 64).
//
// Positive weights (contract v2): class labels, int64 label bitmasks, or a [Bq, Bk] pos_weight
// matrix read per pair from global memory (cached; it is O(B²)), never expanded to N×M.
//
// Precision: products accumulate in float32; statistics are float32; float64 is not supported
// here (the CPU kernels and backend='torch' take it).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include "flashcon/checks.h"
#include "flashcon/tile_math.h"

namespace flashcon {
namespace cuda {
namespace {

namespace tm = flashcon::tile_math;

constexpr int kThreads = 128;
constexpr int kBM = 64;  // rows of a tile
constexpr int kBN = 64;  // columns of a tile
constexpr int kBK = 32;  // D slice staged per step
constexpr int kBD = 64;  // D slice of a backward CTA's output
constexpr int kSPad = 4;

enum Mode { kLse = 0, kSp = 1 };

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
struct IsFloat {
  static constexpr bool value = false;
};
template <>
struct IsFloat<float> {
  static constexpr bool value = true;
};

struct Params {
  const void* q;
  const void* k;
  const int64_t* qlab;
  const int64_t* klab;
  int64_t n, m, d, self_offset;
  float scale, lw_pos, lw_neg, lk1;
  bool has_k1;
  // Positive weights (tile_math.h PosMode): labels, label bitmasks, or pos_weight [bq, bk]
  // (float32) with its logarithm, read per pair (never expanded to N×M).
  int mode;
  const float* pw;
  const float* lpw;
  int64_t bq, bk;
  // lse op: g_lse, g_psum, lse; sp op: g_sp (in g_lse), eta.
  const float* g_lse;
  const float* g_psum;
  const float* lse;
  const float* eta;
  float* out0;
  float* out1;
  float* out2;
  void* grad;  // dq or dk, in the input dtype
};

// Shared memory of one CTA. The staging slices and the backward's V tile are never live at the
// same time, so they share storage.
template <typename T>
struct Smem {
  static constexpr int kLd = kBK + (IsFloat<T>::value ? 1 : 8);
  static constexpr int kVLd = kBD + (IsFloat<T>::value ? 4 : 8);
  float s[kBM][kBN + kSPad];
  union {
    struct {
      T a[kBM][kLd];
      T b[kBN][kLd];
    } stage;
    T v[kBN][kVLd];
  } u;
  // The backward's G in the input dtype for the tensor-core product (unused for float32).
  T p[IsFloat<T>::value ? 1 : kBM][kBN + 8];
  float row_a[kBM], row_b[kBM], row_c[kBM];
  int64_t lab_r[kBM], lab_c[kBN];
};

// m_ij and log m_ij of anchor i (label li) and column j (label lj).
__device__ __forceinline__ void pair_weight(const Params& p, int64_t i, int64_t j, int64_t li,
                                            int64_t lj, float& m, float& logm) {
  if (p.mode == tm::kPosWeight) {
    const int64_t x = (i % p.bq) * p.bk + j % p.bk;
    m = __ldg(p.pw + x);
    logm = __ldg(p.lpw + x);
  } else {
    m = tm::label_weight<float>(li, lj, p.mode == tm::kMultiLabel);
    logm = 0.f;
  }
}

// Stage rows [r0, r0+64) × cols [d0, d0+kBK) of x [rows, d] into dst (zero outside).
template <typename T, int LD>
__device__ __forceinline__ void stage(T (*dst)[LD], const T* x, int64_t rows, int64_t d,
                                      int64_t r0, int64_t d0) {
  for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
    const int r = e / kBK, c = e % kBK;
    const int64_t gr = r0 + r, gc = d0 + c;
    dst[r][c] = (gr < rows && gc < d) ? x[gr * d + gc] : from_f<T>(0.f);
  }
}

// s[r][c] = a_{r0+r} · b_{c0+c} over all of D.
template <typename T>
__device__ void tile_product(Smem<T>& sm, const T* a, int64_t a_rows, const T* b, int64_t b_rows,
                             int64_t d, int64_t r0, int64_t c0) {
  if constexpr (IsFloat<T>::value) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;  // 16 × 8 threads, 4 × 8 outputs each
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    for (int64_t d0 = 0; d0 < d; d0 += kBK) {
      stage(sm.u.stage.a, a, a_rows, d, r0, d0);
      stage(sm.u.stage.b, b, b_rows, d, c0, d0);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kBK; ++kk) {
        float av[4], bv[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = sm.u.stage.a[ty * 4 + i][kk];
#pragma unroll
        for (int j = 0; j < 8; ++j) bv[j] = sm.u.stage.b[tx + 8 * j][kk];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) sm.s[ty * 4 + i][tx + 8 * j] = acc[i][j];
  } else {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;  // warp w: rows [16w, 16w+16), all 64 columns
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.f);
    constexpr int ld = Smem<T>::kLd;
    for (int64_t d0 = 0; d0 < d; d0 += kBK) {
      stage(sm.u.stage.a, a, a_rows, d, r0, d0);
      stage(sm.u.stage.b, b, b_rows, d, c0, d0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sm.u.stage.a[warp * 16][kk], ld);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // Bᵀ as a column-major K×N operand: element (k, n) is b[n][k].
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, &sm.u.stage.b[j * 16][kk], ld);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      wmma::store_matrix_sync(&sm.s[warp * 16][j * 16], acc[j], kBN + kSPad, wmma::mem_row_major);
  }
  __syncthreads();
}

// ---- forward: lse op (MODE kLse) and softplus pass (MODE kSp) ------------------------------
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(Params p) {
  __shared__ Smem<T> sm;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int r = threadIdx.x / 2, half = threadIdx.x % 2;
  const int64_t i = r0 + r;
  const bool row_ok = i < p.n;
  const int64_t ql = row_ok ? p.qlab[i] : 0;
  const float eta = (MODE == kSp && row_ok) ? p.eta[i] : 0.f;
  float m = tm::neg_inf<float>(), sum = 0.f, a1 = 0.f, a2 = 0.f;  // a1, a2: psum, pcnt | sp, r
  for (int64_t c0 = 0; c0 < p.m; c0 += kBN) {
    if (threadIdx.x < kBN) {
      const int64_t j = c0 + threadIdx.x;
      sm.lab_c[threadIdx.x] = j < p.m ? p.klab[j] : 0;
    }
    tile_product(sm, q, p.n, k, p.m, p.d, r0, c0);
    if (row_ok) {
      float mt = tm::neg_inf<float>();
      for (int c = half * 32; c < half * 32 + 32; ++c) {
        const int64_t j = c0 + c;
        if (j >= p.m) break;
        const float s = sm.s[r][c];
        const bool excl = tm::is_self(i, j, p.self_offset);
        float w, lw;
        pair_weight(p, i, j, ql, sm.lab_c[c], w, lw);
        const float mm = tm::pos_mass(w, excl);
        if (MODE == kLse) {
          a1 += mm * s;
          a2 += mm;
          float t = tm::lse_term(s, w, lw, excl, p.scale, p.lw_pos, p.lw_neg);
          if (p.has_k1) {
            const float u = tm::k1_term(s, w, lw, excl, p.lk1);
            mt = fmaxf(mt, u);
          }
          mt = fmaxf(mt, t);
        } else if (mm != 0.f) {
          const float x = tm::sp_arg(s, eta, p.scale);
          a1 += mm * tm::softplus(x);
          a2 += mm * tm::sigmoid(x);
        }
      }
      if (MODE == kLse && mt != tm::neg_inf<float>()) {
        // Second sweep over the same half-row: the terms relative to the new running max.
        const float mn = fmaxf(m, mt);
        float acc = 0.f;
        for (int c = half * 32; c < half * 32 + 32; ++c) {
          const int64_t j = c0 + c;
          if (j >= p.m) break;
          const float s = sm.s[r][c];
          const bool excl = tm::is_self(i, j, p.self_offset);
          float w, lw;
          pair_weight(p, i, j, ql, sm.lab_c[c], w, lw);
          acc += tm::fexp(tm::lse_term(s, w, lw, excl, p.scale, p.lw_pos, p.lw_neg) - mn);
          if (p.has_k1) acc += tm::fexp(tm::k1_term(s, w, lw, excl, p.lk1) - mn);
        }
        sum = tm::lse_rescale(m, sum, mn) + acc;
        m = mn;
      }
    }
    __syncthreads();
  }
  // Merge the two half-rows (threads 2r and 2r+1 share a warp).
  const float m2 = __shfl_xor_sync(0xffffffffu, m, 1);
  const float sum2 = __shfl_xor_sync(0xffffffffu, sum, 1);
  a1 += __shfl_xor_sync(0xffffffffu, a1, 1);
  a2 += __shfl_xor_sync(0xffffffffu, a2, 1);
  if (MODE == kLse) tm::lse_merge(m, sum, m2, sum2);
  if (row_ok && half == 0) {
    if (MODE == kLse) {
      p.out0[i] = tm::lse_finish(m, sum);
      p.out1[i] = a1;
      p.out2[i] = a2;
    } else {
      p.out0[i] = a1;
      p.out1[i] = a2;
    }
  }
}

// ---- backward ------------------------------------------------------------------------------
// TRANS = false: rows are anchors (output dq), tiles stream over columns of k.
// TRANS = true:  rows are columns of k (output dk), tiles stream over anchors of q.
template <typename T, int MODE, bool TRANS>
__global__ void __launch_bounds__(kThreads, 1) bwd_kernel(Params p) {
  __shared__ Smem<T> sm;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* rows_x = TRANS ? k : q;
  const T* cols_x = TRANS ? q : k;
  const int64_t n_rows = TRANS ? p.m : p.n, n_cols = TRANS ? p.n : p.m;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t dv0 = static_cast<int64_t>(blockIdx.y) * kBD;
  const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
  const int warp = threadIdx.x / 32;
  float acc[4][8];
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> facc[4];
  if constexpr (IsFloat<T>::value) {
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b) acc[a][b] = 0.f;
  } else {
#pragma unroll
    for (int b = 0; b < 4; ++b) nvcuda::wmma::fill_fragment(facc[b], 0.f);
  }
  if (threadIdx.x < kBM) {
    const int64_t g = r0 + threadIdx.x;
    sm.lab_r[threadIdx.x] = g < n_rows ? (TRANS ? p.klab[g] : p.qlab[g]) : 0;
  }
  for (int64_t c0 = 0; c0 < n_cols; c0 += kBN) {
    if (threadIdx.x < kBN) {
      const int64_t g = c0 + threadIdx.x;
      const bool ok = g < n_cols;
      sm.lab_c[threadIdx.x] = ok ? (TRANS ? p.qlab[g] : p.klab[g]) : 0;
      // Per-anchor statistics of the tile's anchors (the rows, or the columns when TRANS).
      const int64_t ia = TRANS ? g : r0 + threadIdx.x;
      const bool ia_ok = ia < p.n;
      if (MODE == kLse) {
        sm.row_a[threadIdx.x] = ia_ok ? p.g_lse[ia] : 0.f;
        sm.row_b[threadIdx.x] = ia_ok ? tm::finite_or_zero(p.lse[ia]) : 0.f;
        sm.row_c[threadIdx.x] = ia_ok ? p.g_psum[ia] : 0.f;
      } else {
        sm.row_a[threadIdx.x] = ia_ok ? p.g_lse[ia] : 0.f;
        sm.row_b[threadIdx.x] = ia_ok ? p.eta[ia] : 0.f;
      }
    }
    tile_product(sm, rows_x, n_rows, cols_x, n_cols, p.d, r0, c0);
    // G in place (float32), and in the input dtype for the tensor-core product.
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int a = e / kBN, b = e % kBN;
      const int64_t ga = r0 + a, gb = c0 + b;
      const int64_t i = TRANS ? gb : ga, j = TRANS ? ga : gb;
      const int si = TRANS ? b : a;  // index of anchor i in the statistics arrays
      float g = 0.f;
      if (ga < n_rows && gb < n_cols) {
        const float s = sm.s[a][b];
        const bool excl = tm::is_self(i, j, p.self_offset);
        float w, lw;
        // Labels of anchor i and column j (the tile's rows are columns of k when TRANS).
        pair_weight(p, i, j, TRANS ? sm.lab_c[b] : sm.lab_r[a], TRANS ? sm.lab_r[a] : sm.lab_c[b],
                    w, lw);
        if (MODE == kLse) {
          g = tm::lse_pair_grad(s, w, lw, excl, sm.row_a[si], sm.row_b[si], sm.row_c[si],
                                p.scale, p.lw_pos, p.lw_neg, p.lk1, p.has_k1);
        } else {
          g = tm::sp_pair_grad(s, tm::pos_mass(w, excl), sm.row_a[si], sm.row_b[si], p.scale);
        }
      }
      if constexpr (IsFloat<T>::value) {
        sm.s[a][b] = g;
      } else {
        sm.p[a][b] = from_f<T>(g);
      }
    }
    // V = the tile's vectors, D slice [dv0, dv0 + 64).
    for (int e = threadIdx.x; e < kBN * kBD; e += kThreads) {
      const int b = e / kBD, c = e % kBD;
      const int64_t gb = c0 + b, gc = dv0 + c;
      sm.u.v[b][c] = (gb < n_cols && gc < p.d) ? cols_x[gb * p.d + gc] : from_f<T>(0.f);
    }
    __syncthreads();
    if constexpr (IsFloat<T>::value) {
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
          for (int b = 0; b < 8; ++b) acc[a][b] = fmaf(gv[a], vv[b], acc[a][b]);
      }
    } else {
      using namespace nvcuda;
#pragma unroll
      for (int kk = 0; kk < kBN; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sm.p[warp * 16][kk], kBN + 8);
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, &sm.u.v[kk][b * 16], Smem<T>::kVLd);
          wmma::mma_sync(facc[b], fa, fb, facc[b]);
        }
      }
    }
    __syncthreads();
  }
  // Write the 64 × 64 output block.
  T* out = static_cast<T*>(p.grad);
  if constexpr (IsFloat<T>::value) {
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const int64_t gr = r0 + ty * 4 + a, gc = dv0 + tx + 8 * b;
        if (gr < n_rows && gc < p.d) out[gr * p.d + gc] = acc[a][b];
      }
  } else {
#pragma unroll
    for (int b = 0; b < 4; ++b)
      nvcuda::wmma::store_matrix_sync(&sm.s[warp * 16][b * 16], facc[b], kBN + kSPad,
                                      nvcuda::wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < kBM * kBD; e += kThreads) {
      const int a = e / kBD, c = e % kBD;
      const int64_t gr = r0 + a, gc = dv0 + c;
      if (gr < n_rows && gc < p.d) out[gr * p.d + gc] = from_f<T>(sm.s[a][c]);
    }
  }
}

// ---- host side -----------------------------------------------------------------------------

using OptTensor = std::optional<at::Tensor>;

struct Prepared {
  at::Tensor q, k, ql, kl, pw, lpw;
  Problem pr;
  int mode;
};

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& qlab,
                 const at::Tensor& klab, bool multilabel, const OptTensor& pos_weight) {
  const Problem pr = check_qk(op, q, k, qlab, klab, c10::DeviceType::CUDA);
  TORCH_CHECK(q.scalar_type() != at::kDouble, "flashcon::", op,
              ": the CUDA kernels take float32, float16 or bfloat16; float64 CUDA tensors are "
              "served by backend='torch' (or move them to the CPU for backend='cpu')");
  const at::Tensor pw = prepare_pos_weight(op, pos_weight, q);
  return {q.detach(),
          k.detach(),
          qlab.detach().to(at::kLong).contiguous(),
          klab.detach().to(at::kLong).contiguous(),
          pw,
          log_pos_weight(pw),
          pr,
          pos_mode(multilabel, pw)};
}

// The log-sum-exp's weights as the kernels read them (log 0 = −inf: the term vanishes).
void set_lse_weights(Params& p, double w_pos, double w_neg, double k1) {
  p.lw_pos = tm::log_weight<float>(w_pos);
  p.lw_neg = tm::log_weight<float>(w_neg);
  p.lk1 = tm::log_weight<float>(k1);
  p.has_k1 = k1 > 0;
}

Params base_params(const Prepared& o, int64_t self_offset, double scale) {
  Params p{};
  p.mode = o.mode;
  if (o.pw.defined()) {
    p.pw = o.pw.data_ptr<float>();
    p.lpw = o.lpw.data_ptr<float>();
    p.bq = o.pw.size(0);
    p.bk = o.pw.size(1);
  } else {
    p.bq = p.bk = 1;
  }
  p.q = o.q.data_ptr();
  p.k = o.k.data_ptr();
  p.qlab = o.ql.data_ptr<int64_t>();
  p.klab = o.kl.data_ptr<int64_t>();
  p.n = o.pr.n;
  p.m = o.pr.m;
  p.d = o.pr.d;
  p.self_offset = self_offset;
  p.scale = static_cast<float>(scale);
  return p;
}

int blocks(int64_t x, int64_t b) { return static_cast<int>((x + b - 1) / b); }

template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "unreachable dtype ", t);
  }
}

template <int MODE>
void launch_bwd(const Prepared& o, Params p, at::Tensor& dq, at::Tensor& dk) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int dsl = std::max(1, blocks(o.pr.d, kBD));
  dispatch_dtype(o.q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (o.pr.n > 0) {
      p.grad = dq.data_ptr();
      bwd_kernel<T, MODE, false><<<dim3(blocks(o.pr.n, kBM), dsl), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (o.pr.m > 0) {
      p.grad = dk.data_ptr();
      bwd_kernel<T, MODE, true><<<dim3(blocks(o.pr.m, kBM), dsl), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_fwd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& qlab,
                                                       const at::Tensor& klab, int64_t self_offset,
                                                       double scale, double w_pos, double w_neg,
                                                       double k1, bool multilabel,
                                                       const OptTensor& pos_weight) {
  check_weights("lse_fwd", w_pos, w_neg, k1);
  const Prepared o = prepare("lse_fwd", q, k, qlab, klab, multilabel, pos_weight);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto opts = q.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({o.pr.n}, opts), psum = at::empty({o.pr.n}, opts),
             pcnt = at::empty({o.pr.n}, opts);
  if (o.pr.n == 0) return {lse, psum, pcnt};
  Params p = base_params(o, self_offset, scale);
  set_lse_weights(p, w_pos, w_neg, k1);
  p.out0 = lse.data_ptr<float>();
  p.out1 = psum.data_ptr<float>();
  p.out2 = pcnt.data_ptr<float>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(o.q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fwd_kernel<T, kLse><<<blocks(o.pr.n, kBM), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lse, psum, pcnt};
}

std::tuple<at::Tensor, at::Tensor> lse_bwd(const at::Tensor& g_lse, const at::Tensor& g_psum,
                                           const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& qlab, const at::Tensor& klab,
                                           const at::Tensor& lse, int64_t self_offset,
                                           double scale, double w_pos, double w_neg, double k1,
                                           bool multilabel, const OptTensor& pos_weight) {
  check_weights("lse_bwd", w_pos, w_neg, k1);
  const Prepared o = prepare("lse_bwd", q, k, qlab, klab, multilabel, pos_weight);
  check_stat("lse_bwd", "g_lse", g_lse, q);
  check_stat("lse_bwd", "g_psum", g_psum, q);
  check_stat("lse_bwd", "lse", lse, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor gl = g_lse.detach().contiguous(), gp = g_psum.detach().contiguous(),
                   ls = lse.detach().contiguous();
  at::Tensor dq = at::empty_like(o.q), dk = at::empty_like(o.k);
  Params p = base_params(o, self_offset, scale);
  set_lse_weights(p, w_pos, w_neg, k1);
  p.g_lse = gl.data_ptr<float>();
  p.g_psum = gp.data_ptr<float>();
  p.lse = ls.data_ptr<float>();
  launch_bwd<kLse>(o, p, dq, dk);
  return {dq, dk};
}

std::tuple<at::Tensor, at::Tensor> sp_fwd(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& qlab, const at::Tensor& klab,
                                          const at::Tensor& eta, int64_t self_offset,
                                          double scale, bool multilabel,
                                          const OptTensor& pos_weight) {
  const Prepared o = prepare("sp_fwd", q, k, qlab, klab, multilabel, pos_weight);
  check_stat("sp_fwd", "eta", eta, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor et = eta.detach().contiguous();
  const auto opts = q.options().dtype(at::kFloat);
  at::Tensor sp = at::empty({o.pr.n}, opts), r = at::empty({o.pr.n}, opts);
  if (o.pr.n == 0) return {sp, r};
  Params p = base_params(o, self_offset, scale);
  p.eta = et.data_ptr<float>();
  p.out0 = sp.data_ptr<float>();
  p.out1 = r.data_ptr<float>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(o.q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fwd_kernel<T, kSp><<<blocks(o.pr.n, kBM), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sp, r};
}

std::tuple<at::Tensor, at::Tensor> sp_bwd(const at::Tensor& g_sp, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& qlab,
                                          const at::Tensor& klab, const at::Tensor& eta,
                                          int64_t self_offset, double scale, bool multilabel,
                                          const OptTensor& pos_weight) {
  const Prepared o = prepare("sp_bwd", q, k, qlab, klab, multilabel, pos_weight);
  check_stat("sp_bwd", "g_sp", g_sp, q);
  check_stat("sp_bwd", "eta", eta, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor gs = g_sp.detach().contiguous(), et = eta.detach().contiguous();
  at::Tensor dq = at::empty_like(o.q), dk = at::empty_like(o.k);
  Params p = base_params(o, self_offset, scale);
  p.g_lse = gs.data_ptr<float>();
  p.eta = et.data_ptr<float>();
  launch_bwd<kSp>(o, p, dq, dk);
  return {dq, dk};
}

// ---- symmetric path ------------------------------------------------------------------------
// On CUDA the symmetric ops run the general kernels with q = k = z, self_offset = 0 and
// dz = dq + dk: correct, but without the halved work of the CPU's tile-pair schedule (a
// tile-pair kernel is left to the Triton backend; see engine.py's "Symmetric path").

std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_lse_fwd(const at::Tensor& z,
                                                           const at::Tensor& lab, double scale,
                                                           double w_pos, double w_neg, double k1,
                                                           bool multilabel,
                                                           const OptTensor& pos_weight) {
  return lse_fwd(z, z, lab, lab, 0, scale, w_pos, w_neg, k1, multilabel, pos_weight);
}

at::Tensor sym_lse_bwd(const at::Tensor& g_lse, const at::Tensor& g_psum, const at::Tensor& z,
                       const at::Tensor& lab, const at::Tensor& lse, double scale, double w_pos,
                       double w_neg, double k1, bool multilabel, const OptTensor& pos_weight) {
  auto [dq, dk] =
      lse_bwd(g_lse, g_psum, z, z, lab, lab, lse, 0, scale, w_pos, w_neg, k1, multilabel,
              pos_weight);
  return dq.add_(dk);
}

std::tuple<at::Tensor, at::Tensor> sym_sp_fwd(const at::Tensor& z, const at::Tensor& lab,
                                              const at::Tensor& eta, double scale,
                                              bool multilabel, const OptTensor& pos_weight) {
  return sp_fwd(z, z, lab, lab, eta, 0, scale, multilabel, pos_weight);
}

at::Tensor sym_sp_bwd(const at::Tensor& g_sp, const at::Tensor& z, const at::Tensor& lab,
                      const at::Tensor& eta, double scale, bool multilabel,
                      const OptTensor& pos_weight) {
  auto [dq, dk] = sp_bwd(g_sp, z, z, lab, lab, eta, 0, scale, multilabel, pos_weight);
  return dq.add_(dk);
}

}  // namespace
}  // namespace cuda
}  // namespace flashcon

TORCH_LIBRARY_IMPL(flashcon, CUDA, m) {
  m.impl("lse_fwd", &flashcon::cuda::lse_fwd);
  m.impl("lse_bwd", &flashcon::cuda::lse_bwd);
  m.impl("sp_fwd", &flashcon::cuda::sp_fwd);
  m.impl("sp_bwd", &flashcon::cuda::sp_bwd);
  m.impl("sym_lse_fwd", &flashcon::cuda::sym_lse_fwd);
  m.impl("sym_lse_bwd", &flashcon::cuda::sym_lse_bwd);
  m.impl("sym_sp_fwd", &flashcon::cuda::sym_sp_fwd);
  m.impl("sym_sp_bwd", &flashcon::cuda::sym_sp_bwd);
}
