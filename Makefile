# cnnops: `make demo` and `make test` work on a fresh machine with only python3 and pip.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= gpu-logs
# The torch versions cnnops is built and tested against (.ci/run: oldest and newest); the same
# range as pyproject.toml's (tests/test_build.py checks both).
TORCH_SPEC := torch>=2.11,<2.15

.PHONY: install deps build lint test demo bench gpu-check clean sanitize

# Installs only what is missing: torch (a CUDA build where pip offers one, so the CUDA kernels
# compile), the build and test tools, the demo's extras (its test runs in `make test` too),
# torchvision for the model tests (pinned to the installed torch's release, so pip never swaps torch;
# without its local label: torch==2.14.1 accepts an installed 2.14.1+cu130, and a pip constraint
# torch<=2.14.1 rejects the labelled version),
# the ONNX exporters' and runtime's packages and the linter.
# (find_spec: whether a module is there, without the seconds that importing it takes)
HAVE = $(PYTHON) -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))"
deps:
	@$(HAVE) torch || $(PIP) install "$(TORCH_SPEC)"
	@$(HAVE) numpy pytest ninja pybind11 setuptools wheel hypothesis || $(PIP) install numpy pytest ninja pybind11 "setuptools>=64" wheel hypothesis
	@$(HAVE) sklearn tqdm matplotlib || $(PIP) install scikit-learn tqdm matplotlib
	@$(HAVE) torchvision || $(PIP) install torchvision "torch==$$($(PYTHON) -c 'import torch; print(torch.__version__.split("+")[0])')"
	@$(HAVE) onnx onnxscript onnxruntime ruff || $(PIP) install onnx onnxscript onnxruntime ruff

# cnnops itself, editable. pip builds an editable install in a fresh temporary folder (every
# object recompiled each time), so pip only registers this tree, once, building nothing
# (CNNOPS_NO_EXTENSION=1); `build` then compiles in the persistent build/ folder, where ninja
# recompiles only what changed (a no-op in seconds).
install: deps
	@(cd / && $(PYTHON) -c "import importlib.util as u, os, sys; s = u.find_spec('cnnops'); \
		sys.exit(not (s and s.origin and os.path.samefile(os.path.dirname(s.origin), '$(CURDIR)/cnnops')))") \
		2>/dev/null || CNNOPS_NO_EXTENSION=1 $(PIP) install --no-build-isolation --no-deps -e "$(CURDIR)"
	@$(MAKE) --no-print-directory build

# CUDA kernels only where a GPU is visible; CNNOPS_CUDA=1 forces them, CNNOPS_CUDA=0 skips them.
build:
	$(PYTHON) setup.py -q build_ext --inplace

# ruff's settings are in pyproject.toml. C++: .clang-format (run clang-format -i on what you change).
lint: deps
	$(PYTHON) -m ruff check .

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest tests -q

# One small CNN trained with torch.nn and with cnnops from one initialization; the plot goes
# to demo-out/. Options (--epochs, --device, --out, --seed, --threads): make demo ARGS="--epochs 5"
demo: install
	$(PYTHON) -m cnnops.demo $(ARGS)

# Each family against torch in the same run; tables in benchmarks/results/{cpu,pool_cpu,norm_cpu}.md;
# then ResNet-18 inference torch vs cnnops unfused vs cnnops fused (benchmarks/results/fuse_cpu.md);
# then the per-call cost of tiny calls (benchmarks/results/percall_cpu.md); then whole torchvision
# models, eval and a training step, torch vs cnnops (benchmarks/results/models_cpu.md, ~15 minutes
# on 2 cores; `python -m benchmarks.bench_models --models resnet18 --quick` for a short run).
bench: install
	$(PYTHON) -m benchmarks.bench_conv
	$(PYTHON) -m benchmarks.bench_pool
	$(PYTHON) -m benchmarks.bench_norm
	$(PYTHON) -m benchmarks.bench_fuse
	$(PYTHON) -m benchmarks.bench_percall
	$(PYTHON) -m benchmarks.bench_models

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
	tests/test_degenerate.py tests/test_input_safety.py tests/test_fuzz.py tests/test_autograd.py tests/test_fast_call.py \
	tests/test_pool_autograd.py tests/test_norm_autograd.py tests/test_winograd.py tests/test_depthwise.py \
	tests/test_conv_small.py tests/test_gemm.py tests/test_space_to_depth.py tests/test_conv_grouped.py \
	tests/test_conv_nhwc.py tests/test_conv_backward_small.py tests/test_conv_first_layer.py tests/test_layout.py \
	tests/test_conv3d_cpu.py tests/test_conv_stride2_cpu.py tests/test_conv_activation.py tests/test_result_memory.py
sanitize:
	CNNOPS_CUDA=0 CFLAGS="$(SANITIZE_FLAGS)" LDFLAGS="-fsanitize=address,undefined" $(PYTHON) setup.py build_ext \
		--build-temp $(SANITIZE_DIR)/temp --build-lib $(SANITIZE_DIR)/lib -j 2
	mkdir -p $(SANITIZE_DIR)/lib/cnnops && cp cnnops/*.py $(SANITIZE_DIR)/lib/cnnops/
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	PYTHONPATH=$(SANITIZE_DIR)/lib $(PYTHON) -P -m pytest $(SANITIZE_TESTS) -q -p no:cacheprovider

clean:
	rm -rf build *.egg-info cnnops/_C*.so $(SANITIZE_DIR)
