"""Depthwise convolution on the CPU (groups == C_in) against torch: forward, grad_input,
grad_weight and grad_bias.

3x3 and 5x5 at stride 1 and 2, and 7x7 at stride 1 (ConvNeXt), run the direct SIMD kernels of
csrc/cpu/conv_depthwise_direct.cpp, NCHW (vectorized along output rows) and channels_last
(vectorized over channels, when there are at least one vector's worth of channels; fewer are
converted to NCHW). Other geometries (dilation,
channel multiplier > 1, other kernel sizes, unequal strides) run the generic loops of
conv_depthwise.cpp. The grid covers both, with sizes around the kernels' edges: planes below the
kernel with padding, rows shorter than a vector, rows of one vector plus a few (the overlapping
last vector), row counts that are not a multiple of the 4-row blocks, channel counts that are
not a multiple of the vector (the overlapping last channel block), padding beyond the kernel.

Every ISA version (AVX-512, AVX2, portable) is checked in a subprocess with CNNOPS_CPU_ISA, as in
test_conv_isa.py. Expected values all come from torch.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close_to_torch,
    check_conv_against_torch,
    conv_tensors,
    dtype_id,
    make_tensor,
    run_with_cpu_isa,
)
from test_conv_activation import check_relu_conv

import cnnops
import cnnops.functional

DTYPES = [torch.float32, torch.float64]
KERNEL_STRIDE = [(3, 1), (3, 2), (5, 1), (5, 2), (7, 1)]
# (H, W): 1x1 and 2x3 (below the kernel, needs padding), 7x7, 13x17, 9x22 and 4x29 (3x3 stride-1
# rows of 20 to 31 outputs: one float32 AVX-512 vector and a part, direct; narrower 3x3 rows and
# other kernels' go through channels-last blocks), 20x37 (rows of more than two float32 AVX-512
# vectors and more than one NHWC column tile, at stride 1)
SIZES = [(1, 1), (2, 3), (7, 7), (13, 17), (9, 22), (4, 29), (20, 37)]
LAYOUTS = ["contiguous", "channels_last"]


def valid(size, k, p, dilation=1):
    return all(s + 2 * p >= dilation * (k - 1) + 1 for s in size)


def check(n, c, size, k, stride, padding, dtype, layout="contiguous", bias=True, multiplier=1, dilation=1,
          grad_layout=None, msg=""):
    x, w, b = conv_tensors(2, n, c, c * multiplier, size, k, c, bias, dtype, layout)
    kwargs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": c}
    if grad_layout is None:
        grad_layout = "channels_last" if layout == "channels_last" else "contiguous"
    return check_conv_against_torch(2, x, w, b, kwargs, dtype, grad_layout=grad_layout, msg=msg)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("k,stride", KERNEL_STRIDE, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_direct_kernels(dtype, k, stride, padding, size, layout):
    if not valid(size, k, padding):
        pytest.skip("input smaller than the kernel")
    # 24 channels: one and a half float32 AVX-512 vectors (three float64 ones)
    check(2, 24, size, k, stride, padding, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(7, 7), (14, 14), (9, 30), (3, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_convnext_7x7(dtype, size, layout):
    """ConvNeXt's depthwise 7x7 with padding 3: NCHW rows of half a vector or more, narrower ones
    through channels-last blocks; channels-last pixel groups of 8, then 4, then single pixels."""
    check(2, 40, size, 7, 1, 3, dtype, layout)


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
@pytest.mark.parametrize("k,stride", KERNEL_STRIDE, ids=lambda v: str(v))
def test_non_contiguous(k, stride, layout):
    """Strided views of input, weight and bias (and a strided grad_output)."""
    for dtype in DTYPES:
        check(2, 24, (11, 14), k, stride, 1, dtype, layout, grad_layout=layout)


@pytest.mark.parametrize("channels", [1, 3, 8, 16, 17, 33, 40])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k,stride", KERNEL_STRIDE, ids=lambda v: str(v))
def test_channel_counts(k, stride, layout, channels):
    """Channel blocks: fewer channels than a vector (converted to NCHW in channels_last), exact
    multiples and remainders (the last block overlapping the one before)."""
    for dtype in DTYPES:
        check(2, channels, (9, 11), k, stride, k // 2, dtype, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k,stride", KERNEL_STRIDE, ids=lambda v: str(v))
def test_batch_zero_and_one(k, stride, layout):
    for n in (0, 1):
        check(n, 16, (6, 9), k, stride, 1, torch.float32, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k,stride", KERNEL_STRIDE, ids=lambda v: str(v))
def test_no_bias(k, stride, layout):
    check(2, 16, (10, 12), k, stride, 1, torch.float32, layout, bias=False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_padding_beyond_kernel(k, stride, layout):
    """Padding past k - 1: grad input's transposed problem would need a negative padding (NCHW
    crops the zero-interleaved grid, NHWC gathers)."""
    for dtype in DTYPES:
        check(2, 16, (5, 6), k, stride, k, dtype, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("padding", [(0, 1), (2, 0), (1, 2)], ids=str)
@pytest.mark.parametrize("k,stride", KERNEL_STRIDE, ids=lambda v: str(v))
def test_unequal_padding(k, stride, padding, layout):
    check(2, 16, (8, 11), k, stride, padding, torch.float32, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "cfg",
    [
        {"k": 3, "stride": 1, "padding": 2, "dilation": 2},            # dilation: generic loops
        {"k": 5, "stride": 2, "padding": 4, "dilation": 2},
        {"k": 3, "stride": 1, "padding": 1, "multiplier": 2},          # multiplier 2: generic loops
        {"k": 5, "stride": 2, "padding": 2, "multiplier": 2},
        {"k": 3, "stride": (1, 2), "padding": 1},                   # unequal strides
        {"k": 7, "stride": 2, "padding": 3},                        # other kernel sizes and strides
        {"k": 4, "stride": 2, "padding": 1},
        {"k": 3, "stride": 3, "padding": 1},
    ],
    ids=lambda c: "_".join(f"{k}{v}" for k, v in c.items()),
)
def test_generic_paths(cfg, layout):
    cfg = dict(cfg)
    k, stride, padding = cfg.pop("k"), cfg.pop("stride"), cfg.pop("padding")
    for dtype in DTYPES:
        check(2, 16, (11, 13), k, stride, padding, dtype, layout, **cfg)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k,stride", KERNEL_STRIDE, ids=lambda v: str(v))
def test_contiguous_grad_output_with_channels_last_input(k, stride, layout):
    other = "contiguous" if layout == "channels_last" else "channels_last"
    check(2, 16, (9, 10), k, stride, 1, torch.float32, layout, grad_layout=other)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k,stride", KERNEL_STRIDE + [(3, 3)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fused_relu(dtype, k, stride, layout):
    """conv_forward(..., activation="relu"): the ReLU applied as the direct kernels write y."""
    x, w, b = conv_tensors(2, 2, 24, 24, (13, 17), k, 24, True, dtype, layout)
    check_relu_conv(2, x, w, b, {"stride": stride, "padding": k // 2, "groups": 24}, dtype)


def test_relu_passes_nan():
    """torch.relu(NaN) is NaN: the kernels' ReLU must not turn it into 0."""
    for layout, (k, stride) in itertools.product(["contiguous", "channels_last"], KERNEL_STRIDE):
        x = make_tensor((1, 16, 8, 8), torch.float32, layout)
        x[0, 3, 4, 4] = float("nan")
        w, b = make_tensor((16, 1, k, k), torch.float32), make_tensor((16,), torch.float32)
        ours = cnnops.functional._conv(x, w, b, stride, 1, 1, 16, 2, _activation="relu")
        expected = torch.relu(F.conv2d(x, w, b, stride, 1, 1, 16))
        assert torch.equal(ours.isnan(), expected.isnan()), (layout, k, stride)
        torch.testing.assert_close(ours, expected, equal_nan=True, atol=1e-4, rtol=1e-4)


def test_infinite_input_beyond_last_output():
    """x values that no output reads through a given tap (past the last strided output) must not
    reach that tap's weight gradient, even when they are inf (0 * inf would be NaN)."""
    for layout, (k, stride) in itertools.product(["contiguous", "channels_last"], [(3, 2), (5, 2)]):
        x = make_tensor((2, 16, 9, 20), torch.float64, layout)  # 20 wide: the last column is read by no output at p=0
        x[:, :, :, -1] = float("inf")
        w = make_tensor((16, 1, k, k), torch.float64)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.conv2d(xr, wr, None, stride, 0, 1, 16)
        go = make_tensor(ref.shape, torch.float64)
        expected = torch.autograd.grad(ref, wr, go)[0]
        xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
        got = torch.autograd.grad(cnnops.functional.conv2d(xo, wo, None, stride, 0, 1, 16), wo, go)[0]
        torch.testing.assert_close(got, expected, equal_nan=True, msg=f"{layout} k={k} s={stride}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_reduction_and_thread_count(layout):
    """MobileNet-sized layers: long grad_weight reductions stay within tolerance, and no result
    depends on the number of threads (fixed reduction order, no atomics)."""
    threads = torch.get_num_threads()
    try:
        for k, stride in KERNEL_STRIDE:
            x, w, b = conv_tensors(2, 8, 32, 32, (28, 30), k, 32, True, torch.float32, layout)
            kwargs = {"stride": stride, "padding": k // 2, "groups": 32}
            check_conv_against_torch(2, x, w, b, kwargs, torch.float32,
                                     grad_layout="channels_last" if layout == "channels_last" else "contiguous")
            results = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                xs, ws, bs = (v.detach().clone().requires_grad_() for v in (x, w, b))
                y = cnnops.functional.conv2d(xs, ws, bs, **kwargs)
                go = torch.ones_like(y)
                results.append((y.detach(),) + torch.autograd.grad(y, (xs, ws, bs), go))
            for other in results[1:]:
                for a, e in zip(other, results[0]):
                    assert torch.equal(a, e), f"k={k} s={stride}: result depends on the thread count"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k,stride", KERNEL_STRIDE, ids=lambda v: str(v))
def test_gradcheck(k, stride, layout):
    # 8 channels: a float64 AVX-512 vector, so channels_last runs the NHWC kernels
    x, w, b = conv_tensors(2, 1, 8, 8, (k + 1, k + 2), k, 8, True, torch.float64, layout)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]

    def f(x, w, b):
        return cnnops.functional.conv2d(x, w, b, stride, 1, 1, 8)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradgradcheck():
    x, w, b = conv_tensors(2, 1, 8, 8, (5, 6), 3, 8, True, torch.float64, "channels_last")
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradgradcheck(lambda x, w, b: cnnops.functional.conv2d(x, w, b, 2, 1, 1, 8), inputs)


def test_unbatched_and_bfloat16():
    """The 3-d (unbatched) input and reduced precision reach the same kernels."""
    for k, stride in KERNEL_STRIDE:
        x, w, b = conv_tensors(2, 1, 16, 16, (9, 10), k, 16, True, torch.float32, unbatched=True)
        check_conv_against_torch(2, x, w, b, {"stride": stride, "padding": 1, "groups": 16}, torch.float32)
        x, w, b = conv_tensors(2, 2, 16, 16, (9, 10), k, 16, True, torch.bfloat16, "channels_last")
        check_conv_against_torch(2, x, w, b, {"stride": stride, "padding": 1, "groups": 16}, torch.bfloat16,
                                 grad_layout="channels_last")


# --------------------------------------------------------------------------------------------
# every ISA version, in subprocesses (the choice is made once per process)
# --------------------------------------------------------------------------------------------

ISA_CHECK = r"""
import itertools, sys, torch
sys.path.insert(0, "tests")
from conftest import check_conv_relu_against_torch
print(torch.ops.cnnops.cpu_gemm_isa())
torch.manual_seed(0)
tol = {torch.float32: 2e-5, torch.float64: 1e-12}
# (padding, (H, W), channels, relu): tiny planes, rows shorter than a vector, overlapping last
# vectors and channel blocks, padding past the kernel, channels_last converted below one vector
cases = [(0, (13, 17), 24, False), (1, (9, 37), 16, True), (2, (1, 2), 8, False), (5, (7, 7), 3, True),
         (1, (6, 20), 40, False)]
for dtype, (k, s), (p, (h, w_), c, relu), cl in itertools.product(
        (torch.float32, torch.float64), ((3, 1), (3, 2), (5, 1), (5, 2), (7, 1)), cases, (False, True)):
    if min(h, w_) + 2 * p < k:
        continue  # smaller than the kernel
    x = torch.randn(2, c, h, w_, dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(c, 1, k, k, dtype=dtype)
    b = torch.randn(c, dtype=dtype)
    check_conv_relu_against_torch(x, w, b, s, p, 1, c, relu, tol[dtype],
                                  f"{dtype} k={k} s={s} p={p} {h}x{w_} c={c} cl={cl} relu={relu}")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_every_isa_matches_torch(isa):
    result = run_with_cpu_isa(isa, ISA_CHECK, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa  # the requested kernels really ran


def test_matches_torch_on_a_mobilenet_block():
    """A MobileNetV2-style block (1x1 expand, 3x3 depthwise stride 2, 1x1 project) in float64,
    forward and every parameter gradient, channels_last."""
    torch.manual_seed(0)
    x = make_tensor((2, 8, 15, 15), torch.float64, "channels_last")
    params = [make_tensor(s, torch.float64).requires_grad_() for s in
              [(48, 8, 1, 1), (48,), (48, 1, 3, 3), (48,), (16, 48, 1, 1), (16,)]]

    def block(conv, x):
        h = torch.relu(conv(x, params[0], params[1]))
        h = torch.relu(conv(h, params[2], params[3], 2, 1, 1, 48))
        return conv(h, params[4], params[5])

    xs = x.clone().requires_grad_()
    ref = block(F.conv2d, xs)
    go = make_tensor(ref.shape, torch.float64)
    ref_grads = torch.autograd.grad(ref, [xs] + params, go)
    ours = block(cnnops.functional.conv2d, xs)
    got = torch.autograd.grad(ours, [xs] + params, go)
    assert_close_to_torch(ours, ref, torch.float64, 48 * 9)
    for a, e in zip(got, ref_grads):
        assert_close_to_torch(a, e, torch.float64, 2 * 15 * 15 * 48)
