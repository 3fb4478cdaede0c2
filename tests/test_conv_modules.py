"""cnnops.nn.Conv{1,2,3}d against torch.nn.Conv{1,2,3}d: parameters, init, state_dict in both
directions, padding modes, dtype/device kwargs, repr, and a few SGD steps of a small model."""

import copy

import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

import cnnops
import cnnops.nn
from conftest import assert_close_to_torch, dtype_id

DIMS = [1, 2, 3]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def mods(dims):
    return getattr(tnn, f"Conv{dims}d"), getattr(cnnops.nn, f"Conv{dims}d")


def spatial_input(dims, n=2, c=4, size=(9, 8, 7), dtype=torch.float32):
    return torch.randn((n, c) + tuple(size[:dims]), dtype=dtype)


CONFIGS = {
    "default": dict(in_channels=4, out_channels=6, kernel_size=3),
    "stride_pad": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    "tuple_args": dict(in_channels=4, out_channels=5, kernel_size=(3, 2, 2), stride=(1, 2, 1),
                       padding=(1, 0, 2), dilation=(2, 1, 1)),
    "groups_nobias": dict(in_channels=4, out_channels=6, kernel_size=2, groups=2, bias=False),
    "depthwise_x2": dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, padding=1),
    "same_even": dict(in_channels=4, out_channels=3, kernel_size=4, padding="same", dilation=2),
    "valid": dict(in_channels=4, out_channels=3, kernel_size=2, padding="valid"),
}


def cfg_for(dims, name):
    cfg = dict(CONFIGS[name])
    for k, v in cfg.items():
        if isinstance(v, tuple):
            cfg[k] = v[:dims]
    return cfg


def make_pair(dims, seed=0, **cfg):
    tm, cm = mods(dims)
    torch.manual_seed(seed)
    t = tm(**cfg)
    torch.manual_seed(seed)
    c = cm(**cfg)
    return t, c


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dims", DIMS)
def test_parameters_init_and_attributes(dims, name):
    cfg = cfg_for(dims, name)
    t, c = make_pair(dims, seed=17, **cfg)
    assert isinstance(c, tnn.Module)
    tp, cp = dict(t.named_parameters()), dict(c.named_parameters())
    assert list(cp) == list(tp), f"parameter names {list(cp)} vs torch {list(tp)}"
    for k in tp:
        assert cp[k].shape == tp[k].shape and cp[k].dtype == tp[k].dtype, k
        assert cp[k].requires_grad
        # same seed -> same RNG draws -> bitwise-equal init (kaiming_uniform_(a=sqrt(5)) + bias)
        assert torch.equal(cp[k], tp[k]), f"{k}: init differs from torch.nn for the same seed"
    assert list(c.state_dict()) == list(t.state_dict())
    assert dict(c.named_buffers()).keys() == dict(t.named_buffers()).keys()
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(c, attr) == getattr(t, attr), f"{attr}: {getattr(c, attr)!r} vs torch {getattr(t, attr)!r}"
    assert (c.bias is None) == (t.bias is None)


@pytest.mark.parametrize("dims", DIMS)
def test_init_distribution_different_seeds(dims):
    """Not a constant init: a different seed gives different parameters, and bounds match torch's
    kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    _, cm = mods(dims)
    torch.manual_seed(1)
    a = cm(8, 16, 3)
    torch.manual_seed(2)
    b = cm(8, 16, 3)
    assert not torch.equal(a.weight, b.weight)
    fan_in = 8 * 3 ** dims
    bound = 1 / fan_in ** 0.5
    for m in (a, b):
        assert m.weight.abs().max() <= bound + 1e-7 and m.bias.abs().max() <= bound + 1e-7
        assert m.weight.abs().max() > 0.8 * bound  # spread over the range, not near zero


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dims", DIMS)
def test_state_dict_both_ways(dims, name):
    cfg = cfg_for(dims, name)
    tm, cm = mods(dims)
    x = spatial_input(dims)
    # torch -> cnnops
    torch.manual_seed(3)
    t = tm(**cfg)
    torch.manual_seed(99)
    c = cm(**cfg)
    c.load_state_dict(t.state_dict(), strict=True)
    red = (cfg["in_channels"] // cfg.get("groups", 1)) * 4 ** dims
    assert_close_to_torch(c(x).detach(), _double_forward(t, x), torch.float32, red, msg="torch->cnnops")
    # cnnops -> torch
    torch.manual_seed(5)
    c2 = cm(**cfg)
    torch.manual_seed(77)
    t2 = tm(**cfg)
    t2.load_state_dict(c2.state_dict(), strict=True)
    for k, v in c2.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v)
    assert_close_to_torch(c2(x).detach(), _double_forward(t2, x), torch.float32, red, msg="cnnops->torch")


def _double_forward(torch_module, x):
    """torch reference in float64 for a float32 module."""
    m = copy.deepcopy(torch_module).double()
    with torch.no_grad():
        return m(x.double())


@pytest.mark.parametrize("same", [False, True], ids=["explicit_pad", "same"])
@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("dims", DIMS)
def test_padding_modes(dims, mode, same):
    tm, cm = mods(dims)
    if same:
        cfg = dict(in_channels=4, out_channels=6, kernel_size=(4, 3, 2)[:dims], padding="same",
                   dilation=(1, 2, 3)[:dims], padding_mode=mode)
    else:
        cfg = dict(in_channels=4, out_channels=6, kernel_size=3, padding=(2, 1, 1)[:dims], stride=(1, 2, 1)[:dims],
                   padding_mode=mode)
    torch.manual_seed(11)
    t = tm(**cfg).double()
    c = cm(**cfg).double()
    c.load_state_dict(t.state_dict())
    x = spatial_input(dims, size=(9, 8, 7), dtype=torch.float64)
    xt, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yc = t(xt), c(xc)
    assert_close_to_torch(yc.detach(), yt.detach(), torch.float64, 200, msg=f"{mode} forward")
    go = torch.randn_like(yt)
    gt = torch.autograd.grad(yt, [xt, t.weight, t.bias], go)
    gc = torch.autograd.grad(yc, [xc, c.weight, c.bias], go)
    for name, a, e in zip(("input", "weight", "bias"), gc, gt):
        assert_close_to_torch(a, e, torch.float64, 1000, msg=f"{mode} grad_{name}")


@pytest.mark.parametrize("dims", DIMS)
def test_unbatched_module_input(dims):
    t, c = make_pair(dims, in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect")
    x = torch.randn((3,) + (6, 5, 4)[:dims])
    assert_close_to_torch(c(x).detach(), _double_forward(t, x), torch.float32, 27)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("dims", DIMS)
def test_dtype_device_kwargs(dims, dtype):
    tm, cm = mods(dims)
    torch.manual_seed(4)
    t = tm(3, 4, 3, padding=1, device="cpu", dtype=dtype)
    torch.manual_seed(4)
    c = cm(3, 4, 3, padding=1, device="cpu", dtype=dtype)
    assert c.weight.dtype == dtype and c.bias.dtype == dtype and c.weight.device.type == "cpu"
    assert torch.equal(c.weight, t.weight) and torch.equal(c.bias, t.bias)
    x = torch.randn((2, 3) + (6, 5, 4)[:dims]).to(dtype)
    ref = tm(3, 4, 3, padding=1, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ref.load_state_dict(t.state_dict())
    with torch.no_grad():
        expected = ref(x.to(ref.weight.dtype))
        actual = c(x)
    assert_close_to_torch(actual, expected, dtype, 27)


def test_meta_device_construction():
    c = cnnops.nn.Conv2d(3, 4, 3, device="meta")
    t = tnn.Conv2d(3, 4, 3, device="meta")
    assert c.weight.device.type == "meta" and c.weight.shape == t.weight.shape


@pytest.mark.parametrize("dims", DIMS)
def test_module_to_float64(dims):
    t, c = make_pair(dims, in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1)
    c64 = c.to(torch.float64)
    assert c64 is c
    assert c.weight.dtype == torch.float64 and c.bias.dtype == torch.float64
    x = spatial_input(dims, dtype=torch.float64)
    assert_close_to_torch(c(x).detach(), _double_forward(t, x), torch.float64, 18)
    c.float()
    assert c.weight.dtype == torch.float32


@pytest.mark.parametrize("dims", DIMS)
def test_repr(dims):
    tm, cm = mods(dims)
    cfg = dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2,
               bias=False, padding_mode="reflect")
    t, c = tm(**cfg), cm(**cfg)
    r = repr(c)
    assert f"Conv{dims}d(" in r, r
    er = c.extra_repr()
    for piece in ("4, 6", f"kernel_size={(3,) * dims}", f"stride={(2,) * dims}", f"padding={(1,) * dims}",
                  f"dilation={(2,) * dims}", "groups=2", "bias=False", "padding_mode=reflect"):
        assert piece in er, f"{piece!r} missing from extra_repr {er!r} (torch: {t.extra_repr()!r})"
    plain = cm(4, 6, 3)
    assert "bias=False" not in plain.extra_repr() and "padding_mode" not in plain.extra_repr()


CONSTRUCTOR_ERRORS = {
    "in_not_divisible": lambda m: m(5, 4, 3, groups=2),
    "out_not_divisible": lambda m: m(4, 5, 3, groups=2),
    "groups_zero": lambda m: m(4, 4, 3, groups=0),
    "same_with_stride": lambda m: m(4, 4, 3, padding="same", stride=2),
    "bad_padding_string": lambda m: m(4, 4, 3, padding="foo"),
    "bad_padding_mode": lambda m: m(4, 4, 3, padding_mode="zero"),
}


@pytest.mark.parametrize("case", list(CONSTRUCTOR_ERRORS))
@pytest.mark.parametrize("dims", DIMS)
def test_constructor_errors_like_torch(dims, case):
    tm, cm = mods(dims)
    try:
        CONSTRUCTOR_ERRORS[case](tm)
    except Exception as e:  # noqa: BLE001
        expected = e
    else:
        pytest.fail(f"torch accepted {case}")
    with pytest.raises(Exception) as info:
        CONSTRUCTOR_ERRORS[case](cm)
    assert type(info.value) is type(expected), f"{case}: torch {expected!r}, cnnops {info.value!r}"


def _model(lib, dtype):
    n = lib
    return tnn.Sequential(
        n.Conv2d(3, 8, 3, padding=1),
        tnn.ReLU(),
        n.Conv2d(8, 8, 3, padding="same", groups=8, padding_mode="reflect"),
        tnn.ReLU(),
        n.Conv2d(8, 12, 4, stride=2, padding=1, dilation=1),
        tnn.ReLU(),
        n.Conv2d(12, 6, 1, bias=False),
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_sgd_training_matches_torch(dtype):
    torch.manual_seed(21)
    tmodel = _model(tnn, dtype)
    torch.manual_seed(21)
    cmodel = _model(cnnops.nn, dtype)
    for (kt, vt), (kc, vc) in zip(tmodel.state_dict().items(), cmodel.state_dict().items()):
        assert kt == kc and torch.equal(vt, vc), kt
    # float32: torch's own float32 run is the reference (both carry rounding error), float64 tight.
    ref_model = tmodel
    topt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    copt = torch.optim.SGD(cmodel.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        x = torch.randn(4, 3, 12, 11, generator=gen).to(dtype)
        target = torch.randn(4, 6, 6, 5, generator=gen).to(dtype)
        for model, opt in ((ref_model, topt), (cmodel, copt)):
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
    # tolerance from the table; reduction = batch x output pixels of the first layer's weight grad
    for (k, vt), (_, vc) in zip(ref_model.state_dict().items(), cmodel.state_dict().items()):
        assert_close_to_torch(vc, vt, dtype, reduction=4 * 12 * 11, msg=f"{k} after 5 SGD steps")
    # training actually moved the parameters
    torch.manual_seed(21)
    init = _model(tnn, dtype)
    assert not torch.equal(init[0].weight, cmodel[0].weight)
