# cnnops: `make demo` and `make test` work on a fresh machine with only python3 and pip.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= gpu-logs

.PHONY: install deps test demo bench gpu-check clean

# Installs only what is missing: torch (a CUDA build where pip offers one, so the CUDA kernels
# compile), the build and test tools, the demo's extras (its test runs in `make test` too),
# then cnnops itself (editable, incremental ninja build).
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch>=2.6"
	@$(PYTHON) -c "import numpy, pytest, ninja, pybind11" 2>/dev/null || $(PIP) install numpy pytest ninja pybind11
	@$(PYTHON) -c "import sklearn, tqdm, matplotlib" 2>/dev/null || $(PIP) install scikit-learn tqdm matplotlib

install: deps
	$(PIP) install --no-build-isolation -e .

test: install
	$(PYTHON) -m pytest tests -q

# One small CNN trained with torch.nn and with cnnops from one initialization; the plot goes
# to demo-out/. Options (--epochs, --device, --out, --seed, --threads): make demo ARGS="--epochs 5"
demo: install
	$(PYTHON) -m cnnops.demo $(ARGS)

# Each family against torch in the same run; tables in benchmarks/results/{cpu,pool_cpu,norm_cpu}.md;
# then ResNet-18 inference torch vs cnnops unfused vs cnnops fused (benchmarks/results/fuse_cpu.md).
bench: install
	$(PYTHON) -m benchmarks.bench_conv
	$(PYTHON) -m benchmarks.bench_pool
	$(PYTHON) -m benchmarks.bench_norm
	$(PYTHON) -m benchmarks.bench_fuse

# On a fresh GPU machine (torch preinstalled, no network): local-arch build, CUDA tests, GPU
# benchmark; logs and results go to $(OUT).
gpu-check:
	bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf build *.egg-info cnnops/_C*.so
