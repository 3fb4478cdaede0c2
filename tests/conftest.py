"""Shared fixtures, tolerances and helpers for the cnnops test suite.

Every expected value in these tests comes from torch (torch.nn.functional / torch.nn), never
from cnnops itself. The only exception is test_conv_cuda.py, which additionally compares the
CUDA kernels with the cnnops CPU kernels *after* both have been checked against torch.

Tolerances
----------
There is exactly one tolerance table, ``TOLERANCES``, keyed by dtype. The reference is computed
by torch in a wider dtype (``REFERENCE_DTYPE``) on the *same rounded inputs* and then cast to the
dtype under test, so the budget only has to cover cnnops' own rounding error:

* float64: reference in float64; error ~ eps64 * L, so 1e-11 absolute / 1e-10 relative is ample.
* float32: reference in float64 (then cast), so the check measures cnnops' float32 accumulation
  error only. With N(0, 1) inputs an inner product of length L has magnitude ~sqrt(L), and
  accumulated rounding error grows like eps32 * sqrt(L) .. eps32 * L.
* bfloat16 / float16: reference computed by torch in float32 on the bf16/fp16-rounded inputs and
  cast to bf16/fp16 (what an implementation accumulating in float, as DESIGN.md requires, returns
  up to one rounding step). rtol is about two units in the last place of the format.

Because values are sums of L products of N(0, 1) numbers, their typical magnitude is sqrt(L)
(L = "reduction length": C_in/groups * kernel volume for the output, C_out/groups * kernel
volume for grad_input, N * output spatial volume for grad_weight and grad_bias). Entries that
cancel to ~0 would make a purely relative check meaningless, so ``atol`` is scaled by sqrt(L):
it stays a fixed, small fraction of the typical magnitude of the values being compared.
"""

import math
import os
import random
import subprocess
import sys

import pytest
import torch

try:  # The package may not be built yet; tests then fail at use, not at collection.
    import cnnops  # noqa: F401
    import cnnops.functional  # noqa: F401
    import cnnops.nn  # noqa: F401

    _CNNOPS_IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - only while the package is being built
    cnnops = None
    _CNNOPS_IMPORT_ERROR = exc

SEED = 1234

# dtype -> dict(atol=..., rtol=...); atol is per unit of sqrt(reduction length), see above.
TOLERANCES = {
    torch.float64: dict(atol=1e-11, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=5e-3),
}

# TF32 (float32 with allow_tf32): each operand of a product is rounded to nearest with a 10-bit
# mantissa, relative error d with |d| <= u = 2^-11; products and sums stay in float32. An output
# sum_i a_i b_i then errs by sum_i a_i b_i (d_a,i + d_b,i): L independent zero-mean terms, so
#   sigma = u * sqrt(2/3) * sqrt(sum_i (a_i b_i)^2)     (rms of d at most u / sqrt(3))
# which for the N(0, 1) operands of these tests (E[(ab)^2] = 1) is u * sqrt(2/3) * sqrt(L): the
# error does not scale with the output, so the budget is atol (per sqrt(L), as above), rtol only
# float32's. TF32_SIGMAS standard deviations: the real rms of d is ~0.74 u / sqrt(3) (mantissas
# are not all 1.0), so that is ~6.8 actual sigmas, P ~ 1e-11 per element; a missing product
# term (error ~1) still exceeds it up to L ~ 40000. tests/test_tf32_tolerance.py checks this
# model against simulated TF32 rounding on the inputs of the CUDA TF32 tests.
TF32_UNIT = 2.0 ** -11
TF32_SIGMA = TF32_UNIT * math.sqrt(2.0 / 3.0)  # per sqrt(L), for unit-variance operands
TF32_SIGMAS = 5.0
TF32_TOLERANCE = dict(atol=TF32_SIGMAS * TF32_SIGMA, rtol=TOLERANCES[torch.float32]["rtol"])

# dtype the torch reference is computed in, for inputs of the dtype under test.
REFERENCE_DTYPE = {
    torch.float64: torch.float64,
    torch.float32: torch.float64,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}


def _torch_cpu_supports(dtype):
    try:
        x = torch.ones(1, 1, 3, dtype=dtype, requires_grad=True)
        w = torch.ones(1, 1, 2, dtype=dtype, requires_grad=True)
        torch.nn.functional.conv1d(x, w).sum().backward()
        return True
    except Exception:
        return False


CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16] + (
    [torch.float16] if _torch_cpu_supports(torch.float16) else []
)
CUDA_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def check_conv_relu_against_torch(x, w, b, stride, padding, dilation, groups, relu, tol, msg):
    """For the per-ISA subprocess checks (run_with_cpu_isa): cnnops' 2-d conv (with the fused ReLU
    when relu) against torch's, the output and the x, w, b gradients, each error relative to the
    reference's largest value (at least 1). Exits the process naming msg when one reaches tol."""
    import torch.nn.functional as F

    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(x, w, b, stride, padding, dilation, groups)
    ours = cnnops.functional._conv(x, w, b, stride, padding, dilation, groups, 2,
                                   _activation="relu" if relu else "none")
    if relu:
        ref = torch.relu(ref)
    go = torch.randn_like(ref)
    if relu:  # outputs within rounding of 0 may take either side of the ReLU
        go = torch.where(ref.detach().abs() < 1e-3, 0, go)
    grads_ref = torch.autograd.grad(ref, (x, w, b), go)
    grads_ours = torch.autograd.grad(ours, (x, w, b), go)
    for name, a, e in zip(("out", "dx", "dw", "db"), (ours,) + grads_ours, (ref,) + grads_ref):
        err = ((a - e).abs().max() / e.abs().max().clamp_min(1)).item()
        if not err < tol:
            sys.exit(f"{msg} {name}: relative error {err}")


def run_with_cpu_isa(isa, code, timeout=600):
    """Runs `code` in a fresh Python whose cnnops kernels are capped at `isa` (CNNOPS_CPU_ISA:
    avx512, avx2 or portable), from the repository root; skips when this CPU lacks the ISA."""
    flag = {"avx512": "avx512f", "avx2": "avx2"}.get(isa)
    if flag is not None:
        try:
            with open("/proc/cpuinfo") as f:
                has = flag in f.read().split()
        except OSError:
            has = False
        if not has:
            pytest.skip(f"CPU has no {flag}")
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CNNOPS_CPU_ISA=isa),
                          capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def cuda_available():
    return (
        cnnops is not None
        and torch.cuda.is_available()
        and bool(cnnops.has_cuda())
    )


requires_cuda = pytest.mark.skipif(
    not cuda_available(), reason="needs a CUDA device and cnnops built with CUDA kernels"
)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a GPU and cnnops CUDA kernels (skipped otherwise)")
    config.addinivalue_line("markers", "slow: slower tests (compile, large shapes)")


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and cnnops built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same RNG state (torch and python's random)."""
    torch.manual_seed(SEED)
    random.seed(SEED)
    yield


@pytest.fixture(autouse=True)
def _require_cnnops():
    if cnnops is None:
        pytest.fail(f"import cnnops failed: {_CNNOPS_IMPORT_ERROR!r}")
    yield


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------


def tolerance(dtype, reduction=1, tf32=False):
    tol = TF32_TOLERANCE if tf32 else TOLERANCES[dtype]
    scale = math.sqrt(max(int(reduction), 1))
    return tol["atol"] * scale, tol["rtol"]


def assert_close_to_torch(actual, expected, dtype, reduction=1, tf32=False, msg=""):
    """Compare a cnnops result with a torch reference.

    ``expected`` may be in a wider dtype (see REFERENCE_DTYPE); it is cast to ``dtype`` first
    (the value a correctly rounding implementation returns), then both are compared in float64.
    ``reduction`` is the number of products summed into each element (scales atol by sqrt).
    """
    assert isinstance(actual, torch.Tensor), f"{msg}: expected a tensor, got {type(actual)}"
    assert actual.dtype == dtype, f"{msg}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{msg}: device {actual.device}, expected {expected.device}"
    exp = expected.detach().to(dtype).to(torch.float64)
    act = actual.detach().to(torch.float64)
    assert torch.isfinite(act).all() or not torch.isfinite(exp).all(), f"{msg}: non-finite values in result"
    atol, rtol = tolerance(dtype, reduction, tf32)
    torch.testing.assert_close(
        act, exp, atol=atol, rtol=rtol, equal_nan=False,
        msg=lambda m: f"{msg} (dtype={dtype_id(dtype)}, atol={atol:.3g}, rtol={rtol:.3g}, L={reduction})\n{m}",
    )


# --------------------------------------------------------------------------------------------
# tensors and convolution runners
# --------------------------------------------------------------------------------------------

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def make_tensor(shape, dtype, layout="contiguous", device="cpu", generator=None):
    """N(0,1) values of ``dtype`` (drawn in float32, then rounded) in the requested layout.

    layouts: contiguous | channels_last (rank 4/5 only) | transposed (permuted strides) |
    sliced (storage offset and step-2 strides: a non-dense view).
    """
    shape = tuple(shape)

    def randn(s):
        # drawn on the CPU (same values on every device), rounded, then moved before any view
        return torch.randn(s, generator=generator, dtype=torch.float32).to(dtype).to(device)

    if layout == "contiguous":
        t = randn(shape)
    elif layout == "channels_last":
        t = randn(shape).contiguous(memory_format=CHANNELS_LAST[len(shape)])
    elif layout == "transposed":
        perm = list(reversed(range(len(shape))))
        t = randn([shape[p] for p in perm]).permute(*perm)
    elif layout == "sliced":
        if len(shape) == 1:
            t = randn((2 * shape[0] + 1,))[1::2]
        else:
            big = list(shape)
            big[0] += 1
            big[-1] = 2 * big[-1] + 1
            t = randn(big)[1:][..., 1::2]
    else:
        raise ValueError(layout)
    assert t.shape == shape, (t.shape, shape, layout)
    return t


def conv_fn(module, dims):
    return getattr(module, f"conv{dims}d")


def prod(xs):
    out = 1
    for x in xs:
        out *= int(x)
    return out


def reductions(x_shape, w_shape, out_shape, groups, unbatched=False):
    """Reduction lengths for output, grad_input, grad_weight, grad_bias (see module doc)."""
    kvol = prod(w_shape[2:])
    cin_g = w_shape[1]
    cout_g = w_shape[0] // groups
    spatial_dims = len(w_shape) - 2
    batch = 1 if unbatched else out_shape[0]
    out_sp = prod(out_shape[-spatial_dims:])
    return dict(
        output=cin_g * kvol,
        grad_input=cout_g * kvol,
        grad_weight=batch * out_sp,
        grad_bias=batch * out_sp,
    )


def run_conv(fn, x, w, b, grad_out, kwargs, grads=("input", "weight", "bias")):
    """Forward ``fn`` on fresh leaves sharing x/w/b's strides, then autograd.grad w.r.t.
    the leaves named in ``grads`` with the given grad_output. Returns (out, {name: grad})."""
    leaves = {"input": x.detach(), "weight": w.detach(), "bias": None if b is None else b.detach()}
    wanted = [k for k in grads if leaves[k] is not None]
    for k in wanted:
        leaves[k].requires_grad_(True)
    out = fn(leaves["input"], leaves["weight"], leaves["bias"], **kwargs)
    result = {}
    if wanted:
        gs = torch.autograd.grad(out, [leaves[k] for k in wanted], grad_out)
        result = dict(zip(wanted, gs))
    return out.detach(), result


def run_at_threads(threads, fn):
    """fn() with torch's intra-op thread count set to `threads`, restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


def assert_same_bits_across_threads(fn, x, w, b, grad_out, kwargs, threads=(1, 2), grads=("input", "weight", "bias")):
    """run_conv at each thread count: the output and every gradient must be bitwise those of the
    first count (the kernels' work partitions and partial sums may not change a sum)."""
    runs = [run_at_threads(t, lambda: run_conv(fn, x, w, b, grad_out, kwargs, grads)) for t in threads]
    out0, grads0 = runs[0]
    for t, (out, got) in zip(threads[1:], runs[1:]):
        assert torch.equal(out, out0), f"forward depends on the thread count ({t} threads)"
        for k in got:
            assert torch.equal(got[k], grads0[k]), f"grad_{k} depends on the thread count ({t} threads)"


def check_conv_against_torch(
    dims,
    x,
    w,
    b,
    kwargs,
    dtype,
    grad_layout="contiguous",
    grads=("input", "weight", "bias"),
    check_channels_last=None,
    tf32=False,
    reference_device=None,
    msg="",
):
    """Differential test of cnnops.functional.conv{dims}d vs torch.nn.functional.conv{dims}d:
    forward and the requested gradients (autograd.grad with a random grad_output), checked
    with the dtype's tolerance. The torch reference runs in REFERENCE_DTYPE[dtype] on the same
    (already rounded) inputs. Returns (out, grads) of cnnops for further checks."""
    import torch.nn.functional as F

    ref_dtype = REFERENCE_DTYPE[dtype]
    dev = reference_device or x.device

    def to_ref(t):
        return None if t is None else t.detach().to(device=dev, dtype=ref_dtype)

    ref_out, _ = run_conv(conv_fn(F, dims), to_ref(x), to_ref(w), to_ref(b), None, kwargs, grads=())
    unbatched = x.dim() == dims + 1
    grad_out = make_tensor(ref_out.shape, dtype, grad_layout if ref_out.dim() >= 3 else "contiguous", device=x.device)
    ref_out, ref_grads = run_conv(conv_fn(F, dims), to_ref(x), to_ref(w), to_ref(b), to_ref(grad_out), kwargs, grads)

    out, got = run_conv(conv_fn(cnnops.functional, dims), x, w, b, grad_out, kwargs, grads)
    red = reductions(x.shape, w.shape, ref_out.shape, kwargs.get("groups", 1), unbatched)
    ctx = f"{msg} conv{dims}d x={tuple(x.shape)} w={tuple(w.shape)} bias={b is not None} {kwargs}"
    ref_out = ref_out.to(x.device)
    assert_close_to_torch(out, ref_out, dtype, red["output"], tf32, msg=f"{ctx}: output")
    for k in grads:
        if k == "bias" and b is None:
            continue
        assert k in got, f"{ctx}: no gradient for {k}"
        ref = ref_grads[k].to(x.device)
        assert_close_to_torch(got[k], ref, dtype, red[f"grad_{k}"], tf32, msg=f"{ctx}: grad_{k}")
    if check_channels_last is None:
        check_channels_last = x.dim() in CHANNELS_LAST and is_unambiguously_channels_last(x)
    if check_channels_last:
        fmt = CHANNELS_LAST[x.dim()]
        assert out.is_contiguous(memory_format=fmt), f"{ctx}: output lost channels_last, strides {out.stride()}"
        if "input" in got:
            assert got["input"].is_contiguous(memory_format=fmt), (
                f"{ctx}: grad_input lost channels_last, strides {got['input'].stride()}")
    return out, got


def is_unambiguously_channels_last(t):
    """channels_last and not also (trivially) contiguous, so the check is meaningful."""
    fmt = CHANNELS_LAST.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt) and not t.is_contiguous()


def conv_tensors(dims, n, cin, cout, spatial, kernel, groups, bias, dtype, layout="contiguous",
                 device="cpu", unbatched=False, weight_layout=None):
    """Input, weight, bias for a convolution; ``layout`` applies to input (and to weight/bias
    for the non-contiguous layouts unless ``weight_layout`` says otherwise)."""
    if isinstance(spatial, int):
        spatial = (spatial,) * dims
    if isinstance(kernel, int):
        kernel = (kernel,) * dims
    x_shape = ((n,) if not unbatched else ()) + (cin,) + tuple(spatial)
    x = make_tensor(x_shape, dtype, layout if not (unbatched and layout == "channels_last") else "contiguous", device)
    if weight_layout is None:
        weight_layout = layout if layout in ("transposed", "sliced") else "contiguous"
    w = make_tensor((cout, cin // groups) + tuple(kernel), dtype, weight_layout, device)
    b = make_tensor((cout,), dtype, "sliced" if weight_layout == "sliced" else "contiguous", device) if bias else None
    return x, w, b


def assert_compiled_matches_eager(f, inputs, backend):
    """torch.compile(f, fullgraph=True) gives eager f's output and the gradient of every input
    (for one random grad_output). Returns the compiled output."""
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    compiled_leaves = [t.clone().requires_grad_() for t in inputs]
    eager_out, compiled_out = f(*eager_leaves), compiled(*compiled_leaves)
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    grad_output = torch.randn_like(eager_out)
    for got, expected in zip(torch.autograd.grad(compiled_out, compiled_leaves, grad_output),
                             torch.autograd.grad(eager_out, eager_leaves, grad_output)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    return compiled_out.detach()


# --------------------------------------------------------------------------------------------
# normalization
# --------------------------------------------------------------------------------------------


def large_mean_atol(dtype, magnitude, spread):
    """Absolute error bound, in units of the normalized output, for inputs of a large mean.

    A mean of magnitude |mu| stored in ``dtype`` is only known to half an ulp, about
    |mu| * eps / 2 (eps = torch.finfo(dtype).eps); x - mean then carries that error, and
    normalizing divides it by the spread (the standard deviation). Two ulps leave room for the
    rounding of the Welford updates. For 1e4 with unit spread in float32 this is ~2.4e-3: an
    E[x^2] - E[x]^2 variance would be off by O(1) there (ulp(1e8) = 8), so the test still
    tells a stable algorithm from an unstable one."""
    return 2 * magnitude * torch.finfo(dtype).eps / spread
