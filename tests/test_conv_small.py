"""Differential tests of the CPU convolution paths for small spatial sizes and small batches,
against torch.nn.functional:

- windows that cover the whole input (1x1 convolutions on 1x1 maps, as in squeeze-excitation
  blocks; k x k kernels on k x k maps): dot products read in place (csrc/cpu/conv_small.cpp);
- batch 1 with few output positions, where the output channels are split between threads
  (NCHW: rows of the GEMM; channels-last: its columns), at odd channel counts;
- the packed-weight cache used under no_grad (csrc/cpu/weight_cache.h): an updated, replaced
  or freed-and-reallocated weight must never be served from the cache.

Every expected value comes from torch.
"""

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_torch, check_conv_against_torch, conv_tensors, dtype_id

import cnnops
import cnnops.functional

DTYPES = [torch.float32, torch.float64]


def cache_info():
    """[entries, bytes, hits, misses] of the weight cache."""
    return list(torch.ops.cnnops.cpu_weight_cache_info())


# ---------------------------------------------------------------------------------------------
# windows covering the whole input
# ---------------------------------------------------------------------------------------------

WINDOW = {  # dims, n, cin, cout, spatial, kernel, groups, bias
    "se_reduce": (2, 8, 576, 144, 1, 1, 1, True),
    "se_expand": (2, 8, 144, 576, 1, 1, 1, True),
    "batch1": (2, 1, 72, 24, 1, 1, 1, True),
    "odd_channels": (2, 5, 37, 13, 1, 1, 1, False),
    "one_channel": (2, 3, 1, 1, 1, 1, 1, True),
    "groups3": (2, 6, 9, 15, 1, 1, 3, True),
    "kernel_is_input": (2, 3, 5, 7, 3, 3, 1, True),
    "kernel_is_input_rect": (2, 2, 4, 6, (2, 5), (2, 5), 1, True),
    "conv1d": (1, 4, 33, 17, 1, 1, 1, True),
    "conv3d": (3, 4, 10, 6, 2, 2, 1, True),
    "batch_past_dot_limit": (2, 70, 24, 40, 1, 1, 1, True),
    "batch0": (2, 0, 8, 4, 1, 1, 1, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(WINDOW))
def test_window_covers_input(name, dtype):
    """Forward and both gradients; the gradients through conv_small.cpp's window kernels (dX and
    dW: two calls) wherever the forward takes the dot path."""
    dims, n, cin, cout, spatial, kernel, groups, bias = WINDOW[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, bias, dtype)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(True)
    before = cnnops._C._cpu_window_backward_calls()
    check_conv_against_torch(dims, x, w, b, {"groups": groups}, dtype, msg=name)
    window = n <= 64 and n > 0  # use_window_dot's batch limit; batch 0 computes nothing
    assert cnnops._C._cpu_window_backward_calls() - before == (2 if window else 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_window_gradients_channels_last_weight(dtype):
    """A 3x3 kernel on a 3x3 map with a channels-last weight: the window kernels read the weight
    converted, and grad_weight comes back in the weight's layout."""
    x, w, b = conv_tensors(2, 3, 5, 7, 3, 3, 1, True, dtype, weight_layout="channels_last")
    for t in (x, w, b):
        t.requires_grad_(True)
    before = cnnops._C._cpu_window_backward_calls()
    check_conv_against_torch(2, x, w, b, {}, dtype, msg="channels_last weight")
    assert cnnops._C._cpu_window_backward_calls() - before == 2
    grad_w = torch.autograd.grad(cnnops.functional.conv2d(x, w, b).sum(), w)[0]
    assert grad_w.is_contiguous(memory_format=torch.channels_last) and not grad_w.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_window_channels_last(dtype):
    # 1x1 maps: channels_last and contiguous have the same memory; a 3x3 map in channels_last
    # must not take the dot path (its (c, tap) order differs from the weight's).
    for spatial, kernel in ((1, 1), (3, 3)):
        x, w, b = conv_tensors(2, 4, 12, 10, spatial, kernel, 1, True, dtype, layout="channels_last")
        for t in (x, w, b):
            t.requires_grad_(True)
        check_conv_against_torch(2, x, w, b, {}, dtype, msg=f"channels_last {spatial}", check_channels_last=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_window_relu_and_near_misses(dtype):
    # The fused ReLU; and geometries that look alike but are not the whole window: padding,
    # dilation, stride (each must match torch whatever path it takes).
    x, w, b = conv_tensors(2, 3, 16, 8, 1, 1, 1, True, dtype)
    got = torch.ops.cnnops.conv_forward(x, w, b, [1, 1], [0, 0], [1, 1], 1, "relu")
    torch.testing.assert_close(got, F.relu(F.conv2d(x, w, b)), rtol=1e-5, atol=1e-5)
    for kwargs, spatial, kernel in (({"padding": 1}, 1, 3), ({"dilation": 2}, 5, 3), ({"stride": 2}, 3, 3),
                                    ({"padding": 1}, 3, 3)):
        x, w, b = conv_tensors(2, 3, 6, 5, spatial, kernel, 1, True, dtype)
        for t in (x, w, b):
            t.requires_grad_(True)
        check_conv_against_torch(2, x, w, b, kwargs, dtype, msg=f"near miss {kwargs}")


# ---------------------------------------------------------------------------------------------
# batch 1: output channels split between threads
# ---------------------------------------------------------------------------------------------

SPLIT = {  # n, cin, cout, spatial, kernel, stride, padding, groups
    "7x7_odd": (1, 33, 131, 7, 3, 1, 1, 1),
    "7x7_s2_odd": (1, 19, 67, 13, 3, 2, 1, 1),
    "4x4_groups_odd": (1, 10, 74, 4, 3, 1, 1, 2),
    "1x1_odd": (1, 45, 77, 7, 1, 1, 0, 1),
    "batch2_odd": (2, 9, 41, 5, 3, 1, 1, 1),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(SPLIT))
def test_batch1_channel_split(name, dtype, layout):
    n, cin, cout, spatial, kernel, stride, padding, groups = SPLIT[name]
    x, w, b = conv_tensors(2, n, cin, cout, spatial, kernel, groups, True, dtype, layout=layout)
    for t in (x, w, b):
        t.requires_grad_(True)
    kwargs = {"stride": stride, "padding": padding, "groups": groups}
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, 2, 3}):  # the split depends on the thread count; the result must not
            torch.set_num_threads(t)
            check_conv_against_torch(2, x, w, b, kwargs, dtype, msg=f"{name} threads={t}")
            with torch.no_grad():
                out = cnnops.functional.conv2d(x, w, b, **kwargs)
            if t == 1:
                first = out
            else:
                assert torch.equal(out, first), f"{name}: result depends on the thread count"
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# the packed-weight cache
# ---------------------------------------------------------------------------------------------

CACHE_CASES = {  # layout, n, cin, cout, spatial, kernel, padding: each cached kernel
    "nchw_gemm": ("contiguous", 2, 8, 12, 7, 3, 1),  # im2col GEMM (7x7: not the shifted grid)
    "nchw_shifted": ("contiguous", 2, 8, 12, 16, 3, 1),  # shifted-window grid
    "nchw_strided": ("contiguous", 2, 8, 12, 9, 3, 0),
    "nhwc_gemm": ("channels_last", 1, 8, 12, 7, 3, 1),
    "nhwc_shifted": ("channels_last", 2, 8, 12, 16, 3, 1),
}


def conv_case(name, dtype=torch.float64):
    layout, n, cin, cout, spatial, kernel, padding = CACHE_CASES[name]
    x, w, b = conv_tensors(2, n, cin, cout, spatial, kernel, 1, True, dtype, layout=layout)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    return x, w, b, {"padding": padding}


def expect(x, w, b, kwargs):
    with torch.no_grad():
        return F.conv2d(x, w, b, **kwargs)


def run(x, w, b, kwargs):
    with torch.no_grad():
        return cnnops.functional.conv2d(x, w, b, **kwargs)


@pytest.fixture
def fresh_cache():
    torch.ops.cnnops.cpu_weight_cache_clear()
    previous = torch.ops.cnnops.cpu_weight_cache_enable(True)
    yield
    torch.ops.cnnops.cpu_weight_cache_enable(previous)
    torch.ops.cnnops.cpu_weight_cache_clear()


@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_cache_hit_and_inplace_update(name, fresh_cache):
    x, w, b, kwargs = conv_case(name)
    torch.testing.assert_close(run(x, w, b, kwargs), expect(x, w, b, kwargs))
    entries, _, hits, misses = cache_info()
    assert entries == 1 and misses >= 1
    torch.testing.assert_close(run(x, w, b, kwargs), expect(x, w, b, kwargs))
    assert cache_info()[2] == hits + 1, "the second call with the same weight should hit the cache"
    # In-place updates bump the version counter: the next call must see them.
    with torch.no_grad():
        w.mul_(-2.0).add_(0.5)
    torch.testing.assert_close(run(x, w, b, kwargs), expect(x, w, b, kwargs))
    w[0].zero_()  # through a view: the version counter is shared
    torch.testing.assert_close(run(x, w, b, kwargs), expect(x, w, b, kwargs))
    assert cache_info()[0] == 1, "older versions of the weight must be dropped"


def test_cache_optimizer_step_and_load_state_dict(fresh_cache):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 10, 3, padding=1).double()
    model = cnnops.convert(torch.nn.Sequential(conv).eval())
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        other = torch.nn.Conv2d(6, 10, 3, padding=1).double()
        model.load_state_dict({"0.weight": other.weight, "0.bias": other.bias})
        torch.testing.assert_close(model(x), F.conv2d(x, other.weight, other.bias, padding=1))


def test_cache_storage_swapped(fresh_cache):
    # param.data = t (what module.to() does) keeps the TensorImpl and its version counter but
    # swaps the storage: the cache must miss.
    x, w, b, kwargs = conv_case("nchw_gemm")
    run(x, w, b, kwargs)
    w.data = torch.randn_like(w)
    torch.testing.assert_close(run(x, w, b, kwargs), expect(x, w, b, kwargs))
    w.set_(torch.randn_like(w))
    torch.testing.assert_close(run(x, w, b, kwargs), expect(x, w, b, kwargs))


def test_cache_freed_weight_reallocated_at_same_address(fresh_cache):
    # A weight freed after a cached call, and a new one allocated at its address (the allocator
    # hands freed blocks back): the new weight must not get the old packing.
    x, _, b, kwargs = conv_case("nchw_gemm")
    shape = (12, 8, 3, 3)
    for scenario in range(50):
        w = torch.randn(shape, dtype=torch.float64)
        run(x, w, b, kwargs)
        address = w.data_ptr()
        del w
        gc.collect()
        kept = []  # held, so each new tensor gets a block not handed out already
        for attempt in range(40):
            kept.append(torch.full(shape, float(scenario * 40 + attempt + 1), dtype=torch.float64))
            if kept[-1].data_ptr() == address:
                w2 = kept[-1]
                torch.testing.assert_close(run(x, w2, b, kwargs), expect(x, w2, b, kwargs))
                return
    pytest.skip("the allocator never reused a freed weight's address")


def test_cache_grad_mode_and_inference_mode(fresh_cache):
    x, w, b, kwargs = conv_case("nchw_shifted")
    w.requires_grad_(True)
    before = cache_info()
    out = cnnops.functional.conv2d(x, w, b, **kwargs)  # grad mode on: no caching
    assert cache_info() == before
    torch.testing.assert_close(out, F.conv2d(x, w, b, **kwargs))
    run(x, w, b, kwargs)
    with torch.no_grad():
        w.add_(1.0)
    torch.testing.assert_close(cnnops.functional.conv2d(x, w, b, **kwargs), F.conv2d(x, w, b, **kwargs))
    torch.testing.assert_close(run(x, w, b, kwargs), expect(x, w, b, kwargs))
    # In inference mode, in-place updates of normal tensors still bump their version counter.
    with torch.inference_mode():
        run(x, w, b, kwargs)
        w.mul_(3.0)
        torch.testing.assert_close(run(x, w, b, kwargs), expect(x, w, b, kwargs))
        w_inf = torch.randn_like(w)  # an inference tensor: no version counter, never cached
        entries = cache_info()[0]
        torch.testing.assert_close(run(x, w_inf, b, kwargs), expect(x, w_inf, b, kwargs))
        assert cache_info()[0] == entries


def test_cache_disabled_and_bfloat16(fresh_cache):
    x, w, b, kwargs = conv_case("nchw_gemm")
    torch.ops.cnnops.cpu_weight_cache_enable(False)
    run(x, w, b, kwargs)
    assert cache_info()[0] == 0
    torch.ops.cnnops.cpu_weight_cache_enable(True)
    # A bfloat16 weight runs as a float copy; the cache keys on the bfloat16 tensor.
    xb, wb, bb = (t.to(torch.bfloat16) for t in (x, w, b))
    for _ in range(2):
        got = run(xb, wb, bb, kwargs)
        torch.testing.assert_close(got, expect(xb.float(), wb.float(), bb.float(), kwargs).bfloat16(),
                                   rtol=1.6e-2, atol=5e-2)
    with torch.no_grad():
        wb.neg_()
    torch.testing.assert_close(run(xb, wb, bb, kwargs), expect(xb.float(), wb.float(), bb.float(), kwargs).bfloat16(),
                               rtol=1.6e-2, atol=5e-2)


def test_cache_converted_model_float64(fresh_cache):
    # A converted model under no_grad, run twice (the second from the cache), then with its
    # weights changed in place: float64 against torch.nn every time.
    import copy

    torch.manual_seed(0)
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 7, stride=2, padding=3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, stride=2, padding=1),
        torch.nn.Conv2d(32, 64, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(64, 16, 1),
    ).double().eval()
    model = cnnops.convert(copy.deepcopy(ref))
    for layout in (torch.contiguous_format, torch.channels_last):
        ref, model = ref.to(memory_format=layout), model.to(memory_format=layout)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=layout)
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(model(x), ref(x), rtol=1e-10, atol=1e-10)
            for p, q in zip(ref.parameters(), model.parameters(), strict=True):
                p.mul_(0.5)
                q.mul_(0.5)
            torch.testing.assert_close(model(x), ref(x), rtol=1e-10, atol=1e-10)


def test_cache_off_by_default_sees_writes_through_data():
    """The cache is opt-in (cnnops.backends.cpu.cache_packed_weights): a write through `.data`
    bumps no version counter, so only with the cache off is it always seen. In a fresh process,
    so no other test's setting leaks in."""
    code = textwrap.dedent("""
        import torch, cnnops
        assert not cnnops.backends.cpu.cache_packed_weights
        x, w = torch.randn(2, 16, 9, 9), torch.randn(32, 16, 3, 3)
        with torch.no_grad():
            cnnops.functional.conv2d(x, w, padding=1)
            w.data.mul_(2)  # no version bump
            got = cnnops.functional.conv2d(x, w, padding=1)
        torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
        assert list(torch.ops.cnnops.cpu_weight_cache_info())[0] == 0
        with cnnops.backends.cpu.flags(cache_packed_weights=True):
            assert cnnops.backends.cpu.cache_packed_weights
        assert not cnnops.backends.cpu.cache_packed_weights
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "CNNOPS_WEIGHT_CACHE"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["7x7_odd", "1x1_odd", "4x4_groups_odd"])
def test_batch1_split_weight_in_place_or_cached_packed(name, weight_layout, fresh_cache):
    """The split forward reads the weight in place, or packed when the weight cache holds it
    (conv.cpp conv_forward_gemm_split): both against torch, and both the same bits. A
    channels-last weight is read where it lies in either case (WeightOrder::TapChannel)."""
    n, cin, cout, spatial, kernel, stride, padding, groups = SPLIT[name]
    x, w, b = conv_tensors(2, n, cin, cout, spatial, kernel, groups, True, torch.float32, weight_layout=weight_layout)
    conversions = cnnops._C._cpu_conv_weight_conversions()
    kwargs = {"stride": stride, "padding": padding, "groups": groups}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # two tasks: the output channels are split
        torch.ops.cnnops.cpu_weight_cache_enable(False)
        in_place = run(x, w, b, kwargs)
        torch.ops.cnnops.cpu_weight_cache_enable(True)
        run(x, w, b, kwargs)  # packs and stores
        hits = cache_info()[2]
        packed = run(x, w, b, kwargs)
        assert cache_info()[2] == hits + 1, "the second call was not served packed"
    finally:
        torch.set_num_threads(threads)
    assert cnnops._C._cpu_conv_weight_conversions() == conversions, "the weight was converted"
    reference = F.conv2d(x.double(), w.double(), b.double(), **kwargs)
    assert_close_to_torch(in_place, reference, torch.float32, reduction=cin // groups * kernel * kernel)
    assert torch.equal(in_place, packed)
