"""The TF32 tolerance in conftest.py against the error model it is derived from, on the CPU.

TF32 is simulated exactly: float32 operands rounded to nearest (ties away from zero, as CUDA's
cvt.rna.tf32.f32 and wmma::__float_to_tf32) to a 10-bit mantissa, then multiplied and summed
in float64. The inputs are those of test_conv_cuda.py::test_cuda_tf32 (same seed, same draws),
so a tolerance that passes here is not a coin toss on the GPU; and a missing product term must
still fail it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    TF32_SIGMA,
    TF32_TOLERANCE,
    TF32_UNIT,
    assert_close_to_torch,
    conv_fn,
    conv_tensors,
    make_tensor,
    reductions,
    run_conv,
)
from test_conv import LARGE

# the cases test_conv_cuda.py::test_cuda_tf32 runs with TF32 on
TF32_CASES = ["resnet3x3_64to96", "pointwise_64to256", "odd_K171_Cout37_29x23"]


def tf32_round(t):
    """float32 -> nearest TF32 value (10 explicit mantissa bits), ties away from zero."""
    assert t.dtype == torch.float32
    bits = t.contiguous().view(torch.int32)
    # sign-magnitude: adding half of the 13 dropped bits' range rounds the magnitude
    rounded = (bits + 0x1000) & ~0x1FFF
    return rounded.view(torch.float32).reshape(t.shape)


def test_tf32_round_is_nearest_with_10_bit_mantissa():
    x = torch.randn(100_000) * 10.0 ** torch.randint(-5, 6, (100_000,)).float()
    r = tf32_round(x)
    assert (r.view(torch.int32) & 0x1FFF == 0).all(), "low 13 mantissa bits must be zero"
    rel = ((r.double() - x.double()) / x.double()).abs()
    assert rel.max() <= TF32_UNIT, f"relative rounding error {rel.max():.3g} > 2^-11"
    # nearest, not truncation: errors of both signs, mean near zero
    err = (r.double() - x.double()) / x.double()
    assert (err > 0).any() and (err < 0).any() and err.mean().abs() < 0.05 * TF32_UNIT
    # halfway case: 1 + 2^-11 lies between 1 and 1 + 2^-10; ties go away from zero
    assert tf32_round(torch.tensor([1 + 2 ** -11, -(1 + 2 ** -11)])).tolist() == [1 + 2 ** -10, -(1 + 2 ** -10)]


def tf32_errors(name):
    """(L, exact float64 result, TF32-simulated result) for the output and each gradient of
    the case, on test_cuda_tf32's inputs (conv_tensors then check_conv_against_torch's
    grad_output draw, from the autouse seed)."""
    dims, n, cin, cout, spatial, kernel, groups, kwargs = LARGE[name]
    kwargs = dict(kwargs, groups=groups)
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, True, torch.float32)
    fn = conv_fn(F, dims)
    out_shape = fn(x, w, b, **kwargs).shape
    go = make_tensor(out_shape, torch.float32)
    d = lambda t: t.double()  # noqa: E731
    r = lambda t: tf32_round(t).double()  # noqa: E731
    exact_out, exact = run_conv(fn, d(x), d(w), d(b), d(go), kwargs)
    tf32_out, tf32 = run_conv(fn, r(x), r(w), d(b), r(go), kwargs)  # bias is added, not multiplied
    red = reductions(x.shape, w.shape, out_shape, groups)
    result = {"output": (red["output"], exact_out, tf32_out)}
    for k in ("input", "weight"):
        result[f"grad_{k}"] = (red[f"grad_{k}"], exact[k], tf32[k])
    return result


@pytest.mark.parametrize("name", TF32_CASES)
def test_tf32_error_follows_the_model(name):
    """Measured TF32 error per sqrt(L): its rms at most the model's sigma (the model's rms of
    the rounding error is an upper bound) but not far below it (the model is not loose by
    orders), and its maximum within the atol the tests use, with rtol playing no part."""
    for what, (L, exact, tf32) in tf32_errors(name).items():
        err = (tf32 - exact) / math.sqrt(L)
        rms = err.pow(2).mean().sqrt().item()
        assert 0.5 * TF32_SIGMA < rms <= TF32_SIGMA, f"{name} {what}: rms {rms:.3g}, model sigma {TF32_SIGMA:.3g}"
        worst = err.abs().max().item()
        assert worst <= TF32_TOLERANCE["atol"], (
            f"{name} {what}: worst error {worst:.3g} per sqrt(L) = {worst / rms:.1f} rms, over atol "
            f"{TF32_TOLERANCE['atol']:.3g}")


@pytest.mark.parametrize("name", TF32_CASES)
def test_tf32_tolerance_passes_tf32_rounding(name):
    """What test_cuda_tf32 asserts, applied to the simulated TF32 result: it passes."""
    for what, (L, exact, tf32) in tf32_errors(name).items():
        assert_close_to_torch(tf32.float(), exact, torch.float32, L, tf32=True, msg=f"{name} {what}")


@pytest.mark.parametrize("name", TF32_CASES)
def test_tf32_tolerance_still_catches_a_missing_term(name):
    """A product term dropped from every output (the first weight tap) fails the TF32 check."""
    dims, n, cin, cout, spatial, kernel, groups, kwargs = LARGE[name]
    kwargs = dict(kwargs, groups=groups)
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, True, torch.float32)
    fn = conv_fn(F, dims)
    exact = fn(x.double(), w.double(), b.double(), **kwargs)
    w_bad = w.clone()
    w_bad.view(cout, -1)[:, 0] = 0
    bad = fn(tf32_round(x).double(), tf32_round(w_bad).double(), b.double(), **kwargs)
    L = reductions(x.shape, w.shape, exact.shape, groups)["output"]
    with pytest.raises(AssertionError, match="Mismatched elements"):
        assert_close_to_torch(bad.float(), exact, torch.float32, L, tf32=True, msg=name)
