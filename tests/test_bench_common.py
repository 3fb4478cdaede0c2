"""The benchmark tables' header (benchmarks/common.py): it names the machine, so tables from
different sessions' machines are not compared row by row, and states the measured FMA peak."""
import sys

import pytest

from benchmarks import common


@pytest.fixture(scope="module")
def env():
    return common.environment("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo and sysfs")
def test_header_names_the_cpu_and_its_caches(env):
    assert env["cpu_model"], "no CPU model read from /proc/cpuinfo"
    lines = common.environment_lines(env)
    cpu_line = next(line for line in lines if line.startswith("CPU ") and "caches" in line)
    assert env["cpu_model"] in cpu_line
    assert env["cpu_caches"] is None or ("L1d" in env["cpu_caches"] and env["cpu_caches"] in cpu_line)


def test_header_states_the_measured_fma_peak(env):
    limit = next(line for line in common.environment_lines(env) if line.startswith("Physical limit"))
    if common.cnnops_cpu_isa() == "avx512":
        peak = env["fma_peak_gflops_per_core"]
        assert peak is not None and peak > 10, peak
        assert f"{peak:.0f} GFLOP/s on one core" in limit
        assert f"{peak * env['threads']:.0f} at {env['threads']} threads" in limit
    else:
        assert env["fma_peak_gflops_per_core"] is None
        assert "not measured" in limit
