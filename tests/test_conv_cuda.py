"""CUDA convolution: against torch (reference computed on the CPU in a wider dtype, so cuDNN
TF32 never leaks into it) and against the cnnops CPU kernels, forward and gradients, for
float32/float64/float16/bfloat16. Skipped unless a GPU is visible and cnnops has CUDA kernels."""

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional
from conftest import (
    CHANNELS_LAST,
    CUDA_DTYPES,
    assert_close_to_torch,
    assert_compiled_matches_eager,
    check_conv_against_torch,
    conv_fn,
    conv_tensors,
    dtype_id,
    make_tensor,
    reductions,
    run_conv,
)
from test_conv import LARGE, grid_args

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
DIMS = [1, 2, 3]


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 precision unless a test opts into TF32 (cuDNN's default is TF32 on)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def check_vs_torch(dims, x, w, b, kwargs, dtype, **kw):
    return check_conv_against_torch(dims, x, w, b, kwargs, dtype, reference_device="cpu", **kw)


CUDA_GRID = ["basic", "stride2_pad1", "stride_gt_kernel_dil", "pad_tuple", "dilation_tuple", "same_even",
             "same_mixed", "valid", "groups2", "groups3_nobias", "depthwise", "depthwise_x2",
             "depthwise_x3_stride", "odd_sizes", "kernel_eq_input", "pointwise", "batch0", "batch1", "unbatched"]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", CUDA_GRID)
@pytest.mark.parametrize("dims", DIMS)
def test_cuda_grid_vs_torch(dims, name, dtype):
    cfg, spatial, kernel, kwargs = grid_args(dims, name)
    x, w, b = conv_tensors(dims, cfg["n"], cfg["cin"], cfg["cout"], spatial, kernel, cfg["groups"], cfg["bias"],
                           dtype, device=DEVICE, unbatched=cfg["unbatched"])
    out, _ = check_vs_torch(dims, x, w, b, kwargs, dtype, msg=name)
    assert out.device.type == torch.device(DEVICE).type


def cpu_supports(dtype):
    from conftest import CPU_DTYPES
    return dtype in CPU_DTYPES


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", ["basic", "stride_gt_kernel_dil", "same_mixed", "groups2", "depthwise_x3_stride",
                                  "odd_sizes"])
@pytest.mark.parametrize("dims", DIMS)
def test_cuda_vs_cnnops_cpu(dims, name, dtype):
    """The CUDA kernels agree with the (torch-checked) cnnops CPU kernels on the same inputs."""
    if not cpu_supports(dtype):
        pytest.skip(f"no CPU {dtype}")
    cfg, spatial, kernel, kwargs = grid_args(dims, name)
    x, w, b = conv_tensors(dims, cfg["n"], cfg["cin"], cfg["cout"], spatial, kernel, cfg["groups"], cfg["bias"],
                           dtype)
    go_shape = conv_fn(F, dims)(x.float(), w.float(), None if b is None else b.float(), **kwargs).shape
    go = make_tensor(go_shape, dtype)
    fn = conv_fn(cnnops.functional, dims)
    cpu_out, cpu_grads = run_conv(fn, x, w, b, go, kwargs)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    gpu_out, gpu_grads = run_conv(fn, dev(x), dev(w), dev(b), dev(go), kwargs)
    red = reductions(x.shape, w.shape, go_shape, kwargs["groups"])
    assert_close_to_torch(gpu_out.cpu(), cpu_out, dtype, red["output"], msg="output vs cnnops CPU")
    for k, v in cpu_grads.items():
        assert_close_to_torch(gpu_grads[k].cpu(), v, dtype, red[f"grad_{k}"], msg=f"grad_{k} vs cnnops CPU")


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mult", [1, 2, 3])
@pytest.mark.parametrize("dims", DIMS)
def test_cuda_depthwise(dims, mult, dtype):
    c = 16
    spatial = {1: (37,), 2: (19, 23), 3: (7, 9, 6)}[dims]
    for kernel, kwargs in ((3, dict(padding=1)), (5, dict(stride=2, padding=2)), (4, dict(padding="same", dilation=2))):
        x, w, b = conv_tensors(dims, 2, c, c * mult, spatial, kernel, c, True, dtype, device=DEVICE)
        check_vs_torch(dims, x, w, b, dict(kwargs, groups=c), dtype, msg=f"depthwise k{kernel}")


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("dims", [2, 3])
def test_cuda_channels_last(dims, groups, dtype):
    spatial = (13, 11) if dims == 2 else (5, 7, 6)
    x, w, b = conv_tensors(dims, 2, 8, 16, spatial, 3, groups, True, dtype, layout="channels_last", device=DEVICE)
    assert x.is_contiguous(memory_format=CHANNELS_LAST[dims + 2]) and not x.is_contiguous()
    check_vs_torch(dims, x, w, b, dict(padding=1, stride=(1, 2, 1)[:dims], groups=groups), dtype,
                   check_channels_last=True)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dims", DIMS)
def test_cuda_non_contiguous(dims, layout):
    spatial = {1: (21,), 2: (9, 8), 3: (5, 6, 4)}[dims]
    x, w, b = conv_tensors(dims, 2, 6, 4, spatial, 3, 2, True, torch.float32, layout=layout, device=DEVICE)
    check_vs_torch(dims, x, w, b, dict(padding=1, groups=2), torch.float32, grad_layout=layout)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(LARGE))
def test_cuda_large(name, dtype):
    dims, n, cin, cout, spatial, kernel, groups, kwargs = LARGE[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, True, dtype, device=DEVICE)
    check_vs_torch(dims, x, w, b, dict(kwargs, groups=groups), dtype, msg=name)


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["tf32_off", "tf32_on"])
@pytest.mark.parametrize("name", ["resnet3x3_64to96", "pointwise_64to256", "odd_K171_Cout37_29x23"])
def test_cuda_tf32(name, allow_tf32):
    """With TF32 disabled, cnnops float32 must be full precision; with it enabled (cuDNN's
    default) a TF32-level tolerance applies. Reference: torch float64 on the CPU."""
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    dims, n, cin, cout, spatial, kernel, groups, kwargs = LARGE[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, True, torch.float32, device=DEVICE)
    check_vs_torch(dims, x, w, b, dict(kwargs, groups=groups), torch.float32, tf32=allow_tf32, msg=name)


def test_cuda_matches_torch_cuda_under_tf32():
    """Same comparison against torch's own CUDA conv with TF32 on: both within TF32 error."""
    torch.backends.cudnn.allow_tf32 = True
    x, w, b = conv_tensors(2, 2, 64, 96, (28, 28), 3, 1, True, torch.float32, device=DEVICE)
    expected = F.conv2d(x, w, b, padding=1)
    actual = cnnops.functional.conv2d(x, w, b, padding=1)
    # two TF32 results: allow twice the TF32 budget
    atol = 2 * 1e-3 * (64 * 9) ** 0.5
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_cuda_deterministic(dtype):
    x, w, b = conv_tensors(2, 4, 32, 64, (30, 29), 3, 2, True, dtype, device=DEVICE)
    go = make_tensor((4, 64, 15, 15), dtype, device=DEVICE)
    kw = dict(stride=2, padding=1, groups=2)
    (o1, g1), (o2, g2) = (run_conv(cnnops.functional.conv2d, x, w, b, go, kw) for _ in range(2))
    assert torch.equal(o1, o2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"grad_{k} differs between two identical backward runs"


def test_cuda_use_deterministic_algorithms():
    """With torch.use_deterministic_algorithms(True) backward either runs (and is reproducible)
    or raises torch's 'not deterministic' RuntimeError (alertNotDeterministic)."""
    x, w, b = conv_tensors(2, 2, 8, 16, (14, 14), 3, 1, True, torch.float32, device=DEVICE)
    go = make_tensor((2, 16, 14, 14), torch.float32, device=DEVICE)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        try:
            r1 = run_conv(cnnops.functional.conv2d, x, w, b, go, dict(padding=1))
        except RuntimeError as e:
            assert "determinis" in str(e).lower(), str(e)
            return
        r2 = run_conv(cnnops.functional.conv2d, x, w, b, go, dict(padding=1))
        for k in r1[1]:
            assert torch.equal(r1[1][k], r2[1][k])
    finally:
        torch.use_deterministic_algorithms(old)


def test_cuda_side_stream():
    """Kernels run on the current stream (not the legacy default stream)."""
    x, w, b = conv_tensors(2, 4, 16, 32, (40, 40), 3, 1, True, torch.float32, device=DEVICE)
    expected = F.conv2d(x.cpu().double(), w.cpu().double(), b.cpu().double(), padding=1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            y = cnnops.functional.conv2d(x, w, b, padding=1)
            y2 = y * 1.0  # consumer on the same stream
    s.synchronize()
    assert_close_to_torch(y2.cpu(), expected, torch.float32, 16 * 9)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device():
    x, w, b = conv_tensors(2, 2, 4, 6, (9, 9), 3, 1, True, torch.float32, device="cuda:1")
    check_vs_torch(2, x, w, b, dict(padding=1), torch.float32)


def test_cuda_device_mismatch_rejected_like_torch():
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    w = torch.randn(6, 4, 3, 3)
    try:
        F.conv2d(x, w)
    except Exception as e:  # noqa: BLE001
        expected = type(e)
    else:
        pytest.fail("torch accepted mixed devices")
    with pytest.raises(Exception) as info:
        cnnops.functional.conv2d(x, w)
    assert type(info.value) is expected
    with pytest.raises(RuntimeError):
        torch.ops.cnnops.conv_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError):
        torch.ops.cnnops.conv_forward(x, w.to(DEVICE), torch.randn(6), [1, 1], [0, 0], [1, 1], 1)


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False]], ids=str)
def test_cuda_opcheck(mask):
    x, w, b = conv_tensors(2, 2, 4, 6, (7, 6), 3, 2, True, torch.float32, device=DEVICE)
    args = (x, w, b, [1, 2], [1, 0], [2, 1], 2)
    torch.library.opcheck(torch.ops.cnnops.conv_forward.default, args)
    out = torch.ops.cnnops.conv_forward(*args)
    torch.library.opcheck(torch.ops.cnnops.conv_backward.default,
                          (torch.randn_like(out), x, w, [1, 2], [1, 0], [2, 1], 2, mask))


def test_cuda_compile_aot_eager():
    x, w, b = conv_tensors(2, 2, 3, 4, (8, 7), 3, 1, True, torch.float32, device=DEVICE)

    def f(x, w, b):
        return torch.relu(cnnops.functional.conv2d(x, w, b, padding=1))

    assert_compiled_matches_eager(f, (x, w, b), "aot_eager")


@pytest.mark.slow
def test_cuda_large_index():
    """More than 2^31 elements in input and output (int64 index path)."""
    free, _ = torch.cuda.mem_get_info()
    n_elem = 2 ** 31 + 4099
    if free < 1.3 * (3 * 2 * n_elem):  # fp16 input (1 channel) + output (2 channels)
        pytest.skip("not enough GPU memory")
    x = torch.randn(1, 1, n_elem, device=DEVICE, dtype=torch.float16)
    w = torch.randn(2, 1, 3, device=DEVICE, dtype=torch.float16)
    out = cnnops.functional.conv1d(x, w, None, padding=1)
    assert out.shape == (1, 2, n_elem)

    def window_reference(lo, hi):  # output[lo:hi] of the padding=1 conv, in float32 by torch
        a, z = lo - 1, hi + 1
        seg = x[..., max(a, 0):min(z, n_elem)].float()
        seg = F.pad(seg, (max(0, -a), max(0, z - n_elem)))
        return F.conv1d(seg, w.float())

    for lo, hi in ((0, 4096), (2 ** 31 - 2048, 2 ** 31 + 2048), (n_elem - 8192, n_elem)):
        assert_close_to_torch(out[..., lo:hi], window_reference(lo, hi), torch.float16, 3, msg=f"[{lo}:{hi}]")
    out = x = None  # free the 12 GB before the next test (x is the closure's)
    torch.cuda.empty_cache()
