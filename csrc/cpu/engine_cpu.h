// CPU kernels of the flashcon:: ops: the streaming engine of python/flashcon/engine.py.
// What the CPU files share: the vectorisation scheme of the row epilogues, the operands, and
// the general ops' entry points the symmetric ops fall back to.
//
//   engine_cpu.h   this header
//   operands.cpp   prepare(): operands in the compute dtype, labels, positive weights
//   general.cpp    the general (rectangular) ops lse_*/sp_*: tiles, row epilogues, drivers
//   symmetric.cpp  the symmetric 'all'-mode ops sym_*: tile pairs computed once, a static
//                  exponential shift, and a round-robin schedule that needs no dZ copies
//   register.cpp   TORCH_LIBRARY_IMPL(flashcon, CPU)
//
// Vectorisation: the row epilogues are compiled for AVX-512, AVX2 and baseline x86-64
// (function multi-versioning picks one at load time). Their reductions run over fixed lane
// arrays so the compiler can vectorise them without reassociating sums (-ffast-math is not
// used); the float exponential is tile_math's polynomial, which vectorises where libm's does not.
//
// Positive weights (contract v2): each row epilogue is instantiated for class labels, int64
// label bitmasks and a [Bq, Bk] pos_weight matrix (read per tile through the row's slice and
// the column indices j mod Bk; its logarithm is taken once, O(Bq·Bk)).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "flashcon/checks.h"
#include "flashcon/tile_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define FLASHCON_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FLASHCON_CLONES
#endif
#define FLASHCON_INLINE inline __attribute__((always_inline))
#define FLASHCON_INLINE_LAMBDA __attribute__((always_inline))

namespace flashcon {
namespace cpu {

namespace tm = flashcon::tile_math;

template <typename T>
constexpr int lanes() {
  return 64 / sizeof(T);  // one AVX-512 register
}

// Instantiates BODY for the positive-weight mode known at run time (inside one clone).
#define FLASHCON_MODE_SWITCH(mode, BODY)        \
  switch (mode) {                               \
    case tm::kLabels: {                         \
      constexpr int MODE = tm::kLabels;         \
      BODY;                                     \
      break;                                    \
    }                                           \
    case tm::kMultiLabel: {                     \
      constexpr int MODE = tm::kMultiLabel;     \
      BODY;                                     \
      break;                                    \
    }                                           \
    default: {                                  \
      constexpr int MODE = tm::kPosWeight;      \
      BODY;                                     \
      break;                                    \
    }                                           \
  }

// Operands in the compute dtype (float32 for half/bfloat16 inputs), labels as int64, and the
// positive weights (pos_weight in the statistics dtype and its logarithm) when given.
struct Operands {
  at::Tensor q, k, ql, kl, pw, lpw;
  int64_t n, m, d, bq = 1, bk = 1;
  int mode = tm::kLabels;
};

// The operands of one op call, checked (checks.h: check_qk; `op` names the op in messages).
Operands prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& qlab,
                 const at::Tensor& klab, bool multilabel,
                 const std::optional<at::Tensor>& pos_weight);

using OptTensor = std::optional<at::Tensor>;

// The general path's forward and backward of the lse op on prepared operands (general.cpp);
// the symmetric ops fall back to them. Outputs in the statistics dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_fwd_impl(const Operands& o,
                                                            int64_t self_offset, double scale,
                                                            double w_pos, double w_neg,
                                                            double k1);
std::tuple<at::Tensor, at::Tensor> lse_bwd_impl(const Operands& o, const at::Tensor& g_lse,
                                                const at::Tensor& g_psum, const at::Tensor& lse,
                                                int64_t self_offset, double scale, double w_pos,
                                                double w_neg, double k1);

// The ops (schemas in csrc/ops.cpp), registered for CPU in register.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_fwd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& qlab,
                                                       const at::Tensor& klab, int64_t self_offset,
                                                       double scale, double w_pos, double w_neg,
                                                       double k1, bool multilabel,
                                                       const OptTensor& pos_weight);
std::tuple<at::Tensor, at::Tensor> lse_bwd(const at::Tensor& g_lse, const at::Tensor& g_psum,
                                           const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& qlab, const at::Tensor& klab,
                                           const at::Tensor& lse, int64_t self_offset,
                                           double scale, double w_pos, double w_neg, double k1,
                                           bool multilabel, const OptTensor& pos_weight);
std::tuple<at::Tensor, at::Tensor> sp_fwd(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& qlab, const at::Tensor& klab,
                                          const at::Tensor& eta, int64_t self_offset,
                                          double scale, bool multilabel,
                                          const OptTensor& pos_weight);
std::tuple<at::Tensor, at::Tensor> sp_bwd(const at::Tensor& g_sp, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& qlab,
                                          const at::Tensor& klab, const at::Tensor& eta,
                                          int64_t self_offset, double scale, bool multilabel,
                                          const OptTensor& pos_weight);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_lse_fwd(const at::Tensor& z,
                                                           const at::Tensor& lab, double scale,
                                                           double w_pos, double w_neg, double k1,
                                                           bool multilabel,
                                                           const OptTensor& pos_weight);
at::Tensor sym_lse_bwd(const at::Tensor& g_lse, const at::Tensor& g_psum, const at::Tensor& z,
                       const at::Tensor& lab, const at::Tensor& lse, double scale, double w_pos,
                       double w_neg, double k1, bool multilabel, const OptTensor& pos_weight);
std::tuple<at::Tensor, at::Tensor> sym_sp_fwd(const at::Tensor& z, const at::Tensor& lab,
                                              const at::Tensor& eta, double scale,
                                              bool multilabel, const OptTensor& pos_weight);
at::Tensor sym_sp_bwd(const at::Tensor& g_sp, const at::Tensor& z, const at::Tensor& lab,
                      const at::Tensor& eta, double scale, bool multilabel,
                      const OptTensor& pos_weight);

}  // namespace cpu
}  // namespace flashcon
