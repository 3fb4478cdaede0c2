"""conv3d on the CPU: which kernels serve channels_last_3d inputs, checked against torch.

conv.cpp's kernel_memory_format (nhwc_serves_3d) runs ungrouped channels_last_3d convolutions with
more than 16 channels on the product's output side (the forward's output channels, the backward's
input channels) on the NHWC kernels, except backwards of a large weight (over 1e6 bytes) over few
output rows (under 768) and of widening 1x1x1 layers; it converts the others to NCHW and back, as
it does small maps (at most 64 positions a sample or 256 in all: by the input for the forward, the
output for the backward). takes_nhwc() mirrors that rule; every case checks it through _cpu_nhwc_kernel_calls,
so a case meant for the NHWC kernels provably ran them and one meant for NCHW provably did not.
Expected values come from torch (float64 reference).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import cnnops
from cnnops import _C
import cnnops.functional
from conftest import (
    assert_same_bits_across_threads,
    check_conv_against_torch,
    conv_tensors,
    dtype_id,
    make_tensor,
)

NHWC_MIN_CHANNELS = 17  # conv.cpp's nhwc_serves_3d: more than 16 channels
FEW_ROWS, LARGE_WEIGHT_BYTES = 768, 1e6  # its backward exception: a large weight over few output rows

# n, cin, cout, spatial, kernel, kwargs
CASES = {
    "k3_pad1": (2, 20, 24, (5, 7, 9), 3, dict(padding=1)),
    "k3_pad0": (2, 24, 20, (6, 7, 9), 3, dict()),
    "batch1": (1, 17, 18, (6, 9, 11), 3, dict(padding=1)),
    "batch0": (0, 20, 24, (5, 7, 9), 3, dict(padding=1)),
    "stride2": (2, 20, 24, (7, 9, 11), 3, dict(stride=2, padding=1)),
    "stride_122": (2, 20, 24, (5, 10, 12), 3, dict(stride=(1, 2, 2), padding=1)),
    "dilation2": (2, 20, 18, (6, 9, 10), 3, dict(dilation=2, padding=2)),
    "k133": (2, 24, 20, (5, 7, 9), (1, 3, 3), dict(padding=(0, 1, 1))),
    "k311": (2, 20, 24, (5, 7, 9), (3, 1, 1), dict(padding=(1, 0, 0))),
    "k111": (2, 20, 24, (5, 7, 9), 1, dict()),
    "k2_even": (2, 20, 24, (5, 7, 9), 2, dict(padding=1)),
    "long_k": (2, 40, 24, (4, 6, 8), 3, dict(padding=1)),  # reduction 1080: several KC blocks
    # Converted to NCHW: 16 output channels (forward) / 16 input channels (backward), groups, small maps.
    "fwd_nhwc_only": (2, 16, 24, (5, 7, 9), 3, dict(padding=1)),
    "bwd_nhwc_only": (2, 24, 16, (5, 7, 9), 3, dict(padding=1)),
    "narrow": (2, 8, 12, (5, 7, 9), 3, dict(padding=1)),
    "groups2": (2, 40, 48, (5, 7, 9), 3, dict(padding=1, groups=2)),
    "small_map": (2, 24, 24, (3, 4, 4), 3, dict(padding=1)),
    "k111_widen": (2, 20, 40, (5, 7, 9), 1, dict()),  # forward NHWC, backward NCHW
    "k111_narrow": (2, 40, 20, (5, 7, 9), 1, dict()),
    "large_weight_few_rows": (2, 128, 96, (4, 6, 6), 3, dict(padding=1)),  # 288 rows: backward NCHW
    "large_weight_rows": (2, 128, 96, (4, 8, 12), 3, dict(padding=1)),  # 768 rows: NHWC
}


def output_size(spatial, kernel, kwargs):
    def triple(v, default):
        v = kwargs.get(v, default)
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * 3

    k = kernel if isinstance(kernel, tuple) else (kernel,) * 3
    s, p, d = triple("stride", 1), triple("padding", 0), triple("dilation", 1)
    return [(spatial[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(3)]


def takes_nhwc(name, forward, dtype):
    """Whether kernel_memory_format gives this case's forward (or backward) to the NHWC kernels."""
    n, cin, cout, spatial, kernel, kwargs = CASES[name]
    out_plane = math.prod(output_size(spatial, kernel, kwargs))
    plane = math.prod(spatial) if forward else out_plane
    small = plane <= 64 or n * plane <= 256
    wide = (cout if forward else cin) >= NHWC_MIN_CHANNELS
    taps = math.prod(kernel) if isinstance(kernel, tuple) else kernel**3
    weight_bytes = cout * cin * taps * dtype.itemsize
    few_rows = n * out_plane < FEW_ROWS and weight_bytes > LARGE_WEIGHT_BYTES
    widening_1x1 = taps == 1 and cout > cin and "padding" not in kwargs and "stride" not in kwargs
    backward_exception = not forward and (few_rows or widening_1x1)
    return kwargs.get("groups", 1) == 1 and wide and not small and not backward_exception


def tensors(name, dtype, layout="channels_last", bias=True):
    n, cin, cout, spatial, kernel, kwargs = CASES[name]
    x, w, b = conv_tensors(3, n, cin, cout, spatial, kernel, kwargs.get("groups", 1), bias, dtype, layout=layout)
    return x, w, b, kwargs


def nhwc_calls(fn):
    before = _C._cpu_nhwc_kernel_calls()
    result = fn()
    return _C._cpu_nhwc_kernel_calls() - before, result


def check_routes(x, w, b, kwargs, name):
    """The forward and the backward each ran the NHWC kernels exactly when takes_nhwc says."""
    stride, padding = kwargs.get("stride", 1), kwargs.get("padding", 0)
    dilation, groups = kwargs.get("dilation", 1), kwargs.get("groups", 1)
    triple = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * 3  # noqa: E731
    args = (triple(stride), triple(padding), triple(dilation), groups)
    calls, y = nhwc_calls(lambda: torch.ops.cnnops.conv_forward(x, w, b, *args))
    assert (calls > 0) == takes_nhwc(name, True, x.dtype), (name, "forward", calls)
    gy = make_tensor(y.shape, x.dtype, "channels_last")
    calls, _ = nhwc_calls(lambda: torch.ops.cnnops.conv_backward(gy, x, w, *args, [True, True, True]))
    assert (calls > 0) == takes_nhwc(name, False, x.dtype), (name, "backward", calls)


def test_cases_reach_both_routes():
    for dtype in (torch.float32, torch.float64):
        for forward in (True, False):
            taken = {takes_nhwc(name, forward, dtype) for name in CASES if CASES[name][0] > 0}
            assert taken == {True, False}, (dtype, forward)
    # each backward exception is met by one case, and one case beside it takes the NHWC kernels
    assert takes_nhwc("large_weight_few_rows", True, torch.float32)
    assert not takes_nhwc("large_weight_few_rows", False, torch.float32)
    assert takes_nhwc("large_weight_rows", False, torch.float32)
    assert takes_nhwc("k111_widen", True, torch.float32) and not takes_nhwc("k111_widen", False, torch.float32)
    assert takes_nhwc("k111_narrow", False, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", list(CASES))
def test_channels_last_matches_torch(name, dtype):
    x, w, b, kwargs = tensors(name, dtype)
    check_conv_against_torch(3, x, w, b, kwargs, dtype, msg=name)
    if x.numel() > 0:  # (an empty input has no memory format to suggest)
        check_routes(x, w, b, kwargs, name)


@pytest.mark.parametrize("name", ["k3_pad1", "stride2", "k133", "batch1"])
def test_channels_last_grad_output_contiguous(name):
    """A contiguous grad_output beside a channels_last_3d input: converted for the NHWC kernels."""
    x, w, b, kwargs = tensors(name, torch.float32)
    check_conv_against_torch(3, x, w, b, kwargs, torch.float32, grad_layout="contiguous", msg=name)


@pytest.mark.parametrize("name", ["k3_pad1", "stride2", "k133", "long_k"])
def test_channels_last_no_bias(name):
    x, w, _, kwargs = tensors(name, torch.float32, bias=False)
    check_conv_against_torch(3, x, w, None, kwargs, torch.float32, grad_layout="channels_last", msg=name)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("name", ["k3_pad1", "stride2", "k311"])
def test_other_layouts_match_torch(name, layout):
    """NCHW and non-contiguous inputs: the NCHW kernels (on a copy), never the NHWC ones."""
    x, w, b, kwargs = tensors(name, torch.float32, layout=layout)
    calls, _ = nhwc_calls(lambda: check_conv_against_torch(3, x, w, b, kwargs, torch.float32, msg=name))
    assert calls == 0, (name, layout)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["k3_pad1", "stride2", "k111", "fwd_nhwc_only"])
def test_fused_relu(name, bias):
    x, w, b, kwargs = tensors(name, torch.float64, bias=bias)
    kw = dict(stride=1, padding=0, dilation=1, groups=1)
    kw.update(kwargs)
    calls, got = nhwc_calls(lambda: cnnops.functional._conv(x, w, b, kw["stride"], kw["padding"], kw["dilation"],
                                                             kw["groups"], 3, _activation="relu"))
    assert calls > 0, name
    expected = torch.relu(F.conv3d(x, w, b, **kwargs))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("name", ["k3_pad1", "batch1", "stride2", "dilation2", "k133", "long_k", "bwd_nhwc_only"])
def test_thread_count_independent(name):
    """Forward and gradients are bitwise the same with 1, 2 and 3 threads."""
    x, w, b, kwargs = tensors(name, torch.float32)
    with torch.no_grad():
        go = make_tensor(F.conv3d(x, w, b, **kwargs).shape, torch.float32, "channels_last")
    assert_same_bits_across_threads(cnnops.functional.conv3d, x, w, b, go, kwargs, threads=(1, 2, 3))


@pytest.mark.parametrize("name", ["stride2", "k2_even"])
def test_gradcheck(name):
    n, cin, cout, spatial, kernel, kwargs = CASES[name]
    x, w, b = conv_tensors(3, 1, cin, cout, (7, 8, 9), kernel, 1, True, torch.float64, layout="channels_last")
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    calls, _ = nhwc_calls(lambda: torch.autograd.gradcheck(
        lambda x, w, b: cnnops.functional.conv3d(x, w, b, **kwargs), leaves, eps=1e-6, atol=1e-7, fast_mode=True))
    assert calls > 0, name


# NCHW conv3d's weight gradient for one B panel of output channels (17-32 in float32, 9-16 in
# float64: conv.cpp's conv_backward_weight_rows) packs dY into a buffer its thread keeps for the
# next call: calls of growing and shrinking sizes, each against torch, each counted on that kernel.
FLOAT64_OUTPUTS = {24: 12, 20: 10, 32: 16, 17: 9}  # the float32 cases' output channels, in one float64 panel
WEIGHT_ROWS = [
    (2, 32, 24, (6, 9, 11), 3, dict(padding=1)),
    (1, 16, 20, (3, 5, 7), 3, dict(padding=1)),  # smaller: reads only the front of the kept buffer
    (2, 48, 32, (7, 10, 12), (1, 3, 3), dict(padding=(0, 1, 1))),  # larger: the buffer grows
    (1, 32, 17, (5, 7, 9), 3, dict(dilation=2, padding=2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_nchw_weight_rows_reused_buffer(dtype):
    for n, cin, cout, spatial, kernel, kwargs in WEIGHT_ROWS + WEIGHT_ROWS[::-1]:
        cout = FLOAT64_OUTPUTS[cout] if dtype == torch.float64 else cout
        x, w, b = conv_tensors(3, n, cin, cout, spatial, kernel, 1, True, dtype)
        before = _C._cpu_conv_weight_rows_calls()
        check_conv_against_torch(3, x, w, b, kwargs, dtype, grads=("weight",), msg=str((cin, cout, spatial)))
        assert _C._cpu_conv_weight_rows_calls() == before + 1, (cin, cout, spatial)


def test_nchw_weight_rows_thread_count_independent():
    n, cin, cout, spatial, kernel, kwargs = WEIGHT_ROWS[0]
    x, w, b = conv_tensors(3, n, cin, cout, spatial, kernel, 1, True, torch.float32)
    with torch.no_grad():
        go = make_tensor(F.conv3d(x, w, b, **kwargs).shape, torch.float32, "contiguous")
    assert_same_bits_across_threads(cnnops.functional.conv3d, x, w, b, go, kwargs, threads=(1, 2, 3))


def test_nchw_weight_rows_beyond_the_kept_size():
    """A packed dY^T over 64 MiB (540000 positions x 32 channels) is allocated for the call, not kept."""
    x, w, b = conv_tensors(1, 1, 32, 32, (540000,), 3, 1, True, torch.float32)
    before = _C._cpu_conv_weight_rows_calls()
    check_conv_against_torch(1, x, w, b, dict(padding=1), torch.float32, grads=("weight",))
    assert _C._cpu_conv_weight_rows_calls() == before + 1
