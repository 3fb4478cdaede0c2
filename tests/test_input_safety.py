"""Regression tests for issue 14, one group per class of malformed input that used to crash or
read out of bounds, each checked against torch's outcome:
1. a kernel with a zero-size dim; 2. padding near 2^63; 3. dilation * (kernel - 1) past int64;
4. a huge pooling stride or kernel (an allocation sized from overflowed numbers, thrown inside a
SIMD kernel); 5. exceptions thrown inside SIMD kernels, which aborted while they were
target_clones functions (the kernels get their buffers from their callers: the class-4 calls run
in a subprocess here, so an abort fails the test); 6. max-pool backward on windows lying wholly
in the padding.
Also: overflowing sizes that raw ops accepted, and norm_math.h's single-element layer norm."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import cnnops.functional as C

B = 2**63 - 1


def same_error(fn_torch, fn_cnnops):
    """cnnops raises the exception type torch raises."""
    with pytest.raises(Exception) as theirs:
        fn_torch()
    with pytest.raises(theirs.type):
        fn_cnnops()


# 1. zero-size kernel dims -------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [(0, 0), (0, 3), (3, 0)])
def test_conv2d_zero_size_kernel(kernel):
    x, w = torch.randn(1, 1, 3, 3), torch.randn((1, 1) + kernel)
    same_error(lambda: F.conv2d(x, w), lambda: C.conv2d(x, w))


def test_conv1d_zero_size_kernel():
    x, w = torch.randn(2, 3, 7), torch.randn(4, 3, 0)
    same_error(lambda: F.conv1d(x, w), lambda: C.conv1d(x, w))
    with pytest.raises(RuntimeError, match="kernel size should be greater than zero"):
        torch.ops.cnnops.conv_forward(x, w, None, [1], [0], [1], 1)


# 2. padding near 2^63 -----------------------------------------------------------------------
@pytest.mark.parametrize("padding", [B, 2**62, 2**62 + 1])
def test_conv_padding_near_int64_max(padding):
    x, w = torch.randn(2, 3, 7), torch.randn(4, 3, 3)
    same_error(lambda: F.conv1d(x, w, padding=padding), lambda: C.conv1d(x, w, padding=padding))
    with pytest.raises(RuntimeError, match="expected padding to be at most"):
        torch.ops.cnnops.conv_forward(x, w, None, [1], [padding], [1], 1)


def test_conv_padded_buffer_past_int64_is_a_named_gap():
    # torch pads implicitly and returns (1, 1, 2, 2); cnnops' padded copy cannot be addressed
    x, w = torch.randn(1, 1, 7, 7), torch.randn(1, 1, 3, 3)
    assert F.conv2d(x, w, stride=2**41, padding=2**40).shape == (1, 1, 2, 2)
    with pytest.raises(NotImplementedError, match="padded input"):
        C.conv2d(x, w, stride=2**41, padding=2**40)


# 3. dilation * (kernel - 1) past int64 -------------------------------------------------------
def test_conv_dilation_overflow():
    x, w = torch.randn(2, 3, 7), torch.randn(4, 3, 3)
    same_error(lambda: F.conv1d(x, w, dilation=2**61 + 1), lambda: C.conv1d(x, w, dilation=2**61 + 1))
    # torch wraps 2 * (2^63 - 1) to -2 and returns garbage sizes; the exact extent is too large
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        C.conv1d(x, w, dilation=B)


def test_max_pool_dilation_overflow():
    # torch wraps 8 * (2^61 + 1) to 8 and pools a window that does not exist
    with pytest.raises(RuntimeError, match="does not fit int64"):
        C.max_pool1d(torch.randn(2, 3, 9), 9, 1, 0, 2**61 + 1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_max_pool_large_dilation_as_torch(dims, channels_last):
    # dilation wider than the input: windows with one tap inside, or none
    x = torch.randn((2, 3) + (5,) * dims)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    fn = getattr(F, f"max_pool{dims}d")
    for dilation in (4, 6):  # 6: the only window's taps -1 and 5 both lie in the padding
        want, want_idx = fn(x, 2, 1, 1, dilation, return_indices=True)
        got, got_idx = getattr(C, f"max_pool{dims}d")(x, 2, 1, 1, dilation, return_indices=True)
        torch.testing.assert_close(got, want)
        if dims == 3 and channels_last and dilation == 6:
            # torch's NDHWC kernel reports index 30 for this -inf window, its NCDHW kernel
            # (and cnnops in both layouts) 155, the first tap's flat index, past the plane
            assert torch.equal(got_idx, fn(x.contiguous(), 2, 1, 1, dilation, return_indices=True)[1])
            continue
        assert torch.equal(got_idx, want_idx)


# 4 and 5. huge strides and kernels, in a subprocess (an abort fails the test) ------------------
def test_huge_pool_strides_and_kernels_do_not_abort():
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        import cnnops.functional as C
        B = 2**63 - 1
        x = torch.randn(2, 3, 7)
        # torch: shape (2, 3, 1); with indices, torch takes the arguments as C++ ints
        y, w = C.max_pool1d(x, 3, B, 1), F.max_pool1d(x, 3, B, 1)
        assert torch.equal(y, w), (y, w)
        y, i = torch.ops.cnnops.max_pool_forward(x, [3], [B], [1], [1], False)
        assert torch.equal(y, w) and torch.equal(i, F.max_pool1d(x, 3, 8, 1, return_indices=True)[1])
        y = C.max_pool1d(x, B, B, 2**62 - 1, ceil_mode=True)  # torch itself crashes here
        assert y.shape == (2, 3, 1) and torch.equal(y[..., 0], x.amax(-1)), y
        # a kernel of 2^40 covering the whole input from every window: the global max
        # (torch loops over the whole kernel; a kernel of 16 has the same windows here)
        y, i = torch.ops.cnnops.max_pool_forward(x, [2**40], [1], [2**39], [1], False)
        w, j = F.max_pool1d(x, 16, 1, 8, return_indices=True)
        assert torch.equal(y, w) and torch.equal(i, j)
        assert torch.equal(C.max_pool1d(x, 2**40, 1, 2**39), w)
        y = C.avg_pool1d(x, 3, 2**31 - 1, 1)
        assert torch.equal(y, F.avg_pool1d(x, 3, 2**31 - 1, 1))
        for fn in (lambda: C.avg_pool1d(x, 2**40), lambda: C.max_pool2d(x[None], 3, B, 1),
                   lambda: C.max_pool1d(x, 3, B, 1, return_indices=True),
                   lambda: torch.ops.cnnops.avg_pool_forward(x, [2**40], [1], [0], False, True, 0),
                   lambda: torch.ops.cnnops.avg_pool_forward(x, [3], [B], [1], False, True, 0)):
            try:
                fn()
            except RuntimeError as e:
                assert "value cannot be converted to type int without overflow" in str(e), e
            else:
                raise AssertionError("accepted")
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=_package_root())
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def _package_root():
    import os

    import cnnops

    return os.path.dirname(os.path.dirname(os.path.abspath(cnnops.__file__)))


# 6. max-pool backward on all-padding windows ---------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_backward_all_padding_window(channels_last):
    x = torch.randn(1, 1, 1, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = ((2, 1), 1, (1, 0), (2, 1))
    want, want_idx = F.max_pool2d(x, *args, return_indices=True)
    xg = x.clone().requires_grad_(True)
    got, got_idx = C.max_pool2d(xg, *args, return_indices=True)
    torch.testing.assert_close(got, want)
    assert torch.equal(got_idx, want_idx)  # torch's indices lie past the plane: 3, 4, 5
    (grad,) = torch.autograd.grad(got.sum(), xg)
    xt = x.clone().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(F.max_pool2d(xt, *args).sum(), xt)
    torch.testing.assert_close(grad, want_grad)  # zero


def test_max_pool_backward_still_rejects_other_bad_indices():
    x = torch.randn(1, 1, 4)
    g = torch.ones(1, 1, 2)
    bad = torch.tensor([[[0, 1000]]])
    with pytest.raises(RuntimeError, match="indices must lie in"):
        torch.ops.cnnops.max_pool_backward(g, x, bad, [2], [2], [0], [1], False)


# raw ops accepted overflowing sizes ----------------------------------------------------------
def test_raw_avg_pool_kernel_past_int32():
    with pytest.raises(RuntimeError, match="without overflow"):
        torch.ops.cnnops.avg_pool_forward(torch.randn(2, 3, 7), [2**40], [1], [0], False, True, 0)


def test_raw_adaptive_pool_output_overflow():
    x = torch.randn(1, 1, 5, 5)
    same_error(lambda: F.adaptive_avg_pool2d(x, (2**32, 2**32)),
               lambda: torch.ops.cnnops.adaptive_avg_pool_forward(x, [2**32, 2**32]))


# norm_math.h: single-element layer norm --------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_element_layer_norm_gradient_is_zero_up_to_one_rounding(dtype):
    """The exact gradient is 0 (x_hat is constant); what remains is at most about one rounding
    of g = w * dy times invstd = 1 / sqrt(eps), as norm_math.h says, and below torch's."""
    torch.manual_seed(0)
    x = torch.randn(256, 1, dtype=dtype, requires_grad=True)
    w, b, dy = torch.randn(1, dtype=dtype) * 3, torch.randn(1, dtype=dtype), torch.randn(256, 1, dtype=dtype)
    eps = 1e-5
    (got,) = torch.autograd.grad(C.layer_norm(x, [1], w, b, eps), x, dy)
    (want,) = torch.autograd.grad(F.layer_norm(x, [1], w, b, eps), x, dy)
    ulp = torch.finfo(dtype).eps
    bound = 2 * ulp * (w * dy).abs() / eps**0.5
    assert (got.abs() <= bound).all(), (got.abs() / bound).max()
    assert got.abs().max() <= max(want.abs().max(), bound.max())
