"""cnnops.nn normalization modules against torch.nn: constructor, parameters and buffers,
several training steps (outputs, every gradient, running statistics and num_batches_tracked) in
every mode, eval, state_dict in both directions, unbatched input, dtype/device kwargs, a small
CNN trained with SGD, torch.compile of modules in training mode."""

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn as tnn

import cnnops
import cnnops.nn
from conftest import CHANNELS_LAST, REFERENCE_DTYPE, dtype_id, make_tensor, tolerance

# name -> (torch class, cnnops class, batched input shape)
MODULES = {
    "BatchNorm1d": (tnn.BatchNorm1d, cnnops.nn.BatchNorm1d, (4, 5, 7)),
    "BatchNorm1d_flat": (tnn.BatchNorm1d, cnnops.nn.BatchNorm1d, (6, 5)),
    "BatchNorm2d": (tnn.BatchNorm2d, cnnops.nn.BatchNorm2d, (3, 5, 6, 4)),
    "BatchNorm3d": (tnn.BatchNorm3d, cnnops.nn.BatchNorm3d, (2, 5, 3, 4, 3)),
    "InstanceNorm1d": (tnn.InstanceNorm1d, cnnops.nn.InstanceNorm1d, (3, 5, 7)),
    "InstanceNorm2d": (tnn.InstanceNorm2d, cnnops.nn.InstanceNorm2d, (3, 5, 6, 4)),
    "InstanceNorm3d": (tnn.InstanceNorm3d, cnnops.nn.InstanceNorm3d, (2, 5, 3, 4, 3)),
    "LayerNorm": (tnn.LayerNorm, cnnops.nn.LayerNorm, (3, 5, 6, 4)),
    "GroupNorm": (tnn.GroupNorm, cnnops.nn.GroupNorm, (3, 6, 5, 4)),
}

# constructor kwargs per family
RUNNING_CONFIGS = {  # batch norm and instance norm
    "default": dict(),
    "affine_tracked": dict(affine=True, track_running_stats=True),
    "momentum_none": dict(affine=True, track_running_stats=True, momentum=None),
    "momentum_half_eps": dict(affine=True, track_running_stats=True, momentum=0.5, eps=1e-3),
    "not_tracked": dict(affine=True, track_running_stats=False),
    "noaffine_tracked": dict(affine=False, track_running_stats=True),
    "noaffine_not_tracked": dict(affine=False, track_running_stats=False),
    "no_bias": dict(affine=True, track_running_stats=True, bias=False),
}
LN_CONFIGS = {
    "default": dict(),
    "no_affine": dict(elementwise_affine=False),
    "no_bias": dict(bias=False),
    "eps": dict(eps=1e-3),
}
GN_CONFIGS = {
    "default": dict(),
    "no_affine": dict(affine=False),
    "no_bias": dict(bias=False),
    "one_group_eps": dict(num_groups=1, eps=1e-3),
    "group_per_channel": dict(num_groups=6),
}


def configs(name):
    if name == "LayerNorm":
        return LN_CONFIGS
    if name == "GroupNorm":
        return GN_CONFIGS
    return RUNNING_CONFIGS


def construct(name, cfg, **factory):
    """torch and cnnops modules; cfg is a dict of constructor kwargs or a config name."""
    tcls, ccls, shape = MODULES[name]
    cfg = dict(configs(name)[cfg] if isinstance(cfg, str) else cfg)
    if "bias" in cfg and "bias" not in inspect.signature(tcls.__init__).parameters:
        pytest.skip(f"torch {torch.__version__}'s {name} has no bias argument")  # added after 2.11
    if name == "LayerNorm":
        args = (shape[-2:],)
    elif name == "GroupNorm":
        args = (cfg.pop("num_groups", 3), shape[1])
    else:
        args = (shape[1],)
    return tcls(*args, **cfg, **factory), ccls(*args, **cfg, **factory)


def all_cases():
    return [pytest.param(name, cfg, id=f"{name}-{cfg}") for name in MODULES for cfg in configs(name)]


def randomize(module, seed=0):
    """Non-trivial parameters and running statistics (torch initializes weight=1, bias=0,
    mean=0, var=1, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if pname == "weight" else 0.0))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.3)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    return module


def assert_close(actual, expected, dtype, reduction=1, msg=""):
    assert actual.dtype == dtype, f"{msg}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    atol, rtol = tolerance(dtype, reduction)
    torch.testing.assert_close(actual.detach().double(), expected.detach().to(dtype).double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{msg} (dtype={dtype_id(dtype)}, L={reduction})\n{m}")


def assert_same_state(cmod, rmod, dtype, reduction, msg=""):
    """Every parameter and buffer of cnnops' module against the (wider) reference module."""
    cstate, rstate = cmod.state_dict(), rmod.state_dict()
    assert list(cstate) == list(rstate), f"{msg}: state_dict keys {list(cstate)} vs {list(rstate)}"
    for k in cstate:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(cstate[k], rstate[k]), f"{msg}: {k} {cstate[k]} vs {rstate[k]}"
        else:
            assert_close(cstate[k], rstate[k], dtype, reduction, msg=f"{msg}: {k}")


def train_and_compare(name, cfg, dtype, steps=("train", "train", "eval", "train", "eval"), layout="contiguous",
                      input_shape=None, lr=0.1):
    """torch module (reference, in REFERENCE_DTYPE) and cnnops module from the same state, run
    through ``steps``: each step a forward on a fresh input, a backward with a random
    grad_output and an SGD update of the parameters. Outputs, input and parameter gradients,
    then every parameter and buffer are compared after each step. Each step starts the
    reference from cnnops' state (upcast), so a bfloat16 module's rounded state is not
    mistaken for a kernel error."""
    tmod, cmod = construct(name, cfg, dtype=dtype)
    randomize(tmod)
    cmod.load_state_dict(tmod.state_dict())
    ref = copy.deepcopy(tmod).to(REFERENCE_DTYPE[dtype])
    shape = input_shape or MODULES[name][2]
    red = max(1, shape[0] * (shape[2] if len(shape) > 2 else 1))
    for i, mode in enumerate(steps):
        ref.load_state_dict(cmod.state_dict())
        ref.train(mode == "train")
        cmod.train(mode == "train")
        x = make_tensor(shape, dtype, layout) * 2.0 + 0.5
        go = make_tensor(shape, dtype)
        xr = x.detach().to(REFERENCE_DTYPE[dtype]).requires_grad_()
        xc = x.detach().requires_grad_()
        with warnings.catch_warnings(record=True) as tw:
            warnings.simplefilter("always")
            out_r = ref(xr)
        with warnings.catch_warnings(record=True) as cw:
            warnings.simplefilter("always")
            out_c = cmod(xc)
        assert [str(w.message) for w in cw] == [str(w.message) for w in tw], "warnings differ from torch's"
        ctx = f"{name} {cfg} step {i} ({mode})"
        assert_close(out_c, out_r, dtype, 1, msg=f"{ctx}: output")
        out_r.backward(go.to(REFERENCE_DTYPE[dtype]))
        out_c.backward(go)
        assert_close(xc.grad, xr.grad, dtype, 1, msg=f"{ctx}: grad_input")
        for (pn, pr), (_, pc) in zip(ref.named_parameters(), cmod.named_parameters()):
            assert_close(pc.grad, pr.grad, dtype, red, msg=f"{ctx}: grad of {pn}")
        with torch.no_grad():
            for module in (ref, cmod):
                for p in module.parameters():
                    p -= lr * p.grad
                    p.grad = None
        assert_same_state(cmod, ref, dtype, red, msg=ctx)
    if layout == "channels_last" and not name.startswith("LayerNorm"):
        fmt = CHANNELS_LAST[len(shape)]
        assert out_c.is_contiguous(memory_format=fmt), f"{name}: output lost channels_last"
    return cmod, ref


@pytest.mark.parametrize("name,cfg", all_cases())
def test_training_steps(name, cfg):
    train_and_compare(name, cfg, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", list(MODULES))
def test_training_steps_dtypes(name, dtype):
    cfg = {"LayerNorm": {}, "GroupNorm": {}}.get(name, dict(affine=True, track_running_stats=True))
    train_and_compare(name, cfg, dtype)


@pytest.mark.parametrize("name", ["BatchNorm2d", "BatchNorm3d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm",
                                  "LayerNorm"])
def test_training_steps_channels_last(name):
    cfg = {"LayerNorm": {}, "GroupNorm": {}}.get(name, dict(affine=True, track_running_stats=True))
    train_and_compare(name, cfg, torch.float32, layout="channels_last")


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm"])
def test_training_steps_non_contiguous(name):
    cfg = {"LayerNorm": {}, "GroupNorm": {}}.get(name, dict(affine=True, track_running_stats=True, momentum=None))
    train_and_compare(name, cfg, torch.float32, layout="sliced")


@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm"])
@pytest.mark.parametrize("n", [0, 1])
def test_batch_0_and_1(name, n):
    shape = (n,) + MODULES[name][2][1:]
    cfg = {"LayerNorm": {}, "GroupNorm": {}}.get(name, dict(affine=name.startswith("Batch"), track_running_stats=True))
    if n == 0 and name.startswith("Instance"):
        # torch averages zero per-instance copies of the running statistics: NaN (compared
        # with equal_nan in test_norm.py); here only the output shape
        tmod, cmod = construct(name, cfg)
        assert cmod(torch.randn(shape)).shape == shape
        return
    train_and_compare(name, cfg, torch.float32, steps=("train", "eval"), input_shape=shape)


def test_momentum_none_is_cumulative_average():
    """momentum=None: after k batches the running mean is the plain average of the k batch
    means (torch's factor 1 / num_batches_tracked)."""
    m = cnnops.nn.BatchNorm2d(3, momentum=None).double()
    xs = [torch.randn(4, 3, 5, 5, dtype=torch.float64) + i for i in range(4)]
    for x in xs:
        m(x)
    expected = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(m.running_mean, expected, atol=1e-12, rtol=1e-12)
    assert m.num_batches_tracked.item() == 4


def test_eval_without_tracking_uses_batch_statistics():
    m = cnnops.nn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    out = m(x).double()
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert m.running_mean is None and m.num_batches_tracked is None


# --------------------------------------------------------------------------------------------
# construction, state_dict
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cfg", all_cases())
def test_parameters_buffers_and_repr(name, cfg):
    tmod, cmod = construct(name, cfg)
    assert isinstance(cmod, type(tmod)) and isinstance(cmod, tnn.Module)
    tp, cp = dict(tmod.named_parameters()), dict(cmod.named_parameters())
    assert list(cp) == list(tp)
    for k in tp:
        assert cp[k].shape == tp[k].shape and cp[k].dtype == tp[k].dtype and torch.equal(cp[k], tp[k]), k
    tb, cb = dict(tmod.named_buffers()), dict(cmod.named_buffers())
    assert list(cb) == list(tb)
    for k in tb:
        assert cb[k].dtype == tb[k].dtype and torch.equal(cb[k], tb[k]), k
    assert list(cmod.state_dict()) == list(tmod.state_dict())
    assert repr(cmod) == repr(tmod)
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(cmod, attr, None) is None) == (getattr(tmod, attr, None) is None), attr


@pytest.mark.parametrize("name,cfg", [c for c in all_cases() if "momentum_none" not in c.id])
def test_state_dict_both_ways(name, cfg):
    """Train a torch module, load its state into a fresh cnnops one (and the other way): same
    state, same eval and training output."""
    shape = MODULES[name][2]
    x = torch.randn(shape)
    for src_is_torch in (True, False):
        tmod, cmod = construct(name, cfg)
        src, dst = (tmod, cmod) if src_is_torch else (cmod, tmod)
        randomize(src, seed=3)
        src.train()
        for _ in range(2):
            src(torch.randn(shape) * 2 + 1)
        dst.load_state_dict(src.state_dict(), strict=True)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k
        for mode in (False, True):
            src.train(mode)
            dst.train(mode)
            with torch.no_grad():
                torch.testing.assert_close(dst(x), src(x), atol=1e-5, rtol=1e-4)


def test_load_old_state_dict_without_num_batches_tracked():
    """torch's version-1 state dicts lack num_batches_tracked; the inherited loader fills it."""
    t = tnn.BatchNorm2d(3)
    sd = t.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    c = cnnops.nn.BatchNorm2d(3)
    c.num_batches_tracked.fill_(5)
    c.load_state_dict(sd)
    assert c.num_batches_tracked.item() == 5  # kept, as torch does


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", list(MODULES))
def test_dtype_device_kwargs(name, dtype):
    cfg = {"LayerNorm": {}, "GroupNorm": {}}.get(name, dict(affine=True, track_running_stats=True))
    tmod, cmod = construct(name, cfg, device="cpu", dtype=dtype)
    for k, v in cmod.state_dict().items():
        assert v.dtype == tmod.state_dict()[k].dtype and v.device.type == "cpu", k


def test_meta_device_and_to():
    c = cnnops.nn.BatchNorm2d(4, device="meta")
    assert c.weight.device.type == "meta" and c.running_mean.device.type == "meta"
    c = cnnops.nn.GroupNorm(2, 4)
    assert c.to(torch.float64) is c and c.weight.dtype == torch.float64
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(c(x), torch.nn.functional.group_norm(x, 2, c.weight, c.bias), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
# instance norm specifics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ["default", "affine_tracked", "noaffine_tracked"])
@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"])
def test_instance_norm_unbatched(name, cfg):
    """C x * input (no batch dim), as torch's _InstanceNorm: running statistics too."""
    tmod, cmod = construct(name, cfg)
    randomize(tmod)
    cmod.load_state_dict(tmod.state_dict())
    tmod, cmod = tmod.double(), cmod.double()
    shape = MODULES[name][2][1:]
    for mode in (True, False, True):
        tmod.train(mode)
        cmod.train(mode)
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(cmod(x), tmod(x), atol=1e-10, rtol=1e-9)
        for k, v in tmod.state_dict().items():
            torch.testing.assert_close(cmod.state_dict()[k], v, atol=1e-12, rtol=1e-10)


def test_instance_norm_num_features_mismatch():
    """affine=False: torch warns and goes on; affine=True: ValueError. cnnops does the same."""
    x = torch.randn(2, 4, 5, 5)
    with pytest.warns(UserWarning, match="does not match num_features"):
        out = cnnops.nn.InstanceNorm2d(3)(x)
    with pytest.warns(UserWarning, match="does not match num_features"):
        expected = torch.nn.InstanceNorm2d(3)(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_features"):
        cnnops.nn.InstanceNorm2d(3, affine=True)(x)


@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (2, 3, 4, 5)), ("BatchNorm1d", (3,)),
                                        ("BatchNorm2d", (2, 3, 4)),
                                        ("BatchNorm3d", (2, 3, 4, 5)), ("InstanceNorm1d", (2, 3, 4, 5)),
                                        ("InstanceNorm2d", (3, 4)), ("InstanceNorm3d", (2, 3, 4))])
def test_check_input_dim(name, shape):
    tcls, ccls, _ = MODULES[name]
    x = torch.randn(shape)
    with pytest.raises(ValueError) as te:
        tcls(3)(x)
    with pytest.raises(ValueError) as ce:
        ccls(3)(x)
    assert str(ce.value) == str(te.value)


# --------------------------------------------------------------------------------------------
# cnnops, not torch, does the work
# --------------------------------------------------------------------------------------------


def test_modules_do_not_fall_back_to_torch(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torch's normalization was called")

    for fn in ("batch_norm", "instance_norm", "layer_norm", "group_norm"):
        monkeypatch.setattr(torch.nn.functional, fn, boom)
        monkeypatch.setattr(torch, fn, boom)
    for name in MODULES:
        cfg = {"LayerNorm": {}, "GroupNorm": {}}.get(name, dict(affine=True, track_running_stats=True))
        _, cmod = construct(name, cfg)
        x = torch.randn(MODULES[name][2], requires_grad=True)
        for mode in (True, False):
            cmod.train(mode)
            cmod(x).sum().backward()


def test_sgd_small_cnn_matches_torch():
    """conv -> batch norm -> relu -> conv -> group norm -> relu -> instance norm -> layer norm,
    three SGD steps in float64, cnnops modules against torch.nn ones."""

    def model(nn):
        return tnn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), tnn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), tnn.ReLU(),
            nn.InstanceNorm2d(8, affine=True, track_running_stats=True), nn.LayerNorm([6, 6]),
        ).double()

    torch.manual_seed(0)
    tm = model(tnn)
    cm = model(cnnops.nn)
    cm.load_state_dict(tm.state_dict())
    topt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
    copt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        target = torch.randn(4, 8, 6, 6, dtype=torch.float64)
        for m, opt in ((tm, topt), (cm, copt)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), target).backward()
            opt.step()
    for (k, vt), (_, vc) in zip(tm.state_dict().items(), cm.state_dict().items()):
        torch.testing.assert_close(vc, vt, atol=1e-9, rtol=1e-8, msg=lambda m: f"{k}: {m}")
    tm.eval()
    cm.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), tm(x), atol=1e-9, rtol=1e-8)


# --------------------------------------------------------------------------------------------
# torch.compile of modules in training mode
# --------------------------------------------------------------------------------------------


def _norm_stack():
    return tnn.Sequential(
        cnnops.nn.BatchNorm2d(4), tnn.ReLU(), cnnops.nn.GroupNorm(2, 4),
        cnnops.nn.InstanceNorm2d(4, affine=True, track_running_stats=True), cnnops.nn.LayerNorm([5, 6]),
        cnnops.nn.BatchNorm2d(4, affine=False, momentum=0.5),
    )


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_module_training(backend):
    """fullgraph compile of a stack of cnnops norm modules in training mode: outputs, parameter
    gradients, running statistics (mutated in place through the schema's Tensor(a!)) and
    num_batches_tracked as eager, over two steps and an eval step."""
    torch.manual_seed(0)
    eager = _norm_stack()
    for i, m in enumerate(eager):
        randomize(m, seed=i)
    compiled_module = copy.deepcopy(eager)
    initial_mean = eager[0].running_mean.clone()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_module, backend=backend, fullgraph=True)
    for step, mode in enumerate(("train", "train", "eval")):
        eager.train(mode == "train")
        compiled_module.train(mode == "train")
        x = torch.randn(3, 4, 5, 6)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_e, out_c = eager(xe), compiled(xc)
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        go = torch.randn_like(out_e)
        out_e.backward(go)
        out_c.backward(go)
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-4, rtol=1e-5)
        for (k, pe), (_, pc) in zip(eager.named_parameters(), compiled_module.named_parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, atol=1e-4, rtol=1e-5, msg=lambda m: f"{k}: {m}")
        for (k, be), (_, bc) in zip(eager.named_buffers(), compiled_module.named_buffers()):
            torch.testing.assert_close(bc, be, atol=1e-6, rtol=1e-6, msg=lambda m: f"step {step} {k}: {m}")
    assert compiled_module[0].num_batches_tracked.item() == 2
    assert not torch.equal(compiled_module[0].running_mean, initial_mean), "running_mean not updated under compile"


def test_compile_momentum_none_as_torch():
    """momentum=None reads num_batches_tracked as a Python float. torch's own module cannot be
    compiled with fullgraph=True then (a data-dependent guard); cnnops' compiles wherever
    torch's does. With graph breaks it runs and agrees with eager."""

    def fullgraph_error(cls):
        torch._dynamo.reset()
        try:
            torch.compile(cls(4, momentum=None), backend="eager", fullgraph=True)(torch.randn(3, 4, 5, 5))
        except Exception as e:  # noqa: BLE001 - any failure to trace counts
            return e
        return None

    if fullgraph_error(tnn.BatchNorm2d) is None:
        assert fullgraph_error(cnnops.nn.BatchNorm2d) is None
    torch._dynamo.reset()
    m = cnnops.nn.BatchNorm2d(4, momentum=None)
    e = copy.deepcopy(m)
    c = torch.compile(m, backend="eager")
    for i in range(3):
        x = torch.randn(3, 4, 5, 5) + i
        torch.testing.assert_close(c(x), e(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.running_mean, e.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.running_var, e.running_var, atol=1e-6, rtol=1e-6)
    assert m.num_batches_tracked.item() == e.num_batches_tracked.item() == 3


@pytest.mark.slow
def test_compile_inductor_module_training():
    """Inductor around the opaque cnnops ops (and instance norm's running-statistics update in
    Python): two training steps as eager."""
    torch.manual_seed(0)
    eager = _norm_stack()
    for i, m in enumerate(eager):
        randomize(m, seed=i)
    compiled_module = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_module, backend="inductor", fullgraph=True)
    for _ in range(2):
        x = torch.randn(3, 4, 5, 6)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_e, out_c = eager(xe), compiled(xc)
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        go = torch.randn_like(out_e)
        out_e.backward(go)
        out_c.backward(go)
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-4, rtol=1e-5)
        for (k, be), (_, bc) in zip(eager.named_buffers(), compiled_module.named_buffers()):
            torch.testing.assert_close(bc, be, atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")
