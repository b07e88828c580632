// The CUDA kernels of csrc/cuda/kernels.cuh, compiled for the host under the emulator
// (cuda_emu.h) and exposed with a C ABI for tests/test_cuda_emu.py (loaded with ctypes). Not
// part of the extension: the test builds it with the host compiler.
//
// fcemu_run(op, dtype, ...) runs one flashcon:: op on host buffers through the same Params
// filling (make_params, set_lse_weights) and launch plans as csrc/cuda/engine_cuda.cu:
//   op 0: lse_fwd  -> out0 = lse, out1 = psum, out2 = pcnt
//   op 1: lse_bwd  (g0 = g_lse, g1 = g_psum, stat = lse) -> dq, dk
//   op 2: sp_fwd   (eta) -> out0 = sp, out1 = r
//   op 3: sp_bwd   (g0 = g_sp, eta) -> dq, dk
//   op 4: sym_lse_bwd (q = k = z, as op 1) -> dz in dq
//   op 5: sym_sp_bwd  (q = k = z, as op 3) -> dz in dq
// dtype 0: float32, 1: float16, 2: bfloat16 (q, k, dq and dk in that dtype; the rest float32).
// no_resident != 0 takes the streamed kernels where the launch plan would pick the resident ones.
// Returns 0, or -1 for an unknown op or dtype.
#include "../cuda/kernels.cuh"

namespace fc = flashcon::cuda;

namespace {

template <typename T>
int run(int op, const fc::Params& p, void* dq, void* dk) {
  switch (op) {
    case 0:
      return fc::launch_fwd<T, fc::kLse>(p, nullptr);
    case 1:
      return fc::launch_bwd<T, fc::kLse>(p, dq, dk, nullptr);
    case 2:
      return fc::launch_fwd<T, fc::kSp>(p, nullptr);
    case 3:
      return fc::launch_bwd<T, fc::kSp>(p, dq, dk, nullptr);
    case 4:
      return fc::launch_sym_bwd<T, fc::kLse>(p, dq, nullptr);
    case 5:
      return fc::launch_sym_bwd<T, fc::kSp>(p, dq, nullptr);
    default:
      return -1;
  }
}

}  // namespace

extern "C" int fcemu_run(int op, int dtype, const void* q, const void* k, const int64_t* qlab,
                         const int64_t* klab, int64_t n, int64_t m, int64_t d,
                         int64_t self_offset, double scale, double w_pos, double w_neg, double k1,
                         int mode, const float* pw, const float* lpw, int64_t bq, int64_t bk,
                         const float* g0, const float* g1, const float* stat, const float* eta,
                         float* out0, float* out1, float* out2, void* dq, void* dk,
                         int no_resident) {
  fc::Params p = fc::make_params(q, k, dtype == 0 ? 4 : 2, qlab, klab, n, m, d, self_offset,
                                 scale, mode, pw, lpw, bq, bk);
  p.no_resident = no_resident != 0;
  fc::set_lse_weights(p, w_pos, w_neg, k1);
  p.g_lse = g0;
  p.g_psum = g1;
  p.lse = stat;
  p.eta = eta;
  p.out0 = out0;
  p.out1 = out1;
  p.out2 = out2;
  switch (dtype) {
    case 0:
      return run<float>(op, p, dq, dk);
    case 1:
      return run<__half>(op, p, dq, dk);
    case 2:
      return run<__nv_bfloat16>(op, p, dq, dk);
    default:
      return -1;
  }
}

// Whether the launch plan stages with 16-byte accesses for these addresses (the host-side
// property the vectorised path depends on).
extern "C" int fcemu_vec_ok(const void* q, const void* k, int64_t d, int elem_bytes) {
  return fc::vec_ok(q, k, d, elem_bytes) ? 1 : 0;
}

// The width of the resident kernels the launch plan picks (0: the streamed kernels).
extern "C" int fcemu_resident_width(int dtype, const void* q, const void* k, int64_t n,
                                    int64_t m, int64_t d) {
  const fc::Params p = fc::make_params(q, k, dtype == 0 ? 4 : 2, nullptr, nullptr, n, m, d, -1,
                                       1.0, 0, nullptr, nullptr, 1, 1);
  return dtype == 0 ? fc::resident_width<float>(p) : fc::resident_width<__half>(p);
}
