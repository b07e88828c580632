// The CPU kernels of the flashcon:: ops (schemas in csrc/ops.cpp).
#include <torch/library.h>

#include "engine_cpu.h"

TORCH_LIBRARY_IMPL(flashcon, CPU, m) {
  m.impl("lse_fwd", &flashcon::cpu::lse_fwd);
  m.impl("lse_bwd", &flashcon::cpu::lse_bwd);
  m.impl("sp_fwd", &flashcon::cpu::sp_fwd);
  m.impl("sp_bwd", &flashcon::cpu::sp_bwd);
  m.impl("sym_lse_fwd", &flashcon::cpu::sym_lse_fwd);
  m.impl("sym_lse_bwd", &flashcon::cpu::sym_lse_bwd);
  m.impl("sym_sp_fwd", &flashcon::cpu::sym_sp_fwd);
  m.impl("sym_sp_bwd", &flashcon::cpu::sym_sp_bwd);
}
