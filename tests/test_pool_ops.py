"""Differential tests of the pooling ops called directly (torch.ops.cnnops.*) against
torch.nn.functional, on the CPU.

Every expected value comes from torch: the forward from F.*pool*, the gradients from
torch.autograd through F.*pool* (computed in REFERENCE_DTYPE on the same rounded inputs, then
cast). Max-pool values and indices must be exactly equal (a max is exact in every dtype); averages
and gradients use the shared tolerance table in conftest.py. The Python API (cnnops.functional,
cnnops.nn, autograd, opcheck, torch.compile) is tested in its own files.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import cnnops  # noqa: F401  (registers torch.ops.cnnops)
from conftest import CHANNELS_LAST, CPU_DTYPES, REFERENCE_DTYPE, assert_close_to_torch, dtype_id, make_tensor

ops = torch.ops.cnnops


def effective(k, d):
    return (k - 1) * d + 1


def out_size(i, k, s, p, d, ceil):
    """torch's pooling output size (the one torch checks against), for case generation."""
    span = i + 2 * p - effective(k, d)
    o = (span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (o - 1) * s >= i + p:
        o -= 1
    return o


def layout_for(dims, layout):
    return "contiguous" if layout == "channels_last" and dims == 1 else layout


def reference(x):
    return x.detach().to(REFERENCE_DTYPE[x.dtype]).requires_grad_()


def check_format(out, x, what):
    fmt = CHANNELS_LAST.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=fmt), f"{what} lost channels_last: {out.stride()}"


# ------------------------------------------------------------------------------------------------
# cases: a hand-picked grid (edge cases) plus a seeded random sample
# ------------------------------------------------------------------------------------------------

def pool_case_ok(spatial, k, s, p, d, ceil):
    return all(pi <= ki // 2 and out_size(i, ki, si, pi, di, ceil) >= 1
               for i, ki, si, pi, di in zip(spatial, k, s, p, d))


GRID = [  # (spatial, kernel, stride, padding, dilation, ceil_mode)
    ((56, 56), (3, 3), (2, 2), (1, 1), (1, 1), False),  # ResNet stem
    ((8, 8), (2, 2), (2, 2), (0, 0), (1, 1), False),
    ((7, 9), (2, 2), (2, 2), (1, 1), (1, 1), True),  # last window would start in the padding
    ((5, 6), (3, 2), (2, 2), (1, 1), (1, 1), True),  # last window partly outside
    ((6, 5), (2, 3), (3, 2), (0, 1), (1, 1), True),
    ((10, 9), (3, 3), (1, 1), (1, 1), (1, 1), False),  # overlapping windows
    ((11, 13), (3, 2), (2, 3), (1, 1), (2, 2), True),  # dilation
    ((9, 7), (1, 1), (2, 3), (0, 0), (1, 1), True),
    ((13,), (4,), (3,), (2,), (1,), True),
    ((17,), (3,), (1,), (0,), (3,), False),
    ((5,), (5,), (5,), (2,), (1,), True),
    ((6, 7, 5), (2, 3, 2), (2, 2, 1), (1, 1, 0), (1, 1, 1), True),
    ((5, 5, 6), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), False),
    ((7, 6, 5), (2, 2, 2), (1, 2, 3), (0, 1, 1), (2, 1, 1), True),
    ((3, 7), (3, 2), (5, 10**7), (1, 1), (1, 1), True),  # a stride far beyond the row
    ((300,), (3,), (150,), (1,), (1,), True),  # a large stride: the direct NCHW loop too
]


def random_cases(count, seed, dilation=True):
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        dims = rng.choice((1, 2, 3))
        hi = {1: 23, 2: 13, 3: 7}[dims]
        spatial = tuple(rng.randint(1, hi) for _ in range(dims))
        k = tuple(rng.randint(1, 4) for _ in range(dims))
        s = tuple(rng.randint(1, 3) for _ in range(dims))
        d = tuple(rng.randint(1, 2) if dilation else 1 for _ in range(dims))
        p = tuple(rng.randint(0, ki // 2) for ki in k)
        ceil = rng.random() < 0.5
        avg3d_ok = dilation or dims != 3 or all(i >= ki for i, ki in zip(spatial, k))  # torch's avg_pool3d rule
        if pool_case_ok(spatial, k, s, p, d, ceil) and avg3d_ok:
            cases.append((spatial, k, s, p, d, ceil))
    return cases


def case_id(case):
    spatial, k, s, p, d, ceil = case
    return f"{'x'.join(map(str, spatial))}-k{k}-s{s}-p{p}-d{d}-{'ceil' if ceil else 'floor'}".replace(" ", "")


MAX_CASES = GRID + random_cases(60, 1)
AVG_CASES = [(sp, k, s, p, tuple(1 for _ in k), c) for sp, k, s, p, _, c in GRID] + random_cases(60, 2, dilation=False)
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def pick(options, i):
    return options[i % len(options)]


# ------------------------------------------------------------------------------------------------
# max pool
# ------------------------------------------------------------------------------------------------

def run_max_pool(x, case, grad_output=None):
    spatial, k, s, p, d, ceil = case
    y, idx = ops.max_pool_forward(x, list(k), list(s), list(p), list(d), ceil)
    gi = None
    if grad_output is not None:
        gi = ops.max_pool_backward(grad_output, x, idx, list(k), list(s), list(p), list(d), ceil)
    return y, idx, gi


def torch_max_pool(x, case, grad_output=None):
    spatial, k, s, p, d, ceil = case
    fn = getattr(F, f"max_pool{len(k)}d")
    leaf = reference(x)
    y, idx = fn(leaf, k, s, p, d, ceil_mode=ceil, return_indices=True)
    gi = None
    if grad_output is not None:
        (gi,) = torch.autograd.grad(y, leaf, grad_output.to(leaf.dtype))
    return y.detach(), idx, gi


def overlap(case):
    """How many windows may cover one input element (reduction length of the max/avg grads)."""
    _, k, s, _, d, _ = case
    return math.prod(math.ceil(effective(ki, di) / si) for ki, si, di in zip(k, s, d))


def check_max_pool(case, dtype, layout, batch=2, channels=3):
    spatial = case[0]
    dims = len(spatial)
    x = make_tensor((batch, channels) + spatial, dtype, layout_for(dims, layout))
    ref_y, ref_idx, _ = torch_max_pool(x, case)
    g = make_tensor(ref_y.shape, dtype, layout_for(dims, layout))
    ref_y, ref_idx, ref_gi = torch_max_pool(x, case, g)
    y, idx, gi = run_max_pool(x, case, g)
    ctx = f"max_pool {case_id(case)} {layout} {dtype_id(dtype)}"
    assert y.dtype == dtype and idx.dtype == torch.int64, ctx
    assert torch.equal(y, ref_y.to(dtype)), f"{ctx}: values differ"
    assert torch.equal(idx, ref_idx), f"{ctx}: indices differ"
    assert_close_to_torch(gi, ref_gi, dtype, overlap(case), msg=f"{ctx}: grad_input")
    check_format(y, x, ctx)
    check_format(idx, x, ctx)
    check_format(gi, x, ctx)


@pytest.mark.parametrize("i,case", list(enumerate(MAX_CASES)), ids=[case_id(c) for c in MAX_CASES])
def test_max_pool_float32(i, case):
    check_max_pool(case, torch.float32, pick(LAYOUTS, i))


@pytest.mark.parametrize("dtype", [t for t in CPU_DTYPES if t != torch.float32], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_pool_dtypes(dtype, layout):
    for case in GRID[::2]:
        check_max_pool(case, dtype, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_max_pool_nan_and_inf(dims, layout):
    """NaN wins (the last NaN of a window), -inf windows point at their first tap, ties keep the
    first maximum: the indices equal torch's exactly."""
    case = {1: ((19,), (3,), (2,), (1,), (1,), True),
            2: ((9, 10), (3, 3), (2, 1), (1, 1), (1, 1), True),
            3: ((5, 6, 7), (2, 3, 2), (1, 2, 2), (1, 1, 0), (1, 1, 1), False)}[dims]
    x = make_tensor((2, 4) + case[0], torch.float32, layout_for(dims, layout))
    flat = x.view(-1) if x.is_contiguous() else x.permute(0, *range(2, x.dim()), 1).reshape(-1)
    n = flat.numel()
    with torch.no_grad():
        flat.copy_(torch.round(torch.randn(n) * 1.5))  # many ties
        flat[torch.randperm(n)[: n // 6]] = float("nan")
        flat[torch.randperm(n)[: n // 3]] = -float("inf")
    ref_y, ref_idx, _ = torch_max_pool(x, case)
    y, idx, _ = run_max_pool(x, case)
    torch.testing.assert_close(y, ref_y.to(torch.float32), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, ref_idx)
    ry, ridx = getattr(F, f"adaptive_max_pool{dims}d")(x, (3,) * dims, return_indices=True)
    ay, aidx = ops.adaptive_max_pool_forward(x, [3] * dims)
    torch.testing.assert_close(ay, ry, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(aidx, ridx)


# ------------------------------------------------------------------------------------------------
# average pool
# ------------------------------------------------------------------------------------------------

def torch_avg_pool(x, case, count_include_pad, divisor_override, grad_output=None):
    spatial, k, s, p, _, ceil = case
    leaf = reference(x)
    dims = len(k)
    if dims == 1:  # F.avg_pool1d has no divisor_override: avg_pool2d over a unit height
        y = F.avg_pool2d(leaf.unsqueeze(2), (1, k[0]), (1, s[0]), (0, p[0]), ceil, count_include_pad,
                         divisor_override).squeeze(2)
    else:
        y = getattr(F, f"avg_pool{dims}d")(leaf, k, s, p, ceil, count_include_pad, divisor_override)
    gi = None
    if grad_output is not None:
        (gi,) = torch.autograd.grad(y, leaf, grad_output.to(leaf.dtype))
    return y.detach(), gi


def check_avg_pool(case, dtype, layout, count_include_pad, divisor_override, batch=2, channels=3):
    spatial, k, s, p, _, ceil = case
    dims = len(spatial)
    x = make_tensor((batch, channels) + spatial, dtype, layout_for(dims, layout))
    ref_y, _ = torch_avg_pool(x, case, count_include_pad, divisor_override)
    g = make_tensor(ref_y.shape, dtype, layout_for(dims, layout))
    ref_y, ref_gi = torch_avg_pool(x, case, count_include_pad, divisor_override, g)
    args = (list(k), list(s), list(p), ceil, count_include_pad, divisor_override or 0)
    y = ops.avg_pool_forward(x, *args)
    gi = ops.avg_pool_backward(g, x, *args)
    ctx = f"avg_pool {case_id(case)} {layout} {dtype_id(dtype)} pad={count_include_pad} div={divisor_override}"
    assert_close_to_torch(y, ref_y, dtype, 1, msg=f"{ctx}: output")
    assert_close_to_torch(gi, ref_gi, dtype, overlap(case), msg=f"{ctx}: grad_input")
    check_format(y, x, ctx)
    check_format(gi, x, ctx)


@pytest.mark.parametrize("i,case", list(enumerate(AVG_CASES)), ids=[case_id(c) for c in AVG_CASES])
def test_avg_pool_float32(i, case):
    check_avg_pool(case, torch.float32, pick(LAYOUTS, i), count_include_pad=bool(i % 2),
                   divisor_override=pick([None, None, None, 3, 7, -2, None, -5], i))


@pytest.mark.parametrize("dtype", [t for t in CPU_DTYPES if t != torch.float32], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_avg_pool_dtypes(dtype, layout):
    for i, case in enumerate(AVG_CASES[:len(GRID)]):
        if dtype == torch.float16 and len(case[0]) == 3:
            pass  # torch has no float16 avg_pool3d on the CPU; the reference runs in float32 anyway
        check_avg_pool(case, dtype, layout, count_include_pad=bool(i % 2),
                       divisor_override=pick([None, None, 5, -3], i))


# ------------------------------------------------------------------------------------------------
# adaptive pools
# ------------------------------------------------------------------------------------------------

ADAPTIVE_CASES = [  # (input spatial, output size)
    ((56, 56), (1, 1)), ((56, 56), (7, 7)), ((7, 9), (3, 4)), ((5, 5), (7, 8)), ((10, 11), (10, 11)),
    ((6, 7), (0, 3)), ((9,), (4,)), ((13,), (1,)), ((3,), (5,)), ((5, 6, 7), (2, 3, 4)),
    ((4, 4, 4), (1, 1, 1)), ((3, 5, 4), (4, 2, 3)),
]


def adaptive_id(case):
    return f"{'x'.join(map(str, case[0]))}-to-{'x'.join(map(str, case[1]))}"


EMPTY_GRAD_OUTPUT = "non-zero size for non-batch dimensions"


def check_adaptive_empty_backward(x, y, leaf, ref_y, ctx):
    """An empty output (output size 0): the forwards match torch's shapes, and the backwards
    reject the empty grad_output as torch's do."""
    assert y.shape == ref_y.shape, f"{ctx}: avg output shape"
    ref_max, ref_idx = getattr(F, f"adaptive_max_pool{x.dim() - 2}d")(leaf, ref_y.shape[2:], return_indices=True)
    y_max, idx = ops.adaptive_max_pool_forward(x, list(ref_y.shape[2:]))
    assert y_max.shape == idx.shape == ref_max.shape, f"{ctx}: max output shape"
    g = torch.zeros(ref_y.shape, dtype=x.dtype)
    for ref_out in (ref_y, ref_max):
        with pytest.raises(RuntimeError, match=EMPTY_GRAD_OUTPUT):
            torch.autograd.grad(ref_out, leaf, g.to(leaf.dtype))
    with pytest.raises(RuntimeError, match=EMPTY_GRAD_OUTPUT):
        ops.adaptive_avg_pool_backward(g, x)
    with pytest.raises(RuntimeError, match=EMPTY_GRAD_OUTPUT):
        ops.adaptive_max_pool_backward(g, x, idx)


def check_adaptive(case, dtype, layout, batch=2, channels=3):
    spatial, osize = case
    dims = len(spatial)
    x = make_tensor((batch, channels) + spatial, dtype, layout_for(dims, layout))
    ctx = f"adaptive {adaptive_id(case)} {layout} {dtype_id(dtype)}"
    # average
    leaf = reference(x)
    ref_y = getattr(F, f"adaptive_avg_pool{dims}d")(leaf, osize)
    y = ops.adaptive_avg_pool_forward(x, list(osize))
    if ref_y.numel() == 0:
        check_adaptive_empty_backward(x, y, leaf, ref_y, ctx)
        return
    g = make_tensor(ref_y.shape, dtype, layout_for(dims, layout))
    (ref_gi,) = torch.autograd.grad(ref_y, leaf, g.to(leaf.dtype))
    gi = ops.adaptive_avg_pool_backward(g, x)
    window = math.prod(math.ceil(i / o) + 1 if o else 1 for i, o in zip(spatial, osize))
    assert_close_to_torch(y, ref_y.detach(), dtype, 1, msg=f"{ctx}: avg output")
    assert_close_to_torch(gi, ref_gi, dtype, window, msg=f"{ctx}: avg grad_input")
    check_format(y, x, ctx)
    check_format(gi, x, ctx)
    # max
    leaf = reference(x)
    ref_y, ref_idx = getattr(F, f"adaptive_max_pool{dims}d")(leaf, osize, return_indices=True)
    (ref_gi,) = torch.autograd.grad(ref_y, leaf, g.to(leaf.dtype))
    y, idx = ops.adaptive_max_pool_forward(x, list(osize))
    gi = ops.adaptive_max_pool_backward(g, x, idx)
    assert torch.equal(y, ref_y.detach().to(dtype)), f"{ctx}: max values differ"
    assert torch.equal(idx, ref_idx), f"{ctx}: max indices differ"
    assert_close_to_torch(gi, ref_gi, dtype, window, msg=f"{ctx}: max grad_input")
    check_format(y, x, ctx)
    check_format(idx, x, ctx)
    check_format(gi, x, ctx)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=adaptive_id)
def test_adaptive_pools(case, layout):
    check_adaptive(case, torch.float32, layout)


@pytest.mark.parametrize("dtype", [t for t in CPU_DTYPES if t != torch.float32], ids=dtype_id)
def test_adaptive_pools_dtypes(dtype):
    for i, case in enumerate(ADAPTIVE_CASES):
        check_adaptive(case, dtype, pick(LAYOUTS, i))


def test_adaptive_zero_channels():
    x = torch.randn(2, 0, 5, 5)
    assert ops.adaptive_avg_pool_forward(x, [2, 3]).shape == (2, 0, 2, 3)
    y, idx = ops.adaptive_max_pool_forward(x, [2, 3])
    assert y.shape == idx.shape == (2, 0, 2, 3)
    # torch's backwards reject the empty grad_output (dimension 1 being empty); so do cnnops'
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match=EMPTY_GRAD_OUTPUT):
        F.adaptive_avg_pool2d(leaf, (2, 3)).sum().backward()
    with pytest.raises(RuntimeError, match=EMPTY_GRAD_OUTPUT):
        ops.adaptive_avg_pool_backward(torch.randn(2, 0, 2, 3), x)
    with pytest.raises(RuntimeError, match=EMPTY_GRAD_OUTPUT):
        ops.adaptive_max_pool_backward(torch.randn(2, 0, 2, 3), x, idx)


# ------------------------------------------------------------------------------------------------
# max unpool
# ------------------------------------------------------------------------------------------------

def torch_max_unpool(x, idx, osize, stride, padding):
    """aten's max_unpool (F.max_unpool*d would also reject output sizes a pool could not give)."""
    if len(osize) == 1:
        return torch.ops.aten.max_unpool2d(x.unsqueeze(-1), idx.unsqueeze(-1), [osize[0], 1]).squeeze(-1)
    if len(osize) == 2:
        return torch.ops.aten.max_unpool2d(x, idx, list(osize))
    return torch.ops.aten.max_unpool3d(x, idx, list(osize), list(stride), list(padding))


# float32 on every grid case, the other dtypes on every third (runtime)
UNPOOL_PARAMS = [(i, case, dtype) for i, case in enumerate(GRID) for dtype in CPU_DTYPES
                 if dtype == torch.float32 or i % 3 == 0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("i,case,dtype", UNPOOL_PARAMS,
                         ids=[f"{case_id(c)}-{dtype_id(t)}" for _, c, t in UNPOOL_PARAMS])
def test_max_unpool(i, case, dtype, layout):
    spatial, k, s, p, d, ceil = case
    dims = len(spatial)
    x = make_tensor((2, 3) + spatial, dtype, layout_for(dims, layout))
    pooled, idx = getattr(F, f"max_pool{dims}d")(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
    extra = tuple(i % 2 for _ in spatial)  # output_size a little larger than the pooled input
    osize = tuple(a + b for a, b in zip(spatial, extra))
    leaf = reference(pooled)
    ref = torch_max_unpool(leaf, idx, osize, s, p)
    g = make_tensor(ref.shape, dtype, layout_for(dims, layout))
    (ref_gi,) = torch.autograd.grad(ref, leaf, g.to(leaf.dtype))
    out = ops.max_unpool_forward(pooled, idx, list(osize))
    gi = ops.max_unpool_backward(g, pooled, idx)
    ctx = f"max_unpool {case_id(case)} {layout} {dtype_id(dtype)}"
    assert torch.equal(out, ref.detach().to(dtype)), ctx
    assert torch.equal(gi, ref_gi.to(dtype)), ctx
    check_format(out, pooled, ctx)
    check_format(gi, pooled, ctx)


def test_max_unpool_duplicate_indices_last_wins():
    """With overlapping windows the same index can appear twice; torch run serially keeps the
    last write (its parallel loop splits planes between threads), cnnops always does."""
    x = torch.randn(1, 2, 9, 9)
    pooled, idx = F.max_pool2d(x, 3, 1, return_indices=True)
    values = torch.randn_like(pooled)
    threads = torch.get_num_threads()
    for fmt in (torch.contiguous_format, torch.channels_last):
        v, i = values.contiguous(memory_format=fmt), idx.contiguous(memory_format=fmt)
        try:
            torch.set_num_threads(1)
            expected = F.max_unpool2d(v, i, 3, 1, output_size=(9, 9))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(ops.max_unpool_forward(v, i, [9, 9]), expected)


# ------------------------------------------------------------------------------------------------
# batch 0 and 1, non-contiguous layouts, determinism
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [0, 1])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_small_batches(batch, dims):
    x = torch.randn((batch, 3) + (6,) * dims)
    k, s, p, d = [3] * dims, [2] * dims, [1] * dims, [1] * dims
    y, idx = ops.max_pool_forward(x, k, s, p, d, True)
    ry, ridx = getattr(F, f"max_pool{dims}d")(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert y.shape == ry.shape and torch.equal(y, ry) and torch.equal(idx, ridx)
    gi = ops.max_pool_backward(torch.ones_like(y), x, idx, k, s, p, d, True)
    assert gi.shape == x.shape
    a = ops.avg_pool_forward(x, k, s, p, True, True, 0)
    assert a.shape == ry.shape
    assert ops.avg_pool_backward(torch.ones_like(a), x, k, s, p, True, True, 0).shape == x.shape
    assert ops.adaptive_avg_pool_forward(x, [2] * dims).shape == (batch, 3) + (2,) * dims
    ay, ai = ops.adaptive_max_pool_forward(x, [2] * dims)
    assert ops.adaptive_max_pool_backward(torch.ones_like(ay), x, ai).shape == x.shape
    u = ops.max_unpool_forward(y, idx, [6] * dims)
    assert u.shape == x.shape
    assert ops.max_unpool_backward(u, y, idx).shape == y.shape


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_layouts(layout):
    case = ((9, 8), (3, 2), (2, 2), (1, 1), (1, 1), True)
    check_max_pool(case, torch.float32, layout)
    check_avg_pool(case, torch.float32, layout, True, None)
    check_adaptive(((9, 8), (4, 3)), torch.float32, layout)


def run_everything(x, g_max, g_ad):
    k, s, p, d = [3, 3], [2, 2], [1, 1], [1, 1]
    y, idx = ops.max_pool_forward(x, k, s, p, d, False)
    out = [y, idx, ops.max_pool_backward(g_max, x, idx, k, s, p, d, False),
           ops.avg_pool_forward(x, k, s, p, False, True, 0), ops.avg_pool_backward(g_max, x, k, s, p, False, True, 0)]
    ay, aidx = ops.adaptive_max_pool_forward(x, [5, 6])
    out += [ay, aidx, ops.adaptive_max_pool_backward(g_ad, x, aidx),
            ops.adaptive_avg_pool_forward(x, [5, 6]), ops.adaptive_avg_pool_backward(g_ad, x)]
    u = ops.max_unpool_forward(y, idx, [23, 21])
    out += [u, ops.max_unpool_backward(u, y, idx)]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_thread_count_independent(layout, dtype):
    x = make_tensor((3, 40, 23, 21), dtype, layout)
    g_max = make_tensor((3, 40, 12, 11), dtype, layout)
    g_ad = make_tensor((3, 40, 5, 6), dtype, layout)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_everything(x, g_max, g_ad)
        torch.set_num_threads(max(threads, 2))
        many = run_everything(x, g_max, g_ad)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# bad input: an error, never an out-of-bounds access
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bad", [-1, 36, 2**40, -(2**62)])
def test_invalid_indices_raise(bad, layout):
    x = make_tensor((2, 3, 6, 6), torch.float32, layout)
    y, idx = ops.max_pool_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    idx = idx.clone()
    idx[1, 2, 1, 2] = bad
    g = torch.ones_like(y)
    with pytest.raises(RuntimeError, match="index"):
        ops.max_pool_backward(g, x, idx, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="index"):
        ops.adaptive_max_pool_backward(g, x, idx)
    with pytest.raises(RuntimeError, match="Found an invalid max index"):
        ops.max_unpool_forward(y, idx, [6, 6])
    with pytest.raises(RuntimeError, match="Found an invalid max index"):
        ops.max_unpool_backward(torch.ones_like(x), y, idx)
    with pytest.raises(RuntimeError, match="Found an invalid max index"):  # too small an output
        ops.max_unpool_forward(y, idx.clamp(0, 35), [5, 5])


def test_bad_arguments_raise():
    x = torch.randn(2, 3, 8, 8)
    bad = [
        lambda: ops.max_pool_forward(x, [0, 2], [2, 2], [0, 0], [1, 1], False),
        lambda: ops.max_pool_forward(x, [2, 2], [0, 2], [0, 0], [1, 1], False),
        lambda: ops.max_pool_forward(x, [2, 2], [2, 2], [0, 0], [0, 1], False),
        lambda: ops.max_pool_forward(x, [2, 2], [2, 2], [2, 0], [1, 1], False),  # pad > kernel/2
        lambda: ops.max_pool_forward(x, [2, 2], [2], [0, 0], [1, 1], False),
        lambda: ops.max_pool_forward(x, [9, 9], [1, 1], [0, 0], [1, 1], False),  # empty output
        lambda: ops.max_pool_forward(x[0], [2, 2], [2, 2], [0, 0], [1, 1], False),  # unbatched
        lambda: ops.max_pool_forward(x[:, :, :0], [2, 2], [2, 2], [0, 0], [1, 1], False),
        lambda: ops.avg_pool_forward(x, [3, 3], [1, 1], [2, 2], False, True, 0),
        lambda: ops.avg_pool_backward(torch.randn(2, 3, 3, 3), x, [2, 2], [2, 2], [0, 0], False, True, 0),
        lambda: ops.avg_pool_forward(torch.randn(1, 1, 1, 3, 5), [2, 1, 2], [2, 1, 1], [1, 0, 0], False, True, 0),
        lambda: ops.adaptive_avg_pool_forward(x, [-1, 2]),
        lambda: ops.adaptive_avg_pool_forward(x[:, :, :0], [2, 2]),
        lambda: ops.adaptive_avg_pool_backward(torch.randn(2, 3, 2), x),
        lambda: ops.max_pool_backward(torch.randn(2, 3, 4, 4), x, torch.zeros(2, 3, 4, 4, dtype=torch.int32),
                                      [2, 2], [2, 2], [0, 0], [1, 1], False),
        lambda: ops.max_unpool_forward(x, torch.zeros(2, 3, 8, 7, dtype=torch.long), [16, 16]),
        lambda: ops.max_unpool_forward(x, torch.zeros(2, 3, 8, 8, dtype=torch.long), [16]),
        lambda: ops.max_unpool_backward(torch.randn(2, 4, 16, 16), x, torch.zeros(2, 3, 8, 8, dtype=torch.long)),
    ]
    for i, fn in enumerate(bad):
        with pytest.raises(RuntimeError):
            fn()
            pytest.fail(f"bad argument case {i} did not raise")


def test_integer_input_not_implemented():
    with pytest.raises(NotImplementedError):
        ops.max_pool_forward(torch.ones(1, 1, 4, 4, dtype=torch.int64), [2, 2], [2, 2], [0, 0], [1, 1], False)
