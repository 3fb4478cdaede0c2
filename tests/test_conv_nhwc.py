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
    check_conv_against_torch,
    conv_tensors,
    dtype_id,
    make_tensor,
    run_conv,
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
    try:
        with cnnops.backends.cpu.flags(allow_winograd=False):
            yield
    finally:
        _C._set_cpu_nhwc_kernels_forced(False)


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
    """Without the override, small maps and 3-d layers run the NCHW kernels on converted tensors
    (conv.cpp's kernel_memory_format), with torch's results and memory format."""
    _C._set_cpu_nhwc_kernels_forced(False)
    for name in ("packed_7x7", "in_place_tail", "grid_3d", "packed_3d"):
        dims, x, w, b, kwargs = case_tensors(name, torch.float32)
        before = _C._cpu_nhwc_kernel_calls()
        check_conv_against_torch(dims, x, w, b, kwargs, torch.float32, msg=name)
        assert _C._cpu_nhwc_kernel_calls() == before, name


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
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(run_conv(getattr(cnnops.functional, f"conv{dims}d"), x, w, b, go, kwargs))
    finally:
        torch.set_num_threads(threads)
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2), "forward depends on the thread count"
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"grad_{k} depends on the thread count"


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
    x, w, b = conv_tensors(2, 2, 16, 32, (16, 16), 3, 1, True, torch.float32, layout="channels_last")
    before = (weight_counts(), _C._cpu_winograd_weight_calls(), _C._cpu_winograd_calls())
    _C._set_cpu_winograd_min_tiles(1)
    try:
        with cnnops.backends.cpu.flags(allow_winograd=True):
            check_conv_against_torch(2, x, w, b, dict(padding=1), torch.float32)
    finally:
        _C._set_cpu_winograd_min_tiles(-1)
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
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            runs.append(run_conv(conv, x, w, b, go, kwargs, grads=("weight",))[1]["weight"])
    finally:
        torch.set_num_threads(threads)
    for got in runs[1:]:
        assert torch.equal(got, runs[0]), "grad_weight depends on the thread count"


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
