// prepare(): the operands of one CPU op call (engine_cpu.h).
#include "engine_cpu.h"

namespace flashcon {
namespace cpu {

Operands prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& qlab,
                 const at::Tensor& klab, bool multilabel,
                 const std::optional<at::Tensor>& pos_weight) {
  const Problem pr = check_qk(op, q, k, qlab, klab, c10::DeviceType::CPU);
  const auto acc = stat_dtype(q.scalar_type());
  Operands o;
  // Detached: the ops sit below autograd (engine.py registers their gradients), and the tile
  // products below are plain ATen calls that must not record a graph.
  o.q = q.detach().to(acc).contiguous();
  const bool same = k.data_ptr() == q.data_ptr() && k.sizes() == q.sizes();
  o.k = same ? o.q : k.detach().to(acc).contiguous();
  o.ql = qlab.to(at::kLong).contiguous();
  o.kl = klab.to(at::kLong).contiguous();
  o.pw = prepare_pos_weight(op, pos_weight, q);
  o.lpw = log_pos_weight(o.pw);
  o.mode = pos_mode(multilabel, o.pw);
  if (o.pw.defined()) {
    o.bq = o.pw.size(0);
    o.bk = o.pw.size(1);
  }
  o.n = pr.n;
  o.m = pr.m;
  o.d = pr.d;
  return o;
}

}  // namespace cpu
}  // namespace flashcon
