"""cnnops.nn.SyncBatchNorm against torch.

Single process: outside a process group it is BatchNorm (compared with torch.nn.SyncBatchNorm,
which falls back to F.batch_norm there); convert_sync_batchnorm, state_dict, signatures and
errors as torch's; the new ops (batch_norm_stats, batch_norm_elemt, batch_norm_backward_elemt)
against torch formulas in float64 and opcheck; the whole synchronized algorithm on simulated
ranks (slices of one batch) against torch's BatchNorm over the batch; gradcheck of
SyncBatchNormFunction in a one-rank gloo group.

Two processes (torch.multiprocessing spawn, gloo on 127.0.0.1): outputs, input gradients,
weight/bias gradients (summed over the ranks) and running statistics equal torch's BatchNorm
over the concatenated global batch, for equal, unequal and empty per-rank batches; and a small
cnnops CNN trained under DistributedDataParallel equals single-process torch training on the
full batch. All spawn cases run in one spawn (a process start imports torch: seconds).
"""

import datetime
import inspect
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import cnnops
import cnnops.autograd
import cnnops.nn
from conftest import CHANNELS_LAST, make_tensor
from test_norm import assert_norm_close

ops = torch.ops.cnnops
LARGE_MEAN = 1e4
SPAWN_TIMEOUT_S = 120  # a hung collective fails the test instead of hanging CI
# torch 2.11's batch norm modules have no `bias` argument (the oldest supported torch)
BN_HAS_BIAS = "bias" in inspect.signature(torch.nn.SyncBatchNorm).parameters
NO_BIAS = dict(bias=False) if BN_HAS_BIAS else dict(affine=True)


# --------------------------------------------------------------------------------------------
# single process: BatchNorm behaviour outside a process group
# --------------------------------------------------------------------------------------------

SHAPES = {"flat": (6, 3), "1d": (4, 3, 5), "2d": (3, 4, 5, 6), "3d": (2, 3, 3, 4, 5)}


def _layouts(shape):
    return ["contiguous", "channels_last"] if len(shape) in CHANNELS_LAST else ["contiguous"]


CASES = [(name, layout, affine, momentum)
         for name, shape in SHAPES.items() for layout in _layouts(shape)
         for affine in (True, False) for momentum in (0.1, None)]


@pytest.mark.parametrize("name,layout,affine,momentum", CASES,
                         ids=[f"{n}-{lay}-affine{a}-m{m}" for n, lay, a, m in CASES])
def test_single_process_is_batch_norm(name, layout, affine, momentum):
    """Two training steps then eval, against torch.nn.SyncBatchNorm (F.batch_norm without a
    process group): outputs, every gradient, running stats, num_batches_tracked."""
    assert not dist.is_initialized()
    shape = SHAPES[name]
    C = shape[1]
    ref = torch.nn.SyncBatchNorm(C, momentum=momentum, affine=affine).double()
    mine = cnnops.nn.SyncBatchNorm(C, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(C) + 0.5)
            ref.bias.copy_(torch.randn(C))
    mine.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    for step, training in enumerate((True, True, False)):
        ref.train(training)
        mine.train(training)
        x = make_tensor(shape, torch.float32, layout) * (step + 1) + step
        x.requires_grad_(True)
        xr = x.detach().double().requires_grad_(True)
        out, out_ref = mine(x), ref(xr)
        g = make_tensor(shape, torch.float32)
        out.backward(g)
        out_ref.backward(g.double())
        L = x.numel() // C
        ctx = f"{name} {layout} affine={affine} momentum={momentum} step={step}"
        assert_norm_close(out, out_ref, torch.float32, 1, 10.0 * (step + 1), msg=f"{ctx}: output")
        assert_norm_close(x.grad, xr.grad, torch.float32, 1, 50.0, msg=f"{ctx}: grad_input")
        if affine:
            assert_norm_close(mine.weight.grad, ref.weight.grad, torch.float32, L, 10.0, msg=f"{ctx}: grad_weight")
            assert_norm_close(mine.bias.grad, ref.bias.grad, torch.float32, L, 10.0, msg=f"{ctx}: grad_bias")
        for buf in ("running_mean", "running_var"):
            assert_norm_close(getattr(mine, buf), getattr(ref, buf), torch.float32, L, 10.0 * (step + 1),
                              msg=f"{ctx}: {buf}")
        assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked)
        if len(shape) in CHANNELS_LAST:
            fmt = CHANNELS_LAST[len(shape)]
            assert out.is_contiguous(memory_format=fmt) == (layout == "channels_last")


def test_eval_without_running_stats_uses_batch_stats():
    ref = torch.nn.SyncBatchNorm(3, track_running_stats=False).double().eval()
    mine = cnnops.nn.SyncBatchNorm(3, track_running_stats=False).eval()
    x = make_tensor((4, 3, 5), torch.float32)
    assert_norm_close(mine(x), ref(x.double()), torch.float32, 1, 10.0, msg="eval, no running stats")
    assert mine.running_mean is None and mine.num_batches_tracked is None


# --------------------------------------------------------------------------------------------
# module surface: signatures, state_dict, convert_sync_batchnorm, errors
# --------------------------------------------------------------------------------------------


def test_signatures_match_torch():
    assert inspect.signature(cnnops.nn.SyncBatchNorm.__init__) == inspect.signature(torch.nn.SyncBatchNorm.__init__)
    assert inspect.signature(cnnops.nn.SyncBatchNorm.convert_sync_batchnorm) == \
        inspect.signature(torch.nn.SyncBatchNorm.convert_sync_batchnorm)
    # a _BatchNorm like torch's, not a torch.nn.SyncBatchNorm: DDP refuses those on the CPU
    assert issubclass(cnnops.nn.SyncBatchNorm, torch.nn.modules.batchnorm._BatchNorm)
    assert not issubclass(cnnops.nn.SyncBatchNorm, torch.nn.SyncBatchNorm)
    assert "SyncBatchNorm" in cnnops.nn.__all__


@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(track_running_stats=False), NO_BIAS,
                                    dict(momentum=None, eps=1e-3)])
def test_state_dict_matches_torch(kwargs):
    torch.manual_seed(0)
    ref = torch.nn.SyncBatchNorm(5, **kwargs)
    torch.manual_seed(0)
    mine = cnnops.nn.SyncBatchNorm(5, **kwargs)
    a, b = ref.state_dict(), mine.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert repr(mine) == repr(ref)
    # load each other's state
    mine.load_state_dict(ref.state_dict())
    ref.load_state_dict(mine.state_dict())


def _model_with_bns():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(cnnops.nn.BatchNorm1d(5, momentum=None, affine=False), torch.nn.ReLU()),
        torch.nn.BatchNorm3d(6, eps=1e-3, track_running_stats=False),
        torch.nn.BatchNorm2d(7, **NO_BIAS),
    )


def test_convert_sync_batchnorm_keeps_parameters_and_buffers():
    model = _model_with_bns()
    model[1].eval()
    before = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    flags = {name: m.training for name, m in model.named_modules()}
    converted = cnnops.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg")
    assert converted is model
    for idx in ("1", "2.0", "3", "4"):
        m = converted.get_submodule(idx)
        assert type(m) is cnnops.nn.SyncBatchNorm, idx
        assert m.process_group == "pg"
        assert m.training == flags[idx]
    assert converted[2][0].momentum is None and converted[2][0].weight is None
    assert converted[3].eps == 1e-3 and converted[3].running_mean is None
    assert (converted[4].bias is None) == BN_HAS_BIAS and converted[4].weight is not None
    after = {name: t for name, t in list(converted.named_parameters()) + list(converted.named_buffers())}
    assert list(before) == list(after)
    for name in before:
        assert after[name] is before[name], f"{name}: not the same object"
    # round trip through torch's converter: the same objects again
    back = torch.nn.SyncBatchNorm.convert_sync_batchnorm(converted)
    assert type(back[1]) is torch.nn.SyncBatchNorm
    again = {name: t for name, t in list(back.named_parameters()) + list(back.named_buffers())}
    for name in before:
        assert again[name] is before[name], f"{name}: not the same object after the round trip"
    # torch SyncBatchNorm -> cnnops SyncBatchNorm
    mine = cnnops.nn.SyncBatchNorm.convert_sync_batchnorm(back)
    assert type(mine[1]) is cnnops.nn.SyncBatchNorm and mine[1].weight is before["1.weight"]


def test_convert_a_batchnorm_module_itself():
    bn = cnnops.nn.BatchNorm2d(3)
    out = cnnops.nn.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(out) is cnnops.nn.SyncBatchNorm and out.weight is bn.weight and out.running_var is bn.running_var
    # the converted model computes what the original did
    x = make_tensor((4, 3, 5, 5), torch.float32)
    ref = torch.nn.BatchNorm2d(3).double()
    ref.load_state_dict(bn.state_dict())
    assert_norm_close(out(x), ref(x.double()), torch.float32, 1, 10.0, msg="converted")


def _torch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info


@pytest.mark.parametrize("shape,training", [((3,), True), ((3,), False), ((4, 0, 5), True), ((1, 3), True),
                                            ((1, 3, 1, 1), True)])
def test_errors_like_torch(shape, training):
    ref = torch.nn.SyncBatchNorm(shape[1] if len(shape) > 1 else 3).train(training)
    mine = cnnops.nn.SyncBatchNorm(shape[1] if len(shape) > 1 else 3).train(training)
    x = torch.randn(shape)
    expected = _torch_error(lambda: ref(x))
    with pytest.raises(expected.type) as got:
        mine(x)
    assert str(got.value) == str(expected.value)


# --------------------------------------------------------------------------------------------
# the new ops against torch formulas (float64 references)
# --------------------------------------------------------------------------------------------


def _channel_view(x):
    """C x (N * spatial), float64."""
    return x.detach().double().transpose(0, 1).reshape(x.size(1), -1)


OP_SHAPES = [((4, 3, 5, 6), "contiguous"), ((4, 3, 5, 6), "channels_last"), ((5, 4), "contiguous"),
             ((2, 3, 3, 4, 5), "channels_last"), ((3, 2, 20000), "contiguous"), ((0, 3, 4), "contiguous")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", OP_SHAPES)
def test_batch_norm_stats(shape, layout, dtype):
    for mean_shift in (0.0, LARGE_MEAN if dtype != torch.bfloat16 else 0.0):
        x = make_tensor(shape, dtype, layout)
        x = (x.double() + mean_shift).to(dtype) if mean_shift else x
        mean, m2 = ops.batch_norm_stats(x)
        v = _channel_view(x)
        ref_mean = v.mean(1) if v.size(1) else torch.zeros(v.size(0), dtype=torch.float64)
        ref_m2 = ((v - ref_mean[:, None]) ** 2).sum(1)
        stat_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        assert mean.dtype == m2.dtype == stat_dtype
        L = max(v.size(1), 1)
        kappa = 5.0 + mean_shift
        assert_norm_close(mean, ref_mean, stat_dtype, L, kappa, msg=f"mean shift={mean_shift}")
        # m2 ~ L * var: compare m2 / L (the biased variance) on the variance's scale
        assert_norm_close(m2 / L, ref_m2 / L, stat_dtype, L, kappa, msg=f"m2 / L shift={mean_shift}")


def _stats64(x):
    v = _channel_view(x)
    return v.mean(1), v.var(1, unbiased=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", OP_SHAPES[:5])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_elemt(shape, layout, dtype, affine):
    x = make_tensor(shape, dtype, layout)
    C = shape[1]
    stat_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    mean64, var64 = _stats64(x)
    mean = mean64.to(stat_dtype)
    invstd = (var64 + 1e-5).rsqrt().to(stat_dtype)
    w = (torch.rand(C) + 0.5).to(dtype) if affine else None
    b = torch.randn(C).to(dtype) if affine else None
    out = ops.batch_norm_elemt(x, w, b, mean, invstd)
    # torch in float64 with the same (rounded) statistics
    ref = F.batch_norm(x.double(), mean.double(), invstd.double() ** -2 - 1e-5,
                       None if w is None else w.double(), None if b is None else b.double(), False, 0.0, 1e-5)
    assert_norm_close(out, ref, dtype, 1, 10.0, msg="batch_norm_elemt")
    if len(shape) in CHANNELS_LAST:
        fmt = CHANNELS_LAST[len(shape)]
        assert out.is_contiguous(memory_format=fmt) == x.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", OP_SHAPES[:5])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_backward_elemt_one_rank(shape, layout, dtype, affine):
    """With this rank's own sums and count, grad_input is torch's batch norm grad_input."""
    x = make_tensor(shape, dtype, layout)
    C = shape[1]
    stat_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    w = (torch.rand(C) + 0.5).to(dtype) if affine else None
    g = make_tensor(shape, dtype, layout)
    xr = x.detach().double().requires_grad_(True)
    out = F.batch_norm(xr, None, None, None if w is None else w.double(), None, True, 0.0, 1e-5)
    (ref,) = torch.autograd.grad(out, xr, g.double())
    mean64, var64 = _stats64(x)
    gv, xv = _channel_view(g), _channel_view(x)
    sum_dy = gv.sum(1)
    sum_dy_xmu = (gv * (xv - mean64[:, None])).sum(1)
    got = ops.batch_norm_backward_elemt(g, x, mean64.to(stat_dtype), (var64 + 1e-5).rsqrt().to(stat_dtype), w,
                                        sum_dy.to(stat_dtype), sum_dy_xmu.to(stat_dtype), x.numel() // C)
    assert_norm_close(got, ref, dtype, 1, 50.0, msg="batch_norm_backward_elemt")


def _opcheck_samples():
    for dtype in (torch.float32, torch.float64):
        for shape, layout in OP_SHAPES:
            if shape[0] == 0 or shape[-1] > 100:
                continue
            x = make_tensor(shape, dtype, layout)
            C = shape[1]
            mean, var = _stats64(x)
            mean, invstd = mean.to(dtype), (var + 1e-5).rsqrt().to(dtype)
            w, b = torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)
            g = make_tensor(shape, dtype, layout)
            yield "batch_norm_stats", (x,)
            yield "batch_norm_elemt", (x, w, b, mean, invstd)
            yield "batch_norm_elemt", (x, None, None, mean, invstd)
            yield "batch_norm_backward_elemt", (g, x, mean, invstd, w, torch.randn(C, dtype=dtype),
                                                torch.randn(C, dtype=dtype), 3 * (x.numel() // C))


@pytest.mark.parametrize("op", ["batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_elemt"])
def test_opcheck(op):
    n = 0
    for name, args in _opcheck_samples():
        if name == op:
            torch.library.opcheck(getattr(ops, op).default, args)
            n += 1
    assert n > 0


def test_op_errors():
    x = torch.randn(4, 3, 5)
    s = torch.zeros(3)
    with pytest.raises(RuntimeError, match="count"):
        ops.batch_norm_backward_elemt(x, x, s, s, None, s, s, 5)
    with pytest.raises(RuntimeError, match="invstd"):
        ops.batch_norm_elemt(x, None, None, s, torch.zeros(4))
    with pytest.raises(RuntimeError, match="mean"):
        ops.batch_norm_elemt(x, None, None, s.double(), s)
    with pytest.raises(RuntimeError, match="input"):
        ops.batch_norm_stats(torch.randn(3))


# --------------------------------------------------------------------------------------------
# the synchronized algorithm on simulated ranks (slices of one batch, no process group)
# --------------------------------------------------------------------------------------------


def _simulated_sync_bn(xs, gs, weight, bias, eps):
    """SyncBatchNormFunction's arithmetic with the collectives replaced by a loop over the
    slices: returns per-slice outputs, grad_inputs and the summed grad_weight/grad_bias."""
    C = xs[0].size(1)
    parts = []
    for x in xs:
        mean, m2 = ops.batch_norm_stats(x)
        parts.append(torch.cat([torch.tensor([x.numel() // C], dtype=torch.float64), mean.double(), m2.double()]))
    gathered = torch.stack(parts)
    total = int(gathered[:, 0].sum())
    gmean, gm2 = cnnops.autograd._merge_rank_stats(gathered[:, :1], gathered[:, 1:1 + C], gathered[:, 1 + C:])
    stat_dtype = parts[0].dtype if xs[0].dtype == torch.float64 else torch.float32
    mean, invstd = gmean.to(stat_dtype), (gm2 / total + eps).rsqrt().to(stat_dtype)
    outs = [ops.batch_norm_elemt(x, weight, bias, mean, invstd) for x in xs]
    ones = torch.ones(C, dtype=stat_dtype)
    sums = [ops.batch_norm_backward(g, x, ones, mean, ones, True, [False, True, True]) for x, g in zip(xs, gs)]
    sum_dy = sum(s[2] for s in sums)
    sum_dy_xmu = sum(s[1] for s in sums)
    grads = [ops.batch_norm_backward_elemt(g, x, mean, invstd, weight, sum_dy, sum_dy_xmu, total)
             for x, g in zip(xs, gs)]
    return outs, grads, invstd * sum_dy_xmu, sum_dy, gmean, gm2 / (total - 1)


@pytest.mark.parametrize("sizes", [(3, 3), (5, 1), (4, 0, 2), (1, 1, 1, 1, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mean_shift", [0.0, LARGE_MEAN])
def test_simulated_ranks_equal_batch_norm_over_the_union(sizes, layout, mean_shift):
    C, H, W = 3, 4, 5
    N = sum(sizes)
    x = make_tensor((N, C, H, W), torch.float32, layout)
    if mean_shift:
        with torch.no_grad():
            x.add_(mean_shift)
    g = make_tensor((N, C, H, W), torch.float32, layout)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    xs, gs = list(x.split(sizes)), list(g.split(sizes))
    outs, grads, gw, gb, mean, uvar = _simulated_sync_bn(xs, gs, w, b, 1e-5)

    xr = x.detach().double().requires_grad_(True)
    wr, br = w.double().requires_grad_(True), b.double().requires_grad_(True)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    ref = F.batch_norm(xr, rm, rv, wr, br, True, 1.0, 1e-5)  # momentum 1: running = batch stats
    ref_gx, ref_gw, ref_gb = torch.autograd.grad(ref, (xr, wr, br), g.double())
    L = N * H * W
    kappa = (5.0 + mean_shift) * 1.5
    ctx = f"sizes={sizes} {layout} shift={mean_shift}"
    assert_norm_close(torch.cat(outs), ref, torch.float32, 1, kappa, msg=f"{ctx}: output")
    assert_norm_close(torch.cat(grads), ref_gx, torch.float32, 1, kappa * 10, msg=f"{ctx}: grad_input")
    assert_norm_close(gw, ref_gw, torch.float32, L, kappa, msg=f"{ctx}: grad_weight")
    assert_norm_close(gb, ref_gb, torch.float32, L, kappa, msg=f"{ctx}: grad_bias")
    assert_norm_close(mean.float(), rm, torch.float32, L, kappa, msg=f"{ctx}: mean")
    assert_norm_close(uvar.float(), rv, torch.float32, L, kappa, msg=f"{ctx}: unbiased var")


# --------------------------------------------------------------------------------------------
# gradcheck of SyncBatchNormFunction in a one-rank gloo group (collectives are identities)
# --------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_gradcheck_function(one_rank_group):
    torch.manual_seed(0)
    C = 3
    for shape, layout in (((4, C, 5), "contiguous"), ((3, C, 2, 3), "channels_last")):
        x = make_tensor(shape, torch.float64, layout).requires_grad_(True)
        w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
        b = torch.randn(C, dtype=torch.float64).requires_grad_(True)

        def fn(x, w, b):
            return cnnops.autograd.SyncBatchNormFunction.apply(x, w, b, None, None, 1e-5, 0.1, one_rank_group, 1)

        assert torch.autograd.gradcheck(fn, (x, w, b))
        out = fn(x, w, b)
        ref = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        torch.testing.assert_close(out, ref, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("loss", ["pow2", "sum"])
def test_double_backward_raises(one_rank_group, loss):
    """No double backward across ranks: a gradient computed with create_graph=True raises
    RuntimeError when differentiated (as torch's SyncBatchNorm, whose backward ops have no
    derivative), also when grad_output does not require grad (loss = out.sum(), where
    @once_differentiable alone would silently drop the terms through the saved input). The
    first-order gradients themselves are still right."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = cnnops.autograd.SyncBatchNormFunction.apply(x, w, b, None, None, 1e-5, 0.1, one_rank_group, 1)
    value = out.pow(2).sum() if loss == "pow2" else out.sum()
    gx, gw, gb = torch.autograd.grad(value, (x, w, b), create_graph=True)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = F.batch_norm(xr, None, None, wr, br, True, 0.1, 1e-5)
    expected = torch.autograd.grad(ref.pow(2).sum() if loss == "pow2" else ref.sum(), (xr, wr, br))
    for got, exp in zip((gx, gw, gb), expected):
        torch.testing.assert_close(got, exp)
    for g in (gx, gw):
        assert g.requires_grad
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(g.pow(2).sum(), (x, w, b), allow_unused=True)
    # without create_graph nothing changes
    out = cnnops.autograd.SyncBatchNormFunction.apply(x, w, b, None, None, 1e-5, 0.1, one_rank_group, 1)
    gx2, = torch.autograd.grad(out.pow(2).sum(), [x])
    assert not gx2.requires_grad


def test_world_size_one_group_falls_back_to_batch_norm(one_rank_group):
    mine, ref = cnnops.nn.SyncBatchNorm(3), torch.nn.BatchNorm2d(3).double()
    x = make_tensor((4, 3, 5, 5), torch.float32)
    # torch's own SyncBatchNorm refuses CPU tensors in a group; BatchNorm is the reference
    assert_norm_close(mine(x), ref(x.double()), torch.float32, 1, 10.0, msg="world size 1")
    assert_norm_close(mine.running_var, ref.running_var, torch.float32, 100, 10.0, msg="world size 1")


def test_ddp_accepts_it_on_cpu(one_rank_group):
    """Why cnnops.nn.SyncBatchNorm is not a torch.nn.SyncBatchNorm subclass: DDP refuses those
    in a CPU model."""
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.SyncBatchNorm(3)))
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(cnnops.nn.SyncBatchNorm(3)))
    ddp(torch.randn(4, 3, 5)).sum().backward()


# --------------------------------------------------------------------------------------------
# two processes, gloo
# --------------------------------------------------------------------------------------------

# name -> (per-rank batch sizes, per-sample shape, input dtype, layout, module kwargs, mean shift)
SPAWN_CASES = {
    "equal": ((4, 4), (3, 5, 6), torch.float32, "contiguous", {}, 0.0),
    "unequal": ((5, 2), (3, 5, 6), torch.float32, "contiguous", dict(momentum=None), 0.0),
    "empty_rank": ((4, 0), (3, 5, 6), torch.float32, "contiguous", {}, 0.0),
    "empty_rank0": ((0, 3), (3, 4), torch.float64, "contiguous", {}, 0.0),
    "channels_last": ((3, 2), (4, 3, 5), torch.float32, "channels_last", dict(eps=1e-3), 0.0),
    "flat": ((6, 3), (5,), torch.float64, "contiguous", dict(affine=False, momentum=None), 0.0),
    "1d": ((2, 5), (3, 7), torch.float32, "contiguous", NO_BIAS, 0.0),
    "3d": ((2, 1), (3, 3, 4, 5), torch.float32, "channels_last", dict(momentum=0.3), 0.0),
    "large_mean": ((4, 3), (3, 5, 6), torch.float32, "contiguous", {}, LARGE_MEAN),
    "no_running": ((3, 3), (3, 5, 6), torch.float32, "contiguous", dict(track_running_stats=False), 0.0),
    "bfloat16": ((3, 2), (3, 5, 6), torch.bfloat16, "channels_last", {}, 0.0),
}
STEPS = 2


def _case_data(name):
    """The global batch and grad_output of every step, the same in every process."""
    sizes, sample, dtype, layout, kwargs, shift = SPAWN_CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    steps = []
    for step in range(STEPS):
        shape = (sum(sizes), *sample)
        x = make_tensor(shape, dtype, layout if len(shape) in CHANNELS_LAST else "contiguous", generator=gen)
        x = (x * (1 + step) + shift).to(dtype) if shift else x * (1 + step) + step
        g = make_tensor(shape, dtype, layout if len(shape) in CHANNELS_LAST else "contiguous", generator=gen)
        steps.append((x, g))
    C = sample[0]
    w = torch.rand(C, generator=gen) + 0.5
    b = torch.randn(C, generator=gen)
    return sizes, dtype, kwargs, steps, w, b


def _rank_slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


class _Net(torch.nn.Module):
    """conv -> batch norm -> relu -> max pool -> linear, from the given module classes."""

    def __init__(self, conv, bn, pool):
        super().__init__()
        self.conv = conv(3, 4, 3, padding=1)
        self.bn = bn(4)
        self.pool = pool(2)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


DDP_STEPS, DDP_BATCH = 3, (4, 4)


def _ddp_data():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(sum(DDP_BATCH), 3, 8, 8, generator=gen), torch.randint(0, 5, (sum(DDP_BATCH),), generator=gen))
            for _ in range(DDP_STEPS)]


def _worker(rank, world_size, port, out_dir, ddp_state):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name in SPAWN_CASES:
            sizes, dtype, kwargs, steps, w, b = _case_data(name)
            C = steps[0][0].size(1)
            bn = cnnops.nn.SyncBatchNorm(C, **kwargs).to(dtype)
            if bn.weight is not None:
                with torch.no_grad():
                    bn.weight.copy_(w)
                    if bn.bias is not None:
                        bn.bias.copy_(b)
            per_step = []
            for x, g in steps:
                xr = _rank_slice(x, sizes, rank).detach().requires_grad_(True)
                out = bn(xr)
                out.backward(_rank_slice(g, sizes, rank))
                per_step.append(dict(
                    out=out.detach(), grad_input=xr.grad,
                    grad_weight=None if bn.weight is None else bn.weight.grad.clone(),
                    grad_bias=None if bn.bias is None else bn.bias.grad.clone(),
                    running_mean=None if bn.running_mean is None else bn.running_mean.clone(),
                    running_var=None if bn.running_var is None else bn.running_var.clone(),
                    num_batches_tracked=None if bn.num_batches_tracked is None else int(bn.num_batches_tracked),
                    channels_last=out.dim() in CHANNELS_LAST and out.is_contiguous(
                        memory_format=CHANNELS_LAST[out.dim()])))
                for p in bn.parameters():
                    p.grad = None
            # eval: the running statistics, no synchronization (as torch)
            bn.eval()
            with torch.no_grad():
                eval_out = bn(_rank_slice(steps[0][0], sizes, rank)) if bn.track_running_stats else None
            results[name] = dict(steps=per_step, eval_out=eval_out)

        # DDP: the cnnops net, each rank on its half of every batch, mean loss per rank
        net = _Net(cnnops.nn.Conv2d, cnnops.nn.SyncBatchNorm, cnnops.nn.MaxPool2d)
        net.load_state_dict(ddp_state)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        for x, y in _ddp_data():
            opt.zero_grad()
            loss = F.cross_entropy(ddp(_rank_slice(x, DDP_BATCH, rank)), _rank_slice(y, DDP_BATCH, rank))
            loss.backward()
            opt.step()
        results["ddp"] = {k: v.clone() for k, v in net.state_dict().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(fn, args, nprocs=2):
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"spawned processes did not finish within {SPAWN_TIMEOUT_S} s (hung collective?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


@pytest.fixture(scope="module")
def torch_ddp_reference():
    torch.manual_seed(3)
    net = _Net(torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.MaxPool2d)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for x, y in _ddp_data():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()  # mean over the global batch
        opt.step()
    return initial, net.state_dict()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, torch_ddp_reference):
    out_dir = str(tmp_path_factory.mktemp("syncbn"))
    _spawn(_worker, (2, _free_port(), out_dir, torch_ddp_reference[0]))
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("name", list(SPAWN_CASES))
def test_two_processes_equal_batch_norm_over_global_batch(spawned, name):
    sizes, dtype, kwargs, steps, w, b = _case_data(name)
    shift = SPAWN_CASES[name][5]
    C = steps[0][0].size(1)
    ref = torch.nn.SyncBatchNorm(C, **kwargs).double()  # no process group here: F.batch_norm
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.copy_(w.to(dtype))
            if ref.bias is not None:
                ref.bias.copy_(b.to(dtype))
    kappa_w = float(w.max()) if ref.weight is not None else 1.0
    for step, (x, g) in enumerate(steps):
        xr = x.detach().double().requires_grad_(True)
        out = ref(xr)
        out.backward(g.double())
        L = x.numel() // C
        kappa = (5.0 + abs(shift) + step) * kappa_w
        ctx = f"{name} step {step}"
        got = [spawned[r][name]["steps"][step] for r in range(2)]
        assert_norm_close(torch.cat([r["out"] for r in got]), out, dtype, 1, kappa, msg=f"{ctx}: output")
        assert_norm_close(torch.cat([r["grad_input"] for r in got]), xr.grad, dtype, 1, kappa * 20,
                          msg=f"{ctx}: grad_input")
        if x.dim() in CHANNELS_LAST and sizes[0] > 0:
            assert got[0]["channels_last"] == x.is_contiguous(memory_format=CHANNELS_LAST[x.dim()]), ctx
        for pname in ("weight", "bias"):
            param = getattr(ref, pname)
            if param is None:
                assert got[0][f"grad_{pname}"] is None
                continue
            # each rank holds its share (as torch's SyncBatchNorm); DDP sums them
            total = got[0][f"grad_{pname}"] + got[1][f"grad_{pname}"]
            assert_norm_close(total, param.grad, dtype, L, kappa, msg=f"{ctx}: grad_{pname}")
            param.grad = None
        for r in range(2):
            for buf in ("running_mean", "running_var"):
                expected = getattr(ref, buf)
                if expected is None:
                    assert got[r][buf] is None
                else:
                    assert_norm_close(got[r][buf], expected, dtype, L, kappa, msg=f"{ctx} rank {r}: {buf}")
            expected_nbt = None if ref.num_batches_tracked is None else int(ref.num_batches_tracked)
            assert got[r]["num_batches_tracked"] == expected_nbt
    if ref.track_running_stats:
        with torch.no_grad():
            expected = ref.eval()(steps[0][0].double())
        got = torch.cat([spawned[r][name]["eval_out"] for r in range(2)])
        assert_norm_close(got, expected, dtype, 1, (5.0 + abs(shift)) * kappa_w * 4, msg=f"{name}: eval output")


def test_ddp_training_equals_single_process_full_batch(spawned, torch_ddp_reference):
    _, expected = torch_ddp_reference
    for r in range(2):
        got = spawned[r]["ddp"]
        assert list(got) == list(expected)
        for k, v in expected.items():
            if v.is_floating_point():
                torch.testing.assert_close(got[k], v, atol=2e-5, rtol=1e-4, msg=lambda m: f"rank {r} {k}: {m}")
            else:
                assert torch.equal(got[k], v), k
