# The two commands: `make test` and `make bench`. Each sets up everything it needs on a fresh
# machine (a .venv with the pinned dev environment, the C++/CUDA extension) and is idempotent.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.14.1
TRITON_PIN := triton~=3.8
# No GPU on the build machines: name the architectures the CUDA kernels are built for.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)
EXT_STAMP := $(VENV)/.ext-built

.PHONY: test bench bench-quick bench-micro lint format ext kernel-report clean gpu-check

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)" "$(TRITON_PIN)" setuptools wheel ninja
	FLASHCON_SKIP_EXT=1 $(PIP) install -q --no-build-isolation -e ".[test,bench,triton]"
	touch $@

# The extension is built in place (python/flashcon/_C*.so); ninja rebuilds only what changed.
$(EXT_STAMP): $(VENV)/.deps setup.py $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	touch $@

ext: $(EXT_STAMP)

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.deps
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Two pytest-xdist workers (the build machines have two cores), one OpenMP thread each: two
# workers of two threads on two cores took 14 min of pytest against 9 min (OpenMP threads
# spin-waiting for a core). What several tests share (one wheel build, one launch probe, one
# pair of gloo processes) is made once per run by whichever worker asks first
# (tests/conftest.py: shared_once).
PYTEST_WORKERS ?= 2
PYTEST_THREADS ?= 1
test: $(EXT_STAMP) lint
	FLASHCON_REQUIRE=cpu,triton OMP_NUM_THREADS=$(PYTEST_THREADS) \
		$(VENV)/bin/pytest -n $(PYTEST_WORKERS)

bench: $(EXT_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-quick: $(EXT_STAMP)
	$(PY) bench/run.py --quick $(BENCH_ARGS)

bench-micro: $(EXT_STAMP)
	$(VENV)/bin/pytest bench/micro --benchmark-only -p no:cacheprovider

# On a machine with one CUDA GPU and a Python whose torch sees it (no .venv, nothing installed):
# the extension built for that GPU, `pytest -m gpu`, the bench sweep and one summary, within
# 9 minutes, in $(GPU_CHECK_OUT)/ and $(GPU_CHECK_OUT).tgz (bench/README.md).
GPU_PY ?= python3
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	$(GPU_PY) tools/gpu_check.py --out "$(GPU_CHECK_OUT)" $(GPU_CHECK_ARGS)

kernel-report: $(VENV)/.deps
	$(PY) -m flashcon.tools.kernel_report

clean:
	rm -rf build python/flashcon/_C*.so $(EXT_STAMP)
