"""Argument validation: cnnops rejects what torch.nn.functional.conv*d rejects, with the same
exception type (taken from torch inside each test) and a message naming the argument. The raw
ops reject bad arguments with RuntimeError instead of reading out of bounds."""

import re

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional
from conftest import conv_fn, dtype_id

DIMS = [1, 2, 3]


def shapes(dims, n=2, cin=4, cout=6, size=8, k=3):
    return (n, cin) + (size,) * dims, (cout, cin) + (k,) * dims


def xwb(dims, **kw):
    xs, ws = shapes(dims, **kw)
    return torch.randn(xs), torch.randn(ws), torch.randn(ws[0])


# name -> (builder(dims) -> (args, kwargs), regex the message must contain (names the argument))
def _case_rank_high(d):
    x, w, b = xwb(d)
    return (x.unsqueeze(0), w, b), {}


def _case_rank_low(d):
    x, w, b = xwb(d)
    return (x[0, 0], w, b), {}


def _case_channels(d):
    x, w, b = xwb(d)
    return (torch.randn((2, 5) + x.shape[2:]), w, b), {}


def _case_channels_unbatched(d):
    x, w, b = xwb(d)
    return (torch.randn((5,) + x.shape[2:]), w, b), {}


def _case_groups_channels(d):
    x, w, b = xwb(d)  # 4 input channels, weight expects 4 per group -> 8 with groups=2
    return (x, torch.randn((6, 4) + w.shape[2:]), b), dict(groups=2)


def _case_groups_not_dividing_out(d):
    x, _, _ = xwb(d)
    w = torch.randn((5, 2) + (3,) * d)
    return (x, w, torch.randn(5)), dict(groups=2)


def _case_with(**kwargs):
    def build(d):
        x, w, b = xwb(d)
        return (x, w, b), {k: (v(d) if callable(v) else v) for k, v in kwargs.items()}
    return build


def _case_kernel_too_big(d):
    x, w, b = xwb(d, size=2)
    return (x, w, b), {}


def _case_kernel_too_big_dilated(d):
    x, w, b = xwb(d, size=5)
    return (x, w, b), dict(dilation=3, padding=0)


def _case_dtype_weight(d):
    x, w, b = xwb(d)
    return (x, w.double(), b), {}


def _case_dtype_bias(d):
    x, w, b = xwb(d)
    return (x, w, b.double()), {}


def _case_bias_size(d):
    x, w, b = xwb(d)
    return (x, w, torch.randn(5)), {}


def _case_bias_rank(d):
    x, w, b = xwb(d)
    return (x, w, torch.randn(6, 1)), {}


def _case_weight_rank(d):
    x, w, b = xwb(d)
    return (x, w[..., 0], b), {}


CASES = {
    "input_rank_too_high": (_case_rank_high, r"input"),
    "input_rank_too_low": (_case_rank_low, r"input"),
    "channel_mismatch": (_case_channels, r"channels"),
    "channel_mismatch_unbatched": (_case_channels_unbatched, r"channels"),
    "channel_mismatch_groups": (_case_groups_channels, r"channels"),
    "groups_not_dividing_out_channels": (_case_groups_not_dividing_out, r"groups"),
    "groups_zero": (_case_with(groups=0), r"groups"),
    "groups_negative": (_case_with(groups=-2), r"groups"),
    "stride_zero": (_case_with(stride=0), r"stride"),
    "stride_negative_in_tuple": (_case_with(stride=lambda d: (1,) * (d - 1) + (-1,)), r"stride"),
    "padding_negative": (_case_with(padding=-1), r"padding"),
    "padding_negative_in_tuple": (_case_with(padding=lambda d: (-1,) + (0,) * (d - 1)), r"padding"),
    "dilation_zero": (_case_with(dilation=0), r"dilation"),
    "dilation_negative_in_tuple": (_case_with(dilation=lambda d: (1,) * (d - 1) + (-2,)), r"dilation"),
    "kernel_larger_than_padded_input": (_case_kernel_too_big, r"kernel"),
    "dilated_kernel_larger_than_padded_input": (_case_kernel_too_big_dilated, r"kernel"),
    "same_with_stride": (_case_with(padding="same", stride=2), r"same"),
    "same_with_stride_tuple": (_case_with(padding="same", stride=lambda d: (1,) * (d - 1) + (2,)), r"same"),
    "invalid_padding_string": (_case_with(padding="foo"), r"padding"),
    "invalid_padding_string_case": (_case_with(padding="SAME"), r"padding"),
    "dtype_mismatch_weight": (_case_dtype_weight, r"weight"),
    "dtype_mismatch_bias": (_case_dtype_bias, r"bias"),
    "bias_wrong_size": (_case_bias_size, r"bias"),
    "bias_wrong_rank": (_case_bias_rank, r"bias"),
    "stride_tuple_too_long": (_case_with(stride=lambda d: (1,) * (d + 1)), r"stride"),
    "padding_tuple_too_long": (_case_with(padding=lambda d: (1,) * (d + 1)), r"padding"),
    "dilation_tuple_too_long": (_case_with(dilation=lambda d: (1,) * (d + 1)), r"dilation"),
    "weight_rank_wrong": (_case_weight_rank, r"weight|input|stride|kernel|dimension"),
}


def torch_exception(fn, args, kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return e
    return None


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dims", DIMS)
def test_rejects_like_torch(dims, case):
    build, pattern = CASES[case]
    if case == "weight_rank_wrong" and dims == 1:
        pytest.skip("a 2-d weight is no convolution at all")
    args, kwargs = build(dims)
    expected = torch_exception(conv_fn(F, dims), args, kwargs)
    assert expected is not None, f"torch accepted case {case}; the test case is wrong"
    with pytest.raises(Exception) as info:
        conv_fn(cnnops.functional, dims)(*args, **kwargs)
    got = info.value
    assert type(got) is type(expected), (
        f"{case}: torch raises {type(expected).__name__}({expected}), cnnops raises {type(got).__name__}({got})")
    assert re.search(pattern, str(got), re.IGNORECASE), (
        f"{case}: message does not name the argument ({pattern!r}): {got}")


@pytest.mark.parametrize("dims", DIMS)
def test_errors_also_raised_without_grad_and_with_grad(dims):
    """Validation is not skipped on the autograd path."""
    x, w, b = xwb(dims)
    x.requires_grad_()
    w.requires_grad_()
    with pytest.raises(RuntimeError, match="(?i)stride"):
        conv_fn(cnnops.functional, dims)(x, w, b, stride=0)
    with pytest.raises(RuntimeError, match="(?i)channels"):
        conv_fn(cnnops.functional, dims)(x[:, :3], w, b)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=dtype_id)
def test_integer_dtypes_match_torch_or_not_implemented(dtype):
    """torch's CPU conv accepts integer tensors. DESIGN.md: what torch accepts and cnnops cannot
    do yet raises NotImplementedError; a wrong result is the worst outcome."""
    x = torch.randint(-3, 4, (2, 3, 6, 5), dtype=dtype)
    w = torch.randint(-3, 4, (4, 3, 3, 3), dtype=dtype)
    b = torch.randint(-3, 4, (4,), dtype=dtype)
    try:
        expected = F.conv2d(x, w, b, padding=1)
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e)):
            cnnops.functional.conv2d(x, w, b, padding=1)
        return
    try:
        actual = cnnops.functional.conv2d(x, w, b, padding=1)
    except NotImplementedError as e:
        message = str(e)
        assert str(dtype).replace("torch.", "") in message or "type" in message.lower(), message
        return
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected)


# --------------------------------------------------------------------------------------------
# batch 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dims", DIMS)
def test_batch_zero_forward_backward(dims, groups):
    x = torch.randn((0, 4) + (5,) * dims, dtype=torch.float64)
    w = torch.randn((6, 4 // groups) + (3,) * dims, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    results = []
    for mod in (F, cnnops.functional):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = conv_fn(mod, dims)(*leaves, padding=1, groups=groups)
        out.sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (eo, eg), (ao, ag) = results
    assert ao.shape == eo.shape == (0, 6) + (5,) * dims
    for name, a, e in zip(("input", "weight", "bias"), ag, eg):
        assert a is not None, f"grad_{name} missing"
        assert a.shape == e.shape, name
        assert torch.equal(a, e), f"grad_{name}: {a} vs torch {e}"


def test_batch_zero_same_padding_and_channels_last():
    x = torch.randn(0, 3, 6, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 4, 4)
    out = cnnops.functional.conv2d(x, w, None, padding="same")
    assert out.shape == F.conv2d(x, w, None, padding="same").shape


def test_zero_channels_not_implemented():
    """C_in == 0: torch returns an output with zero channels, which cnnops does not imitate;
    it must say so (NotImplementedError naming the case), never return a different shape."""
    x = torch.randn(2, 0, 5, 5)
    w = torch.randn(3, 0, 3, 3)
    b = torch.randn(3)
    assert F.conv2d(x, w, b).shape == (2, 0, 3, 3)  # what torch does, so the test notices a change
    with pytest.raises(NotImplementedError, match="zero channels"):
        cnnops.functional.conv2d(x, w, b)


# --------------------------------------------------------------------------------------------
# raw ops through torch.ops.cnnops: RuntimeError, never a crash
# --------------------------------------------------------------------------------------------


def good_fwd_args(dims=2):
    x, w, b = xwb(dims)
    return [x, w, b, [1] * dims, [1] * dims, [1] * dims, 1]


def _replace(args, i, v):
    args = list(args)
    args[i] = v
    return args


RAW_FORWARD_CASES = {
    "stride_list_short": lambda a: _replace(a, 3, [1]),
    "stride_list_long": lambda a: _replace(a, 3, [1, 1, 1]),
    "padding_list_long": lambda a: _replace(a, 4, [1, 1, 1]),
    "padding_list_empty": lambda a: _replace(a, 4, []),
    "dilation_list_short": lambda a: _replace(a, 5, [1]),
    "stride_zero": lambda a: _replace(a, 3, [1, 0]),
    "padding_negative": lambda a: _replace(a, 4, [-1, 1]),
    "dilation_zero": lambda a: _replace(a, 5, [0, 1]),
    "groups_zero": lambda a: _replace(a, 6, 0),
    "groups_negative": lambda a: _replace(a, 6, -1),
    "groups_not_dividing": lambda a: _replace(a, 6, 4),
    "input_unbatched": lambda a: _replace(a, 0, a[0][0]),
    "input_rank_high": lambda a: _replace(a, 0, a[0].unsqueeze(0)),
    "weight_rank_2": lambda a: _replace(a, 1, a[1][:, :, 0, 0]),
    "weight_rank_6": lambda a: _replace(_replace(a, 1, torch.randn(6, 4, 1, 1, 3, 3)), 0,
                                        torch.randn(2, 4, 1, 1, 8, 8)),
    "channel_mismatch": lambda a: _replace(a, 0, a[0][:, :3]),
    "bias_wrong_size": lambda a: _replace(a, 2, torch.randn(7)),
    "bias_wrong_rank": lambda a: _replace(a, 2, torch.randn(6, 1)),
    "bias_dtype": lambda a: _replace(a, 2, a[2].double()),
    "weight_dtype": lambda a: _replace(a, 1, a[1].double()),
    "kernel_too_big": lambda a: _replace(_replace(a, 0, torch.randn(2, 4, 1, 1)), 4, [0, 0]),
    "huge_padding_kernel_ok_but_dilation_huge": lambda a: _replace(a, 5, [100, 1]),
}


@pytest.mark.parametrize("case", list(RAW_FORWARD_CASES))
def test_raw_forward_rejects(case):
    args = RAW_FORWARD_CASES[case](good_fwd_args())
    with pytest.raises(RuntimeError):
        torch.ops.cnnops.conv_forward(*args)


def good_bwd_args(dims=2, mask=(True, True, True)):
    x, w, b = xwb(dims)
    go = torch.randn((2, 6) + (8,) * dims)  # padding 1, kernel 3: same size
    return [go, x, w, [1] * dims, [1] * dims, [1] * dims, 1, list(mask)]


def test_raw_backward_good_args_work():
    gi, gw, gb = torch.ops.cnnops.conv_backward(*good_bwd_args())
    assert gi.shape == (2, 4, 8, 8) and gw.shape == (6, 4, 3, 3) and gb.shape == (6,)


RAW_BACKWARD_CASES = {
    "grad_output_spatial_short": lambda a: _replace(a, 0, a[0][..., :-1]),
    "grad_output_spatial_long": lambda a: _replace(a, 0, torch.randn(2, 6, 8, 9)),
    "grad_output_channels": lambda a: _replace(a, 0, a[0][:, :5]),
    "grad_output_batch": lambda a: _replace(a, 0, a[0][:1]),
    "grad_output_rank": lambda a: _replace(a, 0, a[0][0]),
    "grad_output_dtype": lambda a: _replace(a, 0, a[0].double()),
    "stride_list_short": lambda a: _replace(a, 3, [1]),
    "padding_list_long": lambda a: _replace(a, 4, [1, 1, 1]),
    "dilation_list_short": lambda a: _replace(a, 5, [1]),
    "stride_zero": lambda a: _replace(a, 3, [0, 1]),
    "padding_negative": lambda a: _replace(a, 4, [1, -1]),
    "dilation_zero": lambda a: _replace(a, 5, [1, 0]),
    "groups_zero": lambda a: _replace(a, 6, 0),
    "groups_not_dividing": lambda a: _replace(a, 6, 4),
    "channel_mismatch": lambda a: _replace(a, 1, a[1][:, :3]),
    "weight_dtype": lambda a: _replace(a, 2, a[2].double()),
    "input_rank": lambda a: _replace(a, 1, a[1][0]),
    "weight_rank_2": lambda a: _replace(a, 2, a[2][:, :, 0, 0]),
    "output_mask_short": lambda a: _replace(a, 7, [True, True]),
    "only_input_grad_bad_grad_output": lambda a: _replace(_replace(a, 7, [True, False, False]), 0, a[0][..., :-1]),
    "only_weight_grad_bad_grad_output": lambda a: _replace(_replace(a, 7, [False, True, False]), 0, a[0][..., :-1]),
    "only_bias_grad_bad_grad_output": lambda a: _replace(_replace(a, 7, [False, False, True]), 0, a[0][:, :5]),
}


@pytest.mark.parametrize("case", list(RAW_BACKWARD_CASES))
def test_raw_backward_rejects(case):
    args = RAW_BACKWARD_CASES[case](good_bwd_args())
    with pytest.raises(RuntimeError):
        torch.ops.cnnops.conv_backward(*args)


@pytest.mark.parametrize("dims", DIMS)
def test_raw_ops_batch_zero(dims):
    x = torch.randn((0, 4) + (5,) * dims)
    w = torch.randn((6, 4) + (3,) * dims)
    b = torch.randn(6)
    one = [1] * dims
    out = torch.ops.cnnops.conv_forward(x, w, b, one, one, one, 1)
    assert out.shape == (0, 6) + (5,) * dims
    gi, gw, gb = torch.ops.cnnops.conv_backward(out, x, w, one, one, one, 1, [True, True, True])
    assert gi.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w))
    assert torch.equal(gb, torch.zeros(6))


def test_raw_ops_meta_device_shapes():
    """Fake/meta implementations: shape logic on the meta device (no data)."""
    x = torch.empty(2, 4, 9, 8, device="meta")
    w = torch.empty(6, 2, 3, 2, device="meta")
    b = torch.empty(6, device="meta")
    out = torch.ops.cnnops.conv_forward(x, w, b, [2, 1], [1, 0], [1, 2], 2)
    expected = F.conv2d(x, w, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    assert out.shape == expected.shape and out.device.type == "meta"
    gi, gw, gb = torch.ops.cnnops.conv_backward(out, x, w, [2, 1], [1, 0], [1, 2], 2, [True, True, True])
    assert gi.shape == x.shape and gw.shape == w.shape and gb.shape == (6,)
