// CUDA kernels of the flashcon:: ops (the streaming engine of python/flashcon/engine.py) and
// their launch plans. No ATen here: csrc/cuda/engine_cuda.cu checks and prepares the tensors and
// calls the launch_* functions; the same source also compiles for the host under
// csrc/emu/cuda_emu.h, where tests/test_cuda_emu.py runs it (one OS thread per CUDA thread)
// against the float64 oracle on a machine without a GPU.
//
// Tiling. A CTA of 128 threads (4 warps) owns 64 rows and streams over 64-column tiles; tiles
// of similarities S = A·Bᵀ are formed in shared memory (WMMA 16×16×16 with fp32 accumulate for
// float16/bfloat16, a 4×8 register micro-tile of FMAs per thread for float32) and the per-pair
// math is flashcon/tile_math.h, the same functions the CPU kernels run. Two kernel families:
//
// - Resident (16-bit, 0 < D <= 128, rows 16-byte aligned with D % 8 == 0; the usual case):
//   the CTA's row block A (64 × 64 or 64 × 128) is loaded once into shared memory and stays
//   there for the whole column sweep; column tiles B arrive by cp.async into two buffers, the
//   next one in flight while the current one is used, and in the backward each B serves both
//   S = A·Bᵀ and G·B. Global memory is read once per CTA and tile.
// - Streamed (float32, D > 128, unaligned or odd-D 16-bit rows): A and B are staged slice by
//   slice over D (64 wide for 16-bit with 16-byte loads where aligned, 32 wide for float32),
//   and the backward stages the tile's vectors again, 64 columns of D at a time.
//
// Forward (lse and softplus passes): two threads per row, each keeping an online max-shifted
// log-sum-exp (or the softplus/sigmoid sums) over half of every tile; a thread evaluates each
// pair's weight and exponent once per tile (kept in registers between the max and the sum);
// the halves are merged with a shuffle at the end.
//
// Backward: dQ and dK are two launches of one kernel, each CTA owning a 64-row block of its
// output and up to 128 columns of D (two 64-wide chunks of accumulators), so no two CTAs write
// the same element: no atomics, and results are bitwise reproducible. The dQ launch recomputes
// S = Q_blk·K_tileᵀ, forms G in shared memory once per tile and accumulates G·K_tile for both
// D chunks; the dK launch does the same with Sᵀ = K_blk·Q_tileᵀ and Gᵀ·Q_tile. S is computed
// once per tile for D <= 128 (once per 128 columns of D beyond). The symmetric ops' backward
// (q = k = z) is one launch writing dz = dq + dk (SYM in backward.cuh).
//
// Positive weights (contract v2): class labels, int64 label bitmasks, or a [Bq, Bk] pos_weight
// matrix read per pair from global memory (cached; it is O(B²)), never expanded to N×M.
//
// Precision: products accumulate in float32; statistics are float32; float64 is not supported
// here (the CPU kernels and backend='torch' take it).
//
// The source, by trade (each header includes what it builds on; include this one):
//
//   common.cuh    the CUDA or emulator layer, tile constants, Params, staging geometry and
//                 shared memory, pair weights, WMMA wrappers, staging, the streamed tile product
//   forward.cuh   the forward's per-row state and tile epilogue, and the streamed forward kernel
//   backward.cuh  the backward's statistics, per-pair G, output stores, the streamed kernel
//   resident.cuh  the resident kernels: row block in shared memory, cp.async column tiles
//   launch.cuh    the launch plans (host): Params filling, kernel choice, grids
#pragma once

#include "common.cuh"
#include "forward.cuh"
#include "backward.cuh"
#include "resident.cuh"
#include "launch.cuh"
