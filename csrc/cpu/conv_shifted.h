#pragma once
// Stride-1 convolution on a zero-padded copy of the input ("shifted windows").
//
// With stride 1, the column offset of output (od, oh, ow) in conv_im2col.h is (od*Hp + oh)*Wp + ow:
// on the padded grid, column l' simply reads x_padded[row_offset(r) + l']. Every im2col row is
// the padded input shifted by a constant, so the GEMM reads B in place with no packing at all.
// The price: the grid's columns with ow >= W_out or oh >= H_out are computed and dropped.
#include <cstdint>
#include <vector>

#include "common/activation.h"
#include "common/conv_shape.h"
#include "cpu/conv_im2col.h"
#include "cpu/gemm.h"

namespace cnnops {
namespace cpu {

struct ShiftedGrid {
  PaddedLayout padded;
  int64_t columns;                  // grid columns up to the last real output position
  std::vector<int64_t> row_offset;  // per im2col row of one group: the shift of that row

  explicit ShiftedGrid(const ConvGeometry& g, WeightOrder order = WeightOrder::ChannelTap)
      : padded(g),
        columns(((g.out[0] - 1) * padded.h + g.out[1] - 1) * padded.w + g.out[2]),
        row_offset(im2col_row_offsets(g, padded, order)) {}

  // Fraction of computed columns that are real outputs.
  double efficiency(const ConvGeometry& g) const { return double(g.out_plane()) / double(columns); }
};

// Worth it when every stride is 1 and few grid columns are wasted; otherwise im2col packing.
// Measured here: 14x14 (88% of the grid real) is faster on the grid, 7x7 (80%) with packing;
// but not for groups of fewer output channels than a B panel is wide, where packing costs more
// than the few GEMM rows reading each packed value (RegNet's 7x7 stage: 4x faster on the grid).
inline bool has_narrow_groups(const ConvGeometry& g) {  // RegNet's, ResNeXt's grouped layers
  return g.groups > 1 && g.out_channels_per_group() < gemm_nr<float>();
}
inline bool use_shifted_grid(const ConvGeometry& g) {
  for (int i = 0; i < 3; ++i)
    if (g.stride[i] != 1) return false;
  return !g.is_pointwise() && ShiftedGrid(g).efficiency(g) >= (has_narrow_groups(g) ? 0.5 : 0.85);
}

// One B panel of output channels a group (17-32 in float32), more than half used:
// conv_forward_shifted with the product transposed (conv_shifted.cpp). Measured (1 thread):
// conv1d 64->32 k9 4096, batch 8: 12.4 -> 9.9 ms; conv3d 32->32 16x28x28 k3: 10.6 -> 10.5 ms.
// Not with two panels (conv1d 64->64: no gain forward, slower grad input) nor half a panel.
// float64 takes the same channel range (two of its panels; not measured).
inline bool use_shifted_rows(const ConvGeometry& g) {
  const int64_t m = g.out_channels_per_group();
  return 2 * m > gemm_nr<float>() && m <= gemm_nr<float>();
}
int64_t shifted_rows_call_count();  // tests

template <typename T>
void conv_forward_shifted_rows(const ConvGeometry& g, const T* x, const T* w, WeightOrder order, const T* bias, T* y,
                               Activation activation);

template <typename T>
void conv_forward_shifted(const ConvGeometry& g, const T* x, const T* w, WeightOrder order, const T* bias, T* y,
                          Activation activation);

}  // namespace cpu
}  // namespace cnnops
