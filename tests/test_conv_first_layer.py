"""First layers: few input channels a group (the RGB image: 3) and any number of output channels,
groups = 1 included (ResNet's 7x7 stride-2 stem, MobileNetV3's and EfficientNet's 3x3 stride-2
layers). Up to 4 input channels a group they run the direct kernels of csrc/cpu/conv_grouped.cpp
(forward over output-row tasks, grad weight over output-channel tasks, on phase planes filled once),
except with groups = 1, whose forward and grad weight run csrc/cpu/conv_first_layer.cpp (either layout;
the grad input stays on the grouped kernels). Call counters and the forward route counter show which
ran. Forward and every gradient against torch, every expected value from torch.
"""

import itertools
import random

import pytest
import torch
from conftest import check_conv_against_torch, conv_tensors, dtype_id, run_with_cpu_isa
from test_conv_activation import check_relu_conv

import cnnops.functional
from cnnops import _C

DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]
NARROW_MAX = 4  # conv_grouped.cpp kNarrowInputChannels


def counters():
    """Calls of the grouped and of the first-layer kernels, and forward routes of each."""
    routes = _C._cpu_conv_forward_routes()
    return (_C._cpu_grouped_direct_calls(), _C._cpu_first_layer_calls(), routes["grouped"],
            routes["first_layer"])


def direct_calls():
    """Kernel calls of either direct path (grouped or first-layer)."""
    grouped, first, _, _ = counters()
    return grouped + first


def takes_direct(cin, k, stride, padding, groups=1, dilation=1):
    """conv_grouped.cpp use_grouped_direct for 2-d square kernels (not depthwise)."""
    return cin // groups <= NARROW_MAX and k <= 7 and stride <= 4 and padding <= dilation * (k - 1) and not (
        groups > 1 and groups == cin)


def check_kernels(before, x, groups, grads):
    """The direct kernels that ran since `before` (counters()) for one layer of `grads`: with groups = 1
    the first-layer kernels for the forward and the weight gradient, the grouped ones for the grad input;
    with groups > 1 the grouped ones for all three."""
    grouped, first, grouped_route, first_route = (a - b for a, b in zip(counters(), before))
    if groups == 1:
        assert (first, first_route, grouped, grouped_route) == (1 + ("weight" in grads), 1, "input" in grads, 0)
    else:
        assert (first, first_route, grouped, grouped_route) == (0, 0, 1 + ("input" in grads) + ("weight" in grads), 1)


def check(n, cin, cout, size, k, stride, padding, dtype, layout, groups=1, bias=True, grads=None, dilation=1):
    """check_conv_against_torch on one layer; asserts the direct kernels ran where they should
    (forward, grad input, grad weight: 3 calls; check_kernels says which) and did not elsewhere."""
    x, w, b = conv_tensors(2, n, cin, cout, size, k, groups, bias, dtype, layout)
    kwargs = {"stride": stride, "padding": padding, "groups": groups, "dilation": dilation}
    grads = grads or ("input", "weight", "bias")
    before, calls = counters(), direct_calls()
    check_conv_against_torch(2, x, w, b, kwargs, dtype, grads=grads,
                             grad_layout=layout if layout in LAYOUTS else "contiguous")
    taken = direct_calls() - calls
    if n == 0:
        assert taken == 0
    elif takes_direct(cin, k, stride, padding, groups, dilation):
        check_kernels(before, x, groups, grads)
    else:
        assert taken == 0, (cin, cout, k, stride, padding, groups)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cout", [1, 5, 8, 13, 16, 24, 37, 64, 80])
@pytest.mark.parametrize("cin", [1, 2, 3, 4, 12])
def test_channels(cin, cout, dtype, layout):
    """Output channels around correlate's blocks of 8/4/2/1 and the grad-weight task blocks (4-wide),
    stride 2, the stem's 7x7 and the 3x3 of MobileNet; 12 input channels keep today's path."""
    for k, padding in [(3, 1), (7, 3)]:
        check(2, cin, cout, (17, 14), k, 2, padding, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding", [0, 1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_geometries(k, stride, padding, layout):
    """Every kernel, stride and padding up to 3 (padding past k - 1 keeps today's path), odd sizes."""
    for dtype in DTYPES:
        check(3, 3, 11, (19, 23), k, stride, padding, dtype, layout)


def test_random_geometries():
    """Random sizes, kernels (also non-square), strides, paddings, channels and batches."""
    rng = random.Random(12)
    for _ in range(40):
        cin, cout = rng.choice([1, 2, 3, 4]), rng.randint(1, 80)
        kh, kw = rng.choice([1, 2, 3, 5, 7]), rng.choice([1, 3, 4, 7])
        sh, sw = rng.randint(1, 4), rng.randint(1, 4)
        ph, pw = rng.randint(0, kh - 1), rng.randint(0, kw - 1)
        h, w = rng.randint(kh + 1, 40), rng.randint(kw + 1, 40)  # (not a 1x1 map: window_dot)
        n = rng.choice([1, 2, 3])
        dtype = rng.choice(DTYPES)
        layout = rng.choice(LAYOUTS + ["sliced"])
        x, wt, b = conv_tensors(2, n, cin, cout, (h, w), (kh, kw), 1, rng.random() < 0.5, dtype, layout)
        kwargs = {"stride": (sh, sw), "padding": (ph, pw)}
        before = direct_calls()
        check_conv_against_torch(2, x, wt, b, kwargs, dtype,
                                 grad_layout=layout if layout in LAYOUTS else "contiguous")
        assert direct_calls() - before == 3, (x.shape, wt.shape, kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", [2, 3])
def test_dilation(dilation, layout):
    """Dilated taps (the grouped kernels' phase planes, the first-layer kernels' entry offsets)."""
    for dtype in DTYPES:
        for k, stride, padding, cout in [(3, 1, 2, 16), (3, 2, 0, 37), (5, 2, 4, 8), (7, 1, 3, 64), (2, 3, 1, 20)]:
            check(2, 3, cout, (29, 26), k, stride, padding, dtype, layout, dilation=dilation)


@pytest.mark.parametrize("cin", [1, 2, 4])
@pytest.mark.parametrize("grads", [("weight",), ("bias",), ("input",), ("input", "weight"), ("weight", "bias"),
                                   ("input", "weight", "bias")], ids="-".join)
def test_gradient_subsets(grads, cin):
    """Each subset of gradients (the first-layer grad weight sums the grad bias in its pass over dY
    when both are asked for), channels-last, with and without a bias."""
    for bias in (True, False):
        if "bias" in grads and not bias:
            continue
        check(2, cin, 24, (33, 35), 3, 2, 1, torch.float32, "channels_last", bias=bias, grads=grads)
        check(1, cin, 64, (70, 61), 7, 2, 3, torch.float64, "channels_last", bias=bias, grads=grads)


@pytest.mark.parametrize("cin", [1, 2, 3, 4])
def test_nchw_rows(cin):
    """NCHW input rows wider than a vector (the first-layer kernels interleave them by shuffles), with a
    remainder, at each padding the row copy shifts by."""
    for dtype in DTYPES:
        for k, stride, padding in [(3, 1, 1), (3, 2, 0), (7, 2, 3), (5, 2, 2), (3, 3, 1)]:
            check(2, cin, 20, (9, 37), k, stride, padding, dtype, "contiguous")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_zero_one_three(layout):
    for dtype, n in itertools.product(DTYPES, (0, 1, 3)):
        check(n, 3, 16, (15, 16), 3, 2, 1, dtype, layout)
        check(n, 3, 64, (21, 20), 7, 2, 3, dtype, layout)


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_non_contiguous(layout):
    for dtype in DTYPES:
        check(2, 3, 32, (16, 17), 3, 2, 1, dtype, layout)
        check(1, 3, 20, (13, 13), 7, 2, 3, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_layer_shapes(layout):
    """The model layers at full size, batch 1, the weight gradient only (the image needs none)."""
    check(1, 3, 64, (224, 224), 7, 2, 3, torch.float32, layout, grads=("weight",))
    check(1, 3, 16, (224, 224), 3, 2, 1, torch.float32, layout, grads=("weight", "bias"))
    check(1, 3, 32, (225, 223), 3, 2, 1, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_groups(layout):
    """Groups of few input channels with more than 16 outputs each take the first-layer tasks too."""
    for dtype in DTYPES:
        check(2, 6, 40, (13, 12), 3, 2, 1, dtype, layout, groups=2)
        check(2, 4, 34, (9, 11), 5, 1, 2, dtype, layout, groups=2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fused_relu(dtype, layout):
    for cout, k, stride, padding in [(16, 3, 2, 1), (64, 7, 2, 3), (5, 3, 1, 1)]:
        x, w, b = conv_tensors(2, 2, 3, cout, (18, 17), k, 1, True, dtype, layout)
        before = direct_calls()
        check_relu_conv(2, x, w, b, {"stride": stride, "padding": padding}, dtype)
        assert direct_calls() - before == 3


def test_infinite_input_beyond_last_output():
    """x values no output reads must not reach the weight gradient even when they are inf (no 0 * inf),
    nor any output (space to depth's zero taps would read them)."""
    for layout, (cout, k, stride, shape) in itertools.product(
            LAYOUTS,
            [(16, 3, 2, (2, 10, 20)), (64, 7, 2, (3, 24, 24)), (8, 1, 2, (1, 10, 20)), (5, 3, 3, (2, 11, 20))]):
        x = torch.randn((shape[0], 3) + shape[1:], dtype=torch.float64)
        x[:, :, :, -1] = float("inf")
        x[:, :, -1, :] = float("inf")
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        w = torch.randn(cout, 3, k, k, dtype=torch.float64)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = torch.nn.functional.conv2d(xr, wr, None, stride, 0)
        go = torch.randn(ref.shape, dtype=torch.float64)
        expected = torch.autograd.grad(ref, wr, go)[0]
        xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
        before = direct_calls()
        out = cnnops.functional.conv2d(xo, wo, None, stride, 0)
        got = torch.autograd.grad(out, wo, go)[0]
        assert direct_calls() - before == 2
        assert torch.isfinite(expected).all() and torch.isfinite(ref).all()
        torch.testing.assert_close(out, ref.detach(), msg=f"{layout} k={k} s={stride}")
        torch.testing.assert_close(got, expected, msg=f"{layout} k={k} s={stride}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_thread_count(layout):
    """No result depends on the thread count (the grad-weight batch sums run in a fixed order)."""
    threads = torch.get_num_threads()
    try:
        # (the last two: several row tasks a sample, each with its own partial dW and dB)
        for cout, k, padding, n, size in [(64, 7, 3, 3, (40, 38)), (16, 3, 1, 5, (40, 38)), (37, 5, 2, 1, (40, 38)),
                                          (16, 3, 1, 1, (150, 140)), (64, 7, 3, 2, (133, 120))]:
            x, w, b = conv_tensors(2, n, 3, cout, size, k, 1, True, torch.float32, layout)
            kwargs = {"stride": 2, "padding": padding}
            results = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                xs, ws, bs = (v.detach().clone().requires_grad_() for v in (x, w, b))
                before = direct_calls()
                y = cnnops.functional.conv2d(xs, ws, bs, **kwargs)
                results.append((y.detach(),) + torch.autograd.grad(y, (xs, ws, bs), torch.ones_like(y)))
                assert direct_calls() - before == 3
            for other in results[1:]:
                for a, e in zip(other, results[0]):
                    assert torch.equal(a, e), f"cout={cout} k={k}: result depends on the thread count"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k,stride,padding", [(3, 2, 1), (7, 2, 3), (5, 4, 0), (3, 1, 2)], ids=str)
def test_gradcheck(k, stride, padding, layout):
    x, w, b = conv_tensors(2, 2, 3, 10, (11, 9), k, 1, True, torch.float64, layout)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]

    def f(x, w, b):
        return cnnops.functional.conv2d(x, w, b, stride, padding)

    before = direct_calls()
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert direct_calls() > before


def test_gradgradcheck():
    for layout in LAYOUTS:
        x, w, b = conv_tensors(2, 1, 3, 9, (7, 8), 3, 1, True, torch.float64, layout)
        inputs = [t.clone().requires_grad_() for t in (x, w, b)]
        assert torch.autograd.gradgradcheck(lambda x, w, b: cnnops.functional.conv2d(x, w, b, 2, 1), inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_reduced_precision(dtype):
    """bfloat16 and float16 run the float kernels (float accumulation, as torch)."""
    for layout in LAYOUTS:
        check(2, 3, 24, (15, 16), 3, 2, 1, dtype, layout)


ISA_CHECK = r"""
import itertools, sys, torch
sys.path.insert(0, "tests")
from conftest import check_conv_relu_against_torch
from cnnops import _C
print(torch.ops.cnnops.cpu_gemm_isa())
torch.manual_seed(0)
tol = {torch.float32: 2e-5, torch.float64: 1e-12}
# (C_in, C_out, (H, W), k, stride, padding, relu)
cases = [(3, 64, (29, 31), 7, 2, 3, False), (3, 16, (30, 27), 3, 2, 1, True), (3, 37, (9, 10), 5, 1, 2, False),
         (1, 3, (13, 6), 3, 4, 0, True), (4, 80, (12, 12), 3, 2, 1, False), (2, 24, (11, 40), 3, 2, 1, False),
         (4, 16, (9, 35), 3, 1, 1, True)]
before = _C._cpu_grouped_direct_calls() + _C._cpu_first_layer_calls()
first_before = _C._cpu_first_layer_calls()
for dtype, (ci, co, (h, w_), k, s, p, relu), cl in itertools.product(
        (torch.float32, torch.float64), cases, (False, True)):
    x = torch.randn(2, ci, h, w_, dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(co, ci, k, k, dtype=dtype)
    b = torch.randn(co, dtype=dtype)
    check_conv_relu_against_torch(x, w, b, s, p, 1, 1, relu, tol[dtype],
                                  f"{dtype} ci={ci} co={co} {h}x{w_} k={k} s={s} p={p} cl={cl}")
if _C._cpu_grouped_direct_calls() + _C._cpu_first_layer_calls() - before != 3 * 2 * 2 * len(cases):
    sys.exit("the direct kernels did not run")
if _C._cpu_first_layer_calls() - first_before != 2 * 2 * 2 * len(cases):  # forward and grad weight
    sys.exit("the first-layer kernels did not run")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_every_isa_matches_torch(isa):
    result = run_with_cpu_isa(isa, ISA_CHECK, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa  # the requested kernels really ran
