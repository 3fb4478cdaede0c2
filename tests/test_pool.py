"""Differential tests: cnnops.functional pooling against torch.nn.functional on the CPU.

Max, average, adaptive average, adaptive max pooling and max unpooling in 1d/2d/3d: forward
values, indices (exactly equal) and input gradients (torch.autograd.grad with a random
grad_output) on a parameter grid and on seeded random configurations; every layout; indices
passed between cnnops and torch; float64 gradcheck; opcheck on all ten ops; torch.compile.
Expected values always come from torch (computed in REFERENCE_DTYPE on the same rounded inputs).
"""

import inspect
import random

import pytest
import torch
import torch.nn.functional as F

import cnnops.functional as CF
from conftest import (
    CHANNELS_LAST,
    CPU_DTYPES,
    REFERENCE_DTYPE,
    assert_close_to_torch,
    assert_compiled_matches_eager,
    dtype_id,
    is_unambiguously_channels_last,
    make_tensor,
    prod,
    run_with_cpu_isa,
)

DIMS = [1, 2, 3]
# float32, float64, bfloat16 (the list), and float16 where torch's CPU ops take it.
POOL_DTYPES = list(CPU_DTYPES)
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]


def grid_cases(grid, other_dtype_names):
    """Every grid entry in float32; the other dtypes on a representative subset (the window and
    index logic is the same for every dtype; what differs is rounding), to keep the runtime low."""
    cases = [(name, torch.float32) for name in grid]
    cases += [(name, d) for name in other_dtype_names for d in POOL_DTYPES if d != torch.float32]
    return cases


def case_id(case):
    return f"{case[0]}-{dtype_id(case[1])}"


def per_dim(value, dims):
    """Tuples are written for 3 dims and cut to ``dims``; anything else passes through."""
    return value[:dims] if isinstance(value, tuple) else value


def fn(module, op, dims):
    return getattr(module, f"{op}{dims}d")


def window_volume(kwargs, dims):
    k = kwargs.get("kernel_size", 1)
    return prod(k) if isinstance(k, tuple) else k ** dims


# --------------------------------------------------------------------------------------------
# the differential check
# --------------------------------------------------------------------------------------------


def _run(f, x, kwargs, grad_out=None, extra=()):
    """f(x, *extra, **kwargs) on a fresh leaf; returns (output, indices or None, grad_input)."""
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(grad_out is not None)
    res = f(leaf, *extra, **kwargs)
    out, idx = (res if isinstance(res, tuple) else (res, None))
    grad = torch.autograd.grad(out, leaf, grad_out)[0] if grad_out is not None else None
    return out.detach(), idx, grad


def check_memory_format(x, out, what):
    """DESIGN.md: channels_last in, channels_last out (output, indices, grad_input)."""
    if out is None:
        return
    if is_unambiguously_channels_last(x):
        fmt = CHANNELS_LAST[x.dim()]
        assert out.is_contiguous(memory_format=fmt), f"{what} lost channels_last: strides {out.stride()}"
    elif x.is_contiguous():
        assert out.is_contiguous(), f"{what}: contiguous input gave strides {out.stride()}"


def check_pool(op, dims, x, kwargs, dtype, grad=True, extra_ref=(), extra=(), reduction=1, msg="",
               torch_strides=False, grad_layout="contiguous"):
    """cnnops.functional.<op><dims>d vs torch.nn.functional's: output (and indices exactly) and
    grad_input for a random grad_output. Returns cnnops' (output, indices)."""
    ref_dtype = REFERENCE_DTYPE[dtype]
    ref_x = x.detach().to(ref_dtype)
    ref_out, ref_idx, _ = _run(fn(F, op, dims), ref_x, kwargs, extra=extra_ref)
    if grad_layout == "channels_last" and ref_out.dim() not in CHANNELS_LAST:
        grad_layout = "contiguous"
    grad_out = make_tensor(ref_out.shape, dtype, grad_layout) if grad else None
    ref_out, ref_idx, ref_grad = _run(fn(F, op, dims), ref_x, kwargs,
                                      None if grad_out is None else grad_out.to(ref_dtype), extra_ref)
    out, idx, got_grad = _run(fn(CF, op, dims), x, kwargs, grad_out, extra)
    ctx = f"{msg} {op}{dims}d x={tuple(x.shape)} strides={x.stride()} {kwargs}"
    assert_close_to_torch(out, ref_out, dtype, reduction, msg=f"{ctx}: output")
    if ref_idx is not None:
        assert idx is not None and idx.dtype == torch.int64, f"{ctx}: indices {idx}"
        assert idx.shape == ref_idx.shape, f"{ctx}: indices shape {tuple(idx.shape)} vs {tuple(ref_idx.shape)}"
        assert torch.equal(idx, ref_idx), f"{ctx}: indices differ from torch's\n{idx}\n{ref_idx}"
        check_memory_format(x, idx, f"{ctx}: indices")
    if grad:
        assert_close_to_torch(got_grad, ref_grad, dtype, reduction, msg=f"{ctx}: grad_input")
        check_memory_format(x, got_grad, f"{ctx}: grad_input")
    check_memory_format(x, out, f"{ctx}: output")
    if torch_strides and ref_out.numel() > 1:
        assert out.stride() == ref_out.stride(), f"{ctx}: output strides {out.stride()}, torch {ref_out.stride()}"
    return out, idx


def pool_input(dims, n, c, spatial, dtype, layout="contiguous", unbatched=False, distinct=False):
    spatial = per_dim(spatial, dims) if isinstance(spatial, tuple) else (spatial,) * dims
    shape = ((c,) if unbatched else (n, c)) + tuple(spatial)
    if layout == "channels_last" and len(shape) not in CHANNELS_LAST:
        layout = "contiguous"
    x = make_tensor(shape, dtype, layout)
    if distinct:  # no ties, gaps far above gradcheck's eps (so the argmax never flips)
        values = (torch.randperm(max(x.numel(), 1), dtype=torch.float64)[: x.numel()] * 0.01 - 1).to(dtype)
        x = x.detach().copy_(values.view(shape))
    return x


# --------------------------------------------------------------------------------------------
# max pool
# --------------------------------------------------------------------------------------------

# name -> kwargs (tuples written for 3 dims); "spatial" overrides the input size.
MAX_GRID = {
    "k2": dict(kernel_size=2),
    "k3_s2_p1_stem": dict(kernel_size=3, stride=2, padding=1),
    "k3_s1_p1_overlap": dict(kernel_size=3, stride=1, padding=1),
    "k2_s1_overlap": dict(kernel_size=2, stride=1),
    "k2_s3_gaps": dict(kernel_size=2, stride=3),
    "k1": dict(kernel_size=1),
    "stride_empty": dict(kernel_size=2, stride=()),
    "tuples": dict(kernel_size=(3, 2, 2), stride=(2, 1, 2), padding=(1, 0, 1)),
    "dilation2_p1": dict(kernel_size=3, stride=1, padding=1, dilation=2),
    "dilation_tuple": dict(kernel_size=2, stride=(1, 2, 1), dilation=(1, 2, 3)),
    "dilation_stride_pad": dict(kernel_size=3, stride=2, padding=1, dilation=2, spatial=(9, 8, 7)),
    "ceil_partial_window": dict(kernel_size=3, stride=2, ceil_mode=True, spatial=(8, 8, 6)),
    "ceil_last_in_padding": dict(kernel_size=2, stride=2, padding=1, ceil_mode=True, spatial=(5, 5, 5)),
    "ceil_pad1_k3_s2": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, spatial=(6, 7, 6)),
    "ceil_dilation": dict(kernel_size=2, stride=3, padding=1, dilation=2, ceil_mode=True, spatial=(9, 8, 7)),
    "ceil_noop": dict(kernel_size=2, stride=2, ceil_mode=True, spatial=(8, 6, 4)),
    "kernel_eq_input": dict(kernel_size=(5, 4, 3), spatial=(5, 4, 3)),
    "odd_sizes": dict(kernel_size=(3, 2, 3), stride=(2, 3, 1), spatial=(13, 7, 5)),
    "return_indices_false": dict(kernel_size=3, stride=2, return_indices=False),
}


def shape_case(case, **defaults):
    """SHAPE_CASES[case] over the given defaults (n, c, unbatched)."""
    return {**defaults, **SHAPE_CASES[case]}


def grid_input_args(name, grid, dims, dtype, layout="contiguous", n=2, c=3, unbatched=False):
    kw = dict(grid[name])
    spatial = kw.pop("spatial", (7, 6, 5) if dims < 3 else (5, 6, 4))
    kw = {k: per_dim(v, dims) for k, v in kw.items()}
    x = pool_input(dims, n, c, spatial, dtype, layout, unbatched)
    return x, kw


@pytest.mark.parametrize("case", grid_cases(MAX_GRID, ["k3_s2_p1_stem", "dilation_stride_pad", "ceil_last_in_padding",
                                                      "odd_sizes"]), ids=case_id)
@pytest.mark.parametrize("dims", DIMS)
def test_max_pool_grid(dims, case):
    name, dtype = case
    x, kw = grid_input_args(name, MAX_GRID, dims, dtype)
    kw.setdefault("return_indices", True)
    check_pool("max_pool", dims, x, kw, dtype, reduction=window_volume(kw, dims), msg=name)


# batch 0 / 1, unbatched, C = 1, every layout: on a few configurations.
SHAPE_CASES = {
    "batch0": dict(n=0),
    "batch1": dict(n=1),
    "unbatched": dict(unbatched=True),
    "c1": dict(c=1),
    "c5_n3": dict(n=3, c=5),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
@pytest.mark.parametrize("name", ["k3_s2_p1_stem", "ceil_last_in_padding"])
@pytest.mark.parametrize("dims", DIMS)
def test_max_pool_shapes(dims, name, case):
    x, kw = grid_input_args(name, MAX_GRID, dims, torch.float32, **SHAPE_CASES[case])
    out, idx = check_pool("max_pool", dims, x, dict(kw, return_indices=True), torch.float32, msg=case)
    if case == "batch0":
        assert out.shape[0] == 0 and idx.shape[0] == 0


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("name", ["k3_s2_p1_stem", "k2_s1_overlap", "dilation_stride_pad", "ceil_partial_window"])
@pytest.mark.parametrize("dims", DIMS)
def test_max_pool_layouts(dims, name, layout):
    if layout == "channels_last" and dims == 1:
        pytest.skip("no channels_last for 3-d tensors")
    x, kw = grid_input_args(name, MAX_GRID, dims, torch.float32, layout=layout, c=4)
    # torch's max pools keep channels_last: the strides must be torch's exactly
    check_pool("max_pool", dims, x, dict(kw, return_indices=True), torch.float32, msg=layout,
               torch_strides=layout == "channels_last", grad_layout=layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dims", DIMS)
def test_max_pool_nan_and_inf(dims, layout):
    """NaN propagates (and is the argmax) as in torch; -inf inputs are not beaten by padding."""
    x = pool_input(dims, 2, 3, 6, torch.float32, layout if dims > 1 else "contiguous")
    x[0, 0][(0,) * dims] = float("nan")
    x[1, 2][(1,) * dims] = float("nan")
    x[0, 1].fill_(float("-inf"))
    kw = dict(kernel_size=3, stride=2, padding=1, return_indices=True)
    # reference from torch's contiguous kernel: torch's channels_last_3d kernel returns index 0
    # for an all -inf window instead of the window's first element (its contiguous kernels and
    # 2d channels_last kernel agree on the first element), which cnnops follows.
    ref, ref_idx = fn(F, "max_pool", dims)(x.contiguous(), **kw)
    out, idx = fn(CF, "max_pool", dims)(x, **kw)
    torch.testing.assert_close(out, ref, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("dims", DIMS)
def test_max_pool_ties_first_index(dims):
    """All-equal windows: torch picks the first element of each window; so must cnnops."""
    x = torch.zeros((2, 3) + (7,) * dims)
    kw = dict(kernel_size=3, stride=2, padding=1, return_indices=True)
    assert torch.equal(fn(CF, "max_pool", dims)(x, **kw)[1], fn(F, "max_pool", dims)(x, **kw)[1])


@pytest.mark.parametrize("padding", [0, 1])
def test_max_pool_bfloat16_stride2_every_width(padding):
    """bfloat16 NCHW rows with stride 2 are widened two values per 32-bit word (pool_cpu.h's
    load_even_columns), the last column alone: every width, so every row ends on either parity,
    the tensor's very last value included (ASan would see a read past it)."""
    torch.manual_seed(0)
    for width in range(1, 40):
        x = torch.randn(2, 3, 3, width).to(torch.bfloat16)
        for kernel in (1, 2, 3):
            if 2 * padding > kernel or kernel > width + 2 * padding:
                continue
            kw = dict(kernel_size=(1, kernel), stride=2, padding=(0, padding), return_indices=True)
            out, idx = CF.max_pool2d(x, **kw)
            ref, ref_idx = F.max_pool2d(x.float(), **kw)
            assert torch.equal(out.float(), ref), (width, kernel)
            assert torch.equal(idx, ref_idx), (width, kernel)


def sixteen_bit_patterns(dtype):
    """Every 16-bit pattern of dtype once (finite values, subnormals, +-0, +-inf, NaNs), as
    (2, 4, 64, 128), in a shuffled order so windows mix signs and magnitudes."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    bits = bits[torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(3))]
    return bits.view(dtype).reshape(2, 4, 64, 128)


MAX_POOL_16BIT_ISA_CHECK = """
import torch, torch.nn.functional as F, cnnops.functional as CF
from test_pool import check_max_pool_16bit
for dtype in (torch.bfloat16, torch.half):
    for channels_last in (False, True):
        check_max_pool_16bit(dtype, channels_last)
print("ok")
"""


def check_max_pool_16bit(dtype, channels_last):
    x = sixteen_bit_patterns(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for kw in (dict(kernel_size=1), dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=1)):
        out, idx = CF.max_pool2d(x, return_indices=True, **kw)
        ref, ref_idx = F.max_pool2d(x.float(), return_indices=True, **kw)
        nan = ref.isnan()
        assert torch.equal(out.isnan(), nan), kw
        # bit for bit: torch's rounding of a value that is already a dtype value is exact
        assert torch.equal(out.view(torch.int16)[~nan], ref.to(dtype).view(torch.int16)[~nan]), kw
        assert torch.equal(idx, ref_idx), kw


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.half], ids=dtype_id)
def test_max_pool_16bit_outputs_every_bit_pattern(dtype, channels_last):
    """A 16-bit maximum is stored back without c10's rounding (pool_max.cpp store_max: bfloat16's
    upper half, half by the AVX-512 conversion). Every pattern of the dtype, subnormals and
    infinities included, comes out as torch's float result rounded to the dtype, bit for bit."""
    check_max_pool_16bit(dtype, channels_last)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_max_pool_16bit_outputs_every_bit_pattern_per_isa(isa):
    result = run_with_cpu_isa(isa, "import sys; sys.path.insert(0, 'tests')\n" + MAX_POOL_16BIT_ISA_CHECK, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# average pool
# --------------------------------------------------------------------------------------------

AVG_GRID = {
    "k2": dict(kernel_size=2),
    "k3_s2_p1": dict(kernel_size=3, stride=2, padding=1),
    "k3_s2_p1_no_pad_count": dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    "k3_s1_p1_overlap": dict(kernel_size=3, stride=1, padding=1),
    "k2_s3_gaps": dict(kernel_size=2, stride=3),
    "k1": dict(kernel_size=1),
    "stride_none_explicit": dict(kernel_size=2, stride=None),
    "tuples": dict(kernel_size=(3, 2, 4), stride=(2, 1, 2), padding=(1, 0, 2), spatial=(7, 6, 9)),
    "ceil_partial_window": dict(kernel_size=3, stride=2, ceil_mode=True, spatial=(8, 8, 6)),
    "ceil_partial_count_pad": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, spatial=(6, 8, 6)),
    "ceil_partial_no_count_pad": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False,
                                      spatial=(6, 8, 6)),
    "ceil_last_in_padding": dict(kernel_size=2, stride=2, padding=1, ceil_mode=True, spatial=(5, 5, 5)),
    "ceil_last_in_padding_no_count": dict(kernel_size=2, stride=2, padding=1, ceil_mode=True,
                                          count_include_pad=False, spatial=(5, 5, 5)),
    "ceil_big_stride": dict(kernel_size=4, stride=3, padding=2, ceil_mode=True, spatial=(8, 9, 7)),
    "kernel_eq_input": dict(kernel_size=(5, 4, 3), spatial=(5, 4, 3)),
    "odd_sizes": dict(kernel_size=(3, 2, 3), stride=(2, 3, 1), padding=(1, 1, 0), spatial=(13, 7, 5)),
    "divisor_override": dict(kernel_size=3, stride=2, padding=1, divisor_override=5),
    "divisor_override_ceil": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, divisor_override=2,
                                  spatial=(6, 8, 6)),
    "divisor_none_explicit": dict(kernel_size=2, divisor_override=None),
}


def avg_kwargs_ok(kw, dims):
    return dims > 1 or "divisor_override" not in kw


@pytest.mark.parametrize("case", grid_cases(AVG_GRID, ["k3_s2_p1_no_pad_count", "ceil_partial_count_pad",
                                                      "divisor_override_ceil", "odd_sizes"]), ids=case_id)
@pytest.mark.parametrize("dims", DIMS)
def test_avg_pool_grid(dims, case):
    name, dtype = case
    x, kw = grid_input_args(name, AVG_GRID, dims, dtype)
    if not avg_kwargs_ok(kw, dims):
        pytest.skip("torch's avg_pool1d has no divisor_override")
    check_pool("avg_pool", dims, x, kw, dtype, reduction=window_volume(kw, dims), msg=name)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("divisor", [-3, -1])
@pytest.mark.parametrize("dims", [2, 3])
def test_avg_pool_negative_divisor(dims, divisor, layout):
    """torch divides by a negative divisor_override, forward and backward; so does cnnops."""
    x, kw = grid_input_args("k3_s2_p1_no_pad_count", AVG_GRID, dims, torch.float64, layout=layout, c=4)
    kw["divisor_override"] = divisor
    check_pool("avg_pool", dims, x, kw, torch.float64, reduction=9, msg=f"divisor={divisor}",
               torch_strides=layout == "channels_last" and dims == 2, grad_layout=layout)


@pytest.mark.parametrize("case", list(SHAPE_CASES))
@pytest.mark.parametrize("name", ["k3_s2_p1_no_pad_count", "ceil_partial_count_pad"])
@pytest.mark.parametrize("dims", DIMS)
def test_avg_pool_shapes(dims, name, case):
    x, kw = grid_input_args(name, AVG_GRID, dims, torch.float32, **SHAPE_CASES[case])
    out, _ = check_pool("avg_pool", dims, x, kw, torch.float32, reduction=9, msg=case)
    if case == "batch0":
        assert out.shape[0] == 0


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("name", ["k2", "k3_s2_p1_no_pad_count", "ceil_partial_count_pad", "divisor_override"])
@pytest.mark.parametrize("dims", DIMS)
def test_avg_pool_layouts(dims, name, layout):
    if layout == "channels_last" and dims == 1:
        pytest.skip("no channels_last for 3-d tensors")
    x, kw = grid_input_args(name, AVG_GRID, dims, torch.float32, layout=layout, c=4)
    if not avg_kwargs_ok(kw, dims):
        pytest.skip("torch's avg_pool1d has no divisor_override")
    # torch keeps channels_last in 2d (in 3d it returns contiguous; cnnops follows DESIGN.md)
    check_pool("avg_pool", dims, x, kw, torch.float32, reduction=27, msg=layout,
               torch_strides=layout == "channels_last" and dims == 2, grad_layout=layout)


# --------------------------------------------------------------------------------------------
# adaptive pools
# --------------------------------------------------------------------------------------------

# name -> (input spatial, output_size) written for 3 dims.
ADAPTIVE_GRID = {
    "global": ((7, 6, 5), 1),
    "identity": ((7, 6, 5), (7, 6, 5)),
    "divides": ((8, 6, 4), (4, 3, 2)),
    "non_divisor": ((7, 10, 5), (3, 4, 2)),
    "upsample": ((3, 4, 2), (5, 7, 3)),
    "mixed": ((9, 3, 6), (4, 5, 6)),
    "int_size": ((7, 6, 5), 3),
    "prime_sizes": ((13, 11, 7), (5, 3, 4)),
}


def adaptive_args(name, dims, dtype, layout="contiguous", n=2, c=3, unbatched=False):
    spatial, size = ADAPTIVE_GRID[name]
    x = pool_input(dims, n, c, spatial, dtype, layout, unbatched)
    size = per_dim(size, dims)
    return x, size


def adaptive_reduction(x, size, dims):
    sizes = size if isinstance(size, tuple) else (size,) * dims
    return prod(-(-i // max(o, 1)) + 1 for i, o in zip(x.shape[-dims:], sizes))


@pytest.mark.parametrize("case", grid_cases(ADAPTIVE_GRID, ["non_divisor", "upsample", "prime_sizes"]), ids=case_id)
@pytest.mark.parametrize("op", ["adaptive_avg_pool", "adaptive_max_pool"])
@pytest.mark.parametrize("dims", DIMS)
def test_adaptive_grid(dims, op, case):
    name, dtype = case
    x, size = adaptive_args(name, dims, dtype)
    kw = dict(output_size=size)
    if op == "adaptive_max_pool":
        kw["return_indices"] = True
    check_pool(op, dims, x, kw, dtype, reduction=adaptive_reduction(x, size, dims), msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["batch0", "batch1", "unbatched", "c1"])
@pytest.mark.parametrize("op", ["adaptive_avg_pool", "adaptive_max_pool"])
@pytest.mark.parametrize("dims", DIMS)
def test_adaptive_shapes_and_layouts(dims, op, case, layout):
    if layout == "channels_last" and (dims == 1 or case == "unbatched"):
        pytest.skip("no channels_last for 3-d tensors")
    x, size = adaptive_args("non_divisor", dims, torch.float32, layout=layout, **shape_case(case, c=4))
    kw = dict(output_size=size)
    if op == "adaptive_max_pool":
        kw["return_indices"] = True
    check_pool(op, dims, x, kw, torch.float32, reduction=adaptive_reduction(x, size, dims),
               msg=f"{case} {layout}", torch_strides=layout == "channels_last" and dims == 2, grad_layout=layout)


@pytest.mark.parametrize("size", [(None, 3), (4, None), (None, None)], ids=str)
@pytest.mark.parametrize("op", ["adaptive_avg_pool", "adaptive_max_pool"])
def test_adaptive_none_sizes_2d(op, size):
    x = pool_input(2, 2, 3, (7, 5), torch.float64)
    check_pool(op, 2, x, dict(output_size=size), torch.float64, reduction=10, msg="None")
    check_pool(op, 2, x[0], dict(output_size=size), torch.float64, reduction=10, msg="None unbatched")


@pytest.mark.parametrize("size", [(None, 3, 2), (4, None, None), (None, None, None)], ids=str)
@pytest.mark.parametrize("op", ["adaptive_avg_pool", "adaptive_max_pool"])
def test_adaptive_none_sizes_3d(op, size):
    x = pool_input(3, 2, 3, (5, 4, 6), torch.float64)
    check_pool(op, 3, x, dict(output_size=size), torch.float64, reduction=10, msg="None")


@pytest.mark.parametrize("op", ["adaptive_avg_pool", "adaptive_max_pool"])
@pytest.mark.parametrize("dims", DIMS)
def test_adaptive_zero_output(dims, op):
    """output_size 0 is allowed by torch (an empty output)."""
    x = pool_input(dims, 2, 3, 5, torch.float32)
    size = (0,) + (2,) * (dims - 1)
    check_pool(op, dims, x, dict(output_size=size), torch.float32, grad=False, msg="zero output")


@pytest.mark.parametrize("op", ["adaptive_avg_pool", "adaptive_max_pool"])
@pytest.mark.parametrize("dims", DIMS)
def test_adaptive_zero_output_backward_raises_like_torch(dims, op):
    """torch's backward rejects the empty grad_output of an output size 0; so does cnnops'."""
    size = (2,) * (dims - 1) + (0,)
    for module in (F, CF):
        x = pool_input(dims, 2, 3, 5, torch.float32).requires_grad_()
        out = fn(module, op, dims)(x, size)
        with pytest.raises(RuntimeError, match="Expected grad_output to have non-zero size for non-batch dimensions"):
            out.sum().backward()


def test_adaptive_avg_zero_channels_like_torch():
    """torch's adaptive_avg_pool1d/2d accept zero channels (an empty output)."""
    for dims in (1, 2):
        x = torch.randn((2, 0) + (5,) * dims)
        out = fn(CF, "adaptive_avg_pool", dims)(x, 2)
        assert out.shape == fn(F, "adaptive_avg_pool", dims)(x, 2).shape


# --------------------------------------------------------------------------------------------
# max unpool
# --------------------------------------------------------------------------------------------

# name -> (pool kwargs, unpool output_size). output_size None: the default (I - 1) * S - 2P + K,
# or the pooled input's size where the pool dropped a remainder (the default would then be too
# small for its indices, in torch as in cnnops); "plus": the default plus one per dim (valid
# while S > 1); "full": the pooled input's N x C x * shape.
UNPOOL_GRID = {
    "k2": (dict(kernel_size=2), None),
    "k3_s2_p1": (dict(kernel_size=3, stride=2, padding=1), None),
    "k2_s1_overlap": (dict(kernel_size=2, stride=1), None),
    "k2_s3_gaps": (dict(kernel_size=2, stride=3), None),
    "tuples": (dict(kernel_size=(3, 2, 2), stride=(2, 1, 2), padding=(1, 0, 1)), None),
    "output_size_plus": (dict(kernel_size=2), "plus"),
    "output_size_full": (dict(kernel_size=3, stride=2, padding=1), "full"),
    "ceil_pool_plus": (dict(kernel_size=3, stride=2, ceil_mode=True), "plus"),
}


def unpool_default_size(pooled, pool_kw, dims):
    k = pool_kw["kernel_size"]
    s = pool_kw.get("stride", k)
    p = pool_kw.get("padding", 0)
    out = []
    for d in range(dims):
        kk, ss, pp = (v if isinstance(v, int) else v[d] for v in (k, s, p))
        out.append((pooled.shape[-dims + d] - 1) * ss + kk - 2 * pp)
    return out


def unpool_case(name, dims, dtype, layout="contiguous", n=2, c=3, unbatched=False, spatial=None):
    pool_kw, size_kind = UNPOOL_GRID[name]
    pool_kw = {k: per_dim(v, dims) for k, v in pool_kw.items()}
    spatial = spatial or ((9, 8, 7) if dims < 3 else (7, 6, 5))
    x = pool_input(dims, n, c, spatial, torch.float64, layout, unbatched)
    # the unpool input is a max pool's output (so overlapping windows' duplicate indices carry
    # equal values), rounded to the dtype under test
    pooled, indices = fn(F, "max_pool", dims)(x, return_indices=True, **pool_kw)
    pooled = pooled.to(dtype)
    if layout == "channels_last" and pooled.dim() in CHANNELS_LAST:
        pooled = pooled.contiguous(memory_format=CHANNELS_LAST[pooled.dim()])
    elif layout in ("transposed", "sliced"):
        pooled = make_tensor(pooled.shape, dtype, layout).copy_(pooled)
    kw = {k: v for k, v in pool_kw.items() if k in ("kernel_size", "stride", "padding")}
    default = unpool_default_size(pooled, pool_kw, dims)
    in_size = list(x.shape[-dims:])
    if size_kind is None and default != in_size:
        kw["output_size"] = tuple(in_size)
    elif size_kind == "plus":
        kw["output_size"] = tuple(v + 1 for v in default)
        assert prod(kw["output_size"]) >= prod(in_size)
    elif size_kind == "full":
        kw["output_size"] = tuple(x.shape)
    return pooled, indices, kw


@pytest.mark.parametrize("case", grid_cases(UNPOOL_GRID, ["k3_s2_p1", "k2_s1_overlap", "ceil_pool_plus"]), ids=case_id)
@pytest.mark.parametrize("dims", DIMS)
def test_max_unpool_grid(dims, case):
    name, dtype = case
    pooled, indices, kw = unpool_case(name, dims, dtype)
    check_pool("max_unpool", dims, pooled, kw, dtype, extra_ref=(indices,), extra=(indices,), msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["batch0", "batch1", "unbatched", "c1"])
@pytest.mark.parametrize("dims", DIMS)
def test_max_unpool_shapes_and_layouts(dims, case, layout):
    if layout == "channels_last" and (dims == 1 or case == "unbatched"):
        pytest.skip("no channels_last for 3-d tensors")
    pooled, indices, kw = unpool_case("k3_s2_p1", dims, torch.float32, layout=layout, **shape_case(case, c=4))
    check_pool("max_unpool", dims, pooled, kw, torch.float32, extra_ref=(indices,), extra=(indices,),
               msg=f"{case} {layout}", torch_strides=layout == "channels_last" and dims == 2, grad_layout=layout)


@pytest.mark.parametrize("dims", DIMS)
def test_max_unpool_arbitrary_unique_indices(dims):
    """Indices need not come from a max pool: any in-range, distinct positions."""
    x = make_tensor((2, 3) + (3,) * dims, torch.float64)
    out_size = (7,) * dims
    plane = 7 ** dims
    indices = torch.stack([torch.randperm(plane)[: 3 ** dims] for _ in range(6)]).view(x.shape)
    kw = dict(kernel_size=2, stride=2, padding=0, output_size=out_size)
    check_pool("max_unpool", dims, x, kw, torch.float64, extra_ref=(indices,), extra=(indices,), msg="randperm")


# --------------------------------------------------------------------------------------------
# indices interchangeable with torch's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dims", DIMS)
def test_indices_interchangeable_with_torch(dims, layout):
    x = pool_input(dims, 2, 4, 9 if dims < 3 else 7, torch.float32, layout if dims > 1 else "contiguous")
    kw = dict(kernel_size=3, stride=2, padding=1)
    c_out, c_idx = fn(CF, "max_pool", dims)(x, return_indices=True, **kw)
    t_out, t_idx = fn(F, "max_pool", dims)(x, return_indices=True, **kw)
    size = x.shape[-dims:]
    # cnnops indices -> torch unpool, torch indices -> cnnops unpool: both equal torch's round trip
    expected = fn(F, "max_unpool", dims)(t_out, t_idx, output_size=size, **kw)
    assert torch.equal(fn(F, "max_unpool", dims)(c_out, c_idx, output_size=size, **kw), expected)
    assert torch.equal(fn(CF, "max_unpool", dims)(t_out, t_idx, output_size=size, **kw), expected)
    assert torch.equal(fn(CF, "max_unpool", dims)(c_out, c_idx, output_size=size, **kw), expected)
    # and adaptive max pool indices too
    c_out, c_idx = fn(CF, "adaptive_max_pool", dims)(x, 3, return_indices=True)
    t_out, t_idx = fn(F, "adaptive_max_pool", dims)(x, 3, return_indices=True)
    assert torch.equal(c_idx, t_idx)


# --------------------------------------------------------------------------------------------
# seeded random configurations
# --------------------------------------------------------------------------------------------


def random_window_config(rng, dims, avg):
    kernel = tuple(rng.randint(1, 4 if dims < 3 else 3) for _ in range(dims))
    stride = tuple(rng.randint(1, 3) for _ in range(dims))
    dilation = (1,) * dims if avg else tuple(rng.choice([1, 1, 2]) for _ in range(dims))
    padding = tuple(rng.randint(0, k // 2) for k in kernel)
    ceil_mode = rng.random() < 0.5
    spatial = tuple(max(d * (k - 1) + 1 - 2 * p, 1) + rng.randint(0, 7 if dims < 3 else 3)
                    for k, p, d in zip(kernel, padding, dilation))
    kw = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
    if not avg:
        kw["dilation"] = dilation
    # collapse to ints sometimes (torch's int form)
    for key in ("kernel_size", "stride", "padding", "dilation"):
        if key in kw and len(set(kw[key])) == 1 and rng.random() < 0.5:
            kw[key] = kw[key][0]
    if rng.random() < 0.15:
        kw["stride"] = None
    return kw, spatial


def random_layout(rng, dims, unbatched):
    layouts = ["contiguous", "contiguous", "transposed", "sliced"]
    if dims > 1 and not unbatched:
        layouts += ["channels_last", "channels_last"]
    return rng.choice(layouts)


def random_dtype(rng):
    return rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])


N_RANDOM = 40


@pytest.mark.parametrize("i", range(N_RANDOM))
def test_random(i):
    rng = random.Random(30_000 + i)
    dims = rng.choice(DIMS)
    op = rng.choice(["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"])
    n, c = rng.choice([0, 1, 2, 3]), rng.randint(1, 5)
    unbatched = rng.random() < 0.15
    layout = random_layout(rng, dims, unbatched)
    dtype = random_dtype(rng)
    msg = f"random#{i} layout={layout}"
    if op in ("max_pool", "avg_pool"):
        kw, spatial = random_window_config(rng, dims, op == "avg_pool")
        if op == "avg_pool":
            kw["count_include_pad"] = rng.random() < 0.5
            if dims > 1 and rng.random() < 0.3:
                kw["divisor_override"] = rng.choice([-1, 1]) * rng.randint(1, 10)
        else:
            kw["return_indices"] = True
        x = pool_input(dims, n, c, spatial, dtype, layout, unbatched)
        k = kw["kernel_size"]
        check_pool(op, dims, x, kw, dtype, reduction=prod(k) if isinstance(k, tuple) else k ** dims, msg=msg)
    elif op in ("adaptive_avg_pool", "adaptive_max_pool"):
        spatial = tuple(rng.randint(1, 12 if dims < 3 else 6) for _ in range(dims))
        size = tuple(rng.randint(1, 8 if dims < 3 else 5) for _ in range(dims))
        x = pool_input(dims, n, c, spatial, dtype, layout, unbatched)
        kw = dict(output_size=size)
        if op == "adaptive_max_pool":
            kw["return_indices"] = True
        check_pool(op, dims, x, kw, dtype, reduction=adaptive_reduction(x, size, dims), msg=msg)
    else:
        name = rng.choice(list(UNPOOL_GRID))
        pooled, indices, kw = unpool_case(name, dims, dtype, layout, n=n, c=c, unbatched=unbatched)
        check_pool("max_unpool", dims, pooled, kw, dtype, extra_ref=(indices,), extra=(indices,), msg=msg)


# --------------------------------------------------------------------------------------------
# gradcheck (float64, tiny shapes, no ties for the max pools)
# --------------------------------------------------------------------------------------------

GRADCHECK = {
    "max_pool": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    "max_pool_dilated": dict(kernel_size=2, stride=1, padding=1, dilation=2),
    "avg_pool": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    "avg_pool_divisor": dict(kernel_size=2, stride=1, divisor_override=3),
    "adaptive_avg_pool": dict(output_size=3),
    "adaptive_max_pool": dict(output_size=3),
    "max_unpool": dict(kernel_size=2, stride=2),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(GRADCHECK))
@pytest.mark.parametrize("dims", DIMS)
def test_gradcheck(dims, case, layout):
    if layout == "channels_last" and dims != 2:
        pytest.skip("channels_last gradcheck on 2d only (the layout tests cover 3d)")
    op = case.replace("_dilated", "").replace("_divisor", "")
    kw = dict(GRADCHECK[case])
    if op == "avg_pool" and dims == 1:
        kw.pop("divisor_override", None)
    spatial = {1: 7, 2: (5, 6), 3: (4, 5, 3)}[dims]
    x = pool_input(dims, 2, 2, spatial, torch.float64, layout, distinct=True)
    extra = ()
    if op == "max_unpool":
        x_big = pool_input(dims, 2, 2, (6, 4, 4), torch.float64, layout, distinct=True)
        x, indices = fn(F, "max_pool", dims)(x_big, 2, return_indices=True)
        extra = (indices,)
    f = fn(CF, op, dims)

    def run(t):
        return f(t, *extra, **kw)

    assert torch.autograd.gradcheck(run, (x.detach().requires_grad_(),), eps=1e-6, atol=1e-8, rtol=1e-6,
                                    fast_mode=True)


@pytest.mark.parametrize("op", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"])
def test_double_backward_like_torch(op):
    """The backward ops are differentiable (csrc/autograd/pool.cpp): a second backward gives
    torch's gradient (tests/test_pool_autograd.py goes through every option and order)."""
    x = pool_input(2, 1, 2, 6, torch.float64, distinct=True)
    extra, kw = (), dict(kernel_size=2) if op in ("max_pool", "avg_pool", "max_unpool") else dict(output_size=2)
    if op == "max_unpool":
        x, indices = F.max_pool2d(x, 2, return_indices=True)
        extra = (indices,)
    grads = []
    for module in (F, CF):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(module, op, 2)(leaf, *extra, **kw) ** 2).sum(), leaf, create_graph=True)
        grads.append(torch.autograd.grad((g ** 2).sum(), leaf)[0])
    assert_close_to_torch(grads[1], grads[0], torch.float64, 9)


@pytest.mark.parametrize("op", ["max_pool", "adaptive_max_pool"])
def test_indices_non_differentiable(op):
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    kw = dict(kernel_size=2) if op == "max_pool" else dict(output_size=3)
    out, idx = fn(CF, op, 2)(x, return_indices=True, **kw)
    assert out.requires_grad and not idx.requires_grad and idx.grad_fn is None


# --------------------------------------------------------------------------------------------
# opcheck on all ten ops, fake metadata, torch.compile
# --------------------------------------------------------------------------------------------

OPCHECK_INPUTS = {
    # name: (dims, shape, layout)
    "1d": (1, (2, 3, 9), "contiguous"),
    "2d": (2, (2, 3, 7, 6), "contiguous"),
    "2d_channels_last": (2, (2, 4, 7, 6), "channels_last"),
    "3d": (3, (1, 2, 5, 4, 5), "contiguous"),
    "2d_batch0": (2, (0, 3, 7, 6), "contiguous"),
}


def raw_calls(name):
    """(op, args) for every forward and backward op on one input."""
    dims, shape, layout = OPCHECK_INPUTS[name]
    x = make_tensor(shape, torch.float32, layout)
    ops = torch.ops.cnnops
    k, s, p, d = [3] * dims, [2] * dims, [1] * dims, [1] * dims
    out, idx = ops.max_pool_forward(x, k, s, p, d, True)
    avg = ops.avg_pool_forward(x, k, s, p, True, False, 0)
    size = [3] * dims
    aavg = ops.adaptive_avg_pool_forward(x, size)
    amax, aidx = ops.adaptive_max_pool_forward(x, size)
    un_size = list(x.shape[2:])
    unpooled = ops.max_unpool_forward(out, idx, un_size)
    return [
        (ops.max_pool_forward.default, (x, k, s, p, d, True)),
        (ops.max_pool_backward.default, (torch.randn_like(out), x, idx, k, s, p, d, True)),
        (ops.avg_pool_forward.default, (x, k, s, p, True, False, 0)),
        (ops.avg_pool_forward.default, (x, k, s, p, False, True, 5)),
        (ops.avg_pool_backward.default, (torch.randn_like(avg), x, k, s, p, True, False, 0)),
        (ops.adaptive_avg_pool_forward.default, (x, size)),
        (ops.adaptive_avg_pool_backward.default, (torch.randn_like(aavg), x)),
        (ops.adaptive_max_pool_forward.default, (x, size)),
        (ops.adaptive_max_pool_backward.default, (torch.randn_like(amax), x, aidx)),
        (ops.max_unpool_forward.default, (out, idx, un_size)),
        (ops.max_unpool_backward.default, (torch.randn_like(unpooled), out, idx)),
    ]


@pytest.mark.parametrize("name", list(OPCHECK_INPUTS))
def test_opcheck(name):
    for op, args in raw_calls(name):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["1d", "2d_channels_last", "3d"])
def test_fake_matches_real_metadata(name):
    """The fake kernels give the real kernels' shapes, dtypes and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = raw_calls(name)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_calls = [(op, tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
                      for op, args in calls]
        fakes = [op(*args) for op, args in fake_calls]
    for (op, args), fake in zip(calls, fakes):
        real = op(*args)
        reals = real if isinstance(real, tuple) else (real,)
        fakes_ = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(reals, fakes_):
            assert f.shape == r.shape and f.dtype == r.dtype, (op, f.shape, r.shape)
            if r.numel() > 1:
                assert f.stride() == r.stride(), (op, f.stride(), r.stride())


def _pool_net(x):
    y, idx = CF.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, return_indices=True)
    up = CF.max_unpool2d(y, idx, 3, stride=2, padding=1, output_size=x.shape[-2:])
    z = CF.avg_pool2d(up + x, 2, count_include_pad=False, divisor_override=3)
    a = CF.adaptive_avg_pool2d(z, (None, 2)) + CF.adaptive_max_pool2d(z, (None, 2))
    return a * CF.adaptive_avg_pool1d(z.flatten(2), 1).unsqueeze(-1)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    x = pool_input(2, 2, 3, (9, 8), torch.float32, distinct=True)
    compiled_out = assert_compiled_matches_eager(_pool_net, (x,), backend)
    # and eager cnnops is right
    y, idx = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, return_indices=True)
    z = F.avg_pool2d(F.max_unpool2d(y, idx, 3, 2, 1, output_size=x.shape[-2:]) + x, 2, count_include_pad=False,
                     divisor_override=3)
    ref = (F.adaptive_avg_pool2d(z, (None, 2)) + F.adaptive_max_pool2d(z, (None, 2))) * \
        F.adaptive_avg_pool1d(z.flatten(2), 1).unsqueeze(-1)
    torch.testing.assert_close(compiled_out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_compile_fullgraph_1d_3d(dims):
    x = pool_input(dims, 2, 3, 8 if dims == 1 else 6, torch.float32, distinct=True)

    def f(t):
        y, idx = fn(CF, "max_pool", dims)(t, 2, return_indices=True)
        return fn(CF, "avg_pool", dims)(fn(CF, "max_unpool", dims)(y, idx, 2), 3, 1, 1) + \
            fn(CF, "adaptive_max_pool", dims)(t, t.shape[-dims:])

    assert_compiled_matches_eager(f, (x,), "aot_eager")


# --------------------------------------------------------------------------------------------
# determinism, provenance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic(layout, op):
    x = pool_input(2, 3, 16, (21, 19), torch.float32, layout)
    kw = dict(kernel_size=3, stride=2, padding=1) if op in ("max_pool", "avg_pool") else dict(output_size=5)
    out, _, _ = _run(fn(CF, op, 2), x, kw)
    go = torch.randn_like(out)
    runs = [_run(fn(CF, op, 2), x, kw, go) for _ in range(2)]
    (out1, _, grad1), (out2, _, grad2) = runs
    assert torch.equal(out1, out2) and torch.equal(grad1, grad2), "not bitwise reproducible"


POOL_ATEN = ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "_adaptive_avg_pool",
             "max_unpool", "mkldnn", "onednn", "quantized_max_pool")


def test_no_borrowed_kernels():
    """DESIGN.md: no cnnops op calls aten pooling kernels."""
    x = pool_input(2, 2, 4, (9, 8), torch.float32, distinct=True).requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _pool_net(x).sum().backward()
        for dims in (1, 3):
            t = pool_input(dims, 2, 3, 6, torch.float32).requires_grad_()
            y, idx = fn(CF, "max_pool", dims)(t, 2, return_indices=True)
            (fn(CF, "avg_pool", dims)(t, 2).sum() + fn(CF, "max_unpool", dims)(y, idx, 2).sum()
             + fn(CF, "adaptive_max_pool", dims)(t, 2).sum() + fn(CF, "adaptive_avg_pool", dims)(t, 2).sum()).backward()
    names = {e.name for e in prof.events()}
    for op in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"):
        assert any(n.startswith(f"cnnops::{op}_forward") for n in names), (op, sorted(names))
        assert any(n.startswith(f"cnnops::{op}_backward") for n in names), (op, sorted(names))
    bad = sorted(n for n in names if n.startswith("aten::") and n[6:].lstrip("_").startswith(POOL_ATEN))
    assert not bad, f"cnnops called aten pooling kernels: {bad}"


@pytest.mark.parametrize("op", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"])
@pytest.mark.parametrize("dims", DIMS)
def test_batch1_equals_unbatched(dims, op):
    x = pool_input(dims, 1, 3, 7 if dims < 3 else 5, torch.float64)
    kw = dict(kernel_size=3, stride=2, padding=1) if op in ("max_pool", "avg_pool") else dict(output_size=3)
    f = fn(CF, op, dims)
    torch.testing.assert_close(f(x[0], **kw), f(x, **kw)[0], atol=0, rtol=0)


@pytest.mark.parametrize("op", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"])
@pytest.mark.parametrize("dims", DIMS)
def test_expanded_grad_output(dims, op):
    """out.sum().backward() hands the backward a stride-0 (expanded) grad_output."""
    x = pool_input(dims, 2, 3, 8 if dims < 3 else 6, torch.float64, distinct=True)
    kw = dict(kernel_size=3, stride=2, padding=1) if op in ("max_pool", "avg_pool") else dict(output_size=3)
    extra = ()
    if op == "max_unpool":
        x, indices = fn(F, "max_pool", dims)(x, 2, return_indices=True)
        kw, extra = dict(kernel_size=2), (indices,)
    grads = []
    for module in (F, CF):
        leaf = x.clone().requires_grad_()
        fn(module, op, dims)(leaf, *extra, **kw).sum().backward()
        grads.append(leaf.grad)
    assert_close_to_torch(grads[1], grads[0], torch.float64, 9)


@pytest.mark.parametrize("dims", DIMS)
def test_max_unpool_non_contiguous_indices(dims):
    """Indices in any strides (here a transposed copy) give the same unpool."""
    x = pool_input(dims, 2, 3, 8 if dims < 3 else 6, torch.float64)
    pooled, indices = fn(F, "max_pool", dims)(x, 2, return_indices=True)
    perm = list(reversed(range(indices.dim())))
    t_indices = indices.permute(*perm).contiguous().permute(*perm)
    assert torch.equal(t_indices, indices) and not t_indices.is_contiguous()
    check_pool("max_unpool", dims, pooled, dict(kernel_size=2), torch.float64, extra_ref=(indices,),
               extra=(t_indices,), msg="transposed indices")


def test_compile_dynamic_shapes():
    """torch.compile(dynamic=True): right values and gradients across input sizes."""
    torch._dynamo.reset()
    compiled = torch.compile(_pool_net, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in [(2, 3, 9, 8), (3, 3, 11, 10)]:
        x = pool_input(2, shape[0], shape[1], shape[2:], torch.float32, distinct=True).requires_grad_()
        out = compiled(x)
        ref = _pool_net(x)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        go = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, x, go)[0], torch.autograd.grad(ref, x, go)[0],
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_compile_inductor():
    x = pool_input(2, 2, 3, (9, 8), torch.float32, distinct=True)
    assert_compiled_matches_eager(lambda t: _pool_net(t) * 2.0, (x,), "inductor")


# torch.nn.functional's documented signatures (avg_pool*, adaptive_avg_pool1d are builtins
# without an inspectable signature): parameter names, order and defaults.
_WINDOW = ["input", "kernel_size", "stride=None", "padding=0"]
SIGNATURES = {
    **{f"max_pool{d}d": _WINDOW + ["dilation=1", "ceil_mode=False", "return_indices=False"] for d in DIMS},
    "avg_pool1d": _WINDOW + ["ceil_mode=False", "count_include_pad=True"],
    **{f"avg_pool{d}d": _WINDOW + ["ceil_mode=False", "count_include_pad=True", "divisor_override=None"]
       for d in (2, 3)},
    **{f"adaptive_avg_pool{d}d": ["input", "output_size"] for d in DIMS},
    **{f"adaptive_max_pool{d}d": ["input", "output_size", "return_indices=False"] for d in DIMS},
    **{f"max_unpool{d}d": ["input", "indices", "kernel_size", "stride=None", "padding=0", "output_size=None"]
       for d in DIMS},
}


def _params(f):
    return [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
            for p in inspect.signature(f).parameters.values()]


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_signature_matches_torch(name):
    assert _params(getattr(CF, name)) == SIGNATURES[name]
    assert name in CF.__all__
    # where torch's own function is inspectable, compare with it directly
    ref = getattr(F, name if not name.startswith(("max_pool", "adaptive_max_pool")) else f"{name}_with_indices")
    try:
        expected = _params(ref)
    except (ValueError, TypeError):
        return
    assert _params(getattr(CF, name)) == expected


# --------------------------------------------------------------------------------------------
# every ISA's kernels: CNNOPS_CPU_ISA caps the choice (simd.h), in a subprocess since the choice
# is made once
# --------------------------------------------------------------------------------------------

ISA_CHECK = r"""
import sys
sys.path.insert(0, "tests")
import torch
import test_pool as t

print(torch.ops.cnnops.cpu_gemm_isa())
torch.manual_seed(0)
checked = 0
# 2d grids in both layouts; 20 and 70 channels leave vector tails after 16 and 64 channels; the
# last cases read windows too sparse for phased rows (the direct loops).
extra_max = {"sparse": dict(kernel_size=(2, 3, 1), stride=(1, 100, 1), spatial=(3, 130, 1))}
extra_avg = {"sparse": dict(kernel_size=(2, 3, 1), stride=(1, 100, 1), padding=(0, 1, 0), spatial=(3, 130, 1))}
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for layout in ("contiguous", "channels_last"):
        for c in (20, 70):
            for op, grid in (("max_pool", {**t.MAX_GRID, **extra_max}), ("avg_pool", {**t.AVG_GRID, **extra_avg})):
                for name in grid:
                    x, kw = t.grid_input_args(name, grid, 2, dtype, layout=layout, c=c)
                    if op == "max_pool":
                        kw.setdefault("return_indices", True)
                    t.check_pool(op, 2, x, kw, dtype, reduction=t.window_volume(kw, 2), msg=f"{name} c={c}")
                    checked += 1
            for op in ("adaptive_avg_pool", "adaptive_max_pool"):
                for name in t.ADAPTIVE_GRID:
                    x, size = t.adaptive_args(name, 2, dtype, layout=layout, c=c)
                    kw = dict(output_size=size, **({"return_indices": True} if op == "adaptive_max_pool" else {}))
                    t.check_pool(op, 2, x, kw, dtype, reduction=t.adaptive_reduction(x, size, 2), msg=f"{name} c={c}")
                    checked += 1
print(checked)
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_each_isa_matches_torch(isa):
    """The pooling loops are compiled per ISA (simd.h): each version against torch."""
    result = run_with_cpu_isa(isa, ISA_CHECK, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    name, checked = result.stdout.split()
    assert name == isa  # the requested ISA really ran
    assert int(checked) > 300
