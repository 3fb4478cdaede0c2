"""Strided convolutions with at most 4 input channels a group and a kernel wider than twice the
stride that the direct kernels do not take (kernels wider than 7: AlexNet's 11x11 stride-4 stem;
the 7x7 stride-2 stem runs csrc/cpu/conv_grouped.cpp, test_conv_first_layer.py) run forward as a
stride-1 convolution on the input's phases (space to depth, csrc/cpu/conv_space_to_depth.cpp).
Differential tests against torch: forward and every gradient, NCHW and channels_last, odd sizes,
every padding up to the kernel's half, strides 2 to 4, batch 0 and 1, the fused ReLU; inputs with
inf or NaN keep the direct path. Every expected value comes from torch.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import check_conv_against_torch, conv_tensors, dtype_id

import cnnops.functional
from cnnops import _C

DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]


def calls():
    return _C._cpu_space_to_depth_calls()


def check(n, cin, cout, size, k, stride, padding, dtype, layout, bias=True):
    x, w, b = conv_tensors(2, n, cin, cout, size, k, 1, bias, dtype, layout)
    kwargs = {"stride": stride, "padding": padding}
    before = calls()
    check_conv_against_torch(2, x, w, b, kwargs, dtype, grad_layout=layout)
    return calls() - before


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", [(224, 224), (31, 29), (14, 15), (7, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_alexnet_stem(size, dtype, layout):
    """3 -> 64, 11x11, stride 4, padding 2 (AlexNet)."""
    n = 2 if size[0] < 100 else 1
    assert check(n, 3, 64, size, 11, 4, 2, dtype, layout) >= 1  # the forward took the path


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding", [0, 1, 2, 3])
@pytest.mark.parametrize("k,stride", [(9, 2), (11, 2), (8, 3), (11, 4)], ids=str)
@pytest.mark.parametrize("cin", [1, 2, 4])
def test_geometries(cin, k, stride, padding, layout):
    """Kernel sizes that are and are not multiples of the stride (zero taps in W'), channels 1-4,
    output sizes whose phases end unevenly."""
    for dtype in DTYPES:
        assert check(2, cin, 5, (17, 23), k, stride, padding, dtype, layout, bias=cin != 2) >= 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_groups(layout):
    """Two groups of 2 input channels: X' keeps each group's phases together."""
    for dtype in DTYPES:
        x, w, b = conv_tensors(2, 2, 4, 6, (17, 16), 9, 2, True, dtype, layout)
        before = calls()
        check_conv_against_torch(2, x, w, b, {"stride": 2, "padding": 3, "groups": 2}, dtype, grad_layout=layout)
        assert calls() - before == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_zero_and_one(layout):
    for n in (0, 1):
        check(n, 3, 8, (19, 20), 9, 2, 3, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_relu(layout):
    """conv_forward(..., activation="relu"), as after fuse_conv_bn: the ReLU applied by the
    stride-1 kernel as it writes y."""
    x, w, b = conv_tensors(2, 2, 3, 16, (21, 22), 9, 1, True, torch.float64, layout)
    before = calls()
    got = torch.ops.cnnops.conv_forward(x, w, b, [2, 2], [3, 3], [1, 1], 1, "relu")
    assert calls() - before == 1
    torch.testing.assert_close(got, torch.relu(F.conv2d(x, w, b, 2, 3)), rtol=1e-12, atol=1e-12)


def test_not_taken_outside_its_geometries():
    """Five input channels a group, a kernel of at most twice the stride, dilation, unequal strides,
    kernels of at most 7 (the direct kernels of conv_grouped.cpp): not space to depth."""
    cases = [((2, 5, 17, 17), (4, 5, 7, 7), {"stride": 2, "padding": 3}),
             ((2, 3, 17, 17), (4, 3, 4, 4), {"stride": 2, "padding": 1}),
             ((2, 3, 17, 17), (4, 3, 7, 7), {"stride": 2, "padding": 3, "dilation": 2}),
             ((2, 10, 17, 17), (4, 5, 7, 7), {"stride": 2, "padding": 3, "groups": 2}),
             ((2, 3, 17, 17), (4, 3, 7, 7), {"stride": (2, 1), "padding": 3}),
             ((2, 3, 17, 17), (4, 3, 7, 7), {"stride": 2, "padding": 3})]
    for xs, ws, kwargs in cases:
        x, w = torch.randn(xs, dtype=torch.float64), torch.randn(ws, dtype=torch.float64)
        before = calls()
        torch.testing.assert_close(cnnops.functional.conv2d(x, w, **kwargs), F.conv2d(x, w, **kwargs))
        assert calls() == before, kwargs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_input_keeps_the_direct_path(bad, layout):
    """A zero tap of the stride-1 kernel times inf is NaN at outputs whose strided window never
    reads that value: such inputs must give torch's outputs, finite ones included."""
    x = torch.randn(2, 3, 20, 21, dtype=torch.float64)
    x[1, 2, 5, 6] = bad
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    w, b = torch.randn(8, 3, 9, 9, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    before = calls()
    got = cnnops.functional.conv2d(x, w, b, 2, 3)
    assert calls() == before
    expected = F.conv2d(x, w, b, 2, 3)
    assert torch.isfinite(expected).any() and not torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_gradcheck():
    x = torch.randn(2, 3, 11, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: cnnops.functional.conv2d(x, w, b, 2, 3), (x, w, b))
