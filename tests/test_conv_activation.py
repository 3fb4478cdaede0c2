"""Fused convolution + ReLU on the CPU: conv_forward(..., activation="relu") and the
cnnops.nn.ConvReLU{1,2,3}d modules against torch.relu(torch.nn.functional.conv{1,2,3}d(...)).

Forward and every gradient on a grid built to reach each CPU forward kernel (conv.cpp's
conv_forward_any: im2col GEMM, its batch-1 channel split, shifted-window GEMM, depthwise, narrow
groups, space to depth, channels-last GEMM; the GEMMs also with reductions longer than one GEMM
block, where the ReLU must only act on the final sums), which the kernels' own route counters
confirm, float64 gradcheck, opcheck, the
bad-activation error, and the modules' state_dict compatibility with torch.nn.ConvNd.

Expected values all come from torch. One care with gradients: where an output is within
rounding error of 0, torch's and cnnops' ReLU masks may legitimately disagree, so grad_output
is zeroed in a thin band around 0 of the torch output (|y| <= band); everywhere else the
gradients must match torch's, and the forward must be exactly 0 where torch's is below -band.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

import cnnops
import cnnops.functional
import cnnops.nn
from conftest import (
    CHANNELS_LAST,
    CPU_DTYPES,
    REFERENCE_DTYPE,
    assert_close_to_torch,
    conv_tensors,
    dtype_id,
    make_tensor,
    reductions,
    tolerance,
)
from test_conv import RAW, raw_args

DIMS = [1, 2, 3]


def relu_conv(dims, x, w, b, **kwargs):
    """cnnops' fused conv + ReLU through the functional layer (what ConvReLU*d calls)."""
    kw = dict(stride=1, padding=0, dilation=1, groups=1)
    kw.update(kwargs)
    return cnnops.functional._conv(x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], dims,
                                   _activation="relu")


def torch_relu_conv(dims, x, w, b, **kwargs):
    return torch.relu(getattr(F, f"conv{dims}d")(x, w, b, **kwargs))


def band(dtype, reduction, tf32=False):
    """Outputs this close to 0 may round to either side: a few times the comparison tolerance
    (at the typical magnitude sqrt(L) of the outputs)."""
    atol, rtol = tolerance(dtype, reduction, tf32)
    return 4 * (atol + rtol * math.sqrt(reduction))


def check_relu_conv(dims, x, w, b, kwargs, dtype, fn=None, tf32=False, msg=""):
    """Forward and gradients of fn (default: the fused functional) against torch.relu(convNd)
    computed on the CPU in REFERENCE_DTYPE on the same rounded inputs (on the CPU, so no TF32
    reaches the reference when x is a CUDA tensor)."""
    fn = fn or (lambda x, w, b: relu_conv(dims, x, w, b, **kwargs))
    ref_dtype = REFERENCE_DTYPE[dtype]
    leaves_ref = [None if t is None else t.detach().to("cpu", ref_dtype).requires_grad_() for t in (x, w, b)]
    ref = torch_relu_conv(dims, *leaves_ref, **kwargs)
    red = reductions(x.shape, w.shape, ref.shape, kwargs.get("groups", 1), unbatched=x.dim() == dims + 1)
    margin = band(dtype, red["output"], tf32)
    grad_out = make_tensor(ref.shape, dtype)
    grad_out = torch.where(ref.detach().abs() <= margin, 0, grad_out)  # see the module docstring
    wanted = [t for t in leaves_ref if t is not None]
    if ref.numel():
        ref_grads = torch.autograd.grad(ref, wanted, grad_out.to(ref_dtype))
    else:
        ref_grads = [torch.zeros_like(t) for t in wanted]

    # clone() keeps the layout under test (channels_last, ...)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    out = fn(*leaves)
    grad_out = grad_out.to(x.device)
    got = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out) if out.numel() else None

    ctx = f"{msg} conv{dims}d+relu x={tuple(x.shape)} w={tuple(w.shape)} bias={b is not None} {kwargs}"
    assert_close_to_torch(out, ref.detach().to(x.device), dtype, red["output"], tf32, msg=f"{ctx}: output")
    negative = (ref.detach() < -margin).to(x.device)
    assert (out.detach()[negative] == 0).all(), f"{ctx}: ReLU not applied (nonzero where torch's output < 0)"
    assert (out.detach() >= 0).all(), f"{ctx}: negative outputs after ReLU"
    if got is not None:
        for name, g, r in zip(("input", "weight", "bias"), got, ref_grads):
            assert_close_to_torch(g, r.to(x.device), dtype, red[f"grad_{name}"], tf32, msg=f"{ctx}: grad_{name}")
    if x.dim() in CHANNELS_LAST and suggest_memory_format(x) == CHANNELS_LAST[x.dim()] and not x.is_contiguous():
        assert out.is_contiguous(memory_format=CHANNELS_LAST[x.dim()]), f"{ctx}: output lost channels_last"
    return out


# --------------------------------------------------------------------------------------------
# Which CPU forward kernels a convolution ran: conv_forward_any's route counters
# (_C._cpu_conv_forward_routes), so the grid can prove it reaches every route.
# --------------------------------------------------------------------------------------------

GEMM_KC = cnnops._C.gemm_spec()["kc"]  # reductions longer than the GEMM's block take several blocks


def cpu_routes(dims, x, w, b, kwargs):
    """The routes a fused forward of (x, w, b) ran, each with "_long_k" when its reduction spans
    several GEMM blocks (where the ReLU must wait for the last one)."""
    before = cnnops._C._cpu_conv_forward_routes()
    with torch.no_grad():
        relu_conv(dims, x, w, b, **kwargs)
    after = cnnops._C._cpu_conv_forward_routes()
    long_k = "_long_k" if w.shape[1] * math.prod(w.shape[2:]) > GEMM_KC else ""
    return {route + long_k for route in after if after[route] > before[route]}


@contextlib.contextmanager
def nhwc_kernels_forced(on):
    """Channels-last inputs run the NHWC kernels past conv.cpp's speed rules, which would convert
    the grid's small maps to NCHW."""
    cnnops._C._set_cpu_nhwc_kernels_forced(on)
    try:
        yield
    finally:
        cnnops._C._set_cpu_nhwc_kernels_forced(False)


EVERY_PATH = {"gemm", "gemm_long_k", "gemm_split", "gemm_split_long_k", "shifted", "shifted_long_k", "depthwise",
              "grouped", "space_to_depth", "nhwc", "nhwc_long_k", "subsampled"}

# name -> config, tuples written for 3 dims and cut to the first `dims`. `cl` asks for a
# channels_last input (2d/3d only). Comments name the 2d path.
GRID = {
    "gemm_stride2": dict(stride=2, padding=1),                                    # im2col GEMM
    "subsampled_1x1": dict(kernel=1, stride=(2, 3, 2), spatial=(9, 10, 7)),       # a pointwise one on X[::s]
    "subsampled_1x1_groups": dict(kernel=1, stride=2, groups=2, cin=8, cout=6, spatial=(5, 8, 6)),
    "gemm_dilation_stride": dict(stride=(2, 1, 2), dilation=2, padding=2, spatial=(9, 10, 8)),
    "gemm_small_image_many_rows": dict(n=3, cin=5, cout=40, spatial=5, stride=2),  # tiles span samples, rows split
    "gemm_long_k": dict(cin=32, cout=10, stride=2, padding=1, spatial=(9, 8, 6)),  # K = 288 (2d): two blocks
    "gemm_long_k_1d": dict(cin=32, cout=10, kernel=(9, 3, 3), stride=2, spatial=(21, 8, 6)),
    "gemm_groups": dict(groups=2, cin=4, cout=6),
    "gemm_nobias": dict(bias=False, stride=2),
    "pointwise": dict(kernel=1, cin=6, cout=5),                                   # 1x1: X itself is B
    "pointwise_long_k": dict(kernel=1, cin=300, cout=9, spatial=4),
    "shifted": dict(padding=1, spatial=(12, 12, 12), kernel=(1, 3, 3)),          # stride 1, big image
    "shifted_3d": dict(padding=(0, 1, 1), spatial=(2, 20, 20), kernel=(1, 3, 3), n=1),
    "shifted_long_k": dict(cin=32, cout=9, padding=1, spatial=(12, 12, 12), kernel=(1, 3, 3), n=1),
    "shifted_groups_nobias": dict(groups=3, cin=6, cout=9, padding=1, spatial=(12, 12, 12),
                                  kernel=(1, 3, 3), bias=False),
    "depthwise_3x3": dict(groups=4, cin=4, cout=4, padding=1),                    # one-pass 3x3 plane
    "depthwise_x2_stride": dict(groups=4, cin=4, cout=8, stride=2, padding=1),    # row kernels
    "depthwise_k5": dict(groups=3, cin=3, cout=6, kernel=5, padding=2, spatial=(8, 9, 7)),
    "depthwise_dilated": dict(groups=5, cin=5, cout=5, dilation=2, padding=1, bias=False),
    "odd_sizes": dict(spatial=(13, 7, 5), kernel=(3, 3, 2), cin=5, cout=7, padding=(1, 0, 1)),
    "same_even": dict(padding="same", kernel=4, dilation=(1, 2, 1)),
    "batch0": dict(n=0, padding=1),
    "batch1": dict(n=1, padding=1),
    "unbatched": dict(unbatched=True, padding=1),
    "cl_gemm": dict(cl=True, stride=2, padding=1),                                # channels-last GEMM
    "cl_long_k": dict(cl=True, cin=32, cout=10, stride=2, padding=1, spatial=(9, 8, 6)),
    "cl_long_k_nobias": dict(cl=True, cin=32, cout=10, stride=2, spatial=(9, 8, 6), bias=False),
    "cl_shifted": dict(cl=True, padding=1, spatial=(12, 12, 12), kernel=(1, 3, 3), n=1),
    "cl_shifted_long_k": dict(cl=True, cin=32, cout=12, padding=1, spatial=(12, 12, 12), kernel=(1, 3, 3), n=1),
    "cl_groups": dict(cl=True, groups=2, cin=4, cout=6, stride=2),
    "cl_depthwise": dict(cl=True, groups=4, cin=4, cout=8, padding=1),
    "stem_space_to_depth": dict(cin=3, cout=8, kernel=9, stride=2, padding=4, spatial=(16, 16, 16)),
}


def grid_case(dims, name):
    cfg = dict(n=2, cin=3, cout=4, spatial=(7, 6, 5), kernel=3, stride=1, padding=0, dilation=1,
               groups=1, bias=True, unbatched=False, cl=False)
    cfg.update(GRID[name])

    def cut(v):
        return v[3 - dims:] if isinstance(v, tuple) and dims < 3 and name.startswith(("shifted", "cl_shifted")) \
            else (v[:dims] if isinstance(v, tuple) else v)

    spatial, kernel = cut(cfg["spatial"]), cut(cfg["kernel"])
    kwargs = dict(stride=cut(cfg["stride"]), padding=cut(cfg["padding"]), dilation=cut(cfg["dilation"]),
                  groups=cfg["groups"])
    layout = "channels_last" if cfg["cl"] else "contiguous"
    x, w, b = conv_tensors(dims, cfg["n"], cfg["cin"], cfg["cout"], spatial, kernel, cfg["groups"], cfg["bias"],
                           torch.float32, layout=layout, unbatched=cfg["unbatched"])
    return x, w, b, kwargs


def grid_params():
    return [(d, n) for d in DIMS for n in GRID if not (GRID[n].get("cl") and d == 1)]


def test_grid_reaches_every_cpu_path():
    """test_grid runs the channels-last cases with the NHWC kernels forced; two threads, as the
    batch-1 channel split depends on the thread count."""
    paths = set()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for dims, name in grid_params():
            x, w, b, kwargs = grid_case(dims, name)
            if GRID[name].get("cl"):
                x = x.contiguous(memory_format=CHANNELS_LAST[x.dim()])
            with nhwc_kernels_forced(bool(GRID[name].get("cl"))):
                paths |= cpu_routes(dims, x, w, b, kwargs)
    finally:
        torch.set_num_threads(threads)
    assert EVERY_PATH <= paths, f"paths not reached: {sorted(EVERY_PATH - paths)}"


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dims,name", grid_params(), ids=[f"{d}d-{n}" for d, n in grid_params()])
def test_grid(dims, name, dtype):
    x, w, b, kwargs = grid_case(dims, name)
    cast = [None if t is None else t.to(dtype) for t in (x, w, b)]
    if x.dim() in CHANNELS_LAST and GRID[name].get("cl"):
        cast[0] = cast[0].contiguous(memory_format=CHANNELS_LAST[x.dim()])
    with nhwc_kernels_forced(bool(GRID[name].get("cl"))):
        out = check_relu_conv(dims, *cast, kwargs, dtype, msg=name)
    if GRID[name].get("n") == 0:
        assert out.shape[0] == 0


# Channels-last weights (conv.cpp's WeightOrder): the GEMM kernels read them where they lie, in
# (tap, channel) order; the other kernels get them converted. The counters prove which.
IN_PLACE_WEIGHT_ROUTES = {"gemm", "gemm_split", "shifted", "nhwc"}


def cl_weight_params():
    return [(d, n) for d, n in grid_params() if d >= 2]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dims,name", cl_weight_params(), ids=[f"{d}d-{n}" for d, n in cl_weight_params()])
def test_grid_channels_last_weight(dims, name, dtype):
    x, w, b, kwargs = grid_case(dims, name)
    cast = [None if t is None else t.to(dtype) for t in (x, w, b)]
    cast[1] = cast[1].contiguous(memory_format=CHANNELS_LAST[w.dim()])
    if GRID[name].get("cl"):
        cast[0] = cast[0].contiguous(memory_format=CHANNELS_LAST[x.dim()])
    with nhwc_kernels_forced(bool(GRID[name].get("cl"))):
        before = cnnops._C._cpu_conv_weight_conversions()
        routes = cpu_routes(dims, *cast, kwargs)
        converted = cnnops._C._cpu_conv_weight_conversions() - before
        check_relu_conv(dims, *cast, kwargs, dtype, msg=f"{name} channels_last weight")
    routes = {r.removesuffix("_long_k") for r in routes}
    if cast[1].is_contiguous():  # one tap or one channel a group: both orders are the same
        assert converted == 0, f"{name}: a weight contiguous in both layouts was converted"
    elif routes <= IN_PLACE_WEIGHT_ROUTES:
        assert converted == 0, f"{name}: routes {routes} converted the channels-last weight"
    else:
        assert converted == 1, f"{name}: routes {routes} read a channels-last weight unconverted"


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_other_micro_kernels(isa, tmp_path):
    """The ReLU in the AVX2 and portable GEMM micro-kernels (CNNOPS_CPU_ISA picks them, once per
    process): a subprocess runs the long-reduction NCHW, shifted and NHWC cases."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, cnnops, cnnops.functional as CF, torch.nn.functional as F\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(2, 32, 12, 12, dtype=torch.float64); w = torch.randn(7, 32, 3, 3, dtype=torch.float64)\n"
        "b = torch.randn(7, dtype=torch.float64)\n"
        "for xx, s in ((x, 1), (x, 2), (x.contiguous(memory_format=torch.channels_last), 1),\n"
        "              (x.contiguous(memory_format=torch.channels_last), 2)):\n"
        "    got = CF._conv(xx, w, b, s, 1, 1, 1, 2, _activation='relu')\n"
        "    torch.testing.assert_close(got, torch.relu(F.conv2d(xx, w, b, s, 1)), atol=1e-10, rtol=1e-10)\n"
        "print(torch.ops.cnnops.cpu_gemm_isa())\n"
    )
    env = dict(os.environ, CNNOPS_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in (isa, "portable"), done.stdout


# --------------------------------------------------------------------------------------------
# the op: gradcheck, opcheck, errors, NaN, activation="none"
# --------------------------------------------------------------------------------------------

GRADCHECK = {
    "2d_gemm": (2, dict(stride=2, padding=1), 3, 4, (7, 6), 3, 1),
    "2d_shifted": (2, dict(padding=1), 3, 4, (12, 12), 3, 1),
    "1d_groups": (1, dict(padding=1, groups=2), 4, 6, (9,), 3, 2),
    "3d_depthwise": (3, dict(padding=1, groups=3), 3, 6, (4, 5, 4), 3, 3),
    "2d_channels_last": (2, dict(padding=1), 3, 4, (7, 6), 3, 1),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck(name):
    dims, kwargs, cin, cout, spatial, kernel, groups = GRADCHECK[name]
    layout = "channels_last" if "channels_last" in name else "contiguous"
    x, w, b = conv_tensors(dims, 2, cin, cout, spatial, kernel, groups, True, torch.float64, layout=layout)
    # Away from the kink: shift the bias so no output is within gradcheck's step of 0.
    with torch.no_grad():
        y = getattr(F, f"conv{dims}d")(x, w, b, **kwargs)
        y = y.transpose(0, 1).reshape(cout, -1)
        for c in range(cout):  # move each channel's values so the nearest one is 0.1 from 0
            near = y[c][(y[c].abs()).argmin()]
            b[c] += (0.1 - near) if near >= 0 else (-0.1 - near)
    y = torch_relu_conv(dims, x, w, b, **kwargs)
    assert (y > 0).any() and (getattr(F, f"conv{dims}d")(x, w, b, **kwargs) < 0).any()
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    if layout == "channels_last":
        leaves[0] = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: relu_conv(dims, x, w, b, **kwargs), leaves, eps=1e-6,
                                    atol=1e-7)


# The raw-op cases of test_conv.py (1d/2d/3d, bias, stride/dilation, depthwise, channels_last,
# batch 0), here with activation="relu".
OPCHECK = RAW


def op_args(name, dtype=torch.float32):
    return raw_args(name, dtype)


@pytest.mark.parametrize("name", list(OPCHECK))
def test_opcheck_relu(name):
    torch.library.opcheck(torch.ops.cnnops.conv_forward.default, (*op_args(name), "relu"))


@pytest.mark.parametrize("name", list(OPCHECK))
def test_raw_op_relu_and_none(name):
    """The raw op against torch in float64: "relu" is relu(conv), "none" (and the default) conv."""
    x, w, b, stride, padding, dilation, groups = op_args(name, torch.float64)
    dims = w.dim() - 2
    plain = getattr(F, f"conv{dims}d")(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    args = (x, w, b, stride, padding, dilation, groups)
    assert_close_to_torch(torch.ops.cnnops.conv_forward(*args, "relu"), torch.relu(plain), torch.float64, 100)
    assert_close_to_torch(torch.ops.cnnops.conv_forward(*args, "none"), plain, torch.float64, 100)
    assert_close_to_torch(torch.ops.cnnops.conv_forward(*args), plain, torch.float64, 100)
    assert_close_to_torch(torch.ops.cnnops.conv_forward(*args, activation="relu"), torch.relu(plain),
                          torch.float64, 100)


def test_schema_default():
    schema = torch.ops.cnnops.conv_forward.default._schema
    arg = schema.arguments[-1]
    assert arg.name == "activation" and arg.default_value == "none", str(schema)


@pytest.mark.parametrize("bad", ["gelu", "ReLU", "", "relu "])
def test_bad_activation(bad):
    x, w, b, stride, padding, dilation, groups = op_args("2d_bias")
    with pytest.raises(RuntimeError, match=r"activation.*'none', 'relu'.*activation='" + bad.strip() + ""):
        torch.ops.cnnops.conv_forward(x, w, b, stride, padding, dilation, groups, bad)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fw, fb = (mode.from_tensor(t) for t in (x, w, b))
        with pytest.raises(RuntimeError, match=r"activation.*'none', 'relu'"):
            torch.ops.cnnops.conv_forward(fx, fw, fb, stride, padding, dilation, groups, bad)


def test_nan_passes_through_relu():
    """torch.relu keeps NaN; so does the fused ReLU (every CPU path writes v < 0 ? 0 : v)."""
    for layout, stride, groups, cin in (("contiguous", 2, 1, 3), ("contiguous", 1, 1, 3),
                                        ("channels_last", 1, 1, 3), ("channels_last", 2, 1, 3),
                                        ("contiguous", 1, 3, 3)):
        x, w, b = conv_tensors(2, 1, cin, 3 if groups == 3 else 4, (12, 12), 3, groups, True, torch.float32,
                               layout=layout)
        x[0, 0, 5, 5] = float("nan")
        got = relu_conv(2, x, w, b, stride=stride, padding=1, groups=groups)
        expected = torch_relu_conv(2, x, w, b, stride=stride, padding=1, groups=groups)
        assert torch.equal(got.isnan(), expected.isnan()), (layout, stride, groups)


def test_existing_callers_unchanged():
    """The raw op with the old 7 arguments (activation defaults to "none") and the public
    functional signatures."""
    import inspect

    x, w, b = conv_tensors(2, 2, 3, 4, (7, 6), 3, 1, True, torch.float64)
    out = torch.ops.cnnops.conv_forward(x, w, b, (1, 1), (1, 1), (1, 1), 1)
    assert_close_to_torch(out, F.conv2d(x, w, b, padding=1), torch.float64, 27)
    relu = torch.ops.cnnops.conv_forward(x, w, b, (1, 1), (1, 1), (1, 1), 1, "relu")
    assert_close_to_torch(relu, torch.relu(F.conv2d(x, w, b, padding=1)), torch.float64, 27)
    for dims in DIMS:  # no new public argument
        assert "activation" not in inspect.signature(getattr(cnnops.functional, f"conv{dims}d")).parameters


def test_relu_backward_only_input():
    """Gradients for a subset of the leaves (the mask passed to conv_backward)."""
    x, w, b = conv_tensors(2, 2, 3, 4, (7, 6), 3, 1, True, torch.float64)
    xl = x.clone().requires_grad_()
    out = relu_conv(2, xl, w, b, padding=1)
    go = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, [xl], go)
    xr = x.clone().requires_grad_()
    (ex,) = torch.autograd.grad(torch_relu_conv(2, xr, w, b, padding=1), [xr], go)
    assert_close_to_torch(gx, ex, torch.float64, 36)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------

MODULE_CONFIGS = {
    "default": dict(in_channels=4, out_channels=6, kernel_size=3),
    "stride_pad": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    "groups_nobias": dict(in_channels=4, out_channels=6, kernel_size=2, groups=2, bias=False),
    "depthwise_x2": dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, padding=1),
    "same_even": dict(in_channels=4, out_channels=3, kernel_size=4, padding="same", dilation=2),
}


def module_pair(dims, cfg, dtype=torch.float32):
    torch.manual_seed(5)
    t = getattr(torch.nn, f"Conv{dims}d")(**cfg, dtype=dtype)
    c = getattr(cnnops.nn, f"ConvReLU{dims}d")(**cfg, dtype=dtype)
    c.load_state_dict(t.state_dict())
    return t, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
@pytest.mark.parametrize("dims", DIMS)
def test_module_matches_torch(dims, name, dtype):
    """ConvReLU{d}d(x) with the parameters of a torch.nn.Conv{d}d t, against torch.relu(t's conv):
    forward and the gradients of input, weight and bias."""
    t, c = module_pair(dims, MODULE_CONFIGS[name], dtype)
    x = make_tensor((2, 4) + (9, 8, 7)[:dims], dtype)
    kwargs = dict(stride=t.stride, padding=t.padding, dilation=t.dilation, groups=t.groups)

    def module(x, w, b):  # the module's forward on check_relu_conv's leaves
        return torch.func.functional_call(c, {"weight": w, **({"bias": b} if b is not None else {})}, (x,))

    check_relu_conv(dims, x, t.weight.detach(), None if t.bias is None else t.bias.detach(), kwargs, dtype,
                    fn=module, msg=name)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_module_padding_modes(dims, mode):
    """Non-zero padding modes: the module pads first, as torch.nn.ConvNd; compare the whole
    module (forward, grad of input and parameters) with torch.relu(torch.nn.ConvNd)."""
    cfg = dict(in_channels=3, out_channels=5, kernel_size=3, padding=2 if mode == "circular" else 1,
               padding_mode=mode)
    t, c = module_pair(dims, cfg, torch.float64)
    x = make_tensor((2, 3) + (9, 8, 7)[:dims], torch.float64)
    xt, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yc = torch.relu(t(xt)), c(xc)
    assert_close_to_torch(yc, yt.detach(), torch.float64, 27 * 3, msg=f"{mode} output")
    go = torch.where(yt.detach().abs() < 1e-9, 0, torch.randn_like(yt))
    gt = torch.autograd.grad(yt, [xt, t.weight, t.bias], go)
    gc = torch.autograd.grad(yc, [xc, c.weight, c.bias], go)
    for name, a, e in zip(("input", "weight", "bias"), gc, gt):
        assert_close_to_torch(a, e, torch.float64, 1000, msg=f"{mode} grad_{name}")


@pytest.mark.parametrize("dims", DIMS)
def test_module_state_dict_and_types(dims):
    """ConvReLU{d}d is a cnnops Conv{d}d (and a torch.nn.Conv{d}d): state_dicts load both ways."""
    tm, cm = getattr(torch.nn, f"Conv{dims}d"), getattr(cnnops.nn, f"ConvReLU{dims}d")
    assert issubclass(cm, getattr(cnnops.nn, f"Conv{dims}d")) and issubclass(cm, tm)
    assert f"ConvReLU{dims}d" in cnnops.nn.__all__
    torch.manual_seed(1)
    t = tm(4, 6, 3, padding=1)
    torch.manual_seed(1)
    c = cm(4, 6, 3, padding=1)
    assert list(c.state_dict()) == list(t.state_dict())
    for k, v in t.state_dict().items():  # same init from the same seed
        assert torch.equal(c.state_dict()[k], v), k
    torch.manual_seed(2)
    t2 = tm(4, 6, 3, padding=1)
    c.load_state_dict(t2.state_dict())
    t.load_state_dict(c.state_dict())
    x = torch.randn((2, 4) + (8, 7, 6)[:dims])
    assert_close_to_torch(c(x), torch.relu(t2(x)).detach(), torch.float32, 36)
    assert_close_to_torch(c(x), torch.relu(t(x)).detach(), torch.float32, 36)
    assert "ConvReLU" in repr(c)


def test_module_unbatched_and_channels_last():
    torch.manual_seed(0)
    t = torch.nn.Conv2d(4, 6, 3, padding=1)
    c = cnnops.nn.ConvReLU2d(4, 6, 3, padding=1)
    c.load_state_dict(t.state_dict())
    x = torch.randn(4, 9, 8)
    assert_close_to_torch(c(x), torch.relu(t(x)).detach(), torch.float32, 36)
    xc = torch.randn(2, 4, 9, 8).contiguous(memory_format=torch.channels_last)
    y = c(xc)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_torch(y, torch.relu(t(xc)).detach(), torch.float32, 36)


def test_module_sgd_steps_match_torch():
    """A few SGD steps of ConvReLU2d -> Conv2d against torch's Conv2d -> ReLU -> Conv2d."""
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    cm = torch.nn.Sequential(cnnops.nn.ConvReLU2d(3, 8, 3, padding=1), cnnops.nn.Conv2d(8, 4, 3))
    cm[0].load_state_dict(tm[0].state_dict())
    cm[1].load_state_dict(tm[2].state_dict())
    tm.double(), cm.double()
    opt_t = torch.optim.SGD(tm.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(cm.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(4, 3, 10, 9, dtype=torch.float64)
        target = torch.randn(4, 4, 8, 7, dtype=torch.float64)
        for model, opt in ((tm, opt_t), (cm, opt_c)):
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            opt.step()
    for (name, pt), pc in zip([(n, p) for n, p in tm.named_parameters()], cm.parameters()):
        torch.testing.assert_close(pc, pt, atol=1e-10, rtol=1e-10, msg=name)


def test_compile_fullgraph():
    """torch.compile traces the fused op (fake kernel with the activation argument)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = cnnops.nn.ConvReLU2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 7)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x))


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_module_forward_is_one_fused_op(dims, padding_mode):
    """ConvReLU{d}d's forward runs one cnnops::conv_forward with activation="relu" and no
    separate ReLU (nor any other op besides the padding of a non-zero padding mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((str(func), args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    m = getattr(cnnops.nn, f"ConvReLU{dims}d")(3, 4, 3, padding=1, padding_mode=padding_mode)
    x = torch.randn((2, 3) + (7, 6, 5)[:dims])
    with torch.no_grad(), Record() as rec:
        m(x)
    convs = [c for c in rec.calls if c[0].startswith("cnnops.conv_forward")]
    assert len(convs) == 1, rec.calls
    _, args, kwargs = convs[0]
    assert (args[7] if len(args) > 7 else kwargs.get("activation")) == "relu", convs
    others = [c[0] for c in rec.calls if not c[0].startswith("cnnops.conv_forward")]
    allowed = () if padding_mode == "zeros" else ("aten.reflection_pad", "aten.pad", "aten._pad")
    assert all(o.startswith(allowed) for o in others) if allowed else not others, others
