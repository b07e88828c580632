// What the CUDA kernels share (kernels.cuh says how they tile the work): the CUDA or emulator
// layer, tile constants, Params, staging geometry and shared memory, pair weights, the WMMA
// wrappers, staging and the streamed tile product.
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

}  // namespace cuda
}  // namespace flashcon
