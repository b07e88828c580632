// CUDA kernels of the flashcon:: ops (the streaming engine of python/flashcon/engine.py) and
// their launch plans. No ATen here: csrc/cuda/engine_cuda.cu checks and prepares the tensors and
// calls the launch_* functions; the same source also compiles for the host under
// csrc/emu/cuda_emu.h, where tests/test_cuda_emu.py runs it (one OS thread per CUDA thread)
// against the float64 oracle on a machine without a GPU.
//
// Tiling. A CTA of 128 threads (4 warps) owns 64 rows and streams over 64-column tiles; tiles
// of similarities S = A·Bᵀ are formed in shared memory (WMMA 16×16×16 with fp32 accumulate for
// float16/bfloat16, a 4×8 register micro-tile of FMAs per thread for float32) and the per-pair
// math is flashcon/tile_math.h, the same functions the CPU kernels run. Two kernel families:
//
// - Resident (16-bit, 0 < D <= 128, rows 16-byte aligned with D % 8 == 0; the usual case):
//   the CTA's row block A (64 × 64 or 64 × 128) is loaded once into shared memory and stays
//   there for the whole column sweep; column tiles B arrive by cp.async into two buffers, the
//   next one in flight while the current one is used, and in the backward each B serves both
//   S = A·Bᵀ and G·B. Global memory is read once per CTA and tile.
// - Streamed (float32, D > 128, unaligned or odd-D 16-bit rows): A and B are staged slice by
//   slice over D (64 wide for 16-bit with 16-byte loads where aligned, 32 wide for float32),
//   and the backward stages the tile's vectors again, 64 columns of D at a time.
//
// Forward (lse and softplus passes): two threads per row, each keeping an online max-shifted
// log-sum-exp (or the softplus/sigmoid sums) over half of every tile; a thread evaluates each
// pair's weight and exponent once per tile (kept in registers between the max and the sum);
// the halves are merged with a shuffle at the end.
//
// Backward: dQ and dK are two launches of one kernel, each CTA owning a 64-row block of its
// output and up to 128 columns of D (two 64-wide chunks of accumulators), so no two CTAs write
// the same element: no atomics, and results are bitwise reproducible. The dQ launch recomputes
// S = Q_blk·K_tileᵀ, forms G in shared memory once per tile and accumulates G·K_tile for both
// D chunks; the dK launch does the same with Sᵀ = K_blk·Q_tileᵀ and Gᵀ·Q_tile. S is computed
// once per tile for D <= 128 (once per 128 columns of D beyond). The symmetric ops' backward
// (q = k = z) is one launch writing dz = dq + dk (SYM below).
//
// Positive weights (contract v2): class labels, int64 label bitmasks, or a [Bq, Bk] pos_weight
// matrix read per pair from global memory (cached; it is O(B²)), never expanded to N×M.
//
// Precision: products accumulate in float32; statistics are float32; float64 is not supported
// here (the CPU kernels and backend='torch' take it).
#pragma once

#if defined(FLASHCON_CUDA_EMU)
#include "../emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "flashcon's CUDA kernels need sm_80 or newer (cp.async, bfloat16 tensor cores): set TORCH_CUDA_ARCH_LIST to 8.0 or newer"
#endif
#define FLASHCON_SMEM(Type, name) __shared__ Type name
#define FLASHCON_LD16(p) (*reinterpret_cast<const uint4*>(p))
#define FLASHCON_ST16(p, v) (*reinterpret_cast<uint4*>(p) = (v))
#define FLASHCON_LAUNCH(kernel, grid, block, stream, ...) \
  (kernel<<<grid, block, 0, stream>>>(__VA_ARGS__), cudaGetLastError())
#define FLASHCON_LAUNCH_DYN(kernel, grid, block, smem, stream, ...) \
  ::flashcon::cuda::launch_dyn(kernel, grid, block, smem, stream, __VA_ARGS__)
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "flashcon/tile_math.h"

namespace flashcon {
namespace cuda {

namespace tm = flashcon::tile_math;

constexpr int kThreads = 128;
constexpr int kBM = 64;   // rows of a tile
constexpr int kBN = 64;   // columns of a tile
constexpr int kBD = 64;   // D chunk of a backward accumulator
constexpr int kMaxChunks = 2;  // D chunks one backward CTA accumulates
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
  // 16-byte staging loads: D is a multiple of 8 and q, k are 16-byte aligned (16-bit only).
  bool vec;
  // Launch-plan option: take the streamed kernels even where the resident ones apply (tests).
  bool no_resident;
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

// Staging geometry per input dtype: 16-bit slices are 64 wide (one WMMA k-loop of 4 steps per
// barrier pair), float32 slices 32 wide; rows are padded against bank conflicts, and 16-bit
// rows stay multiples of 16 bytes (WMMA and 16-byte stores need it).
template <typename T>
struct Geo {
  static constexpr bool kF32 = IsFloat<T>::value;
  static constexpr int kBK = kF32 ? 32 : 64;
  static constexpr int kLd = kBK + (kF32 ? 1 : 8);
  static constexpr int kVLd = kBD + (kF32 ? 4 : 8);
  static constexpr int kPLd = kBN + 8;
};

// Shared memory of one CTA (under 48 KiB: 46.5 KiB for 16-bit, 37 KiB for float32). The staging
// slices and the backward's V chunk are never live at the same time, so they share storage.
template <typename T>
struct alignas(128) Smem {
  using G = Geo<T>;
  float s[kBM][kBN + kSPad];
  union alignas(32) {
    struct {
      alignas(32) T a[kBM][G::kLd];
      alignas(32) T b[kBN][G::kLd];
    } stage;
    alignas(32) T v[kBN][G::kVLd];
  } u;
  // The backward's G in the input dtype for the tensor-core product (unused for float32).
  alignas(32) T p[G::kF32 ? 1 : kBM][G::kPLd];
  float row_a[kBM], row_b[kBM], row_c[kBM];
  float col_a[kBN], col_b[kBN], col_c[kBN];  // the symmetric backward's column statistics
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

// Load a 16-bit WMMA operand tile from shared memory. For bfloat16 nvcc emits the generic-address
// form of wmma.load (64-bit addresses, no ldmatrix; up to ~100 more registers per thread here)
// where it emits the .shared form for float16; the inline PTX is the same instruction with the
// .shared state space, its four registers in the fragment's order (as the builtin stores them),
// and ptxas lowers it to LDSM as it does for float16.
template <typename Use, typename T, typename L>
__device__ __forceinline__ void ld_frag(nvcuda::wmma::fragment<Use, 16, 16, 16, T, L>& f,
                                        const T* p, unsigned ld) {
#if !defined(FLASHCON_CUDA_EMU)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    static_assert(sizeof(f) == 16, "a bf16 m16n16k16 operand fragment is four 32-bit registers");
    unsigned* r = reinterpret_cast<unsigned*>(&f);
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    if constexpr (std::is_same_v<Use, nvcuda::wmma::matrix_a>) {
      static_assert(std::is_same_v<L, nvcuda::wmma::row_major>);
      asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(a), "r"(ld)
                   : "memory");
    } else if constexpr (std::is_same_v<L, nvcuda::wmma::col_major>) {
      asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(a), "r"(ld)
                   : "memory");
    } else {
      asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(a), "r"(ld)
                   : "memory");
    }
    return;
  }
#endif
  nvcuda::wmma::load_matrix_sync(f, p, ld);
}

using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// acc[j] += A · B_jᵀ over K columns: A the warp's 16 rows (a, pitch lda), B_j rows
// [16j, 16j + 16) of a 64-row tile (b, pitch ldb), both row-major in shared memory.
template <int K, typename T>
__device__ __forceinline__ void mma_abt(AccFrag (&acc)[4], const T* a, int lda, const T* b,
                                        int ldb) {
  using namespace nvcuda;
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    ld_frag(fa, a + kk, lda);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // Bᵀ as a column-major K×N operand: element (k, n) is b[16j + n][k].
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      ld_frag(fb, b + j * 16 * ldb + kk, ldb);
      wmma::mma_sync(acc[j], fa, fb, acc[j]);
    }
  }
}

// acc[j] += G · V[:, 16j : 16j + 16]: G the warp's 16 rows of a 64-column tile (g, pitch ldg),
// V 64 rows (v, pitch ldv; columns from v's offset on).
template <typename T>
__device__ __forceinline__ void mma_ab(AccFrag (&acc)[4], const T* g, int ldg, const T* v,
                                       int ldv) {
  using namespace nvcuda;
#pragma unroll
  for (int kk = 0; kk < kBN; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    ld_frag(fa, g + kk, ldg);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      ld_frag(fb, v + kk * ldv + j * 16, ldv);
      wmma::mma_sync(acc[j], fa, fb, acc[j]);
    }
  }
}

// The warp's 16 × 64 accumulators into rows [16w, 16w + 16) of s.
__device__ __forceinline__ void store_acc(float (*s)[kBN + kSPad], const AccFrag (&acc)[4]) {
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    nvcuda::wmma::store_matrix_sync(&s[warp * 16][j * 16], acc[j], kBN + kSPad,
                                    nvcuda::wmma::mem_row_major);
}

// dst[r][c] = x[r0 + r][c0 + c] for r < 64, c < W (zero outside [rows) × [d)). With vec (16-bit,
// D % 8 == 0, x 16-byte aligned) every 8-element chunk is wholly inside or outside [d), so it
// moves as one 16-byte load and store.
template <typename T, int W, int LD>
__device__ __forceinline__ void stage(T (*dst)[LD], const T* x, int64_t rows, int64_t d,
                                      int64_t r0, int64_t c0, bool vec) {
  if constexpr (sizeof(T) == 2 && W % 8 == 0 && (LD * sizeof(T)) % 16 == 0) {
    if (vec) {
      constexpr int kC = W / 8;
      for (int e = threadIdx.x; e < kBM * kC; e += kThreads) {
        const int r = e / kC, c = (e % kC) * 8;
        const int64_t gr = r0 + r, gc = c0 + c;
        uint4 val = {0u, 0u, 0u, 0u};
        if (gr < rows && gc < d) val = FLASHCON_LD16(x + gr * d + gc);
        FLASHCON_ST16(&dst[r][c], val);
      }
      return;
    }
  }
  for (int e = threadIdx.x; e < kBM * W; e += kThreads) {
    const int r = e / W, c = e % W;
    const int64_t gr = r0 + r, gc = c0 + c;
    dst[r][c] = (gr < rows && gc < d) ? x[gr * d + gc] : from_f<T>(0.f);
  }
}

// s[r][c] = a_{r0+r} · b_{c0+c} over all of D. Ends with a barrier: s is visible to all.
template <typename T>
__device__ void tile_product(Smem<T>& sm, const T* a, int64_t a_rows, const T* b, int64_t b_rows,
                             int64_t d, int64_t r0, int64_t c0, bool vec) {
  using G = Geo<T>;
  if constexpr (G::kF32) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;  // 16 × 8 threads, 4 × 8 outputs each
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    for (int64_t d0 = 0; d0 < d; d0 += G::kBK) {
      stage<T, G::kBK>(sm.u.stage.a, a, a_rows, d, r0, d0, false);
      stage<T, G::kBK>(sm.u.stage.b, b, b_rows, d, c0, d0, false);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < G::kBK; ++kk) {
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
    const int warp = threadIdx.x / 32;  // warp w: rows [16w, 16w+16), all 64 columns
    AccFrag acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.f);
    for (int64_t d0 = 0; d0 < d; d0 += G::kBK) {
      stage<T, G::kBK>(sm.u.stage.a, a, a_rows, d, r0, d0, vec);
      stage<T, G::kBK>(sm.u.stage.b, b, b_rows, d, c0, d0, vec);
      __syncthreads();
      mma_abt<G::kBK>(acc, &sm.u.stage.a[warp * 16][0], G::kLd, &sm.u.stage.b[0][0], G::kLd);
      __syncthreads();
    }
    store_acc(sm.s, acc);
  }
  __syncthreads();
}

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

// ---- resident row block, pipelined column tiles (16-bit, 0 < D <= DP, DP = 64 or 128) -------
// The CTA's 64 rows × DP columns stay in shared memory for the whole column sweep; each column
// tile (64 × DP) arrives by cp.async into one of two buffers while the previous tile is being
// used, and serves both S = A·Bᵀ and, in the backward, G·B (B's rows are the tile's vectors),
// so a tile of z is read from global memory once per CTA and tile, and the CTA waits on global
// memory only where the prefetch has not landed yet. Needs 16-byte aligned rows (vec).
// Dynamic shared memory at DP = 128: 68.5 KiB in the forward (three CTAs per SM on sm_90, two
// on sm_80), 79.5 KiB in the backward (two).
template <typename T, int DP>
struct alignas(128) ResTiles {
  static constexpr int kLd = DP + 8;  // row pitch: a multiple of 16 bytes, off the banks' period
  float s[kBM][kBN + kSPad];
  alignas(128) T a[kBM][kLd];
  alignas(128) T b[2][kBN][kLd];
  int64_t lab_c[kBN];
};

// The backward's: the tiles, G in the input dtype, the anchors' statistics and row labels.
template <typename T, int DP>
struct alignas(128) ResSmem : ResTiles<T, DP> {
  alignas(32) T p[kBM][kBN + 8];
  float row_a[kBM], row_b[kBM], row_c[kBM];
  float col_a[kBN], col_b[kBN], col_c[kBN];
  int64_t lab_r[kBM];
};

#if !defined(FLASHCON_CUDA_EMU)
#define FLASHCON_DYN_SMEM(Type, name)                                \
  extern __shared__ __align__(128) unsigned char flashcon_dyn_smem[]; \
  Type& name = *reinterpret_cast<Type*>(flashcon_dyn_smem)
// 16 bytes global -> shared, asynchronous (sm_80+); valid = false writes 16 zero bytes.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(src),
               "r"(bytes)
               : "memory");
}
#define FLASHCON_CP_ASYNC16(dst, src, valid) cp_async16((dst), (src), (valid))
#define FLASHCON_CP_COMMIT() asm volatile("cp.async.commit_group;\n" ::: "memory")
#define FLASHCON_CP_WAIT(keep) asm volatile("cp.async.wait_group %0;\n" ::"n"(keep) : "memory")
#endif

// dst[r][c] <- x[r0 + r][c] for r < 64, c < DP (zero outside [rows) × [d)), by 16-byte
// cp.async (d % 8 == 0: an 8-element chunk is wholly inside or outside [d)).
template <int DP, typename T, int LD>
__device__ __forceinline__ void load_tile_async(T (*dst)[LD], const T* x, int64_t rows, int64_t d,
                                                int64_t r0) {
  constexpr int kC = DP / 8;
  for (int e = threadIdx.x; e < kBM * kC; e += kThreads) {
    const int r = e / kC, c = (e % kC) * 8;
    const int64_t gr = r0 + r;
    const bool ok = gr < rows && c < d;
    FLASHCON_CP_ASYNC16(&dst[r][c], ok ? x + gr * d + c : x, ok);
  }
}

// Issue the next tile (if any) into buffer nxt, then wait until everything before it (the
// current tile, and at the start the row block) has landed for every thread.
template <int DP, typename T, int LD>
__device__ __forceinline__ void res_advance(T (*nxt)[LD], const T* x, int64_t n, int64_t d,
                                            int64_t c_next) {
  if (c_next < n) load_tile_async<DP>(nxt, x, n, d, c_next);
  FLASHCON_CP_COMMIT();  // possibly empty: keeps one group per tile
  FLASHCON_CP_WAIT(1);
  __syncthreads();
}

// s = A · B[buf]ᵀ over DP columns (WMMA; warp w: rows [16w, 16w+16)). Ends with a barrier.
template <typename T, int DP>
__device__ __forceinline__ void res_product(ResTiles<T, DP>& sm, int buf) {
  constexpr int ld = ResTiles<T, DP>::kLd;
  const int warp = threadIdx.x / 32;
  AccFrag acc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.f);
  mma_abt<DP>(acc, &sm.a[warp * 16][0], ld, &sm.b[buf][0][0], ld);
  store_acc(sm.s, acc);
  __syncthreads();
}

template <typename T, int MODE, int DP>
__global__ void __launch_bounds__(kThreads, 2) fwd_res_kernel(Params p) {
  using SmemT = ResTiles<T, DP>;
  FLASHCON_DYN_SMEM(SmemT, sm);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  FwdRow x = fwd_row<MODE>(p, r0);
  load_tile_async<DP>(sm.a, q, p.n, p.d, r0);
  load_tile_async<DP>(sm.b[0], k, p.m, p.d, 0);
  FLASHCON_CP_COMMIT();
  int buf = 0;
  for (int64_t c0 = 0; c0 < p.m; c0 += kBN, buf ^= 1) {
    load_col_labels(p.klab, p.m, c0, sm.lab_c);
    res_advance<DP>(sm.b[buf ^ 1], k, p.m, p.d, c0 + kBN);
    res_product(sm, buf);
    fwd_tile<MODE>(p, sm.s, sm.lab_c, c0, x);
    __syncthreads();  // s, lab_c and B[buf] are free for the next tile
  }
  FLASHCON_CP_WAIT(0);
  fwd_finish<MODE>(p, x);
}

template <typename T, int MODE, bool TRANS, bool SYM, int DP>
__global__ void __launch_bounds__(kThreads, 2) bwd_res_kernel(Params p) {
  constexpr int NCH = DP / kBD;
  using SmemT = ResSmem<T, DP>;
  constexpr int ld = ResTiles<T, DP>::kLd;
  FLASHCON_DYN_SMEM(SmemT, sm);
  const auto [rows_x, cols_x, n_rows, n_cols] = bwd_operands<T, TRANS>(p);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int warp = threadIdx.x / 32;
  AccFrag facc[NCH][4];
#pragma unroll
  for (int h = 0; h < NCH; ++h)
#pragma unroll
    for (int b = 0; b < 4; ++b) nvcuda::wmma::fill_fragment(facc[h][b], 0.f);
  bwd_row_labels<TRANS>(p, sm, r0, n_rows);
  load_tile_async<DP>(sm.a, rows_x, n_rows, p.d, r0);
  load_tile_async<DP>(sm.b[0], cols_x, n_cols, p.d, 0);
  FLASHCON_CP_COMMIT();
  int buf = 0;
  for (int64_t c0 = 0; c0 < n_cols; c0 += kBN, buf ^= 1) {
    bwd_tile_stats<MODE, TRANS, SYM>(p, sm, r0, c0, n_cols);
    res_advance<DP>(sm.b[buf ^ 1], cols_x, n_cols, p.d, c0 + kBN);
    res_product(sm, buf);
    bwd_tile_grad<T, MODE, TRANS, SYM>(p, sm, r0, c0, n_rows, n_cols);
    __syncthreads();
    // facc[h] += G · B[buf][:, 64h : 64h + 64] (B's rows are the tile's vectors).
#pragma unroll
    for (int h = 0; h < NCH; ++h) mma_ab(facc[h], &sm.p[warp * 16][0], kBN + 8, &sm.b[buf][0][h * kBD], ld);
    __syncthreads();  // s, p, the statistics and B[buf] are free for the next tile
  }
  FLASHCON_CP_WAIT(0);
#pragma unroll
  for (int h = 0; h < NCH; ++h) {
    if (h * kBD >= p.d) break;
    bwd_store_chunk<T>(p, sm, facc[h], r0, n_rows, h * kBD);
  }
}

// ---- launch plans (host) -------------------------------------------------------------------

#if !defined(FLASHCON_CUDA_EMU)
// A launch with `smem` bytes of dynamic shared memory (over the 48 KiB default: opted in), with
// the SM's L1/shared split asked to favour shared memory (two resident backward CTAs need
// 161 KiB with the per-CTA reserve, three resident forward CTAs on sm_90 208.5 KiB).
template <typename... KArgs, typename... Args>
cudaError_t launch_dyn(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
}
#endif

inline int blocks(int64_t x, int64_t b) { return static_cast<int>((x + b - 1) / b); }

// Whether 16-bit rows of D elements at these addresses can be staged with 16-byte accesses.
inline bool vec_ok(const void* q, const void* k, int64_t d, int elem_bytes) {
  const auto aligned = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
  return elem_bytes == 2 && d % 8 == 0 && aligned(q) && aligned(k);
}

// The Params of one op call that every op shares: operands, labels, sizes, the pair scale and
// the positive weights (pw, lpw null: labels, or bitmasks with mode kMultiLabel). The caller sets
// the op's statistics, outputs and lse weights.
inline Params make_params(const void* q, const void* k, int elem_bytes, const int64_t* qlab,
                          const int64_t* klab, int64_t n, int64_t m, int64_t d,
                          int64_t self_offset, double scale, int mode, const float* pw,
                          const float* lpw, int64_t bq, int64_t bk) {
  Params p{};
  p.q = q;
  p.k = k;
  p.qlab = qlab;
  p.klab = klab;
  p.n = n;
  p.m = m;
  p.d = d;
  p.self_offset = self_offset;
  p.scale = static_cast<float>(scale);
  p.vec = vec_ok(q, k, d, elem_bytes);
  p.mode = mode;
  p.pw = pw;
  p.lpw = lpw;
  p.bq = pw ? bq : 1;
  p.bk = pw ? bk : 1;
  return p;
}

// The log-sum-exp's weights as the kernels read them (log 0 = −inf: the term vanishes).
inline void set_lse_weights(Params& p, double w_pos, double w_neg, double k1) {
  p.lw_pos = tm::log_weight<float>(w_pos);
  p.lw_neg = tm::log_weight<float>(w_neg);
  p.lk1 = tm::log_weight<float>(k1);
  p.has_k1 = k1 > 0;
}

// The resident kernels' width DP (64 or 128) where they apply: 16-bit, 16-byte staging,
// 0 < D <= 128, q and k not empty; 0 where the streamed kernels run.
template <typename T>
int resident_width(const Params& p) {
  if (IsFloat<T>::value || !p.vec || p.no_resident || p.d <= 0 || p.d > 128) return 0;
  if (p.n <= 0 || p.m <= 0) return 0;  // nothing to pipeline (and an empty operand may be null)
  return p.d <= 64 ? 64 : 128;
}

template <typename T, int MODE>
cudaError_t launch_fwd(const Params& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  const dim3 grid(blocks(p.n, kBM));
  if constexpr (!IsFloat<T>::value) {
    const int dp = resident_width<T>(p);
    auto* r64 = &fwd_res_kernel<T, MODE, 64>;
    auto* r128 = &fwd_res_kernel<T, MODE, 128>;
    if (dp == 64)
      return FLASHCON_LAUNCH_DYN(r64, grid, dim3(kThreads), sizeof(ResTiles<T, 64>), stream, p);
    if (dp == 128)
      return FLASHCON_LAUNCH_DYN(r128, grid, dim3(kThreads), sizeof(ResTiles<T, 128>), stream, p);
  }
  auto* kernel = &fwd_kernel<T, MODE>;
  return FLASHCON_LAUNCH(kernel, grid, dim3(kThreads), stream, p);
}

// D columns per backward CTA: up to 128 (S and G once per tile); grid.y covers the rest.
inline int bwd_chunks(int64_t d) { return d > kBD ? kMaxChunks : 1; }

template <typename T, int MODE, bool TRANS, bool SYM = false>
cudaError_t launch_bwd_one(const Params& p, int64_t rows, cudaStream_t stream) {
  if constexpr (!IsFloat<T>::value) {
    const int dp = resident_width<T>(p);
    const dim3 grid(blocks(rows, kBM));
    auto* r64 = &bwd_res_kernel<T, MODE, TRANS, SYM, 64>;
    auto* r128 = &bwd_res_kernel<T, MODE, TRANS, SYM, 128>;
    if (dp == 64)
      return FLASHCON_LAUNCH_DYN(r64, grid, dim3(kThreads), sizeof(ResSmem<T, 64>), stream, p);
    if (dp == 128)
      return FLASHCON_LAUNCH_DYN(r128, grid, dim3(kThreads), sizeof(ResSmem<T, 128>), stream, p);
  }
  const int nch = bwd_chunks(p.d);
  const dim3 grid(blocks(rows, kBM), std::max(1, blocks(p.d, kBD * nch)));
  auto* k1 = &bwd_kernel<T, MODE, TRANS, SYM, 1>;
  auto* k2 = &bwd_kernel<T, MODE, TRANS, SYM, kMaxChunks>;
  return nch == 1 ? FLASHCON_LAUNCH(k1, grid, dim3(kThreads), stream, p)
                  : FLASHCON_LAUNCH(k2, grid, dim3(kThreads), stream, p);
}

// dq (p.n rows) then dk (p.m rows), each in the input dtype.
template <typename T, int MODE>
cudaError_t launch_bwd(Params p, void* dq, void* dk, cudaStream_t stream) {
  if (p.n > 0) {
    p.grad = dq;
    const cudaError_t err = launch_bwd_one<T, MODE, false>(p, p.n, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.m > 0) {
    p.grad = dk;
    return launch_bwd_one<T, MODE, true>(p, p.m, stream);
  }
  return cudaSuccess;
}

// The symmetric ops' backward (p: q = k = z, qlab = klab, self_offset = 0): dz = dq + dk in one
// launch, in the input dtype (rounded once).
template <typename T, int MODE>
cudaError_t launch_sym_bwd(Params p, void* dz, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  p.grad = dz;
  return launch_bwd_one<T, MODE, false, true>(p, p.n, stream);
}

}  // namespace cuda
}  // namespace flashcon
