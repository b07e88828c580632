// Schemas of the flashcon:: ops (the engine contract of python/flashcon/engine.py).
//
// The kernels register per device: csrc/cpu/ (TORCH_LIBRARY_IMPL(flashcon, CPU)) and, in CUDA
// builds, csrc/cuda/ (TORCH_LIBRARY_IMPL(flashcon, CUDA)). Fake (meta) implementations and
// autograd are registered from Python (flashcon.engine._cpp_ops), not here.
#include <Python.h>
#include <torch/library.h>

namespace {

bool has_cuda() {
#ifdef FLASHCON_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(flashcon, m) {
  // Contract v2: the last two arguments pick the positive weights m_ij (class labels, int64
  // label bitmasks, or a [Bq, Bk] pos_weight matrix read per tile).
  m.def(
      "lse_fwd(Tensor q, Tensor k, Tensor qlab, Tensor klab, int self_offset, float scale, "
      "float w_pos, float w_neg, float k1, bool multilabel, Tensor? pos_weight) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "lse_bwd(Tensor g_lse, Tensor g_psum, Tensor q, Tensor k, Tensor qlab, Tensor klab, "
      "Tensor lse, int self_offset, float scale, float w_pos, float w_neg, float k1, "
      "bool multilabel, Tensor? pos_weight) -> (Tensor, Tensor)");
  m.def(
      "sp_fwd(Tensor q, Tensor k, Tensor qlab, Tensor klab, Tensor eta, int self_offset, "
      "float scale, bool multilabel, Tensor? pos_weight) -> (Tensor, Tensor)");
  m.def(
      "sp_bwd(Tensor g_sp, Tensor q, Tensor k, Tensor qlab, Tensor klab, Tensor eta, "
      "int self_offset, float scale, bool multilabel, Tensor? pos_weight) -> (Tensor, Tensor)");
  // The symmetric path ('all' mode): the ops above with q = k = z, qlab = klab = lab,
  // self_offset = 0 and dz = dq + dk.
  m.def(
      "sym_lse_fwd(Tensor z, Tensor lab, float scale, float w_pos, float w_neg, float k1, "
      "bool multilabel, Tensor? pos_weight) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sym_lse_bwd(Tensor g_lse, Tensor g_psum, Tensor z, Tensor lab, Tensor lse, float scale, "
      "float w_pos, float w_neg, float k1, bool multilabel, Tensor? pos_weight) -> Tensor");
  m.def(
      "sym_sp_fwd(Tensor z, Tensor lab, Tensor eta, float scale, bool multilabel, "
      "Tensor? pos_weight) -> (Tensor, Tensor)");
  m.def(
      "sym_sp_bwd(Tensor g_sp, Tensor z, Tensor lab, Tensor eta, float scale, bool multilabel, "
      "Tensor? pos_weight) -> Tensor");
  // No tensor argument to dispatch on: a catch-all kernel answers on every device.
  m.def("has_cuda() -> bool", &has_cuda);
}

// `import flashcon._C` loads this library (running the registrations above); the module itself
// is empty: every entry point is reached through torch.ops.flashcon.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
