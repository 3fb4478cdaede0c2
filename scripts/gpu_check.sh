#!/usr/bin/env bash
# GPU check for a CUDA machine with torch preinstalled and no network: build for the local
# arch, prove the CUDA kernels are in the build, run every CUDA test file on its own, benchmark
# against torch's CUDA kernels (cuDNN, ATen), run the demo on CUDA, run the CPU tests, summarize.
# Usage: bash scripts/gpu_check.sh OUT_DIR     (make gpu-check OUT=...)
#
# Every step runs under `timeout` (SIGINT first, so pytest still prints what failed so far),
# is logged under OUT_DIR and never stops the steps after it. The whole run stays within
# GPU_CHECK_SECONDS (default 450): each step gets its own cap or what is left, whichever is less.
# Exit status 1 when any step failed or timed out. Seven files (the device tool returns 8):
#   env.log build.log tests_cuda.log tests_cpu.log bench_cuda.log summary.txt results.tar.gz
# The build is incremental (setup.py build_ext --inplace, objects kept in build/): a rerun on a
# warm machine starts testing within seconds.
#
# GPU_CHECK_DRY_RUN=1 hides the GPU (CUDA_VISIBLE_DEVICES=) to exercise all of this on a machine
# without one (CI does): the steps that need a GPU are SKIPPED with a line saying so, and the
# build keeps whatever TORCH_CUDA_ARCH_LIST the last build used (setup.py's default).
# GPU_CHECK_CPU_TESTS: what the CPU step runs (default: all of tests/ not marked cuda).
# GPU_CHECK_BUILD=0 skips the build (tests the tree's build as it is).
set -o pipefail
set -u

# ------------------------------------------------------------------------------------------
# helpers (tests/test_gpu_check.py sources this file with GPU_CHECK_LIB=1 to test them)

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
STEPS=()
FAILED=0

record() {  # record NAME STATUS SECONDS LOG
  STEPS+=("$(printf '%-36s %-28s %4ss  %s' "$1" "$2" "$3" "${4#"$OUT"/}")")
  case $2 in PASS* | SKIPPED*) ;; *) FAILED=1 ;; esac
}

# run_step NAME LOG CAP_SECONDS COMMAND...: appends to LOG, records PASS/FAIL/TIMEOUT/SKIPPED.
run_step() {
  local name=$1 log=$2 cap=$3
  shift 3
  local left=$((DEADLINE - $(date +%s) - RESERVE))
  local limit=$((cap < left ? cap : left))
  if ((left < 5)); then
    echo "=== $name: SKIPPED at $(stamp), no time left" >>"$log"
    record "$name" "SKIPPED (no time left)" 0 "$log"
    return 0
  fi
  local off
  off=$(stat -c %s "$log" 2>/dev/null || echo 0)
  echo "=== $name: start $(stamp), limit ${limit}s" >>"$log"
  echo "+ $*" >>"$log"
  local t0 rc status
  t0=$(date +%s)
  timeout -s INT -k 15 "$limit" "$@" >>"$log" 2>&1 </dev/null
  rc=$?
  case $rc in
    0) status=PASS ;;
    124 | 137) status="TIMEOUT (${limit}s)" ;;
    *) status="FAIL (rc=$rc)" ;;
  esac
  # pytest exits 0 when every test skipped; on a GPU run that is a failure, not a pass
  if [ "$status" = PASS ] && [ -n "${STEP_NEEDS_PASSES:-}" ] &&
    ! tail -c +$((off + 1)) "$log" | grep -qE "[0-9]+ passed"; then
    status="FAIL (nothing passed)"
  fi
  echo "=== $name: end $(stamp), rc=$rc, $(($(date +%s) - t0))s: $status" >>"$log"
  record "$name" "$status" "$(($(date +%s) - t0))" "$log"
  return 0
}

skip_step() {  # skip_step NAME LOG REASON
  echo "=== $1: SKIPPED, $3" >>"$2"
  record "$1" "SKIPPED ($3)" 0 "$2"
}

if [ -n "${GPU_CHECK_LIB:-}" ]; then
  return 0 2>/dev/null || exit 0
fi

# ------------------------------------------------------------------------------------------

OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1  # a step killed by its timeout still leaves its output in the log
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-450}))
RESERVE=10  # kept for the summary
SUMMARY="$OUT/summary.txt"
RESULTS="$OUT/results"
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
[ "$DRY_RUN" = 1 ] && export CUDA_VISIBLE_DEVICES=""
rm -rf "$RESULTS" "$OUT/results.tar.gz"
for f in env build tests_cuda tests_cpu bench_cuda; do : >"$OUT/$f.log"; done
mkdir -p "$RESULTS"

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
GPU=$(timeout 60 "$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)
ARCH=""
if [ "$GPU" = 1 ]; then
  ARCH=$(timeout 60 "$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
elif [ "$DRY_RUN" != 1 ]; then
  echo "=== no CUDA device visible to torch: every GPU step fails below" >>"$OUT/env.log"
fi

# (2) build, incremental in build/. The .so is removed first (unlinked, so a process that has
# it loaded is unharmed): a failed build then cannot leave the tests running stale kernels.
if [ "${GPU_CHECK_BUILD:-1}" = 0 ]; then
  skip_step build "$OUT/build.log" "GPU_CHECK_BUILD=0: the build in the tree as it is"
else
  rm -f cnnops/_C*.so
  run_step build "$OUT/build.log" 300 env ${ARCH:+TORCH_CUDA_ARCH_LIST="$ARCH"} CNNOPS_CUDA=1 \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" setup.py build_ext --inplace
fi

# (2b) the build must hold CUDA kernels: otherwise every CUDA test would skip and look green
run_step cuda_kernels "$OUT/build.log" 60 "$PYTHON" -c '
import sys, torch, cnnops
ops = ["cnnops::conv_forward", "cnnops::conv_backward", "cnnops::max_pool_forward", "cnnops::batch_norm_forward"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
print("cnnops CUDA kernels:", "MISSING for " + ", ".join(missing) if missing else "registered")
sys.exit(1 if missing else 0)'

# (3) CUDA tests: every file with a test marked `cuda`, each file in its own pytest run (one
# file's failures or hang cannot hide another's), convolution first, then the biggest. A file that fails to
# import is run too, so its error is reported rather than its tests silently missing.
CUDA_FILES=$(timeout 120 "$PYTHON" -m pytest tests -m cuda --collect-only -q -p no:cacheprovider 2>>"$OUT/tests_cuda.log" |
  grep -oE '^(ERROR )?tests/[^: ]+\.py' | sed 's/^ERROR //' | sort | uniq -c | sort -rn | awk '{print $2}')
CUDA_FILES=$(echo "$CUDA_FILES" | grep -x tests/test_conv_cuda.py; echo "$CUDA_FILES" | grep -vx tests/test_conv_cuda.py)
echo "=== CUDA test files (marker cuda): $(echo $CUDA_FILES)" >>"$OUT/tests_cuda.log"
[ -n "$CUDA_FILES" ] || record "tests_cuda (collect)" "FAIL (no cuda tests found)" 0 "$OUT/tests_cuda.log"
for f in $CUDA_FILES; do
  name="tests_cuda $(basename "$f" .py)"
  if [ "$GPU" != 1 ]; then
    [ "$DRY_RUN" = 1 ] && skip_step "$name" "$OUT/tests_cuda.log" "dry run: no GPU" ||
      record "$name" "FAIL (no GPU visible)" 0 "$OUT/tests_cuda.log"
    continue
  fi
  cap=60
  [ "$f" = tests/test_conv_cuda.py ] && cap=150  # the most cases and the most to prove
  STEP_NEEDS_PASSES=1 run_step "$name" "$OUT/tests_cuda.log" $cap "$PYTHON" -m pytest "$f" -m cuda -v \
    -p no:cacheprovider -rfE --tb=short --durations=5
done

# (4) benchmarks, each family against torch on the same tensors (results are written per case,
# so a timeout keeps what was measured); then the demo. Convolution first: most to prove.
bench() {  # bench NAME CAP COMMAND...
  if [ "$GPU" = 1 ]; then
    run_step "$@"
  else
    skip_step "$1" "$OUT/bench_cuda.log" "$([ "$DRY_RUN" = 1 ] && echo "dry run: no GPU" || echo "no GPU visible")"
  fi
}
# shellcheck disable=SC2086
bench bench_conv "$OUT/bench_cuda.log" 120 "$PYTHON" -m benchmarks.bench_conv --device cuda \
  --dtype float32 float16 bfloat16 --out "$RESULTS" ${BENCH_ARGS:---min-run-time 0.1}
bench bench_pool "$OUT/bench_cuda.log" 60 "$PYTHON" -m benchmarks.bench_pool --device cuda \
  --dtype float32 float16 bfloat16 --quick --out "$RESULTS"
bench bench_norm "$OUT/bench_cuda.log" 60 "$PYTHON" -m benchmarks.bench_norm --device cuda \
  --dtype float32 float16 bfloat16 --quick --out "$RESULTS"
bench bench_fuse "$OUT/bench_cuda.log" 60 "$PYTHON" -m benchmarks.bench_fuse --device cuda --quick \
  --out "$RESULTS"
if "$PYTHON" -c "import sklearn, tqdm, matplotlib" 2>/dev/null; then
  bench demo "$OUT/bench_cuda.log" 60 "$PYTHON" -m cnnops.demo --device cuda --epochs 3 --out "$RESULTS/demo"
else
  skip_step demo "$OUT/bench_cuda.log" "scikit-learn/tqdm/matplotlib not installed"
fi

# (5) CPU tests with the time left (at most 150 s): every failure is reported, none stops it.
# shellcheck disable=SC2086
STEP_NEEDS_PASSES=1 run_step tests_cpu "$OUT/tests_cpu.log" 150 "$PYTHON" -m pytest ${GPU_CHECK_CPU_TESTS:-tests} \
  -m "not cuda" -v -p no:cacheprovider -rfE --tb=line

# (6) summary
{
  echo "gpu_check $(stamp), $(($(date +%s) - START))s total, git $(git rev-parse --short HEAD 2>/dev/null)$(
    [ "$DRY_RUN" = 1 ] && echo ", DRY RUN (CUDA hidden)")"
  echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1), arch ${ARCH:-none}"
  echo
  printf '%s\n' "${STEPS[@]}"
  echo
  echo "build errors (first 5):"
  grep -m 5 -E "error:|Error " "$OUT/build.log" | cut -c1-300 || echo "  none"
  grep -h "^cnnops CUDA kernels:" "$OUT/build.log"
  for log in tests_cuda tests_cpu; do
    echo
    echo "$log: pytest results per run, then failures"
    grep -hE "^=== tests_|^=+ .*( in [0-9.]+s| interrupted).* =+$|no tests ran" "$OUT/$log.log" |
      grep -vE ": start " | sed 's/^/  /'
    # -v progress lines: there even when a run was killed before its own summary
    grep -hoE "^tests/[^ ]+ (FAILED|ERROR)" "$OUT/$log.log" | sort -u | head -60 | cut -c1-300
  done
  echo
  echo "bench:"
  timeout 30 "$PYTHON" - "$RESULTS" <<'EOF' || echo "  no bench results"
import glob, json, sys
files = sorted(glob.glob(sys.argv[1] + "/*.json"))
for path in files:
    data = json.load(open(path))
    print(f"  {path.rsplit('/', 1)[-1]}: {len(data['rows'])} rows")
    for line in data["summary"]:
        print("  " + line)
sys.exit(0 if files else 1)
EOF
  for md in "$RESULTS"/*.md; do [ -f "$md" ] && { echo; cat "$md"; }; done
  echo
  echo "result: $([ $FAILED = 0 ] && echo PASS || echo FAIL)"
} >"$SUMMARY" 2>&1
tar -czf "$OUT/results.tar.gz" -C "$OUT" results 2>/dev/null && rm -rf "$RESULTS"
cat "$SUMMARY"
exit $FAILED
