"""CUDA normalization ops (batch, layer, group norm; instance norm = group norm with G = C),
called directly through torch.ops.cnnops, against torch (reference computed on the CPU in
float64 from the same rounded inputs) and against the cnnops CPU kernels. Forward outputs,
statistics, running-stat updates and every gradient; NCHW and channels_last; float32, float64,
float16, bfloat16 and mixed precision (half/bfloat16 input, float parameters); inputs with a
large mean; bitwise determinism. Skipped unless a GPU is visible and cnnops has CUDA kernels."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CUDA_DTYPES, assert_close_to_torch, dtype_id

pytestmark = pytest.mark.cuda
DEV = "cuda"
ops = torch.ops.cnnops
EPS = 1e-5


def rand(shape, dtype, cl=False, offset=0.0, gen=None):
    """N(0, 1) (+ offset) drawn in float64 on the CPU, rounded to dtype, moved to the GPU."""
    t = (torch.randn(shape, dtype=torch.float64, generator=gen) + offset).to(dtype).to(DEV)
    if cl:
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def ref(t):
    """The float64 CPU copy the reference is computed from. Contiguous: torch's own CPU group
    norm on channels_last float64 input loses ~1e-7 at a mean of 1e4 (a naive variance), which
    would fail the large-mean test on torch's side; the NCHW path is exact."""
    return None if t is None else t.detach().cpu().double().contiguous()


def opt_param(c_shape, dtype, on):
    return rand(c_shape, dtype) if on else None


def check(actual, expected, reduction=1, msg="", atol=None):
    """Reference cast to the result's dtype, tolerance from the shared table (conftest), or an
    explicit atol for the large-mean cases (see test_large_mean)."""
    expected = expected.to(actual.device)
    if atol is None:
        assert_close_to_torch(actual, expected, actual.dtype, reduction=reduction, msg=msg)
    else:
        torch.testing.assert_close(actual.double(), expected.to(actual.dtype).double(), atol=atol, rtol=0,
                                   msg=lambda m: f"{msg}: {m}")


def has_cpu_kernel(name):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnops::{name}", "CPU")


def assert_same_format(out, x):
    """Outputs keep the input's memory format."""
    if x.is_contiguous():
        assert out.is_contiguous()
    elif x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            assert out.is_contiguous(memory_format=fmt)


def masked_empty(t):
    return t.numel() == 0 and t.dim() == 1


# ---------------------------------------------------------------------------------------------
# batch norm
# ---------------------------------------------------------------------------------------------

def run_batch_norm(x, w, b, rm, rv, training, momentum, dy, atol=None, check_cpu=True):
    """cnnops CUDA vs float64 torch, forward + backward; returns the cnnops results."""
    dims = [0] + list(range(2, x.dim()))
    m = x.numel() // x.size(1)
    # reference
    xr = ref(x).requires_grad_()
    wr = ref(w).requires_grad_() if w is not None else None
    br = ref(b).requires_grad_() if b is not None else None
    rmr, rvr = ref(rm), ref(rv)
    rmr = rmr.clone() if rmr is not None else None
    rvr = rvr.clone() if rvr is not None else None
    y_ref = F.batch_norm(xr, rmr, rvr, wr, br, training=training, momentum=momentum, eps=EPS)
    wanted = [t for t in (xr, wr, br) if t is not None]
    grads_ref = dict(zip([k for k, t in zip("xwb", (xr, wr, br)) if t is not None],
                         torch.autograd.grad(y_ref, wanted, ref(dy))))
    if training:
        mean_ref = ref(x).mean(dims)
        invstd_ref = 1 / torch.sqrt(ref(x).var(dims, unbiased=False) + EPS)
    else:
        mean_ref, invstd_ref = ref(rm), 1 / torch.sqrt(ref(rv) + EPS)
    # cnnops
    rm_c = rm.clone() if rm is not None else None
    rv_c = rv.clone() if rv is not None else None
    y, mean, invstd = ops.batch_norm_forward(x, w, b, rm_c, rv_c, training, momentum, EPS)
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert y.dtype == x.dtype and mean.dtype == stat_dtype and invstd.dtype == stat_dtype
    assert_same_format(y, x)
    check(y, y_ref, msg="batch_norm y", atol=atol)
    check(mean, mean_ref, msg="batch_norm mean", atol=atol)
    check(invstd, invstd_ref, msg="batch_norm invstd", atol=atol)
    if rm is not None and training:
        check(rm_c, rmr, msg="running_mean", atol=atol)
        check(rv_c, rvr, msg="running_var", atol=atol)
    dx, dw, db = ops.batch_norm_backward(dy, x, w, mean, invstd, training, [True, w is not None, b is not None])
    check(dx, grads_ref["x"], msg="batch_norm grad_input", atol=atol)
    assert_same_format(dx, x)
    if w is not None:
        check(dw, grads_ref["w"], reduction=m, msg="batch_norm grad_weight",
              atol=None if atol is None else atol * math.sqrt(m))
        assert dw.dtype == w.dtype
    else:
        assert masked_empty(dw)
    if b is not None:
        check(db, grads_ref["b"], reduction=m, msg="batch_norm grad_bias")
    else:
        assert masked_empty(db)
    if check_cpu and x.dtype in (torch.float32, torch.float64) and has_cpu_kernel("batch_norm_forward"):
        rm_p = rm.cpu().clone() if rm is not None else None
        rv_p = rv.cpu().clone() if rv is not None else None
        cpu = ops.batch_norm_forward(x.cpu(), None if w is None else w.cpu(), None if b is None else b.cpu(),
                                     rm_p, rv_p, training, momentum, EPS)
        for a, c, name in zip((y, mean, invstd), cpu, ("y", "mean", "invstd")):
            check(a, c, msg=f"batch_norm CUDA vs CPU {name}", atol=atol)
    return y, mean, invstd, dx, dw, db, rm_c, rv_c


BN_SHAPES = [  # shape, channels_last
    ((8, 5), False),            # BatchNorm1d on (N, C): channels contiguous
    ((4, 3, 17), False),        # (N, C, L)
    ((2, 4, 7, 9), False),
    ((2, 4, 7, 9), True),
    ((3, 37, 5, 3), True),      # more than one 32-channel block, ragged
    ((1, 2, 3, 4, 5), True),    # channels_last_3d
    ((2, 3, 2, 3, 4), False),
    ((3, 6, 1, 1), True),       # spatial 1
    ((1, 5, 3, 7), True),       # batch 1
    ((5, 3, 65, 67), False),    # several chunks per channel
    ((5, 3, 65, 67), True),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,cl", BN_SHAPES, ids=lambda v: str(v))
def test_batch_norm_training_and_eval(dtype, shape, cl):
    c = shape[1]
    gen = torch.Generator().manual_seed(hash((shape, cl)) % 1000)
    x = rand(shape, dtype, cl, gen=gen)
    dy = rand(shape, dtype, cl, gen=gen)
    w, b = rand((c,), dtype, gen=gen), rand((c,), dtype, gen=gen)
    rm, rv = rand((c,), dtype, gen=gen), rand((c,), dtype, gen=gen).abs() + 0.5
    # two training steps (running stats carried over), then eval with them
    for step in range(2):
        *_, rm, rv = run_batch_norm(x, w, b, rm, rv, True, 0.1 * (step + 1), dy)
    run_batch_norm(x, w, b, rm, rv, False, 0.1, dy)


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("running", [False, True])
def test_batch_norm_optional_arguments(affine, running):
    x = rand((4, 6, 5, 5), torch.float32)
    dy = rand((4, 6, 5, 5), torch.float32)
    w = rand((6,), torch.float32) if affine != "none" else None
    b = rand((6,), torch.float32) if affine == "both" else None
    rm = rand((6,), torch.float32) if running else None
    rv = (rand((6,), torch.float32).abs() + 0.5) if running else None
    run_batch_norm(x, w, b, rm, rv, True, 0.1, dy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("cl", [False, True])
def test_batch_norm_mixed_precision(dtype, cl):
    """half / bfloat16 input with float weight, bias and running stats (what torch's CUDA batch
    norm accepts under autocast): output in the input dtype, weight gradients in float."""
    x = rand((4, 5, 6, 7), dtype, cl)
    dy = rand((4, 5, 6, 7), dtype, cl)
    w, b = rand((5,), torch.float32), rand((5,), torch.float32)
    rm, rv = rand((5,), torch.float32), rand((5,), torch.float32).abs() + 0.5
    y, *_ , dw, db, rm2, rv2 = run_batch_norm(x, w, b, rm, rv, True, 0.1, dy)
    assert dw.dtype == torch.float32 and db.dtype == torch.float32 and rm2.dtype == torch.float32
    run_batch_norm(x, w, b, rm2, rv2, False, 0.1, dy)
    # torch's own CUDA batch norm agrees
    rm_t, rv_t = rm.clone(), rv.clone()
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.1, eps=EPS)
    check(y, y_t.float().cpu().double(), msg="vs torch CUDA")
    check(rm2, rm_t.cpu().double(), msg="running_mean vs torch CUDA")


def test_batch_norm_output_mask_and_batch0():
    x = rand((3, 4, 5, 6), torch.float32, True)
    dy = rand((3, 4, 5, 6), torch.float32, True)
    w = rand((4,), torch.float32)
    y, mean, invstd = ops.batch_norm_forward(x, w, None, None, None, True, 0.1, EPS)
    full = ops.batch_norm_backward(dy, x, w, mean, invstd, True, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        part = ops.batch_norm_backward(dy, x, w, mean, invstd, True, mask)
        for on, p, f in zip(mask, part, full):
            if on:
                assert torch.equal(p, f)
            else:
                assert masked_empty(p)
    # batch 0: empty output, running stats untouched, zero parameter gradients
    x0 = torch.empty((0, 4, 5, 6), device=DEV)
    rm, rv = torch.zeros(4, device=DEV), torch.ones(4, device=DEV)
    y0, mean0, invstd0 = ops.batch_norm_forward(x0, w, None, rm, rv, True, 0.1, EPS)
    assert y0.shape == x0.shape
    assert torch.equal(rm, torch.zeros(4, device=DEV)) and torch.equal(rv, torch.ones(4, device=DEV))
    # statistics of no values: mean 0, variance 0 (as the CPU kernels)
    assert torch.equal(mean0.cpu(), torch.zeros(4))
    check(invstd0, torch.full((4,), 1 / math.sqrt(EPS), dtype=torch.float64), msg="empty-batch invstd")
    dx0, dw0, db0 = ops.batch_norm_backward(x0, x0, w, mean0, invstd0, True, [True, True, True])
    assert dx0.shape == x0.shape
    assert torch.equal(dw0, torch.zeros(4, device=DEV)) and torch.equal(db0, torch.zeros(4, device=DEV))


def test_batch_norm_non_contiguous_inputs():
    base = rand((4, 6, 10, 12), torch.float32)
    x = base[:, :, ::2, 1::2]               # a strided view
    dy = rand((4, 6, 5, 6), torch.float32).transpose(2, 3).contiguous().transpose(2, 3)
    rm, rv = rand((6,), torch.float32), torch.ones(6, device=DEV)
    run_batch_norm(x, rand((6,), torch.float32), rand((6,), torch.float32), rm, rv, True, 0.1, dy)
    # a non-contiguous running_mean is updated in place too
    rm_view = torch.zeros(12, device=DEV)[::2]
    ops.batch_norm_forward(x, None, None, rm_view, torch.ones(6, device=DEV), True, 0.5, EPS)
    check(rm_view, 0.5 * ref(x).mean([0, 2, 3]), msg="strided running_mean")


# ---------------------------------------------------------------------------------------------
# layer norm
# ---------------------------------------------------------------------------------------------

def run_layer_norm(x, ns, w, b, dy, atol=None, check_cpu=True):
    k = math.prod(ns)
    xr = ref(x).requires_grad_()
    wr = ref(w).requires_grad_() if w is not None else None
    br = ref(b).requires_grad_() if b is not None else None
    y_ref = F.layer_norm(xr, ns, wr, br, eps=EPS)
    wanted = [t for t in (xr, wr, br) if t is not None]
    names = [n for n, t in zip("xwb", (xr, wr, br)) if t is not None]
    g = dict(zip(names, torch.autograd.grad(y_ref, wanted, ref(dy))))
    dims = list(range(x.dim() - len(ns), x.dim()))
    mean_ref = ref(x).mean(dims)
    invstd_ref = 1 / torch.sqrt(ref(x).var(dims, unbiased=False) + EPS)
    y, mean, invstd = ops.layer_norm_forward(x, ns, w, b, EPS)
    assert mean.shape == x.shape[: x.dim() - len(ns)]
    check(y, y_ref, msg="layer_norm y", atol=atol)
    check(mean, mean_ref, msg="layer_norm mean", atol=atol)
    check(invstd, invstd_ref, msg="layer_norm invstd", atol=atol)
    rows = x.numel() // k
    dx, dw, db = ops.layer_norm_backward(dy, x, ns, mean, invstd, w, [True, w is not None, b is not None])
    check(dx, g["x"], msg="layer_norm grad_input", atol=atol)
    if w is not None:
        check(dw, g["w"], reduction=rows, msg="layer_norm grad_weight",
              atol=None if atol is None else atol * math.sqrt(rows))
    if b is not None:
        check(db, g["b"], reduction=rows, msg="layer_norm grad_bias")
    if check_cpu and x.dtype in (torch.float32, torch.float64) and has_cpu_kernel("layer_norm_forward"):
        cpu = ops.layer_norm_forward(x.cpu(), ns, None if w is None else w.cpu(), None if b is None else b.cpu(), EPS)
        for a, c, name in zip((y, mean, invstd), cpu, ("y", "mean", "invstd")):
            check(a, c, msg=f"layer_norm CUDA vs CPU {name}", atol=atol)
    return y, mean, invstd, dx, dw, db


LN_SHAPES = [((4, 8), [8]), ((3, 5, 7), [5, 7]), ((2, 3, 33), [33]), ((7, 1000), [1000]), ((2, 20000), [20000]),
             ((1, 3, 4, 5), [3, 4, 5]), ((300, 64), [64]), ((5, 3), [3])]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,ns", LN_SHAPES, ids=lambda v: str(v))
def test_layer_norm(dtype, shape, ns):
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    run_layer_norm(rand(shape, dtype, gen=gen), ns, rand(ns, dtype, gen=gen), rand(ns, dtype, gen=gen),
                   rand(shape, dtype, gen=gen))


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_layer_norm_affine_variants(affine):
    x, dy = rand((6, 4, 9), torch.float32), rand((6, 4, 9), torch.float32)
    w = rand((4, 9), torch.float32) if affine != "none" else None
    b = rand((4, 9), torch.float32) if affine == "both" else None
    run_layer_norm(x, [4, 9], w, b, dy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_layer_norm_mixed_precision(dtype):
    x, dy = rand((5, 48), dtype), rand((5, 48), dtype)
    *_, dw, db = run_layer_norm(x, [48], rand((48,), torch.float32), rand((48,), torch.float32), dy)
    assert dw.dtype == torch.float32 and db.dtype == torch.float32


def test_layer_norm_rows_0_and_non_contiguous():
    x = torch.empty((0, 4), device=DEV)
    w = rand((4,), torch.float32)
    y, mean, invstd = ops.layer_norm_forward(x, [4], w, None, EPS)
    assert y.shape == (0, 4) and mean.shape == (0,)
    dx, dw, db = ops.layer_norm_backward(x, x, [4], mean, invstd, w, [True, True, True])
    assert dx.shape == (0, 4)
    assert torch.equal(dw, torch.zeros(4, device=DEV)) and torch.equal(db, torch.zeros(4, device=DEV))
    x = rand((9, 12), torch.float32).t()
    run_layer_norm(x, [9], rand((9,), torch.float32), None, rand((12, 9), torch.float32))


# ---------------------------------------------------------------------------------------------
# group norm (instance norm = group norm with G = C)
# ---------------------------------------------------------------------------------------------

def run_group_norm(x, groups, w, b, dy, atol=None, check_cpu=True):
    n, c = x.shape[:2]
    xr = ref(x).requires_grad_()
    wr = ref(w).requires_grad_() if w is not None else None
    br = ref(b).requires_grad_() if b is not None else None
    y_ref = F.group_norm(xr, groups, wr, br, eps=EPS)
    wanted = [t for t in (xr, wr, br) if t is not None]
    names = [k for k, t in zip("xwb", (xr, wr, br)) if t is not None]
    g = dict(zip(names, torch.autograd.grad(y_ref, wanted, ref(dy))))
    xg = ref(x).reshape(n, groups, -1)
    mean_ref, invstd_ref = xg.mean(-1), 1 / torch.sqrt(xg.var(-1, unbiased=False) + EPS)
    y, mean, invstd = ops.group_norm_forward(x, w, b, groups, EPS)
    assert_same_format(y, x)
    check(y, y_ref, msg="group_norm y", atol=atol)
    check(mean, mean_ref, msg="group_norm mean", atol=atol)
    check(invstd, invstd_ref, msg="group_norm invstd", atol=atol)
    dx, dw, db = ops.group_norm_backward(dy, x, mean, invstd, w, groups, [True, w is not None, b is not None])
    check(dx, g["x"], msg="group_norm grad_input", atol=atol)
    assert_same_format(dx, x)
    m = x.numel() // c
    if w is not None:
        check(dw, g["w"], reduction=m, msg="group_norm grad_weight", atol=None if atol is None else atol * math.sqrt(m))
    if b is not None:
        check(db, g["b"], reduction=m, msg="group_norm grad_bias")
    if check_cpu and x.dtype in (torch.float32, torch.float64) and has_cpu_kernel("group_norm_forward"):
        cpu = ops.group_norm_forward(x.cpu(), None if w is None else w.cpu(), None if b is None else b.cpu(),
                                     groups, EPS)
        for a, cc, name in zip((y, mean, invstd), cpu, ("y", "mean", "invstd")):
            check(a, cc, msg=f"group_norm CUDA vs CPU {name}", atol=atol)
    return y, mean, invstd, dx, dw, db


# Every statistic covers at least 3 values: with 1 or 2, grad_input is exactly 0 in exact
# arithmetic (x_hat = +-1 spans the whole space) and what remains is rounding times invstd.
GN_SHAPES = [  # shape, groups, channels_last
    ((2, 6, 5), 3, False),
    ((2, 6, 4, 5), 2, False),
    ((2, 6, 4, 5), 2, True),
    ((3, 8, 3, 3), 8, False),      # instance norm
    ((3, 8, 3, 3), 8, True),
    ((1, 64, 9, 9), 32, True),
    ((2, 4, 90, 80), 1, False),    # one group: long reductions, several chunks
    ((2, 4, 90, 80), 4, True),
    ((2, 6, 2, 3, 4), 3, True),
    ((4, 70, 2, 3), 35, True),
    ((5, 6), 2, False),            # no spatial dims
    ((1, 6, 1, 1), 2, True),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,groups,cl", GN_SHAPES, ids=lambda v: str(v))
def test_group_norm(dtype, shape, groups, cl):
    c = shape[1]
    gen = torch.Generator().manual_seed(groups * 1000 + c)
    run_group_norm(rand(shape, dtype, cl, gen=gen), groups, rand((c,), dtype, gen=gen), rand((c,), dtype, gen=gen),
                   rand(shape, dtype, cl, gen=gen))


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("cl", [False, True])
def test_group_norm_affine_variants(affine, cl):
    x, dy = rand((3, 6, 5, 4), torch.float32, cl), rand((3, 6, 5, 4), torch.float32, cl)
    w = rand((6,), torch.float32) if affine != "none" else None
    b = rand((6,), torch.float32) if affine == "both" else None
    run_group_norm(x, 3, w, b, dy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("cl", [False, True])
def test_group_norm_mixed_precision(dtype, cl):
    x, dy = rand((2, 8, 5, 6), dtype, cl), rand((2, 8, 5, 6), dtype, cl)
    *_, dw, db = run_group_norm(x, 4, rand((8,), torch.float32), rand((8,), torch.float32), dy)
    assert dw.dtype == torch.float32 and db.dtype == torch.float32


def test_group_norm_batch0():
    x = torch.empty((0, 4, 3, 3), device=DEV)
    w = rand((4,), torch.float32)
    y, mean, invstd = ops.group_norm_forward(x, w, None, 2, EPS)
    assert y.shape == x.shape and mean.shape == (0, 2)
    dx, dw, db = ops.group_norm_backward(x, x, mean, invstd, w, 2, [True, True, True])
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(4, device=DEV)) and torch.equal(db, torch.zeros(4, device=DEV))


# ---------------------------------------------------------------------------------------------
# inputs with a large mean, determinism, bad arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("cl", [False, True])
def test_large_mean(dtype, cl):
    """Values 1e4 + N(0, 1): E[x^2] - E[x]^2 would cancel to garbage in float32 (1e8 * 6e-8 ~ 6,
    more than the variance). Welford keeps the statistics exact up to the rounding of the mean
    itself, whose absolute error is a few ulps of 1e4 (float32: ulp = 2^-10); outputs are held to
    32 ulps of the mean, well below the O(1) error of the naive formula. (The CPU kernels are
    held to torch by their own tests; no CUDA-vs-CPU comparison here.)"""
    atol = 32 * torch.finfo(dtype).eps * 1e4
    shape = (8, 6, 20, 21)
    gen = torch.Generator().manual_seed(7)
    x, dy = rand(shape, dtype, cl, offset=1e4, gen=gen), rand(shape, dtype, cl, gen=gen)
    w, b = rand((6,), dtype, gen=gen), rand((6,), dtype, gen=gen)
    run_batch_norm(x, w, b, torch.full((6,), 1e4, dtype=dtype, device=DEV), torch.ones(6, dtype=dtype, device=DEV),
                   True, 0.1, dy, atol=atol, check_cpu=False)
    run_group_norm(x, 3, w, b, dy, atol=atol, check_cpu=False)
    run_group_norm(x, 6, w, b, dy, atol=atol, check_cpu=False)
    x2, dy2 = x.reshape(48, 420), dy.reshape(48, 420)
    run_layer_norm(x2.contiguous(), [420], rand((420,), dtype, gen=gen), rand((420,), dtype, gen=gen),
                   dy2.contiguous(), atol=atol, check_cpu=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("cl", [False, True])
def test_bitwise_deterministic(dtype, cl):
    """Two runs give identical bits: fixed chunking and merge trees, no atomics."""
    shape = (8, 64, 28, 28)
    x, dy = rand(shape, dtype, cl), rand(shape, dtype, cl)
    w, b = rand((64,), dtype), rand((64,), dtype)

    def once():
        rm, rv = torch.zeros(64, dtype=dtype, device=DEV), torch.ones(64, dtype=dtype, device=DEV)
        out = list(ops.batch_norm_forward(x, w, b, rm, rv, True, 0.1, EPS)) + [rm, rv]
        out += ops.batch_norm_backward(dy, x, w, out[1], out[2], True, [True, True, True])
        g = list(ops.group_norm_forward(x, w, b, 32, EPS))
        out += g + list(ops.group_norm_backward(dy, x, g[1], g[2], w, 32, [True, True, True]))
        x2, dy2 = x.reshape(8 * 64, 784).contiguous(), dy.reshape(8 * 64, 784).contiguous()
        w2, b2 = rand((784,), dtype), rand((784,), dtype)
        ln = list(ops.layer_norm_forward(x2, [784], w2, b2, EPS))
        out += ln + list(ops.layer_norm_backward(dy2, x2, [784], ln[1], ln[2], w2, [True, True, True]))
        return out

    torch.manual_seed(0)
    first = once()
    torch.manual_seed(0)
    second = once()
    for i, (a, c) in enumerate(zip(first, second)):
        assert torch.equal(a, c), f"output {i} differs between runs"


def test_bad_arguments_raise():
    x = rand((2, 6, 3, 3), torch.float32)
    with pytest.raises(RuntimeError, match="weight"):
        ops.batch_norm_forward(x, rand((5,), torch.float32), None, None, None, True, 0.1, EPS)
    with pytest.raises(RuntimeError, match="running"):
        ops.batch_norm_forward(x, None, None, None, None, False, 0.1, EPS)
    with pytest.raises(RuntimeError, match="divisible"):
        ops.group_norm_forward(x, None, None, 4, EPS)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        ops.layer_norm_forward(x, [4], None, None, EPS)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.layer_norm_forward(x, [3], rand((3,), torch.float64), None, EPS)
    y, mean, invstd = ops.group_norm_forward(x, None, None, 3, EPS)
    with pytest.raises(RuntimeError, match="mean"):
        ops.group_norm_backward(x, x, mean[:1], invstd, None, 3, [True, True, True])
