// Input validation shared by the CPU and CUDA implementations of the flashcon:: ops.
// Messages name the argument and say what to pass instead (the Python layer normally
// guarantees all of this; these checks catch direct op calls).
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <string>

namespace flashcon {

inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

struct Problem {
  int64_t n, m, d;
};

// q [N, D] and k [M, D]: same floating dtype and device, contiguous; labels [N] and [M].
inline Problem check_qk(const char* op, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& qlab, const at::Tensor& klab, c10::DeviceType dev) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "flashcon::", op,
              ": q and k must be 2-D [rows, D], got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "flashcon::", op,
              ": q and k must have the same feature size D, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "flashcon::", op,
              ": q and k must have the same dtype, got ", q.scalar_type(), " and ",
              k.scalar_type(), "; cast one of them");
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "flashcon::", op, ": q and k must be float32, float64, float16 or bfloat16, got ",
              t);
  for (const at::Tensor* x : {&q, &k, &qlab, &klab}) {
    TORCH_CHECK(x->device().type() == dev, "flashcon::", op, ": every tensor must be on ",
                c10::DeviceTypeName(dev), " for this kernel, got one on ", x->device());
  }
  TORCH_CHECK(q.device() == k.device() && q.device() == qlab.device() &&
                  q.device() == klab.device(),
              "flashcon::", op, ": q, k, qlab and klab must be on the same device");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "flashcon::", op,
              ": q and k must be contiguous; call .contiguous() first");
  TORCH_CHECK(qlab.dim() == 1 && qlab.size(0) == q.size(0), "flashcon::", op,
              ": qlab must have shape [N] = [", q.size(0), "], got ", qlab.sizes());
  TORCH_CHECK(klab.dim() == 1 && klab.size(0) == k.size(0), "flashcon::", op,
              ": klab must have shape [M] = [", k.size(0), "], got ", klab.sizes());
  for (const at::Tensor* x : {&qlab, &klab}) {
    TORCH_CHECK(x->scalar_type() == at::kLong || x->scalar_type() == at::kInt, "flashcon::", op,
                ": labels must be int64 (or int32) class ids, got ", x->scalar_type(),
                "; convert with .long()");
  }
  return {q.size(0), k.size(0), q.size(1)};
}

// A per-row statistic [N] in the statistics dtype (float64 for float64 q, float32 otherwise).
inline void check_stat(const char* op, const char* name, const at::Tensor& x,
                       const at::Tensor& q) {
  const auto want = stat_dtype(q.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == q.size(0), "flashcon::", op, ": ", name,
              " must have shape [N] = [", q.size(0), "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == want, "flashcon::", op, ": ", name, " must be ", want,
              " (the statistics dtype of ", q.scalar_type(), " inputs), got ", x.scalar_type());
  TORCH_CHECK(x.device() == q.device(), "flashcon::", op, ": ", name, " must be on ",
              q.device(), ", got ", x.device());
}

inline void check_weights(const char* op, double w_pos, double w_neg, double k1) {
  TORCH_CHECK(w_pos >= 0 && w_neg >= 0 && k1 >= 0, "flashcon::", op,
              ": weights must be non-negative, got w_pos=", w_pos, " w_neg=", w_neg,
              " k1=", k1);
}

// SupContrast's positive-weight matrix [Bq, Bk] (m_ij = pos_weight[i mod Bq, j mod Bk]): a
// floating 2-D tensor on the device of q, read per tile. Returned in the statistics dtype,
// contiguous (it is O(B²), so the conversion is cheap); an undefined tensor when absent.
inline at::Tensor prepare_pos_weight(const char* op, const std::optional<at::Tensor>& pw,
                                     const at::Tensor& q) {
  if (!pw.has_value() || !pw->defined()) return at::Tensor();
  const at::Tensor& w = *pw;
  TORCH_CHECK(w.dim() == 2 && w.size(0) > 0 && w.size(1) > 0, "flashcon::", op,
              ": pos_weight must be a non-empty 2-D [Bq, Bk] matrix, got shape ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "flashcon::", op,
              ": pos_weight must be a floating tensor (the statistics dtype ",
              stat_dtype(q.scalar_type()), "), got ", w.scalar_type());
  TORCH_CHECK(w.device() == q.device(), "flashcon::", op, ": pos_weight must be on ", q.device(),
              ", got ", w.device());
  return w.detach().to(stat_dtype(q.scalar_type())).contiguous();
}

// log of the positive weights, -inf where a weight is not positive (the pair is no positive).
inline at::Tensor log_pos_weight(const at::Tensor& pw) {
  if (!pw.defined()) return at::Tensor();
  return at::where(pw > 0, pw.log(), at::full({}, -std::numeric_limits<double>::infinity(),
                                              pw.options()));
}

inline int pos_mode(bool multilabel, const at::Tensor& pw) {
  return pw.defined() ? 2 : (multilabel ? 1 : 0);
}

}  // namespace flashcon
