"""NCHW <-> NHWC conversion (csrc/cpu/layout.cpp's contiguous_as), which channels-last inputs the
NCHW kernels serve go through: small maps (at most 64 positions a sample, or 256 in all) and 3-d
layers of at most 16 channels (conv.cpp's kernel_memory_format and nhwc_serves_3d). A 1x1
convolution with the identity weight is exact (each output sums x * 1 and zeros), so its output
and input gradient must equal x and the upstream gradient bit for bit: any misplaced value of
either conversion shows. Its forward reads channels-last in place (a 1x1 forward stays
channels-last on small maps too); its grad input converts dY to NCHW and dX back. Shapes go
around the transpose's vector blocks (16 floats or 8 doubles on
AVX-512, less on AVX2 and portable), both in channels and in positions, with every ISA's kernel."""

import math

import pytest
import torch

import cnnops.functional
from cnnops import _C
from conftest import run_with_cpu_isa

# (channels, spatial): channel and position counts below, at and around the vector widths.
CASES = [(c, s) for c in (1, 3, 8, 15, 16, 17, 33) for s in ((1, 1), (3, 5), (4, 4), (1, 17), (5, 7), (8, 8))]
CASES_3D = [(c, s) for c in (3, 16, 17) for s in ((2, 3, 3), (4, 4, 4), (3, 5, 7))]


def identity_conv_roundtrip(channels, spatial, batch, dtype):
    dims = len(spatial)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = torch.randn(batch, channels, *spatial, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    w = torch.eye(channels, dtype=dtype).reshape(channels, channels, *([1] * dims))
    conv = cnnops.functional.conv2d if dims == 2 else cnnops.functional.conv3d
    y = conv(x, w)
    assert y.is_contiguous(memory_format=fmt)
    assert torch.equal(y, x)
    go = torch.randn_like(y).contiguous(memory_format=fmt)
    before = _C._cpu_nhwc_kernel_calls()
    (dx,) = torch.autograd.grad(y, (x,), go)
    # (1-4 channels: the first-layer kernel reads channels-last itself; wider 3-d layers over 256
    # positions: the NHWC kernels)
    nhwc_3d = dims == 3 and channels > 16 and batch * math.prod(spatial) > 256
    if channels > 4:
        assert (_C._cpu_nhwc_kernel_calls() > before) == nhwc_3d  # converted to NCHW unless nhwc_3d
    assert torch.equal(dx, go)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels,spatial", CASES + CASES_3D, ids=str)
def test_identity_conv_converts_exactly(channels, spatial, batch, dtype):
    identity_conv_roundtrip(channels, spatial, batch, dtype)


ISA_CHECK = r"""
import torch
import cnnops
from test_layout import CASES, CASES_3D, identity_conv_roundtrip
print(torch.ops.cnnops.cpu_gemm_isa())
for dtype in (torch.float32, torch.float64):
    for channels, spatial in CASES + CASES_3D:
        identity_conv_roundtrip(channels, spatial, 2, dtype)
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_every_isa(isa):
    result = run_with_cpu_isa(isa, "import sys; sys.path.insert(0, 'tests')\n" + ISA_CHECK, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("shape,kernel", [((8, 16, 7, 7), 3), ((2, 1, 5, 5), 3), ((2, 8, 1, 1), 1), ((3, 24, 4, 6), 1),
                                          ((2, 16, 3, 4, 5), 3)], ids=str)
def test_results_survive_the_next_call(shape, kernel, dtype):
    """The kernels' copies of their operands and results before conversion live in per-thread kept
    storage (layout.h's KeptStorage); what a call returns is the caller's own: the next call, with
    other values, leaves it as it was. Channels-last inputs on small maps (converted to NCHW and
    back), shapes whose layouts coincide (1 channel, 1x1 maps), reduced precision."""
    dims = len(shape) - 2
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    conv = cnnops.functional.conv2d if dims == 2 else cnnops.functional.conv3d
    w = torch.randn(shape[1], shape[1], *([kernel] * dims), dtype=dtype)
    results = []
    for _ in range(2):
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        y = conv(x, w, padding=kernel // 2)
        (dx,) = torch.autograd.grad(y, (x,), torch.randn_like(y))
        results.append((y.detach(), dx))
        if len(results) == 1:
            saved = [t.clone() for t in results[0]]
    for got, kept in zip(results[0], saved):
        assert torch.equal(got, kept)
    assert not torch.equal(results[0][0], results[1][0])
