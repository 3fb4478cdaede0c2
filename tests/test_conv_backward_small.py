"""grad_input of stride-1 NCHW convolutions with few output columns (batch * H * W of at most two
GEMM column blocks: small maps, batch 1), which reads the rotated weight in place as the GEMM's A
instead of rotating and packing it (csrc/cpu/conv.cpp, conv_backward_input_small; gemm.h,
gemm_shifted_ab), and the weight gradient's single-partial reduction (conv_cpu.h,
reduce_weight_gradient). Odd channel counts give the partly filled last panel of rows; batches
whose column blocks span samples go through the output tile. Every expected value comes from
torch."""

import pytest
import torch
from conftest import check_conv_against_torch, conv_tensors, dtype_id, run_with_cpu_isa

import cnnops.functional as CF

DTYPES = [torch.float32, torch.float64]

CASES = {  # dims, n, cin, cout, spatial, kernel, padding, dilation, groups
    "1x1_7x7_b1": (2, 1, 64, 256, 7, 1, 0, 1, 1),
    "1x1_odd_channels": (2, 1, 45, 77, 7, 1, 0, 1, 1),
    "3x3_7x7_b1": (2, 1, 40, 48, 7, 3, 1, 1, 1),
    "3x3_odd_channels": (2, 1, 13, 11, 5, 3, 1, 1, 1),
    "3x3_no_padding": (2, 1, 16, 24, 9, 3, 0, 1, 1),
    "3x3_padding2": (2, 1, 16, 24, 6, 3, 2, 1, 1),
    "3x3_dilation2": (2, 1, 16, 8, 9, 3, 2, 2, 1),
    "5x5_rect_map": (2, 1, 8, 16, (5, 11), 5, 2, 1, 1),
    "groups": (2, 1, 24, 36, 7, 3, 1, 1, 3),
    "groups_odd": (2, 1, 10, 74, 4, 3, 1, 1, 2),
    "samples_span_blocks": (2, 3, 24, 40, 7, 3, 1, 1, 1),  # 49-column samples in 64-column blocks
    "two_blocks": (2, 8, 32, 48, 7, 3, 1, 1, 1),  # 392 columns: two blocks of 224
    "batch2_odd": (2, 2, 9, 41, 5, 3, 1, 1, 1),
    "conv1d": (1, 2, 12, 20, 17, 3, 1, 1, 1),
    "conv3d": (3, 1, 6, 10, 4, 3, 1, 1, 1),
    "batch0": (2, 0, 8, 16, 7, 3, 1, 1, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(CASES))
def test_small_grad_input(name, dtype):
    dims, n, cin, cout, spatial, kernel, padding, dilation, groups = CASES[name]
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, True, dtype)
    for t in (x, w, b):
        t.requires_grad_(True)
    check_conv_against_torch(dims, x, w, b, {"padding": padding, "dilation": dilation, "groups": groups}, dtype,
                             msg=name)


@pytest.mark.parametrize("name", ["3x3_odd_channels", "groups_odd", "samples_span_blocks", "conv3d"])
def test_small_gradcheck(name):
    dims, n, cin, cout, spatial, kernel, padding, dilation, groups = CASES[name]
    n = max(n, 1)
    cin, cout = min(cin, 4 * groups), min(cout, 6 * groups)  # float64 gradcheck: keep it small
    x, w, b = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, True, torch.float64)
    kwargs = {"padding": padding, "dilation": dilation, "groups": groups}
    conv = getattr(CF, f"conv{dims}d")
    inputs = tuple(t.detach().requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: conv(x, w, b, **kwargs), inputs)


@pytest.mark.parametrize("name", ["two_blocks", "groups", "1x1_odd_channels"])
def test_small_result_does_not_depend_on_the_thread_count(name):
    """The rows are split by the thread count; every sum runs whole on one thread."""
    dims, n, cin, cout, spatial, kernel, padding, dilation, groups = CASES[name]
    x, w, _ = conv_tensors(dims, n, cin, cout, spatial, kernel, groups, False, torch.float32)
    kwargs = {"padding": padding, "dilation": dilation, "groups": groups}
    y_shape = CF.conv2d(x, w, **kwargs).shape
    grad_out = torch.randn(y_shape, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(torch.ops.cnnops.conv_backward(grad_out, x, w, [1, 1], [padding] * 2, [dilation] * 2,
                                                          groups, [True, True, False]))
    finally:
        torch.set_num_threads(threads)
    for dx, dw, _ in results[1:]:
        assert torch.equal(dx, results[0][0]) and torch.equal(dw, results[0][1])


ISA_CHECK = """
import torch, torch.nn.functional as F
import cnnops
print(torch.ops.cnnops.cpu_gemm_isa())
for n, cin, cout, hw, k, p, g in ((1, 13, 11, 5, 3, 1, 1), (1, 45, 77, 7, 1, 0, 1), (3, 24, 40, 7, 3, 1, 1),
                                  (1, 10, 74, 4, 3, 1, 2)):
    for dtype in (torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, cin, hw, hw, generator=gen, dtype=dtype)
        w = torch.randn(cout, cin // g, k, k, generator=gen, dtype=dtype)
        go = torch.randn(n, cout, hw, hw, generator=gen, dtype=dtype)
        got = torch.ops.cnnops.conv_backward(go, x, w, [1, 1], [p, p], [1, 1], g, [True, True, False])
        ref = torch.ops.aten.convolution_backward(go.double(), x.double(), w.double(), None, [1, 1], [p, p],
                                                  [1, 1], False, [0, 0], g, [True, True, False])
        for a, e in zip(got[:2], ref[:2]):
            err = ((a.double() - e).abs().max() / e.abs().max()).item()
            assert err < (1e-5 if dtype == torch.float32 else 1e-12), (n, cin, cout, hw, k, g, dtype, err)
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_each_isa_matches_torch(isa):
    """The micro-kernel with A and B read in place, and the packed edge panel, per ISA (8, 3 and 2
    rows per panel)."""
    result = run_with_cpu_isa(isa, ISA_CHECK, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa
