"""Every GEMM micro-kernel (AVX-512, AVX2, portable) against torch, not only the one this CPU
picks: CNNOPS_CPU_ISA caps the choice, in a subprocess since the choice is made once."""

import pytest
from conftest import run_with_cpu_isa

CHECK = r"""
import itertools, sys, torch, torch.nn.functional as F
import cnnops
print(torch.ops.cnnops.cpu_gemm_isa())
torch.manual_seed(0)
cases = [  # (dims, N, C_in, C_out, size, kernel, stride, padding, dilation, groups)
    (2, 2, 5, 7, (11, 9), 3, 1, 1, 1, 1),     # shifted-window path, odd sizes
    (2, 3, 6, 26, (7, 7), 3, 2, 1, 1, 2),     # im2col packing, strided, grouped, M % MR != 0
    (2, 8, 4, 8, (8, 8), 3, 1, 1, 1, 1),      # im2col packing of whole 8-wide rows (small images)
    (2, 2, 40, 30, (6, 5), 1, 1, 0, 1, 1),    # pointwise
    (1, 2, 4, 6, (17,), 5, 1, 4, 2, 1),       # 1d, dilation, grad_input through col2im
    (3, 1, 3, 5, (4, 5, 6), 2, 1, 0, 1, 1),   # 3d, even kernel
]
layouts = {2: torch.channels_last, 3: torch.channels_last_3d}
for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
    for (dims, n, ci, co, size, k, s, p, d, g), channels_last in itertools.product(cases, (False, True)):
        if channels_last and dims == 1:
            continue
        x = torch.randn(n, ci, *size, dtype=dtype)
        if channels_last:  # the NHWC kernels, with this micro-kernel's panel height
            x = x.to(memory_format=layouts[dims])
        x.requires_grad_()
        w = torch.randn(co, ci // g, *([k] * dims), dtype=dtype, requires_grad=True)
        b = torch.randn(co, dtype=dtype, requires_grad=True)
        ref_fn = getattr(F, f"conv{dims}d")
        ours_fn = getattr(cnnops.functional, f"conv{dims}d")
        ref, ours = ref_fn(x, w, b, s, p, d, g), ours_fn(x, w, b, s, p, d, g)
        go = torch.randn_like(ref)
        grads_ref = torch.autograd.grad(ref, (x, w, b), go)
        grads_ours = torch.autograd.grad(ours, (x, w, b), go)
        for name, a, e in zip(("out", "dx", "dw", "db"), (ours,) + grads_ours, (ref,) + grads_ref):
            err = ((a - e).abs().max() / e.abs().max().clamp_min(1)).item()
            if not err < tol:
                sys.exit(f"{dtype} {(dims, n, ci, co, size, k, s, p, d, g)} channels_last={channels_last} "
                         f"{name}: relative error {err}")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_micro_kernel_matches_torch(isa):
    result = run_with_cpu_isa(isa, CHECK, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa  # the requested micro-kernel really ran
