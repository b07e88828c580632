"""Static GPU cost model of the symmetric 'all'-mode kernels (no GPU needed).

For the symmetric kernels a loss step launches (SupCon, NT-Xent, TCL, SINCERE on
``backend='triton'``, 'all' mode), compiled ahead of time as ``kernel_report`` compiles them
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, the launchers' tiles,
warps, stages and ``maxnreg``), this reads the SASS (``nvdisasm --print-line-info`` from
Triton's wheel) and prints

- registers, shared memory and CTAs per SM (register, shared-memory, warp and CTA limits of
  the architecture, as CUDA's occupancy calculator rounds them);
- the hot loop's SASS per warp per tile: the loop is a backward branch's target range, matched
  to the Python ``for`` it came from by the line table, so its trip count is the source's
  (``range(t0, t1)``: the program's run of partner tiles; ``range(0, D, BLOCK_D)``: D chunks);
  total, MMA (HMMA/HGMMA), MUFU, BAR, SHFL, global loads (LDG, LDGSTS), atomics (RED/ATOM);
- a predicted forward + backward time on an H100 SXM and an H200 at N = 4096, 16 384 and
  65 536 (sm_90 code; the sm_80 compiles get the resource and SASS tables only).

The prediction per kernel launch (``kernel_time``) is the largest of

- the SM bound: each program's cycles on its SM = max(issue, tensor core, MUFU, SHFL,
  L1/shared-memory bytes), with k = CTAs/SM programs sharing an SM's pipes; the programs, in
  launch order, list-scheduled on SMs × k slots (``makespan``: waves and the partner runs'
  tail). Issue: 4 schedulers × 1 warp instruction per clock, times an efficiency
  min(1, w / ``ISSUE_INTERVAL``) for w resident warps per scheduler (a warp issues on average
  once every ``ISSUE_INTERVAL`` cycles of these kernels: occupancy limits latency hiding);
- the L2 bound (the L1-bypassing cp.async bytes that stage the operand tiles, less the
  pipeliner's predicated-off last prefetch per loop, plus the atomics' bytes, over the L2
  bandwidth), the atomic bound (the atomics' bytes over half of it: read-modify-write), and
  the HBM bound (each operand read and each output written once);

plus ``DEVICE_OP_S`` per launch. A step is the larger of the device time (the symmetric
kernels plus ``DEVICE_OP_S`` per other device operation) and the host time (device operations
of one fwd+bwd, counted by ``launch_count`` on the CPU, × ``HOST_ATEN_S`` / ``HOST_TRITON_S``):
at small N the host's launches are the step.

One constant is fitted, ``ISSUE_INTERVAL``, on the single GPU measurement there is (main
a986ea9 on an H200, Triton 3.6.0: SupCon bf16, D = 128, 'all' mode, fwd+bwd 34.5 ms at
N = 65 536; README "GPU"), from that commit's counts compiled with that Triton and stored in
``calibration_a986ea9.json``; every other constant is a published figure or a stated
assumption, written where it is defined. The calibration check, and the run's other measured
points (not fitted), are printed.

    python -m flashcon.tools.cost_model -j 2                  # compile (cached), print
    python -m flashcon.tools.cost_model --json out.json       # ... and write the counts and
                                                              #     predictions
    python -m flashcon.tools.cost_model --from-json out.json  # reuse counts, no compile
    python -m flashcon.tools.cost_model --fit                 # refit ISSUE_INTERVAL
    # the stored calibration counts, regenerated from the measured commit with the measured
    # run's Triton (3.6.0, here installed with pip install --target /tmp/triton36):
    git worktree add /tmp/fc-a986 a986ea9
    PYTHONPATH=/tmp/triton36 python -m flashcon.tools.cost_model --tree /tmp/fc-a986 \
        --losses supcon --dtypes bf16 --archs 90 \
        --calibration-json python/flashcon/tools/cost_model/calibration_a986ea9.json --fit

Compiles are cached under ``$FLASHCON_COST_CACHE`` (default: the temp dir), keyed by the
kernel sources, the specialisation and Triton's version; each compile of a symmetric kernel
takes seconds. The report names the Triton it compiled with: the one the GPU run used (3.6.0 on
the H200 that measured a986ea9) gives the counts that machine runs. Predictions are predictions:
the first ``make gpu-check`` run tests them.

The modules: ``hardware`` (the GPUs' and architectures' figures, with their sources),
``launches`` (what a loss call launches: specialisations, grids, the programs' partner runs),
``compiling`` (compiling those specialisations, caching their SASS, the counts JSON), ``sass``
(reading SASS: loops, the line table's trip counts, instruction classes and counts, traffic),
``model`` (occupancy, the bounds, a launch's and a call's time, the fitted constant),
``report`` (the printed tables), ``cli`` (the command line) and ``lookup`` (a report's
prediction for a measured point; standard library only, loaded by path by
``tools/gpu_check.py``).
"""

from .cli import main
from .compiling import collect, collect_tree, compile_kernel, count_ops, kernel_label
from .hardware import ATOMIC_FRACTION_OF_L2, DEVICE_OP_S, GPUS, HOST_ATEN_S, HOST_TRITON_S, Gpu
from .launches import LOSS_KERNELS, LOSSES, launched, schedule
from .lookup import predicted_ms
from .model import (
    CALIBRATION,
    CALIBRATION_FILE,
    CHECKS,
    ISSUE_INTERVAL,
    calibration_rows,
    find_call,
    fit_interval,
    kernel_time,
    makespan,
    occupancy,
    predict_call,
    required_factor,
    scaled,
)
from .report import prediction_table
from .sass import (
    BYTE_KEYS,
    COUNT_KEYS,
    analyse,
    find_loops,
    hot_loop,
    live_code,
    parse_sass,
    per_program,
    per_tile,
    traffic,
)

__all__ = [
    "ATOMIC_FRACTION_OF_L2",
    "BYTE_KEYS",
    "CALIBRATION",
    "CALIBRATION_FILE",
    "CHECKS",
    "COUNT_KEYS",
    "DEVICE_OP_S",
    "GPUS",
    "HOST_ATEN_S",
    "HOST_TRITON_S",
    "ISSUE_INTERVAL",
    "LOSSES",
    "LOSS_KERNELS",
    "Gpu",
    "analyse",
    "calibration_rows",
    "collect",
    "collect_tree",
    "compile_kernel",
    "count_ops",
    "find_call",
    "find_loops",
    "fit_interval",
    "hot_loop",
    "kernel_label",
    "kernel_time",
    "launched",
    "live_code",
    "main",
    "makespan",
    "occupancy",
    "parse_sass",
    "per_program",
    "per_tile",
    "predict_call",
    "predicted_ms",
    "prediction_table",
    "required_factor",
    "scaled",
    "schedule",
    "traffic",
]
