"""The CPU GEMM (csrc/cpu/gemm.h) against torch.matmul, called directly through cnnops._C.gemm,
for every micro-kernel (AVX-512, AVX2, portable: CNNOPS_CPU_ISA caps the choice, made once per
process, so each runs in a subprocess). M, N and K sweep the remainders around the spec's MR, NR
and KC (cnnops._C.gemm_spec()), M and the row range around its L2 block of MC rows and N around
its L2 block of NC columns, with and without accumulation, row bias, ReLU and a row range,
through every entry point (packed A and B, transposed A, B or A read in place, panel offsets, B packed
beforehand)."""

import os

import pytest
from conftest import run_with_cpu_isa

CHECK = r"""
import itertools, sys, torch
import cnnops
from cnnops import _C

spec = _C.gemm_spec()
print(spec["name"], spec["mr"], spec["nr_float32"], spec["nr_float64"], spec["kc"], spec["mc"], spec["nc"])
mr, kc, mc, nc = spec["mr"], spec["kc"], spec["mc"], spec["nc"]
torch.manual_seed(0)
checked = 0
for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
    nr = spec["nr_float32" if dtype == torch.float32 else "nr_float64"]
    ms = sorted({1, mr - 1, mr, mr + 1, 2 * mr + 1} - {0})
    ns = sorted({1, nr - 1, nr, nr + 1, 2 * nr + 3})
    ks = [0, 1, kc - 1, kc, kc + 1, 2 * kc + 3]
    # Around the L2 blocks of A rows and B columns: fewer other sizes, the products are large.
    sizes = [(m, n, k) for m, n, k in itertools.product(ms, ns, ks)]
    sizes += [(m, n, k) for m in (mc - 1, mc + mr + 1, 2 * mc + 1) for n, k in ((nr + 1, kc + 1), (2 * nr, 3))]
    sizes += [(m, n, k) for n in (nc - 1, nc + nr + 1, 2 * nc + 3) for m, k in ((mr + 1, kc + 1), (2 * mr, 3))]
    # Around 12 rows: AVX-512's wide micro-kernel, which gemm_shifted_a_packed_b runs.
    sizes += [(m, n, k) for m in (11, 13, 25) for n, k in ((nr + 1, kc + 1), (2 * nr, 3), (nr - 1, 2 * kc + 3))]
    # A short reduction over at least 4 B panels: the wide kernel's loops turn round (A panel outer).
    sizes += [(m, n, k) for m in (13, 2 * mc + 5) for n in (4 * nr - 1, 4 * nr, 5 * nr + 3) for k in (1, 128, 129)]
    for m, n, k in sizes:
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
        c0 = torch.randn(m, n, dtype=dtype)
        bias = torch.randn(m, dtype=dtype)
        product = (a.double() @ b.double())
        ranges = [(0, -1), (0, m - 1)] + ([(mr, m)] if m > mr else []) + ([(mr, mc + mr)] if m > mc + mr else [])
        options = [  # variant, accumulate, bias, activation, (row_begin, row_end)
            ("shifted_a", False, False, "none", (0, -1)),
        ]
        for variant, acc, act in itertools.product(("packed_b", "shifted_a_packed_b"), (False, True), ("none", "relu")):
            options.append((variant, acc, False, act, (0, -1)))
        for variant in ("packed", "a_transposed", "shifted_b", "panel_offset"):
            for (acc, with_bias, act), rows in itertools.product(
                    [(False, False, "none"), (True, False, "relu"), (False, True, "none"), (False, True, "relu"),
                     (True, False, "none")], ranges):
                options.append((variant, acc, with_bias, act, rows))
        for variant, acc, with_bias, act, (rb, re) in options:
            got = _C.gemm(a, b, c0, bias if with_bias else None, acc, rb, re, act, variant)
            zeros = torch.zeros(m, 1, dtype=torch.float64)
            init = c0.double() if acc else (bias.double()[:, None] if with_bias else zeros)
            want = init + product
            if act == "relu":
                want = torch.relu(want)
            end = m if re < 0 else re
            expected = c0.clone()
            expected[rb:end] = want[rb:end].to(dtype)
            scale = max(1.0, k ** 0.5)
            try:
                torch.testing.assert_close(got[rb:end], expected[rb:end], rtol=tol, atol=tol * scale)
                torch.testing.assert_close(got[:rb], c0[:rb], rtol=0, atol=0)  # rows outside untouched
                torch.testing.assert_close(got[end:], c0[end:], rtol=0, atol=0)
            except AssertionError as e:
                sys.exit(f"{dtype} M={m} N={n} K={k} {variant} accumulate={acc} bias={with_bias} {act} "
                         f"rows=[{rb}, {re}): {e}")
            checked += 1
print(checked)
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_gemm_matches_torch(isa):
    result = run_with_cpu_isa(isa, CHECK, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    name, mr, nr_f, nr_d, kc, mc, nc = lines[0].split()
    assert name == isa  # the requested micro-kernel really ran
    assert int(nr_f) * 4 == int(nr_d) * 8 == 128  # two 64-byte vectors per B panel row
    assert 1 <= int(mr) <= 14 and int(kc) >= 1 and int(mc) % int(mr) == 0 and int(nc) % int(nr_f) == 0
    assert int(lines[1]) > 1000  # the sweep ran


@pytest.mark.parametrize("l2", [1 << 20, 2 << 20])
def test_gemm_blocks_fit_the_l2(l2, monkeypatch):
    """B's L2 block takes a quarter of the L2 (Zen 5's 1 MB: 256 columns; Sapphire Rapids' 2 MB:
    512), and the sweep passes with either block, whichever CPU runs it."""
    monkeypatch.setenv("CNNOPS_CPU_L2_BYTES", str(l2))
    result = run_with_cpu_isa("avx512", CHECK, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    name, mr, nr_f, nr_d, kc, mc, nc = result.stdout.split("\n")[0].split()
    assert int(nc) == l2 // 4 // (int(kc) * 4)


def test_gemm_l2_is_the_cpus():
    from cnnops import _C

    spec = _C.gemm_spec()
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            size = f.read().strip()
    except OSError:
        pytest.skip("no sysfs L2 size")
    if "CNNOPS_CPU_L2_BYTES" in os.environ or spec["l2_bytes"] == 0:
        pytest.skip("L2 size overridden or not reported")
    assert spec["l2_bytes"] == int(size.rstrip("K")) * 1024
    nr = spec["nr_float32"]
    assert spec["nc"] % nr == 0 and spec["kc"] * spec["nc"] * 4 <= max(spec["l2_bytes"] // 4, 2 * nr * spec["kc"] * 4)


def test_gemm_spec_is_the_running_one():
    import torch

    import cnnops  # noqa: F401
    from cnnops import _C

    assert _C.gemm_spec()["name"] == torch.ops.cnnops.cpu_gemm_isa()


def test_gemm_inplace_writes_c():
    import torch

    from cnnops import _C

    a, b = torch.randn(9, 40, dtype=torch.float64), torch.randn(40, 33, dtype=torch.float64)
    c = torch.zeros(9, 33, dtype=torch.float64)
    out = _C.gemm(a, b, c, None, False, 0, -1, "none", "packed", True)
    assert out.data_ptr() == c.data_ptr()
    torch.testing.assert_close(c, a @ b)
    with pytest.raises(RuntimeError, match="contiguous c"):
        _C.gemm(a, b, torch.zeros(33, 9, dtype=torch.float64).t(), None, False, 0, -1, "none", "packed", True)


def test_gemm_rejects_bad_arguments():
    import torch

    from cnnops import _C

    a, b, c = torch.randn(4, 3), torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="b of 3 rows"):
        _C.gemm(a, torch.randn(2, 5), c, None, False, 0, -1, "none", "packed")
    with pytest.raises(RuntimeError, match="multiple of mr"):
        _C.gemm(a, b, c, None, False, 1, -1, "none", "packed")
    with pytest.raises(RuntimeError, match="unknown variant"):
        _C.gemm(a, b, c, None, False, 0, -1, "none", "bogus")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _C.gemm(a.half(), b.half(), c.half(), None, False, 0, -1, "none", "packed")


def test_gemm_micro_kernel_hook():
    # The benchmark hook runs the micro-kernel gemm() uses (and gemm_shifted_a_packed_b's wide one);
    # its timing is reported, never asserted.
    from cnnops import _C

    spec = _C.gemm_spec()
    plain = _C.gemm_micro_kernel(False, 17, 3, 2)
    wide = _C.gemm_micro_kernel(True, 17, 3, 2)
    assert plain["mr"] == spec["mr"] and plain["nr"] == spec["nr_float32"]
    assert wide["mr"] >= plain["mr"]
    assert plain["seconds"] > 0 and wide["seconds"] > 0
    with pytest.raises(RuntimeError, match="must be positive"):
        _C.gemm_micro_kernel(False, 0, 1)


def test_kernel_buffers_are_cache_line_aligned():
    """Packed operands, scratch and padded copies start on a 64-byte line (scratch.h), so the
    micro-kernels' vector loads never straddle two lines."""
    from cnnops import _C

    offsets = _C.operand_misalignments()
    assert len(offsets) == 33
    assert set(offsets) == {0}
