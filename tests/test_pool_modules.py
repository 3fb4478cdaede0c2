"""cnnops.nn pooling modules against torch.nn: constructors, attributes, repr, state_dict,
outputs and gradients (forward through cnnops.functional, expected values from torch.nn)."""

import copy

import pytest
import torch
import torch.nn as tnn

import cnnops
import cnnops.nn as cnn
from conftest import CHANNELS_LAST, assert_close_to_torch

DIMS = [1, 2, 3]

# class name (without the dim) -> list of constructor kwargs (tuples written for 3 dims)
CONFIGS = {
    "MaxPool": [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 2, 2), stride=(2, 1, 2), padding=(1, 0, 1), dilation=(1, 2, 1), ceil_mode=True),
        dict(kernel_size=3, stride=2, return_indices=True, ceil_mode=True),
    ],
    "AvgPool": [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
        dict(kernel_size=(3, 2, 2), stride=(2, 1, 2), padding=(1, 0, 1), ceil_mode=True),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, divisor_override=4),
    ],
    "AdaptiveAvgPool": [dict(output_size=1), dict(output_size=(3, 2, 4)), dict(output_size=(None, 3, None))],
    "AdaptiveMaxPool": [dict(output_size=1), dict(output_size=(3, 2, 4), return_indices=True),
                        dict(output_size=(None, 3, None))],
    "MaxUnpool": [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1)],
}

CASES = [(kind, i) for kind, cfgs in CONFIGS.items() for i in range(len(cfgs))]


def cfg_for(kind, i, dims):
    cfg = {}
    for k, v in CONFIGS[kind][i].items():
        cfg[k] = v[:dims] if isinstance(v, tuple) else v
    if kind == "AvgPool" and dims == 1:
        cfg.pop("divisor_override", None)
    if kind.startswith("Adaptive") and dims == 1 and isinstance(cfg["output_size"], tuple):
        if cfg["output_size"][0] is None:
            cfg["output_size"] = 3  # torch's 1d adaptive pools take no None
    return cfg


def pair(kind, i, dims):
    cfg = cfg_for(kind, i, dims)
    return getattr(tnn, f"{kind}{dims}d")(**cfg), getattr(cnn, f"{kind}{dims}d")(**cfg), cfg


def module_input(dims, n=2, c=3, dtype=torch.float64):
    return torch.randn((n, c) + (9, 8, 7)[:dims] if dims < 3 else (n, c, 7, 6, 5), dtype=dtype)


def run_module(module, kind, dims, x, grad_out=None, pool_kw=None):
    """Forward (and the input gradient for grad_out) of a module; unpool modules get a max
    pool's output and indices."""
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    if kind == "MaxUnpool":
        pooled, idx = getattr(torch.nn.functional, f"max_pool{dims}d")(x, return_indices=True, **pool_kw)
        leaf = pooled.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        res = module(leaf, idx, output_size=x.shape[-dims:])
    else:
        res = module(leaf)
    out, idx = res if isinstance(res, tuple) else (res, None)
    grad = None
    if grad_out is not None:
        grad = torch.autograd.grad(out, leaf, grad_out)[0]
    return out.detach(), idx, grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("dims", DIMS)
def test_module_matches_torch(dims, case):
    kind, i = case
    t, c, cfg = pair(kind, i, dims)
    assert isinstance(c, type(t)), "cnnops module must subclass its torch.nn twin"
    assert repr(c) == repr(t) and c.extra_repr() == t.extra_repr()
    public = {k: v for k, v in vars(t).items() if not k.startswith("_") and k != "training"}
    for k, v in public.items():
        assert getattr(c, k) == v, f"{k}: {getattr(c, k)!r} vs torch {v!r}"
    assert c.state_dict().keys() == t.state_dict().keys()
    assert list(c.parameters()) == [] and list(c.buffers()) == []

    x = module_input(dims)
    pool_kw = {k: cfg[k] for k in ("kernel_size", "stride", "padding") if k in cfg}
    ref_out, ref_idx, _ = run_module(t, kind, dims, x, None, pool_kw)
    go = torch.randn(ref_out.shape, dtype=x.dtype)
    ref_out, ref_idx, ref_grad = run_module(t, kind, dims, x, go, pool_kw)
    out, idx, grad = run_module(c, kind, dims, x, go, pool_kw)
    assert_close_to_torch(out, ref_out, torch.float64, 27, msg=f"{kind}{dims}d {cfg}: output")
    assert_close_to_torch(grad, ref_grad, torch.float64, 27, msg=f"{kind}{dims}d {cfg}: grad_input")
    assert (idx is None) == (ref_idx is None)
    if idx is not None:
        assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("dims", DIMS)
def test_unbatched_and_channels_last_modules(dims):
    for kind, i in [("MaxPool", 1), ("AvgPool", 1), ("AdaptiveAvgPool", 1), ("AdaptiveMaxPool", 0)]:
        t, c, _ = pair(kind, i, dims)
        x = module_input(dims, n=1)
        torch.testing.assert_close(c(x[0]), t(x[0]), atol=1e-12, rtol=1e-12)
        if dims > 1:
            xc = x.contiguous(memory_format=CHANNELS_LAST[dims + 2])
            out = c(xc)
            torch.testing.assert_close(out, t(xc), atol=1e-12, rtol=1e-12)
            assert out.is_contiguous(memory_format=CHANNELS_LAST[dims + 2])


def test_attribute_change_after_construction():
    """forward reads the attributes each call, as torch.nn does."""
    t, c, _ = pair("MaxPool", 0, 2)
    for m in (t, c):
        m.ceil_mode = True
        m.padding = 1
    x = torch.randn(2, 3, 9, 8)
    torch.testing.assert_close(c(x), t(x), atol=0, rtol=0)


def test_sequential_model_train_step():
    """A small CNN with cnnops pools: same loss and gradients as with the torch.nn pools."""
    torch.manual_seed(0)

    def model(mod):
        return tnn.Sequential(
            tnn.Conv2d(3, 8, 3, padding=1), mod.MaxPool2d(3, 2, 1), tnn.ReLU(),
            tnn.Conv2d(8, 8, 3, padding=1), mod.AvgPool2d(2, ceil_mode=True), mod.AdaptiveAvgPool2d((None, 2)),
            mod.AdaptiveMaxPool2d(1), tnn.Flatten(), tnn.Linear(8, 4))

    ref = model(tnn).double()
    ours = model(cnn).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 15, 13, dtype=torch.float64)
    losses = []
    for m in (ref, ours):
        loss = m(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-12, rtol=1e-12)
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-12, rtol=1e-10, msg=name)


def test_deepcopy_and_pickle_roundtrip():
    import pickle

    m = cnn.MaxPool2d(3, 2, 1, return_indices=True)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is cnn.MaxPool2d and repr(clone) == repr(m)
        x = torch.randn(1, 2, 7, 7)
        a, b = clone(x), m(x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_max_unpool_module_output_size_forms():
    """output_size as spatial sizes, as the full N x C x * shape, or a torch.Size."""
    pool, unpool, tunpool = cnn.MaxPool2d(2, return_indices=True), cnn.MaxUnpool2d(2), tnn.MaxUnpool2d(2)
    x = torch.randn(2, 3, 9, 8)
    y, idx = pool(x)
    for size in ((9, 8), [9, 8], x.shape, x.size()[-2:]):
        torch.testing.assert_close(unpool(y, idx, output_size=size), tunpool(y, idx, output_size=size), atol=0, rtol=0)


def test_modules_exported():
    for kind in CONFIGS:
        for dims in DIMS:
            assert f"{kind}{dims}d" in cnnops.nn.__all__
