#pragma once
// im2col as two offset tables, for the CPU convolution kernels, and the zero-padded plane copies
// they read (also the direct depthwise loops' buffer, PaddedPlane).
//
// On a zero-padded copy of the input, (D+2p) x (H+2p) x (W+2p) per (sample, channel) plane, the
// im2col entry of row r = (c, kd, kh, kw) and column l = (n, od, oh, ow) is
//     x_padded[row_offset(r) + column_offset(l)]
//     row_offset(r)    = c * plane + (kd*dd * Hp + kh*dh) * Wp + kw*dw      (the kernel tap)
//     column_offset(l) = n * C_in * plane + (od*sd * Hp + oh*sh) * Wp + ow*sw  (the window origin)
// The padding is real zeros, so no index is ever tested against the bounds: packing a GEMM
// panel is a gather through the two tables, and col2im a scatter-add through them.
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "common/conv_shape.h"
#include "cpu/conv_cpu.h"

namespace cnnops {
namespace cpu {

struct PaddedLayout {
  int64_t d, h, w, plane;  // padded sizes; plane = d * h * w
  explicit PaddedLayout(const ConvGeometry& g)
      : d(g.in[0] + 2 * g.pad[0]), h(g.in[1] + 2 * g.pad[1]), w(g.in[2] + 2 * g.pad[2]), plane(d * h * w) {}
};

// row_offset(r) for every im2col row of one group (channels counted from the group's first), the
// rows in the weight's order: r = weight_column(c, tap), taps over (kd, kh, kw), kw fastest.
inline std::vector<int64_t> im2col_row_offsets(const ConvGeometry& g, const PaddedLayout& p,
                                               WeightOrder order = WeightOrder::ChannelTap) {
  std::vector<int64_t> offsets(g.gemm_k());
  for (int64_t c = 0; c < g.in_channels_per_group(); ++c) {
    int64_t tap = 0;
    for (int64_t kd = 0; kd < g.kernel[0]; ++kd)
      for (int64_t kh = 0; kh < g.kernel[1]; ++kh)
        for (int64_t kw = 0; kw < g.kernel[2]; ++kw)
          offsets[weight_column(g, order, c, tap++)] =
              c * p.plane + (kd * g.dilation[0] * p.h + kh * g.dilation[1]) * p.w + kw * g.dilation[2];
  }
  return offsets;
}

// column_offset(l) for flat output positions l = (n, od, oh, ow) in [l0, l0 + count).
inline std::vector<int64_t> im2col_column_offsets(const ConvGeometry& g, const PaddedLayout& p, int64_t l0,
                                                  int64_t count) {
  std::vector<int64_t> offsets(count);
  // (n, od, oh, ow) of l0, then stepped position by position (no divisions per column).
  int64_t ow = l0 % g.out[2], oh = l0 / g.out[2] % g.out[1];
  int64_t od = l0 / g.out[2] / g.out[1] % g.out[0], n = l0 / g.out_plane();
  for (int64_t j = 0; j < count; ++j) {
    offsets[j] = n * g.in_channels * p.plane + (od * g.stride[0] * p.h + oh * g.stride[1]) * p.w + ow * g.stride[2];
    if (++ow < g.out[2]) continue;
    ow = 0;
    if (++oh < g.out[1]) continue;
    oh = 0;
    if (++od < g.out[0]) continue;
    od = 0;
    ++n;
  }
  return offsets;
}

// The largest L in {16, 8, 4} dividing a panel of nr columns for which every aligned group of
// L columns of a block (of whole panels) reads L consecutive values, else 0. Small images at
// stride 1 give such groups (one output row: L = 8 at 8x8, 4 at 4x4), and packing then moves
// each group as one vector instead of gathering it value by value through the offset table.
inline int64_t consecutive_column_groups(const std::vector<int64_t>& column_offset, int64_t nr) {
  const int64_t count = static_cast<int64_t>(column_offset.size());
  if (count == 0 || count % nr != 0) return 0;
  for (int64_t length = 16; length >= 4; length /= 2) {
    bool consecutive = nr % length == 0;
    for (int64_t j = 0; consecutive && j < count; ++j)
      consecutive = j % length == 0 || column_offset[j] == column_offset[j - 1] + 1;
    if (consecutive) return length;
  }
  return 0;
}

// Copies n values. Short copies (the rows of small images, 8 values at 8x8) are fixed-size
// moves: a memcpy call per row would cost more than the copy itself.
template <typename T>
inline void copy_values(T* dst, const T* src, int64_t n) {
  if (n >= 64) {
    std::memcpy(dst, src, n * sizeof(T));
    return;
  }
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) std::memcpy(dst + i, src + i, 4 * sizeof(T));
  for (; i < n; ++i) dst[i] = src[i];
}

// Plane x (D x H x W) into the interior of one padded plane; its border is left as it is.
template <typename T>
void pad_plane(const ConvGeometry& g, const PaddedLayout& p, const T* x, T* padded) {
  for (int64_t d = 0; d < g.in[0]; ++d)
    for (int64_t h = 0; h < g.in[1]; ++h)
      copy_values(padded + ((d + g.pad[0]) * p.h + h + g.pad[1]) * p.w + g.pad[2], x + (d * g.in[1] + h) * g.in[2],
                  g.in[2]);
}

// A zero-padded copy of planes [0, planes) of x (each D x H x W), with `slack` zeros after the
// last plane for readers that run past it.
template <typename T>
OperandVector<T> pad_planes(const ConvGeometry& g, const PaddedLayout& p, const T* x, int64_t planes,
                            int64_t slack = 0) {
  OperandVector<T> padded(planes * p.plane + slack, T(0));
  parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) pad_plane(g, p, x + q * g.in_plane(), padded.data() + q * p.plane);
  });
  return padded;
}

// The interior of `planes` padded planes back into x (D x H x W each): drops the padding.
template <typename T>
void unpad_planes(const ConvGeometry& g, const PaddedLayout& p, const T* padded, int64_t planes, T* x) {
  for (int64_t q = 0; q < planes; ++q)
    for (int64_t d = 0; d < g.in[0]; ++d)
      for (int64_t h = 0; h < g.in[1]; ++h)
        std::memcpy(x + ((q * g.in[0] + d) * g.in[1] + h) * g.in[2],
                    &padded[q * p.plane + ((d + g.pad[0]) * p.h + h + g.pad[1]) * p.w + g.pad[2]], g.in[2] * sizeof(T));
}

// One reusable zero-padded plane (a task's buffer in the direct depthwise loops): load() fills
// the interior, leaving the zero border; store() copies the interior back out.
template <typename T>
struct PaddedPlane {
  PaddedLayout layout;
  std::vector<T> data;

  explicit PaddedPlane(const ConvGeometry& g) : layout(g), data(layout.plane, T(0)) {}

  T* row(int64_t d, int64_t h) { return data.data() + (d * layout.h + h) * layout.w; }
  void load(const ConvGeometry& g, const T* plane) { pad_plane(g, layout, plane, data.data()); }
  void store(const ConvGeometry& g, T* plane) { unpad_planes(g, layout, data.data(), 1, plane); }
};

}  // namespace cpu
}  // namespace cnnops
