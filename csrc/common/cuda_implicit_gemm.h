#pragma once
// Operand coordinates of the implicit-GEMM convolution kernels (csrc/cuda/conv.cu). Host+device,
// so the index math can be checked on the CPU against an explicit im2col.
//
// Each convolution pass is, per group, one GEMM  OUT[M, N] = A[M, R] x B[R, N]  whose B operand
// is never materialized (that is what "implicit" means):
//
//   pass        A (rows x reduction)      B (reduction x columns)               OUT
//   Forward     W_g  [Cout_g, Cin_g*k]    im2col(X)     [Cin_g*k, batch*Lout]   Y  [Cout_g, batch*Lout]
//   GradInput   W_g^T[Cin_g, Cout_g*k]    col(dY)       [Cout_g*k, batch*Lin]   dX [Cin_g, batch*Lin]
//   GradWeight  dY_g [Cout_g, batch*Lout] im2col(X)^T   [batch*Lout, Cin_g*k]   dW [Cout_g, Cin_g*k]
//
// (k = kernel volume, L = spatial size.) In all three a B element reads one tensor element whose
// spatial coordinate is the SUM of a part owned by the reduction index r and a part owned by the
// column n; e.g. forward: input coord = (o*stride - pad) [column] + (tap*dilation) [reduction].
// The kernels decompose r once per shared-memory K-slice and n once per thread, so the inner
// loop is additions and a bounds test.
#include <cstdint>
#include <type_traits>

#include "conv_shape.h"

namespace cnnops {

enum class ConvGemm { Forward, GradInput, GradWeight };

// The reduction index's part of an operand coordinate. a_offset < 0 marks a row past the end.
template <typename index_t>
struct ReductionIndex {
  index_t a_offset;  // offset of A(0, r): A(m, r) = A[m * gemm_a_row_stride + a_offset]
  index_t plane;     // part of B's (batch, channel) plane offset
  index_t z, y, x;   // part of B's spatial coordinate
};

// The column's part of an operand coordinate.
template <typename index_t>
struct ColumnIndex {
  index_t out_offset;  // offset of OUT(0, n): OUT(m, n) = OUT[m * gemm_out_row_stride + out_offset]
  index_t plane;
  index_t z, y, x;
};

// A flat position n in [0, batch * plane) over a (D, H, W) grid.
struct GridPosition {
  int64_t batch, offset, d, h, w;  // offset = (d * H + h) * W + w
};
CNNOPS_HD GridPosition split_grid_position(int64_t n, const int64_t dims[3]) {
  GridPosition p;
  const int64_t plane = dims[0] * dims[1] * dims[2];
  p.batch = n / plane;
  p.offset = n - p.batch * plane;
  p.w = p.offset % dims[2];
  const int64_t dh = p.offset / dims[2];
  p.h = dh % dims[1];
  p.d = dh / dims[1];
  return p;
}

// GEMM sizes of one group.
template <ConvGemm kind>
CNNOPS_HD int64_t gemm_m(const ConvGeometry& g) {
  return kind == ConvGemm::GradInput ? g.in_channels_per_group() : g.out_channels_per_group();
}
template <ConvGemm kind>
CNNOPS_HD int64_t gemm_n(const ConvGeometry& g) {
  if (kind == ConvGemm::Forward) return g.batch * g.out_plane();
  if (kind == ConvGemm::GradInput) return g.batch * g.in_plane();
  return g.gemm_k();
}
template <ConvGemm kind>
CNNOPS_HD int64_t gemm_r(const ConvGeometry& g) {
  if (kind == ConvGemm::Forward) return g.gemm_k();
  if (kind == ConvGemm::GradInput) return g.out_channels_per_group() * g.kernel_volume();
  return g.batch * g.out_plane();
}

// Strides and per-group base offsets of A and OUT, and the per-group base offset of B.
template <ConvGemm kind>
CNNOPS_HD int64_t gemm_a_row_stride(const ConvGeometry& g) {
  if (kind == ConvGemm::Forward) return g.gemm_k();           // W[co, r]
  if (kind == ConvGemm::GradInput) return g.kernel_volume();  // W[co, c, tap] read along c
  return g.out_plane();                                       // dY[b, co, l] read along co
}
template <ConvGemm kind>
CNNOPS_HD int64_t gemm_a_group_offset(const ConvGeometry& g, int64_t group) {
  if (kind == ConvGemm::GradWeight) return group * g.out_channels_per_group() * g.out_plane();
  return group * g.out_channels_per_group() * g.gemm_k();  // weight rows of the group
}
template <ConvGemm kind>
CNNOPS_HD int64_t gemm_b_group_offset(const ConvGeometry& g, int64_t group) {
  if (kind == ConvGemm::GradInput) return group * g.out_channels_per_group() * g.out_plane();
  return group * g.in_channels_per_group() * g.in_plane();
}
template <ConvGemm kind>
CNNOPS_HD int64_t gemm_out_row_stride(const ConvGeometry& g) {
  if (kind == ConvGemm::Forward) return g.out_plane();
  if (kind == ConvGemm::GradInput) return g.in_plane();
  return g.gemm_k();
}
template <ConvGemm kind>
CNNOPS_HD int64_t gemm_out_group_offset(const ConvGeometry& g, int64_t group) {
  if (kind == ConvGemm::Forward) return group * g.out_channels_per_group() * g.out_plane();
  if (kind == ConvGemm::GradInput) return group * g.in_channels_per_group() * g.in_plane();
  return group * g.out_channels_per_group() * g.gemm_k();
}

// Output position (b, o) -> batch plane of X and the window origin o*stride - pad.
template <typename index_t, typename T>
CNNOPS_HD void output_position_part(const ConvGeometry& g, const GridPosition& p, T& part) {
  part.plane = static_cast<index_t>(p.batch * g.in_channels * g.in_plane());
  part.z = static_cast<index_t>(conv_input_index(p.d, 0, g.stride[0], g.pad[0], g.dilation[0]));
  part.y = static_cast<index_t>(conv_input_index(p.h, 0, g.stride[1], g.pad[1], g.dilation[1]));
  part.x = static_cast<index_t>(conv_input_index(p.w, 0, g.stride[2], g.pad[2], g.dilation[2]));
}
// im2col row r = (c, kd, kh, kw) -> channel plane of X and the tap's offset k*dilation.
template <typename index_t, typename T>
CNNOPS_HD void kernel_tap_part(const ConvGeometry& g, int64_t r, T& part) {
  const KernelTap t = decompose_gemm_row(g, r);
  part.plane = static_cast<index_t>(t.channel * g.in_plane());
  part.z = static_cast<index_t>(t.kd * g.dilation[0]);
  part.y = static_cast<index_t>(t.kh * g.dilation[1]);
  part.x = static_cast<index_t>(t.kw * g.dilation[2]);
}

template <ConvGemm kind, typename index_t>
CNNOPS_HD ReductionIndex<index_t> reduction_index(const ConvGeometry& g, int64_t r) {
  ReductionIndex<index_t> e;
  if constexpr (kind == ConvGemm::Forward) {
    kernel_tap_part<index_t>(g, r, e);
    e.a_offset = static_cast<index_t>(r);
  } else if constexpr (kind == ConvGemm::GradInput) {
    // r = (co, kd, kh, kw): dY channel plane, and pad - k*dilation so that adding the input
    // coordinate i gives i + pad - k*dilation = o*stride (a real output iff divisible, in range).
    const KernelTap t = decompose_gemm_row(g, r);
    e.plane = static_cast<index_t>(t.channel * g.out_plane());
    e.z = static_cast<index_t>(g.pad[0] - t.kd * g.dilation[0]);
    e.y = static_cast<index_t>(g.pad[1] - t.kh * g.dilation[1]);
    e.x = static_cast<index_t>(g.pad[2] - t.kw * g.dilation[2]);
    const int64_t tap = r - t.channel * g.kernel_volume();
    e.a_offset = static_cast<index_t>(t.channel * g.gemm_k() + tap);  // W[co, 0, tap]
  } else {
    const GridPosition p = split_grid_position(r, g.out);  // r = (b, od, oh, ow)
    output_position_part<index_t>(g, p, e);
    e.a_offset = static_cast<index_t>(p.batch * g.out_channels * g.out_plane() + p.offset);
  }
  return e;
}

template <ConvGemm kind, typename index_t>
CNNOPS_HD ColumnIndex<index_t> column_index(const ConvGeometry& g, int64_t n) {
  ColumnIndex<index_t> c;
  if constexpr (kind == ConvGemm::Forward) {
    const GridPosition p = split_grid_position(n, g.out);  // n = (b, od, oh, ow)
    output_position_part<index_t>(g, p, c);
    c.out_offset = static_cast<index_t>(p.batch * g.out_channels * g.out_plane() + p.offset);
  } else if constexpr (kind == ConvGemm::GradInput) {
    const GridPosition p = split_grid_position(n, g.in);  // n = (b, id, ih, iw)
    c.plane = static_cast<index_t>(p.batch * g.out_channels * g.out_plane());
    c.z = static_cast<index_t>(p.d);
    c.y = static_cast<index_t>(p.h);
    c.x = static_cast<index_t>(p.w);
    c.out_offset = static_cast<index_t>(p.batch * g.in_channels * g.in_plane() + p.offset);
  } else {
    kernel_tap_part<index_t>(g, n, c);  // n = (c, kd, kh, kw)
    c.out_offset = static_cast<index_t>(n);
  }
  return c;
}

template <typename index_t>
CNNOPS_HD bool in_extent(index_t i, int64_t extent) {  // 0 <= i < extent, one compare
  using unsigned_t = std::make_unsigned_t<index_t>;
  return static_cast<unsigned_t>(i) < static_cast<unsigned_t>(extent);
}

// Offset of B(r, n) from B's group base, or -1 where it reads zero padding (or, for GradInput,
// a tap that falls between strided outputs: the gather form of col2im).
template <ConvGemm kind, typename index_t>
CNNOPS_HD index_t gemm_b_offset(const ConvGeometry& g, const ReductionIndex<index_t>& r,
                                const ColumnIndex<index_t>& c) {
  index_t z = r.z + c.z, y = r.y + c.y, x = r.x + c.x;
  const int64_t* dims = kind == ConvGemm::GradInput ? g.out : g.in;
  if constexpr (kind == ConvGemm::GradInput) {
    const index_t sz = static_cast<index_t>(g.stride[0]), sy = static_cast<index_t>(g.stride[1]),
                  sx = static_cast<index_t>(g.stride[2]);
    if (sz != 1) {
      if (z % sz != 0) return -1;
      z /= sz;
    }
    if (sy != 1) {
      if (y % sy != 0) return -1;
      y /= sy;
    }
    if (sx != 1) {
      if (x % sx != 0) return -1;
      x /= sx;
    }
  }
  if (!in_extent(z, dims[0]) || !in_extent(y, dims[1]) || !in_extent(x, dims[2])) return -1;
  return r.plane + c.plane + (z * static_cast<index_t>(dims[1]) + y) * static_cast<index_t>(dims[2]) + x;
}

}  // namespace cnnops
