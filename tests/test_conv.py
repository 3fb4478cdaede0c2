"""Differential tests: cnnops.functional.conv{1,2,3}d against torch.nn.functional on the CPU.

Forward and all three gradients (torch.autograd.grad with a random grad_output) on a parameter
grid and on seeded random configurations, plus gradcheck, opcheck, torch.compile, determinism
and a check that no borrowed (aten/oneDNN/BLAS) convolution or matmul kernels run.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

import cnnops
import cnnops.functional
from conftest import (
    CHANNELS_LAST,
    CPU_DTYPES,
    assert_close_to_torch,
    assert_compiled_matches_eager,
    assert_same_bits_across_threads,
    check_conv_against_torch,
    conv_fn,
    conv_tensors,
    dtype_id,
    make_tensor,
    run_conv,
    run_with_cpu_isa,
)

DIMS = [1, 2, 3]


def per_dim(value, dims):
    """A per-dimension tuple written for 3 dims, cut to ``dims`` (ints and strings pass)."""
    if isinstance(value, tuple):
        return value[:dims]
    return value


# name -> config; tuples are written for 3 dims and cut to the first ``dims`` entries.
GRID = {
    "basic": dict(),
    "stride2_pad1": dict(stride=2, padding=1),
    "stride3_k2": dict(stride=3, kernel=2, spatial=(11, 10, 8)),
    "stride_gt_kernel_dil": dict(stride=(3, 2, 2), kernel=2, dilation=2, spatial=(12, 9, 7)),
    "stride_tuple": dict(stride=(2, 1, 3), spatial=(9, 8, 7)),
    "pad_tuple": dict(padding=(2, 0, 1)),
    "pad_gt_kernel_half": dict(padding=3, kernel=3),
    "dilation2_pad2": dict(dilation=2, padding=2),
    "dilation_tuple": dict(dilation=(1, 2, 3), spatial=(9, 9, 8)),
    "same_odd": dict(padding="same", kernel=3),
    "same_even": dict(padding="same", kernel=4),
    "same_even_dil": dict(padding="same", kernel=2, dilation=3),
    "same_mixed": dict(padding="same", kernel=(2, 3, 4), dilation=(2, 1, 2), spatial=(8, 7, 9)),
    "same_k1": dict(padding="same", kernel=1),
    "valid": dict(padding="valid", kernel=3),
    "groups2": dict(groups=2, cin=4, cout=6),
    "groups3_nobias": dict(groups=3, cin=6, cout=3, bias=False),
    "depthwise": dict(groups=4, cin=4, cout=4, padding=1),
    "depthwise_x2": dict(groups=4, cin=4, cout=8, padding=1),
    "depthwise_x3_stride": dict(groups=3, cin=3, cout=9, stride=2, padding=1),
    "depthwise_same_even": dict(groups=5, cin=5, cout=10, padding="same", kernel=4),
    "nobias": dict(bias=False),
    "odd_sizes": dict(spatial=(13, 7, 5), kernel=(3, 3, 2), cin=5, cout=7),
    "kernel_eq_input": dict(spatial=4, kernel=4),
    "pointwise": dict(kernel=1, cin=5, cout=3),
    "pointwise_stride": dict(kernel=1, cin=5, cout=3, stride=2),
    "cin1_cout1": dict(cin=1, cout=1),
    "batch0": dict(n=0),
    "batch1": dict(n=1),
    "unbatched": dict(unbatched=True),
    "unbatched_same_even": dict(unbatched=True, padding="same", kernel=4, groups=2, cin=2, cout=4),
}


def grid_args(dims, name):
    cfg = dict(n=2, cin=3, cout=4, spatial=(7, 6, 5), kernel=3, stride=1, padding=0, dilation=1,
               groups=1, bias=True, unbatched=False)
    cfg.update(GRID[name])
    if dims == 3 and "spatial" not in GRID[name]:
        cfg["spatial"] = (5, 6, 4)
    if dims == 3 and name == "kernel_eq_input":
        cfg["spatial"] = 3
        cfg["kernel"] = 3
    spatial = per_dim(cfg["spatial"], dims)
    kernel = per_dim(cfg["kernel"], dims)
    kwargs = dict(stride=per_dim(cfg["stride"], dims), padding=per_dim(cfg["padding"], dims),
                  dilation=per_dim(cfg["dilation"], dims), groups=cfg["groups"])
    return cfg, spatial, kernel, kwargs


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(GRID))
@pytest.mark.parametrize("dims", DIMS)
def test_grid(dims, name, dtype):
    cfg, spatial, kernel, kwargs = grid_args(dims, name)
    x, w, b = conv_tensors(dims, cfg["n"], cfg["cin"], cfg["cout"], spatial, kernel, cfg["groups"],
                           cfg["bias"], dtype, unbatched=cfg["unbatched"])
    out, _ = check_conv_against_torch(dims, x, w, b, kwargs, dtype, msg=name)
    if cfg["n"] == 0:
        assert out.shape[0] == 0


# --------------------------------------------------------------------------------------------
# seeded random configurations
# --------------------------------------------------------------------------------------------


def random_config(i):
    rng = random.Random(10_000 + i)
    dims = rng.choice(DIMS)
    kind = rng.choice(["plain", "plain", "groups", "depthwise"])
    if kind == "plain":
        groups, cin, cout = 1, rng.randint(1, 6), rng.randint(1, 7)
    elif kind == "groups":
        groups = rng.randint(2, 3)
        cin, cout = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    else:
        groups = rng.randint(2, 6)
        cin, cout = groups, groups * rng.randint(1, 3)
    max_k = 4 if dims < 3 else 3
    kernel = tuple(rng.randint(1, max_k) for _ in range(dims))
    dilation = tuple(rng.choice([1, 1, 2, 3]) for _ in range(dims))
    pad_kind = rng.choice(["int", "tuple", "same", "valid"])
    if pad_kind == "same":
        stride = 1
    else:
        stride = tuple(rng.choice([1, 1, 2, 3]) for _ in range(dims))
        if rng.random() < 0.4 and len(set(stride)) == 1:
            stride = stride[0]
    if pad_kind == "int":
        padding = rng.randint(0, 3)
    elif pad_kind == "tuple":
        padding = tuple(rng.randint(0, 3) for _ in range(dims))
    else:
        padding = pad_kind
    if rng.random() < 0.3 and len(set(dilation)) == 1:
        dilation = dilation[0]
    pads = (padding,) * dims if isinstance(padding, int) else (
        padding if isinstance(padding, tuple) else (0,) * dims)
    dil = dilation if isinstance(dilation, tuple) else (dilation,) * dims
    extra = 9 if dims < 3 else 4
    spatial = tuple(max(dil[d] * (kernel[d] - 1) + 1 - 2 * pads[d], 1) + rng.randint(0, extra)
                    for d in range(dims))
    n = rng.choice([0, 1, 2, 2, 3, 3])
    unbatched = rng.random() < 0.1
    layouts = ["contiguous", "contiguous", "transposed", "sliced"]
    if dims > 1 and not unbatched:
        layouts += ["channels_last", "channels_last"]
    layout = rng.choice(layouts)
    dtype = rng.choice([torch.float32, torch.float32, torch.float64] + [
        d for d in CPU_DTYPES if d in (torch.bfloat16, torch.float16)])
    bias = rng.random() < 0.7
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return dims, n, cin, cout, spatial, kernel, bias, unbatched, layout, dtype, kwargs


N_RANDOM = 60


@pytest.mark.parametrize("i", range(N_RANDOM))
def test_random(i):
    dims, n, cin, cout, spatial, kernel, bias, unbatched, layout, dtype, kwargs = random_config(i)
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, kwargs["groups"], bias, dtype,
                           layout=layout, unbatched=unbatched)
    check_conv_against_torch(dims, x, w, b, kwargs, dtype, msg=f"random#{i} layout={layout}")


# --------------------------------------------------------------------------------------------
# layouts: channels_last, non-contiguous inputs and grad_outputs
# --------------------------------------------------------------------------------------------

LAYOUT_CONFIGS = {
    "pad1": dict(groups=1, cin=4, cout=6, kwargs=dict(padding=1)),
    "groups2_stride2": dict(groups=2, cin=4, cout=6, kwargs=dict(stride=2, padding=1, groups=2)),
    "depthwise_x2": dict(groups=4, cin=4, cout=8, kwargs=dict(padding=1, groups=4)),
    "same_even_dil": dict(groups=1, cin=3, cout=5, kernel=2, kwargs=dict(padding="same", dilation=2)),
    "pointwise": dict(groups=1, cin=6, cout=5, kernel=1, kwargs=dict()),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cfg", list(LAYOUT_CONFIGS))
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last(dims, cfg, dtype):
    c = LAYOUT_CONFIGS[cfg]
    spatial = (7, 5) if dims == 2 else (5, 4, 6)
    x, w, b = conv_tensors(dims, 2, c["cin"], c["cout"], spatial, c.get("kernel", 3), c["groups"], True,
                           dtype, layout="channels_last")
    assert not x.is_contiguous() and x.is_contiguous(memory_format=CHANNELS_LAST[dims + 2])
    # Design rule (DESIGN.md "Memory format"): channels_last in -> channels_last out, for the
    # output and grad_input (torch itself does this on its oneDNN paths).
    check_conv_against_torch(dims, x, w, b, c["kwargs"], dtype, check_channels_last=True, msg=cfg)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_weight_only(dims):
    """Contiguous input with a channels_last weight: values must still match."""
    spatial = (7, 5) if dims == 2 else (5, 4, 6)
    x, w, b = conv_tensors(dims, 2, 4, 6, spatial, 3, 1, True, torch.float32)
    w = w.contiguous(memory_format=CHANNELS_LAST[dims + 2])
    check_conv_against_torch(dims, x, w, b, dict(padding=1), torch.float32, check_channels_last=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("cfg", list(LAYOUT_CONFIGS))
@pytest.mark.parametrize("dims", DIMS)
def test_non_contiguous(dims, cfg, layout, dtype):
    c = LAYOUT_CONFIGS[cfg]
    spatial = {1: (11,), 2: (7, 5), 3: (5, 4, 6)}[dims]
    x, w, b = conv_tensors(dims, 2, c["cin"], c["cout"], spatial, c.get("kernel", 3), c["groups"], True,
                           dtype, layout=layout)
    assert not x.is_contiguous() and not w.is_contiguous()
    check_conv_against_torch(dims, x, w, b, c["kwargs"], dtype, grad_layout=layout, msg=f"{cfg}/{layout}")


@pytest.mark.parametrize("grad_layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("dims", [2, 3])
def test_grad_output_layouts(dims, grad_layout):
    spatial = (7, 6) if dims == 2 else (5, 4, 6)
    x, w, b = conv_tensors(dims, 2, 4, 6, spatial, 3, 2, True, torch.float64)
    check_conv_against_torch(dims, x, w, b, dict(padding=1, stride=(2,) + (1,) * (dims - 1), groups=2),
                             torch.float64, grad_layout=grad_layout)


@pytest.mark.parametrize("dims", DIMS)
def test_expanded_grad_output_from_sum(dims):
    """y.sum().backward() feeds an expanded (stride-0) grad_output into backward."""
    spatial = {1: (9,), 2: (6, 7), 3: (4, 5, 3)}[dims]
    x, w, b = conv_tensors(dims, 2, 4, 6, spatial, 3, 2, True, torch.float64)
    grads = {}
    for name, mod in (("torch", F), ("cnnops", cnnops.functional)):
        xl, wl, bl = (t.detach().clone().requires_grad_() for t in (x, w, b))
        conv_fn(mod, dims)(xl, wl, bl, padding=1, groups=2).sum().backward()
        grads[name] = (xl.grad, wl.grad, bl.grad)
    for what, a, e in zip(("input", "weight", "bias"), grads["cnnops"], grads["torch"]):
        assert_close_to_torch(a, e, torch.float64, 100, msg=f"grad_{what}")


@pytest.mark.parametrize("grads", [("input",), ("weight",), ("bias",), ("weight", "bias"), ("input", "bias"),
                                   ("input", "weight")])
@pytest.mark.parametrize("dims", DIMS)
def test_partial_gradients(dims, grads):
    """Only some leaves require grad (exercises backward's output_mask)."""
    spatial = {1: (9,), 2: (6, 7), 3: (4, 5, 3)}[dims]
    x, w, b = conv_tensors(dims, 2, 4, 6, spatial, 3, 2, True, torch.float64)
    check_conv_against_torch(dims, x, w, b, dict(padding=1, groups=2), torch.float64, grads=grads)


def test_no_grad_and_inference_mode():
    x, w, b = conv_tensors(2, 2, 3, 4, (6, 6), 3, 1, True, torch.float32)
    expected = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    with torch.no_grad():
        y = cnnops.functional.conv2d(xr, wr, br, padding=1)
    assert not y.requires_grad
    assert_close_to_torch(y, expected, torch.float32, 27)
    with torch.inference_mode():
        y = cnnops.functional.conv2d(x, w, b, padding=1)
    assert_close_to_torch(y, expected, torch.float32, 27)


def test_keyword_arguments():
    x, w, b = conv_tensors(2, 2, 4, 6, (7, 8), 3, 2, True, torch.float64)
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    expected = F.conv2d(input=x, weight=w, bias=b, **kw)
    actual = cnnops.functional.conv2d(input=x, weight=w, bias=b, **kw)
    assert_close_to_torch(actual, expected, torch.float64, 18)


@pytest.mark.parametrize("dims", DIMS)
def test_single_element_tuples_broadcast(dims):
    """torch accepts a 1-tuple for stride/padding/dilation of any conv and broadcasts it."""
    spatial = {1: (13,), 2: (9, 8), 3: (6, 7, 5)}[dims]
    x, w, b = conv_tensors(dims, 2, 3, 4, spatial, 2, 1, True, torch.float64)
    kw = dict(stride=(2,), padding=(1,), dilation=(2,))
    expected = conv_fn(F, dims)(x, w, b, **kw)
    actual = conv_fn(cnnops.functional, dims)(x, w, b, **kw)
    assert_close_to_torch(actual, expected, torch.float64, 3 * 2 ** dims)


# --------------------------------------------------------------------------------------------
# larger shapes (cache blocking, tails of vector/block sizes)
# --------------------------------------------------------------------------------------------

LARGE = {
    # name: (dims, N, Cin, Cout, spatial, kernel, groups, kwargs)
    "resnet3x3_64to96": (2, 2, 64, 96, (28, 28), 3, 1, dict(padding=1)),
    "pointwise_64to256": (2, 2, 64, 256, (28, 28), 1, 1, dict()),
    "odd_K171_Cout37_29x23": (2, 2, 19, 37, (29, 23), 3, 1, dict(padding=1)),
    "stride2_K_odd_31x17": (2, 3, 21, 45, (31, 17), 3, 1, dict(stride=2, padding=1)),
    "5x5_dil2_Cout13": (2, 2, 10, 13, (33, 19), 5, 1, dict(padding=4, dilation=2)),
    "depthwise_96_x1_19x21": (2, 2, 96, 96, (19, 21), 3, 96, dict(padding=1)),
    "depthwise_32_x3_stride2": (2, 2, 32, 96, (23, 17), 5, 32, dict(stride=2, padding=2)),
    "groups4_48to40": (2, 2, 48, 40, (15, 18), 3, 4, dict(padding=1)),
    "conv1d_long": (1, 3, 33, 70, (517,), 7, 1, dict(padding=3)),
    "conv3d_16to24": (3, 2, 16, 24, (9, 10, 11), 3, 1, dict(padding=1)),
    "conv3d_same_even": (3, 1, 7, 9, (8, 13, 6), 4, 1, dict(padding="same")),
}


LARGE_OTHER_DTYPES = ("resnet3x3_64to96", "odd_K171_Cout37_29x23", "depthwise_32_x3_stride2", "conv3d_16to24")
LARGE_CASES = [pytest.param(name, torch.float32, id=f"{name}-float32") for name in LARGE] + [
    pytest.param(name, dtype, id=f"{name}-{dtype_id(dtype)}")
    for name in LARGE_OTHER_DTYPES for dtype in (torch.float64, torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", LARGE_CASES)
def test_large(name, dtype):
    dims, n, cin, cout, spatial, kernel, groups, kwargs = LARGE[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, True, dtype)
    check_conv_against_torch(dims, x, w, b, dict(kwargs, groups=groups), dtype, msg=name)


@pytest.mark.parametrize("name", ["resnet3x3_64to96", "odd_K171_Cout37_29x23", "depthwise_32_x3_stride2"])
def test_large_channels_last(name):
    dims, n, cin, cout, spatial, kernel, groups, kwargs = LARGE[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, True, torch.float32,
                           layout="channels_last")
    check_conv_against_torch(dims, x, w, b, dict(kwargs, groups=groups), torch.float32,
                             check_channels_last=True, msg=name)


# --------------------------------------------------------------------------------------------
# gradcheck (float64, tiny shapes)
# --------------------------------------------------------------------------------------------

GRADCHECK = {
    "stride2_pad1_bias": dict(n=2, cin=2, cout=3, kernel=3, groups=1, bias=True, kw=dict(stride=2, padding=1)),
    "dil2_same_even": dict(n=1, cin=2, cout=2, kernel=2, groups=1, bias=True, kw=dict(padding="same", dilation=2)),
    "groups2_nobias": dict(n=2, cin=4, cout=2, kernel=2, groups=2, bias=False, kw=dict(padding=(1, 0, 1))),
    "depthwise_x2": dict(n=1, cin=2, cout=4, kernel=3, groups=2, bias=True, kw=dict(padding=1, dilation=(1, 2, 1))),
    "stride_tuple_valid": dict(n=1, cin=3, cout=2, kernel=2, groups=1, bias=True,
                               kw=dict(stride=(2, 1, 3), padding="valid")),
}


@pytest.mark.parametrize("cfg", list(GRADCHECK))
@pytest.mark.parametrize("dims", DIMS)
def test_gradcheck_functional(dims, cfg):
    c = GRADCHECK[cfg]
    spatial = {1: (7,), 2: (5, 6), 3: (4, 5, 4)}[dims]
    x, w, b = conv_tensors(dims, c["n"], c["cin"], c["cout"], spatial, c["kernel"], c["groups"], c["bias"],
                           torch.float64)
    kw = {k: per_dim(v, dims) for k, v in c["kw"].items()}
    kw["groups"] = c["groups"]
    inputs = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]

    def f(*args):
        bias = args[2] if len(args) > 2 else None
        return conv_fn(cnnops.functional, dims)(args[0], args[1], bias, **kw)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dims", DIMS)
def test_gradcheck_conv_op(dims):
    """The raw op torch.ops.cnnops.conv_forward is differentiable itself (its Autograd kernel)."""
    spatial = {1: (8,), 2: (5, 6), 3: (4, 5, 4)}[dims]
    x, w, b = conv_tensors(dims, 2, 4, 6, spatial, 2, 2, True, torch.float64)
    stride, padding, dilation = (2, 1, 1)[:dims], (1, 0, 1)[:dims], (1, 2, 1)[:dims]
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]

    def f(xx, ww, bb):
        return torch.ops.cnnops.conv_forward(xx, ww, bb, stride, padding, dilation, 2)

    expected = conv_fn(F, dims)(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=2)
    assert_close_to_torch(f(*inputs).detach(), expected, torch.float64, 8)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    # bias None through the op
    out = torch.ops.cnnops.conv_forward(x, w, None, stride, padding, dilation, 2)
    expected = conv_fn(F, dims)(x, w, None, stride=stride, padding=padding, dilation=dilation, groups=2)
    assert_close_to_torch(out, expected, torch.float64, 8)


# --------------------------------------------------------------------------------------------
# raw ops: values and opcheck
# --------------------------------------------------------------------------------------------

RAW = {
    # name: (dims, N, Cin, Cout, spatial, kernel, groups, bias, stride, padding, dilation, layout)
    "2d_bias": (2, 2, 3, 4, (6, 5), 3, 1, True, [1, 1], [1, 1], [1, 1], "contiguous"),
    "2d_nobias_stride_dil": (2, 2, 4, 6, (9, 8), 3, 2, False, [2, 1], [0, 2], [1, 2], "contiguous"),
    "1d_bias": (1, 2, 3, 5, (10,), 4, 1, True, [2], [1], [1], "contiguous"),
    "3d_depthwise": (3, 1, 3, 6, (4, 5, 4), 3, 3, True, [1, 2, 1], [1, 1, 0], [1, 1, 1], "contiguous"),
    "2d_channels_last": (2, 2, 4, 6, (7, 5), 3, 1, True, [1, 1], [1, 1], [1, 1], "channels_last"),
    "2d_batch0": (2, 0, 3, 4, (6, 5), 3, 1, True, [1, 1], [1, 1], [1, 1], "contiguous"),
    # channels-last weights (OHWI): read in (tap, channel) order, grad_weight in their layout
    "2d_channels_last_weight": (2, 2, 4, 6, (7, 5), 3, 1, True, [2, 1], [1, 1], [1, 1], "contiguous"),
    "2d_channels_last_both_strided": (2, 2, 4, 6, (9, 8), 3, 1, True, [2, 2], [1, 1], [1, 1], "channels_last"),
    "3d_channels_last_both": (3, 1, 4, 6, (4, 5, 4), 3, 2, True, [1, 1, 1], [1, 1, 1], [1, 1, 1], "channels_last"),
    "2d_pointwise_channels_last_both": (2, 2, 4, 6, (5, 5), 1, 1, True, [1, 1], [0, 0], [1, 1], "channels_last"),
}
CHANNELS_LAST_WEIGHT = {"2d_channels_last_weight", "2d_channels_last_both_strided", "3d_channels_last_both",
                        "2d_pointwise_channels_last_both"}


def raw_args(name, dtype=torch.float64):
    dims, n, cin, cout, spatial, kernel, groups, bias, stride, padding, dilation, layout = RAW[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, bias, dtype, layout=layout,
                           weight_layout="channels_last" if name in CHANNELS_LAST_WEIGHT else None)
    return x, w, b, stride, padding, dilation, groups


@pytest.mark.parametrize("name", list(RAW))
def test_raw_ops_match_torch(name):
    x, w, b, stride, padding, dilation, groups = raw_args(name)
    dims = w.dim() - 2
    out = torch.ops.cnnops.conv_forward(x, w, b, stride, padding, dilation, groups)
    expected = conv_fn(F, dims)(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert_close_to_torch(out, expected, torch.float64, 100)
    go = torch.randn(expected.shape, dtype=torch.float64)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    bl = None if b is None else b.clone().requires_grad_()
    y = conv_fn(F, dims)(xl, wl, bl, stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = torch.autograd.grad(y, [xl, wl] + ([bl] if bl is not None else []), go)
    gi, gw, gb = torch.ops.cnnops.conv_backward(go, x, w, stride, padding, dilation, groups, [True, True, True])
    assert_close_to_torch(gi, ref[0], torch.float64, 100, msg="grad_input")
    assert_close_to_torch(gw, ref[1], torch.float64, 100, msg="grad_weight")
    if w.dim() in CHANNELS_LAST:  # the output's layout (channels-last when x or w is), whichever kernel wrote dW
        cl = CHANNELS_LAST[w.dim()]
        assert gw.is_contiguous(memory_format=cl if cl in (suggest_memory_format(x), suggest_memory_format(w))
                                else torch.contiguous_format)
    expected_gb = go.sum(dim=[d for d in range(go.dim()) if d != 1])
    assert_close_to_torch(gb, expected_gb, torch.float64, 100, msg="grad_bias")
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, False, False]):
        outs = torch.ops.cnnops.conv_backward(go, x, w, stride, padding, dilation, groups, mask)
        for on, got, full in zip(mask, outs, (gi, gw, gb)):
            if on:
                torch.testing.assert_close(got, full, atol=1e-12, rtol=1e-12)
            else:
                assert got.numel() == 0, f"masked-out gradient should be empty, got {tuple(got.shape)}"


@pytest.mark.parametrize("name", list(RAW))
def test_opcheck_conv_forward(name):
    x, w, b, stride, padding, dilation, groups = raw_args(name, torch.float32)
    torch.library.opcheck(torch.ops.cnnops.conv_forward.default, (x, w, b, stride, padding, dilation, groups))


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True],
                                  [False, False, True], [True, True, False]], ids=str)
@pytest.mark.parametrize("name", ["2d_bias", "1d_bias", "3d_depthwise", "2d_channels_last", "2d_batch0",
                                  "2d_channels_last_weight", "2d_channels_last_both_strided"])
def test_opcheck_conv_backward(name, mask):
    x, w, b, stride, padding, dilation, groups = raw_args(name, torch.float32)
    out = torch.ops.cnnops.conv_forward(x, w, b, stride, padding, dilation, groups)
    go = torch.randn_like(out)
    torch.library.opcheck(torch.ops.cnnops.conv_backward.default,
                          (go, x, w, stride, padding, dilation, groups, mask))


@pytest.mark.parametrize("name", ["2d_bias", "3d_depthwise", "2d_channels_last", *sorted(CHANNELS_LAST_WEIGHT)])
def test_fake_matches_real_metadata(name):
    """The fake (meta) kernels give the real kernels' shape, dtype and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b, stride, padding, dilation, groups = raw_args(name, torch.float32)
    out = torch.ops.cnnops.conv_forward(x, w, b, stride, padding, dilation, groups)
    go = torch.randn_like(out)
    real_bwd = torch.ops.cnnops.conv_backward(go, x, w, stride, padding, dilation, groups, [True, True, True])
    with FakeTensorMode() as mode:
        fx, fw, fgo = (mode.from_tensor(t) for t in (x, w, go))
        fb = None if b is None else mode.from_tensor(b)
        fout = torch.ops.cnnops.conv_forward(fx, fw, fb, stride, padding, dilation, groups)
        fbwd = torch.ops.cnnops.conv_backward(fgo, fx, fw, stride, padding, dilation, groups, [True, True, True])
    for real, fake in zip((out,) + tuple(real_bwd), (fout,) + tuple(fbwd)):
        assert fake.shape == real.shape and fake.dtype == real.dtype
        assert fake.stride() == real.stride(), (fake.stride(), real.stride())


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    x, w, b = conv_tensors(2, 2, 3, 4, (8, 7), 3, 1, True, torch.float32)
    w2 = make_tensor((5, 4, 2, 2), torch.float32)

    def f(x, w, b, w2):
        y = torch.relu(cnnops.functional.conv2d(x, w, b, stride=1, padding=1))
        return cnnops.functional.conv2d(y, w2, None, padding="same", dilation=2)

    compiled_out = assert_compiled_matches_eager(f, (x, w, b, w2), backend)
    # and the eager cnnops result is right (vs torch)
    ref = F.conv2d(torch.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1)), w2.double(), None,
                   padding="same", dilation=2)
    assert_close_to_torch(compiled_out, ref, torch.float32, 27 * 16)


@pytest.mark.slow
def test_compile_inductor():
    x, w, b = conv_tensors(2, 2, 3, 4, (8, 7), 3, 1, True, torch.float32)

    def f(x, w, b):
        return torch.relu(cnnops.functional.conv2d(x, w, b, padding=1)) * 2.0

    assert_compiled_matches_eager(f, (x, w, b), "inductor")


# --------------------------------------------------------------------------------------------
# determinism, provenance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_deterministic(dtype, layout):
    x, w, b = conv_tensors(2, 3, 32, 48, (21, 19), 3, 2, True, dtype, layout=layout)
    go = make_tensor((3, 48, 11, 10), dtype)
    runs = []
    for _ in range(2):
        out, grads = run_conv(cnnops.functional.conv2d, x, w, b, go, dict(stride=2, padding=1, groups=2))
        runs.append((out, grads))
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2), "forward not bitwise reproducible"
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"grad_{k} not bitwise reproducible"


# The demo's layers (8x8 and 4x4 images, batch 64 so GEMM blocks span samples) and widths that
# make other im2col row lengths (16, and 7 which packs value by value): the small-image
# packing and in-place output paths of the CPU kernels.
SMALL_IMAGES = {
    "demo_conv1_1to16_8x8": (64, 1, 16, (8, 8), dict(padding=1)),
    "demo_conv2_16to32_8x8": (64, 16, 32, (8, 8), dict(padding=1)),
    "demo_conv3_32to64_4x4": (64, 32, 64, (4, 4), dict(padding=1)),
    "16x16_dilation3_8to32": (9, 8, 32, (16, 16), dict(padding=3, dilation=3)),
    "7x7_8to16": (11, 8, 16, (7, 7), dict(padding=1)),
    "8x8_groups2": (13, 8, 16, (8, 8), dict(padding=1, groups=2)),
}


@pytest.mark.parametrize("name", SMALL_IMAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_small_images(name, dtype):
    n, cin, cout, spatial, kwargs = SMALL_IMAGES[name]
    x, w, b = conv_tensors(2, n, cin, cout, spatial, 3, kwargs.get("groups", 1), True, dtype)
    check_conv_against_torch(2, x, w, b, kwargs, dtype, msg=name)


@pytest.mark.parametrize("name", ["demo_conv2_16to32_8x8", "demo_conv3_32to64_4x4"])
def test_small_images_thread_count_independent(name):
    """Forward and gradients are bitwise the same with 1 and 2 threads."""
    n, cin, cout, spatial, kwargs = SMALL_IMAGES[name]
    x, w, b = conv_tensors(2, n, cin, cout, spatial, 3, 1, True, torch.float32)
    go = make_tensor((n, cout) + spatial, torch.float32)
    assert_same_bits_across_threads(cnnops.functional.conv2d, x, w, b, go, kwargs)


@pytest.mark.parametrize("kernel,stride,cout", [(1, 1, 160), (1, 1, 48), (3, 2, 40)], ids=str)
def test_column_blocks_thread_count_independent(kernel, stride, cout):
    """The GEMM forward balances its column blocks by the thread count (conv.cpp ColumnBlocks) and
    the row-split tasks give threads whole row blocks: no sum may change. 8 x 14 x 14 positions
    (stride 1) give several column blocks; 1, 2 and 3 threads must give the same bits."""
    x, w, b = conv_tensors(2, 8, 24, cout, (14 * stride, 14 * stride), kernel, 1, True, torch.float32)
    go = make_tensor((8, cout, 14, 14), torch.float32)
    kwargs = {"stride": stride, "padding": kernel // 2}
    assert_same_bits_across_threads(cnnops.functional.conv2d, x, w, b, go, kwargs, threads=(1, 2, 3))
    check_conv_against_torch(2, x, w, b, kwargs, torch.float32)


# The weight gradient as im2col(X) * dY^T (conv.cpp conv_backward_weight_rows): stride 1, several
# taps, input channels a group a multiple of 8, and output channels a group filling more than half
# of one B panel: 17-32 in float32, 9-16 in float64 (the cout below is float32's; float64 takes
# half). dims, n, cin, cout, spatial, kernel, groups, bias, kwargs.
WEIGHT_ROWS = {
    "conv3d_32": (3, 2, 16, 32, (4, 6, 7), 3, 1, True, dict(padding=1)),
    "conv1d_k9": (1, 3, 8, 24, 50, 9, 1, True, dict(padding=4)),
    "conv1d_partials": (1, 2, 8, 18, 4100, 3, 1, False, dict(padding=1)),  # 8200 positions: 4 partial sums
    "conv2d_dilation2": (2, 2, 16, 18, (9, 11), 3, 1, True, dict(padding=2, dilation=2)),
    "conv3d_groups2": (3, 2, 32, 48, (4, 5, 6), 3, 2, True, dict(padding=1, groups=2)),
    "conv2d_no_padding_rect": (2, 3, 8, 20, (6, 7), (2, 3), 1, False, {}),
    "conv3d_batch1_k2": (3, 1, 8, 32, (3, 5, 6), 2, 1, True, {}),
    "conv2d_k_past_slices": (2, 2, 48, 24, (5, 6), 3, 1, True, dict(padding=1)),  # K = 432: 4 row slices
    "batch0": (2, 0, 8, 24, (5, 5), 3, 1, True, dict(padding=1)),
}


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", WEIGHT_ROWS)
def test_weight_gradient_rows(name, dtype, weight_layout):
    """Forward and every gradient; the weight gradient must come from the transposed product (its
    counter: once per backward with work), also for a channels-last weight (dW in its layout)."""
    dims, n, cin, cout, spatial, kernel, groups, bias, kwargs = WEIGHT_ROWS[name]
    if weight_layout == "channels_last" and dims == 1:
        pytest.skip("a 1-d weight has no channels-last layout")
    if dtype == torch.float64:
        cout //= 2
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, bias, dtype, weight_layout=weight_layout)
    before = cnnops._C._cpu_conv_weight_rows_calls()
    check_conv_against_torch(dims, x, w, b, kwargs, dtype, msg=name)
    assert cnnops._C._cpu_conv_weight_rows_calls() - before == (1 if n > 0 else 0)


@pytest.mark.parametrize("cout,stride,kernel", [(16, 1, 3), (40, 1, 3), (24, 2, 3), (24, 1, 1)], ids=str)
def test_weight_gradient_rows_not_taken(cout, stride, kernel):
    """Half a panel or two panels of output channels, stride 2 and 1x1 layers keep the untransposed
    product (float32); the results match torch either way."""
    x, w, b = conv_tensors(3, 2, 16, cout, (5, 6, 7), kernel, 1, True, torch.float32)
    before = cnnops._C._cpu_conv_weight_rows_calls()
    check_conv_against_torch(3, x, w, b, dict(stride=stride, padding=kernel // 2), torch.float32)
    assert cnnops._C._cpu_conv_weight_rows_calls() == before


def test_weight_gradient_rows_thread_count_independent():
    """Partial sums and row slices are fixed by the sizes: 1, 2 and 3 threads give the same bits."""
    x, w, b = conv_tensors(1, 2, 16, 32, 4100, 5, 1, True, torch.float32)
    go = make_tensor((2, 32, 4100), torch.float32)
    assert_same_bits_across_threads(cnnops.functional.conv1d, x, w, b, go, dict(padding=2), threads=(1, 2, 3))


# The stride-1 shifted-window forward with the product transposed (conv_shifted.cpp
# conv_forward_shifted_rows): 17-32 output channels a group (one float32 B panel, more than half
# used), either dtype; grad input takes it too where the input channels a group are in that range.
# dims, n, cin, cout, spatial, kernel, groups, bias, kwargs.
SHIFTED_ROWS = {
    "conv1d_k9": (1, 3, 24, 32, 300, 9, 1, True, dict(padding=4)),
    "conv1d_odd_rows": (1, 2, 5, 18, 77, 3, 1, False, dict(padding=1)),  # partial 12-row panels
    "conv1d_dilation3": (1, 2, 20, 20, 90, 3, 1, True, dict(padding=3, dilation=3)),
    "conv2d_20x20": (2, 2, 8, 24, (20, 20), 3, 1, True, dict(padding=1)),
    "conv3d_32": (3, 1, 16, 32, (4, 30, 30), 3, 1, True, dict(padding=1)),
    "conv3d_groups2": (3, 1, 16, 48, (4, 30, 30), 3, 2, True, dict(padding=1, groups=2)),
    "conv1d_long_blocks": (1, 1, 8, 20, 1000, 5, 1, True, dict(padding=2)),  # several column blocks a sample
    "batch0": (1, 0, 8, 24, 40, 3, 1, True, dict(padding=1)),
}


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", SHIFTED_ROWS)
def test_shifted_rows(name, dtype, weight_layout):
    """Forward and every gradient, with the transposed shifted-window product counted, also for a
    channels-last weight (read in (tap, channel) order). Winograd, which takes float32 3x3 and 3x3x3
    layers, is off."""
    dims, n, cin, cout, spatial, kernel, groups, bias, kwargs = SHIFTED_ROWS[name]
    if weight_layout == "channels_last" and dims == 1:
        pytest.skip("a 1-d weight has no channels-last layout")
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, bias, dtype, weight_layout=weight_layout)
    before = cnnops._C._cpu_shifted_rows_calls()
    with cnnops.backends.cpu.flags(allow_winograd=False):
        check_conv_against_torch(dims, x, w, b, kwargs, dtype, msg=name)
    calls = cnnops._C._cpu_shifted_rows_calls() - before
    assert calls >= 1 if n > 0 else calls == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_shifted_rows_relu(dtype):
    """The fused ReLU goes on after the bias, in the transposing copy."""
    x, w, b = conv_tensors(1, 2, 16, 24, 200, 5, 1, True, dtype)
    before = cnnops._C._cpu_shifted_rows_calls()
    got = torch.ops.cnnops.conv_forward(x, w, b, [1], [2], [1], 1, "relu")
    assert cnnops._C._cpu_shifted_rows_calls() - before == 1
    ref = F.relu(F.conv1d(x.double(), w.double(), b.double(), padding=2))
    assert_close_to_torch(got, ref.to(dtype), dtype, 16 * 5)


TRANSPOSED_PRODUCTS_CHECK = r"""
import sys, torch, torch.nn.functional as F
import cnnops
from cnnops import _C
print(torch.ops.cnnops.cpu_gemm_isa())
torch.manual_seed(0)
cnnops.backends.cpu.allow_winograd = False  # it would take the float32 3x3x3 forward and grad input
# (dims, N, C_in, C_out, size, kernel, padding): 24 input channels are whole panels of every MR (8, 3, 2)
cases = [(1, 2, 24, 24, (300,), 9, 4), (3, 1, 24, 20, (4, 30, 30), 3, 1), (2, 2, 24, 32, (20, 20), (2, 3), 0)]
for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
    for dims, n, ci, co, size, k, p in cases:
        x = torch.randn(n, ci, *size, dtype=dtype, requires_grad=True)
        w = torch.randn(co, ci, *((k,) * dims if isinstance(k, int) else k), dtype=dtype, requires_grad=True)
        b = torch.randn(co, dtype=dtype, requires_grad=True)
        ref_fn, ours_fn = getattr(F, f"conv{dims}d"), getattr(cnnops.functional, f"conv{dims}d")
        before = (_C._cpu_shifted_rows_calls(), _C._cpu_conv_weight_rows_calls())
        ref, ours = ref_fn(x, w, b, 1, p), ours_fn(x, w, b, 1, p)
        go = torch.randn_like(ref)
        grads_ref = torch.autograd.grad(ref, (x, w, b), go)
        grads_ours = torch.autograd.grad(ours, (x, w, b), go)
        if dtype == torch.float32 and _C._cpu_conv_weight_rows_calls() == before[1]:  # float64: 9-16 channels
            sys.exit(f"{dtype} case {dims}d: the weight gradient did not take the transposed product")
        if dims != 2 and _C._cpu_shifted_rows_calls() == before[0]:
            sys.exit(f"{dtype} case {dims}d: the forward did not take the transposed product")
        for name, a, e in zip(("out", "dx", "dw", "db"), (ours,) + grads_ours, (ref,) + grads_ref):
            err = ((a - e).abs().max() / e.abs().max().clamp_min(1)).item()
            if not err < tol:
                sys.exit(f"{dtype} case {dims}d {name}: relative error {err}")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_transposed_products_every_micro_kernel(isa):
    """The transposed forward and weight-gradient products with each micro-kernel's panel height."""
    result = run_with_cpu_isa(isa, TRANSPOSED_PRODUCTS_CHECK, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa


BORROWED_PREFIXES = ("conv", "thnn_conv", "slow_conv", "mkldnn", "onednn", "cudnn", "miopen", "mm", "bmm",
                     "addmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "vdot", "matmul", "linear",
                     "einsum", "tensordot", "unfold", "im2col", "col2im")


def is_borrowed(event_name):
    if not event_name.startswith("aten::"):
        return False
    op = event_name[len("aten::"):].lstrip("_")
    if op.startswith("convert"):
        return False
    return op.startswith(BORROWED_PREFIXES) or "convolution" in op


def test_is_borrowed_filter():
    assert is_borrowed("aten::mkldnn_convolution") and is_borrowed("aten::mm") and is_borrowed("aten::_convolution")
    assert is_borrowed("aten::conv2d") and is_borrowed("aten::addmm") and is_borrowed("aten::_slow_conv2d_forward")
    assert not is_borrowed("aten::empty") and not is_borrowed("aten::contiguous") and not is_borrowed("aten::copy_")
    assert not is_borrowed("cnnops::conv_forward") and not is_borrowed("aten::constant_pad_nd")


@pytest.mark.parametrize("dims", DIMS)
def test_no_borrowed_kernels(dims):
    """DESIGN.md: no cnnops op calls aten convolution/matmul kernels (oneDNN, BLAS...)."""
    spatial = {1: (20,), 2: (12, 12), 3: (6, 5, 7)}[dims]
    x, w, b = conv_tensors(dims, 2, 8, 16, spatial, 3, 1, True, torch.float32)
    xd, wd, bd = conv_tensors(dims, 2, 8, 16, spatial, 3, 8, True, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for (xx, ww, bb, g) in ((x, w, b, 1), (xd, wd, bd, 8)):
            xl, wl, bl = (t.clone().requires_grad_() for t in (xx, ww, bb))
            y = conv_fn(cnnops.functional, dims)(xl, wl, bl, padding="same", groups=g)
            y.backward(torch.randn_like(y))
    names = {e.name for e in prof.events()}
    assert any(n.startswith("cnnops::conv_forward") for n in names), sorted(names)
    assert any(n.startswith("cnnops::conv_backward") for n in names), sorted(names)
    bad = sorted(n for n in names if is_borrowed(n))
    assert not bad, f"cnnops called borrowed kernels: {bad}"


@pytest.mark.parametrize("dims", DIMS)
def test_batch1_equals_unbatched(dims):
    spatial = {1: (9,), 2: (6, 7), 3: (4, 5, 3)}[dims]
    x, w, b = conv_tensors(dims, 1, 3, 4, spatial, 3, 1, True, torch.float64)
    fn = conv_fn(cnnops.functional, dims)
    batched = fn(x, w, b, padding=1)
    unbatched = fn(x[0], w, b, padding=1)
    assert unbatched.shape == batched.shape[1:]
    torch.testing.assert_close(unbatched, batched[0], atol=1e-12, rtol=1e-12)
