"""SyncBatchNorm on CUDA: the new ops (batch_norm_stats, batch_norm_elemt,
batch_norm_backward_elemt) against torch's own CUDA ops of the same names and against the
cnnops CPU kernels (one GPU); and two processes with NCCL (two GPUs) against torch's
BatchNorm over the global batch. Skipped without a GPU / cnnops CUDA kernels."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist

import cnnops
import cnnops.nn
from conftest import CHANNELS_LAST, make_tensor
from test_norm import assert_norm_close
from test_sync_batchnorm import _free_port, _spawn

pytestmark = pytest.mark.cuda
ops = torch.ops.cnnops

SHAPES = [((4, 3, 5, 6), "contiguous"), ((4, 3, 5, 6), "channels_last"), ((5, 4), "contiguous"),
          ((2, 3, 3, 4, 5), "channels_last"), ((3, 2, 70000), "contiguous"), ((0, 3, 4), "contiguous")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _stat_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_ops_match_torch_cuda_and_cnnops_cpu(shape, layout, dtype):
    C = shape[1]
    x = make_tensor(shape, dtype, layout)
    g = make_tensor(shape, dtype, layout)
    xc, gc = x.cuda(), g.cuda()
    sd = _stat_dtype(dtype)
    L = max(x.numel() // C, 1)

    mean, m2 = ops.batch_norm_stats(xc)
    cpu_mean, cpu_m2 = ops.batch_norm_stats(x)
    assert mean.dtype == m2.dtype == sd and mean.is_cuda
    assert_norm_close(mean.cpu(), cpu_mean.double(), sd, L, 5.0, msg="stats mean vs cpu")
    assert_norm_close(m2.cpu() / L, cpu_m2.double() / L, sd, L, 5.0, msg="stats m2 vs cpu")
    if x.numel():
        t_mean, t_invstd = torch.batch_norm_stats(xc, 1e-5)  # torch's own CUDA op
        assert_norm_close(mean.cpu(), t_mean.double().cpu(), sd, L, 5.0, msg="stats mean vs torch")
        assert_norm_close((m2 / L + 1e-5).rsqrt().cpu(), t_invstd.double().cpu(), sd, L, 50.0,
                          msg="stats invstd vs torch")

    invstd = (m2 / L + 1e-5).rsqrt()
    w = (torch.rand(C) + 0.5).to(dtype)
    b = torch.randn(C).to(dtype)
    out = ops.batch_norm_elemt(xc, w.cuda(), b.cuda(), mean, invstd)
    cpu_out = ops.batch_norm_elemt(x, w, b, mean.cpu(), invstd.cpu())
    assert_norm_close(out.cpu(), cpu_out.double(), dtype, 1, 10.0, msg="elemt vs cpu")
    if x.dim() in CHANNELS_LAST:
        fmt = CHANNELS_LAST[x.dim()]
        assert out.is_contiguous(memory_format=fmt) == x.is_contiguous(memory_format=fmt)
    if x.numel():
        ref = torch.batch_norm_elemt(xc, w.cuda(), b.cuda(), mean, invstd, 1e-5)
        assert_norm_close(out.cpu(), ref.double().cpu(), dtype, 1, 10.0, msg="elemt vs torch")

    sum_dy = torch.randn(C, dtype=sd)
    sum_dy_xmu = torch.randn(C, dtype=sd)
    count = 2 * L
    gi = ops.batch_norm_backward_elemt(gc, xc, mean, invstd, w.cuda(), sum_dy.cuda(), sum_dy_xmu.cuda(), count)
    cpu_gi = ops.batch_norm_backward_elemt(g, x, mean.cpu(), invstd.cpu(), w, sum_dy, sum_dy_xmu, count)
    assert_norm_close(gi.cpu(), cpu_gi.double(), dtype, 1, 50.0, msg="backward_elemt vs cpu")
    if x.numel():
        counts = torch.tensor([count], dtype=torch.int32, device="cuda")
        ref = torch.batch_norm_backward_elemt(gc, xc, mean, invstd, w.cuda().to(sd), sum_dy.cuda(),
                                              sum_dy_xmu.cuda(), counts)
        assert_norm_close(gi.cpu(), ref.double().cpu(), dtype, 1, 50.0, msg="backward_elemt vs torch")


@pytest.mark.parametrize("op", ["batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_elemt"])
def test_opcheck_cuda(op):
    x = make_tensor((4, 3, 5, 6), torch.float32, "channels_last").cuda()
    C = 3
    mean, m2 = ops.batch_norm_stats(x)
    invstd = (m2 / 120 + 1e-5).rsqrt()
    w, b = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    args = {
        "batch_norm_stats": (x,),
        "batch_norm_elemt": (x, w, b, mean, invstd),
        "batch_norm_backward_elemt": (x, x, mean, invstd, w, torch.randn(C, device="cuda"),
                                      torch.randn(C, device="cuda"), 240),
    }[op]
    torch.library.opcheck(getattr(ops, op).default, args)


def test_single_gpu_module_is_batch_norm():
    mine = cnnops.nn.SyncBatchNorm(3).cuda()
    ref = torch.nn.BatchNorm2d(3).cuda().double()
    x = make_tensor((4, 3, 5, 5), torch.float32).cuda().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    out, out_ref = mine(x), ref(xr)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g.double())
    assert_norm_close(out, out_ref, torch.float32, 1, 10.0, msg="output")
    assert_norm_close(x.grad, xr.grad, torch.float32, 1, 50.0, msg="grad_input")
    assert_norm_close(mine.running_var, ref.running_var, torch.float32, 100, 10.0, msg="running_var")


# --------------------------------------------------------------------------------------------
# two GPUs, NCCL
# --------------------------------------------------------------------------------------------

SIZES = (5, 2)


def _nccl_worker(rank, world_size, port, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(sum(SIZES), 3, 5, 6, generator=gen)
        g = torch.randn(sum(SIZES), 3, 5, 6, generator=gen)
        start = sum(SIZES[:rank])
        bn = cnnops.nn.SyncBatchNorm(3).cuda()
        xr = x[start:start + SIZES[rank]].cuda().requires_grad_(True)
        out = bn(xr)
        out.backward(g[start:start + SIZES[rank]].cuda())
        torch.save(dict(out=out.detach().cpu(), grad_input=xr.grad.cpu(), grad_weight=bn.weight.grad.cpu(),
                        grad_bias=bn.bias.grad.cpu(), running_mean=bn.running_mean.cpu(),
                        running_var=bn.running_var.cpu()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
def test_two_gpus_nccl_equal_batch_norm_over_global_batch(tmp_path):
    _spawn(_nccl_worker, (2, _free_port(), str(tmp_path)))
    got = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(sum(SIZES), 3, 5, 6, generator=gen).double().requires_grad_(True)
    g = torch.randn(sum(SIZES), 3, 5, 6, generator=gen).double()
    ref = torch.nn.BatchNorm2d(3).double()
    out = ref(x)
    out.backward(g)
    L = x.numel() // 3
    assert_norm_close(torch.cat([r["out"] for r in got]), out, torch.float32, 1, 10.0, msg="output")
    assert_norm_close(torch.cat([r["grad_input"] for r in got]), x.grad, torch.float32, 1, 50.0, msg="grad_input")
    assert_norm_close(got[0]["grad_weight"] + got[1]["grad_weight"], ref.weight.grad, torch.float32, L, 10.0,
                      msg="grad_weight")
    assert_norm_close(got[0]["grad_bias"] + got[1]["grad_bias"], ref.bias.grad, torch.float32, L, 10.0,
                      msg="grad_bias")
    for r in range(2):
        assert_norm_close(got[r]["running_mean"], ref.running_mean, torch.float32, L, 10.0, msg="running_mean")
        assert_norm_close(got[r]["running_var"], ref.running_var, torch.float32, L, 10.0, msg="running_var")

