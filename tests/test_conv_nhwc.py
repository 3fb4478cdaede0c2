"""Channels-last convolution kernels (csrc/cpu/conv_nhwc.cpp) against torch.nn.functional.

The NHWC kernels serve channels_last inputs with at least 4 input channels per group (not
depthwise); the stem-like cases below (fewer channels) check the converting paths beside them.
Every one reads the input from a zero-padded copy split by the stride (the phase
grid): the forward reads its GEMM operand in place on that grid where few grid rows are waste
("grid"), packs it otherwise ("packed"), reads a 1x1 stride-1 unpadded input itself ("in place",
whose last rows that do not fill a micro-kernel panel go through a padded copy), and writes Y
directly when the grid has no waste rows ("direct"); strided convolutions get their input
gradient from an NHWC col2im. path() mirrors that choice so the cases below provably reach each
kernel. Expected values come from torch (float64 reference).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import cnnops
from cnnops import _C
import cnnops.functional
from conftest import (
    CHANNELS_LAST,
    assert_same_bits_across_threads,
    check_conv_against_torch,
    conv_tensors,
    dtype_id,
    make_tensor,
    run_with_cpu_isa,
)

MIN_GRID_EFFICIENCY = 0.85  # kMinGridEfficiency in conv_nhwc.cpp
MIN_GRID_EFFICIENCY_NARROW = 0.7  # kMinGridEfficiencyNarrow: at most NARROW_OUTPUTS output channels a group
NARROW_OUTPUTS = 128
GEMM_KC = cnnops._C.gemm_spec()["kc"]


def lift(v, dims, fill):
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
    return (fill,) * (3 - dims) + v


def path(dims, n, cin, cout, spatial, kernel, stride=1, padding=0, dilation=1, groups=1):
    """(forward path, grad-input path) of the NHWC kernels for this geometry."""
    size, k = lift(spatial, dims, 1), lift(kernel, dims, 1)
    s, p, d = lift(stride, dims, 1), lift(padding, dims, 0), lift(dilation, dims, 1)
    out = [(size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(3)]
    grid = [-(-(size[i] + 2 * p[i]) // s[i]) for i in range(3)]
    pointwise = all(v == 1 for v in k + s) and all(v == 0 for v in p)
    if pointwise:
        fwd = "in_place"
    elif grid == out:
        fwd = "direct"
    elif math.prod(out) / math.prod(grid) >= (MIN_GRID_EFFICIENCY_NARROW if cout // groups <= NARROW_OUTPUTS
                                              else MIN_GRID_EFFICIENCY):
        fwd = "grid"
    else:
        fwd = "packed"
    if cin // groups * math.prod(k) > GEMM_KC:
        fwd += "_long_k"
    strided = any(v != 1 for v in s) or any(d[i] * (k[i] - 1) - p[i] < 0 for i in range(3))
    return fwd, ("col2im" if strided else "as_forward")


# name -> (dims, n, cin, cout, spatial, kernel, kwargs).
CASES = {
    "grid_s2": (2, 2, 8, 12, (29, 31), 3, dict(stride=2, padding=1)),
    "grid_s2_long_k": (2, 2, 40, 24, (29, 27), 3, dict(stride=2, padding=1)),  # K = 360: two blocks
    # Output channels a multiple of NR (the weight panels leave no padding to zero), K over two blocks.
    "grid_s2_full_panels": (2, 2, 40, 64, (29, 27), 3, dict(stride=2, padding=1)),
    "grid_groups_full_panels": (2, 1, 32, 64, (29, 31), 3, dict(stride=2, padding=1, groups=2)),
    # Three blocks of output rows on one thread, four on two (conv_nhwc.cpp's row_blocks).
    "grid_three_blocks": (2, 4, 8, 12, (29, 29), 3, dict(stride=2, padding=1)),
    "packed_three_blocks": (2, 34, 8, 12, (9, 9), 3, dict(stride=2, padding=1)),  # 69% of the grid
    "grid_s3_k2": (2, 3, 6, 10, (31, 29), 2, dict(stride=3)),  # two of three phases used per dim
    "grid_s2_dil2": (2, 2, 5, 7, (60, 62), 3, dict(stride=2, dilation=2, padding=2)),  # one phase
    "grid_stride_tuple": (2, 2, 8, 9, (27, 33), 3, dict(stride=(2, 1), padding=1)),
    "grid_s1": (2, 1, 8, 40, (30, 28), 3, dict(padding=1)),  # 40 channels: 2 panels
    "grid_groups": (2, 2, 16, 12, (31, 29), 3, dict(stride=2, padding=1, groups=2)),
    "grid_3d": (3, 2, 4, 6, (3, 30, 28), (1, 3, 3), dict(stride=(1, 2, 2), padding=(0, 1, 1))),
    "packed_3d": (3, 2, 4, 6, (8, 12, 14), 3, dict(stride=(1, 2, 2), padding=1)),
    "packed_s1_dilation": (2, 1, 8, 12, (30, 28), 3, dict(padding=1, dilation=(1, 4))),
    # 14x14 keeps 77% of the grid: the grid for at most 128 output channels, packed above
    "grid_narrow_14x14": (2, 2, 16, 32, (14, 14), 3, dict(padding=1)),
    "packed_wide_14x14": (2, 1, 8, 136, (14, 14), 3, dict(padding=1)),
    "packed_s2_small": (2, 3, 8, 37, (9, 7), 3, dict(stride=2, padding=1)),
    "packed_7x7": (2, 3, 16, 20, (7, 7), 3, dict(padding=1)),
    "packed_long_k": (2, 2, 32, 40, (6, 5), 3, dict(padding=1)),  # K = 288
    "packed_pad_gt_kernel": (2, 2, 4, 5, (5, 6), 3, dict(padding=3, stride=2)),
    "packed_3d_dil": (3, 1, 4, 5, (5, 6, 7), 2, dict(dilation=2, padding=1)),
    "packed_batch1_split": (2, 1, 8, 96, (4, 4), 3, dict(padding=1)),  # few rows: channels split
    "in_place_tail": (2, 2, 6, 10, (5, 7), 1, dict()),  # 70 rows: a tail of 70 % MR
    "in_place_blocks": (2, 3, 12, 33, (13, 11), 1, dict()),  # 429 rows in two blocks
    "in_place_groups": (2, 2, 8, 6, (5, 3), 1, dict(groups=2)),
    "in_place_long_k": (2, 2, 300, 9, (3, 5), 1, dict()),
    "direct_1x1_s2": (2, 2, 8, 16, (10, 12), 1, dict(stride=2)),
    "direct_1x1_s2_odd": (2, 2, 8, 6, (11, 9), 1, dict(stride=2)),
    "direct_1x1_s3": (2, 1, 4, 5, (9, 7), 1, dict(stride=3)),
    "stem_7x7_s2": (2, 2, 3, 8, (30, 28), 7, dict(stride=2, padding=3)),  # 3 channels
    "cin2": (2, 2, 2, 5, (9, 8), 3, dict(padding=1)),
    # 2 channels per group, stride 2 over 3 dims: a B panel of grad_weight spans taps in several
    # phases, whose first and last offsets can be 31 apart without the panel being one run.
    "cg2_3d_s2_groups": (3, 2, 4, 6, (5, 4, 6), 3, dict(stride=2, padding=1, groups=2)),
    "cin2_groups2_1x1_s2": (2, 2, 4, 6, (7, 9), 1, dict(stride=2, groups=2)),
    "batch1": (2, 1, 8, 12, (29, 31), 3, dict(stride=2, padding=1)),
    "batch0": (2, 0, 8, 12, (9, 9), 3, dict(stride=2, padding=1)),
}


def case_tensors(name, dtype, bias=True):
    dims, n, cin, cout, spatial, kernel, kwargs = CASES[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, kwargs.get("groups", 1), bias, dtype,
                           layout="channels_last")
    return dims, x, w, b, kwargs


@pytest.fixture(autouse=True)
def _direct_path():
    """Winograd would take the stride-1 3x3 cases, and conv.cpp's speed rules would convert the
    small and 3-d ones to NCHW: these tests are about the NHWC kernels."""
    _C._set_cpu_nhwc_kernels_forced(True)
    _C._set_cpu_nhwc_row_segments(False)  # the grid, packed and col2im kernels; the segments: h14dx's section
    try:
        with cnnops.backends.cpu.flags(allow_winograd=False):
            yield
    finally:
        _C._set_cpu_nhwc_kernels_forced(False)
        _C._set_cpu_nhwc_row_segments(True)


def test_cases_reach_every_path():
    fwd, bwd = set(), set()
    for dims, n, cin, cout, spatial, kernel, kwargs in CASES.values():
        f, b = path(dims, n, cin, cout, spatial, kernel, **kwargs)
        fwd.add(f)
        bwd.add(b)
    assert {"grid", "grid_long_k", "packed", "packed_long_k", "in_place", "in_place_long_k", "direct"} <= fwd
    assert {"col2im", "as_forward"} <= bwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch(name, dtype):
    dims, x, w, b, kwargs = case_tensors(name, dtype)
    before, packed_before = _C._cpu_nhwc_kernel_calls(), _C._cpu_nhwc_packed_forward_calls()
    routes_before = _C._cpu_conv_forward_routes()
    with torch.no_grad():  # the forward alone: which of the grid and packed kernels ran
        getattr(cnnops.functional, f"conv{dims}d")(x, w, b, **kwargs)
    routes = {k for k, v in _C._cpu_conv_forward_routes().items() if v > routes_before[k]}
    if "nhwc" in routes:
        packed = _C._cpu_nhwc_packed_forward_calls() - packed_before
        assert packed == path(*CASES[name][:6], **kwargs)[0].startswith("packed"), (name, packed)
    else:  # up to 4 input channels (a group): the direct first-layer and narrow-group kernels
        assert x.numel() == 0 or routes <= {"first_layer", "grouped", "space_to_depth"}, (name, routes)
    check_conv_against_torch(dims, x, w, b, kwargs, dtype, msg=name)
    if x.numel() > 0:  # (an empty input has no memory format to suggest)
        assert _C._cpu_nhwc_kernel_calls() > before  # the NHWC kernels ran, not a conversion to NCHW


def test_speed_rules_convert_small_and_3d_inputs():
    """Without the override, small maps and narrow 3-d layers (wide ones: test_conv3d_cpu.py) run the
    NCHW kernels on converted tensors (conv.cpp's kernel_memory_format), with torch's results and memory format."""
    _C._set_cpu_nhwc_kernels_forced(False)
    for name in ("packed_7x7", "grid_3d", "packed_3d"):
        dims, x, w, b, kwargs = case_tensors(name, torch.float32)
        before = _C._cpu_nhwc_kernel_calls()
        check_conv_against_torch(dims, x, w, b, kwargs, torch.float32, msg=name)
        assert _C._cpu_nhwc_kernel_calls() == before, name


def test_speed_rules_keep_small_pointwise_forwards_channels_last():
    """A 1x1 stride-1 forward on a small map reads channels-last in place (its backward still
    converts): one NHWC call, the forward's, for forward and both gradients."""
    _C._set_cpu_nhwc_kernels_forced(False)
    dims, x, w, b, kwargs = case_tensors("in_place_tail", torch.float32)
    before = _C._cpu_nhwc_kernel_calls()
    check_conv_against_torch(dims, x, w, b, kwargs, torch.float32, msg="in_place_tail")
    assert _C._cpu_nhwc_kernel_calls() == before + 1


@pytest.mark.parametrize("name", ["grid_s2", "packed_7x7", "in_place_tail", "direct_1x1_s2"])
def test_no_bias(name):
    dims, x, w, b, kwargs = case_tensors(name, torch.float32, bias=False)
    check_conv_against_torch(dims, x, w, None, kwargs, torch.float32, msg=name)


@pytest.mark.parametrize("name", ["grid_s2", "packed_7x7", "in_place_tail", "direct_1x1_s2", "grid_3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_relu(name, bias):
    dims, x, w, b, kwargs = case_tensors(name, torch.float64, bias=bias)
    kw = dict(stride=1, padding=0, dilation=1, groups=1)
    kw.update(kwargs)
    got = cnnops.functional._conv(x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], dims,
                                  _activation="relu")
    expected = torch.relu(getattr(F, f"conv{dims}d")(x, w, b, **kwargs))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert got.is_contiguous(memory_format=CHANNELS_LAST[dims + 2])


@pytest.mark.parametrize("name", ["grid_s2", "packed_s2_small", "grid_groups", "direct_1x1_s2_odd", "in_place_tail"])
def test_grad_output_not_channels_last(name):
    """grad_output in another layout than the input: the kernels get it converted to NHWC."""
    dims, x, w, b, kwargs = case_tensors(name, torch.float32)
    check_conv_against_torch(dims, x, w, b, kwargs, torch.float32, grad_layout="contiguous", msg=name)


GRADCHECK = {
    "s2_groups": (2, 1, 8, 4, (5, 6), 3, dict(stride=2, padding=1, groups=2)),
    "s3_k2_dil": (2, 2, 4, 3, (7, 6), 2, dict(stride=3, dilation=2, padding=1)),
    "1x1_s2": (2, 2, 4, 3, (5, 4), 1, dict(stride=2)),
    "1x1": (2, 1, 5, 3, (3, 3), 1, dict()),
    "3d_s2": (3, 1, 4, 2, (3, 4, 5), 2, dict(stride=2, padding=1)),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck(name):
    dims, n, cin, cout, spatial, kernel, kwargs = GRADCHECK[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, kwargs.get("groups", 1), True, torch.float64,
                           layout="channels_last")
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    conv = getattr(cnnops.functional, f"conv{dims}d")
    assert torch.autograd.gradcheck(lambda x, w, b: conv(x, w, b, **kwargs), leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["grid_s2_long_k", "packed_batch1_split", "in_place_blocks", "grid_groups",
                                  "grid_three_blocks", "packed_three_blocks"])
def test_thread_count_independent(name):
    """Forward and gradients are bitwise the same with 1 and 2 threads."""
    dims, x, w, b, kwargs = case_tensors(name, torch.float32)
    with torch.no_grad():
        go = make_tensor(F.conv2d(x, w, b, **kwargs).shape if dims == 2 else F.conv3d(x, w, b, **kwargs).shape,
                         torch.float32, "channels_last")
    assert_same_bits_across_threads(getattr(cnnops.functional, f"conv{dims}d"), x, w, b, go, kwargs)


ISA_CHECK = r"""
import sys, torch, torch.nn.functional as F
import cnnops
print(torch.ops.cnnops.cpu_gemm_isa())
torch.manual_seed(0)
cases = [  # (dims, N, C_in, C_out, size, kernel, stride, padding, dilation, groups)
    (2, 2, 8, 12, (13, 11), 3, 2, 1, 1, 1),   # grid, strided grad input
    (2, 3, 8, 37, (5, 7), 3, 1, 1, 1, 1),     # packed
    (2, 2, 6, 10, (5, 7), 1, 1, 0, 1, 1),     # 1x1 in place, a tail of rows
    (2, 1, 4, 5, (9, 7), 1, 3, 0, 1, 1),      # 1x1 stride 3, direct
    (2, 2, 16, 12, (9, 9), 3, 2, 1, 1, 2),    # groups
    (2, 1, 40, 9, (7, 6), 3, 2, 1, 1, 1),     # K = 360, two reduction blocks
    (2, 2, 40, 64, (13, 11), 3, 2, 1, 1, 1),  # whole weight panels, two reduction blocks
    (2, 2, 3, 8, (16, 14), 7, 2, 3, 1, 1),    # the RGB stem
]
for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
    for (dims, n, ci, co, size, k, s, p, d, g) in cases:
        x = torch.randn(n, ci, *size, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(co, ci // g, k, k, dtype=dtype, requires_grad=True)
        b = torch.randn(co, dtype=dtype, requires_grad=True)
        ref, ours = F.conv2d(x, w, b, s, p, d, g), cnnops.functional.conv2d(x, w, b, s, p, d, g)
        go = torch.randn_like(ref)
        grads_ref = torch.autograd.grad(ref, (x, w, b), go)
        grads_ours = torch.autograd.grad(ours, (x, w, b), go)
        for name, a, e in zip(("out", "dx", "dw", "db"), (ours,) + grads_ours, (ref,) + grads_ref):
            err = ((a - e).abs().max() / e.abs().max().clamp_min(1)).item()
            if not err < tol:
                sys.exit(f"{dtype} {(dims, n, ci, co, size, k, s, p, d, g)} {name}: relative error {err}")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_every_micro_kernel(isa):
    """The row tails depend on the micro-kernel's rows (MR): run the NHWC kernels with each."""
    result = run_with_cpu_isa(isa, ISA_CHECK, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa


# --- weight gradient (h14dw) ---
# conv_nhwc.cpp's weight gradient runs one of three products: transposed (im2col^T read in place
# from the phase grid, dY packed) for few output channels a group, "rows": more than half of one B
# panel (17-32 float32, 9-16 float64 channels) and input channels a group a multiple of MR; both
# operands in place for 1x1 stride-1 unpadded layers, "pointwise": min(C_in, C_out) a group at
# most 64 or both at most 128, rows of X and dY at most 1 KB apart; the packed product otherwise.
# Each case names the product it must take per dtype (counted by the kernels, not recomputed here).
# name -> (dims, n, cin, cout, spatial, kernel, kwargs, float32 product, float64 product).
WEIGHT_CASES = {
    "rows_32": (2, 2, 16, 32, (9, 11), 3, dict(padding=1), "rows", "packed"),
    "rows_17": (2, 1, 8, 17, (7, 6), 3, dict(), "rows", "packed"),
    "rows_f64_12": (2, 2, 8, 12, (7, 9), 3, dict(padding=1), "packed", "rows"),
    "half_panel_16": (2, 2, 16, 16, (7, 9), 3, dict(padding=1), "packed", "rows"),
    "rows_s2_dil2": (2, 2, 16, 24, (13, 12), 3, dict(stride=2, dilation=2, padding=2), "rows", "packed"),
    "rows_groups": (2, 2, 32, 64, (9, 8), 3, dict(padding=1, groups=2), "rows", "packed"),
    "rows_3d": (3, 1, 8, 20, (4, 5, 6), 3, dict(padding=1), "rows", "packed"),
    "rows_long_k": (2, 2, 48, 32, (6, 7), 3, dict(padding=1), "rows", "packed"),  # K = 432 rows of dW^T
    "rows_partials": (2, 2, 8, 32, (48, 48), 3, dict(padding=1), "rows", "packed"),  # 12 chunks, 2 partials
    "rows_k2_pad0": (2, 3, 8, 30, (10, 9), 2, dict(), "rows", "packed"),
    "rows_batch1": (2, 1, 16, 32, (5, 5), 3, dict(padding=1), "rows", "packed"),
    "cin12_not_rows": (2, 2, 12, 32, (7, 6), 3, dict(padding=1), "packed", "packed"),  # 12 % MR != 0
    "cout33_not_rows": (2, 2, 8, 33, (7, 6), 3, dict(padding=1), "packed", "packed"),
    "cout64_not_rows": (2, 2, 8, 64, (7, 6), 3, dict(padding=1), "packed", "packed"),
    "pointwise": (2, 2, 6, 10, (5, 7), 1, dict(), "pointwise", "pointwise"),
    "pointwise_edges": (2, 3, 40, 13, (13, 11), 1, dict(), "pointwise", "pointwise"),  # partial A and B panels
    "pointwise_groups": (2, 2, 64, 48, (5, 3), 1, dict(groups=2), "pointwise", "pointwise"),
    "pointwise_partials": (2, 2, 16, 24, (48, 48), 1, dict(), "pointwise", "pointwise"),
    "pointwise_3d": (3, 2, 8, 12, (3, 5, 4), 1, dict(), "pointwise", "pointwise"),
    "pointwise_wide": (2, 1, 64, 136, (5, 4), 1, dict(), "pointwise", "packed"),  # float64 rows 1088 bytes apart
    # dY rows over 1 KB apart; one partial sum and one slice: the output channels split among threads.
    "1x1_far_rows": (2, 1, 16, 272, (5, 4), 1, dict(), "packed", "packed"),
    "pointwise_128": (2, 1, 128, 128, (5, 4), 1, dict(), "pointwise", "pointwise"),
    "1x1_large_packed": (2, 1, 136, 72, (5, 4), 1, dict(), "packed", "packed"),
    "1x1_s2_packed": (2, 2, 8, 16, (10, 12), 1, dict(stride=2), "packed", "packed"),
    "1x1_pad_packed": (2, 2, 8, 16, (6, 5), 1, dict(padding=1), "packed", "packed"),
    "batch0": (2, 0, 16, 32, (5, 5), 3, dict(padding=1), None, None),
}


def weight_counts():
    return _C._cpu_nhwc_weight_rows_calls(), _C._cpu_nhwc_weight_pointwise_calls()


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", list(WEIGHT_CASES))
def test_weight_gradient_products(name, dtype, weight_layout):
    """Forward and every gradient against torch; the weight gradient took the named product, once."""
    dims, n, cin, cout, spatial, kernel, kwargs, f32, f64 = WEIGHT_CASES[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, kwargs.get("groups", 1), True, dtype,
                           layout="channels_last", weight_layout=weight_layout)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=CHANNELS_LAST[dims + 2])
    before = weight_counts()
    check_conv_against_torch(dims, x, w, b, kwargs, dtype, msg=name)
    rows, pointwise = (now - then for now, then in zip(weight_counts(), before))
    expected = f32 if dtype == torch.float32 else f64
    assert (rows, pointwise) == (int(expected == "rows"), int(expected == "pointwise")), (rows, pointwise)


def test_weight_gradient_rows_before_winograd():
    """A float32 3x3 stride-1 layer that Winograd would take (DenseNet's 128->32 shape, scaled down)
    gets its weight gradient from the transposed product; the forward keeps Winograd."""
    x, w, b = conv_tensors(2, 2, 16, 32, (28, 28), 3, 1, True, torch.float32, layout="channels_last")
    before = (weight_counts(), _C._cpu_winograd_weight_calls(), _C._cpu_winograd_calls())
    with cnnops.backends.cpu.flags(allow_winograd=True):  # Winograd's own size rules (28x28: whole tiles)
        check_conv_against_torch(2, x, w, b, dict(padding=1), torch.float32)
    assert weight_counts()[0] == before[0][0] + 1
    assert _C._cpu_winograd_weight_calls() == before[1]
    assert _C._cpu_winograd_calls() > before[2]


@pytest.mark.parametrize("name", ["rows_partials", "rows_long_k", "pointwise_partials", "pointwise_edges",
                                  "packed_8_threads", "1x1_far_rows"])
def test_weight_gradient_thread_count_independent(name):
    """The partial sums are fixed by the sizes and every dW value is summed by one task in chunk
    order, however the rows or columns are split among tasks: 1, 2 and 3 threads give the same bits."""
    cases = dict(WEIGHT_CASES)
    # Packed, two partial sums and two K slices (K = 360), split by the thread count.
    cases["packed_8_threads"] = (2, 8, 40, 64, (48, 48), 3, dict(stride=2, padding=1), "packed", "packed")
    dims, n, cin, cout, spatial, kernel, kwargs, _, _ = cases[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, kwargs.get("groups", 1), True, torch.float32,
                           layout="channels_last")
    conv = getattr(cnnops.functional, f"conv{dims}d")
    with torch.no_grad():
        go = make_tensor(conv(x, w, b, **kwargs).shape, torch.float32, "channels_last")
    assert_same_bits_across_threads(conv, x, w, b, go, kwargs, threads=(1, 2, 3), grads=("weight",))


WEIGHT_ISA_CHECK = r"""
import sys, torch, torch.nn.functional as F
import cnnops
from cnnops import _C
print(torch.ops.cnnops.cpu_gemm_isa())
_C._set_cpu_nhwc_kernels_forced(True)
# 24 input channels: whole A panels for every MR (8, 3, 2).
cases = [  # n, ci, co, size, k, s, p, d, g, the product (float32)
    (2, 24, 32, (9, 8), 3, 1, 1, 1, 1, "rows"),
    (2, 24, 20, (11, 7), 3, 2, 1, 1, 1, "rows"),
    (1, 48, 64, (6, 6), 3, 1, 1, 1, 2, "rows"),
    (2, 24, 13, (7, 9), 1, 1, 0, 1, 1, "pointwise"),
    (2, 40, 70, (5, 7), 1, 1, 0, 1, 1, "pointwise"),
    (2, 24, 40, (7, 9), 3, 1, 1, 1, 1, "packed"),
]
with cnnops.backends.cpu.flags(allow_winograd=False):
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        for (n, ci, co, size, k, s, p, d, g, product) in cases:
            x = torch.randn(n, ci, *size, dtype=dtype).to(memory_format=torch.channels_last)
            w = torch.randn(co, ci // g, k, k, dtype=dtype)
            y = F.conv2d(x, w, None, s, p, d, g)
            go = torch.randn_like(y)
            before = (_C._cpu_nhwc_weight_rows_calls(), _C._cpu_nhwc_weight_pointwise_calls())
            dw = torch.ops.cnnops.conv_backward(go, x, w, [s, s], [p, p], [d, d], g, [False, True, False])[1]
            after = (_C._cpu_nhwc_weight_rows_calls(), _C._cpu_nhwc_weight_pointwise_calls())
            e = torch.ops.aten.convolution_backward(go.double(), x.double(), w.double(), None, [s, s], [p, p], [d, d],
                                                    False, [0, 0], g, [False, True, False])[1]
            err = ((dw.double() - e).abs().max() / e.abs().max().clamp_min(1)).item()
            case = (dtype, n, ci, co, size, k, s, p, d, g)
            if not err < tol:
                sys.exit(f"{case}: relative error {err}")
            wanted = (before[0] + (product == "rows"), before[1] + (product == "pointwise"))
            if dtype == torch.float32 and after != wanted:
                sys.exit(f"{case}: expected the {product} product, counters {before} -> {after}")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_weight_gradient_every_micro_kernel(isa):
    """Panel edges depend on MR: the three products with each micro-kernel."""
    result = run_with_cpu_isa(isa, WEIGHT_ISA_CHECK, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert result.stdout.split()[0] == isa


# --- forward and grad input (h14dx) ---
# The row-segment kernels (AVX-512): the forward computes only real output positions, each output
# row cut into equal segments of 6-12 rows run by a micro-kernel of exactly that many rows
# (conv_forward_nhwc_rows), and a strided grad input runs by input stride phases, each a stride-1
# correlation of dY with the phase's taps (conv_backward_input_nhwc_phases), with no col2im.
SEGMENTS = torch.ops.cnnops.cpu_gemm_isa() == "avx512"
SEGMENT_MIN_ROWS = 6  # gemm_row_segments_min_mr(): shorter output rows take the grid or packed kernels

# name -> (dims, n, cin, cout, spatial, kernel, kwargs); output widths 6-60 give segments of 6-12 rows.
# (1-d inputs have no channels-last layout: they never reach the NHWC kernels.)
SEGMENT_CASES = {
    "seg_7x7_narrow": (2, 3, 16, 32, (7, 7), 3, dict(padding=1)),  # one 7-row segment per output row
    "seg_14x14_cout17": (2, 2, 12, 17, (14, 14), 3, dict(padding=1)),  # 7 + 7, a partial B panel
    "seg_28_cout33": (2, 1, 8, 33, (9, 28), 3, dict(padding=1)),  # 10 + 10 + 8, two B panels
    "seg_60_cout64": (2, 1, 8, 64, (3, 60), 3, dict(padding=1)),  # 5 x 12
    "seg_width6_pad0": (2, 2, 5, 24, (8, 8), 3, dict()),  # width 6, C_in not a multiple of 8
    "seg_width11": (2, 1, 9, 20, (5, 13), 3, dict()),
    "seg_s2": (2, 2, 12, 40, (15, 29), 3, dict(stride=2, padding=1)),  # width 15: 8 + 7
    "seg_s3_dil": (2, 1, 8, 24, (20, 40), 3, dict(stride=3, dilation=2, padding=2)),
    "seg_groups": (2, 2, 16, 48, (9, 9), 3, dict(padding=1, groups=2)),
    "seg_s2_groups": (2, 2, 48, 40, (13, 26), 3, dict(stride=2, padding=1, groups=2)),  # 24 channels a group
    "seg_long_k": (2, 1, 64, 24, (6, 9), 3, dict(padding=1)),  # K = 576: three reduction blocks
    "seg_batch1": (2, 1, 8, 32, (6, 6), 3, dict(padding=1)),
    "seg_batch0": (2, 0, 8, 32, (6, 6), 3, dict(padding=1)),
    "seg_3d": (3, 2, 4, 12, (3, 6, 9), 3, dict(padding=(0, 1, 1))),
    "seg_1x1_s2": (2, 2, 8, 16, (16, 20), 1, dict(stride=2)),  # grad input: 3 of 4 phases have no tap
    "seg_k2_s3": (2, 1, 6, 10, (21, 26), 2, dict(stride=3)),  # phases without taps, others with 1-4
    "seg_stride_tuple": (2, 2, 8, 9, (13, 29), 3, dict(stride=(1, 2), padding=1)),
    "seg_3d_s2": (3, 1, 4, 8, (5, 6, 14), 3, dict(stride=2, padding=1)),
}
# Excluded: output rows shorter than SEGMENT_MIN_ROWS (forward), a phase's rows too (grad input),
# and the 1x1 stride-1 unpadded input read in place (no slack to read past its rows).
NO_SEGMENT_CASES = {
    "short_rows": (2, 2, 8, 32, (5, 5), 3, dict(padding=1)),  # width 5
    "pointwise": (2, 2, 8, 16, (9, 9), 1, dict()),
    "s2_short_phase": (2, 2, 8, 16, (9, 11), 3, dict(stride=2, padding=1)),  # widths 6, phase rows 5 and 6
    "s2_1x1": (2, 2, 8, 16, (16, 20), 1, dict(stride=2)),  # grad input: col2im (no overlapping taps)
}
FORWARD_SEGMENTS = {"s2_short_phase", "s2_1x1"}  # of NO_SEGMENT_CASES: only the grad input is excluded


def kernel_volume(name):
    dims, _, _, _, _, kernel, _ = SEGMENT_CASES[name]
    return math.prod(lift(kernel, dims, 1))


@pytest.fixture()
def segments(_direct_path):
    """The row-segment kernels on (the module's autouse fixture turns them off)."""
    _C._set_cpu_nhwc_row_segments(True)
    yield


def segment_tensors(cases, name, dtype, bias=True, weight_layout="contiguous"):
    dims, n, cin, cout, spatial, kernel, kwargs = cases[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, kwargs.get("groups", 1), bias, dtype,
                           layout="channels_last", weight_layout=weight_layout)
    return dims, x, w, b, kwargs


def strided(kwargs):
    s = kwargs.get("stride", 1)
    return any(v != 1 for v in (s if isinstance(s, tuple) else (s,)))


def output_width(dims, spatial, kernel, kwargs):
    size, k = lift(spatial, dims, 1), lift(kernel, dims, 1)
    s, p = lift(kwargs.get("stride", 1), dims, 1), lift(kwargs.get("padding", 0), dims, 0)
    d = lift(kwargs.get("dilation", 1), dims, 1)
    return (size[2] + 2 * p[2] - d[2] * (k[2] - 1) - 1) // s[2] + 1


@pytest.mark.usefixtures("segments")
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", list(SEGMENT_CASES))
def test_row_segments_match_torch(name, dtype, weight_layout):
    dims, x, w, b, kwargs = segment_tensors(SEGMENT_CASES, name, dtype, weight_layout=weight_layout)
    fwd, gin = _C._cpu_nhwc_row_segment_calls(), _C._cpu_nhwc_phase_grad_input_calls()
    with torch.no_grad():
        getattr(cnnops.functional, f"conv{dims}d")(x, w, b, **kwargs)
    if SEGMENTS and x.numel() > 0:
        assert _C._cpu_nhwc_row_segment_calls() == fwd + 1, name
    check_conv_against_torch(dims, x, w, b, kwargs, dtype, msg=name)
    if SEGMENTS and x.numel() > 0 and strided(kwargs) and kernel_volume(name) > 1:
        assert _C._cpu_nhwc_phase_grad_input_calls() > gin, name


@pytest.mark.usefixtures("segments")
@pytest.mark.parametrize("name", list(NO_SEGMENT_CASES))
def test_row_segments_excluded(name):
    dims, x, w, b, kwargs = segment_tensors(NO_SEGMENT_CASES, name, torch.float32)
    fwd, gin = _C._cpu_nhwc_row_segment_calls(), _C._cpu_nhwc_phase_grad_input_calls()
    check_conv_against_torch(dims, x, w, b, kwargs, torch.float32, msg=name)
    if name in FORWARD_SEGMENTS:
        assert _C._cpu_nhwc_row_segment_calls() == fwd + int(SEGMENTS), name
    else:
        assert _C._cpu_nhwc_row_segment_calls() == fwd, name
    assert _C._cpu_nhwc_phase_grad_input_calls() == gin, name


@pytest.mark.usefixtures("segments")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["seg_7x7_narrow", "seg_14x14_cout17", "seg_long_k", "seg_s2", "seg_3d"])
def test_row_segments_fused_relu(name, bias):
    dims, x, w, b, kwargs = segment_tensors(SEGMENT_CASES, name, torch.float64, bias=bias)
    kw = dict(stride=1, padding=0, dilation=1, groups=1)
    kw.update(kwargs)
    before = _C._cpu_nhwc_row_segment_calls()
    got = cnnops.functional._conv(x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], dims,
                                  _activation="relu")
    expected = torch.relu(getattr(F, f"conv{dims}d")(x, w, b, **kwargs))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert _C._cpu_nhwc_row_segment_calls() == before + int(SEGMENTS)


@pytest.mark.usefixtures("segments")
@pytest.mark.parametrize("name", ["seg_s2", "seg_k2_s3", "seg_groups", "seg_3d_s2"])
def test_row_segments_gradcheck(name):
    dims, n, cin, cout, spatial, kernel, kwargs = SEGMENT_CASES[name]
    x, w, b = conv_tensors(dims, 1, cin, cout, spatial, kernel, kwargs.get("groups", 1), True, torch.float64,
                           layout="channels_last")
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    conv = getattr(cnnops.functional, f"conv{dims}d")
    assert torch.autograd.gradcheck(lambda x, w, b: conv(x, w, b, **kwargs), leaves, eps=1e-6, atol=1e-7)


@pytest.mark.usefixtures("segments")
@pytest.mark.parametrize("name", ["seg_14x14_cout17", "seg_s2", "seg_groups", "seg_28_cout33", "seg_k2_s3",
                                  "seg_s2_groups"])
def test_row_segments_thread_count_independent(name):
    """The row-segment forward and phase grad input are bitwise the same with 1 and 2 threads."""
    dims, x, w, b, kwargs = segment_tensors(SEGMENT_CASES, name, torch.float32)
    with torch.no_grad():
        go = make_tensor(getattr(F, f"conv{dims}d")(x, w, b, **kwargs).shape, torch.float32, "channels_last")
    assert_same_bits_across_threads(getattr(cnnops.functional, f"conv{dims}d"), x, w, b, go, kwargs)


def test_row_segment_cases_cover_the_segment_sizes():
    """The cases reach segments of 6 to 12 rows and the excluded ones stay below the minimum."""
    sizes = set()
    for dims, _, _, _, spatial, kernel, kwargs in SEGMENT_CASES.values():
        width = output_width(dims, spatial, kernel, kwargs)
        parts = -(-width // 12)
        sizes.add(-(-width // parts))
    assert {6, 7, 8, 10, 11, 12} <= sizes
    dims, _, _, _, spatial, kernel, kwargs = NO_SEGMENT_CASES["short_rows"]
    assert output_width(dims, spatial, kernel, kwargs) < SEGMENT_MIN_ROWS


@pytest.mark.usefixtures("segments")
def test_row_segment_speed_rules():
    """Without the override: a small-map forward the segments serve stays channels-last (its backward
    still converts), a large weight on few rows converts, and narrow float32 layers up to 16x16 take
    the segments before Winograd, which keeps 28x28 and 56x56 (conv.cpp)."""
    _C._set_cpu_nhwc_kernels_forced(False)
    cases = [  # (x shape, weight shape, forward on the segments, Winograd, channels-last kernels)
        ((2, 16, 7, 7), (20, 16, 3, 3), True, False, True),  # 98 rows, a small weight
        ((1, 512, 7, 7), (512, 512, 3, 3), False, False, False),  # 49 rows, 9.4 MB of weight: NCHW
        ((2, 64, 16, 16), (16, 64, 3, 3), True, False, True),  # narrow, 32 Winograd tiles
        ((2, 64, 28, 28), (16, 64, 3, 3), False, True, True),
        ((2, 64, 56, 56), (16, 64, 3, 3), False, True, True),
    ]
    with cnnops.backends.cpu.flags(allow_winograd=True):
        for xs, ws, on_segments, winograd, channels_last in cases:
            x = make_tensor(xs, torch.float32, "channels_last")
            w = make_tensor(ws, torch.float32)
            seg, wino, nhwc = _C._cpu_nhwc_row_segment_calls(), _C._cpu_winograd_calls(), _C._cpu_nhwc_kernel_calls()
            with torch.no_grad():
                got = cnnops.functional.conv2d(x, w, None, padding=1)
            expected = F.conv2d(x.double(), w.double(), None, padding=1)
            torch.testing.assert_close(got.double(), expected, atol=1e-3, rtol=1e-4)
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert SEGMENTS <= ((_C._cpu_nhwc_row_segment_calls() > seg) == on_segments), xs
            assert SEGMENTS <= ((_C._cpu_nhwc_kernel_calls() > nhwc) == channels_last), xs
            assert SEGMENTS <= ((_C._cpu_winograd_calls() > wino) == winograd), xs
        x = make_tensor((2, 16, 7, 7), torch.float32, "channels_last")
        w = make_tensor((20, 16, 3, 3), torch.float32)
        nhwc = _C._cpu_nhwc_kernel_calls()
        check_conv_against_torch(2, x, w, None, dict(padding=1), torch.float32)
        assert _C._cpu_nhwc_kernel_calls() == nhwc + int(SEGMENTS)  # the forward only
