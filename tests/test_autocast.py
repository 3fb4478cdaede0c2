"""torch.autocast: every cnnops function computes in the dtype torch's autocast picks for its
twin (ATen's autocast lists: convolution in the autocast dtype; on the CPU the 3d pools and max
unpool in float32; on CUDA layer norm and group norm in float32; the rest in the input's
dtype), with the same output dtype, values and gradient dtypes as torch."""
import pytest
import torch
import torch.nn.functional as F

import cnnops.functional as CF
from conftest import REFERENCE_DTYPE, TOLERANCES

W1, W2, W3 = torch.randn(4, 3, 3), torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3, 3)

# name -> (input shape, call(functional module, x, *params), parameters)
CASES = {
    "conv1d": ((2, 3, 9), lambda M, x, w: M.conv1d(x, w, None, 1, 1), [W1]),
    "conv2d": ((2, 3, 7, 6), lambda M, x, w, b: M.conv2d(x, w, b, 2, 1), [W2, torch.randn(4)]),
    "conv3d": ((2, 3, 5, 4, 6), lambda M, x, w: M.conv3d(x, w, None, 1, "same"), [W3]),
    "max_pool2d": ((2, 3, 7, 6), lambda M, x: M.max_pool2d(x, 3, 2, 1), []),
    "max_pool3d": ((2, 3, 5, 4, 6), lambda M, x: M.max_pool3d(x, 2, ceil_mode=True), []),
    "avg_pool1d": ((2, 3, 9), lambda M, x: M.avg_pool1d(x, 3, 2), []),
    "avg_pool3d": ((2, 3, 5, 4, 6), lambda M, x: M.avg_pool3d(x, 2), []),
    "adaptive_avg_pool2d": ((2, 3, 7, 6), lambda M, x: M.adaptive_avg_pool2d(x, 3), []),
    "adaptive_avg_pool3d": ((2, 3, 5, 4, 6), lambda M, x: M.adaptive_avg_pool3d(x, 2), []),
    "adaptive_max_pool1d": ((2, 3, 9), lambda M, x: M.adaptive_max_pool1d(x, 4), []),
    "adaptive_max_pool3d": ((2, 3, 5, 4, 6), lambda M, x: M.adaptive_max_pool3d(x, 2), []),
    "max_unpool2d": ((2, 3, 6, 6), lambda M, x: M.max_unpool2d(*M.max_pool2d(x, 2, return_indices=True), 2), []),
    "max_unpool3d": ((2, 3, 4, 4, 6), lambda M, x: M.max_unpool3d(*M.max_pool3d(x, 2, return_indices=True), 2), []),
    "batch_norm": ((4, 3, 5, 5), lambda M, x, w, b: M.batch_norm(x, None, None, w, b, True),
                   [torch.rand(3), torch.randn(3)]),
    "instance_norm": ((2, 3, 5, 5), lambda M, x: M.instance_norm(x), []),
    "layer_norm": ((2, 3, 5, 5), lambda M, x, w, b: M.layer_norm(x, (5, 5), w, b),
                   [torch.rand(5, 5), torch.randn(5, 5)]),
    "group_norm": ((2, 4, 5, 5), lambda M, x, w, b: M.group_norm(x, 2, w, b), [torch.rand(4), torch.randn(4)]),
}


def _run(module, name, x, params, device, dtype):
    shape, call, _ = CASES[name]
    x = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in params]
    with torch.autocast(device, dtype=dtype):
        out = call(module, x, *params)
    out.float().square().sum().backward()
    return out, [x.grad] + [p.grad for p in params]


def _check(name, device, autocast_dtype, input_dtype):
    torch.manual_seed(0)
    shape, _, params = CASES[name]
    x = torch.randn(shape, device=device).to(input_dtype)
    params = [p.to(device) for p in params]
    expected, expected_grads = _run(F, name, x, params, device, autocast_dtype)
    got, grads = _run(CF, name, x, params, device, autocast_dtype)
    assert got.dtype == expected.dtype, f"{name}: output dtype {got.dtype}, torch gives {expected.dtype}"
    tol = TOLERANCES[REFERENCE_DTYPE[autocast_dtype]] if expected.dtype == torch.float32 else TOLERANCES[autocast_dtype]
    # both sides round to the autocast dtype at the same points; allow two units of it
    atol = max(tol["atol"], 4 * torch.finfo(expected.dtype).eps)
    torch.testing.assert_close(got, expected, atol=atol * 8, rtol=tol["rtol"] * 2)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == e.dtype, f"{name}: gradient dtype {g.dtype}, torch gives {e.dtype}"


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["float32_input", "bfloat16_input"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_autocast_matches_torch(name, autocast_dtype, input_dtype):
    if input_dtype == torch.bfloat16 and autocast_dtype == torch.float16:
        pytest.skip("one low-precision dtype at a time")
    _check(name, "cpu", autocast_dtype, input_dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_autocast_matches_torch(name, autocast_dtype):
    _check(name, "cuda", autocast_dtype, torch.float32)


def test_float64_is_never_cast():
    x, w = torch.randn(1, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert CF.conv2d(x, w).dtype == F.conv2d(x, w).dtype == torch.float64
        assert CF.max_pool3d(x.unsqueeze(2), 1).dtype == F.max_pool3d(x.unsqueeze(2), 1).dtype == torch.float64


def test_autocast_disabled_region_runs_in_input_dtype():
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            assert CF.conv2d(x, w).dtype == torch.float32


def test_raw_ops_autocast_as_their_functions():
    """The policy lives on the ops' Autocast kernels (csrc/autocast), so raw ops cast too."""
    ops = torch.ops.cnnops
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    x3 = torch.randn(1, 3, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.conv_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1).dtype == F.conv2d(x, w).dtype
        pooled = ops.max_pool_forward(x3.bfloat16(), [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], False)[0]
        assert pooled.dtype == F.max_pool3d(x3.bfloat16(), 2).dtype == torch.float32
        pooled = ops.max_pool_forward(x.bfloat16(), [2, 2], [2, 2], [0, 0], [1, 1], False)[0]
        assert pooled.dtype == F.max_pool2d(x.bfloat16(), 2).dtype == torch.bfloat16
        out = ops.avg_pool_forward(x3.bfloat16(), [2, 2, 2], [2, 2, 2], [0, 0, 0], False, True, 0)
        assert out.dtype == torch.float32
        out, idx = F.max_pool2d(x[..., :4, :4].bfloat16(), 2, return_indices=True)
        assert ops.max_unpool_forward(out, idx, [4, 4]).dtype == F.max_unpool2d(out, idx, 2).dtype == torch.float32
        assert ops.conv_forward(x.double(), w.double(), None, [1, 1], [0, 0], [1, 1], 1).dtype == torch.float64
