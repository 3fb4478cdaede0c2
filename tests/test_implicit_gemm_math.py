"""The CUDA kernels' implicit-GEMM operand addressing (csrc/common/cuda_implicit_gemm.h), run on
the CPU. The header is host+device code; here it is compiled for the host into a plain triple
loop, OUT[m, n] = sum_r A(m, r) * B(r, n) with every operand located exactly as the CUDA
kernels locate it, and compared with torch's convolution and its gradients. So the index math
that the GPU runs is checked on every CI run, with or without a GPU."""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = r"""
#include <torch/extension.h>
#include "common/conv_checks.h"
#include "common/cuda_implicit_gemm.h"

using namespace cnnops;

template <ConvGemm kind>
void run(const ConvGeometry& g, const double* a, const double* b, double* out) {
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t m = 0; m < gemm_m<kind>(g); ++m)
      for (int64_t n = 0; n < gemm_n<kind>(g); ++n) {
        const ColumnIndex<int64_t> column = column_index<kind, int64_t>(g, n);
        double sum = 0;
        for (int64_t r = 0; r < gemm_r<kind>(g); ++r) {
          const ReductionIndex<int64_t> e = reduction_index<kind, int64_t>(g, r);
          const int64_t b_offset = gemm_b_offset<kind, int64_t>(g, e, column);
          if (b_offset < 0) continue;  // zero padding, or a tap between strided outputs
          sum += a[gemm_a_group_offset<kind>(g, grp) + m * gemm_a_row_stride<kind>(g) + e.a_offset] *
                 b[gemm_b_group_offset<kind>(g, grp) + b_offset];
        }
        out[gemm_out_group_offset<kind>(g, grp) + m * gemm_out_row_stride<kind>(g) + column.out_offset] = sum;
      }
}

// pass 0: Y = conv(x, w); 1: dX from (dY, w); 2: dW from (dY, x). float64, contiguous.
at::Tensor implicit_gemm(at::Tensor x, at::Tensor w, at::Tensor dy, std::vector<int64_t> stride,
                         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                         int64_t pass) {
  const ConvGeometry g = make_conv_geometry("conv_forward()", x, w, c10::nullopt, stride, padding, dilation, groups);
  const int64_t dims = w.dim() - 2;
  if (pass == 0) {
    auto y = at::zeros(conv_output_shape(g, dims), x.options());
    run<ConvGemm::Forward>(g, w.data_ptr<double>(), x.data_ptr<double>(), y.data_ptr<double>());
    return y;
  }
  if (pass == 1) {
    auto dx = at::zeros_like(x);
    run<ConvGemm::GradInput>(g, w.data_ptr<double>(), dy.data_ptr<double>(), dx.data_ptr<double>());
    return dx;
  }
  auto dw = at::zeros_like(w);
  run<ConvGemm::GradWeight>(g, dy.data_ptr<double>(), x.data_ptr<double>(), dw.data_ptr<double>());
  return dw;
}
"""


@pytest.fixture(scope="module")
def module():
    from torch.utils.cpp_extension import load_inline

    build = tempfile.mkdtemp(prefix="cnnops_index_math_")
    return load_inline(
        name="cnnops_implicit_gemm_math",
        cpp_sources=SOURCE,
        functions=["implicit_gemm"],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O1"],
        build_directory=build,
        verbose=False,
    )


CASES = [  # dims, N, C_in, C_out, size, kernel, stride, padding, dilation, groups
    (1, 2, 3, 4, (11,), (3,), (1,), (1,), (1,), 1),
    (1, 1, 4, 6, (13,), (4,), (3,), (2,), (2,), 2),
    (2, 2, 3, 5, (7, 6), (3, 2), (1, 1), (1, 0), (1, 1), 1),
    (2, 2, 4, 4, (9, 8), (3, 3), (2, 3), (1, 2), (1, 1), 4),     # depthwise, strided
    (2, 1, 6, 4, (8, 9), (2, 3), (2, 1), (0, 1), (2, 1), 2),     # even kernel, dilation
    (2, 3, 2, 3, (5, 5), (1, 1), (2, 2), (0, 0), (1, 1), 1),     # pointwise, strided
    (3, 1, 2, 4, (4, 5, 6), (2, 3, 2), (1, 2, 1), (1, 1, 0), (1, 1, 2), 2),
    (3, 2, 2, 2, (3, 4, 5), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-k{c[5]}-s{c[6]}-p{c[7]}-d{c[8]}-g{c[9]}")
def test_implicit_gemm_index_math_matches_torch(module, case):
    dims, n, ci, co, size, k, s, p, d, g = case
    torch.manual_seed(0)
    x = torch.randn(n, ci, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(co, ci // g, *k, dtype=torch.float64, requires_grad=True)
    conv = getattr(F, f"conv{dims}d")
    y = conv(x, w, None, s, p, d, g)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    args = (list(s), list(p), list(d), g)
    xd, wd = x.detach(), w.detach()
    torch.testing.assert_close(module.implicit_gemm(xd, wd, dy, *args, 0), y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.implicit_gemm(xd, wd, dy, *args, 1), dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.implicit_gemm(xd, wd, dy, *args, 2), dw, rtol=1e-12, atol=1e-12)
