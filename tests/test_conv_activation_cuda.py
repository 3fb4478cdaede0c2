"""Fused convolution + ReLU on CUDA: the twins of test_conv_activation.py. The reference is
torch.relu(torch.nn.functional.convNd) computed on the CPU in a wider dtype (no TF32 in it);
the CUDA results are also compared with the cnnops CPU kernels, which test_conv_activation.py
checks against torch. Covers the FMA implicit-GEMM kernel (float64, float32 without TF32),
the tensor-core WMMA kernel (float16, bfloat16, float32 with TF32) and the depthwise kernel,
each of which applies the ReLU in its epilogue. Skipped unless a GPU is visible and cnnops
has CUDA kernels."""

import pytest
import torch

import cnnops
import cnnops.nn
from conftest import CUDA_DTYPES, assert_close_to_torch, conv_tensors, dtype_id, make_tensor, reductions
from test_conv_activation import (
    GRID,
    OPCHECK,
    check_relu_conv,
    grid_case,
    grid_params,
    op_args,
    relu_conv,
    torch_relu_conv,
)

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
DIMS = [1, 2, 3]


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 precision unless a test opts into TF32 (cuDNN's default is TF32 on)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def on_device(dims, name, dtype):
    x, w, b, kwargs = grid_case(dims, name)
    cast = [None if t is None else t.to(DEVICE, dtype) for t in (x, w, b)]
    if GRID[name].get("cl"):
        cast[0] = cast[0].contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    return (*cast, kwargs)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dims,name", grid_params(), ids=[f"{d}d-{n}" for d, n in grid_params()])
def test_cuda_grid(dims, name, dtype):
    x, w, b, kwargs = on_device(dims, name, dtype)
    out = check_relu_conv(dims, x, w, b, kwargs, dtype, msg=name)
    assert out.device.type == "cuda"


@pytest.mark.parametrize("name", ["gemm_stride2", "gemm_long_k", "shifted_long_k", "cl_long_k", "depthwise_3x3"])
def test_cuda_tf32(name):
    """float32 on the tensor-core kernel (TF32 allowed): TF32 tolerance, ReLU in its epilogue."""
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    x, w, b, kwargs = on_device(2, name, torch.float32)
    check_relu_conv(2, x, w, b, kwargs, torch.float32, tf32=True, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("dims,name", [(2, "gemm_stride2"), (3, "gemm_long_k"), (1, "depthwise_k5"),
                                       (2, "depthwise_3x3"), (2, "cl_shifted_long_k"), (3, "odd_sizes")])
def test_cuda_vs_cnnops_cpu(dims, name, dtype):
    x, w, b, kwargs = grid_case(dims, name)
    x, w = x.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    cpu = relu_conv(dims, x, w, b, **kwargs)
    cuda = relu_conv(dims, x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), **kwargs)
    red = reductions(x.shape, w.shape, cpu.shape, kwargs["groups"])
    assert_close_to_torch(cuda.cpu(), cpu, dtype, red["output"], msg=name)


@pytest.mark.parametrize("name", ["2d_bias", "3d_depthwise", "1d_bias"])
def test_cuda_gradcheck(name):
    x, w, b, stride, padding, dilation, groups = op_args(name, torch.float64)
    dims = w.dim() - 2
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    with torch.no_grad():  # keep outputs away from the kink: each channel's nearest value 0.1 from 0
        y = getattr(torch.nn.functional, f"conv{dims}d")(x, w, b, **kwargs).transpose(0, 1).reshape(w.shape[0], -1)
        for c in range(w.shape[0]):
            near = y[c][y[c].abs().argmin()]
            b[c] += (0.1 - near) if near >= 0 else (-0.1 - near)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: relu_conv(dims, x, w, b, **kwargs), leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(OPCHECK))
def test_cuda_opcheck_relu(name):
    x, w, b, stride, padding, dilation, groups = op_args(name)
    args = (x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), stride, padding, dilation, groups, "relu")
    torch.library.opcheck(torch.ops.cnnops.conv_forward.default, args)


def test_cuda_bad_activation():
    x, w, b, stride, padding, dilation, groups = op_args("2d_bias")
    with pytest.raises(RuntimeError, match=r"activation.*'none', 'relu'.*activation='sigmoid'"):
        torch.ops.cnnops.conv_forward(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), stride, padding, dilation, groups,
                                      "sigmoid")


def test_cuda_nan_passes_through_relu():
    for groups, cin, cout in ((1, 3, 4), (3, 3, 6)):
        x, w, b = conv_tensors(2, 1, cin, cout, (12, 12), 3, groups, True, torch.float32, device=DEVICE)
        x[0, 0, 5, 5] = float("nan")
        got = relu_conv(2, x, w, b, padding=1, groups=groups)
        expected = torch_relu_conv(2, x.cpu(), w.cpu(), b.cpu(), padding=1, groups=groups)
        assert torch.equal(got.isnan().cpu(), expected.isnan()), groups


@pytest.mark.parametrize("dims", DIMS)
def test_cuda_module(dims):
    torch.manual_seed(0)
    t = getattr(torch.nn, f"Conv{dims}d")(4, 6, 3, padding=1)
    c = getattr(cnnops.nn, f"ConvReLU{dims}d")(4, 6, 3, padding=1)
    c.load_state_dict(t.state_dict())
    c.to(DEVICE)
    x = make_tensor((2, 4) + (9, 8, 7)[:dims], torch.float32)
    assert_close_to_torch(c(x.to(DEVICE)).cpu(), torch.relu(t(x)).detach(), torch.float32, 36)
