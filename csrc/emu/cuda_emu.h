// A host emulation of the CUDA features csrc/cuda/kernels.cuh uses, so that the kernels' own
// source runs on a machine without a GPU (tests/test_cuda_emu.py, in `make test`).
//
// Every CUDA thread of a CTA is an OS thread running the kernel function; CTAs run one after
// another. __syncthreads() is a barrier over the CTA's live threads (a thread that returns
// leaves it, as on the device), __shfl_xor_sync exchanges through a per-warp buffer between
// two warp barriers, and a barrier that is not reached within a minute aborts with a message
// (a deadlock or a divergent barrier in the kernel). Shared memory is a per-CTA buffer filled
// with 0xFF bytes (NaN as float, -1 as an integer) at the start of every CTA, so a read of a
// slot no thread wrote shows up in the results.
//
// WMMA (nvcuda::wmma) is emulated by its documented matrix semantics: each lane holds the whole
// tile of a fragment (the device's element-to-lane layout is unspecified and the kernels never
// rely on it); load_matrix_sync checks the pointer and stride alignment the device requires;
// only lane 0 stores, so a warp that reads a stored tile before a barrier reads poison. 16-byte
// vector loads check their alignment. Products accumulate in float32, in k order.
//
// cp.async (16-byte global-to-shared copies in commit groups) copies nothing when issued: a
// thread's groups land when that thread waits for them (cp.async.wait_group), so a kernel that
// reads a tile before waiting, or before the barrier after the wait, reads poison or a stale
// tile. A thread that returns with copies it never waited for aborts. Dynamic shared memory is
// checked against the size the launch asked for.
//
// What this proves: index arithmetic, bounds, masking, barrier placement (within what real
// concurrency exposes), alignment of WMMA and vector accesses, and the arithmetic. What it does
// not: speed, bank conflicts, register or shared-memory limits (nvcc and tests/test_cpp_build.py
// check those).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;

namespace flashcon_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "flashcon CUDA emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// A reusable barrier over a set of threads that may shrink (a returning thread drops out).
class Barrier {
 public:
  void reset(int n) {
    expected_ = n;
    arrived_ = 0;
  }
  void wait(const char* what) {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return gen_ != gen; })) fail(what);
  }
  void drop() {
    std::lock_guard<std::mutex> lock(mu_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0;
  uint64_t gen_ = 0;
};

constexpr size_t kSmemBytes = 228 * 1024;  // an sm_90 SM's shared memory

struct Cta {
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint64_t> xchg;  // one slot per thread for shuffles
  alignas(128) unsigned char smem[kSmemBytes];
};

struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;  // false: 16 zero bytes (cp.async's zero-fill)
};

inline thread_local uint3 tl_thread{0, 0, 0};
inline thread_local std::vector<PendingCopy> tl_open;
inline thread_local std::vector<std::vector<PendingCopy>> tl_groups;
inline size_t g_dyn_smem = 0;
inline thread_local uint3 tl_block{0, 0, 0};
inline thread_local Cta* tl_cta = nullptr;

inline unsigned lane() { return tl_thread.x % 32; }
inline unsigned warp() { return tl_thread.x / 32; }

inline void syncthreads() { tl_cta->block.wait("__syncthreads() not reached by every thread"); }
inline void syncwarp() { tl_cta->warps[warp()]->wait("__syncwarp() not reached by the warp"); }

template <typename T>
T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const unsigned me = tl_thread.x, other = (me & ~31u) | ((me % 32) ^ static_cast<unsigned>(mask));
  tl_cta->xchg[me] = bits;
  syncwarp();
  bits = tl_cta->xchg[other];
  syncwarp();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
T& smem_object() {
  static_assert(sizeof(T) <= kSmemBytes, "shared memory object larger than an SM's");
  return *reinterpret_cast<T*>(tl_cta->smem);
}

template <typename T>
T& dyn_smem_object() {
  if (sizeof(T) > g_dyn_smem) fail("dynamic shared memory object larger than the launch's");
  return smem_object<T>();
}

inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail(what);
}

inline void cp_async16(void* dst, const void* src, bool valid) {
  check_aligned(dst, 16, "cp.async: shared address not 16-byte aligned");
  if (valid) check_aligned(src, 16, "cp.async: global address not 16-byte aligned");
  tl_open.push_back({dst, src, valid});
}
inline void cp_commit() {
  tl_groups.push_back(std::move(tl_open));
  tl_open.clear();
}
// Land all but the `keep` most recently committed groups.
inline void cp_wait(size_t keep) {
  while (tl_groups.size() > keep) {
    for (const PendingCopy& c : tl_groups.front()) {
      if (c.valid)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    tl_groups.erase(tl_groups.begin());
  }
}
inline void cp_check_drained() {
  if (!tl_open.empty()) fail("cp.async copies issued but never committed");
  for (const auto& g : tl_groups)
    if (!g.empty()) fail("cp.async copies never waited for");
}

// kernel<<<grid, block>>>(args...): CTAs in order, one OS thread per CUDA thread.
template <typename... KArgs, typename... Args>
cudaError_t launch_dyn(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dyn_smem,
                       Args... args) {
  if (dyn_smem > kSmemBytes) fail("dynamic shared memory request larger than an SM's");
  if (block.y != 1 || block.z != 1) fail("only 1-D thread blocks are emulated");
  const int nthreads = static_cast<int>(block.x);
  const int nwarps = (nthreads + 31) / 32;
  g_dyn_smem = dyn_smem;
  auto cta = std::make_unique<Cta>();
  for (int w = 0; w < nwarps; ++w) cta->warps.push_back(std::make_unique<Barrier>());
  cta->xchg.assign(static_cast<size_t>(nwarps) * 32, 0);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(cta->smem, 0xFF, sizeof(cta->smem));
        cta->block.reset(nthreads);
        for (int w = 0; w < nwarps; ++w)
          cta->warps[w]->reset(std::min(32, nthreads - 32 * w));
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (int t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t, bx, by, bz] {
            tl_thread = {static_cast<unsigned>(t), 0, 0};
            tl_block = {bx, by, bz};
            tl_cta = cta.get();
            kernel(args...);
            cp_check_drained();
            cta->warps[t / 32]->drop();
            cta->block.drop();
          });
        }
        for (auto& th : threads) th.join();
      }
  return cudaSuccess;
}

template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Args... args) {
  return launch_dyn(kernel, grid, block, 0, args...);
}

}  // namespace flashcon_emu

#define threadIdx (::flashcon_emu::tl_thread)
#define blockIdx (::flashcon_emu::tl_block)

inline void __syncthreads() { ::flashcon_emu::syncthreads(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return ::flashcon_emu::shfl_xor(v, mask);
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// ---- 16-bit floating types (explicit conversions only, as in torch's CUDA builds) -------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1f,
                 man = h.bits & 0x3ffu;
  float f;
  if (exp == 0x1f) {
    const uint32_t u = sign | 0x7f800000u | (man << 13);
    std::memcpy(&f, &u, 4);
  } else if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
    if (sign) f = -f;
  } else {
    const uint32_t u = sign | ((exp + 112) << 23) | (man << 13);
    std::memcpy(&f, &u, 4);
  }
  return f;
}
inline __half __float2half_rn(float f) {
  // Through double: the nearest half of a float is the nearest half of its exact value.
  const double a = std::fabs(static_cast<double>(f));
  const uint16_t sign = std::signbit(f) ? 0x8000u : 0;
  if (std::isnan(f)) return {static_cast<uint16_t>(0x7e00u)};
  if (a >= 65520.0) return {static_cast<uint16_t>(sign | 0x7c00u)};
  if (a < std::ldexp(1.0, -14)) {  // subnormal: multiples of 2^-24
    const double q = std::nearbyint(a * std::ldexp(1.0, 24));
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(q))};
  }
  int e;
  const double m = std::frexp(a, &e);                     // a = m·2^e, m in [0.5, 1)
  const double q = std::nearbyint(m * 2048.0);            // 11 significant bits
  uint32_t bits = static_cast<uint32_t>(e + 14) << 10;    // exponent field of 2^(e-1)
  bits += static_cast<uint32_t>(q) - 1024;                // q in [1024, 2048]: a carry rounds up
  return {static_cast<uint16_t>(sign | bits)};
}

namespace flashcon_emu {
inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
}  // namespace flashcon_emu

// ---- nvcuda::wmma ---------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int R = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int C = std::is_same_v<Use, matrix_a> ? K : N;
  float v[R][C];
};

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float x) {
  for (auto& row : f.v)
    for (auto& e : row) e = x;
}

// A 16-bit operand tile from memory: 32-byte aligned pointer, stride a multiple of 16 bytes.
template <typename Use, int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ld) {
  ::flashcon_emu::check_aligned(p, 32, "wmma::load_matrix_sync pointer not 32-byte aligned");
  if ((ld * sizeof(T)) % 16 != 0) ::flashcon_emu::fail("wmma::load_matrix_sync stride");
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::R; ++r)
    for (int c = 0; c < F::C; ++c)
      f.v[r][c] = ::flashcon_emu::to_float(std::is_same_v<L, row_major> ? p[r * ld + c]
                                                                        : p[c * ld + r]);
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < K; ++k) s = std::fma(a.v[i][k], b.v[k][j], s);
      out[i][j] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ld,
                       layout_t layout) {
  ::flashcon_emu::check_aligned(p, 32, "wmma::store_matrix_sync pointer not 32-byte aligned");
  if ((ld * sizeof(float)) % 16 != 0) ::flashcon_emu::fail("wmma::store_matrix_sync stride");
  if (::flashcon_emu::lane() != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.v[r][c];
}

}  // namespace wmma
}  // namespace nvcuda

// ---- hooks of kernels.cuh -------------------------------------------------------------------
#define FLASHCON_SMEM(Type, name) Type& name = ::flashcon_emu::smem_object<Type>()
#define FLASHCON_DYN_SMEM(Type, name) Type& name = ::flashcon_emu::dyn_smem_object<Type>()
#define FLASHCON_LAUNCH(kernel, grid, block, stream, ...) \
  ::flashcon_emu::launch(kernel, grid, block, __VA_ARGS__)
#define FLASHCON_LAUNCH_DYN(kernel, grid, block, smem, stream, ...) \
  ::flashcon_emu::launch_dyn(kernel, grid, block, smem, __VA_ARGS__)
#define FLASHCON_CP_ASYNC16(dst, src, valid) ::flashcon_emu::cp_async16((dst), (src), (valid))
#define FLASHCON_CP_COMMIT() ::flashcon_emu::cp_commit()
#define FLASHCON_CP_WAIT(keep) ::flashcon_emu::cp_wait(keep)
// 16-byte loads and stores (memcpy on the host: no aliasing assumptions).
#define FLASHCON_LD16(p) (::flashcon_emu::check_aligned((p), 16, "misaligned 16-byte load"), \
                          ::flashcon_emu::ld16(p))
#define FLASHCON_ST16(p, v) (::flashcon_emu::check_aligned((p), 16, "misaligned 16-byte store"), \
                             ::flashcon_emu::st16((p), (v)))
namespace flashcon_emu {
inline uint4 ld16(const void* p) {
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void st16(void* p, const uint4& v) { std::memcpy(p, &v, 16); }
}  // namespace flashcon_emu
