"""The normalization ops called directly (torch.ops.cnnops.*_norm_forward/backward) on the CPU,
against torch: F.batch_norm / F.layer_norm / F.group_norm and their autograd gradients,
computed by torch in REFERENCE_DTYPE on the same rounded inputs (see conftest.py).

Tolerances: conftest's table, with the reduction length L of each value (the number of input
values its statistics or sums run over): the output and grad_input depend on the statistics of
their group (L = values per statistic), grad_weight/grad_bias are sums over L = values per
channel (batch norm), N * spatial (group norm) or rows (layer norm).
"""

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

import cnnops  # noqa: F401  (registers the ops)
from conftest import (CHANNELS_LAST, CPU_DTYPES, REFERENCE_DTYPE, assert_close_to_torch,
                      dtype_id, large_mean_atol, make_tensor)

ops = torch.ops.cnnops
EPS = 1e-5
ALL_MASKS = [list(m) for m in itertools.product([True, False], repeat=3)]


def skip_redundant(layout, dtype):
    """Strided-layout handling does not depend on the dtype: the non-dense layouts run in
    float32 and float64 only, which keeps the file fast."""
    if layout in ("sliced", "transposed") and dtype in (torch.bfloat16, torch.float16):
        pytest.skip("non-dense layouts are covered in float32/float64")


def layout_of(shape, layout):
    return layout if (layout != "channels_last" or len(shape) in CHANNELS_LAST) else "contiguous"


def param(n, dtype, affine=True):
    return make_tensor((n,), dtype) if affine else None


def ref(t, like=None):
    """t in the reference dtype of ``like`` (of t itself by default)."""
    return None if t is None else t.detach().to(REFERENCE_DTYPE[(like if like is not None else t).dtype])


def torch_grads(fn, x, w, b, dy):
    """Output and (dx, dw, db) of torch's fn(x, w, b) in the reference dtype of x."""
    leaves = [ref(t, x) for t in (x, w, b)]
    wanted = [t for t in leaves if t is not None]
    for t in wanted:
        t.requires_grad_(True)
    out = fn(*leaves)
    grads = dict(zip([id(t) for t in wanted], torch.autograd.grad(out, wanted, ref(dy))))
    return out.detach(), [None if t is None else grads[id(t)] for t in leaves]


def check_layout(t, like, msg):
    if like.dim() in CHANNELS_LAST and like.is_contiguous(memory_format=CHANNELS_LAST[like.dim()]) \
            and not like.is_contiguous():
        assert t.is_contiguous(memory_format=CHANNELS_LAST[like.dim()]), f"{msg}: lost channels_last {t.stride()}"


def check_grads(got, expected, x, w, b, reds, msg, mask=(True, True, True), keep_layout=True):
    names = ("grad_input", "grad_weight", "grad_bias")
    for k in range(3):
        if not mask[k]:
            assert got[k].shape == (0,), f"{msg}: unselected {names[k]} has shape {tuple(got[k].shape)}"
            continue
        like = (x, w, b)[k]
        if expected[k] is None:  # affine off: compare against torch with weight = 1, bias = 0
            continue
        assert_close_to_torch(got[k], expected[k], like.dtype, reds[k], msg=f"{msg}: {names[k]}")
    if mask[0] and keep_layout:
        check_layout(got[0], x, msg)
    elif mask[0]:
        assert got[0].is_contiguous(), f"{msg}: grad_input is not contiguous (torch's is)"


# --------------------------------------------------------------------------------------------
# batch norm
# --------------------------------------------------------------------------------------------


def run_batch_norm(shape, dtype, layout="contiguous", training=True, affine=True, momentum=0.1,
                   mask=(True, True, True), x=None, param_dtype=None):
    x = make_tensor(shape, dtype, layout_of(shape, layout)) if x is None else x
    C = shape[1]
    pd = param_dtype or dtype
    # Parameters are always given to torch (ones/zeros when affine is off) so its autograd
    # gives every gradient.
    w = make_tensor((C,), pd) if affine else torch.ones(C, dtype=pd)
    b = make_tensor((C,), pd) if affine else torch.zeros(C, dtype=pd)
    rm = make_tensor((C,), pd)
    rv = (torch.rand(C) + 0.5).to(pd)
    rm_ref, rv_ref = ref(rm, x).clone(), ref(rv, x).clone()
    rm_got, rv_got = rm.clone(), rv.clone()
    msg = f"batch_norm {tuple(shape)} {dtype_id(dtype)} {layout} training={training} affine={affine}"

    y, mean, invstd = ops.batch_norm_forward(x, w if affine else None, b if affine else None,
                                             rm_got, rv_got, training, momentum, EPS)
    dy = make_tensor(shape, dtype, layout_of(shape, layout))
    out_ref, grads_ref = torch_grads(
        lambda x_, w_, b_: F.batch_norm(x_, rm_ref, rv_ref, w_, b_, training, momentum, EPS), x, w, b, dy)
    M = x.numel() // max(C, 1)
    assert_close_to_torch(y, out_ref, dtype, M, msg=f"{msg}: output")
    check_layout(y, x, msg)
    stat_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    assert mean.dtype == stat_dtype and invstd.dtype == stat_dtype and mean.shape == (C,)
    dims = [0] + list(range(2, x.dim()))
    if training:
        xr = x.to(torch.float64)
        exp_mean, exp_var = xr.mean(dims), xr.var(dims, unbiased=False)
    else:
        exp_mean, exp_var = ref(rm).to(torch.float64), ref(rv).to(torch.float64)
    assert_close_to_torch(mean, exp_mean, stat_dtype, M, msg=f"{msg}: mean")
    assert_close_to_torch(invstd, 1 / torch.sqrt(exp_var + EPS), stat_dtype, M, msg=f"{msg}: invstd")
    assert_close_to_torch(rm_got, rm_ref, pd, M, msg=f"{msg}: running_mean")
    assert_close_to_torch(rv_got, rv_ref, pd, M, msg=f"{msg}: running_var")

    got = ops.batch_norm_backward(dy, x, w if affine else None, mean, invstd, training, list(mask))
    check_grads(got, [grads_ref[0], grads_ref[1], grads_ref[2]], x, w, b, (M, M, M), msg, mask)
    return y, got


BN_SHAPES = [(2, 3, 5, 7), (1, 1, 4, 4), (3, 5, 4, 3, 2), (7, 4), (2, 3, 11), (4, 17, 3, 1)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batch_norm(shape, layout, dtype):
    skip_redundant(layout, dtype)
    for training, affine in itertools.product([True, False], [True, False]):
        run_batch_norm(shape, dtype, layout, training, affine)


def test_batch_norm_mixed_precision():
    """bfloat16 input with float32 weight, bias and running statistics (as torch allows)."""
    run_batch_norm((2, 6, 5, 4), torch.bfloat16, "channels_last", True, True, param_dtype=torch.float32)
    run_batch_norm((2, 6, 5, 4), torch.bfloat16, "contiguous", False, True, param_dtype=torch.float32)


def test_batch_norm_running_stats_several_steps():
    C = 5
    rm, rv = torch.zeros(C), torch.ones(C)
    rm_t, rv_t = rm.double(), rv.double()
    for step in range(4):
        x = make_tensor((3, C, 4, 6), torch.float32, "channels_last" if step % 2 else "contiguous")
        ops.batch_norm_forward(x, None, None, rm, rv, True, 0.3, EPS)
        F.batch_norm(x.double(), rm_t, rv_t, None, None, True, 0.3, EPS)
        assert_close_to_torch(rm, rm_t, torch.float32, 72, msg=f"step {step}: running_mean")
        assert_close_to_torch(rv, rv_t, torch.float32, 72, msg=f"step {step}: running_var")


def test_batch_norm_without_running_stats():
    x = make_tensor((4, 3, 5), torch.float64)
    y, mean, invstd = ops.batch_norm_forward(x, None, None, None, None, True, 0.1, EPS)
    assert_close_to_torch(y, F.batch_norm(x, None, None, None, None, True, 0.1, EPS), torch.float64, 20)


def test_batch_norm_empty_batch():
    """Batch 0 in training: empty output, running statistics untouched (as torch)."""
    for layout in ("contiguous", "channels_last"):
        memory_format = CHANNELS_LAST[4] if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(0, 3, 4, 4).contiguous(memory_format=memory_format)
        rm, rv = torch.randn(3), torch.rand(3)
        rm_t, rv_t = rm.clone(), rv.clone()
        y, mean, invstd = ops.batch_norm_forward(x, torch.ones(3), torch.zeros(3), rm, rv, True, 0.1, EPS)
        F.batch_norm(x, rm_t, rv_t, torch.ones(3), torch.zeros(3), True, 0.1, EPS)
        assert y.shape == x.shape and mean.shape == (3,)
        assert torch.equal(rm, rm_t) and torch.equal(rv, rv_t)
        dx, dw, db = ops.batch_norm_backward(torch.zeros_like(x), x, torch.ones(3), mean, invstd, True, [True] * 3)
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))


# --------------------------------------------------------------------------------------------
# group norm
# --------------------------------------------------------------------------------------------


def run_group_norm(shape, groups, dtype, layout="contiguous", affine=True, mask=(True, True, True), x=None):
    x = make_tensor(shape, dtype, layout_of(shape, layout)) if x is None else x
    N, C = shape[0], shape[1]
    w = make_tensor((C,), dtype) if affine else torch.ones(C, dtype=dtype)
    b = make_tensor((C,), dtype) if affine else torch.zeros(C, dtype=dtype)
    msg = f"group_norm {tuple(shape)} G={groups} {dtype_id(dtype)} {layout} affine={affine}"
    y, mean, invstd = ops.group_norm_forward(x, w if affine else None, b if affine else None, groups, EPS)
    dy = make_tensor(shape, dtype, layout_of(shape, layout))
    out_ref, grads_ref = torch_grads(lambda x_, w_, b_: F.group_norm(x_, groups, w_, b_, EPS), x, w, b, dy)
    S = x.numel() // max(N * C, 1)
    L = (C // groups) * S
    assert_close_to_torch(y, out_ref, dtype, L, msg=f"{msg}: output")
    check_layout(y, x, msg)
    stat_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    xr = x.to(torch.float64).reshape(N, groups, -1)
    assert mean.shape == (N, groups) and mean.dtype == stat_dtype
    assert_close_to_torch(mean, xr.mean(-1), stat_dtype, L, msg=f"{msg}: mean")
    assert_close_to_torch(invstd, 1 / torch.sqrt(xr.var(-1, unbiased=False) + EPS), stat_dtype, L, msg=f"{msg}: invstd")
    got = ops.group_norm_backward(dy, x, mean, invstd, w if affine else None, groups, list(mask))
    check_grads(got, grads_ref, x, w, b, (L, N * S, N * S), msg, mask)
    return y, got


GN_CASES = [((2, 6, 5, 7), 3), ((2, 6, 5, 7), 1), ((2, 6, 5, 7), 6), ((1, 4, 9), 2), ((3, 8, 3, 2, 4), 4),
            ((5, 4), 2), ((2, 64, 7, 7), 32), ((1, 1, 4, 4), 1)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape,groups", GN_CASES, ids=str)
def test_group_norm(shape, groups, layout, dtype):
    skip_redundant(layout, dtype)
    for affine in (True, False):
        run_group_norm(shape, groups, dtype, layout, affine)


def test_group_norm_empty_batch():
    x = torch.randn(0, 6, 3, 3)
    y, mean, invstd = ops.group_norm_forward(x, None, None, 3, EPS)
    assert y.shape == x.shape and mean.shape == (0, 3)
    dx, dw, db = ops.group_norm_backward(x, x, mean, invstd, torch.ones(6), 3, [True] * 3)
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(6)) and torch.equal(db, torch.zeros(6))


# --------------------------------------------------------------------------------------------
# layer norm
# --------------------------------------------------------------------------------------------


def run_layer_norm(shape, k, dtype, layout="contiguous", affine=(True, True), mask=(True, True, True), x=None):
    x = make_tensor(shape, dtype, layout_of(shape, layout)) if x is None else x
    ns = list(shape[len(shape) - k:])
    w = make_tensor(ns, dtype) if affine[0] else torch.ones(ns, dtype=dtype)
    b = make_tensor(ns, dtype) if affine[1] else torch.zeros(ns, dtype=dtype)
    msg = f"layer_norm {tuple(shape)} {ns} {dtype_id(dtype)} {layout} affine={affine}"
    y, mean, invstd = ops.layer_norm_forward(x, ns, w if affine[0] else None, b if affine[1] else None, EPS)
    dy = make_tensor(shape, dtype, layout_of(shape, layout))
    out_ref, grads_ref = torch_grads(lambda x_, w_, b_: F.layer_norm(x_, ns, w_, b_, EPS), x, w, b, dy)
    K = math.prod(ns)
    rows = x.numel() // max(K, 1)
    assert_close_to_torch(y, out_ref, dtype, K, msg=f"{msg}: output")
    assert y.is_contiguous(), f"{msg}: output is not contiguous (torch's is)"
    stat_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    lead = tuple(shape[:len(shape) - k])
    assert mean.shape == lead and invstd.shape == lead and mean.dtype == stat_dtype
    xr = x.to(torch.float64).reshape(rows, K)
    assert_close_to_torch(mean, xr.mean(-1).reshape(lead), stat_dtype, K, msg=f"{msg}: mean")
    assert_close_to_torch(invstd, (1 / torch.sqrt(xr.var(-1, unbiased=False) + EPS)).reshape(lead),
                          stat_dtype, K, msg=f"{msg}: invstd")
    got = ops.layer_norm_backward(dy, x, ns, mean, invstd, w if affine[0] else None, list(mask))
    check_grads(got, grads_ref, x, w, b, (K, rows, rows), msg, mask, keep_layout=False)
    return y, got


LN_CASES = [((4, 7), 1), ((2, 3, 5, 7), 1), ((2, 3, 5, 7), 3), ((2, 3, 5, 7), 4), ((1, 130), 1),
            ((3, 65), 1), ((6, 4, 5), 2)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape,k", LN_CASES, ids=str)
def test_layer_norm(shape, k, layout, dtype):
    skip_redundant(layout, dtype)
    for affine in ((True, True), (False, False), (True, False), (False, True)):
        run_layer_norm(shape, k, dtype, layout, affine)


def test_layer_norm_empty_rows():
    x = torch.randn(0, 5)
    y, mean, invstd = ops.layer_norm_forward(x, [5], None, None, EPS)
    assert y.shape == (0, 5) and mean.shape == (0,)
    dx, dw, db = ops.layer_norm_backward(x, x, [5], mean, invstd, torch.ones(5), [True] * 3)
    assert dx.shape == (0, 5) and torch.equal(dw, torch.zeros(5)) and torch.equal(db, torch.zeros(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("C", [64, 80, 136])
def test_channels_last_wide(C, dtype):
    """Channels-last kernels run blocks of 64 channels in registers and the rest from memory:
    C = 64, 64 + 16 and 2 * 64 + 8 cover both and their seam."""
    run_batch_norm((3, C, 5, 4), dtype, "channels_last", True, True)
    run_batch_norm((3, C, 5, 4), dtype, "channels_last", False, True)
    run_group_norm((3, C, 5, 4), 8, dtype, "channels_last", True)
    run_group_norm((3, C, 5, 4), C, dtype, "channels_last", True)


# --------------------------------------------------------------------------------------------
# random shapes, output masks
# --------------------------------------------------------------------------------------------


def test_random_shapes():
    rng = random.Random(7)
    for _ in range(12):
        dims = rng.choice([0, 1, 2, 3])
        N, C = rng.randint(1, 5), rng.choice([1, 2, 3, 6, 8, 12, 17])
        shape = (N, C) + tuple(rng.randint(1, 9) for _ in range(dims))
        layout = rng.choice(["contiguous", "channels_last", "sliced"])
        dtype = rng.choice([torch.float32, torch.float64])
        if math.prod(shape) // C > 1:
            run_batch_norm(shape, dtype, layout, rng.random() < 0.7, rng.random() < 0.7)
        groups = rng.choice([g for g in range(1, C + 1) if C % g == 0])
        run_group_norm(shape, groups, dtype, layout, rng.random() < 0.7)
        run_layer_norm(shape, rng.randint(1, len(shape) - 1), dtype, layout, (rng.random() < 0.7, rng.random() < 0.7))


@pytest.mark.parametrize("mask", ALL_MASKS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_masks(mask, layout):
    run_batch_norm((3, 4, 5, 6), torch.float64, layout, True, True, mask=mask)
    run_batch_norm((3, 4, 5, 6), torch.float64, layout, False, True, mask=mask)
    run_group_norm((3, 4, 5, 6), 2, torch.float64, layout, True, mask=mask)
    run_layer_norm((3, 4, 5, 6), 2, torch.float64, layout, (True, True), mask=mask)


# --------------------------------------------------------------------------------------------
# numerics: large mean, determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean(layout):
    """Values around 1e4 with unit spread, float32: Welford keeps the variance (E[x^2] - E[x]^2
    would lose it entirely). The float32 mean itself is only known to an ulp of 1e4, so the
    bound is conftest's large_mean_atol rather than the unit-scale table."""
    shape = (4, 8, 12, 10)
    x = (1e4 + torch.randn(shape, dtype=torch.float64)).float()
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    dy = make_tensor(shape, torch.float32, layout)
    atol = large_mean_atol(torch.float32, 1e4, 1.0)

    def close(got, exp, L, what):
        torch.testing.assert_close(got.double(), exp.double(), atol=atol * math.sqrt(L), rtol=1e-3,
                                   msg=lambda m: f"large mean {layout} {what}\n{m}")

    cases = [
        ("batch_norm", lambda: ops.batch_norm_forward(x, None, None, None, None, True, 0.1, EPS),
         lambda x_: F.batch_norm(x_, None, None, None, None, True, 0.1, EPS),
         lambda m, i: ops.batch_norm_backward(dy, x, None, m, i, True, [True, False, False])[0], 4 * 120),
        ("group_norm", lambda: ops.group_norm_forward(x, None, None, 4, EPS),
         lambda x_: F.group_norm(x_, 4, None, None, EPS),
         lambda m, i: ops.group_norm_backward(dy, x, m, i, None, 4, [True, False, False])[0], 2 * 120),
        ("instance_norm", lambda: ops.group_norm_forward(x, None, None, 8, EPS),
         lambda x_: F.group_norm(x_, 8, None, None, EPS),
         lambda m, i: ops.group_norm_backward(dy, x, m, i, None, 8, [True, False, False])[0], 120),
        ("layer_norm", lambda: ops.layer_norm_forward(x, [8, 12, 10], None, None, EPS),
         lambda x_: F.layer_norm(x_, [8, 12, 10], None, None, EPS),
         lambda m, i: ops.layer_norm_backward(dy, x, [8, 12, 10], m, i, None, [True, False, False])[0], 960),
    ]
    for name, fwd, torch_fn, bwd, L in cases:
        y, m, i = fwd()
        xr = x.double().requires_grad_()
        yr = torch_fn(xr)
        (gr,) = torch.autograd.grad(yr, xr, dy.double())
        close(y, yr, L, f"{name} output")
        assert y.float().std().item() == pytest.approx(1.0, abs=0.05), f"{name}: output not normalized"
        close(bwd(m, i), gr, L, f"{name} grad_input")


def _all_outputs(shape, layout, dtype):
    x = make_tensor(shape, dtype, layout)
    dy = make_tensor(shape, dtype, layout)
    C = shape[1]
    w, b = make_tensor((C,), dtype), make_tensor((C,), dtype)
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    outs = []
    y, m, i = ops.batch_norm_forward(x, w, b, rm, rv, True, 0.1, EPS)
    outs += [y, m, i, rm, rv, *ops.batch_norm_backward(dy, x, w, m, i, True, [True] * 3)]
    for g in (1, 4, C):
        y, m, i = ops.group_norm_forward(x, w, b, g, EPS)
        outs += [y, m, i, *ops.group_norm_backward(dy, x, m, i, w, g, [True] * 3)]
    ns = list(shape[1:]) if layout == "contiguous" else [shape[-1]]
    lw, lb = make_tensor(ns, dtype), make_tensor(ns, dtype)
    y, m, i = ops.layer_norm_forward(x, ns, lw, lb, EPS)
    outs += [y, m, i, *ops.layer_norm_backward(dy, x, ns, m, i, lw, [True] * 3)]
    return outs


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic_across_thread_counts(layout):
    """Fixed partitions merged in a fixed order: bitwise the same results with 1 and 2 threads
    (shapes large enough that every reduction is split into several parallel pieces)."""
    shape = (3, 16, 33, 40)  # N=3: 1 thread fuses per image, 2 threads run the split passes
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(3)
            results.append(_all_outputs(shape, layout, torch.float32))
    finally:
        torch.set_num_threads(threads)
    for k, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"output {k} differs between 1 and 2 threads"


def test_layer_norm_short_rows_deterministic_and_correct():
    """ConvNeXt-style layer norm over the last dim of 64: the short-row kernels handle rows in
    groups (4 forward, 8 backward) whose alignment depends on the thread partition; the results
    must still be bitwise the same for 1 and 2 threads, and match torch (large means: see
    test_large_mean)."""
    torch.manual_seed(5)
    x = torch.randn(3, 17, 23, 64) + 3  # 1173 rows: not a multiple of the group sizes
    dy = torch.randn_like(x)
    w, b = torch.randn(64), torch.randn(64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, m, i = ops.layer_norm_forward(x, [64], w, b, EPS)
            results.append([y, m, i, *ops.layer_norm_backward(dy, x, [64], m, i, w, [True] * 3)])
    finally:
        torch.set_num_threads(threads)
    for k, (a, c) in enumerate(zip(*results)):
        assert torch.equal(a, c), f"output {k} differs between 1 and 2 threads"
    xr, wr, br = (t.double().requires_grad_(True) for t in (x, w, b))
    yr = F.layer_norm(xr, [64], wr, br, EPS)
    grads = torch.autograd.grad(yr, (xr, wr, br), dy.double())
    y, _, _, dx, dw, db = results[0]
    torch.testing.assert_close(y.double(), yr.detach(), rtol=1e-4, atol=1e-4)
    for got, ref, name in zip((dx, dw, db), grads, ("dx", "dw", "db")):
        torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------


def _raises(fn, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        fn()


def test_errors():
    x = torch.randn(2, 6, 3, 4)
    m6, i6 = torch.zeros(6), torch.ones(6)
    _raises(lambda: ops.batch_norm_forward(x, torch.ones(4), None, None, None, True, 0.1, EPS),
            "weight should contain 6 elements not 4")
    _raises(lambda: ops.batch_norm_forward(x, None, torch.ones(7), None, None, True, 0.1, EPS),
            "bias should contain 6 elements not 7")
    _raises(lambda: ops.batch_norm_forward(x, None, None, torch.zeros(4), torch.ones(6), True, 0.1, EPS),
            "running_mean should contain 6 elements not 4")
    _raises(lambda: ops.batch_norm_forward(x, None, None, torch.zeros(6), torch.ones(5), False, 0.1, EPS),
            "running_var should contain 6 elements not 5")
    _raises(lambda: ops.batch_norm_forward(x, None, None, None, None, False, 0.1, EPS),
            "running_mean and running_var must be given")
    _raises(lambda: ops.batch_norm_forward(torch.randn(5), None, None, None, None, True, 0.1, EPS),
            r"N x C x \*")
    _raises(lambda: ops.batch_norm_forward(x, torch.ones(6, dtype=torch.float64), None, None, None, True, 0.1, EPS),
            "weight to have the input's dtype")
    _raises(lambda: ops.batch_norm_forward(x.long(), None, None, None, None, True, 0.1, EPS), "floating dtype")
    _raises(lambda: ops.batch_norm_backward(torch.randn(2, 6, 3, 5), x, None, m6, i6, True, [True] * 3),
            "grad_output: expected size")
    _raises(lambda: ops.batch_norm_backward(x.double(), x, None, m6, i6, True, [True] * 3),
            "grad_output: expected dtype")
    _raises(lambda: ops.batch_norm_backward(x, x, None, torch.zeros(5), i6, True, [True] * 3), "mean: expected size")
    _raises(lambda: ops.batch_norm_backward(x, x, None, m6, i6.double(), True, [True] * 3), "invstd: expected dtype")

    _raises(lambda: ops.group_norm_forward(x, None, None, 4, EPS),
            r"Expected number of channels in input to be divisible by num_groups, but got input of shape "
            r"\[2, 6, 3, 4\] and num_groups=4")
    _raises(lambda: ops.group_norm_forward(x, None, None, 0, EPS), "num_groups to be positive")
    _raises(lambda: ops.group_norm_forward(x, torch.ones(4), None, 3, EPS),
            "Expected weight to be a vector of size equal to the number of channels in input")
    _raises(lambda: ops.group_norm_forward(x, None, torch.ones(3), 3, EPS),
            "Expected bias to be a vector of size equal to the number of channels")
    _raises(lambda: ops.group_norm_backward(x, x, torch.zeros(2, 2), torch.ones(2, 3), None, 3, [True] * 3),
            "mean: expected size")

    _raises(lambda: ops.layer_norm_forward(x, [5], None, None, EPS),
            r"Given normalized_shape=\[5\], expected input with shape \[\*, 5\], but got input of size\[2, 6, 3, 4\]")
    _raises(lambda: ops.layer_norm_forward(x, [2, 6, 3, 4, 1], None, None, EPS), "Given normalized_shape")
    _raises(lambda: ops.layer_norm_forward(x, [], None, None, EPS), "at least 1-dimensional")
    _raises(lambda: ops.layer_norm_forward(x, [3, 4], torch.ones(4), None, EPS),
            r"Expected weight to be of same shape as normalized_shape, but got weight of shape \[4\]")
    _raises(lambda: ops.layer_norm_backward(x, x, [4], torch.zeros(2, 6), torch.ones(2, 6, 3), None, [True] * 3),
            "mean: expected size")
