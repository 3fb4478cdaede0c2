"""Grouped convolutions with narrow groups (RegNet's 8 channels a group, ResNeXt's 4 to 32), against
torch: up to 16 channels a group (in and out) they run the direct kernels of
csrc/cpu/conv_grouped.cpp in NCHW and NHWC (a call counter shows they ran); wider groups take
their own GEMM routes (conv.cpp kernel_memory_format, conv_shifted.h use_shifted_grid,
conv_winograd.cpp use_winograd). Forward and every gradient, every expected value from torch.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import check_conv_against_torch, conv_tensors, dtype_id, make_tensor, run_with_cpu_isa
from test_conv_activation import check_relu_conv

import cnnops.functional
from cnnops import _C

DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (14, 14), (9, 13), (3, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("per_group,groups", [(8, 6), (4, 8), (16, 3), (32, 2)], ids=str)
def test_narrow_groups(per_group, groups, size, stride, dtype, layout):
    c = per_group * groups
    x, w, b = conv_tensors(2, 2, c, c, size, 3, groups, True, dtype, layout)
    check_conv_against_torch(2, x, w, b, {"stride": stride, "padding": 1, "groups": groups}, dtype,
                             grad_layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_regnet_block_widths(layout):
    """RegNetY-400MF's grouped 3x3 layers at batch 1: 48 channels at 56x56 stride 1 and 104 at
    stride 2 (group width 8)."""
    for c, size, stride in [(48, 56, 1), (104, 56, 2)]:
        x, w, b = conv_tensors(2, 1, c, c, size, 3, c // 8, False, torch.float32, layout)
        check_conv_against_torch(2, x, w, b, {"stride": stride, "padding": 1, "groups": c // 8}, torch.float32,
                                 grad_layout=layout)


# --------------------------------------------------------------------------------------------
# The direct kernels (csrc/cpu/conv_grouped.cpp): groups with at most 16 input and output channels
# --------------------------------------------------------------------------------------------

DIRECT_MAX = 16  # conv_grouped.cpp kGroupedMaxChannels


def direct_calls():
    return _C._cpu_grouped_direct_calls()


def check_direct(n, cin_g, cout_g, groups, size, k, kwargs, dtype, layout, bias=True, expect=None):
    """check_conv_against_torch on one grouped layer; asserts how many direct kernel calls it made
    (forward, grad input, grad weight: 3 when taken, 0 when not)."""
    x, w, b = conv_tensors(2, n, cin_g * groups, cout_g * groups, size, k, groups, bias, dtype, layout)
    kwargs = dict(kwargs, groups=groups)
    before = direct_calls()
    check_conv_against_torch(2, x, w, b, kwargs, dtype,
                             grad_layout=layout if layout in ("contiguous", "channels_last") else "contiguous")
    if expect is None:
        expect = 3 if (n > 0 and max(cin_g, cout_g) <= DIRECT_MAX and groups * cin_g != groups) else None
    if expect is not None:
        assert direct_calls() - before == expect, f"{kwargs} cin_g={cin_g} cout_g={cout_g}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (1, 1, 1), (1, 2, 1), (2, 0, 1), (2, 1, 1), (2, 2, 1),
                                                     (1, 2, 2), (2, 2, 2), (3, 1, 1)], ids=str)
@pytest.mark.parametrize("cin_g,cout_g,groups", [(8, 8, 3), (1, 4, 5), (3, 2, 2), (4, 16, 2), (16, 4, 3), (5, 7, 2),
                                                 (16, 16, 2)], ids=str)
def test_direct_grid(cin_g, cout_g, groups, stride, padding, dilation, dtype, layout):
    """3x3 at every stride, padding and dilation the kernels take, channels per group around the
    micro-kernel block sizes (8, 4, 2, 1 outputs), odd sizes."""
    check_direct(2, cin_g, cout_g, groups, (11, 9), 3,
                 {"stride": stride, "padding": padding, "dilation": dilation}, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (1, 2, 0), (2, 2, 0), (5, 1, 2), (5, 2, 2), (7, 2, 3),
                                              (4, 3, 1)], ids=str)
def test_direct_kernel_sizes(k, stride, padding, layout):
    """Other kernel sizes fall out of the same loops: 1x1 (a phase with no taps in grad input at
    stride 2), even kernels, kernels wider than twice the stride."""
    for dtype in DTYPES:
        check_direct(2, 6, 8, 4, (13, 10), k, {"stride": stride, "padding": padding}, dtype, layout)


@pytest.mark.parametrize("groups", [2, 7, 32, 64])
def test_direct_many_groups(groups):
    for layout in LAYOUTS:
        check_direct(2, 2, 2, groups, (6, 7), 3, {"stride": 2, "padding": 1}, torch.float32, layout)
        check_direct(1, 2, 1, groups, (5, 5), 3, {"stride": 1, "padding": 1}, torch.float64, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wider_groups_keep_the_gemm(layout):
    """Past 16 channels a group (either side) the GEMM path runs, not the direct kernels."""
    for cin_g, cout_g in [(32, 8), (8, 32), (17, 17), (32, 32)]:
        check_direct(2, cin_g, cout_g, 2, (9, 9), 3, {"stride": 2, "padding": 1}, torch.float32, layout, expect=0)


@pytest.mark.parametrize("cin_g,cout_g,groups", [(8, 8, 13), (5, 3, 3), (3, 3, 11), (9, 7, 7), (2, 1, 2)], ids=str)
def test_direct_channels_last_transposes(cin_g, cout_g, groups):
    """Channels-last tensors reach the kernels through blocked transposes of whole pixels (vector-wide
    square blocks, the last one overlapping, scalar where a side is narrower than a vector): channel
    counts and pixel counts around every ISA's vector widths (2 to 16) and well past them."""
    for dtype in DTYPES:
        for size in [(1, 1), (3, 5), (4, 4), (2, 9), (16, 17), (17, 31)]:
            for stride in (1, 2):
                check_direct(2, cin_g, cout_g, groups, size, 3, {"stride": stride, "padding": 1}, dtype,
                             "channels_last")


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_direct_non_contiguous(layout):
    for dtype in DTYPES:
        check_direct(2, 8, 8, 3, (9, 12), 3, {"stride": 2, "padding": 1}, dtype, layout)
        check_direct(2, 4, 8, 2, (7, 7), 3, {"stride": 1, "padding": 1}, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_direct_batch_zero_and_one(layout):
    for dtype in DTYPES:
        check_direct(1, 8, 8, 4, (9, 9), 3, {"stride": 2, "padding": 1}, dtype, layout)
        check_direct(0, 8, 8, 4, (9, 9), 3, {"stride": 2, "padding": 1}, dtype, layout)
        check_direct(2, 8, 8, 4, (1, 1), 3, {"stride": 2, "padding": 1}, dtype, layout)  # one output, tiny planes
        check_direct(2, 8, 8, 4, (2, 1), 1, {"stride": 2}, dtype, layout)  # dX rows no output reads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,size", [(3, (20, 20)), (5, (20, 21)), (7, (5, 5)), (17, (3, 4))], ids=str)
def test_direct_batch_passes(n, size, layout):
    """Small maps put several samples side by side in one grad-weight pass; batches that do not
    fill the last pass."""
    for dtype in DTYPES:
        for stride in (1, 2):
            check_direct(n, 8, 8, 2, size, 3, {"stride": stride, "padding": 1}, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_direct_fused_relu(dtype, layout):
    for stride in (1, 2):
        x, w, b = conv_tensors(2, 2, 24, 24, (10, 11), 3, 3, True, dtype, layout)
        before = direct_calls()
        check_relu_conv(2, x, w, b, {"stride": stride, "padding": 1, "groups": 3}, dtype)
        assert direct_calls() - before == 3


def test_direct_relu_passes_nan():
    x = make_tensor((1, 16, 8, 8), torch.float32)
    x[0, 3, 4, 4] = float("nan")
    w, b = make_tensor((16, 8, 3, 3), torch.float32), make_tensor((16,), torch.float32)
    before = direct_calls()
    ours = cnnops.functional._conv(x, w, b, 1, 1, 1, 2, 2, _activation="relu")
    assert direct_calls() - before == 1
    torch.testing.assert_close(ours, torch.relu(F.conv2d(x, w, b, 1, 1, 1, 2)), equal_nan=True)


def test_direct_infinite_input_beyond_last_output():
    """x values no output reads (past the last strided output, or on the dropped grid columns)
    must not reach the weight gradient even when they are inf (0 * inf would be NaN)."""
    # (3, 42, 42) at stride 2: two samples a grad-weight pass, the last pass with one
    for layout, (k, stride, shape) in itertools.product(
            LAYOUTS, [(3, 2, (2, 10, 20)), (1, 2, (2, 10, 20)), (3, 3, (2, 10, 20)), (3, 2, (3, 42, 42))]):
        x = make_tensor((shape[0], 16) + shape[1:], torch.float64, layout)
        x[:, :, :, -1] = float("inf")  # 10 x 20, no padding: no output reads the last row or column
        x[:, :, -1, :] = float("inf")
        w = make_tensor((16, 8, k, k), torch.float64)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.conv2d(xr, wr, None, stride, 0, 1, 2)
        go = make_tensor(ref.shape, torch.float64)
        expected = torch.autograd.grad(ref, wr, go)[0]
        xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
        before = direct_calls()
        got = torch.autograd.grad(cnnops.functional.conv2d(xo, wo, None, stride, 0, 1, 2), wo, go)[0]
        assert direct_calls() - before == 2
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(got, expected, msg=f"{layout} k={k} s={stride}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_direct_thread_count(layout):
    """A long batch reduction stays within tolerance, and no result depends on the thread count."""
    threads = torch.get_num_threads()
    try:
        x, w, b = conv_tensors(2, 8, 48, 48, (28, 30), 3, 6, True, torch.float32, layout)
        for stride in (1, 2):
            kwargs = {"stride": stride, "padding": 1, "groups": 6}
            check_conv_against_torch(2, x, w, b, kwargs, torch.float32, grad_layout=layout)
            results = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                xs, ws, bs = (v.detach().clone().requires_grad_() for v in (x, w, b))
                y = cnnops.functional.conv2d(xs, ws, bs, **kwargs)
                results.append((y.detach(),) + torch.autograd.grad(y, (xs, ws, bs), torch.ones_like(y)))
            for other in results[1:]:
                for a, e in zip(other, results[0]):
                    assert torch.equal(a, e), f"s={stride}: result depends on the thread count"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (2, 2)], ids=str)
def test_direct_gradcheck(stride, dilation, layout):
    x, w, b = conv_tensors(2, 2, 6, 4, (6, 7), 3, 2, True, torch.float64, layout)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]

    def f(x, w, b):
        return cnnops.functional.conv2d(x, w, b, stride, 1, dilation, 2)

    before = direct_calls()
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert direct_calls() > before


def test_direct_gradgradcheck():
    for layout in LAYOUTS:
        x, w, b = conv_tensors(2, 1, 4, 6, (5, 6), 3, 2, True, torch.float64, layout)
        inputs = [t.clone().requires_grad_() for t in (x, w, b)]
        assert torch.autograd.gradgradcheck(lambda x, w, b: cnnops.functional.conv2d(x, w, b, 2, 1, 1, 2), inputs)


def test_direct_conv1d_and_unbatched():
    for dtype in DTYPES:
        x, w, b = conv_tensors(1, 2, 16, 8, (19,), 3, 4, True, dtype)
        before = direct_calls()
        check_conv_against_torch(1, x, w, b, {"stride": 2, "padding": 1, "groups": 4}, dtype)
        assert direct_calls() - before == 3
        x, w, b = conv_tensors(2, 1, 16, 16, (9, 10), 3, 2, True, dtype, unbatched=True)
        check_conv_against_torch(2, x, w, b, {"stride": 2, "padding": 1, "groups": 2}, dtype)


ISA_CHECK = r"""
import itertools, sys, torch
sys.path.insert(0, "tests")
from conftest import check_conv_relu_against_torch
from cnnops import _C
print(torch.ops.cnnops.cpu_gemm_isa())
torch.manual_seed(0)
tol = {torch.float32: 2e-5, torch.float64: 1e-12}
# (C_in/g, C_out/g, groups, (H, W), k, stride, padding, dilation, relu)
cases = [(8, 8, 3, (13, 17), 3, 1, 1, 1, False), (8, 8, 2, (14, 14), 3, 2, 1, 1, True),
         (3, 13, 2, (7, 7), 3, 2, 0, 1, False), (16, 5, 2, (5, 21), 3, 1, 2, 2, True),
         (4, 4, 4, (1, 2), 1, 2, 0, 1, False), (2, 16, 3, (9, 6), 5, 2, 2, 1, False),
         (8, 8, 13, (17, 31), 3, 2, 1, 1, False), (3, 5, 3, (4, 5), 3, 1, 1, 1, False)]
before = _C._cpu_grouped_direct_calls()
for dtype, (ci, co, g, (h, w_), k, s, p, d, relu), cl in itertools.product(
        (torch.float32, torch.float64), cases, (False, True)):
    x = torch.randn(4 if cl else 2, ci * g, h, w_, dtype=dtype)  # batch 4: per-sample channels-last grad input
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(co * g, ci, k, k, dtype=dtype)
    b = torch.randn(co * g, dtype=dtype)
    check_conv_relu_against_torch(x, w, b, s, p, d, g, relu, tol[dtype],
                                  f"{dtype} ci={ci} co={co} g={g} {h}x{w_} k={k} s={s} p={p} d={d} cl={cl}")
if _C._cpu_grouped_direct_calls() - before != 3 * 2 * 2 * len(cases):
    sys.exit("the direct kernels did not run")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_direct_every_isa_matches_torch(isa):
    result = run_with_cpu_isa(isa, ISA_CHECK, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa  # the requested kernels really ran


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_direct_reduced_precision(dtype):
    """bfloat16 and float16 run the float kernels (float accumulation, as torch)."""
    for layout, stride in itertools.product(LAYOUTS, (1, 2)):
        x, w, b = conv_tensors(2, 2, 16, 16, (9, 10), 3, 2, True, dtype, layout)
        before = direct_calls()
        check_conv_against_torch(2, x, w, b, {"stride": stride, "padding": 1, "groups": 2}, dtype, grad_layout=layout)
        assert direct_calls() - before == 3


@pytest.mark.parametrize("width", [15, 16, 17, 31, 32, 33, 34, 35])
def test_direct_row_widths(width):
    """Rows of the phase planes, dY and dX phases around one and two vectors (the AVX-512 masked row
    copies and the stride-2 spreads into dX), odd and even widths, padding 0 and 1, batch 1 and 2."""
    for layout, stride, padding in itertools.product(LAYOUTS, (1, 2), (0, 1)):
        check_direct(1, 8, 8, 2, (5, width), 3, {"stride": stride, "padding": padding}, torch.float32, layout)
    check_direct(2, 4, 4, 3, (4, width), 3, {"stride": 2, "padding": 1}, torch.float64, "contiguous")


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 2, 1, 1), (1, 2, 0, 1), (2, 2, 0, 1), (4, 3, 1, 1),
                                                       (3, 2, 2, 2), (5, 2, 2, 1), (3, 3, 0, 1)], ids=str)
def test_direct_channels_last_grad_input_samples(k, stride, padding, dilation):
    """Channels-last grad input at stride >= 2 from batch 4 on runs a task per sample over every group,
    in bands of 8 dX phase rows: phases no tap reaches, rows across band edges (H up to 35), channel
    counts around the vector width."""
    for (cin_g, cout_g, groups), size in itertools.product([(8, 8, 13), (3, 5, 3), (16, 4, 2)],
                                                           [(35, 17), (16, 9), (5, 3)]):
        check_direct(4, cin_g, cout_g, groups, size, k, {"stride": stride, "padding": padding, "dilation": dilation},
                     torch.float32, "channels_last")
    check_direct(5, 8, 8, 3, (18, 11), k, {"stride": stride, "padding": padding, "dilation": dilation},
                 torch.float64, "channels_last")
