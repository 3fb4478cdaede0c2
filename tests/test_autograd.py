"""Autograd in the dispatcher, across the op families.

Every cnnops op has an Autograd kernel (csrc/autograd/), so a raw op carries its gradient,
create_graph=True gradients are differentiable again, and torch.func and forward-mode AD work.
Convolution's double backward is tested here in full; the pooling and normalization families
have their own grids in test_pool_autograd.py and test_norm_autograd.py. The model-level tests
(WGAN-GP, MAML, per-sample gradients) compare converted models with their torch.nn originals
in float64.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

import cnnops
import cnnops.functional as CF

D = torch.float64


def all_op_names():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("cnnops::"))


def takes_tensors(name):
    schema = getattr(torch.ops.cnnops, name.split("::")[1]).default._schema
    return any(isinstance(a.type, (torch.TensorType, torch.OptionalType)) for a in schema.arguments)


def test_op_list_is_complete():
    assert "cnnops::conv_forward" in all_op_names() and len(all_op_names()) >= 20


@pytest.mark.parametrize("name", [n for n in all_op_names() if takes_tensors(n)])
def test_every_op_has_an_autograd_kernel(name):
    """Without one, torch's fallback only warns and returns no gradient: a silent wrong result."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd"), name


# --------------------------------------------------------------------------------------------
# convolution: gradgradcheck grid, raw ops, create_graph parity
# --------------------------------------------------------------------------------------------

CONV_CASES = [
    # dims, N, C_in, C_out, spatial, kernel, stride, padding, dilation, groups, bias
    (1, 2, 2, 3, (7,), 3, 1, 0, 1, 1, True),
    (1, 1, 4, 4, (9,), 2, 2, 1, 2, 2, False),
    (2, 2, 2, 3, (5, 4), 3, 1, 1, 1, 1, True),
    (2, 1, 4, 2, (6, 5), (3, 2), (2, 1), (1, 0), (1, 2), 2, True),
    (2, 2, 3, 3, (4, 4), 3, 1, 1, 1, 3, False),  # depthwise
    (2, 1, 2, 4, (3, 3), 1, 1, 0, 1, 1, True),  # 1x1
    (3, 1, 2, 2, (3, 4, 3), 2, 1, (1, 0, 1), 1, 1, True),
    (3, 1, 2, 2, (4, 3, 4), (2, 1, 2), (2, 1, 1), 0, (1, 1, 2), 2, False),
]


def conv_inputs(case, requires_grad=True):
    dims, n, cin, cout, spatial, kernel, stride, padding, dilation, groups, bias = case
    k = (kernel,) * dims if isinstance(kernel, int) else kernel
    x = torch.randn(n, cin, *spatial, dtype=D, requires_grad=requires_grad)
    w = torch.randn(cout, cin // groups, *k, dtype=D, requires_grad=requires_grad)
    b = torch.randn(cout, dtype=D, requires_grad=requires_grad) if bias else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, w, b, kwargs


def case_id(case):
    return "-".join(str(v).replace(" ", "") for v in case)


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_gradgradcheck(case):
    x, w, b, kwargs = conv_inputs(case)
    fn = getattr(CF, f"conv{case[0]}d")
    inputs = (x, w) if b is None else (x, w, b)
    assert gradgradcheck(lambda *a: fn(*a, **kwargs), inputs)


@pytest.mark.parametrize("case", CONV_CASES[::3], ids=case_id)
def test_conv_relu_gradgradcheck(case):
    x, w, b, kwargs = conv_inputs(case)
    dims = case[0]

    def f(x, w, b):
        return CF._conv(x, w, b, kwargs["stride"], kwargs["padding"], kwargs["dilation"], kwargs["groups"], dims,
                        _activation="relu")

    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
                                  (True, True, False)])
def test_conv_backward_op_is_differentiable(mask):
    """The raw backward op: gradcheck of its selected outputs in (grad_output, input, weight)."""
    x, w, _, kwargs = conv_inputs(CONV_CASES[3], requires_grad=False)
    args = ([2, 1], [1, 0], [1, 2], 2)
    dy = torch.randn_like(F.conv2d(x, w, **kwargs))

    def f(dy, x, w):
        outs = torch.ops.cnnops.conv_backward(dy, x, w, *args, list(mask))
        return tuple(o for o, m in zip(outs, mask) if m)

    leaves = [t.requires_grad_() for t in (dy, x, w)]
    assert gradcheck(f, leaves)
    assert gradgradcheck(f, leaves)


def test_raw_conv_op_carries_grad_fn():
    x, w, b, _ = conv_inputs(CONV_CASES[2])
    out = torch.ops.cnnops.conv_forward(x, w, b, [1, 1], [1, 1], [1, 1], 1)
    assert out.grad_fn is not None and "Conv" in out.grad_fn.name()
    with torch.no_grad():
        assert torch.ops.cnnops.conv_forward(x, w, b, [1, 1], [1, 1], [1, 1], 1).grad_fn is None


def _grads_create_graph(fn, x, w, b):
    out = fn(x, w, b)
    return torch.autograd.grad(out.pow(2).sum(), [t for t in (x, w, b) if t is not None], create_graph=True)


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_create_graph_matches_torch(case):
    """The issue's silent wrong result: create_graph gradients must be differentiable (as torch's)
    and a gradient penalty's second-order gradients must equal torch's."""
    x, w, b, kwargs = conv_inputs(case)
    dims = case[0]
    ours = _grads_create_graph(lambda x, w, b: getattr(CF, f"conv{dims}d")(x, w, b, **kwargs), x, w, b)
    theirs = _grads_create_graph(lambda x, w, b: getattr(F, f"conv{dims}d")(x, w, b, **kwargs), x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    for g, e in zip(ours, theirs):
        assert g.requires_grad == e.requires_grad
        torch.testing.assert_close(g, e)
    penalty_ours = sum((g ** 2).sum() for g in ours)
    penalty_theirs = sum((g ** 2).sum() for g in theirs)
    second_ours = torch.autograd.grad(penalty_ours, leaves, allow_unused=True)
    second_theirs = torch.autograd.grad(penalty_theirs, leaves, allow_unused=True)
    for g, e in zip(second_ours, second_theirs):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e)


def test_conv_third_order():
    x, w, b, kwargs = conv_inputs(CONV_CASES[3])

    def third(fn):
        out = fn(x, w, b, **kwargs)
        (gx,) = torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), w, create_graph=True)
        return torch.autograd.grad(gw.sum(), (x, w, b))

    for g, e in zip(third(CF.conv2d), third(F.conv2d)):
        torch.testing.assert_close(g, e)


def test_conv_channels_last_and_noncontiguous_double_backward():
    x, w, b, kwargs = conv_inputs(CONV_CASES[2], requires_grad=False)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    wt = torch.randn(w.shape[::-1], dtype=D).permute(3, 2, 1, 0).requires_grad_()
    assert not wt.is_contiguous()
    assert gradgradcheck(lambda x, w: CF.conv2d(x, w, None, **kwargs), (x, wt))


# --------------------------------------------------------------------------------------------
# torch.func and forward-mode AD on convolution
# --------------------------------------------------------------------------------------------


def test_conv_torch_func():
    x, w, b, kwargs = conv_inputs(CONV_CASES[3], requires_grad=False)

    def both(transform):
        return [transform(lambda *a: m.conv2d(*a, **kwargs)) for m in (CF, F)]

    ours, theirs = both(lambda f: grad(lambda w: f(x, w, b).pow(2).sum())(w))
    torch.testing.assert_close(ours, theirs)
    ours, theirs = both(lambda f: jacrev(lambda x: f(x, w, b), argnums=0)(x[:1]))
    torch.testing.assert_close(ours, theirs)
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    ours, theirs = both(lambda f: jvp(f, (x, w, b), tangents))
    torch.testing.assert_close(ours, theirs)
    ours, theirs = both(lambda f: hessian(lambda b: f(x, w, b).pow(3).sum())(b))
    torch.testing.assert_close(ours, theirs)
    # per-sample gradients of the weight, as DP-SGD computes them
    ours, theirs = both(lambda f: vmap(grad(lambda w, x1: f(x1[None], w, b).pow(2).sum()), in_dims=(None, 0))(w, x))
    torch.testing.assert_close(ours, theirs)


def test_conv_forward_ad():
    import torch.autograd.forward_ad as fwAD

    x, w, b, kwargs = conv_inputs(CONV_CASES[6], requires_grad=False)
    tangents = [torch.randn_like(t) for t in (x, w, b)]
    results = []
    for fn in (CF.conv3d, F.conv3d):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, dt) for t, dt in zip((x, w, b), tangents)]
            out = fwAD.unpack_dual(fn(*duals, **kwargs))
            results.append((out.primal.clone(), out.tangent.clone()))
    for g, e in zip(*results):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------------
# whole models: WGAN-GP, MAML, per-sample gradients, Hessian-vector products
# --------------------------------------------------------------------------------------------


class Critic(nn.Module):
    """A small critic/classifier with every family: conv (+ReLU), max/avg/adaptive pools,
    batch/group/layer/instance norm."""

    def __init__(self, norm="batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = {"batch": nn.BatchNorm2d(8), "group": nn.GroupNorm(2, 8),
                      "instance": nn.InstanceNorm2d(8, affine=True), "none": nn.Identity()}[norm]
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool2 = nn.AvgPool2d(2, ceil_mode=True)
        self.norm2 = nn.LayerNorm([8, 2, 2])
        self.head = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        x = self.pool1(torch.relu(self.norm1(self.conv1(x))))
        x = self.norm2(self.pool2(torch.tanh(self.conv2(x))))
        return self.fc(self.head(x).flatten(1))


def twin_models(norm="batch", training=True):
    torch.manual_seed(0)
    reference = Critic(norm).double()
    converted = cnnops.convert(copy.deepcopy(reference))
    reference.train(training)
    converted.train(training)
    return reference, converted


def assert_same_params_grads(reference, converted):
    for (name, p), (_, q) in zip(reference.named_parameters(), converted.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")


def wgan_gp_step(critic, real, fake):
    """Gulrajani et al.'s gradient penalty: (||d critic(x_hat) / d x_hat|| - 1)^2 on interpolates."""
    alpha = torch.rand(real.size(0), 1, 1, 1, dtype=D, generator=torch.Generator().manual_seed(1))
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_()
    out = critic(x_hat)
    (g,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    penalty = ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss = critic(fake).mean() - critic(real).mean() + 10 * penalty
    critic.zero_grad()
    loss.backward()
    return g


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_wgan_gp_matches_torch(norm):
    reference, converted = twin_models(norm)
    real = torch.randn(4, 3, 8, 8, dtype=D)
    fake = torch.randn(4, 3, 8, 8, dtype=D)
    g_ref = wgan_gp_step(reference, real, fake)
    g_ours = wgan_gp_step(converted, real, fake)
    assert g_ours.requires_grad == g_ref.requires_grad
    torch.testing.assert_close(g_ours, g_ref)
    assert_same_params_grads(reference, converted)


def maml_meta_gradients(model, x_support, y_support, x_query, y_query, inner_lr=0.1):
    """One second-order MAML step: adapt on the support set with create_graph=True, then
    differentiate the query loss through the adaptation."""
    params = dict(model.named_parameters())
    loss = F.mse_loss(functional_call(model, params, (x_support,)), y_support)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    adapted = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
    query_loss = F.mse_loss(functional_call(model, adapted, (x_query,)), y_query)
    return torch.autograd.grad(query_loss, list(params.values()))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_maml_second_order_matches_torch(norm):
    reference, converted = twin_models(norm)
    data = [torch.randn(4, 3, 8, 8, dtype=D), torch.randn(4, 1, dtype=D),
            torch.randn(4, 3, 8, 8, dtype=D), torch.randn(4, 1, dtype=D)]
    for g, e in zip(maml_meta_gradients(converted, *data), maml_meta_gradients(reference, *data)):
        torch.testing.assert_close(g, e)


def test_hessian_vector_product_matches_torch():
    reference, converted = twin_models("group")
    x = torch.randn(2, 3, 8, 8, dtype=D)
    results = []
    for model in (reference, converted):
        params = list(model.parameters())
        loss = model(x).pow(2).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vector = [torch.ones_like(p) for p in params]
        results.append(torch.autograd.grad(grads, params, vector))
    for g, e in zip(*results):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("norm", ["group", "none"])
def test_per_sample_gradients_match_torch(norm):
    """functional_call + vmap(grad), as Opacus-style DP training computes per-sample gradients."""
    reference, converted = twin_models(norm, training=False)
    x = torch.randn(3, 3, 8, 8, dtype=D)
    y = torch.randn(3, 1, dtype=D)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            return F.mse_loss(functional_call(model, p, (xi[None],)), yi[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    ours, theirs = per_sample(converted), per_sample(reference)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
def test_model_jvp_and_forward_ad_match_torch(norm):
    import torch.autograd.forward_ad as fwAD

    reference, converted = twin_models(norm, training=False)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    t = torch.randn_like(x)
    ours, theirs = jvp(converted, (x,), (t,)), jvp(reference, (x,), (t,))
    torch.testing.assert_close(ours, theirs)
    tangents = []
    for model in (converted, reference):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(model(fwAD.make_dual(x, t))).tangent.clone())
    torch.testing.assert_close(*tangents)


def test_jacrev_of_converted_model_matches_torch():
    reference, converted = twin_models("group", training=False)
    x = torch.randn(1, 3, 8, 8, dtype=D)
    torch.testing.assert_close(jacrev(converted)(x), jacrev(reference)(x))


@pytest.mark.parametrize("batched", ["input", "weight", "both"])
def test_conv_vmap_rules_match_torch_without_fallback(batched):
    """conv_forward/conv_backward have vmap rules (cnnops/_ops.py): no per-sample fallback loop
    (torch warns when it takes one) and torch's values, for every combination of vmapped
    arguments, forward and through grad/jacrev."""
    import warnings

    x = torch.randn(4, 2, 4, 6, 6, dtype=D)
    w = torch.randn(4, 6, 2, 3, 3, dtype=D)
    b = torch.randn(4, 6, dtype=D)
    dims = {"input": (0, None, None), "weight": (None, 0, 0), "both": (0, 0, 0)}[batched]
    args = [t if d is not None else t[0] for t, d in zip((x, w, b), dims)]

    def run(M):
        forward = torch.func.vmap(lambda x, w, b: M.conv2d(x, w, b, stride=(2, 1), padding=1, groups=2),
                                  in_dims=dims)(*args)
        grads = torch.func.vmap(torch.func.grad(lambda x, w, b: M.conv2d(x, w, b, padding=1, groups=2).pow(2).sum(),
                                                argnums=(0, 1, 2)), in_dims=dims)(*args)
        return forward, *grads

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's performance warning
        ours = run(CF)
    for g, e in zip(ours, run(F)):
        torch.testing.assert_close(g, e)


def test_jit_trace_records_plain_ops():
    """Nothing Python sits between a module and its kernel: a trace holds cnnops ops, not a
    PythonOp, and differentiates like the eager model."""
    reference, converted = twin_models("batch", training=False)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    traced = torch.jit.trace(converted, (x,), check_trace=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert {"cnnops::conv_forward", "cnnops::max_pool_forward", "cnnops::batch_norm_forward",
            "cnnops::layer_norm_forward", "cnnops::avg_pool_forward"} <= kinds, kinds
    assert "prim::PythonOp" not in kinds
    xr = x.clone().requires_grad_()
    (g_traced,) = torch.autograd.grad(traced(xr).sum(), xr)
    (g_ref,) = torch.autograd.grad(reference(xr).sum(), xr)
    torch.testing.assert_close(g_traced, g_ref)


# --------------------------------------------------------------------------------------------
# the same autograd on CUDA tensors (the Autograd kernels are device-independent; these check
# that the CUDA kernels they call differentiate twice as torch's do)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
def test_cuda_wgan_gp_matches_torch(norm):
    reference, converted = twin_models(norm)
    reference, converted = reference.cuda(), converted.cuda()
    real = torch.randn(4, 3, 8, 8, dtype=D, device="cuda")
    fake = torch.randn(4, 3, 8, 8, dtype=D, device="cuda")
    alpha = torch.rand(4, 1, 1, 1, dtype=D, device="cuda")
    grads = []
    for model in (reference, converted):
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_()
        (g,) = torch.autograd.grad(model(x_hat).sum(), x_hat, create_graph=True)
        loss = model(fake).mean() - model(real).mean() + 10 * ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for g, e in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, e)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CONV_CASES[::2], ids=case_id)
def test_cuda_conv_gradgradcheck(case):
    x, w, b, kwargs = conv_inputs(case, requires_grad=False)
    inputs = [t.cuda().requires_grad_() for t in (x, w, b) if t is not None]
    fn = getattr(CF, f"conv{case[0]}d")
    assert gradgradcheck(lambda *a: fn(*a, **kwargs), inputs)


@pytest.mark.cuda
def test_cuda_per_sample_gradients_match_torch():
    reference, converted = twin_models("group", training=False)
    reference, converted = reference.cuda(), converted.cuda()
    x, y = torch.randn(3, 3, 8, 8, dtype=D, device="cuda"), torch.randn(3, 1, dtype=D, device="cuda")
    results = []
    for model in (converted, reference):
        params = {k: v.detach() for k, v in model.named_parameters()}
        loss = lambda p, xi, yi: F.mse_loss(functional_call(model, p, (xi[None],)), yi[None])  # noqa: E731
        results.append(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y))
    for name in results[1]:
        torch.testing.assert_close(results[0][name], results[1][name])
