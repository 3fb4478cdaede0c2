"""CUDA pooling kernels, called through torch.ops.cnnops: against torch's own CUDA operators
(reference computed in REFERENCE_DTYPE on the same rounded inputs), and against the cnnops CPU
kernels where those are registered. Every op, 1d/2d/3d, contiguous / channels_last / non-dense
inputs, float32/float64/float16/bfloat16, ceil_mode edge cases, batch 0, NaN propagation,
bitwise-reproducible backward passes, and max unpool's index checks. Skipped unless a GPU is
visible and cnnops has CUDA kernels.

The same kernels also run on the CPU, under a launch shim, in tests/test_pool_kernels_host.py.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import CHANNELS_LAST, CUDA_DTYPES, REFERENCE_DTYPE, assert_close_to_torch, dtype_id, make_tensor

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
ops = torch.ops.cnnops


def layouts_for(dims):
    return ["contiguous", "sliced"] + (["channels_last"] if dims + 2 in CHANNELS_LAST else [])


def cases_with_layouts(cases):
    return [(c, layout) for c in cases for layout in layouts_for(c[0])]


def has_cpu_kernel(name):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnops::{name}", "CPU")


def compare_with_cpu(dtype, *names):
    """The cnnops CPU kernels are compared in float32/float64 once they are registered."""
    return dtype in (torch.float32, torch.float64) and all(has_cpu_kernel(n) for n in names)


def check_format(t, x, what):
    fmt = CHANNELS_LAST.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
        assert t.is_contiguous(memory_format=fmt), f"{what} lost channels_last, strides {t.stride()}"
    elif x.is_contiguous():
        assert t.is_contiguous(), f"{what} is not contiguous, strides {t.stride()}"


def reference(x):
    """A leaf in REFERENCE_DTYPE holding x's (already rounded) values."""
    return x.detach().to(REFERENCE_DTYPE[x.dtype]).requires_grad_()


def case_id(c):
    return "-".join(str(v).replace(" ", "") for v in c)


def _case_layout_id(v):
    return case_id(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------------------------------
# max pool
# ---------------------------------------------------------------------------------------------

MAX_CASES = [  # dims, N, C, size, kernel, stride, padding, dilation, ceil_mode
    (1, 2, 3, (11,), (3,), (2,), (1,), (1,), False),
    (1, 2, 2, (10,), (4,), (3,), (2,), (2,), True),           # dilated; last window starts in padding
    (2, 2, 3, (8, 8), (3, 3), (2, 2), (1, 1), (1, 1), False),  # ResNet stem
    (2, 2, 3, (6, 6), (3, 3), (2, 2), (1, 1), (1, 1), True),   # ceil_mode drops the padding-only window
    (2, 1, 40, (9, 7), (2, 3), (2, 1), (1, 0), (2, 1), True),  # C > warp: coalesced NHWC path
    (2, 2, 5, (5, 5), (2, 2), (3, 3), (0, 0), (1, 1), True),   # ceil window partly outside the input
    (3, 1, 3, (5, 6, 7), (2, 3, 2), (2, 2, 1), (1, 1, 0), (1, 1, 2), False),
    (3, 2, 2, (4, 5, 5), (3, 2, 2), (2, 2, 2), (1, 1, 1), (1, 2, 1), True),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case,layout", cases_with_layouts(MAX_CASES), ids=_case_layout_id)
def test_max_pool(case, layout, dtype):
    dims, n, c, size, k, s, p, d, ceil_mode = case
    x = make_tensor((n, c) + size, dtype, layout, device=DEVICE)
    out, idx = ops.max_pool_forward(x, k, s, p, d, ceil_mode)
    xr = reference(x)
    ref, ref_idx = getattr(F, f"max_pool{dims}d")(xr, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
    assert torch.equal(out, ref.detach().to(dtype)), "output"
    assert torch.equal(idx, ref_idx), "indices"
    check_format(out, x, "output")
    check_format(idx, x, "indices")

    dy = make_tensor(ref.shape, dtype, "channels_last" if layout == "channels_last" else "contiguous", device=DEVICE)
    (ref_dx,) = torch.autograd.grad(ref, xr, dy.to(xr.dtype))
    dx = ops.max_pool_backward(dy, x, idx, k, s, p, d, ceil_mode)
    assert_close_to_torch(dx, ref_dx, dtype, msg="grad_input")
    check_format(dx, x, "grad_input")
    assert torch.equal(dx, ops.max_pool_backward(dy, x, idx, k, s, p, d, ceil_mode)), "backward not reproducible"
    # torch's own indices drive our backward the same way (they are interchangeable)
    assert torch.equal(dx, ops.max_pool_backward(dy, x, ref_idx, k, s, p, d, ceil_mode))

    if compare_with_cpu(dtype, "max_pool_forward", "max_pool_backward"):
        out_c, idx_c = ops.max_pool_forward(x.cpu(), k, s, p, d, ceil_mode)
        assert torch.equal(out.cpu(), out_c) and torch.equal(idx.cpu(), idx_c)
        dx_c = ops.max_pool_backward(dy.cpu(), x.cpu(), idx_c, k, s, p, d, ceil_mode)
        assert_close_to_torch(dx.cpu(), dx_c, dtype, msg="grad_input vs cnnops CPU")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_max_pool_nan_and_ties(layout, dtype):
    """NaN propagates (its index is reported) and ties keep the first maximum, as in torch."""
    x = torch.randint(-2, 3, (2, 33, 7, 9)).to(dtype)
    x.view(-1)[::13] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    x = x.to(DEVICE)
    for args in [((3, 3), (2, 2), (1, 1), (1, 1), True), ((2, 3), (1, 2), (0, 1), (2, 1), False)]:
        out, idx = ops.max_pool_forward(x, *args)
        ref, ref_idx = F.max_pool2d(x, *args[:4], ceil_mode=args[4], return_indices=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(idx, ref_idx)
    out, idx = ops.adaptive_max_pool_forward(x, (3, 4))
    ref, ref_idx = F.adaptive_max_pool2d(x, (3, 4), return_indices=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, ref_idx)


def test_max_pool_backward_garbage_indices():
    """Indices that point nowhere (negative, past the plane) are never matched: zero gradient,
    no out-of-bounds access."""
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    args = ((2, 2), (2, 2), (0, 0), (1, 1), False)
    _, idx = ops.max_pool_forward(x, *args)
    dy = torch.randn(2, 3, 4, 4, device=DEVICE)
    for bad in (torch.full_like(idx, -5), torch.full_like(idx, 64), torch.full_like(idx, 2**40)):
        dx = ops.max_pool_backward(dy, x, bad, *args)
        assert torch.equal(dx, torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# average pool
# ---------------------------------------------------------------------------------------------

AVG_CASES = [  # dims, N, C, size, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
    (1, 2, 3, (11,), (3,), (2,), (1,), False, True, 0),
    (1, 2, 2, (10,), (4,), (3,), (2,), True, True, 0),       # ceil window past the padded input
    (1, 2, 2, (10,), (4,), (3,), (2,), True, False, 0),
    (2, 2, 3, (8, 8), (2, 2), (2, 2), (0, 0), False, True, 0),  # the 2x2 pool of the benchmark
    (2, 2, 3, (6, 7), (3, 2), (2, 3), (1, 1), True, True, 0),
    (2, 1, 40, (6, 7), (3, 2), (2, 3), (1, 1), True, False, 0),
    (2, 2, 4, (5, 5), (2, 2), (2, 2), (0, 0), False, True, 3),
    (2, 2, 2, (8, 8), (2, 2), (1, 1), (1, 0), True, False, 0),  # overlapping windows
    (3, 1, 3, (5, 6, 7), (2, 3, 2), (2, 2, 1), (1, 1, 0), True, True, 0),
    (3, 2, 2, (4, 5, 5), (3, 2, 2), (2, 2, 2), (1, 1, 1), True, False, 0),
    (3, 1, 2, (4, 4, 4), (2, 2, 2), (1, 2, 1), (0, 1, 1), False, True, 5),
]


def avg_reference(x, dims, k, s, p, ceil_mode, cip, div):
    if dims == 1:  # F.avg_pool1d has no divisor_override: the same pool as a 2d one over (1, W)
        return F.avg_pool2d(x.unsqueeze(2), (1,) + k, (1,) + s, (0,) + p, ceil_mode, cip, div or None).squeeze(2)
    return getattr(F, f"avg_pool{dims}d")(x, k, s, p, ceil_mode, cip, div or None)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case,layout", cases_with_layouts(AVG_CASES), ids=_case_layout_id)
def test_avg_pool(case, layout, dtype):
    dims, n, c, size, k, s, p, ceil_mode, cip, div = case
    x = make_tensor((n, c) + size, dtype, layout, device=DEVICE)
    out = ops.avg_pool_forward(x, k, s, p, ceil_mode, cip, div)
    xr = reference(x)
    ref = avg_reference(xr, dims, k, s, p, ceil_mode, cip, div)
    assert_close_to_torch(out, ref, dtype, msg="output")
    check_format(out, x, "output")

    dy = make_tensor(ref.shape, dtype, "channels_last" if layout == "channels_last" else "contiguous", device=DEVICE)
    (ref_dx,) = torch.autograd.grad(ref, xr, dy.to(xr.dtype))
    dx = ops.avg_pool_backward(dy, x, k, s, p, ceil_mode, cip, div)
    assert_close_to_torch(dx, ref_dx, dtype, msg="grad_input")
    check_format(dx, x, "grad_input")
    assert torch.equal(dx, ops.avg_pool_backward(dy, x, k, s, p, ceil_mode, cip, div)), "backward not reproducible"

    if compare_with_cpu(dtype, "avg_pool_forward", "avg_pool_backward"):
        assert_close_to_torch(out.cpu(), ops.avg_pool_forward(x.cpu(), k, s, p, ceil_mode, cip, div), dtype,
                              msg="output vs cnnops CPU")
        dx_c = ops.avg_pool_backward(dy.cpu(), x.cpu(), k, s, p, ceil_mode, cip, div)
        assert_close_to_torch(dx.cpu(), dx_c, dtype, msg="grad_input vs cnnops CPU")


def test_avg_pool_negative_divisor_override():
    """torch takes any non-zero divisor_override, negative ones too."""
    x = torch.randn(2, 3, 7, 6, device=DEVICE)
    out = ops.avg_pool_forward(x, (2, 3), (2, 2), (1, 1), True, True, -3)
    xr = x.detach().double().requires_grad_()
    ref = F.avg_pool2d(xr, (2, 3), (2, 2), (1, 1), True, True, -3)
    assert_close_to_torch(out, ref, torch.float32)
    dy = torch.randn_like(out)
    (ref_dx,) = torch.autograd.grad(ref, xr, dy.double())
    assert_close_to_torch(ops.avg_pool_backward(dy, x, (2, 3), (2, 2), (1, 1), True, True, -3), ref_dx, torch.float32)


# ---------------------------------------------------------------------------------------------
# adaptive pools
# ---------------------------------------------------------------------------------------------

ADAPTIVE_CASES = [  # dims, N, C, size, output_size
    (1, 2, 3, (11,), (4,)),
    (1, 2, 2, (5,), (7,)),          # output larger than input: overlapping windows
    (2, 2, 3, (7, 9), (3, 4)),
    (2, 2, 40, (7, 7), (1, 1)),     # global average pool, C > warp
    (2, 2, 40, (17, 19), (1, 1)),   # global, large window: the two-pass (split) kernels
    (2, 2, 3, (32, 30), (3, 2)),    # large windows, several outputs: split
    (3, 1, 4, (6, 8, 9), (1, 2, 1)),  # 3d split
    (2, 2, 2, (4, 6), (6, 5)),
    (3, 1, 3, (5, 6, 7), (2, 3, 4)),
    (3, 2, 2, (3, 4, 5), (4, 3, 7)),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case,layout", cases_with_layouts(ADAPTIVE_CASES), ids=_case_layout_id)
def test_adaptive_avg_pool(case, layout, dtype):
    dims, n, c, size, osize = case
    x = make_tensor((n, c) + size, dtype, layout, device=DEVICE)
    out = ops.adaptive_avg_pool_forward(x, osize)
    xr = reference(x)
    ref = getattr(F, f"adaptive_avg_pool{dims}d")(xr, osize)
    assert_close_to_torch(out, ref, dtype, msg="output")
    check_format(out, x, "output")
    dy = make_tensor(ref.shape, dtype, "channels_last" if layout == "channels_last" else "contiguous", device=DEVICE)
    (ref_dx,) = torch.autograd.grad(ref, xr, dy.to(xr.dtype))
    dx = ops.adaptive_avg_pool_backward(dy, x)
    assert_close_to_torch(dx, ref_dx, dtype, msg="grad_input")
    check_format(dx, x, "grad_input")
    assert torch.equal(dx, ops.adaptive_avg_pool_backward(dy, x)), "backward not reproducible"
    if compare_with_cpu(dtype, "adaptive_avg_pool_forward", "adaptive_avg_pool_backward"):
        assert_close_to_torch(out.cpu(), ops.adaptive_avg_pool_forward(x.cpu(), osize), dtype, msg="vs cnnops CPU")
        assert_close_to_torch(dx.cpu(), ops.adaptive_avg_pool_backward(dy.cpu(), x.cpu()), dtype, msg="vs cnnops CPU")


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case,layout", cases_with_layouts(ADAPTIVE_CASES), ids=_case_layout_id)
def test_adaptive_max_pool(case, layout, dtype):
    dims, n, c, size, osize = case
    x = make_tensor((n, c) + size, dtype, layout, device=DEVICE)
    out, idx = ops.adaptive_max_pool_forward(x, osize)
    xr = reference(x)
    ref, ref_idx = getattr(F, f"adaptive_max_pool{dims}d")(xr, osize, return_indices=True)
    assert torch.equal(out, ref.detach().to(dtype)), "output"
    assert torch.equal(idx, ref_idx), "indices"
    check_format(out, x, "output")
    dy = make_tensor(ref.shape, dtype, "channels_last" if layout == "channels_last" else "contiguous", device=DEVICE)
    (ref_dx,) = torch.autograd.grad(ref, xr, dy.to(xr.dtype))
    dx = ops.adaptive_max_pool_backward(dy, x, idx)
    assert_close_to_torch(dx, ref_dx, dtype, msg="grad_input")
    check_format(dx, x, "grad_input")
    assert torch.equal(dx, ops.adaptive_max_pool_backward(dy, x, idx)), "backward not reproducible"
    if compare_with_cpu(dtype, "adaptive_max_pool_forward", "adaptive_max_pool_backward"):
        out_c, idx_c = ops.adaptive_max_pool_forward(x.cpu(), osize)
        assert torch.equal(out.cpu(), out_c) and torch.equal(idx.cpu(), idx_c)
        assert_close_to_torch(dx.cpu(), ops.adaptive_max_pool_backward(dy.cpu(), x.cpu(), idx_c), dtype,
                              msg="vs cnnops CPU")


def test_adaptive_empty_output_size():
    """An output size of 0 gives an empty output; the backward rejects its empty grad_output, as
    torch's does."""
    x = torch.randn(2, 3, 5, 6, device=DEVICE)
    out = ops.adaptive_avg_pool_forward(x, (0, 3))
    assert out.shape == F.adaptive_avg_pool2d(x, (0, 3)).shape
    empty_grad = "non-zero size for non-batch dimensions"
    with pytest.raises(RuntimeError, match=empty_grad):
        torch.ops.aten._adaptive_avg_pool2d_backward(torch.empty_like(out), x)
    with pytest.raises(RuntimeError, match=empty_grad):
        ops.adaptive_avg_pool_backward(torch.empty_like(out), x)
    out, idx = ops.adaptive_max_pool_forward(x, (2, 0))
    assert out.shape == idx.shape == (2, 3, 2, 0)
    with pytest.raises(RuntimeError, match=empty_grad):
        ops.adaptive_max_pool_backward(torch.empty_like(out), x, idx)


# ---------------------------------------------------------------------------------------------
# max unpool
# ---------------------------------------------------------------------------------------------

UNPOOL_CASES = [  # dims, N, C, pooled size, kernel (= stride), output_size
    (1, 2, 3, (4,), (2,), (9,)),
    (2, 2, 3, (3, 4), (2, 2), (6, 8)),
    (2, 1, 40, (3, 3), (3, 2), (10, 7)),
    (3, 1, 2, (2, 3, 2), (2, 2, 2), (5, 6, 4)),
]


def unpool_inputs(case, layout, dtype):
    """Pooled values and distinct in-range indices (a max pool with stride = kernel)."""
    dims, n, c, size, k, osize = case
    src = make_tensor((n, c) + osize, torch.float32, "contiguous", device=DEVICE)
    _, idx = getattr(F, f"max_pool{dims}d")(src, k, k, return_indices=True)
    idx = idx[(slice(None), slice(None)) + tuple(slice(0, v) for v in size)].contiguous()
    x = make_tensor(idx.shape, dtype, layout, device=DEVICE)
    if layout == "channels_last":
        idx = idx.contiguous(memory_format=CHANNELS_LAST[idx.dim()])
    return x, idx


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case,layout", cases_with_layouts(UNPOOL_CASES), ids=_case_layout_id)
def test_max_unpool(case, layout, dtype):
    dims, n, c, size, k, osize = case
    x, idx = unpool_inputs(case, layout, dtype)
    out = ops.max_unpool_forward(x, idx, osize)
    ref = getattr(F, f"max_unpool{dims}d")(x, idx, k, k, output_size=osize)
    assert torch.equal(out, ref)
    check_format(out, x, "output")
    dy = make_tensor(ref.shape, dtype, "channels_last" if layout == "channels_last" else "contiguous", device=DEVICE)
    dx = ops.max_unpool_backward(dy, x, idx)
    assert torch.equal(dx, dy.flatten(2).gather(2, idx.flatten(2)).view_as(idx))
    check_format(dx, x, "grad_input")
    if compare_with_cpu(dtype, "max_unpool_forward", "max_unpool_backward"):
        assert torch.equal(out.cpu(), ops.max_unpool_forward(x.cpu(), idx.cpu(), osize))
        assert torch.equal(dx.cpu(), ops.max_unpool_backward(dy.cpu(), x.cpu(), idx.cpu()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bad", [-1, 48, 2**40])
def test_max_unpool_invalid_indices_raise(layout, bad):
    """An index outside the output plane is an error (torch's CPU message), never a write or a
    read out of bounds, and the CUDA context stays usable."""
    x, idx = unpool_inputs(UNPOOL_CASES[1], layout, torch.float32)  # output plane 6 x 8 = 48
    idx = idx.clone()
    idx[1, 2, 0, 3] = bad
    with pytest.raises(RuntimeError, match=f"Found an invalid max index: {bad}"):
        ops.max_unpool_forward(x, idx, (6, 8))
    with pytest.raises(RuntimeError, match=f"Found an invalid max index: {bad}"):
        ops.max_unpool_backward(torch.randn(2, 3, 6, 8, device=DEVICE), x, idx)
    torch.cuda.synchronize()
    assert ops.max_unpool_forward(x, idx.clamp(0, 47), (6, 8)).shape == (2, 3, 6, 8)


def test_max_unpool_alerts_nondeterminism():
    """The scatter of max unpool raises torch's determinism alert; the gathers do not."""
    x, idx = unpool_inputs(UNPOOL_CASES[1], "contiguous", torch.float32)
    xp = torch.randn(2, 3, 8, 8, device=DEVICE)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="max_unpool_forward"):
            ops.max_unpool_forward(x, idx, (6, 8))
        ops.max_unpool_backward(torch.randn(2, 3, 6, 8, device=DEVICE), x, idx)
        out, pidx = ops.max_pool_forward(xp, (3, 3), (1, 1), (1, 1), (1, 1), False)
        ops.max_pool_backward(torch.randn_like(out), xp, pidx, (3, 3), (1, 1), (1, 1), (1, 1), False)
        ops.avg_pool_backward(torch.randn_like(out), xp, (3, 3), (1, 1), (1, 1), False, True, 0)
        out, pidx = ops.adaptive_max_pool_forward(xp, (5, 5))
        ops.adaptive_max_pool_backward(torch.randn_like(out), xp, pidx)
        ops.adaptive_avg_pool_backward(torch.randn_like(out), xp)
    finally:
        torch.use_deterministic_algorithms(old)


# ---------------------------------------------------------------------------------------------
# batch 0, argument errors, 64-bit offsets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batch0(dims):
    size = (6,) * dims
    k, s, p, d = (2,) * dims, (2,) * dims, (0,) * dims, (1,) * dims
    x = torch.randn((0, 3) + size, device=DEVICE)
    out, idx = ops.max_pool_forward(x, k, s, p, d, False)
    assert out.shape == idx.shape == (0, 3) + (3,) * dims
    assert ops.max_pool_backward(out, x, idx, k, s, p, d, False).shape == x.shape
    out = ops.avg_pool_forward(x, k, s, p, False, True, 0)
    assert out.shape == (0, 3) + (3,) * dims
    assert ops.avg_pool_backward(out, x, k, s, p, False, True, 0).shape == x.shape
    out = ops.adaptive_avg_pool_forward(x, (2,) * dims)
    assert ops.adaptive_avg_pool_backward(out, x).shape == x.shape
    out, idx = ops.adaptive_max_pool_forward(x, (2,) * dims)
    assert ops.adaptive_max_pool_backward(out, x, idx).shape == x.shape
    xu = torch.randn((0, 3) + (3,) * dims, device=DEVICE)
    iu = torch.zeros(xu.shape, dtype=torch.long, device=DEVICE)
    out = ops.max_unpool_forward(xu, iu, size)
    assert out.shape == (0, 3) + size
    assert ops.max_unpool_backward(out, xu, iu).shape == xu.shape


def test_argument_errors():
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="kernel_size"):
        ops.max_pool_forward(x, (0, 2), (1, 1), (0, 0), (1, 1), False)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        ops.avg_pool_forward(x, (2, 2), (1, 1), (2, 2), False, True, 0)
    with pytest.raises(RuntimeError, match="smaller than kernel size"):  # torch's avg_pool3d rule
        ops.avg_pool_forward(torch.randn(1, 2, 2, 5, 5, device=DEVICE), (3, 2, 2), (1, 1, 1), (1, 0, 0), False, True, 0)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.avg_pool_backward(torch.randn(2, 3, 3, 3, device=DEVICE), x, (2, 2), (2, 2), (0, 0), False, True, 0)
    _, idx = ops.max_pool_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), False)
    with pytest.raises(RuntimeError, match="indices"):
        ops.max_pool_backward(torch.randn(2, 3, 4, 4, device=DEVICE), x, idx.int(), (2, 2), (2, 2), (0, 0), (1, 1),
                              False)
    with pytest.raises(RuntimeError, match="indices"):
        ops.max_unpool_forward(torch.randn(2, 3, 4, 4, device=DEVICE), idx[:, :, :3], (8, 8))
    with pytest.raises(RuntimeError):
        ops.max_pool_forward(torch.randint(0, 5, (2, 3, 8, 8), device=DEVICE), (2, 2), (2, 2), (0, 0), (1, 1), False)


def test_int64_offsets():
    """A plane of more than 2^31 elements takes the int64 kernels (flat indices past 2^31). The
    expected values are formed elementwise (torch's own pool need not support this size):
    max of each pair, the first index on a tie, the gradient routed to it."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    o = 2**30 + 2**19 + 3
    x = torch.randn(1, 1, 2 * o, device=DEVICE, dtype=torch.float16)
    out, idx = ops.max_pool_forward(x, (2,), (2,), (0,), (1,), False)
    a, b = x[..., 0::2], x[..., 1::2]
    assert torch.equal(out, torch.maximum(a, b))
    second = b > a
    assert idx[0, 0, -1].item() >= 2**31
    assert torch.equal(idx, torch.arange(0, 2 * o, 2, device=DEVICE).view_as(idx) + second)
    dx = ops.max_pool_backward(out, x, idx, (2,), (2,), (0,), (1,), False)
    assert torch.equal(dx[..., 0::2], torch.where(second, 0, a))
    assert torch.equal(dx[..., 1::2], torch.where(second, b, 0))
