// Channels-last convolution on the CPU. In NHWC the output of one position is a row of
// C_out values, so the GEMM is transposed with respect to the NCHW one:
//   forward      Y[r, co]      = act(sum over (tap, c) of im2col[r, (tap, c)] * W[co, c, tap] + b[co])
//   grad weight  dW[co, (tap,c)] = sum over r of dY[r, co] * im2col[r, (tap, c)]
// with r the flat (sample, output position) index. The im2col columns are ordered (tap, c),
// channel fastest, so each tap contributes a contiguous run of the input's channels and every
// row of the output is written in place, with no layout conversion. Stride-1 convolutions read
// A in place on the shifted-window grid instead of packing it (conv_forward_nhwc_shifted).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/conv_cpu.h"
#include "cpu/conv_shifted.h"
#include "cpu/gemm.h"
#include "cpu/weight_cache.h"

namespace cnnops {
namespace cpu {
namespace {

// Where channels-last im2col row r (output position (n, od, oh, ow)) reads tap (kd, kh, kw):
// the offset of channel 0 of that input pixel, or -1 in the padding.
int64_t tap_source(const ConvGeometry& g, int64_t r, int64_t tap) {
  const int64_t ow = r % g.out[2], oh = r / g.out[2] % g.out[1];
  const int64_t od = r / g.out[2] / g.out[1] % g.out[0], n = r / g.out_plane();
  const int64_t kw = tap % g.kernel[2], kh = tap / g.kernel[2] % g.kernel[1], kd = tap / g.kernel[2] / g.kernel[1];
  const int64_t id = conv_input_index(od, kd, g.stride[0], g.pad[0], g.dilation[0]);
  const int64_t ih = conv_input_index(oh, kh, g.stride[1], g.pad[1], g.dilation[1]);
  const int64_t iw = conv_input_index(ow, kw, g.stride[2], g.pad[2], g.dilation[2]);
  if (id < 0 || id >= g.in[0] || ih < 0 || ih >= g.in[1] || iw < 0 || iw >= g.in[2]) return -1;
  return (((n * g.in[0] + id) * g.in[1] + ih) * g.in[2] + iw) * g.in_channels;
}

// Rows [r0, r0 + rows) x columns [k0, k0 + kc) of one group's channels-last im2col matrix,
// columns ordered (tap, c), written as a GEMM A panel dst[kk * mr + i]. Within one tap every
// row reads a contiguous run of channels, so the panel is filled in order, mr values per column,
// from mr row pointers (rows in the padding read from `zeros`).
template <typename T>
void read_im2col_panel_nhwc(const ConvGeometry& g, const T* x, int64_t group, int64_t r0, int64_t rows, int64_t k0,
                            int64_t kc, T* dst, int64_t mr, const T* zeros) {
  const int64_t cg = g.in_channels_per_group();
  const T* src[kGemmMaxMr];
  TORCH_INTERNAL_ASSERT(mr <= kGemmMaxMr);
  for (int64_t j = 0; j < kc;) {
    const int64_t tap = (k0 + j) / cg, c = (k0 + j) % cg, run = std::min(cg - c, kc - j);
    for (int64_t i = 0; i < mr; ++i) {
      const int64_t offset = i < rows ? tap_source(g, r0 + i, tap) : -1;
      src[i] = offset < 0 ? zeros : x + offset + group * cg + c;
    }
    for (int64_t q = 0; q < run; ++q)
      for (int64_t i = 0; i < mr; ++i) dst[(j + q) * mr + i] = src[i][q];
    j += run;
  }
}

// Reads row r of the channels-last im2col matrix of one group: columns [k0, k0 + kc) to
// dst[j], zero where a tap lands in the padding.
template <typename T>
void read_im2col_row_nhwc(const ConvGeometry& g, const T* x, int64_t group, int64_t r, int64_t k0, int64_t kc, T* dst) {
  const int64_t cg = g.in_channels_per_group();
  for (int64_t j = 0; j < kc;) {
    const int64_t tap = (k0 + j) / cg, c = (k0 + j) % cg, run = std::min(cg - c, kc - j);
    const int64_t offset = tap_source(g, r, tap);
    if (offset < 0)
      std::fill(dst + j, dst + j + run, T(0));
    else
      std::copy_n(x + offset + group * cg + c, run, dst + j);
    j += run;
  }
}

// B_g = W_g as [(tap, c), co] for every group g: the weight reordered to the channels-last
// im2col's column order, row by row in parallel, with NR values of slack at the end for the
// in-place B reads of gemm_shifted_b. Kept between calls by the weight cache (weight_cache.h).
template <typename T>
std::shared_ptr<const std::vector<T>> weight_as_tap_channel_rows(const ConvGeometry& g, const T* w) {
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), taps = g.kernel_volume();
  const int64_t cg = g.in_channels_per_group();
  const WeightTag tag{2, g.groups, m, k, taps, int64_t(sizeof(T))};
  return cached_weight<std::vector<T>>(w, tag, g.groups * k * m * int64_t(sizeof(T)), [&] {
    auto w_t = std::make_shared<std::vector<T>>(g.groups * k * m + gemm_nr<T>(), T(0));
    T* out = w_t->data();
    parallel_for(0, g.groups * k, std::max<int64_t>(1, 4096 / std::max<int64_t>(m, 1)),
                 [&](int64_t begin, int64_t end) {
                   for (int64_t row = begin; row < end; ++row) {  // row = (grp, tap, c)
                     const int64_t grp = row / k, tap = row % k / cg, c = row % cg;
                     const T* src = w + (grp * m * cg + c) * taps + tap;
                     for (int64_t co = 0; co < m; ++co) out[row * m + co] = src[co * cg * taps];
                   }
                 });
    return w_t;
  });
}

}  // namespace

// Y rows = im2col rows (A, packed per block of rows) times W_t (B, read in place). When the
// batch's positions make few row blocks (batch 1, 7x7 maps), the output channels (B's columns)
// are split too, so every thread has work.
template <typename T>
void conv_forward_nhwc(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), rows = g.batch * g.out_plane();
  const auto w_t = weight_as_tap_channel_rows(g, w);
  const int64_t blocks = num_blocks(rows, kColumnBlock);
  const int64_t block = num_blocks(rows, blocks);  // even blocks
  const int64_t wanted = num_blocks(2 * at::get_num_threads(), g.groups * blocks);
  const int64_t col_splits = std::min(wanted, num_blocks(m, nr));
  const int64_t col_size = num_blocks(num_blocks(m, nr), col_splits) * nr;
  const int64_t col_blocks = num_blocks(m, col_size);
  std::vector<int64_t> row_offset(k);  // B's row kk starts kk * M values into the group's W_t
  for (int64_t kk = 0; kk < k; ++kk) row_offset[kk] = kk * m;
  const std::vector<T> zeros(kKc, T(0));  // what rows in the padding read
  parallel_for(0, g.groups * blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j0 = (task % col_blocks) * col_size, nj = std::min(col_size, m - j0);
      const int64_t grp = task / col_blocks / blocks, r0 = (task / col_blocks % blocks) * block;
      const int64_t rc = std::min(block, rows - r0);
      const PackedA<T> a =
          pack_a_panels<T>(rc, k, [&](int64_t i0, int64_t rows, int64_t k0, int64_t kc, T* dst, int64_t mr) {
            read_im2col_panel_nhwc(g, x, grp, r0 + i0, rows, k0, kc, dst, mr, zeros.data());
          });
      T* c = y + r0 * g.out_channels + grp * m + j0;  // rows of C_out values, this task's columns
      if (bias) {  // the bias runs along columns here: start C from it and accumulate
        for (int64_t i = 0; i < rc; ++i) std::copy_n(bias + grp * m + j0, nj, c + i * g.out_channels);
      }
      // The activation goes on as the last reduction block is written.
      gemm_shifted_b<T>(a, nj, w_t->data() + grp * k * m + j0, row_offset.data(), c, g.out_channels, nullptr,
                        bias != nullptr, 0, -1, activation);
    }
  });
}

// Stride-1 channels-last forward on the shifted-window grid (conv_shifted.h, with the channel
// innermost): on a zero-padded NHWC copy, grid row r' = (od*Hp + oh)*Wp + ow reads tap t at
// padded pixel r' + shift(t), so A[r', (t, c)] = x_padded[(r' + shift(t)) * C_in + c]: every
// column of A is the padded input at a fixed offset, rows C_in apart, read in place.
template <typename T>
void conv_forward_nhwc_shifted(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y,
                               Activation activation) {
  const ShiftedGrid grid(g);
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), taps = g.kernel_volume();
  const int64_t cg = g.in_channels_per_group(), c_in = g.in_channels, pp = grid.padded.plane;
  const int64_t hp = grid.padded.h, wp = grid.padded.w;
  // Padded NHWC input; the slack covers the rows past the grid that the last A panel reads.
  std::vector<T> padded(g.batch * pp * c_in + (gemm_mr<T>() + 1) * c_in, T(0));
  parallel_for(0, g.batch * g.in[0] * g.in[1], 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // (n, d, h): one input row of W pixels
      const int64_t h = row % g.in[1], d = row / g.in[1] % g.in[0], n = row / g.in[1] / g.in[0];
      std::memcpy(&padded[((n * grid.padded.d + d + g.pad[0]) * hp + h + g.pad[1]) * wp * c_in + g.pad[2] * c_in],
                  x + row * g.in[2] * c_in, g.in[2] * c_in * sizeof(T));
    }
  });
  std::vector<int64_t> column_offset(k);  // A's column (t, c) of group 0: shift(t) * C_in + c
  for (int64_t tap = 0; tap < taps; ++tap) {
    const int64_t kw = tap % g.kernel[2], kh = tap / g.kernel[2] % g.kernel[1], kd = tap / g.kernel[2] / g.kernel[1];
    const int64_t shift = (kd * g.dilation[0] * hp + kh * g.dilation[1]) * wp + kw * g.dilation[2];
    for (int64_t c = 0; c < cg; ++c) column_offset[tap * cg + c] = shift * c_in + c;
  }
  const auto w_t = weight_as_tap_channel_rows(g, w);
  constexpr int64_t block = kColumnBlock;  // grid rows per GEMM call
  const int64_t blocks = (grid.columns + block - 1) / block;
  parallel_for(0, g.batch * g.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    const auto workspace = scratch<T>(gemm_workspace_size<T>(m));
    const auto tile = scratch<T>(block * m);  // C for one block of grid rows, before dropping waste
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = (task % blocks) * block, rc = std::min(block, grid.columns - r0);
      const int64_t grp = task / blocks % g.groups, n = task / blocks / g.groups;
      const T* b = w_t->data() + grp * k * m;
      auto pack = [&](int64_t k0, int64_t kc, int64_t j0, int64_t jc, T* dst) {
        pack_b_strided(b, m, int64_t(1), k0, kc, j0, jc, dst);
        zero_panel_tail(kc, jc, dst);
      };
      const T* a = padded.data() + (n * pp + r0) * c_in + grp * cg;
      gemm_shifted_a<T>(rc, k, a, c_in, column_offset.data(), m, pack, tile.get(), m, workspace.get());
      for (int64_t i = 0; i < rc; ++i) {  // keep the real outputs, adding the bias, then the activation
        const int64_t r = r0 + i, ow = r % wp, oh = r / wp % hp, od = r / wp / hp;
        if (ow >= g.out[2] || oh >= g.out[1]) continue;
        T* out = y + (((n * g.out[0] + od) * g.out[1] + oh) * g.out[2] + ow) * g.out_channels + grp * m;
        const T* src = tile.get() + i * m;
        if (activation == Activation::Relu) {
          for (int64_t co = 0; co < m; ++co) out[co] = relu(src[co] + (bias ? bias[grp * m + co] : T(0)));
        } else {
          for (int64_t co = 0; co < m; ++co) out[co] = src[co] + (bias ? bias[grp * m + co] : T(0));
        }
      }
    }
  });
}

template <typename T>
void conv_backward_weight_nhwc(const ConvGeometry& g, const T* dy, const T* x, T* dw) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), taps = g.kernel_volume();
  const int64_t cg = g.in_channels_per_group();
  std::vector<T> dw_t(g.groups * m * k);  // columns ordered (tap, c); reordered at the end
  reduce_weight_gradient<T>(
      g, dw_t.data(), [&](int64_t r0, int64_t rc, int64_t grp, int64_t j0, int64_t jw, T* dw_slice, T* workspace) {
        // A = dY^T over the chunk (M x rc): in NHWC a position's C_out values are contiguous.
        const PackedA<T> a = pack_a(m, rc, dy + r0 * g.out_channels + grp * m, int64_t(1), g.out_channels);
        auto pack = [&](int64_t k0, int64_t kc, int64_t jj, int64_t jc, T* dst) {
          for (int64_t i = 0; i < kc; ++i)
            for (int64_t p = 0; p * nr < jc; ++p)
              read_im2col_row_nhwc(g, x, grp, r0 + k0 + i, j0 + jj + p * nr, std::min(nr, jc - p * nr),
                                   dst + (p * kc + i) * nr);
          zero_panel_tail(kc, jc, dst);
        };
        gemm<T>(a, jw, pack, dw_slice, k, nullptr, true, workspace);
      });
  for (int64_t co = 0; co < g.out_channels; ++co)
    for (int64_t c = 0; c < cg; ++c)
      for (int64_t tap = 0; tap < taps; ++tap) dw[(co * cg + c) * taps + tap] = dw_t[co * k + tap * cg + c];
}

#define CNNOPS_INSTANTIATE_NHWC(T)                                                                               \
  template void conv_forward_nhwc<T>(const ConvGeometry&, const T*, const T*, const T*, T*, Activation);         \
  template void conv_forward_nhwc_shifted<T>(const ConvGeometry&, const T*, const T*, const T*, T*, Activation); \
  template void conv_backward_weight_nhwc<T>(const ConvGeometry&, const T*, const T*, T*);
CNNOPS_INSTANTIATE_NHWC(float)
CNNOPS_INSTANTIATE_NHWC(double)

}  // namespace cpu
}  // namespace cnnops
