"""The figures of the GPUs and architectures the model runs on, each with its source: SMs,
clocks, tensor-core, HBM and L2 rates, occupancy limits, MUFU/shuffle/L1 throughput per clock,
and the device and host time of a launch."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    arch: int  # the kernels it runs (config.arch_of: sm_90 and newer run the sm_90 table)
    sms: int
    clock_hz: float  # SM clock of the issue, MUFU, SHFL and shared-memory rates
    mma_flops: dict  # dense tensor-core flop/s by operand type
    hbm_bytes_s: float
    l2_bytes_s: float


# NVIDIA H100 Tensor Core GPU datasheet / Hopper whitepaper (H100 SXM5): 132 SMs; max boost
# 1.98 GHz (the clock of the 66.9 TFLOP/s FP32 peak: 132 SMs × 128 FP32 lanes × 2 × 1.98 GHz);
# dense tensor-core peak 989.4 TFLOP/s BF16/FP16 and 494.7 TFLOP/s TF32 (the datasheet's
# 1979 / 989 are with 2:4 sparsity; 989.4 = 132 × 4096 flop/clk × 1.83 GHz, the tensor
# clock); HBM3 3.35 TB/s. H200 SXM datasheet: the same GH100 compute (132 SMs, 989 TFLOP/s
# dense BF16) with HBM3e at 4.8 TB/s. L2: NVIDIA publishes no bandwidth; ~5.5 TB/s is what
# Chips and Cheese measured on an H100 PCIe (114 SMs, 1.755 GHz; "Nvidia's H100: Funny L2,
# and Tons of Bandwidth", 2023-07-02), taken as a lower estimate for both SXM parts (same
# 50 MB L2). An assumption, not a datasheet figure.
GPUS = {
    "H100": Gpu("H100 SXM", 90, 132, 1.98e9, {"bf16": 989.4e12, "tf32": 494.7e12}, 3.35e12, 5.5e12),
    "H200": Gpu("H200 SXM", 90, 132, 1.98e9, {"bf16": 989.4e12, "tf32": 494.7e12}, 4.8e12, 5.5e12),
}


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    regs_per_sm: int
    reg_unit: int  # registers are allocated per warp in units of this many
    warps_per_sm: int
    ctas_per_sm: int
    smem_per_sm: int  # bytes, the largest carveout
    smem_reserved: int  # bytes the driver reserves per CTA
    smem_unit: int  # allocation granularity
    schedulers: int


# CUDA C++ Programming Guide, "Compute Capabilities" table (cc 8.0 and 9.0): 64 K 32-bit
# registers per SM, 64 resident warps and 32 resident CTAs per SM; shared memory per SM up to
# 164 KB (8.0) / 228 KB (9.0), of which 1 KB per CTA is reserved for the system; 4 warp
# schedulers (SM sub-partitions) per SM. Register allocation unit (256 per warp) and shared
# memory granularity (128 B): CUDA occupancy calculator (cuda_occupancy.h).
ARCH = {
    80: ArchLimits(65536, 256, 64, 32, 164 * 1024, 1024, 128, 4),
    90: ArchLimits(65536, 256, 64, 32, 228 * 1024, 1024, 128, 4),
}

# Per SM per clock, cc 8.0 and 9.0 (CUDA C++ Programming Guide, "Arithmetic Instructions",
# throughput of native arithmetic instructions): 16 results of the MUFU functions (exp2, lg2,
# rcp, rsqrt, sin, cos), 32 warp-shuffle results; a scheduler issues one warp instruction per
# clock. L1 / shared memory (one SRAM): 128 bytes per clock per SM (shared memory's 32 banks ×
# 4 bytes; H100's 33 TB/s L1 = 132 SMs × 128 B × 1.98 GHz).
MUFU_PER_CLK = 16
SHFL_PER_CLK = 32
L1_BYTES_PER_CLK = 128
SM_PIPES = ("issue", "tensor", "mufu", "shfl", "L1")

# fp32 reductions into L2 (RED): a read-modify-write of each sector, taken as half the L2
# bandwidth. An assumption (NVIDIA publishes no atomic throughput); the bound is printed apart.
ATOMIC_FRACTION_OF_L2 = 0.5

# Device time a launch adds besides its work (launch, CTA rasterisation, drain): ~2 µs for
# back-to-back kernels on a stream. An assumption of the usual order.
DEVICE_OP_S = 2e-6
# Host time per device operation in eager mode: a Triton launch from Python ~20 µs (TritonBench
# wall time of a small Triton kernel on an H100: 18-23 µs per call, pytorch/helion#2538); an
# ATen op ~10 µs (dispatch, autograd bookkeeping and the CUDA launch). Assumptions of the
# usual order, not fitted.
HOST_TRITON_S = 20e-6
HOST_ATEN_S = 10e-6
