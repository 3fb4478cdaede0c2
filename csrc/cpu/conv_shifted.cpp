// Stride-1 convolution forward on the shifted-window grid (see conv_shifted.h):
// Y_ng = activation(W_g * shifted(pad(X_ng)) + b), computed in column blocks of the padded grid.
#include "cpu/conv_shifted.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "common/checked_math.h"
#include "cpu/conv_cpu.h"
#include "cpu/gemm.h"
#include "cpu/weight_cache.h"

namespace cnnops {
namespace cpu {

std::atomic<int64_t> shifted_rows_calls{0};

namespace {

// The real outputs among grid columns [n0, n0 + nc): column l' = (od*Hp + oh)*Wp + ow is output
// (od, oh, ow) when oh < H_out and ow < W_out. Calls run(output offset in the plane, column - n0,
// length) for each run of them along a row.
template <typename F>
void for_each_output_run(const ConvGeometry& g, int64_t hp, int64_t wp, int64_t n0, int64_t nc, F&& run) {
  for (int64_t row_start = n0 - n0 % wp; row_start < n0 + nc; row_start += wp) {
    const int64_t oh = row_start / wp % hp, od = row_start / wp / hp;
    if (oh >= g.out[1]) continue;
    const int64_t first = std::max(row_start, n0), last = std::min(row_start + g.out[2], n0 + nc);
    if (first < last) run((od * g.out[1] + oh) * g.out[2] + (first - row_start), first - n0, last - first);
  }
}

}  // namespace

template <typename T>
void conv_forward_shifted(const ConvGeometry& g, const T* x, const T* w, WeightOrder order, const T* bias, T* y,
                          Activation activation) {
  constexpr int64_t nr = gemm_nr<T>();
  const ShiftedGrid grid(g, order);
  const int64_t m = g.out_channels_per_group();
  const int64_t pp = grid.padded.plane, hp = grid.padded.h, wp = grid.padded.w;
  // The slack keeps the last panel's reads past the grid in bounds.
  const OperandVector<T> padded = pad_planes(g, grid.padded, x, g.batch * g.in_channels, nr);

  const auto packed = packed_group_weights(g, w);  // packed once (or cached), shared by every task
  const std::vector<PackedA<T>>& weights = *packed;
  // Blocks of at most kColumnBlock grid columns (a multiple of NR). With few tasks (batch 1), their count
  // is made a multiple of the thread count, and the output channels (A's rows) are split when
  // the tasks are still fewer than two per thread: no thread idles while another finishes.
  // Neither split changes any sum (each output's reduction runs whole, in one order).
  const int64_t threads = at::get_num_threads(), samples = g.batch * g.groups;
  int64_t blocks = num_blocks(grid.columns, kColumnBlock);
  if (samples * blocks < 8 * threads)
    while ((samples * blocks) % threads != 0 && blocks < num_blocks(grid.columns, nr)) ++blocks;
  const int64_t block = num_blocks(num_blocks(grid.columns, blocks), nr) * nr;
  blocks = num_blocks(grid.columns, block);
  const int64_t mr = weights[0].mr, panels = num_blocks(m, mr);
  const int64_t row_count0 = std::min(panels, num_blocks(2 * threads, samples * blocks));
  const int64_t row_size = num_blocks(panels, row_count0) * mr, row_count = num_blocks(m, row_size);
  parallel_for(0, samples * blocks * row_count, 1, [&](int64_t begin, int64_t end) {
    const auto tile = scratch<T>(m * block);  // C for one block of grid columns, before dropping waste
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_begin = (task % row_count) * row_size, row_end = std::min(m, row_begin + row_size);
      const int64_t column_task = task / row_count;
      const int64_t n0 = (column_task % blocks) * block, nc = std::min(block, grid.columns - n0);
      const int64_t grp = (column_task / blocks) % g.groups, n = column_task / blocks / g.groups;
      const T* x_ng = padded.data() + (n * g.in_channels + grp * g.in_channels_per_group()) * pp;
      // B is read in place: grid column j of im2col row r is x_ng[row_offset[r] + j]. The GEMM
      // adds the bias and applies the activation as it writes the tile.
      gemm_shifted_b<T>(weights[grp], nc, x_ng + n0, grid.row_offset.data(), tile.get(), nc,
                        bias ? bias + grp * m : nullptr, false, row_begin, row_end, activation);
      // Keep the real outputs.
      T* y_ng = y + (n * g.out_channels + grp * m) * g.out_plane();
      for_each_output_run(g, hp, wp, n0, nc, [&](int64_t out, int64_t column, int64_t len) {
        for (int64_t i = row_begin; i < row_end; ++i)
          std::memcpy(y_ng + out + i * g.out_plane(), tile.get() + i * nc + column, len * sizeof(T));
      });
    }
  });
}

// The product transposed, for few output channels (one or two B panels): C[j, o] = sum_r
// shifted(pad(X_ng))[r, j] W_g[o, r], rows the grid columns (read in place: consecutive values of
// each shifted row, so A's panels need no packing) and B = W_g^T packed once. The B panels stay in L1
// while the input streams past once, where the untransposed product's M / MR A panels and its B
// panel of grid columns did not both fit L1. The bias and activation go on in the transposing copy.
template <typename T>
void conv_forward_shifted_rows(const ConvGeometry& g, const T* x, const T* w, WeightOrder order, const T* bias, T* y,
                               Activation activation) {
  constexpr int64_t nr = gemm_nr<T>();
  shifted_rows_calls.fetch_add(1, std::memory_order_relaxed);
  const ShiftedGrid grid(g, order);
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), padded_m = num_blocks(m, nr) * nr;
  const int64_t pp = grid.padded.plane, hp = grid.padded.h, wp = grid.padded.w;
  const OperandVector<T> padded = pad_planes(g, grid.padded, x, g.batch * g.in_channels, nr);
  // W_g^T in gemm's panels: reduction block k0 (kKc rows) at k0 * padded_m, its panel of columns j0
  // kc * NR further on, row kk holding W[grp * m + j0 + q][k0 + kk], zero past M.
  const int64_t group_size = checked_numel({k, padded_m}, "conv_forward (shifted rows)", true);
  std::vector<T> wt(checked_numel({g.groups, group_size}, "conv_forward (shifted rows)", true));
  parallel_for(0, g.groups * num_blocks(k, kKc), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / num_blocks(k, kKc), k0 = task % num_blocks(k, kKc) * kKc, kc = std::min(kKc, k - k0);
      T* block = wt.data() + grp * group_size + k0 * padded_m;
      for (int64_t j = 0; j < padded_m; ++j) {
        const T* src = w + (grp * m + j) * k + k0;
        T* dst = block + j / nr * kc * nr + j % nr;
        for (int64_t kk = 0; kk < kc; ++kk) dst[kk * nr] = j < m ? src[kk] : T(0);
      }
    }
  });
  const int64_t samples = g.batch * g.groups, blocks = num_blocks(grid.columns, kColumnBlock);
  parallel_for(0, samples * blocks, 1, [&](int64_t begin, int64_t end) {
    const auto tile = scratch<T>(kColumnBlock * m);  // C: grid column j's M outputs at tile + j * M
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task % blocks * kColumnBlock, nc = std::min(kColumnBlock, grid.columns - n0);
      const int64_t grp = task / blocks % g.groups, n = task / blocks / g.groups;
      const T* x_ng = padded.data() + (n * g.in_channels + grp * g.in_channels_per_group()) * pp;
      const T* wt_g = wt.data() + grp * group_size;
      gemm_shifted_a_packed_b<T>(
          nc, k, x_ng + n0, 1, grid.row_offset.data(), m,
          [&](int64_t k0, int64_t kc, int64_t j0) { return wt_g + k0 * padded_m + j0 * kc; }, tile.get(), m);
      // Keep the real outputs (as conv_forward_shifted), channel by channel: y = activation(C + b).
      T* y_ng = y + (n * g.out_channels + grp * m) * g.out_plane();
      const T* bias_g = bias ? bias + grp * m : nullptr;
      for_each_output_run(g, hp, wp, n0, nc, [&](int64_t out, int64_t column, int64_t len) {
        for (int64_t o = 0; o < m; ++o) {
          const T init = bias_g ? bias_g[o] : T(0);
          const T* src = tile.get() + column * m + o;
          T* dst = y_ng + out + o * g.out_plane();
          for (int64_t j = 0; j < len; ++j) dst[j] = apply_activation(init + src[j * m], activation);
        }
      });
    }
  });
}

int64_t shifted_rows_call_count() { return shifted_rows_calls.load(std::memory_order_relaxed); }

template void conv_forward_shifted<float>(const ConvGeometry&, const float*, const float*, WeightOrder, const float*,
                                          float*, Activation);
template void conv_forward_shifted<double>(const ConvGeometry&, const double*, const double*, WeightOrder,
                                           const double*, double*, Activation);
template void conv_forward_shifted_rows<float>(const ConvGeometry&, const float*, const float*, WeightOrder,
                                               const float*, float*, Activation);
template void conv_forward_shifted_rows<double>(const ConvGeometry&, const double*, const double*, WeightOrder,
                                                const double*, double*, Activation);

}  // namespace cpu
}  // namespace cnnops
