// The launch plans of the CUDA kernels (host code; kernels.cuh).
#pragma once

#include <algorithm>
#include <cstdint>

#include "backward.cuh"
#include "common.cuh"
#include "forward.cuh"
#include "resident.cuh"

namespace flashcon {
namespace cuda {

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
