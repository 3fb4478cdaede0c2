#!/usr/bin/env bash
# GPU check for a fresh CUDA machine (no network): build for the local arch, run the CUDA tests,
# benchmark convolution, pooling, normalization and ResNet-18 conv-BN fusion against torch's CUDA
# kernels (cuDNN and ATen), run the demo on CUDA, summarize. Usage: bash scripts/gpu_check.sh OUT_DIR
#
# Every step is logged under OUT_DIR, runs under `timeout`, and never stops the steps after it.
# The whole run stays within GPU_CHECK_SECONDS (default 470 s): each step gets its own cap or
# what is left, whichever is less. Six files are written (the device tool returns at most 8):
#   env.log build.log tests_cuda.log bench_cuda.log summary.txt, and results.tar.gz with the
#   benchmarks' <family>_<gpu>.json/.md (summary.txt repeats their tables).
set -o pipefail
set -u

OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1  # a step killed by its timeout still leaves its output in the log
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-470}))
SUMMARY="$OUT/summary.txt"
STEPS=()

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# run_step NAME LOG CAP_SECONDS COMMAND...: appends to LOG, records PASS/FAIL/TIMEOUT/SKIPPED.
run_step() {
  local name=$1 log=$2 cap=$3
  shift 3
  local left=$((DEADLINE - $(date +%s) - 10))  # 10 s kept for the summary
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "=== $name: SKIPPED at $(stamp), no time left" >>"$log"
    STEPS+=("$(printf '%-10s SKIPPED (no time left)' "$name")")
    return 0
  fi
  echo "=== $name: start $(stamp), limit ${limit}s" >>"$log"
  echo "+ $*" >>"$log"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=PASS ;;
    124 | 137) status="TIMEOUT (${limit}s)" ;;
    *) status="FAIL (rc=$rc)" ;;
  esac
  echo "=== $name: end $(stamp), rc=$rc, $(($(date +%s) - t0))s: $status" >>"$log"
  STEPS+=("$(printf '%-10s %-20s %4ss  %s' "$name" "$status" "$(($(date +%s) - t0))" "${log#"$OUT"/}")")
  return 0
}

: >"$OUT/env.log"
: >"$OUT/build.log"
: >"$OUT/tests_cuda.log"
: >"$OUT/bench_cuda.log"

# (1) environment
run_step env "$OUT/env.log" 60 bash -c "nvidia-smi; nvcc --version; $PYTHON - <<'EOF'
import os, platform, sys
import torch
print('python', sys.version.split()[0], platform.platform())
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('cuda available', torch.cuda.is_available(), 'devices', torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, 'capability %d.%d' % (p.major, p.minor), 'SMs', p.multi_processor_count,
          'memory %.1f GiB' % (p.total_memory / 2**30))
print('cpu capability', torch.backends.cpu.get_cpu_capability(), 'threads', torch.get_num_threads(),
      'cpus', os.cpu_count())
print('CUDA_HOME', os.environ.get('CUDA_HOME'), 'TORCH_CUDA_ARCH_LIST', os.environ.get('TORCH_CUDA_ARCH_LIST'))
EOF"

# (2) build for the local GPU architecture only. A .so left by an earlier run on this machine
# is removed first, so a failed build cannot leave the tests running stale kernels.
ARCH=$(timeout 60 "$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
rm -f cnnops/_C*.so
run_step build "$OUT/build.log" 300 env TORCH_CUDA_ARCH_LIST="${ARCH}" CNNOPS_CUDA=1 MAX_JOBS=8 \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
BUILT=$(timeout 60 "$PYTHON" -c 'import cnnops; print(cnnops.has_cuda())' 2>>"$OUT/build.log")
echo "cnnops.has_cuda() after build: ${BUILT:-import failed}" >>"$OUT/build.log"

# (3) CUDA tests, then a short CPU smoke (appended to the same log).
CUDA_TESTS=$(ls tests/test_*cuda*.py 2>/dev/null | tr '\n' ' ')
if [ -n "$CUDA_TESTS" ]; then
  # shellcheck disable=SC2086
  run_step tests_cuda "$OUT/tests_cuda.log" 180 "$PYTHON" -m pytest -q -p no:cacheprovider \
    --maxfail=5 -rfE --durations=10 $CUDA_TESTS
else
  run_step tests_cuda "$OUT/tests_cuda.log" 180 "$PYTHON" -m pytest tests -q -p no:cacheprovider \
    --maxfail=5 -rfE --durations=10 -k cuda
fi

# (4) benchmarks, each family against torch on the same tensors (results are written per case,
# so a timeout keeps what was measured). Convolution first: it has the most to prove.
RESULTS="$OUT/results"
mkdir -p "$RESULTS"
# shellcheck disable=SC2086
run_step bench_conv "$OUT/bench_cuda.log" 120 "$PYTHON" -m benchmarks.bench_conv --device cuda \
  --dtype float32 float16 bfloat16 --out "$RESULTS" ${BENCH_ARGS:---min-run-time 0.1}
run_step bench_pool "$OUT/bench_cuda.log" 60 "$PYTHON" -m benchmarks.bench_pool --device cuda \
  --dtype float32 float16 bfloat16 --quick --out "$RESULTS"
run_step bench_norm "$OUT/bench_cuda.log" 60 "$PYTHON" -m benchmarks.bench_norm --device cuda \
  --dtype float32 float16 bfloat16 --quick --out "$RESULTS"

run_step bench_fuse "$OUT/bench_cuda.log" 60 "$PYTHON" -m benchmarks.bench_fuse --device cuda --quick \
  --out "$RESULTS"

# (4b) the demo on the GPU, where the machine has its extras (it has no network to fetch them)
if "$PYTHON" -c "import sklearn, tqdm, matplotlib" 2>/dev/null; then
  run_step demo "$OUT/bench_cuda.log" 60 "$PYTHON" -m cnnops.demo --device cuda --epochs 3 --out "$RESULTS/demo"
else
  echo "=== demo: SKIPPED, scikit-learn/tqdm/matplotlib not installed" >>"$OUT/bench_cuda.log"
fi

# (3b) CPU smoke, after the benchmark so that it only uses time left over (at most 60 s).
run_step tests_cpu "$OUT/tests_cuda.log" 60 "$PYTHON" -m pytest tests -q -p no:cacheprovider \
  -x --maxfail=3 -k "not cuda"

# (5) summary
rm -f "$OUT"/*.tmp
{
  echo "gpu_check $(stamp), $(($(date +%s) - START))s total, git $(git rev-parse --short HEAD 2>/dev/null)"
  echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1), arch ${ARCH:-?}, cnnops.has_cuda()=${BUILT:-?}"
  echo
  printf '%s\n' "${STEPS[@]}"
  echo
  echo "build errors (first 5):"
  grep -m 5 -E "error:|Error " "$OUT/build.log" | cut -c1-300 || echo "  none"
  echo
  echo "tests (CUDA, then CPU smoke):"
  grep -E " in [0-9.]+s|no tests ran" "$OUT/tests_cuda.log" | sed 's/^/  /'
  grep -E "^(FAILED|ERROR) " "$OUT/tests_cuda.log" | head -10 | cut -c1-300
  echo
  echo "bench:"
  timeout 30 "$PYTHON" - "$OUT" <<'EOF' || echo "  no bench results"
import glob, json, sys
files = sorted(glob.glob(sys.argv[1] + "/results/*.json"))
for path in files:
    data = json.load(open(path))
    print(f"  {path.rsplit('/', 1)[-1]}: {len(data['rows'])} rows")
    for line in data["summary"]:
        print("  " + line)
sys.exit(0 if files else 1)
EOF
  for md in "$RESULTS"/*.md; do [ -f "$md" ] && { echo; cat "$md"; }; done
} >"$SUMMARY" 2>&1
tar -czf "$OUT/results.tar.gz" -C "$OUT" results 2>/dev/null && rm -rf "$RESULTS"
cat "$SUMMARY"
