// The resident kernels (16-bit, 0 < D <= 128, 16-byte aligned rows; kernels.cuh).
#pragma once

#include "backward.cuh"
#include "common.cuh"
#include "forward.cuh"

namespace flashcon {
namespace cuda {

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

}  // namespace cuda
}  // namespace flashcon
