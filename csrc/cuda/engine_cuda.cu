// The flashcon:: ops on CUDA tensors: argument checks, tensor preparation and the calls into
// the kernels of csrc/cuda/kernels.cuh (which says how they tile the work).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "flashcon/checks.h"
#include "kernels.cuh"

namespace flashcon {
namespace cuda {
namespace {

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

Params base_params(const Prepared& o, int64_t self_offset, double scale) {
  const bool pw = o.pw.defined();
  return make_params(o.q.data_ptr(), o.k.data_ptr(), static_cast<int>(o.q.element_size()),
                     o.ql.data_ptr<int64_t>(), o.kl.data_ptr<int64_t>(), o.pr.n, o.pr.m, o.pr.d,
                     self_offset, scale, o.mode, pw ? o.pw.data_ptr<float>() : nullptr,
                     pw ? o.lpw.data_ptr<float>() : nullptr, pw ? o.pw.size(0) : 1,
                     pw ? o.pw.size(1) : 1);
}

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
void run_bwd(const Prepared& o, const Params& p, at::Tensor& dq, at::Tensor& dk) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(o.q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK((cuda::launch_bwd<T, MODE>(p, dq.data_ptr(), dk.data_ptr(), stream)));
  });
}

template <int MODE>
void run_sym_bwd(const Prepared& o, const Params& p, at::Tensor& dz) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(o.q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK((cuda::launch_sym_bwd<T, MODE>(p, dz.data_ptr(), stream)));
  });
}

template <int MODE>
void run_fwd(const Prepared& o, const Params& p) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(o.q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK((cuda::launch_fwd<T, MODE>(p, stream)));
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
  run_fwd<kLse>(o, p);
  return {lse, psum, pcnt};
}

// A backward op's inputs, checked, with the statistics made contiguous (kept here: p points
// into them) and the kernels' Params.
struct BwdCall {
  Prepared o;
  at::Tensor s0, s1, s2;
  Params p;
};

BwdCall lse_bwd_call(const char* op, const at::Tensor& g_lse, const at::Tensor& g_psum,
                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& qlab,
                     const at::Tensor& klab, const at::Tensor& lse, int64_t self_offset,
                     double scale, double w_pos, double w_neg, double k1, bool multilabel,
                     const OptTensor& pos_weight) {
  check_weights(op, w_pos, w_neg, k1);
  BwdCall c{prepare(op, q, k, qlab, klab, multilabel, pos_weight)};
  check_stat(op, "g_lse", g_lse, q);
  check_stat(op, "g_psum", g_psum, q);
  check_stat(op, "lse", lse, q);
  c.s0 = g_lse.detach().contiguous();
  c.s1 = g_psum.detach().contiguous();
  c.s2 = lse.detach().contiguous();
  c.p = base_params(c.o, self_offset, scale);
  set_lse_weights(c.p, w_pos, w_neg, k1);
  c.p.g_lse = c.s0.data_ptr<float>();
  c.p.g_psum = c.s1.data_ptr<float>();
  c.p.lse = c.s2.data_ptr<float>();
  return c;
}

BwdCall sp_bwd_call(const char* op, const at::Tensor& g_sp, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& qlab, const at::Tensor& klab,
                    const at::Tensor& eta, int64_t self_offset, double scale, bool multilabel,
                    const OptTensor& pos_weight) {
  BwdCall c{prepare(op, q, k, qlab, klab, multilabel, pos_weight)};
  check_stat(op, "g_sp", g_sp, q);
  check_stat(op, "eta", eta, q);
  c.s0 = g_sp.detach().contiguous();
  c.s1 = eta.detach().contiguous();
  c.p = base_params(c.o, self_offset, scale);
  c.p.g_lse = c.s0.data_ptr<float>();
  c.p.eta = c.s1.data_ptr<float>();
  return c;
}

std::tuple<at::Tensor, at::Tensor> lse_bwd(const at::Tensor& g_lse, const at::Tensor& g_psum,
                                           const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& qlab, const at::Tensor& klab,
                                           const at::Tensor& lse, int64_t self_offset,
                                           double scale, double w_pos, double w_neg, double k1,
                                           bool multilabel, const OptTensor& pos_weight) {
  const c10::cuda::CUDAGuard guard(q.device());
  const BwdCall c = lse_bwd_call("lse_bwd", g_lse, g_psum, q, k, qlab, klab, lse, self_offset,
                                 scale, w_pos, w_neg, k1, multilabel, pos_weight);
  at::Tensor dq = at::empty_like(c.o.q), dk = at::empty_like(c.o.k);
  run_bwd<kLse>(c.o, c.p, dq, dk);
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
  run_fwd<kSp>(o, p);
  return {sp, r};
}

std::tuple<at::Tensor, at::Tensor> sp_bwd(const at::Tensor& g_sp, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& qlab,
                                          const at::Tensor& klab, const at::Tensor& eta,
                                          int64_t self_offset, double scale, bool multilabel,
                                          const OptTensor& pos_weight) {
  const c10::cuda::CUDAGuard guard(q.device());
  const BwdCall c =
      sp_bwd_call("sp_bwd", g_sp, q, k, qlab, klab, eta, self_offset, scale, multilabel,
                  pos_weight);
  at::Tensor dq = at::empty_like(c.o.q), dk = at::empty_like(c.o.k);
  run_bwd<kSp>(c.o, c.p, dq, dk);
  return {dq, dk};
}

// ---- symmetric path ------------------------------------------------------------------------
// The forward ops run the general forward with q = k = z and self_offset = 0. The backward ops
// run one launch that writes dz = dq + dk directly (kernels.cuh: SYM), computing each tile of
// S once, where the general backward computes it in each of its two launches. Not the CPU's
// tile-pair schedule (which halves the forward too but accumulates each pair into two row
// blocks: atomics on a GPU, so not bitwise reproducible).

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
  const c10::cuda::CUDAGuard guard(z.device());
  const BwdCall c = lse_bwd_call("sym_lse_bwd", g_lse, g_psum, z, z, lab, lab, lse, 0, scale,
                                 w_pos, w_neg, k1, multilabel, pos_weight);
  at::Tensor dz = at::empty_like(c.o.q);
  run_sym_bwd<kLse>(c.o, c.p, dz);
  return dz;
}

std::tuple<at::Tensor, at::Tensor> sym_sp_fwd(const at::Tensor& z, const at::Tensor& lab,
                                              const at::Tensor& eta, double scale,
                                              bool multilabel, const OptTensor& pos_weight) {
  return sp_fwd(z, z, lab, lab, eta, 0, scale, multilabel, pos_weight);
}

at::Tensor sym_sp_bwd(const at::Tensor& g_sp, const at::Tensor& z, const at::Tensor& lab,
                      const at::Tensor& eta, double scale, bool multilabel,
                      const OptTensor& pos_weight) {
  const c10::cuda::CUDAGuard guard(z.device());
  const BwdCall c =
      sp_bwd_call("sym_sp_bwd", g_sp, z, z, lab, lab, eta, 0, scale, multilabel, pos_weight);
  at::Tensor dz = at::empty_like(c.o.q);
  run_sym_bwd<kSp>(c.o, c.p, dz);
  return dz;
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
