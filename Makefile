# cnnops: `make demo` and `make test` work on a fresh machine with only python3 and pip.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= gpu-logs

.PHONY: install deps test demo bench gpu-check clean sanitize

# Installs only what is missing: torch (a CUDA build where pip offers one, so the CUDA kernels
# compile), the build and test tools, the demo's extras (its test runs in `make test` too),
# then cnnops itself (editable, incremental ninja build).
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch>=2.6"
	@$(PYTHON) -c "import numpy, pytest, ninja, pybind11, hypothesis" 2>/dev/null || $(PIP) install numpy pytest ninja pybind11 hypothesis
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

# CPU kernels built with AddressSanitizer and UBSan into $(SANITIZE_DIR) (the in-place build is
# untouched), then the conv, pool and norm tests and the fuzz test run against that build.
# -fno-wrapv undoes Python's -fwrapv, which would silence UBSan's signed-overflow check;
# libstdc++ is preloaded after libasan, or ASan's __cxa_throw interceptor aborts when another
# extension throws at import. About 7 minutes to build on 2 cores.
SANITIZE_DIR ?= build-sanitize
SANITIZE_FLAGS := -fsanitize=address,undefined -fno-wrapv -fno-omit-frame-pointer
SANITIZE_TESTS ?= tests/test_conv.py tests/test_conv_errors.py tests/test_pool.py tests/test_pool_ops.py \
	tests/test_pool_errors.py tests/test_norm.py tests/test_norm_ops.py tests/test_norm_errors.py \
	tests/test_degenerate.py tests/test_input_safety.py tests/test_fuzz.py
sanitize:
	CNNOPS_CUDA=0 CFLAGS="$(SANITIZE_FLAGS)" LDFLAGS="-fsanitize=address,undefined" $(PYTHON) setup.py build_ext \
		--build-temp $(SANITIZE_DIR)/temp --build-lib $(SANITIZE_DIR)/lib -j 2
	mkdir -p $(SANITIZE_DIR)/lib/cnnops && cp cnnops/*.py $(SANITIZE_DIR)/lib/cnnops/
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	PYTHONPATH=$(SANITIZE_DIR)/lib $(PYTHON) -P -m pytest $(SANITIZE_TESTS) -q -p no:cacheprovider

clean:
	rm -rf build *.egg-info cnnops/_C*.so $(SANITIZE_DIR)
