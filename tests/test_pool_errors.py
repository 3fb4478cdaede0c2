"""Argument validation of cnnops.functional's pools: what torch.nn.functional rejects, cnnops
rejects with the same exception type (taken from torch inside each test) and a message naming
the argument. Bad indices for max unpool raise, never write out of bounds."""

import re

import pytest
import torch
import torch.nn.functional as F

import cnnops  # noqa: F401  (registers torch.ops.cnnops)
import cnnops.functional as CF

DIMS = [1, 2, 3]


def x_of(dims, n=2, c=3, size=8):
    return torch.randn((n, c) + (size,) * dims)


def fn(module, op, dims):
    return getattr(module, f"{op}{dims}d")


def torch_exception(f, args, kwargs):
    try:
        f(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return e
    return None


# name -> (builder(dims) -> (args, kwargs), regex the message must match: it names the argument)
def _with(**kw):
    def build(d):
        return (x_of(d),), {k: (v(d) if callable(v) else v) for k, v in kw.items()}
    return build


def _input(shape_fn, **kw):
    def build(d):
        return (torch.randn(shape_fn(d)),), dict(kw)
    return build


WINDOW_CASES = {
    "kernel_zero": (_with(kernel_size=0), r"kernel|stride"),
    "kernel_negative": (_with(kernel_size=-1), r"kernel"),
    "kernel_negative_in_tuple": (_with(kernel_size=lambda d: (2,) * (d - 1) + (-2,)), r"kernel"),
    "kernel_float": (_with(kernel_size=2.0), r"kernel"),
    "kernel_bool": (_with(kernel_size=True), r"kernel"),
    "kernel_tuple_too_long": (_with(kernel_size=lambda d: (2,) * (d + 1)), r"kernel"),
    "stride_zero": (_with(kernel_size=2, stride=0), r"stride"),
    "stride_negative": (_with(kernel_size=2, stride=-1), r"stride"),
    "stride_tuple_too_long": (_with(kernel_size=2, stride=lambda d: (1,) * (d + 1)), r"stride"),
    "stride_none_in_tuple": (_with(kernel_size=2, stride=(None,)), r"stride"),
    "padding_negative": (_with(kernel_size=3, padding=-1), r"pad"),
    "padding_over_half_kernel": (_with(kernel_size=3, padding=2), r"pad"),
    "padding_over_half_kernel_tuple": (_with(kernel_size=lambda d: (3, 3, 4)[:d],
                                             padding=lambda d: (1,) * (d - 1) + (3,)), r"pad"),
    "padding_tuple_too_long": (_with(kernel_size=3, padding=lambda d: (1,) * (d + 1)), r"pad"),
    "output_too_small": (_with(kernel_size=9), r"output size|too small|kernel"),
    "output_too_small_with_stride": (_with(kernel_size=(3, 3, 9), stride=2), r"output size|too small|kernel"),
    "ceil_mode_int": (_with(kernel_size=2, ceil_mode=1), r"ceil_mode"),
    "input_rank_too_low": (_input(lambda d: (8,) * d, kernel_size=2), r"input|dimension"),
    "input_rank_too_high": (_input(lambda d: (1, 2, 3) + (8,) * d, kernel_size=2), r"input"),
    "input_zero_channels": (_input(lambda d: (2, 0) + (8,) * d, kernel_size=2), r"input|tensor|dimension"),
    "input_zero_spatial": (_input(lambda d: (2, 3) + (8,) * (d - 1) + (0,), kernel_size=2), r"input|tensor|dimension"),
}
MAX_ONLY = {
    "dilation_zero": (_with(kernel_size=2, dilation=0), r"dilation"),
    "dilation_negative_in_tuple": (_with(kernel_size=2, dilation=lambda d: (1,) * (d - 1) + (-1,)), r"dilation"),
    "dilation_tuple_too_long": (_with(kernel_size=2, dilation=lambda d: (1,) * (d + 1)), r"dilation"),
    # torch bounds padding by half the kernel itself, not the dilated window
    "padding_over_half_kernel_dilated": (_with(kernel_size=3, padding=2, dilation=2), r"pad"),
    "output_too_small_dilated": (_with(kernel_size=3, dilation=4), r"output size|too small|kernel"),
}
AVG_ONLY = {
    "count_include_pad_int": (_with(kernel_size=2, count_include_pad=0), r"count_include_pad"),
}
AVG_23 = {
    "divisor_zero": (_with(kernel_size=2, divisor_override=0), r"divisor"),
    "divisor_float": (_with(kernel_size=2, divisor_override=2.0), r"divisor"),
    "divisor_bool": (_with(kernel_size=2, divisor_override=True), r"divisor"),
}


def assert_same_error(torch_fn, cnnops_fn, args, kwargs, pattern, case):
    expected = torch_exception(torch_fn, args, kwargs)
    assert expected is not None, f"torch accepted case {case}; the test case is wrong"
    with pytest.raises(Exception) as info:
        cnnops_fn(*args, **kwargs)
    got = info.value
    assert type(got) is type(expected), (
        f"{case}: torch raises {type(expected).__name__}({expected}), cnnops raises {type(got).__name__}({got})")
    assert re.search(pattern, str(got), re.IGNORECASE), \
        f"{case}: message does not name the argument ({pattern!r}): {got}"


POOL_CASES = [("max_pool", k) for k in {**WINDOW_CASES, **MAX_ONLY}] + \
    [("avg_pool", k) for k in {**WINDOW_CASES, **AVG_ONLY, **AVG_23}]
ALL_CASES = {**WINDOW_CASES, **MAX_ONLY, **AVG_ONLY, **AVG_23}


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("dims", DIMS)
def test_pool_rejects_like_torch(dims, case):
    op, name = case
    build, pattern = ALL_CASES[name]
    if name in AVG_23 and dims == 1:
        pytest.skip("avg_pool1d has no divisor_override")
    args, kwargs = build(dims)
    assert_same_error(fn(F, op, dims), fn(CF, op, dims), args, kwargs, pattern, f"{op}{dims}d {name}")


# adaptive pools: name -> (builder, pattern)
ADAPTIVE_CASES = {
    "negative": (lambda d: ((x_of(d), -1), {}), r"output_size|negative"),
    "negative_in_tuple": (lambda d: ((x_of(d), (2,) * (d - 1) + (-1,)), {}), r"output_size|negative"),
    "none": (lambda d: ((x_of(d), None), {}), r"output_size"),
    "none_in_tuple_1d": (lambda d: ((x_of(d), (None,)), {}), r"output_size"),
    "float": (lambda d: ((x_of(d), 2.0), {}), r"output_size"),
    "tuple_too_long": (lambda d: ((x_of(d), (2,) * (d + 1)), {}), r"output_size"),
    "tuple_too_short": (lambda d: ((x_of(d), (2,) * (d - 1)), {}), r"output_size"),
    "rank_too_low": (lambda d: ((torch.randn((8,) * d), 2), {}), r"input|dimension|tensor"),
    "rank_too_low_tuple": (lambda d: ((torch.randn((8,) * d), (2,) * d), {}), r"input|dimension|tensor"),
    "rank_too_high": (lambda d: ((torch.randn((1, 2, 3) + (8,) * d), 2), {}), r"input|dimension|tensor"),
    "zero_spatial": (lambda d: ((torch.randn((2, 3) + (8,) * (d - 1) + (0,)), 2), {}), r"input|size|dimension"),
    "zero_channels": (lambda d: ((torch.randn((2, 0) + (8,) * d), 2), {}), r"input|size|dimension"),
}


@pytest.mark.parametrize("case", list(ADAPTIVE_CASES))
@pytest.mark.parametrize("op", ["adaptive_avg_pool", "adaptive_max_pool"])
@pytest.mark.parametrize("dims", DIMS)
def test_adaptive_rejects_like_torch(dims, op, case):
    build, pattern = ADAPTIVE_CASES[case]
    if case == "tuple_too_short" and dims == 1:
        pytest.skip("an empty tuple for 1d")
    args, kwargs = build(dims)
    if torch_exception(fn(F, op, dims), args, kwargs) is None:
        # torch accepts it (zero channels for adaptive_avg_pool1d/2d, a 1-tuple for 1d...): so must cnnops
        out = fn(CF, op, dims)(*args, **kwargs)
        assert out.shape == fn(F, op, dims)(*args, **kwargs).shape
        return
    assert_same_error(fn(F, op, dims), fn(CF, op, dims), args, kwargs, pattern, f"{op}{dims}d {case}")


def unpool_args(dims, size=8, kernel=2):
    x = x_of(dims, size=size)
    y, idx = fn(F, "max_pool", dims)(x, kernel, return_indices=True)
    return y, idx


UNPOOL_CASES = {
    "output_size_too_small": (lambda d: ((*unpool_args(d), 2), dict(output_size=(3,) * d)), r"output_size"),
    "output_size_too_large": (lambda d: ((*unpool_args(d), 2), dict(output_size=(10,) * d)), r"output_size"),
    "output_size_wrong_length": (lambda d: ((*unpool_args(d), 2), dict(output_size=(8,) * (d + 1))), r"output_size"),
    "output_size_int": (lambda d: ((*unpool_args(d), 2), dict(output_size=8)), r"output_size|len"),
    "default_size_negative": (lambda d: ((*unpool_args(d), 1, 1, 3), {}), r"output_size|index|max"),
    "indices_out_of_range": (lambda d: ((unpool_args(d)[0], torch.full_like(unpool_args(d)[1], 10_000), 2), {}),
                             r"ind"),
    "indices_negative": (lambda d: ((unpool_args(d)[0], torch.full_like(unpool_args(d)[1], -1), 2), {}), r"ind"),
    "indices_wrong_shape": (lambda d: ((unpool_args(d)[0], unpool_args(d)[1][:1], 2), {}), r"ind"),
    "indices_int32": (lambda d: ((unpool_args(d)[0], unpool_args(d)[1].int(), 2), {}), r"ind"),
    "indices_float": (lambda d: ((unpool_args(d)[0], unpool_args(d)[1].float(), 2), {}), r"ind"),
    "kernel_float": (lambda d: ((*unpool_args(d), 2.5), {}), r"output_size|kernel"),
    "rank_too_low": (lambda d: ((unpool_args(d)[0][0, 0], unpool_args(d)[1][0, 0], 2), {}), r"input|tensor|dim"),
    "stride_empty": (lambda d: ((*unpool_args(d), 2, ()), {}), r"stride|index|range"),
    "stride_zero": (lambda d: ((*unpool_args(d), 2, 0), {}), r"stride|ind"),
}


@pytest.mark.parametrize("case", list(UNPOOL_CASES))
@pytest.mark.parametrize("dims", DIMS)
def test_max_unpool_rejects_like_torch(dims, case):
    build, pattern = UNPOOL_CASES[case]
    if case == "rank_too_low" and dims == 1:
        pytest.skip("a 1-d input for unpool1d is a different (IndexError) path")
    args, kwargs = build(dims)
    assert_same_error(fn(F, "max_unpool", dims), fn(CF, "max_unpool", dims), args, kwargs, pattern,
                      f"max_unpool{dims}d {case}")


@pytest.mark.parametrize("dims", DIMS)
def test_max_unpool_bad_indices_never_write_out_of_bounds(dims):
    """Indices just past the plane, in the last plane of the batch: an error, and the raw op
    too (no write past the output's end)."""
    y, idx = unpool_args(dims)
    bad = idx.clone()
    bad.view(-1)[-1] = 8 ** dims
    with pytest.raises(RuntimeError, match="(?i)ind"):
        fn(CF, "max_unpool", dims)(y, bad, 2)
    with pytest.raises(RuntimeError):
        torch.ops.cnnops.max_unpool_forward(y, bad, [8] * dims)
    with pytest.raises(RuntimeError):
        torch.ops.cnnops.max_unpool_backward(torch.randn((2, 3) + (8,) * dims), y, bad)


@pytest.mark.parametrize("op", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_integer_dtypes_match_torch_or_not_implemented(dtype, op):
    """torch computes some integer pools. DESIGN.md: what torch accepts and cnnops cannot do
    raises NotImplementedError; a wrong result is the worst outcome."""
    x = torch.randint(-5, 6, (2, 3, 6, 6), dtype=dtype)
    kw = dict(kernel_size=2) if op in ("max_pool", "avg_pool") else dict(output_size=3)
    try:
        expected = fn(F, op, 2)(x, **kw)
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e)):
            fn(CF, op, 2)(x, **kw)
        return
    try:
        actual = fn(CF, op, 2)(x, **kw)
    except NotImplementedError as e:
        assert "dtype" in str(e)
        return
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)


@pytest.mark.parametrize("dims", DIMS)
def test_errors_also_raised_with_grad(dims):
    """Validation is not skipped on the autograd path."""
    x = x_of(dims).requires_grad_()
    with pytest.raises(RuntimeError, match="(?i)stride"):
        fn(CF, "max_pool", dims)(x, 2, stride=0)
    with pytest.raises(RuntimeError, match="(?i)pad"):
        fn(CF, "avg_pool", dims)(x, 3, padding=2)


def test_unpool_empty_output_like_torch():
    """kernel 0 (1d/2d) gives an empty default output size in torch (which then ignores the
    indices); cnnops must agree or say it cannot (NotImplementedError, never a wrong shape)."""
    for dims in (1, 2):
        y, idx = unpool_args(dims)
        expected = fn(F, "max_unpool", dims)(y, idx, 0)
        try:
            out = fn(CF, "max_unpool", dims)(y, idx, 0)
        except NotImplementedError as e:
            assert "output_size" in str(e)
            continue
        assert out.shape == expected.shape
