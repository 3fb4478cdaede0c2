"""Autograd of the pooling ops beyond first order (csrc/autograd/pool.cpp): double and triple
backward, create_graph, forward-mode AD and torch.func, through cnnops.functional and the raw
ops, against torch.nn.functional in float64 and float64 gradcheck/gradgradcheck.

Max pool inputs have no ties (a scaled random permutation), so finite differences are valid and
the argmax is torch's.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import cnnops.functional as CF

# vmap runs the ops through torch's per-sample fallback (no batching rules), which warns.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

DT = torch.float64
ops = torch.ops.cnnops
CHECK = dict(eps=1e-6, atol=1e-8, rtol=1e-6)


def distinct(shape, layout="contiguous", seed=0):
    """Values k/n for a random permutation k: no ties, gaps of 1/n >> gradcheck's eps."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    x = (torch.randperm(n, generator=g).to(DT) / n - 0.5).reshape(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not x.is_contiguous()
    return x


def randn(shape, seed=1):
    return torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


# (family, dims, kwargs, spatial input size). Every family with its options, sizes tiny.
CASES = [
    ("max_pool", 1, dict(kernel_size=3, stride=1, padding=1), (7,)),
    ("max_pool", 1, dict(kernel_size=2, stride=2, dilation=2, ceil_mode=True), (8,)),
    ("max_pool", 2, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (5, 6)),
    ("max_pool", 2, dict(kernel_size=2, stride=1, padding=1, dilation=2), (5, 4)),
    ("max_pool", 3, dict(kernel_size=2, stride=1, padding=1), (3, 4, 3)),
    ("avg_pool", 1, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (8,)),
    ("avg_pool", 1, dict(kernel_size=2, stride=1), (6,)),
    ("avg_pool", 2, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (5, 6)),
    ("avg_pool", 2, dict(kernel_size=2, stride=1, padding=1, count_include_pad=False, divisor_override=3), (4, 5)),
    ("avg_pool", 3, dict(kernel_size=2, stride=1, padding=1, count_include_pad=False), (3, 4, 3)),
    ("avg_pool", 3, dict(kernel_size=2, stride=2, ceil_mode=True, divisor_override=-5), (3, 4, 3)),
    ("adaptive_avg_pool", 1, dict(output_size=3), (7,)),
    ("adaptive_avg_pool", 2, dict(output_size=(3, 4)), (5, 6)),
    ("adaptive_avg_pool", 2, dict(output_size=(7, 1)), (5, 3)),  # larger than the input
    ("adaptive_avg_pool", 3, dict(output_size=(2, 3, 2)), (3, 4, 3)),
    ("adaptive_avg_pool", 2, dict(output_size=1), (4, 3)),  # global average
    ("adaptive_max_pool", 1, dict(output_size=3), (7,)),
    ("adaptive_max_pool", 2, dict(output_size=(3, 4)), (5, 6)),
    ("adaptive_max_pool", 2, dict(output_size=(7, 2)), (5, 3)),
    ("adaptive_max_pool", 3, dict(output_size=(2, 3, 2)), (3, 4, 3)),
    ("max_unpool", 1, dict(kernel_size=2), (8,)),
    ("max_unpool", 2, dict(kernel_size=2, output_size=(7, 5)), (7, 5)),
    ("max_unpool", 2, dict(kernel_size=3, stride=3, padding=1), (6, 5)),
    ("max_unpool", 3, dict(kernel_size=2, stride=2), (4, 4, 2)),
]

# Overlapping windows: an input element is the argmax of several windows, so the indices repeat.
OVERLAPPING = [c for c in CASES if c[0] in ("max_pool", "adaptive_max_pool")
               and (c[2].get("stride", 99) < c[2].get("kernel_size", 0) or c[0] == "adaptive_max_pool")]


def case_id(case):
    family, dims, kw, size = case
    return f"{family}{dims}d-" + "-".join(f"{k}={v}" for k, v in kw.items()) + f"-in{size}"


def setup2(case, layout="contiguous", n=2, c=2):
    """(cnnops function, torch function, input, extra): the functions take (input, *extra),
    extra being the indices of an unpool."""
    family, dims, kw, size = case
    cf, tf = getattr(CF, f"{family}{dims}d"), getattr(F, f"{family}{dims}d")
    if family != "max_unpool":
        return (lambda t: cf(t, **kw)), (lambda t: tf(t, **kw)), distinct((n, c, *size), layout), ()
    # Unpool indices of a max pool without overlap (max_unpool is a scatter: with repeated
    # indices its derivative is not the gather torch's and cnnops' backward compute).
    pool_kw = {k: v for k, v in kw.items() if k != "output_size"}
    pooled, indices = getattr(F, f"max_pool{dims}d")(distinct((n, c, *size), layout), return_indices=True, **pool_kw)
    kw = dict(kw, output_size=size)
    return (lambda t, i: cf(t, i, **kw)), (lambda t, i: tf(t, i, **kw)), pooled, (indices,)


def setup(case, layout="contiguous", n=2, c=2):
    """(cnnops function, torch function, input): the functions take just the input."""
    cf, tf, x, extra = setup2(case, layout, n, c)
    return (lambda t: cf(t, *extra)), (lambda t: tf(t, *extra)), x


def assert_same(actual, expected, msg=""):
    """float64 values as torch's (a few roundings apart)."""
    assert (actual is None) == (expected is None), f"{msg}: {actual} vs torch {expected}"
    if expected is not None:
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10, msg=msg)


def grads(f, x, create_graph=True):
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(leaf).pow(2).sum(), leaf, create_graph=create_graph)
    return leaf, g


# --------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64), forward mode included
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck_and_gradgradcheck_functional(case):
    cf, _, x = setup(case, n=1)
    x = x.requires_grad_()
    assert gradcheck(cf, (x,), check_forward_ad=True, check_batched_grad=True, **CHECK)
    assert gradgradcheck(cf, (x,), check_fwd_over_rev=True, **CHECK)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("family", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"])
def test_gradgradcheck_layouts(family, layout):
    case = next(c for c in CASES if c[0] == family and c[1] == 2)
    cf, _, x = setup(case, layout, n=1)
    assert gradgradcheck(cf, (x.requires_grad_(),), check_fwd_over_rev=True, **CHECK)


def raw_op_calls(dims):
    """(forward op, backward op) closures over one 1d/2d/3d input, with indices fixed."""
    size = {1: (7,), 2: (5, 6), 3: (3, 4, 3)}[dims]
    x = distinct((2, 2, *size))
    k, s, p, d = [3] * dims, [2] * dims, [1] * dims, [1] * dims
    y, idx = ops.max_pool_forward(x, k, s, p, d, True)
    a = [2] * dims
    ay, aidx = ops.adaptive_max_pool_forward(x, a)
    upooled, uidx = ops.max_pool_forward(x, [2] * dims, [2] * dims, [0] * dims, [1] * dims, False)
    avg_args = (k, s, p, True, False, 0)
    return x, {
        "max_pool": (lambda t: ops.max_pool_forward(t, k, s, p, d, True)[0],
                     lambda go, t: ops.max_pool_backward(go, t, idx, k, s, p, d, True), y),
        "avg_pool": (lambda t: ops.avg_pool_forward(t, *avg_args),
                     lambda go, t: ops.avg_pool_backward(go, t, *avg_args), y),
        "adaptive_avg_pool": (lambda t: ops.adaptive_avg_pool_forward(t, a),
                              lambda go, t: ops.adaptive_avg_pool_backward(go, t), ay),
        "adaptive_max_pool": (lambda t: ops.adaptive_max_pool_forward(t, a)[0],
                              lambda go, t: ops.adaptive_max_pool_backward(go, t, aidx), ay),
        # input: the pooled values; grad_output: the unpooled shape
        "max_unpool": (lambda t: ops.max_unpool_forward(t, uidx, list(size)),
                       lambda go, t: ops.max_unpool_backward(go, t, uidx), x),
    }, upooled


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("family", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"])
def test_gradcheck_and_gradgradcheck_raw_ops(family, dims):
    """Every forward and backward op, differentiated to second order, forward mode included.
    The backward ops w.r.t. grad_output and input (zero derivative: it is only a shape)."""
    x, calls, upooled = raw_op_calls(dims)
    forward, backward, like_out = calls[family]
    inp = (upooled if family == "max_unpool" else x).clone().requires_grad_()
    assert gradcheck(forward, (inp,), check_forward_ad=True, **CHECK)
    assert gradgradcheck(forward, (inp,), check_fwd_over_rev=True, **CHECK)
    go = randn(like_out.shape).requires_grad_()
    assert gradcheck(backward, (go, inp), check_forward_ad=True, check_batched_grad=True, **CHECK)
    assert gradgradcheck(backward, (go, inp), check_fwd_over_rev=True, **CHECK)


def test_raw_ops_carry_grad_fn():
    x, calls, upooled = raw_op_calls(2)
    xr = x.clone().requires_grad_()
    out, idx = ops.max_pool_forward(xr, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert out.grad_fn is not None and out.requires_grad
    assert idx.grad_fn is None and not idx.requires_grad and idx.dtype == torch.int64
    out, idx = ops.adaptive_max_pool_forward(xr, [2, 3])
    assert out.grad_fn is not None and idx.grad_fn is None and not idx.requires_grad
    for family, (forward, backward, like_out) in calls.items():
        inp = (upooled if family == "max_unpool" else x).clone().requires_grad_()
        assert forward(inp).grad_fn is not None, family
        go = randn(like_out.shape).requires_grad_()
        assert backward(go, inp).grad_fn is not None, family
        assert backward(go.detach(), inp.detach()).grad_fn is None, family
        with torch.no_grad():
            assert forward(inp).grad_fn is None, family
    # max_unpool_backward takes its input for the shape only (torch's max_pool_double_backward
    # is not given it): no edge to it
    _, backward, like_out = calls["max_unpool"]
    assert not backward(randn(like_out.shape), upooled.clone().requires_grad_()).requires_grad


# --------------------------------------------------------------------------------------------
# create_graph: requires_grad and second/third order gradients as torch's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_create_graph_like_torch(case):
    cf, tf, x = setup(case)
    res = {}
    for name, f in (("cnnops", cf), ("torch", tf)):
        leaf, g = grads(f, x)
        # a gradient-penalty loss, differentiated again
        (h,) = torch.autograd.grad((g ** 2).sum(), leaf, create_graph=True)
        # a linear loss: the gradient depends on x only through the backward op's input
        leaf2 = x.clone().requires_grad_()
        (gl,) = torch.autograd.grad(f(leaf2).sum(), leaf2, create_graph=True)
        gg = torch.autograd.grad(gl.sum(), leaf2, allow_unused=True)[0] if gl.requires_grad else None
        res[name] = (g, h, gl, gg)
    (g, h, gl, gg), (tg, th, tgl, tgg) = res["cnnops"], res["torch"]
    assert g.requires_grad == tg.requires_grad and h.requires_grad == th.requires_grad
    assert gl.requires_grad == tgl.requires_grad, "requires_grad of a gradient of a linear loss"
    assert_same(g, tg, "gradient")
    assert_same(h, th, "second order")
    assert_same(gl, tgl, "gradient of the linear loss")
    assert_same(gg, tgg, "its gradient (zeros or None, as torch)")


@pytest.mark.parametrize("case", OVERLAPPING, ids=case_id)
def test_third_order_overlapping_windows_like_torch(case):
    """With overlapping windows one input is the argmax of several: the backward adds at
    repeated indices, its derivative gathers, and the next one adds again."""
    cf, tf, x = setup(case)
    res = []
    for f in (cf, tf):
        leaf, g = grads(lambda t: f(t) ** 3, x)
        (h,) = torch.autograd.grad((g ** 2).sum(), leaf, create_graph=True)
        (k,) = torch.autograd.grad((h ** 3).sum(), leaf)
        res.append((g, h, k))
    for what, a, b in zip(("first", "second", "third"), *res):
        assert_same(a, b, f"{what} order")


def test_overlapping_case_has_repeated_indices():
    """OVERLAPPING really exercises the additions at repeated indices."""
    for family, dims, kw, size in OVERLAPPING:
        x = distinct((2, 2, *size))
        _, idx = getattr(F, f"{family}{dims}d")(x, return_indices=True, **kw)
        flat = idx.flatten(2)
        assert any(len(set(row.tolist())) < len(row) for row in flat.flatten(0, 1)), (family, dims, kw)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_max_unpool_repeated_indices_second_order_like_torch(dims):
    """max_unpool_backward gathers; its derivative must add where the indices repeat."""
    size = {1: (7,), 2: (5, 6), 3: (3, 4, 3)}[dims]
    pooled, idx = getattr(F, f"max_pool{dims}d")(distinct((2, 2, *size)), 3, 1, 1, return_indices=True)
    w0 = randn((2, 2, *size))
    res = []
    for M in (CF, F):
        x, w = pooled.clone().requires_grad_(), w0.clone().requires_grad_()
        out = getattr(M, f"max_unpool{dims}d")(x, idx, 3, 1, 1, output_size=size)
        (g,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g ** 3).sum(), w, create_graph=True)
        (k,) = torch.autograd.grad((h ** 2).sum(), w)
        res.append((g, h, k))
    for what, a, b in zip(("first", "second", "third"), *res):
        assert_same(a, b, f"{what} order")


@pytest.mark.parametrize("family", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"])
def test_create_graph_channels_last_unbatched_batch0(family):
    case = next(c for c in CASES if c[0] == family and c[1] == 2)
    # (torch detaches the gradient of an empty max unpool: no second order to compare)
    for layout, n in (("channels_last", 2),) + ((("contiguous", 0),) if family != "max_unpool" else ()):
        cf, tf, x = setup(case, layout, n=n)
        res = []
        for f in (cf, tf):
            leaf, g = grads(f, x)
            (h,) = torch.autograd.grad((g ** 2).sum(), leaf)
            res.append((g, h))
        assert_same(res[0][0], res[1][0], f"{layout} n={n}: gradient")
        assert_same(res[0][1], res[1][1], f"{layout} n={n}: second order")
    if family == "max_unpool":
        return
    # unbatched
    cf, tf, x = setup(case, n=1)
    x = x[0]
    res = []
    for f in (cf, tf):
        leaf, g = grads(f, x)
        res.append(torch.autograd.grad((g ** 2).sum(), leaf)[0])
    assert_same(res[0], res[1], "unbatched second order")


# --------------------------------------------------------------------------------------------
# torch.func and forward-mode AD
# --------------------------------------------------------------------------------------------

FUNC_CASES = [c for c in CASES if c[1] == 2] + [c for c in CASES if c[1] in (1, 3)][::3]


@pytest.mark.parametrize("case", FUNC_CASES, ids=case_id)
def test_torch_func_like_torch(case):
    cf2, tf2, x, extra = setup2(case)
    v = randn(x.shape, seed=3)
    res = []
    for f2 in (cf2, tf2):
        def f(t):
            return f2(t, *extra)

        def loss(t):
            return (f(t) ** 3).sum()

        def sample_loss(t, *e):  # one sample of the batch
            return (f2(t.unsqueeze(0), *(i.unsqueeze(0) for i in e)) ** 3).sum()

        out = {
            "grad": torch.func.grad(loss)(x),
            "jacrev": torch.func.jacrev(f)(x),
            "jvp": torch.func.jvp(f, (x,), (v,)),
            "jvp_of_grad": torch.func.jvp(torch.func.grad(loss), (x,), (v,))[1],
            "vmap_grad": torch.func.vmap(torch.func.grad(sample_loss))(x, *extra),  # per-sample gradients
            "vmap": torch.func.vmap(lambda t, *e: f2(t.unsqueeze(0), *(i.unsqueeze(0) for i in e)))(x, *extra),
            "hessian": torch.func.hessian(lambda t: sample_loss(t, *(i[0] for i in extra)))(x[0]),
        }
        res.append(out)
    for key in res[1]:
        a, b = res[0][key], res[1][key]
        for i, (ai, bi) in enumerate(zip(a, b) if isinstance(a, tuple) else [(a, b)]):
            assert_same(ai, bi, f"{key}[{i}]")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_ad_like_torch(case):
    cf, tf, x = setup(case)
    v = randn(x.shape, seed=4)
    res = []
    for f in (cf, tf):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(f(fwAD.make_dual(x, v)))
            res.append((out.primal, out.tangent))
    assert_same(res[0][0], res[1][0], "primal")
    assert_same(res[0][1], res[1][1], "tangent")


def test_forward_ad_indices_have_no_tangent():
    x, v = distinct((2, 2, 5, 6)), randn((2, 2, 5, 6))
    with fwAD.dual_level():
        for out, idx in (CF.max_pool2d(fwAD.make_dual(x, v), 2, return_indices=True),
                         CF.adaptive_max_pool2d(fwAD.make_dual(x, v), 3, return_indices=True)):
            assert fwAD.unpack_dual(out).tangent is not None
            assert fwAD.unpack_dual(idx).tangent is None


# torch's twins of the raw backward ops (2d), for their tangents
TORCH_BACKWARD = {
    "max_pool": lambda go, t, idx: torch.ops.aten.max_pool2d_with_indices_backward(
        go, t, [3, 3], [2, 2], [1, 1], [1, 1], True, idx),
    "avg_pool": lambda go, t, idx: torch.ops.aten.avg_pool2d_backward(go, t, [3, 3], [2, 2], [1, 1], True, False, None),
    "adaptive_avg_pool": lambda go, t, idx: torch.ops.aten._adaptive_avg_pool2d_backward(go, t),
    "adaptive_max_pool": lambda go, t, idx: torch.ops.aten.adaptive_max_pool2d_backward(go, t, idx),
}


@pytest.mark.parametrize("family", list(TORCH_BACKWARD))
def test_forward_ad_of_backward_ops_like_torch(family):
    """Tangents of the backward ops, from grad_output's and from the input's (zero), as torch's."""
    x, calls, _ = raw_op_calls(2)
    _, backward, like_out = calls[family]
    idx = (F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)[1] if family == "max_pool"
           else F.adaptive_max_pool2d(x, 2, return_indices=True)[1])
    go, t_go, t_x = randn(like_out.shape), randn(like_out.shape, seed=5), randn(x.shape, seed=6)
    for tangents in ((t_go, None), (None, t_x), (t_go, t_x)):
        res = []
        for f in (backward, lambda g, t: TORCH_BACKWARD[family](g, t, idx)):
            with fwAD.dual_level():
                args = [fwAD.make_dual(a, t) if t is not None else a for a, t in zip((go, x), tangents)]
                out = fwAD.unpack_dual(f(*args))
                res.append((out.primal, out.tangent))
        assert_same(res[0][0], res[1][0], "primal")
        # (torch: a zero tangent for the max pools, none for the average pools)
        assert_same(res[0][1], res[1][1], f"tangent, tangents given: {[t is not None for t in tangents]}")


def test_forward_ad_nested_levels_and_double_backward_of_jvp():
    """jvp inside jvp (nested forward levels) and reverse over forward, as torch."""
    case = CASES[2]  # max_pool2d, k3 s2 p1 ceil
    cf, tf, x = setup(case, n=1)
    v, u = randn(x.shape, seed=7), randn(x.shape, seed=8)
    res = []
    for f in (cf, tf):
        def g(t):
            return torch.func.jvp(lambda s: f(s) ** 2, (t,), (v,))[1]

        nested = torch.func.jvp(g, (x,), (u,))[1]
        rev_over_fwd = torch.func.grad(lambda t: g(t).sum())(x)
        res.append((nested, rev_over_fwd))
    assert_same(res[0][0], res[1][0], "jvp of jvp")
    assert_same(res[0][1], res[1][1], "grad of jvp")


# --------------------------------------------------------------------------------------------
# saved tensors: version checks, hooks, release
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"])
def test_saved_tensors_like_torch(family):
    """An input modified in place after the forward is caught at backward where torch catches
    it (torch's max unpool saves only the indices: no error); a second backward without
    retain_graph raises; saved-tensor hooks see the saved tensors."""
    case = next(c for c in CASES if c[0] == family and c[1] == 2)
    raised = []
    for f in setup(case)[:2]:
        x = setup(case)[2]
        leaf = x.clone().requires_grad_()
        t = leaf * 1
        out = f(t)
        with torch.no_grad():
            t.add_(1)
        try:
            out.sum().backward()
            raised.append(False)
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e)
            raised.append(True)
        out = f(leaf * 1)
        out.sum().backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            out.sum().backward()
    assert raised[0] == raised[1] == (family != "max_unpool")
    packed = []

    def pack(t):
        packed.append(t)
        return t

    cf, tf, x = setup(case)
    grads = []
    for f in (cf, tf):
        leaf = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = f(leaf)
        grads.append(torch.autograd.grad(out.pow(2).sum(), leaf)[0])
    assert packed, "no saved tensor went through the hooks"
    assert_same(grads[0], grads[1], "gradient under saved_tensors_hooks")


@pytest.mark.parametrize("family", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"])
def test_checkpoint_like_torch(family):
    case = next(c for c in CASES if c[0] == family and c[1] == 2)
    cf, tf, x = setup(case)
    res = []
    for f in (cf, tf):
        leaf = x.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(lambda t: f(t * 2) ** 2, leaf, use_reentrant=False)
        (g,) = torch.autograd.grad(out.sum(), leaf, create_graph=True)
        res.append((g, torch.autograd.grad((g ** 2).sum(), leaf)[0]))
    assert_same(res[0][0], res[1][0], "gradient")
    assert_same(res[0][1], res[1][1], "second order")


@pytest.mark.parametrize("family", ["max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "max_unpool"])
def test_batched_forward_grad(family):
    """vmap over tangents (torch.func.jacfwd's way) through the jvp formulas."""
    case = next(c for c in CASES if c[0] == family and c[1] == 2)
    cf, _, x = setup(case, n=1)
    assert gradcheck(cf, (x.requires_grad_(),), check_forward_ad=True, check_backward_ad=False,
                     check_batched_forward_grad=True, check_undefined_grad=False, **CHECK)
