"""Differential tests: cnnops.functional.{batch,instance,layer,group}_norm against
torch.nn.functional on the CPU.

Forward, every gradient (input, weight, bias; torch.autograd.grad with a random grad_output) and
the running statistics updated in place, on a grid per norm (training/eval, running statistics
on/off, affine on/off/partial, 1d/2d/3d and flat inputs, odd sizes, batch 0 and 1, inputs with a
large mean), in several layouts; plus gradcheck, the raw ops (values, output masks, opcheck,
fake metadata), torch.compile, determinism and a check that no aten norm kernel runs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.autograd
import cnnops.functional
from conftest import (
    CHANNELS_LAST,
    REFERENCE_DTYPE,
    assert_compiled_matches_eager,
    dtype_id,
    make_tensor,
    prod,
    run_with_cpu_isa,
    tolerance,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LARGE_MEAN = 1e4  # values 1e4 + N(0, 1): E[x^2] - E[x]^2 would cancel every digit in float32


# --------------------------------------------------------------------------------------------
# tolerance
# --------------------------------------------------------------------------------------------


def assert_norm_close(actual, expected, dtype, reduction=1, kappa=5.0, equal_nan=False, msg=""):
    """conftest's rule (reference in a wider dtype, cast to ``dtype``; atol per sqrt(reduction))
    plus the one rounding no implementation in ``dtype`` avoids: the mean itself is a ``dtype``
    number, off by up to |mean| * eps / 2, i.e. kappa * eps relative to the spread, where
    kappa = max|x| / std (about 5 for N(0, 1) data, 1e4 for the large-mean inputs)."""
    assert isinstance(actual, torch.Tensor), f"{msg}: expected a tensor, got {type(actual)}"
    assert actual.dtype == dtype, f"{msg}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    exp = expected.detach().to(dtype).to(torch.float64)
    act = actual.detach().to(torch.float64)
    atol, rtol = tolerance(dtype, reduction)
    atol += 4 * kappa * torch.finfo(dtype).eps * math.sqrt(max(reduction, 1))
    torch.testing.assert_close(
        act, exp, atol=atol, rtol=rtol, equal_nan=equal_nan,
        msg=lambda m: f"{msg} (dtype={dtype_id(dtype)}, atol={atol:.3g}, rtol={rtol:.3g}, L={reduction})\n{m}",
    )


# --------------------------------------------------------------------------------------------
# one runner for the four norms
# --------------------------------------------------------------------------------------------


def call(module, kind, x, w, b, rm, rv, kw):
    """module.<kind>(...) for module = torch.nn.functional or cnnops.functional."""
    fn = getattr(module, kind)
    if kind in ("batch_norm", "instance_norm"):
        return fn(x, rm, rv, w, b, **kw)
    return fn(x, weight=w, bias=b, **kw)


def run(module, kind, x, w, b, rm, rv, kw, grad_out=None):
    """Forward on fresh leaves (same strides as x, w, b) and, with grad_out, autograd.grad of
    every leaf. Running statistics are cloned; returns (out, grads, running_mean, running_var)."""
    leaves = {"input": x.detach(), "weight": None if w is None else w.detach(),
              "bias": None if b is None else b.detach()}
    for t in leaves.values():
        if t is not None and grad_out is not None:
            t.requires_grad_(True)
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    out = call(module, kind, leaves["input"], leaves["weight"], leaves["bias"], rm, rv, kw)
    grads = {}
    if grad_out is not None:
        names = [k for k, t in leaves.items() if t is not None]
        grads = dict(zip(names, torch.autograd.grad(out, [leaves[k] for k in names], grad_out)))
    return out.detach(), grads, rm, rv


def stat_length(kind, shape, kw):
    """Values per statistic (L), and the reduction length of the weight/bias gradients."""
    if kind == "layer_norm":
        L = prod(kw["normalized_shape"])
        return L, prod(shape) // max(L, 1)
    spatial = prod(shape[2:])
    if kind == "batch_norm":
        return shape[0] * spatial, shape[0] * spatial
    if kind == "group_norm":
        return shape[1] // kw["num_groups"] * spatial, shape[0] * spatial
    return spatial, shape[0] * spatial


def max_invstd(kind, x, rv, kw):
    """The largest 1 / sqrt(var + eps) the norm divides by (float64, from the input). grad_input
    is w * invstd * (...), so its rounding error scales with it: a statistic over a single value
    (var = 0) multiplies it by 1 / sqrt(eps), for torch as for cnnops."""
    eps = kw.get("eps", 1e-5)
    if x.numel() == 0:
        return 1.0
    xd = x.detach().double()
    if kind == "batch_norm" and not kw.get("training", False):
        var = rv.double()
    elif kind == "instance_norm" and not kw.get("use_input_stats", True):
        var = rv.double()
    elif kind == "batch_norm":
        var = xd.transpose(0, 1).reshape(x.size(1), -1).var(1, unbiased=False)
    elif kind == "layer_norm":
        var = xd.reshape(-1, prod(kw["normalized_shape"])).var(1, unbiased=False)
    else:
        groups = kw["num_groups"] if kind == "group_norm" else x.size(1)
        var = xd.reshape(x.size(0) * groups, -1).var(1, unbiased=False)
    return float((var.min() + eps) ** -0.5)


def formats(t):
    fmts = [torch.contiguous_format]
    if t.dim() in CHANNELS_LAST:
        fmts.append(CHANNELS_LAST[t.dim()])
    return fmts


def assert_same_format(actual, expected, msg):
    for fmt in formats(actual):
        assert actual.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt), (
            f"{msg}: strides {actual.stride()}, torch's {expected.stride()} ({fmt})")


def expected_layout_tensor(kind, x, torch_tensor):
    """The tensor whose memory format cnnops' output must have: torch's own output, except for
    instance norm, where torch returns contiguous and cnnops keeps the input's layout
    (DESIGN.md: outputs keep the input's memory format; instance norm is group norm there)."""
    if kind == "instance_norm" and x.dim() in CHANNELS_LAST:
        from torch._prims_common import suggest_memory_format
        return torch.empty_like(x, memory_format=suggest_memory_format(x))
    return torch_tensor


def check_norm_against_torch(kind, x, w, b, rm, rv, kw, dtype, mean=0.0, grad_layout="contiguous",
                             grads=True, msg=""):
    """cnnops.functional.<kind> against torch.nn.functional.<kind>: output, gradients of input,
    weight and bias, running statistics after the call, and the memory format of output and
    grad_input. The reference runs in REFERENCE_DTYPE on the same rounded inputs."""
    # one reference dtype for all tensors: float64 as soon as any of them is float32/64
    # (bfloat16 input with float32 weight and running statistics, say)
    wide = [REFERENCE_DTYPE[t.dtype] for t in (x, w, b, rm, rv) if t is not None]
    ref_dtype = torch.float64 if torch.float64 in wide else torch.float32

    def to_ref(t):
        return None if t is None else t.detach().to(ref_dtype)

    ctx = f"{msg} {kind} x={tuple(x.shape)} stride={x.stride()} w={w is not None} b={b is not None} " \
          f"running={rm is not None} {kw}"
    ref_out, _, _, _ = run(F, kind, to_ref(x), to_ref(w), to_ref(b), to_ref(rm), to_ref(rv), kw)
    grad_out = None
    if grads:
        grad_out = make_tensor(ref_out.shape, dtype, grad_layout if ref_out.dim() in CHANNELS_LAST else "contiguous")
    ref_out, ref_grads, ref_rm, ref_rv = run(F, kind, to_ref(x), to_ref(w), to_ref(b), to_ref(rm), to_ref(rv), kw,
                                             None if grad_out is None else grad_out.to(ref_dtype))
    out, got, rm_after, rv_after = run(cnnops.functional, kind, x, w, b, rm, rv, kw, grad_out)

    L, param_L = stat_length(kind, x.shape, kw)
    # output = w * x_hat + b and grad_input = w * invstd * (...) carry x_hat's error times |w|
    kappa = (5.0 + abs(mean)) * max(1.0, 0.0 if w is None else float(w.detach().abs().max()))
    assert_norm_close(out, ref_out, dtype, 1, kappa, msg=f"{ctx}: output")
    for name, ref in ref_grads.items():
        assert name in got, f"{ctx}: no gradient for {name}"
        red, k = (1, kappa * max(1.0, max_invstd(kind, x, rv, kw))) if name == "input" else (param_L, kappa)
        assert_norm_close(got[name], ref, got[name].dtype, red, k, msg=f"{ctx}: grad_{name}")
    if rm is not None:
        # An empty batch leaves batch norm's statistics alone and makes instance norm's NaN
        # (torch averages zero per-instance copies); equal_nan only matters there.
        for name, a, e in (("running_mean", rm_after, ref_rm), ("running_var", rv_after, ref_rv)):
            assert_norm_close(a, e, a.dtype, L, kappa, equal_nan=x.numel() == 0, msg=f"{ctx}: {name}")

    # memory format as torch's on the same (not upcast) input
    try:
        torch_out, torch_grads, _, _ = run(F, kind, x, w, b, rm, rv, kw, grad_out)
    except RuntimeError:
        # torch's CPU backward rejects some mixed-dtype calls (bfloat16 input, float32 bias, no
        # weight for layer and group norm): the formats of its forward then
        torch_out, torch_grads, _, _ = run(F, kind, x, w, b, rm, rv, kw)
    assert_same_format(out, expected_layout_tensor(kind, x, torch_out), f"{ctx}: output")
    if grads and torch_grads:
        assert_same_format(got["input"], expected_layout_tensor(kind, x, torch_grads["input"]), f"{ctx}: grad_input")
    return out, got


# --------------------------------------------------------------------------------------------
# cases: name -> config; shared builder
# --------------------------------------------------------------------------------------------


def build(kind, cfg, dtype, layout="contiguous", param_dtype=None):
    """x, weight, bias, running_mean, running_var, kwargs for one case; weight, bias and
    running statistics in param_dtype (default: the input's dtype)."""
    param_dtype = param_dtype or dtype
    shape = cfg["shape"]
    x = make_tensor(shape, dtype, layout)
    mean = cfg.get("mean", 0.0)
    if mean:
        with torch.no_grad():
            x.add_(mean)  # in place: keeps the layout
    if kind == "layer_norm":
        pshape = cfg["normalized_shape"]
    else:
        pshape = (shape[1],) if len(shape) > 1 else (shape[0],)
    affine = cfg.get("affine", "both")
    w = make_tensor(pshape, param_dtype) + 1.0 if affine in ("both", "weight") else None
    b = make_tensor(pshape, param_dtype) if affine in ("both", "bias") else None
    rm = rv = None
    if cfg.get("running"):
        C = shape[1]
        rm = (torch.randn(C) * 0.5 + cfg.get("running_mean", 0.0)).to(param_dtype)
        rv = (torch.rand(C) + 0.5).to(param_dtype)
    kw = dict(cfg.get("kw", {}))
    if kind == "layer_norm":
        kw["normalized_shape"] = cfg["normalized_shape"]
    return x, w, b, rm, rv, kw


BN = {
    "2d_train": dict(shape=(3, 4, 5, 6), running=True, kw=dict(training=True)),
    "2d_eval": dict(shape=(3, 4, 5, 6), running=True, kw=dict(training=False)),
    "2d_train_no_running": dict(shape=(3, 4, 5, 6), kw=dict(training=True)),
    "2d_noaffine": dict(shape=(3, 4, 5, 6), running=True, affine="none", kw=dict(training=True)),
    "2d_weight_only": dict(shape=(3, 4, 5, 6), running=True, affine="weight", kw=dict(training=True)),
    "2d_bias_only": dict(shape=(3, 4, 5, 6), running=True, affine="bias", kw=dict(training=True)),
    "2d_eval_noaffine": dict(shape=(3, 4, 5, 6), running=True, affine="none", kw=dict(training=False)),
    "2d_eval_bias_only": dict(shape=(2, 4, 3, 3), running=True, affine="bias", kw=dict(training=False)),
    "momentum_eps": dict(shape=(3, 4, 5, 6), running=True, kw=dict(training=True, momentum=0.35, eps=1e-3)),
    "momentum0": dict(shape=(3, 4, 5, 6), running=True, kw=dict(training=True, momentum=0.0)),
    "momentum1": dict(shape=(3, 4, 5, 6), running=True, kw=dict(training=True, momentum=1.0)),
    "1d_train": dict(shape=(4, 3, 7), running=True, kw=dict(training=True)),
    "1d_eval": dict(shape=(4, 3, 7), running=True, kw=dict(training=False)),
    "flat_train": dict(shape=(6, 5), running=True, kw=dict(training=True)),
    "flat_eval": dict(shape=(6, 5), running=True, kw=dict(training=False)),
    "3d_train": dict(shape=(2, 3, 3, 4, 5), running=True, kw=dict(training=True)),
    "3d_eval": dict(shape=(2, 3, 3, 4, 5), running=True, kw=dict(training=False)),
    "odd": dict(shape=(3, 5, 7, 3), running=True, kw=dict(training=True, momentum=0.3)),
    "many_channels": dict(shape=(2, 33, 3, 5), running=True, kw=dict(training=True)),
    "channel1": dict(shape=(4, 1, 3, 3), running=True, kw=dict(training=True)),
    "batch1": dict(shape=(1, 3, 5, 4), running=True, kw=dict(training=True)),
    "batch1_flat_eval": dict(shape=(1, 5), running=True, kw=dict(training=False)),
    "spatial1_batch2": dict(shape=(2, 3, 1, 1), running=True, kw=dict(training=True)),
    "batch0_train": dict(shape=(0, 3, 5, 4), running=True, kw=dict(training=True)),
    "batch0_eval": dict(shape=(0, 3, 5, 4), running=True, kw=dict(training=False)),
    "large_mean_train": dict(shape=(4, 3, 6, 5), running=True, mean=LARGE_MEAN, kw=dict(training=True)),
    "large_mean_eval": dict(shape=(4, 3, 6, 5), running=True, mean=LARGE_MEAN, running_mean=LARGE_MEAN,
                            kw=dict(training=False)),
    "large_mean_flat": dict(shape=(64, 3), mean=LARGE_MEAN, kw=dict(training=True)),
    "large_mean_long": dict(shape=(8, 4, 14, 14), running=True, mean=LARGE_MEAN, kw=dict(training=True)),
}

IN = {
    "2d": dict(shape=(2, 3, 5, 4), affine="none"),
    "2d_affine": dict(shape=(2, 3, 5, 4)),
    "2d_running": dict(shape=(2, 3, 5, 4), running=True, affine="none"),
    "2d_running_affine_momentum": dict(shape=(3, 3, 5, 4), running=True, kw=dict(momentum=0.3)),
    "2d_use_running": dict(shape=(2, 3, 5, 4), running=True, kw=dict(use_input_stats=False)),
    "2d_use_running_noaffine": dict(shape=(2, 3, 5, 4), running=True, affine="none",
                                    kw=dict(use_input_stats=False)),
    "1d_running": dict(shape=(3, 4, 7), running=True),
    "3d_running": dict(shape=(2, 3, 3, 4, 2), running=True, affine="weight"),
    "flat_use_running": dict(shape=(4, 3), running=True, kw=dict(use_input_stats=False)),
    "spatial2": dict(shape=(2, 3, 2), running=True),
    "odd": dict(shape=(3, 5, 7, 3), affine="bias", kw=dict(eps=1e-3)),
    "batch1": dict(shape=(1, 3, 4, 5), running=True),
    "batch0": dict(shape=(0, 3, 4, 5), affine="none"),
    "batch0_running": dict(shape=(0, 3, 4, 5), running=True, affine="none"),
    "large_mean": dict(shape=(2, 3, 6, 5), running=True, mean=LARGE_MEAN),
    "large_mean_long": dict(shape=(2, 4, 28, 28), running=True, mean=LARGE_MEAN),
    "large_mean_short_rows": dict(shape=(4, 16, 3, 17), affine="none", mean=LARGE_MEAN),
}

LN = {
    "last": dict(shape=(4, 7), normalized_shape=(7,)),
    "two_dims": dict(shape=(2, 3, 5), normalized_shape=(3, 5)),
    "4d_last": dict(shape=(2, 3, 4, 5), normalized_shape=(5,)),
    "4d_last_two": dict(shape=(2, 3, 4, 5), normalized_shape=(4, 5)),
    "4d_all": dict(shape=(2, 3, 4, 5), normalized_shape=(3, 4, 5)),
    "whole_1d_input": dict(shape=(6,), normalized_shape=(6,)),
    "noaffine": dict(shape=(4, 7), normalized_shape=(7,), affine="none"),
    "weight_only": dict(shape=(4, 7), normalized_shape=(7,), affine="weight"),
    "bias_only": dict(shape=(4, 7), normalized_shape=(7,), affine="bias"),
    "eps": dict(shape=(5, 9), normalized_shape=(9,), kw=dict(eps=1e-2)),
    "odd_rows": dict(shape=(37, 129), normalized_shape=(129,)),
    "one_element": dict(shape=(3, 1), normalized_shape=(1,)),
    "wide": dict(shape=(6, 1030), normalized_shape=(1030,)),
    "batch0": dict(shape=(0, 5), normalized_shape=(5,)),
    "batch0_3d": dict(shape=(2, 0, 5), normalized_shape=(5,)),
    "large_mean": dict(shape=(8, 64), normalized_shape=(64,), mean=LARGE_MEAN),
    "large_mean_long": dict(shape=(4, 2048), normalized_shape=(2048,), mean=LARGE_MEAN),
    "large_mean_short_rows": dict(shape=(4, 16, 3, 17), normalized_shape=(3, 17), affine="none", mean=LARGE_MEAN),
}

GN = {
    "2d": dict(shape=(2, 6, 5, 4), kw=dict(num_groups=3)),
    "one_group": dict(shape=(2, 6, 5, 4), kw=dict(num_groups=1)),
    "group_per_channel": dict(shape=(2, 6, 5, 4), kw=dict(num_groups=6)),
    "flat": dict(shape=(3, 4), kw=dict(num_groups=2)),
    "1d": dict(shape=(2, 6, 7), kw=dict(num_groups=2)),
    "3d": dict(shape=(2, 4, 3, 3, 2), kw=dict(num_groups=2)),
    "noaffine": dict(shape=(2, 6, 5, 4), affine="none", kw=dict(num_groups=3)),
    "weight_only": dict(shape=(2, 6, 5, 4), affine="weight", kw=dict(num_groups=2)),
    "bias_only": dict(shape=(2, 6, 5, 4), affine="bias", kw=dict(num_groups=2)),
    "odd": dict(shape=(3, 9, 7, 5), kw=dict(num_groups=3, eps=1e-3)),
    "resnet_like": dict(shape=(2, 32, 7, 7), kw=dict(num_groups=8)),
    "batch1": dict(shape=(1, 6, 4, 3), kw=dict(num_groups=2)),
    "batch0": dict(shape=(0, 6, 3, 3), kw=dict(num_groups=3)),
    "large_mean": dict(shape=(2, 6, 6, 5), mean=LARGE_MEAN, kw=dict(num_groups=3)),
    "large_mean_long": dict(shape=(2, 8, 16, 16), mean=LARGE_MEAN, kw=dict(num_groups=2)),
    "large_mean_resnet": dict(shape=(8, 64, 7, 7), affine="none", mean=LARGE_MEAN, kw=dict(num_groups=4)),
}

GRIDS = {"batch_norm": BN, "instance_norm": IN, "layer_norm": LN, "group_norm": GN}


def grid_params(kind):
    """(case, dtype) pairs; bfloat16 cannot represent 1e4 + N(0, 1) (its spacing at 1e4 is
    64), so the large-mean cases run in float32 and float64."""
    params = []
    for name, cfg in GRIDS[kind].items():
        for dtype in DTYPES:
            if cfg.get("mean") and dtype == torch.bfloat16:
                continue
            params.append(pytest.param(name, dtype, id=f"{name}-{dtype_id(dtype)}"))
    return params


def _grid_test(kind, name, dtype, layout="contiguous", param_dtype=None):
    cfg = GRIDS[kind][name]
    x, w, b, rm, rv, kw = build(kind, cfg, dtype, layout, param_dtype)
    return check_norm_against_torch(kind, x, w, b, rm, rv, kw, dtype, mean=cfg.get("mean", 0.0),
                                    msg=f"{name} layout={layout}")


@pytest.mark.parametrize("name,dtype", grid_params("batch_norm"))
def test_batch_norm(name, dtype):
    _grid_test("batch_norm", name, dtype)


@pytest.mark.parametrize("name,dtype", grid_params("instance_norm"))
def test_instance_norm(name, dtype):
    _grid_test("instance_norm", name, dtype)


@pytest.mark.parametrize("name,dtype", grid_params("layer_norm"))
def test_layer_norm(name, dtype):
    _grid_test("layer_norm", name, dtype)


@pytest.mark.parametrize("name,dtype", grid_params("group_norm"))
def test_group_norm(name, dtype):
    _grid_test("group_norm", name, dtype)


REDUCED_CASES = [("batch_norm", "2d_train"), ("batch_norm", "2d_eval"), ("batch_norm", "flat_train"),
                 ("instance_norm", "2d_running_affine_momentum"), ("instance_norm", "2d_use_running"),
                 ("layer_norm", "two_dims"), ("layer_norm", "wide"), ("group_norm", "2d"), ("group_norm", "odd")]


@pytest.mark.parametrize("kind,name,layout", [(k, n, layout) for k, n in REDUCED_CASES for layout in (
    ("contiguous", "channels_last") if len(GRIDS[k][n]["shape"]) == 4 else ("contiguous",))])
def test_mixed_precision(kind, name, layout):
    """bfloat16 input with float32 weight, bias and running statistics (torch's CPU mixed mode,
    what autocast produces): output in bfloat16, weight/bias gradients and statistics in float32."""
    _grid_test(kind, name, torch.bfloat16, layout, param_dtype=torch.float32)


@pytest.mark.parametrize("kind,name", [("batch_norm", "2d_bias_only"), ("batch_norm", "2d_eval_bias_only"),
                                       ("instance_norm", "odd"), ("layer_norm", "bias_only"),
                                       ("group_norm", "bias_only")])
def test_mixed_precision_bias_only(kind, name):
    """No weight, a float32 bias on a bfloat16 input: the bias gradient is a float32 sum (the
    backward ops return it in the weight's dtype, so there must be no bfloat16 detour). torch's
    own CPU backward fails here for layer and group norm; the reference is torch in float64."""
    _grid_test(kind, name, torch.bfloat16, param_dtype=torch.float32)


@pytest.mark.parametrize("kind,name", REDUCED_CASES)
def test_float16(kind, name):
    """float16 on the CPU (accumulating in float), against torch in float32 on the same values."""
    _grid_test(kind, name, torch.float16)


def test_instance_norm_batch0_affine():
    """An empty batch with affine instance norm: torch repeats the weight zero times and then
    reads its first element (IndexError); cnnops gives torch's outcome (tests/test_degenerate.py
    has the table of empty inputs)."""
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    try:
        expected = F.instance_norm(x, weight=w, bias=b)
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e)):
            cnnops.functional.instance_norm(x, weight=w, bias=b)
        return
    out = cnnops.functional.instance_norm(x, weight=w, bias=b)
    assert expected.shape == out.shape == x.shape


def test_large_mean_normalizes():
    """Not only close to torch: 1e4 + N(0, 1) in float32 comes out with mean 0 and variance 1
    over each norm's own groups (a one-pass E[x^2] - E[x]^2 would return garbage or NaN)."""
    x = torch.randn(8, 4, 16, 16) + LARGE_MEAN
    CF = cnnops.functional
    for name, out, groups in (
        ("batch_norm", CF.batch_norm(x, None, None, training=True), lambda t: t.transpose(0, 1).reshape(4, -1)),
        ("group_norm", CF.group_norm(x, 2), lambda t: t.reshape(8 * 2, -1)),
        ("instance_norm", CF.instance_norm(x), lambda t: t.reshape(8 * 4, -1)),
        ("layer_norm", CF.layer_norm(x, (4, 16, 16)), lambda t: t.reshape(8, -1)),
    ):
        assert torch.isfinite(out).all(), name
        g = groups(out.double())
        m, v = g.mean(1), g.var(1, unbiased=False)
        # the bound of assert_norm_close: 4 * eps * |mean| / std (the mean 1e4 is itself a
        # float32 number, known to eps * 1e4 / 2 ~ 6e-4)
        bound = 4 * torch.finfo(torch.float32).eps * LARGE_MEAN
        assert m.abs().max() < bound and (v - 1).abs().max() < bound, (name, m, v)


# --------------------------------------------------------------------------------------------
# layouts: channels_last, non-contiguous inputs and grad_outputs
# --------------------------------------------------------------------------------------------

LAYOUT_CASES = [
    ("batch_norm", "2d_train"), ("batch_norm", "2d_eval"), ("batch_norm", "3d_train"), ("batch_norm", "odd"),
    ("batch_norm", "1d_train"), ("batch_norm", "2d_noaffine"),
    ("instance_norm", "2d_running_affine_momentum"), ("instance_norm", "3d_running"), ("instance_norm", "odd"),
    ("instance_norm", "2d_use_running"),
    ("layer_norm", "4d_last"), ("layer_norm", "4d_last_two"), ("layer_norm", "4d_all"), ("layer_norm", "two_dims"),
    ("group_norm", "2d"), ("group_norm", "3d"), ("group_norm", "odd"), ("group_norm", "group_per_channel"),
    ("group_norm", "1d"),
]


def layout_params():
    params = []
    for kind, name in LAYOUT_CASES:
        rank = len(GRIDS[kind][name]["shape"])
        layouts = (["channels_last"] if rank in CHANNELS_LAST else []) + ["transposed", "sliced"]
        for layout in layouts:
            for dtype in (torch.float32, torch.bfloat16):
                params.append(pytest.param(kind, name, layout, dtype, id=f"{kind}-{name}-{layout}-{dtype_id(dtype)}"))
    return params


@pytest.mark.parametrize("kind,name,layout,dtype", layout_params())
def test_layouts(kind, name, layout, dtype):
    x, _, _, _, _, _ = build(kind, GRIDS[kind][name], dtype, layout)
    assert not x.is_contiguous()
    _grid_test(kind, name, dtype, layout)


@pytest.mark.parametrize("grad_layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("kind,name", [("batch_norm", "2d_train"), ("batch_norm", "2d_eval"),
                                       ("instance_norm", "2d_running"), ("layer_norm", "4d_last_two"),
                                       ("group_norm", "2d")])
def test_grad_output_layouts(kind, name, grad_layout):
    """grad_output in another layout than the input (and than the output)."""
    x, w, b, rm, rv, kw = build(kind, GRIDS[kind][name], torch.float32)
    check_norm_against_torch(kind, x, w, b, rm, rv, kw, torch.float32, grad_layout=grad_layout, msg=grad_layout)


@pytest.mark.parametrize("kind,name", [("batch_norm", "2d_train"), ("group_norm", "2d"), ("layer_norm", "4d_last")])
def test_channels_last_input_with_contiguous_grad(kind, name):
    x, w, b, rm, rv, kw = build(kind, GRIDS[kind][name], torch.float32, "channels_last")
    check_norm_against_torch(kind, x, w, b, rm, rv, kw, torch.float32, grad_layout="contiguous")


@pytest.mark.parametrize("kind", list(GRIDS))
def test_expanded_grad_output_from_sum(kind):
    """out.sum().backward() hands the backward an expanded (stride 0) grad_output."""
    name = {"batch_norm": "2d_train", "instance_norm": "2d_affine", "layer_norm": "4d_last",
            "group_norm": "2d"}[kind]
    x, w, b, rm, rv, kw = build(kind, GRIDS[kind][name], torch.float64)
    results = []
    for module in (F, cnnops.functional):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        call(module, kind, *leaves, None if rm is None else rm.clone(), None if rv is None else rv.clone(),
             kw).mul(3.0).sum().backward()
        results.append([t.grad for t in leaves])
    for name_, got, exp in zip(("input", "weight", "bias"), results[1], results[0]):
        assert_norm_close(got, exp, torch.float64, 120, msg=f"{kind} grad_{name_}")


@pytest.mark.parametrize("wanted", [("input",), ("weight",), ("bias",), ("weight", "bias"), ("input", "bias")],
                         ids=lambda w: "+".join(w))
@pytest.mark.parametrize("kind", list(GRIDS))
def test_partial_gradients(kind, wanted):
    """Only some leaves require grad: those gradients are right, the others stay None."""
    name = {"batch_norm": "2d_train", "instance_norm": "2d_affine", "layer_norm": "two_dims",
            "group_norm": "2d"}[kind]
    x, w, b, rm, rv, kw = build(kind, GRIDS[kind][name], torch.float64)
    grad_out = None
    results = []
    for module in (F, cnnops.functional):
        leaves = dict(input=x.clone(), weight=w.clone(), bias=b.clone())
        for k in wanted:
            leaves[k].requires_grad_()
        out = call(module, kind, leaves["input"], leaves["weight"], leaves["bias"],
                   None if rm is None else rm.clone(), None if rv is None else rv.clone(), kw)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
        results.append(leaves)
    for k in ("input", "weight", "bias"):
        if k in wanted:
            assert_norm_close(results[1][k].grad, results[0][k].grad, torch.float64, 120, msg=f"grad_{k}")
        else:
            assert results[1][k].grad is None


@pytest.mark.parametrize("kind,name", [("batch_norm", "2d_train"), ("batch_norm", "2d_eval"),
                                       ("instance_norm", "2d_running_affine_momentum"),
                                       ("layer_norm", "4d_last_two"), ("group_norm", "2d")])
def test_strided_parameters(kind, name):
    """weight, bias and running statistics that are strided views (every other element)."""
    x, w, b, rm, rv, kw = build(kind, GRIDS[kind][name], torch.float32)

    def strided(t):
        if t is None:
            return None
        big = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]

    w, b, rm, rv = (strided(t) for t in (w, b, rm, rv))
    assert not w.is_contiguous()
    check_norm_against_torch(kind, x, w, b, rm, rv, kw, torch.float32)  # (clones the running stats)
    if rm is not None:
        # the strided running statistics themselves: read (eval) or updated in place (training)
        rm_t, rv_t = rm.double(), rv.double()
        expected = call(F, kind, x.double(), w.double(), b.double(), rm_t, rv_t, kw)
        out = call(cnnops.functional, kind, x, w, b, rm, rv, kw)
        assert not rm.is_contiguous()
        assert_norm_close(out, expected, torch.float32, msg="output")
        assert_norm_close(rm, rm_t, torch.float32, 120, msg="running_mean")
        assert_norm_close(rv, rv_t, torch.float32, 120, msg="running_var")


def test_no_grad_and_inference_mode():
    x, w, b, rm, rv, kw = build("batch_norm", BN["2d_train"], torch.float32)
    expected = F.batch_norm(x, rm.clone(), rv.clone(), w, b, **kw)
    for ctx in (torch.no_grad(), torch.inference_mode()):
        with ctx:
            xx, ww = x.clone().requires_grad_(not isinstance(ctx, torch.inference_mode)), w.clone()
            for out in (cnnops.functional.batch_norm(xx, rm.clone(), rv.clone(), ww, b, **kw),
                        cnnops.functional.group_norm(xx, 2, ww, b),
                        cnnops.functional.layer_norm(xx, (6,)),
                        cnnops.functional.instance_norm(xx, rm.clone(), rv.clone())):
                assert not out.requires_grad
        torch.testing.assert_close(cnnops.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, **kw), expected,
                                   atol=1e-5, rtol=1e-5)


def test_keyword_and_positional_arguments():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    rm, rv, w, b = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), \
        torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    CF = cnnops.functional
    pairs = [
        (CF.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.2, 1e-3),
         F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.2, 1e-3)),
        (CF.batch_norm(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=False, momentum=0.5,
                       eps=1e-2),
         F.batch_norm(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=False, momentum=0.5,
                      eps=1e-2)),
        (CF.layer_norm(x, [5, 6], None, None, 1e-3), F.layer_norm(x, [5, 6], None, None, 1e-3)),
        (CF.layer_norm(x, torch.Size([6]), eps=0.1), F.layer_norm(x, torch.Size([6]), eps=0.1)),
        (CF.group_norm(x, 2, w, b, 1e-3), F.group_norm(x, 2, w, b, 1e-3)),
        (CF.group_norm(input=x, num_groups=4, eps=0.5), F.group_norm(input=x, num_groups=4, eps=0.5)),
        (CF.instance_norm(x, None, None, w, b, True, 0.1, 1e-3), F.instance_norm(x, None, None, w, b, True, 0.1, 1e-3)),
        (CF.instance_norm(input=x, running_mean=rm, running_var=rv, use_input_stats=False, eps=0.1),
         F.instance_norm(input=x, running_mean=rm, running_var=rv, use_input_stats=False, eps=0.1)),
    ]
    for got, exp in pairs:
        assert_norm_close(got, exp, torch.float64)


def test_signatures_match_torch():
    import inspect

    for name in ("batch_norm", "layer_norm", "group_norm", "instance_norm"):
        ours = inspect.signature(getattr(cnnops.functional, name)).parameters
        theirs = inspect.signature(getattr(F, name)).parameters
        assert [(p.name, p.default, p.kind) for p in ours.values()] == \
               [(p.name, p.default, p.kind) for p in theirs.values()], name


@pytest.mark.parametrize("kind", ["instance_norm", "layer_norm", "group_norm"])
def test_batch1_matches_slice_of_batch(kind):
    """Sample 0 normalized alone equals sample 0 of the batch for the per-sample norms (batch
    norm mixes the samples)."""
    name = {"instance_norm": "2d_affine", "layer_norm": "4d_last_two", "group_norm": "2d"}[kind]
    x, w, b, _, _, kw = build(kind, GRIDS[kind][name], torch.float64)
    whole = call(cnnops.functional, kind, x, w, b, None, None, kw)
    single = call(cnnops.functional, kind, x[:1], w, b, None, None, kw)
    torch.testing.assert_close(single, whole[:1], atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# gradcheck (float64, tiny shapes)
# --------------------------------------------------------------------------------------------

GRADCHECK = {
    "batch_norm_train": ("batch_norm", dict(shape=(3, 2, 3, 2), running=True, kw=dict(training=True))),
    "batch_norm_train_no_running": ("batch_norm", dict(shape=(4, 3, 2), kw=dict(training=True))),
    "batch_norm_eval": ("batch_norm", dict(shape=(2, 3, 2, 3), running=True, kw=dict(training=False))),
    "batch_norm_flat_bias_only": ("batch_norm", dict(shape=(5, 3), affine="bias", kw=dict(training=True))),
    "batch_norm_3d_channels_last": ("batch_norm", dict(shape=(2, 2, 2, 3, 2), kw=dict(training=True))),
    "instance_norm": ("instance_norm", dict(shape=(2, 3, 4, 2))),
    "instance_norm_running": ("instance_norm", dict(shape=(2, 3, 5), running=True)),
    "instance_norm_use_running": ("instance_norm", dict(shape=(2, 3, 5), running=True,
                                                        kw=dict(use_input_stats=False))),
    "layer_norm": ("layer_norm", dict(shape=(3, 4, 5), normalized_shape=(4, 5))),
    "layer_norm_weight_only": ("layer_norm", dict(shape=(4, 6), normalized_shape=(6,), affine="weight")),
    "group_norm": ("group_norm", dict(shape=(2, 6, 3, 2), kw=dict(num_groups=3))),
    "group_norm_noaffine_1d": ("group_norm", dict(shape=(3, 4, 5), affine="none", kw=dict(num_groups=2))),
    "group_norm_channels_last": ("group_norm", dict(shape=(2, 4, 3, 3), kw=dict(num_groups=2))),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck(name):
    kind, cfg = GRADCHECK[name]
    layout = "channels_last" if name.endswith("channels_last") else "contiguous"
    x, w, b, rm, rv, kw = build(kind, cfg, torch.float64, layout)
    tensors = [t for t in (x, w, b) if t is not None]
    inputs = [t.clone().requires_grad_() for t in tensors]
    present = [t is not None for t in (x, w, b)]

    def f(*args):
        it = iter(args)
        xx, ww, bb = (next(it) if p else None for p in present)
        # fresh running statistics per call: gradcheck calls f many times
        return call(cnnops.functional, kind, xx, ww, bb, None if rm is None else rm.clone(),
                    None if rv is None else rv.clone(), kw)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", list(GRIDS))
def test_double_backward_matches_torch(kind):
    """The backward ops are differentiable (csrc/autograd/norm.cpp): a second derivative equals
    torch's, never a silent zero (tests/test_norm_autograd.py checks them in depth)."""
    name = {"batch_norm": "2d_train", "instance_norm": "2d_affine", "layer_norm": "two_dims",
            "group_norm": "2d"}[kind]
    x, w, b, rm, rv, kw = build(kind, GRIDS[kind][name], torch.float64)
    results = []
    for module in (cnnops.functional, F):
        xx, ww = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = call(module, kind, xx, ww, b, None if rm is None else rm.clone(), None if rv is None else rv.clone(),
                   kw)
        (gx,) = torch.autograd.grad((out * out).sum(), [xx], create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), [xx, ww]))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected)


def test_ops_direct():
    """The forward ops return (output, mean, invstd) with non-differentiable statistics, of the
    documented shapes and opmath dtype."""
    x = torch.randn(2, 6, 4, 3, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(6, dtype=torch.bfloat16, requires_grad=True)
    for (out, mean, invstd), stats_shape in (
        (ops.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5), (6,)),
        (ops.group_norm_forward(x, w, None, 3, 1e-5), (2, 3)),
        (ops.layer_norm_forward(x, [4, 3], None, None, 1e-5), (2, 6)),
    ):
        assert out.shape == x.shape and out.dtype == torch.bfloat16 and out.requires_grad
        for s in (mean, invstd):
            assert s.shape == stats_shape and s.dtype == torch.float32 and not s.requires_grad


# --------------------------------------------------------------------------------------------
# raw ops: values against torch's native ops, output masks, opcheck, fake metadata
# --------------------------------------------------------------------------------------------

ops = torch.ops.cnnops
MASKS = [[True, True, True], [True, False, False], [False, True, True], [False, False, True], [True, True, False],
         [False, False, False]]


def raw_cases():
    """(name -> (forward(running_mean, running_var), backward(grad_output, mean, invstd, mask),
    torch reference (output, mean, invstd) from aten's native op, input), (running_mean,
    running_var)), all float64."""
    torch.manual_seed(7)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    xcl = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    aten = torch.ops.aten

    def bn(xx, training, running=True):
        def fwd(rm_=None, rv_=None):
            return ops.batch_norm_forward(xx, w, b, rm_ if running else None, rv_ if running else None,
                                          training, 0.1, 1e-5)

        def bwd(go, mean, invstd, mask):
            return ops.batch_norm_backward(go, xx, w, mean, invstd, training, mask)

        def ref(rm_=None, rv_=None):
            out, mean, invstd = aten.native_batch_norm(xx, w, b, rm_ if running else None,
                                                       rv_ if running else None, training, 0.1, 1e-5)
            if not training:
                mean, invstd = rm_.clone(), (rv_ + 1e-5).rsqrt()
            return out, mean, invstd
        return fwd, bwd, ref, xx

    def gn(xx, groups):
        def fwd(rm_=None, rv_=None):
            return ops.group_norm_forward(xx, w, b, groups, 1e-5)

        def bwd(go, mean, invstd, mask):
            return ops.group_norm_backward(go, xx, mean, invstd, w, groups, mask)

        def ref(rm_=None, rv_=None):
            return aten.native_group_norm(xx, w, b, xx.size(0), 4, 30, groups, 1e-5)
        return fwd, bwd, ref, xx

    def ln(xx, ns):
        ww, bb = torch.randn(ns, dtype=torch.float64), torch.randn(ns, dtype=torch.float64)

        def fwd(rm_=None, rv_=None):
            return ops.layer_norm_forward(xx, list(ns), ww, bb, 1e-5)

        def bwd(go, mean, invstd, mask):
            return ops.layer_norm_backward(go, xx, list(ns), mean, invstd, ww, mask)

        def ref(rm_=None, rv_=None):
            out, mean, invstd = aten.native_layer_norm(xx, list(ns), ww, bb, 1e-5)
            lead = xx.shape[:xx.dim() - len(ns)]
            return out, mean.reshape(lead), invstd.reshape(lead)
        return fwd, bwd, ref, xx

    return {
        "batch_norm_train": bn(x, True), "batch_norm_train_no_running": bn(x, True, False),
        "batch_norm_eval": bn(x, False), "batch_norm_train_channels_last": bn(xcl, True),
        "group_norm": gn(x, 2), "group_norm_channels_last": gn(xcl, 4),
        "layer_norm": ln(x, (6,)), "layer_norm_two_dims": ln(x, (5, 6)),
        "layer_norm_channels_last": ln(xcl, (5, 6)),
    }, (rm, rv)


RAW_NAMES = ["batch_norm_train", "batch_norm_train_no_running", "batch_norm_eval", "batch_norm_train_channels_last",
             "group_norm", "group_norm_channels_last", "layer_norm", "layer_norm_two_dims", "layer_norm_channels_last"]


@pytest.mark.parametrize("name", RAW_NAMES)
def test_raw_ops_match_torch(name):
    """Forward output and statistics as aten's native op (batch norm in eval hands back the
    running statistics as mean and 1/sqrt(var + eps)); every output_mask of the backward gives
    the selected gradients (equal to the full call's) and empty tensors for the others."""
    cases, (rm, rv) = raw_cases()
    fwd, bwd, ref, xx = cases[name]
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    out, mean, invstd = fwd(rm1, rv1)
    ref_out, ref_mean, ref_invstd = ref(rm2, rv2)
    assert_norm_close(out, ref_out, torch.float64, msg="output")
    assert_norm_close(mean, ref_mean, torch.float64, 100, msg="mean")
    assert_norm_close(invstd, ref_invstd, torch.float64, 100, msg="invstd")
    assert_norm_close(rm1, rm2, torch.float64, 100, msg="running_mean")
    assert_norm_close(rv1, rv2, torch.float64, 100, msg="running_var")
    go = torch.randn_like(out)
    full = bwd(go, mean, invstd, [True, True, True])
    for mask in MASKS:
        outs = bwd(go, mean, invstd, mask)
        for on, got, whole in zip(mask, outs, full):
            if on:
                torch.testing.assert_close(got, whole, atol=1e-12, rtol=1e-12)
            else:
                assert got.numel() == 0, f"masked-out gradient should be empty, got {tuple(got.shape)}"


@pytest.mark.parametrize("name", RAW_NAMES)
def test_opcheck_forward(name):
    """opcheck: schema (incl. batch norm's in-place running statistics), fake, autograd
    registration and AOT dispatch."""
    cases, (rm, rv) = raw_cases()
    _, _, _, xx = cases[name]
    op_name = next(k for k in ("batch_norm", "group_norm", "layer_norm") if name.startswith(k))
    op = getattr(ops, f"{op_name}_forward").default
    x32 = xx.float()
    if op_name == "batch_norm":
        running = (rm.float().clone(), rv.float().clone()) if "no_running" not in name else (None, None)
        args = (x32, torch.randn(4), torch.randn(4), *running, "train" in name, 0.1, 1e-5)
    elif op_name == "group_norm":
        args = (x32, torch.randn(4), torch.randn(4), 2 if "channels_last" not in name else 4, 1e-5)
    else:
        ns = [6] if name == "layer_norm" else [5, 6]
        args = (x32, ns, torch.randn(ns), torch.randn(ns), 1e-5)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("mask", MASKS[:5], ids=str)
@pytest.mark.parametrize("name", ["batch_norm_train", "batch_norm_eval", "group_norm_channels_last",
                                  "layer_norm_two_dims"])
def test_opcheck_backward(name, mask):
    cases, (rm, rv) = raw_cases()
    fwd, bwd, _, xx = cases[name]
    out, mean, invstd = fwd(rm.clone(), rv.clone())
    go = torch.randn_like(out)
    if name.startswith("batch_norm"):
        w = torch.randn(4, dtype=torch.float64)
        op, args = ops.batch_norm_backward.default, (go, xx, w, mean, invstd, "train" in name, mask)
    elif name.startswith("group_norm"):
        op, args = ops.group_norm_backward.default, (go, xx, mean, invstd, torch.randn(4, dtype=torch.float64), 4,
                                                     mask)
    else:
        op, args = ops.layer_norm_backward.default, (go, xx, [5, 6], mean, invstd,
                                                     torch.randn(5, 6, dtype=torch.float64), mask)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", RAW_NAMES)
def test_fake_matches_real_metadata(name):
    """The fake kernels give the real kernels' shapes, dtypes and strides, for every output of
    forward and backward; the batch-norm fake leaves the running statistics alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases, (rm, rv) = raw_cases()
    fwd, bwd, _, xx = cases[name]
    real_fwd = fwd(rm.clone(), rv.clone())
    real_bwd = bwd(torch.randn_like(real_fwd[0]), real_fwd[1], real_fwd[2], [True, True, True])
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(xx)
        fake_fwd, fake_bwd = _fake_closures(name, fx, mode, rm, rv)
        ffwd = fake_fwd()
        fbwd = fake_bwd(torch.empty_like(ffwd[0]), ffwd[1], ffwd[2], [True, True, True])
    for i, (real, fake) in enumerate(zip(tuple(real_fwd) + tuple(real_bwd), tuple(ffwd) + tuple(fbwd))):
        assert fake.shape == real.shape and fake.dtype == real.dtype, (i, fake.shape, real.shape, fake.dtype,
                                                                       real.dtype)
        assert fake.stride() == real.stride() or real.numel() <= 1, (i, fake.stride(), real.stride())


def _fake_closures(name, fx, mode, rm, rv):
    f64 = dict(dtype=torch.float64)
    w, b = torch.empty(4, **f64), torch.empty(4, **f64)
    frm, frv = mode.from_tensor(rm), mode.from_tensor(rv)
    if name.startswith("batch_norm"):
        training, running = "train" in name, "no_running" not in name
        return (lambda: ops.batch_norm_forward(fx, w, b, frm if running else None, frv if running else None,
                                               training, 0.1, 1e-5),
                lambda go, m, s, mask: ops.batch_norm_backward(go, fx, w, m, s, training, mask))
    if name.startswith("group_norm"):
        g = 4 if "channels_last" in name else 2
        return (lambda: ops.group_norm_forward(fx, w, b, g, 1e-5),
                lambda go, m, s, mask: ops.group_norm_backward(go, fx, m, s, w, g, mask))
    ns = [6] if name == "layer_norm" else [5, 6]
    lw, lb = torch.empty(ns, **f64), torch.empty(ns, **f64)
    return (lambda: ops.layer_norm_forward(fx, ns, lw, lb, 1e-5),
            lambda go, m, s, mask: ops.layer_norm_backward(go, fx, ns, m, s, lw, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_fake_dtypes(dtype):
    """Statistics in the opmath dtype (float for bfloat16), as the real kernels return them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 4, 3, 3).to(dtype)
    w = torch.randn(4).to(dtype)
    real = [ops.batch_norm_forward(x, w, w, None, None, True, 0.1, 1e-5),
            ops.group_norm_forward(x, w, w, 2, 1e-5),
            ops.layer_norm_forward(x, [3, 3], None, None, 1e-5)]
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        fake = [ops.batch_norm_forward(fx, fw, fw, None, None, True, 0.1, 1e-5),
                ops.group_norm_forward(fx, fw, fw, 2, 1e-5),
                ops.layer_norm_forward(fx, [3, 3], None, None, 1e-5)]
    for r, f in zip(real, fake):
        for rt, ft in zip(r, f):
            assert rt.dtype == ft.dtype and rt.shape == ft.shape and rt.stride() == ft.stride()


def test_fake_batch_norm_does_not_mutate():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 4, 5)
    rm, rv = torch.zeros(4), torch.ones(4)
    with FakeTensorMode() as mode:
        frm, frv = mode.from_tensor(rm), mode.from_tensor(rv)
        ops.batch_norm_forward(mode.from_tensor(x), None, None, frm, frv, True, 0.1, 1e-5)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """A chain of the four norms (batch norm updating running statistics) traced in one graph:
    same output and input/weight/bias gradients as eager, same running statistics."""
    x = make_tensor((3, 4, 5, 6), torch.float32)
    w, b = make_tensor((4,), torch.float32), make_tensor((4,), torch.float32)
    lw = make_tensor((6,), torch.float32)
    stats = {}

    def make_f(rm, rv, irm, irv):
        def f(x, w, b, lw):
            y = cnnops.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2)
            y = torch.relu(cnnops.functional.group_norm(y, 2, w, b))
            y = cnnops.functional.instance_norm(y, irm, irv, w, None, use_input_stats=True, momentum=0.3)
            return cnnops.functional.layer_norm(y, (6,), lw, None)
        return f

    for key in ("eager", "compiled"):
        stats[key] = [torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4)]
    eager_f = make_f(*stats["eager"])
    compiled_f = make_f(*stats["compiled"])
    torch._dynamo.reset()
    compiled = torch.compile(compiled_f, backend=backend, fullgraph=True)
    inputs = (x, w, b, lw)
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    compiled_leaves = [t.clone().requires_grad_() for t in inputs]
    eager_out, compiled_out = eager_f(*eager_leaves), compiled(*compiled_leaves)
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    go = torch.randn_like(eager_out)
    for got, exp in zip(torch.autograd.grad(compiled_out, compiled_leaves, go),
                        torch.autograd.grad(eager_out, eager_leaves, go)):
        torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-5)
    for got, exp in zip(stats["compiled"], stats["eager"]):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-6)
    assert not torch.equal(stats["compiled"][0], torch.zeros(4)), "running mean not updated under compile"


@pytest.mark.parametrize("kind", list(GRIDS))
def test_compile_each(kind):
    name = {"batch_norm": "2d_eval", "instance_norm": "2d_affine", "layer_norm": "4d_last_two",
            "group_norm": "odd"}[kind]
    x, w, b, rm, rv, kw = build(kind, GRIDS[kind][name], torch.float32)

    def f(x, w, b):
        return call(cnnops.functional, kind, x, w, b, rm, rv, kw)

    assert_compiled_matches_eager(f, (x, w, b), "aot_eager")


# --------------------------------------------------------------------------------------------
# determinism, provenance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", list(GRIDS))
def test_deterministic(kind, layout):
    """Bitwise the same on every run (the weight/bias gradients are two-stage reductions)."""
    cfg = {"batch_norm": dict(shape=(8, 16, 23, 19), running=True, kw=dict(training=True)),
           "instance_norm": dict(shape=(8, 16, 23, 19)),
           "layer_norm": dict(shape=(8, 16, 23, 19), normalized_shape=(23, 19)),
           "group_norm": dict(shape=(8, 16, 23, 19), kw=dict(num_groups=4))}[kind]
    x, w, b, rm, rv, kw = build(kind, cfg, torch.float32, layout)
    go = make_tensor(x.shape, torch.float32, layout)
    runs = [run(cnnops.functional, kind, x, w, b, rm, rv, kw, go) for _ in range(2)]
    (o1, g1, rm1, rv1), (o2, g2, rm2, rv2) = runs
    assert torch.equal(o1, o2), "forward not bitwise reproducible"
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"grad_{k} not bitwise reproducible"
    if rm is not None:
        assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)


def is_borrowed_norm(event_name):
    """aten's own normalization kernels (native, oneDNN, cuDNN, the composite ones)."""
    if not event_name.startswith("aten::"):
        return False
    op = event_name[len("aten::"):].lstrip("_")
    return any(s in op for s in ("batch_norm", "layer_norm", "group_norm", "instance_norm", "mkldnn", "cudnn",
                                 "var_mean", "native_norm"))


def test_no_borrowed_kernels():
    """DESIGN.md: no cnnops op calls aten's normalization kernels."""
    assert is_borrowed_norm("aten::native_batch_norm") and is_borrowed_norm("aten::_batch_norm_impl_index")
    assert not is_borrowed_norm("cnnops::batch_norm_forward") and not is_borrowed_norm("aten::empty")
    x = make_tensor((4, 6, 5, 5), torch.float32, "channels_last")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for kind, kw, running in (("batch_norm", dict(training=True), True), ("batch_norm", {}, True),
                                  ("group_norm", dict(num_groups=3), False),
                                  ("instance_norm", {}, True), ("instance_norm", dict(use_input_stats=False), True),
                                  ("layer_norm", dict(normalized_shape=(5, 5)), False)):
            pshape = kw["normalized_shape"] if kind == "layer_norm" else (6,)
            leaves = [t.clone().requires_grad_() for t in (x, torch.randn(pshape), torch.randn(pshape))]
            rm, rv = (torch.zeros(6), torch.ones(6)) if running else (None, None)
            y = call(cnnops.functional, kind, *leaves, rm, rv, kw)
            y.backward(torch.randn_like(y))
    names = {e.name for e in prof.events()}
    for op in ("batch_norm", "group_norm", "layer_norm"):
        assert any(n.startswith(f"cnnops::{op}_forward") for n in names), sorted(names)
        assert any(n.startswith(f"cnnops::{op}_backward") for n in names), sorted(names)
    bad = sorted(n for n in names if is_borrowed_norm(n))
    assert not bad, f"cnnops called borrowed kernels: {bad}"


# --------------------------------------------------------------------------------------------
# every ISA's kernels: CNNOPS_CPU_ISA caps the choice (simd.h), in a subprocess since the choice
# is made once
# --------------------------------------------------------------------------------------------

ISA_CHECK = r"""
import sys
sys.path.insert(0, "tests")
import torch
import test_norm as t

print(torch.ops.cnnops.cpu_gemm_isa())
torch.manual_seed(0)
checked = 0
# The grids, channels_last too, plus cases long enough for every lane loop: 70 channels (a
# 64-channel block and a tail), spans of several vectors, ConvNeXt-style rows of 64 and 96.
extra = {
    "batch_norm": {"wide": dict(shape=(3, 70, 9, 11), running=True, kw=dict(training=True))},
    "instance_norm": {"wide": dict(shape=(2, 70, 17, 19), running=True)},
    "layer_norm": {"rows64": dict(shape=(2, 9, 11, 64), normalized_shape=(64,)),
                   "rows96": dict(shape=(37, 96), normalized_shape=(96,))},
    "group_norm": {"wide": dict(shape=(2, 70, 9, 11), kw=dict(num_groups=5))},
}
for kind, grid in t.GRIDS.items():
    for name, cfg in {**grid, **extra[kind]}.items():
        for dtype in t.DTYPES:
            if cfg.get("mean") and dtype == torch.bfloat16:
                continue
            # channels_last on test_layouts' cases and the extra ones
            rows = len(cfg["shape"]) in t.CHANNELS_LAST and ((kind, name) in t.LAYOUT_CASES or name in extra[kind])
            layouts = ["contiguous"] + (["channels_last"] if rows else [])
            for layout in layouts:
                x, w, b, rm, rv, kw = t.build(kind, cfg, dtype, layout)
                t.check_norm_against_torch(kind, x, w, b, rm, rv, kw, dtype, mean=cfg.get("mean", 0.0),
                                           msg=f"{name} layout={layout}")
                checked += 1
print(checked)
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_each_isa_matches_torch(isa):
    """The normalization loops are compiled per ISA (simd.h): each version against torch."""
    result = run_with_cpu_isa(isa, ISA_CHECK, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    name, checked = result.stdout.split()
    assert name == isa  # the requested ISA really ran
    assert int(checked) > 300


@pytest.mark.parametrize("kind", ["batch_norm", "group_norm"])
def test_channels_last_statistics_on_large_mean(kind):
    """Channels-last statistics run Welford down rows of channels; one long run in float32 drifts
    with the mean's rounding (norm_kernels.cpp merges runs of rows with Chan's formula instead).
    The tolerance table must hold on large-mean data for every draw, not only the grid's one."""
    cfg = GRIDS[kind]["large_mean_long"]
    for seed in range(10):
        torch.manual_seed(seed)
        x, w, b, rm, rv, kw = build(kind, cfg, torch.float32, "channels_last")
        check_norm_against_torch(kind, x, w, b, rm, rv, kw, torch.float32, mean=cfg["mean"], msg=f"seed {seed}")
