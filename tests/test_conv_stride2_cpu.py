"""Strided (ResNet downsampling) 3x3 convolutions on the CPU against torch.nn.functional.

Contiguous (NCHW) float32 3x3 stride-2 forwards with at least 64 input channels and 10x10 outputs
run converted to channels-last on the NHWC row-segment kernel (strided_forward_as_nhwc in conv.cpp);
the route counters prove which cases take it and which do not.

Channels-last forward on the row-segment kernel: for 2-d stride-2 layers of one group with at least
14x14 outputs each task fills the phase-grid rows it reads itself (row_tasks_fill_grid in
conv_nhwc.cpp; counter _cpu_nhwc_row_segment_own_fill_calls).

Channels-last grad input by input stride phases (conv_backward_input_nhwc_phases): the phases of a
3x3 stride-2 layer have 4, 2, 2 and 1 taps, so their tasks differ in cost and are split between
threads by cost (parallel_for_by_cost), not by count. These cases run it at 1, 2 and 3 threads
(each split leaves different tasks to each thread, and a task left out would leave dX
uninitialized) and check the bits do not depend on the thread count. Expected values come from
torch (float64 reference).
"""

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional
from cnnops import _C
from conftest import (assert_same_bits_across_threads, check_conv_against_torch, conv_tensors, dtype_id, make_tensor,
                      run_at_threads)

SEGMENTS = torch.ops.cnnops.cpu_gemm_isa() == "avx512"  # the phase kernels run on AVX-512 only

# name -> (n, cin, cout, (h, w), kwargs): channels-last 3x3 layers whose grad input runs by phases.
PHASE_CASES = {
    "s2_57x55_c33": (2, 33, 65, (57, 55), dict(stride=2, padding=1)),  # odd maps and channels
    "s2_pad0": (2, 24, 40, (27, 30), dict(stride=2)),  # phases of 2, 1 and 0 leading pad columns
    "s2_1_mixed": (2, 20, 36, (25, 29), dict(stride=(2, 1), padding=1)),  # two phases, 3 and 6 taps
    "s2_dilation2": (2, 18, 32, (30, 31), dict(stride=2, padding=2, dilation=2)),  # one phase has all 9 taps
    "s2_groups2": (2, 66, 68, (23, 27), dict(stride=2, padding=1, groups=2)),  # 33 and 34 channels a group
    "s2_batch1_column_split": (1, 40, 48, (33, 34), dict(stride=2, padding=1)),  # 4 tasks: 3 threads split columns
    "s2_resnet_like": (2, 64, 64, (28, 28), dict(stride=2, padding=1)),
    "s2_blocks_across_samples": (8, 24, 32, (27, 29), dict(stride=2, padding=1)),  # 14 output rows, G_h 15
}
# The forward's tasks fill the phase-grid rows they read themselves (row_tasks_fill_grid): 2-d,
# stride 2, one group, at least 14x14 outputs. The others fill the whole grid first.
OWN_FILL = {"s2_57x55_c33", "s2_dilation2", "s2_batch1_column_split", "s2_resnet_like", "s2_blocks_across_samples"}


def phase_tensors(name, dtype, n=None):
    batch, cin, cout, spatial, kwargs = PHASE_CASES[name]
    x, w, b = conv_tensors(2, batch if n is None else n, cin, cout, spatial, 3, kwargs.get("groups", 1), True, dtype,
                           layout="channels_last")
    return x, w, b, kwargs


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", list(PHASE_CASES))
def test_phase_grad_input_matches_torch(name, dtype, threads):
    x, w, b, kwargs = phase_tensors(name, dtype)
    before = _C._cpu_nhwc_phase_grad_input_calls()
    run_at_threads(threads, lambda: check_conv_against_torch(2, x, w, b, kwargs, dtype, msg=name))
    assert _C._cpu_nhwc_phase_grad_input_calls() > before or not SEGMENTS, name


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", list(PHASE_CASES))
def test_forward_own_fill(name, dtype, threads):
    """Forward (with bias, and ReLU fused) against torch; the own-fill counter proves which cases fill their rows."""
    x, w, b, kwargs = phase_tensors(name, dtype)
    before = _C._cpu_nhwc_row_segment_own_fill_calls()
    kw = dict(stride=1, padding=0, dilation=1, groups=1)
    kw.update(kwargs)
    with torch.no_grad():
        got = run_at_threads(threads, lambda: cnnops.functional._conv(
            x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], 2, _activation="relu"))
    expected = torch.relu(F.conv2d(x.double(), w.double(), b.double(), **kwargs)).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert _C._cpu_nhwc_row_segment_own_fill_calls() == before + int(SEGMENTS and name in OWN_FILL), name


@pytest.mark.parametrize("n", [0, 1])
def test_phase_grad_input_small_batches(n):
    x, w, b, kwargs = phase_tensors("s2_57x55_c33", torch.float32, n=n)
    before = _C._cpu_nhwc_phase_grad_input_calls()
    run_at_threads(2, lambda: check_conv_against_torch(2, x, w, b, kwargs, torch.float32, msg=f"batch {n}"))
    # batch 0: nothing to compute, dX is zeroed without a kernel
    assert _C._cpu_nhwc_phase_grad_input_calls() == before + int(SEGMENTS and n > 0)


def test_phase_grad_input_non_dense_channels_last():
    """A channels-last view with gaps (every other column) is copied dense, then runs by phases."""
    x, w, b, kwargs = phase_tensors("s2_57x55_c33", torch.float32)
    wide = make_tensor((2, 33, 57, 110), torch.float32, "channels_last")
    x = wide[:, :, :, ::2]
    assert x.stride()[1] == 1 and not x.is_contiguous(memory_format=torch.channels_last)
    before = _C._cpu_nhwc_phase_grad_input_calls()
    run_at_threads(2, lambda: check_conv_against_torch(2, x, w, b, kwargs, torch.float32, check_channels_last=False))
    assert _C._cpu_nhwc_phase_grad_input_calls() > before or not SEGMENTS


@pytest.mark.parametrize("name", list(PHASE_CASES))
def test_phase_grad_input_same_bits_across_threads(name):
    x, w, b, kwargs = phase_tensors(name, torch.float32)
    with torch.no_grad():
        go = make_tensor(F.conv2d(x, w, b, **kwargs).shape, torch.float32, "channels_last")
    assert_same_bits_across_threads(cnnops.functional.conv2d, x, w, b, go, kwargs, threads=(1, 2, 3))


# --- NCHW 3x3 stride-2 forward through the channels-last row-segment kernel ---
# name -> (n, cin, cout, (h, w), layout, kwargs)
NCHW_AS_NHWC_CASES = {
    "c64_21x23": (2, 64, 80, (21, 23), "contiguous", dict(stride=2, padding=1)),  # 11x12 outputs
    "c65_57x55": (2, 65, 33, (57, 55), "contiguous", dict(stride=2, padding=1)),  # odd maps and channels
    "batch1_20x20": (1, 64, 64, (20, 20), "contiguous", dict(stride=2, padding=1)),  # 10x10: the smallest taken
    "sliced": (2, 64, 48, (21, 21), "sliced", dict(stride=2, padding=1)),  # a non-dense view
    "transposed": (2, 64, 48, (21, 21), "transposed", dict(stride=2, padding=1)),
    "wide_rows": (8, 272, 32, (20, 20), "contiguous", dict(stride=2, padding=1)),  # over 256 channels, 800 rows
}
NCHW_OWN_FILL = {"c65_57x55"}  # at least 14x14 outputs: the tasks fill their grid rows
# Kept on the NCHW kernels: float64, and geometries the rule does not take.
NCHW_KEPT_CASES = {
    "outputs_7x7": (2, 64, 64, (14, 14), "contiguous", dict(stride=2, padding=1)),
    "outputs_9x10": (2, 64, 64, (18, 20), "contiguous", dict(stride=2, padding=1)),  # 90 < 100
    "c63": (2, 63, 64, (21, 21), "contiguous", dict(stride=2, padding=1)),
    "pad0": (2, 64, 64, (23, 23), "contiguous", dict(stride=2)),
    "stride_2_1": (2, 64, 64, (21, 21), "contiguous", dict(stride=(2, 1), padding=1)),
    "dilation2": (2, 64, 64, (25, 25), "contiguous", dict(stride=2, padding=1, dilation=2)),
    "groups2": (2, 64, 64, (21, 21), "contiguous", dict(stride=2, padding=1, groups=2)),
    "wide_few_rows": (1, 272, 32, (20, 20), "contiguous", dict(stride=2, padding=1)),  # 100 rows < 800
}


def nchw_tensors(cases, name, dtype, bias=True):
    n, cin, cout, spatial, layout, kwargs = cases[name]
    x, w, b = conv_tensors(2, n, cin, cout, spatial, 3, kwargs.get("groups", 1), bias, dtype, layout=layout,
                           weight_layout="contiguous")
    return x, w, b, kwargs


def nhwc_forward_calls():
    return _C._cpu_nhwc_row_segment_calls(), _C._cpu_conv_forward_routes()["nhwc"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(NCHW_AS_NHWC_CASES))
def test_nchw_forward_as_nhwc_matches_torch(name, threads):
    x, w, b, kwargs = nchw_tensors(NCHW_AS_NHWC_CASES, name, torch.float32)
    segments, nhwc = nhwc_forward_calls()
    own_fill = _C._cpu_nhwc_row_segment_own_fill_calls()
    out, _ = run_at_threads(threads, lambda: check_conv_against_torch(2, x, w, b, kwargs, torch.float32, msg=name))
    assert out.is_contiguous(), "an NCHW input gives an NCHW output"
    assert nhwc_forward_calls() == (segments + int(SEGMENTS), nhwc + int(SEGMENTS)), name
    assert _C._cpu_nhwc_row_segment_own_fill_calls() == own_fill + int(SEGMENTS and name in NCHW_OWN_FILL), name


@pytest.mark.parametrize("name", list(NCHW_KEPT_CASES))
def test_nchw_forward_kept(name):
    x, w, b, kwargs = nchw_tensors(NCHW_KEPT_CASES, name, torch.float32)
    before = nhwc_forward_calls()
    check_conv_against_torch(2, x, w, b, kwargs, torch.float32, msg=name)
    assert nhwc_forward_calls() == before, name


def test_nchw_forward_float64_kept():
    x, w, b, kwargs = nchw_tensors(NCHW_AS_NHWC_CASES, "c64_21x23", torch.float64)
    before = nhwc_forward_calls()
    check_conv_against_torch(2, x, w, b, kwargs, torch.float64)
    assert nhwc_forward_calls() == before


def test_nchw_forward_as_nhwc_bfloat16():
    """Reduced precision runs through the float kernels, so it takes the route too."""
    x, w, b, kwargs = nchw_tensors(NCHW_AS_NHWC_CASES, "c64_21x23", torch.bfloat16)
    segments, _ = nhwc_forward_calls()
    check_conv_against_torch(2, x, w, b, kwargs, torch.bfloat16)
    assert _C._cpu_nhwc_row_segment_calls() == segments + int(SEGMENTS)


def test_nchw_forward_as_nhwc_batch0():
    x, w, b, kwargs = nchw_tensors(NCHW_AS_NHWC_CASES, "c64_21x23", torch.float32)
    x = x[:0]
    out = cnnops.functional.conv2d(x, w, b, **kwargs)
    expected = F.conv2d(x, w, b, **kwargs)
    assert out.shape == expected.shape and out.is_contiguous()


@pytest.mark.parametrize("bias", [True, False])
def test_nchw_forward_as_nhwc_fused_relu(bias):
    x, w, b, kwargs = nchw_tensors(NCHW_AS_NHWC_CASES, "c65_57x55", torch.float32, bias=bias)
    segments, _ = nhwc_forward_calls()
    got = cnnops.functional._conv(x, w, b, 2, 1, 1, 1, 2, _activation="relu")
    expected = torch.relu(F.conv2d(x.double(), w.double(), None if b is None else b.double(), **kwargs)).float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got.is_contiguous()
    assert _C._cpu_nhwc_row_segment_calls() == segments + int(SEGMENTS)


@pytest.mark.parametrize("name", ["c65_57x55", "batch1_20x20"])
def test_nchw_forward_as_nhwc_same_bits_across_threads(name):
    x, w, b, kwargs = nchw_tensors(NCHW_AS_NHWC_CASES, name, torch.float32)
    with torch.no_grad():
        go = make_tensor(F.conv2d(x, w, b, **kwargs).shape, torch.float32)
    assert_same_bits_across_threads(cnnops.functional.conv2d, x, w, b, go, kwargs, threads=(1, 2, 3))
