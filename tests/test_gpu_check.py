"""scripts/gpu_check.sh's step runner: caps, timeouts, the overall deadline, the status it
records, and the rule that a GPU test run in which nothing passed is no PASS. (.ci/run also dry
runs the whole script with the GPU hidden and checks its files.)"""
import os
import re
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def run_steps(tmp_path, body, budget=60):
    """Source the script's helpers, run `body` (bash), print the recorded step rows."""
    script = f"""
set -u
GPU_CHECK_LIB=1 source {SCRIPT}
OUT={tmp_path}
DEADLINE=$(( $(date +%s) + {budget} ))
RESERVE=0
{body}
printf '%s\\n' "${{STEPS[@]}}"
echo "FAILED=$FAILED"
"""
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, time.monotonic() - t0


def test_pass_and_fail_are_recorded_with_logs(tmp_path):
    out, _ = run_steps(tmp_path, f"""
run_step ok {tmp_path}/a.log 30 bash -c 'echo hello'
run_step bad {tmp_path}/a.log 30 bash -c 'echo broken; exit 3'
""")
    assert re.search(r"^ok\s+PASS\s+\d+s\s+a\.log$", out, re.M), out
    assert re.search(r"^bad\s+FAIL \(rc=3\)", out, re.M), out
    assert "FAILED=1" in out
    log = (tmp_path / "a.log").read_text()
    assert "hello" in log and "broken" in log and "=== bad: end" in log and "rc=3" in log


def test_a_step_over_its_cap_is_stopped_and_recorded_as_timeout(tmp_path):
    out, seconds = run_steps(tmp_path, f"run_step slow {tmp_path}/b.log 2 sleep 60")
    assert re.search(r"^slow\s+TIMEOUT \(2s\)", out, re.M), out
    assert "FAILED=1" in out
    assert seconds < 30, f"the 2 s cap took {seconds:.0f} s"


def test_the_deadline_caps_a_step_and_skips_the_next(tmp_path):
    """A step gets min(its cap, time left); with no time left the next ones are skipped and the
    run is not failed by the skipping itself."""
    out, seconds = run_steps(tmp_path, f"""
run_step long {tmp_path}/c.log 600 sleep 60
run_step after {tmp_path}/c.log 600 echo never
""", budget=6)
    assert re.search(r"^long\s+TIMEOUT \([1-6]s\)", out, re.M), out
    assert re.search(r"^after\s+SKIPPED \(no time left\)", out, re.M), out
    assert "never" not in (tmp_path / "c.log").read_text()
    assert seconds < 30


def test_a_test_run_where_nothing_passed_is_a_failure(tmp_path):
    """pytest exits 0 when every test skipped (no GPU, no CUDA kernels): not a PASS, also when
    an earlier run in the same log passed tests."""
    out, _ = run_steps(tmp_path, f"""
STEP_NEEDS_PASSES=1 run_step some_passed {tmp_path}/d.log 30 echo '==== 3 passed, 1 skipped in 0.5s ===='
STEP_NEEDS_PASSES=1 run_step all_skipped {tmp_path}/d.log 30 echo '==== 12 skipped in 0.5s ===='
""")
    assert re.search(r"^all_skipped\s+FAIL \(nothing passed\)", out, re.M), out
    assert re.search(r"^some_passed\s+PASS", out, re.M), out


def test_skip_step_is_not_a_failure(tmp_path):
    out, _ = run_steps(tmp_path, f"skip_step bench {tmp_path}/e.log 'dry run: no GPU'")
    assert re.search(r"^bench\s+SKIPPED \(dry run: no GPU\)", out, re.M), out
    assert "FAILED=0" in out


@pytest.mark.parametrize("path", ["scripts/gpu_check.sh", ".ci/run"])
def test_scripts_parse(path):
    subprocess.run(["bash", "-n", os.path.join(ROOT, path)], check=True)
