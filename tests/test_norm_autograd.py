"""Autograd of the normalization ops in the dispatcher (csrc/autograd/norm.cpp).

float64 gradcheck (with forward-mode AD) and gradgradcheck of batch, layer, group and instance
norm through cnnops.functional and through the raw ops, the backward ops included; gradients
computed with create_graph=True (requires_grad, a gradient penalty, a third derivative)
against torch's; torch.func (grad, jacrev, jvp, vmap of grad, hessian) and
torch.autograd.forward_ad against torch's; the SyncBatchNorm pieces.
"""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import cnnops.functional as CF

ops = torch.ops.cnnops
D = torch.float64


def _rand(*shape, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, dtype=D, generator=g)
    return t.abs() + 0.5 if positive else t


# --------------------------------------------------------------------------------------------
# cases: name -> (x, weight, bias, f(module, x, w, b)) with module cnnops.functional or F
# --------------------------------------------------------------------------------------------


def _bn(shape, affine, training, running, layout="contiguous"):
    C = shape[1]
    x = _rand(*shape, seed=1)
    if layout != "contiguous":
        x = x.contiguous(memory_format=getattr(torch, layout))
    w = _rand(C, positive=True, seed=2) if affine in ("both", "weight") else None
    b = _rand(C, seed=3) if affine in ("both", "bias") else None
    rm, rv = (_rand(C, seed=4), _rand(C, positive=True, seed=5)) if running else (None, None)

    def f(mod, x, w, b):
        # fresh running statistics per call: gradcheck calls f many times
        return mod.batch_norm(x, None if rm is None else rm.clone(), None if rv is None else rv.clone(), w, b,
                              training, 0.1, 1e-5)

    return x, w, b, f


def _ln(shape, normalized_shape, affine):
    x = _rand(*shape, seed=6)
    w = _rand(*normalized_shape, positive=True, seed=7) if affine in ("both", "weight") else None
    b = _rand(*normalized_shape, seed=8) if affine in ("both", "bias") else None
    return x, w, b, lambda mod, x, w, b: mod.layer_norm(x, normalized_shape, w, b, 1e-5)


def _gn(shape, groups, affine, layout="contiguous"):
    C = shape[1]
    x = _rand(*shape, seed=9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = _rand(C, positive=True, seed=10) if affine in ("both", "weight") else None
    b = _rand(C, seed=11) if affine in ("both", "bias") else None
    return x, w, b, lambda mod, x, w, b: mod.group_norm(x, groups, w, b, 1e-5)


def _in(shape, use_input_stats, affine):
    C = shape[1]
    x = _rand(*shape, seed=12)
    w = _rand(C, positive=True, seed=13) if affine else None
    b = _rand(C, seed=14) if affine else None
    rm, rv = _rand(C, seed=15), _rand(C, positive=True, seed=16)

    def f(mod, x, w, b):
        return mod.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats, 0.1, 1e-5)

    return x, w, b, f


CASES = {
    "bn_train_2d": lambda: _bn((5, 3), "both", True, True),
    "bn_train_3d_bias_only": lambda: _bn((3, 2, 4), "bias", True, False),
    "bn_train_4d_noaffine": lambda: _bn((2, 3, 2, 3), "none", True, True),
    "bn_train_4d_weight_only_channels_last": lambda: _bn((2, 3, 2, 2), "weight", True, False, "channels_last"),
    "bn_train_5d": lambda: _bn((2, 2, 2, 2, 2), "both", True, False),
    "bn_eval_2d": lambda: _bn((4, 3), "both", False, True),
    "bn_eval_3d_noaffine": lambda: _bn((3, 2, 4), "none", False, True),
    "bn_eval_4d": lambda: _bn((2, 3, 2, 2), "both", False, True),
    "bn_eval_empty": lambda: _bn((0, 3, 4), "both", False, True),
    "bn_train_5d_channels_last": lambda: _bn((2, 2, 2, 2, 2), "both", True, True, "channels_last_3d"),
    "ln_last": lambda: _ln((3, 4, 5), (5,), "both"),
    "ln_two_dims_noaffine": lambda: _ln((2, 3, 4), (3, 4), "none"),
    "ln_weight_only": lambda: _ln((4, 6), (6,), "weight"),
    "ln_all_dims_bias_only": lambda: _ln((2, 3, 2), (2, 3, 2), "bias"),
    "ln_empty": lambda: _ln((0, 3, 4), (4,), "both"),
    "gn_groups_1": lambda: _gn((2, 4, 3), 1, "both"),
    "gn_groups_C": lambda: _gn((2, 4, 3), 4, "none"),
    "gn_groups_2_4d": lambda: _gn((2, 4, 2, 3), 2, "both"),
    "gn_groups_3_channels_last": lambda: _gn((2, 6, 2, 2), 3, "weight", "channels_last"),
    "gn_empty": lambda: _gn((0, 4, 3), 2, "both"),
    "in_input_stats": lambda: _in((2, 3, 5), True, True),
    "in_input_stats_noaffine": lambda: _in((2, 2, 2, 3), True, False),
    "in_running_stats": lambda: _in((2, 3, 5), False, True),
}


def _inputs(x, w, b):
    present = [t is not None for t in (x, w, b)]
    return [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None], present


def _unpack(args, present):
    it = iter(args)
    return [next(it) if p else None for p in present]


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_gradgradcheck_functional(name):
    x, w, b, f = CASES[name]()
    inputs, present = _inputs(x, w, b)

    def fn(*args):
        return f(CF, *_unpack(args, present))

    assert gradcheck(fn, inputs, check_forward_ad=True)
    assert gradgradcheck(fn, inputs)


# --------------------------------------------------------------------------------------------
# raw ops, the backward ops included. The backward ops' derivative w.r.t. the input counts
# mean/invstd as the input's statistics (training), so the checks recompute them from the
# input inside the function, with the forward op (its mean/invstd are non-differentiable).
# --------------------------------------------------------------------------------------------

MASKS = [[True, True, True], [True, False, False], [False, True, True], [True, False, True]]


def _raw_cases():
    x3 = _rand(3, 2, 4, seed=20)
    x4 = _rand(2, 4, 2, 2, seed=21)
    return {
        "batch_train": (x3, _rand(2, positive=True, seed=22), _rand(2, seed=23),
                        lambda x, w, b: ops.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5),
                        lambda g, x, w, st: ops.batch_norm_backward(g, x, w, st[0], st[1], True, st[2])),
        "batch_eval": (x3, _rand(2, positive=True, seed=22), _rand(2, seed=23),
                       lambda x, w, b: ops.batch_norm_forward(x, w, b, _rand(2, seed=24),
                                                              _rand(2, positive=True, seed=25), False, 0.1, 1e-5),
                       lambda g, x, w, st: ops.batch_norm_backward(g, x, w, st[0], st[1], False, st[2])),
        "layer": (x3, _rand(4, positive=True, seed=26), _rand(4, seed=27),
                  lambda x, w, b: ops.layer_norm_forward(x, [4], w, b, 1e-5),
                  lambda g, x, w, st: ops.layer_norm_backward(g, x, [4], st[0], st[1], w, st[2])),
        "layer_2d": (x4, _rand(2, 2, positive=True, seed=28), _rand(2, 2, seed=29),
                     lambda x, w, b: ops.layer_norm_forward(x, [2, 2], w, b, 1e-5),
                     lambda g, x, w, st: ops.layer_norm_backward(g, x, [2, 2], st[0], st[1], w, st[2])),
        "group": (x4, _rand(4, positive=True, seed=30), _rand(4, seed=31),
                  lambda x, w, b: ops.group_norm_forward(x, w, b, 2, 1e-5),
                  lambda g, x, w, st: ops.group_norm_backward(g, x, st[0], st[1], w, 2, st[2])),
    }


RAW = list(_raw_cases())


@pytest.mark.parametrize("name", RAW)
def test_raw_forward_checks(name):
    x, w, b, fwd, _ = _raw_cases()[name]
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    out, mean, invstd = fwd(*inputs)
    assert out.grad_fn is not None and out.requires_grad
    assert not mean.requires_grad and not invstd.requires_grad

    def fn(*args):
        return fwd(*args)[0]

    assert gradcheck(fn, inputs, check_forward_ad=True)
    assert gradgradcheck(fn, inputs)
    # without a weight
    assert gradgradcheck(lambda x, b: fwd(x, None, b)[0], [inputs[0], inputs[2]])


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("name", RAW)
def test_raw_backward_checks(name, mask):
    x, w, _, fwd, bwd = _raw_cases()[name]
    g = _rand(*x.shape, seed=40)
    inputs = [t.clone().requires_grad_() for t in (g, x, w)]

    def fn(g, x, w):
        _, mean, invstd = fwd(x, w, None)
        outs = bwd(g, x, w, (mean, invstd, mask))
        return tuple(o for o, m in zip(outs, mask) if m)

    outs = fn(*inputs)
    assert all(o.grad_fn is not None for o in outs)
    assert gradcheck(fn, inputs, check_forward_ad=True)
    assert gradgradcheck(fn, inputs)
    # without a weight
    assert gradcheck(lambda g, x: fn(g, x, None)[:1] if mask[0] else fn(g, x, None)[-1:], inputs[:2],
                     check_forward_ad=True)


def test_raw_backward_unselected_outputs_have_no_history():
    x = _rand(3, 2, 4, seed=1).requires_grad_()
    _, mean, invstd = ops.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    gi, gw, gb = ops.batch_norm_backward(torch.ones_like(x), x, None, mean, invstd, True, [True, False, False])
    assert gi.requires_grad and not gw.requires_grad and not gb.requires_grad


def test_raw_backward_mean_requiring_grad_raises():
    x = _rand(3, 2, 4, seed=1).requires_grad_()
    mean = torch.zeros(2, dtype=D, requires_grad=True)
    invstd = torch.ones(2, dtype=D)
    gi, _, _ = ops.batch_norm_backward(torch.ones_like(x), x, None, mean, invstd, True, [True, False, False])
    (gx,) = torch.autograd.grad(gi.pow(2).sum(), [x], retain_graph=True)  # w.r.t. the input: fine
    assert gx.shape == x.shape
    with pytest.raises(NotImplementedError, match="batch_norm_backward.*mean and invstd"):
        torch.autograd.grad(gi.pow(2).sum(), [mean])
    with fwAD.dual_level():
        dual_mean = fwAD.make_dual(mean.detach(), torch.ones(2, dtype=D))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ops.batch_norm_backward(torch.ones_like(x), x.detach(), None, dual_mean, invstd, True, [True, True, True])


def test_running_stats():
    """batch_norm_forward bumps the running statistics' versions (they are mutated in place)
    and refuses ones that require grad or carry a tangent, as torch."""
    x = _rand(4, 3, seed=1).requires_grad_()
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    v0 = (rm._version, rv._version)
    out, _, _ = ops.batch_norm_forward(x, None, None, rm, rv, True, 0.1, 1e-5)
    assert rm._version > v0[0] and rv._version > v0[1]
    torch.testing.assert_close(rm, 0.1 * x.detach().mean(0))
    with pytest.raises(RuntimeError, match="running_mean"):
        ops.batch_norm_forward(x, None, None, rm.clone().requires_grad_(), rv, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="running_var"):
        F.batch_norm(x, rm, rv.clone().requires_grad_(), training=True)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ops.batch_norm_forward(x.detach(), None, None, fwAD.make_dual(rm, torch.ones_like(rm)), rv, True, 0.1,
                                   1e-5)


# --------------------------------------------------------------------------------------------
# create_graph parity with torch: requires_grad of each gradient, a gradient penalty, third order
# --------------------------------------------------------------------------------------------

PARITY = ["bn_train_2d", "bn_train_3d_bias_only", "bn_train_4d_noaffine", "bn_eval_4d",
          "bn_train_4d_weight_only_channels_last", "ln_last", "ln_two_dims_noaffine", "gn_groups_2_4d",
          "gn_groups_C", "in_input_stats", "in_running_stats", "bn_eval_empty", "bn_train_5d_channels_last",
          "ln_empty", "gn_empty"]


def _both(name):
    x, w, b, f = CASES[name]()
    ours, present = _inputs(x, w, b)
    ref, _ = _inputs(x, w, b)
    return ours, ref, present, f


@pytest.mark.parametrize("loss", ["pow2", "linear"])
@pytest.mark.parametrize("name", PARITY)
def test_create_graph_parity(name, loss):
    ours, ref, present, f = _both(name)
    proj = _rand(*ours[0].shape, seed=50)

    def penalty_grads(mod, inputs):
        x, w, b = _unpack(inputs, present)
        if mod is F and w is None and b is not None:
            # torch's batch norm double backward fails for a bias without a weight ("Expected a
            # proper Tensor but got None"): its reference uses a unit weight, the same function.
            w = torch.ones(x.size(1) if name.startswith(("bn", "gn", "in")) else b.shape, dtype=D)
        out = f(mod, x, w, b)
        value = out.pow(2).sum() if loss == "pow2" else (out * proj).sum()
        grads = torch.autograd.grad(value, inputs, create_graph=True)
        req = [g.requires_grad for g in grads]
        penalty = sum((g ** 2).sum() for g in grads)  # WGAN-GP style
        second = torch.autograd.grad(penalty, inputs, allow_unused=True) if penalty.requires_grad else None
        return grads, req, second

    g_ours, req_ours, second_ours = penalty_grads(CF, ours)
    g_ref, req_ref, second_ref = penalty_grads(F, ref)
    if name.startswith("gn") or name.endswith("empty"):
        # torch's group norm (and its norms of an empty input) differentiate an aten composite
        # under create_graph, which sees that grad_bias = sum(grad_output) is constant when
        # grad_output is; cnnops' backward op records all its outputs, as torch's batch and
        # layer norm backward do. requires_grad may then be True where torch's is False (a zero
        # derivative: the values below agree), never the reverse.
        assert all(o or not r for o, r in zip(req_ours, req_ref))
    else:
        assert req_ours == req_ref
    for a, e in zip(g_ours, g_ref):
        torch.testing.assert_close(a, e)
    assert (second_ours is None) == (second_ref is None)
    if second_ref is not None:
        for a, e, t in zip(second_ours, second_ref, ours):
            # an unused input (None) and a zero gradient are the same derivative
            torch.testing.assert_close(torch.zeros_like(t) if a is None else a, torch.zeros_like(t) if e is None else e)


def _definition(name):
    """The norm written out in aten ops: torch's autograd differentiates it to any order."""
    def norm(x, dims, w, b, view):
        mean = x.mean(dims, keepdim=True)
        y = (x - mean) * ((x - mean).pow(2).mean(dims, keepdim=True) + 1e-5).rsqrt()
        return y * w.view(view) + b.view(view)

    if name == "bn_train_2d":
        return lambda mod, x, w, b: norm(x, (0,), w, b, (1, -1))
    if name == "ln_last":
        return lambda mod, x, w, b: norm(x, (-1,), w, b, (-1,))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["bn_train_2d", "ln_last", "gn_groups_2_4d"])
def test_third_order(name):
    """Third derivatives against torch: F for group norm; for batch norm (torch refuses 3rd
    order) and layer norm (torch's 3rd order is wrong: gradgradcheck fails) torch's autograd of
    the norm written out in aten ops, and a float64 gradgradcheck of the second derivative."""
    ours, ref, present, f = _both(name)
    f_ref = f if name.startswith("gn") else _definition(name)

    def second(f, mod, inputs):
        x = inputs[0]
        out = f(mod, *_unpack(inputs, present))
        (g1,) = torch.autograd.grad(out.pow(3).sum(), [x], create_graph=True)
        (g2,) = torch.autograd.grad(g1.pow(2).sum(), [x], create_graph=True)
        return g2

    def third(f, mod, inputs):
        return torch.autograd.grad(second(f, mod, inputs).sin().sum(), inputs)

    for a, e in zip(third(f, CF, ours), third(f_ref, F, ref)):
        torch.testing.assert_close(a, e)
    assert gradcheck(lambda *args: second(f, CF, list(args)), ours)


# --------------------------------------------------------------------------------------------
# torch.func and forward-mode AD against torch
# --------------------------------------------------------------------------------------------

FUNC_CASES = ["bn_eval_4d", "bn_train_2d", "ln_last", "ln_two_dims_noaffine", "gn_groups_2_4d", "in_input_stats"]


def _func_fn(name, mod):
    x, w, b, f = CASES[name]()
    x, w, b = (None if t is None else t.detach() for t in (x, w, b))
    return x, w, b, lambda x, w, b: f(mod, x, w, b)


@pytest.mark.parametrize("name", FUNC_CASES)
def test_torch_func_grad_jacrev_jvp(name):
    x, w, b, ours = _func_fn(name, CF)
    _, _, _, ref = _func_fn(name, F)
    argnums = (0, 1, 2) if w is not None and b is not None else (0,)

    def loss(fn):
        return lambda x, w, b: fn(x, w, b).sin().sum()

    for a, e in zip(torch.func.grad(loss(ours), argnums=argnums)(x, w, b),
                    torch.func.grad(loss(ref), argnums=argnums)(x, w, b)):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(torch.func.jacrev(ours)(x, w, b), torch.func.jacrev(ref)(x, w, b))
    tangents = tuple(_rand(*t.shape, seed=60 + i) if t is not None else None for i, t in enumerate((x, w, b)))
    if w is not None and b is not None:
        out_o, t_o = torch.func.jvp(ours, (x, w, b), tangents)
        out_r, t_r = torch.func.jvp(ref, (x, w, b), tangents)
    else:
        out_o, t_o = torch.func.jvp(lambda x: ours(x, w, b), (x,), tangents[:1])
        out_r, t_r = torch.func.jvp(lambda x: ref(x, w, b), (x,), tangents[:1])
    torch.testing.assert_close(out_o, out_r)
    torch.testing.assert_close(t_o, t_r)


@pytest.mark.parametrize("name", FUNC_CASES)
def test_forward_ad(name):
    x, w, b, ours = _func_fn(name, CF)
    _, _, _, ref = _func_fn(name, F)
    tangents = [None if t is None else _rand(*t.shape, seed=70 + i) for i, t in enumerate((x, w, b))]

    def run(fn):
        with fwAD.dual_level():
            duals = [None if t is None else fwAD.make_dual(t, tt) for t, tt in zip((x, w, b), tangents)]
            return fwAD.unpack_dual(fn(*duals)).tangent

    torch.testing.assert_close(run(ours), run(ref))


@pytest.mark.parametrize("name", ["bn_eval_4d", "bn_train_5d", "ln_last", "gn_groups_2_4d"])
def test_vmap_grad_per_sample(name):
    """Per-sample gradients: vmap over the batch of grad of a one-sample loss."""
    x, w, b, ours = _func_fn(name, CF)
    _, _, _, ref = _func_fn(name, F)

    def per_sample(fn):
        def loss(w, b, xi):
            return fn(xi.unsqueeze(0), w, b).sin().sum()
        return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's slow-path (no batching rule) warning
        got = per_sample(ours)
    for a, e in zip(got, per_sample(ref)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("training", [False, True])
def test_vmap_batch_norm(training):
    """batch_norm_forward's vmap rule (its schema mutates the running statistics, which vmap's
    generic loop refuses): eval folds the vmapped dim into the batch, training without running
    statistics gives each vmapped sample its own statistics."""
    X = _rand(3, 4, 2, 5, seed=95)
    w, b = _rand(2, positive=True, seed=96), _rand(2, seed=97)
    rm, rv = (None, None) if training else (_rand(2, seed=98), _rand(2, positive=True, seed=99))

    def fn(mod):
        return lambda x: mod.batch_norm(x, rm, rv, w, b, training)

    torch.testing.assert_close(torch.func.vmap(fn(CF))(X), torch.func.vmap(fn(F))(X))
    Xt = X.movedim(0, 2)  # vmapped over dim 2: samples 4 x 2 x 5
    torch.testing.assert_close(torch.func.vmap(fn(CF), in_dims=2)(Xt), torch.func.vmap(fn(F), in_dims=2)(Xt))
    if training:
        rm2, rv2 = torch.zeros(2, dtype=D), torch.ones(2, dtype=D)
        with pytest.raises(NotImplementedError, match="running statistics"):
            torch.func.vmap(lambda x: CF.batch_norm(x, rm2, rv2, w, b, True))(X)
        with pytest.raises(NotImplementedError, match="batched weight"):
            torch.func.vmap(lambda x, w: CF.batch_norm(x, None, None, w, b, True))(X, w.expand(3, 2))


@pytest.mark.parametrize("name", ["bn_eval_2d", "bn_train_2d", "ln_last", "gn_groups_1", "in_input_stats"])
def test_hessian(name):
    x, w, b, ours = _func_fn(name, CF)
    _, _, _, ref = _func_fn(name, F)
    x = x[:2] if name.startswith("bn_eval") else x

    def loss(fn):
        return lambda x: fn(x, w, b).pow(3).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.hessian(loss(ours))(x)
    torch.testing.assert_close(got, torch.func.hessian(loss(ref))(x))


# --------------------------------------------------------------------------------------------
# SyncBatchNorm pieces: every input differentiable, to any order and in forward mode
# --------------------------------------------------------------------------------------------


def _sync_inputs(shape=(3, 2, 4)):
    C = shape[1]
    x = _rand(*shape, seed=80)
    return dict(x=x, g=_rand(*shape, seed=81), w=_rand(C, positive=True, seed=82), b=_rand(C, seed=83),
                mean=_rand(C, seed=84), invstd=_rand(C, positive=True, seed=85), sum_dy=_rand(C, seed=86),
                sum_dy_xmu=_rand(C, seed=87))


def test_batch_norm_stats_autograd():
    x = _sync_inputs()["x"].requires_grad_()
    mean, m2 = ops.batch_norm_stats(x)
    assert mean.grad_fn is not None and m2.grad_fn is not None
    assert gradcheck(ops.batch_norm_stats, [x], check_forward_ad=True)
    assert gradgradcheck(ops.batch_norm_stats, [x])
    # against torch's autograd of the definition
    xr = x.detach().clone().requires_grad_()
    mr = xr.mean((0, 2))
    m2r = ((xr - mr[None, :, None]) ** 2).sum((0, 2))
    v = _rand(2, seed=88)
    for out, ref in ((mean, mr), (m2, m2r)):
        (a,) = torch.autograd.grad((out * v).sum(), [x], create_graph=True)
        (e,) = torch.autograd.grad((ref * v).sum(), [xr], create_graph=True)
        torch.testing.assert_close(a, e)
        assert a.requires_grad == e.requires_grad  # d mean/dx is constant, d m2/dx is not
        if e.requires_grad:
            torch.testing.assert_close(torch.autograd.grad(a.pow(2).sum(), [x])[0],
                                       torch.autograd.grad(e.pow(2).sum(), [xr])[0])


def test_batch_norm_elemt_autograd():
    t = _sync_inputs()
    inputs = [t[k].clone().requires_grad_() for k in ("x", "w", "b", "mean", "invstd")]
    assert ops.batch_norm_elemt(*inputs).grad_fn is not None
    assert gradcheck(ops.batch_norm_elemt, inputs, check_forward_ad=True)
    assert gradgradcheck(ops.batch_norm_elemt, inputs)
    assert gradcheck(lambda x, m, s: ops.batch_norm_elemt(x, None, None, m, s), [inputs[0], inputs[3], inputs[4]],
                     check_forward_ad=True)


@pytest.mark.parametrize("count", [12, 30])
def test_batch_norm_backward_elemt_autograd(count):
    t = _sync_inputs()
    inputs = [t[k].clone().requires_grad_() for k in ("g", "x", "mean", "invstd", "w", "sum_dy", "sum_dy_xmu")]

    def fn(g, x, mean, invstd, w, sum_dy, sum_dy_xmu):
        return ops.batch_norm_backward_elemt(g, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)

    assert fn(*inputs).grad_fn is not None
    assert gradcheck(fn, inputs, check_forward_ad=True)
    assert gradgradcheck(fn, inputs)
    no_w = [i for k, i in enumerate(inputs) if k != 4]
    assert gradcheck(lambda g, x, m, s, sd, sdx: fn(g, x, m, s, None, sd, sdx), no_w, check_forward_ad=True)


# --------------------------------------------------------------------------------------------
# low precision: bfloat16 input with float32 parameters, second order against torch in float64
# --------------------------------------------------------------------------------------------

LOW = {
    "batch_train": lambda m, x, w, b: m.batch_norm(x, None, None, w, b, True),
    "batch_eval": lambda m, x, w, b: m.batch_norm(x, torch.zeros(4, dtype=w.dtype),
                                                  torch.full((4,), 2.0, dtype=w.dtype), w, b, False),
    "layer": lambda m, x, w, b: m.layer_norm(x, [3], None, None),
    "group": lambda m, x, w, b: m.group_norm(x, 2, w, b),
}


@pytest.mark.parametrize("name", list(LOW))
def test_bfloat16_second_order(name):
    f = LOW[name]
    x64 = _rand(4, 4, 3, 3, seed=90).to(torch.bfloat16).double()  # values exact in both
    w64, b64 = _rand(4, positive=True, seed=91).float().double(), _rand(4, seed=92).float().double()
    results = []
    for mod, dtype, param_dtype in ((CF, torch.bfloat16, torch.float32), (F, D, D)):
        x, w, b = x64.to(dtype).requires_grad_(), w64.to(param_dtype).requires_grad_(), \
            b64.to(param_dtype).requires_grad_()
        (g,) = torch.autograd.grad(f(mod, x, w, b).double().sin().sum(), [x], create_graph=True)
        gx, gw = torch.autograd.grad(g.double().pow(2).sum(), [x, w], allow_unused=True)
        if mod is CF:
            assert g.dtype == gx.dtype == torch.bfloat16 and (gw is None or gw.dtype == torch.float32)
        results.append([None if t is None else t.double() for t in (g, gx, gw)])
    for got, expected in zip(*results):
        assert (got is None) == (expected is None)
        if expected is not None:
            scale = expected.abs().max()
            torch.testing.assert_close(got / scale, expected / scale, atol=3e-2, rtol=0)
