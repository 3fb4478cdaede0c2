// Convolution on the CPU, 1d/2d/3d (all lifted to 3d), forward and backward.
//
// General case, per sample n and group g (formulas.md §Conv as GEMM: each output is an
// inner product over C_in/groups x K_d x K_h x K_w):
//   forward      Y_ng  = W_g * im2col(X_ng) + b          (GEMM, im2col packed straight into B)
//   grad input   dX_ng = col2im(W_g^T * dY_ng)           (dl/dx_i = sum_j dl/dy_j (star) w_ij)
//   grad weight  dW_g  = sum_n dY_ng * im2col(X_ng)^T    (dl/dw_ij = dl/dy_j (conv) x_i)
//   grad bias    db    = sum over n and positions of dY
// Columns of the forward GEMM run over (sample, position) so small images still fill it. Stride-1
// convolutions take the shifted-window path (conv_shifted.h), float32 3x3 ones Winograd where it pays
// (conv_winograd.cpp, cnnops.backends.cpu.allow_winograd), and their grad input is a forward
// convolution with the rotated kernel. Channels-last inputs run conv_nhwc.cpp's kernels and
// depthwise convolution (groups == C_in) has direct ones in conv_depthwise.cpp (SIMD kernels for
// 3x3, 5x5 and 7x7 in conv_depthwise_direct.cpp, NCHW and NHWC).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common/activation.h"
#include "common/conv_checks.h"
#include "cpu/conv_cpu.h"
#include "cpu/conv_first_layer.h"
#include "cpu/conv_grouped.h"
#include "cpu/conv_im2col.h"
#include "cpu/conv_nhwc.h"
#include "cpu/conv_shifted.h"
#include "cpu/conv_small.h"
#include "cpu/conv_space_to_depth.h"
#include "cpu/conv_winograd.h"
#include "cpu/gemm.h"
#include "cpu/layout.h"
#include "cpu/result_memory.h"
#include "cpu/simd.h"
#include "cpu/weight_cache.h"

namespace cnnops {
namespace cpu {
namespace {

// Splits M rows into blocks of whole micro-kernel panels when `tasks` other tasks are too few
// to keep every thread busy (two tasks per thread).
struct RowSplit {
  int64_t count, size;
  RowSplit(int64_t m, int64_t mr, int64_t tasks) {
    const int64_t wanted = num_blocks(2 * at::get_num_threads(), tasks);
    const int64_t panels = num_blocks(m, mr);
    count = std::min(wanted, panels);
    size = num_blocks(panels, count) * mr;
    count = num_blocks(m, size);
  }
  // Task `task` of count x column_tasks, row blocks outermost: parallel_for's contiguous ranges then
  // give each thread whole row blocks (its share of the weight), the same work however uneven the
  // column blocks are (392 columns in blocks of 224 and 168 took 4:3 column-major).
  int64_t row_block(int64_t task, int64_t column_tasks) const { return task / column_tasks; }
  int64_t column_task(int64_t task, int64_t column_tasks) const { return task % column_tasks; }
};

// Column blocks of whole NR panels for tasks that are not row-split: as even as the panels allow
// and, when they are few, a multiple of the thread count, so that parallel_for's contiguous ranges
// give every thread the same work (1568 columns in 5 blocks of up to 320 took 3:2 at 2 threads).
struct ColumnBlocks {
  int64_t count, panels, nr, total;
  ColumnBlocks(int64_t total_, int64_t nr_, int64_t groups) : panels(num_blocks(total_, nr_)), nr(nr_), total(total_) {
    count = num_blocks(total, kColumnBlock);
    const int64_t threads = at::get_num_threads();
    if (groups * count < 8 * threads)
      while ((groups * count) % threads != 0 && count < panels) ++count;
  }
  int64_t begin(int64_t b) const { return std::min(total, b * panels / count * nr); }
  int64_t size(int64_t b) const { return begin(b + 1) - begin(b); }
  int64_t max_size() const { return num_blocks(panels, count) * nr; }
};

// Packs `panels` full B panels of kc im2col rows whose columns come in groups of L consecutive
// values (consecutive_column_groups), group q starting at column offset column_offset[q * L].
// With L known at compile time each group is one vector move, not a loop, compiled per ISA
// (simd.h): wider moves halve the loads and stores, which bound this copy.
template <int64_t L, typename T>
CNNOPS_ALWAYS_INLINE void pack_column_groups_body(const T* x_g, const int64_t* row_offset, const int64_t* column_offset,
                                                  int64_t panels, int64_t kc, T* dst) {
  constexpr int64_t nr = gemm_nr<T>(), per_panel = nr / L;
  typedef T Group __attribute__((vector_size(L * sizeof(T)), aligned(sizeof(T)), __may_alias__));
  for (int64_t p = 0; p < panels; ++p, column_offset += nr)
    for (int64_t kk = 0; kk < kc; ++kk) {
      const T* src = x_g + row_offset[kk];
      T* out = dst + (p * kc + kk) * nr;
      for (int64_t q = 0; q < per_panel; ++q)
        *reinterpret_cast<Group*>(out + q * L) = *reinterpret_cast<const Group*>(src + column_offset[q * L]);
    }
}

template <int64_t L, typename T>
void pack_column_groups(const T* x_g, const int64_t* row_offset, const int64_t* column_offset, int64_t panels,
                        int64_t kc, T* dst) {
  CNNOPS_SIMD_CALL(pack_column_groups_body<L>(x_g, row_offset, column_offset, panels, kc, dst));
}

#if CNNOPS_X86
// dst[j] = src[idx[j]] for j < n: im2col columns that are not runs of consecutive values (strides,
// dilations, rows narrower than a vector), 16 a gather instruction, where the loop of single loads
// and stores took 60% of the micro-kernel's own time (3x3 stride 2).
CNNOPS_TARGET_AVX512 inline void gather_row_avx512(const float* src, const int32_t* idx, int64_t n, float* dst) {
  int64_t j = 0;
  const __m512 zero = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_mask_i32gather_ps(zero, __mmask16(0xffff), _mm512_loadu_si512(idx + j), src, 4));
  if (j < n) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512i at = _mm512_maskz_loadu_epi32(lanes, idx + j);
    _mm512_mask_storeu_ps(dst + j, lanes, _mm512_mask_i32gather_ps(zero, lanes, at, src, 4));
  }
}

// B panels of kc im2col rows (row kk at x_g + row_offset[kk]), jc columns at offsets idx[j]: panel
// p, row kk goes to dst + (p * kc + kk) * NR.
CNNOPS_TARGET_AVX512 void pack_gathered_avx512(const float* x_g, const int64_t* row_offset, const int32_t* idx,
                                               int64_t jc, int64_t kc, float* dst) {
  constexpr int64_t nr = gemm_nr<float>();
  for (int64_t p = 0; p * nr < jc; ++p)
    for (int64_t kk = 0; kk < kc; ++kk)
      gather_row_avx512(x_g + row_offset[kk], idx + p * nr, std::min(nr, jc - p * nr), dst + (p * kc + kk) * nr);
}

// Rows [r0, r1) of a row-major im2col block: row r (at x_g + row_offset[r]) to dst + r * ld.
CNNOPS_TARGET_AVX512 void im2col_gathered_avx512(const float* x_g, const int64_t* row_offset, int64_t r0, int64_t r1,
                                                 const int32_t* idx, int64_t n, float* dst, int64_t ld) {
  for (int64_t r = r0; r < r1; ++r) gather_row_avx512(x_g + row_offset[r], idx, n, dst + r * ld);
}
#endif

// The column offsets as int32 gather indices when the AVX-512 float kernels above serve T and
// every offset fits, else empty.
template <typename T>
std::vector<int32_t> gather_indices(const std::vector<int64_t>& column_offset) {
  if (!CNNOPS_X86 || !std::is_same_v<T, float> || cpu_isa() != Isa::Avx512) return {};
  std::vector<int32_t> idx(column_offset.size());
  for (size_t j = 0; j < column_offset.size(); ++j) {
    if (column_offset[j] < 0 || column_offset[j] > INT32_MAX) return {};
    idx[j] = static_cast<int32_t>(column_offset[j]);
  }
  return idx;
}

// The im2col matrix of each group in blocks of `block` columns, written once, in parallel:
// cols[(grp * blocks + b) * K * block + r * block + j] is row r, column b * block + j (zero past
// the last column), with NR values of slack for the reads of the last rows' padded panels.
template <typename T>
Scratch<T> im2col_blocks(const ConvGeometry& g, const T* x, WeightOrder order, int64_t blocks, int64_t block) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t k = g.gemm_k(), l = g.out_plane(), total = g.batch * l, cg = g.in_channels_per_group();
  const bool pointwise = g.is_pointwise();
  const PaddedLayout layout(g);
  const OperandVector<T> padded = pointwise ? OperandVector<T>() : pad_planes(g, layout, x, g.batch * g.in_channels);
  const std::vector<int64_t> im2col_rows = im2col_row_offsets(g, layout, order);
  const int64_t block_size = checked_numel({k, block}, "conv (im2col blocks)", true);
  const int64_t size = checked_numel({g.groups, blocks, block_size}, "conv (im2col blocks)", true);
  auto cols = scratch<T>(size + nr);
  std::fill(cols.get() + size, cols.get() + size + nr, T(0));
  const int64_t row_chunks = num_blocks(k, 64);
  parallel_for(0, g.groups * blocks * row_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % row_chunks, gb = task / row_chunks, grp = gb / blocks, c0 = gb % blocks * block;
      const int64_t nc = std::min(block, total - c0), r0 = chunk * 64, r1 = std::min(k, r0 + 64);
      T* dst = cols.get() + gb * block_size;
      if (pointwise) {  // im2col(X) is X
        for (int64_t r = r0; r < r1; ++r)
          for_each_sample_segment(c0, nc, l, [&](int64_t n, int64_t l0, int64_t len, int64_t offset) {
            copy_values(dst + r * block + offset, x + (n * g.in_channels + grp * cg + r) * l + l0, len);
          });
      } else {
        const std::vector<int64_t> column_offset = im2col_column_offsets(g, layout, c0, nc);
        const std::vector<int32_t> idx = gather_indices<T>(column_offset);
        const T* x_g = padded.data() + grp * cg * layout.plane;
        if constexpr (CNNOPS_X86 && std::is_same_v<T, float>) {
          if (!idx.empty()) im2col_gathered_avx512(x_g, im2col_rows.data(), r0, r1, idx.data(), nc, dst, block);
        }
        if (idx.empty()) {
          for (int64_t r = r0; r < r1; ++r) {
            const T* src = x_g + im2col_rows[r];
            for (int64_t j = 0; j < nc; ++j) dst[r * block + j] = src[column_offset[j]];
          }
        }
      }
      for (int64_t r = r0; r < r1; ++r) std::fill(dst + r * block + nc, dst + (r + 1) * block, T(0));
    }
  });
  return cols;
}

// The forward kernels conv_forward_any picks from, counted per call so the tests can show which
// ones a grid of cases reaches (conv_forward_route_counts).
enum class ForwardRoute {
  WindowDot,
  SpaceToDepth,
  Grouped,
  FirstLayer,
  Winograd,
  Depthwise,
  Nhwc,
  Shifted,
  Gemm,
  GemmSplit,
  Subsampled,
  kCount
};
constexpr const char* kForwardRouteNames[] = {"window_dot", "space_to_depth", "grouped", "first_layer",
                                              "winograd",   "depthwise",      "nhwc",    "shifted",
                                              "gemm",       "gemm_split",     "subsampled"};
static_assert(std::size(kForwardRouteNames) == size_t(ForwardRoute::kCount));
std::atomic<int64_t> forward_route_calls[size_t(ForwardRoute::kCount)];
void count_route(ForwardRoute route) { forward_route_calls[size_t(route)].fetch_add(1, std::memory_order_relaxed); }

// conv_forward_gemm when its output channels are split between tasks (few column blocks: small
// maps, batch 1). Every row task would pack the same im2col panels, so the im2col blocks are
// written once, in parallel, row-major (K x block, zero past the block's columns), and each
// task's GEMM reads them in place (rows `block` apart). The weight is read in place too, unless
// the weight cache holds it packed: the product reads each weight value only a few times, and
// packing it (a 512 x 4608 weight: 9 MB read and written) cost about as much as the product.
template <typename T>
void conv_forward_gemm_split(const ConvGeometry& g, const T* x, const T* w, WeightOrder order,
                             const std::vector<PackedA<T>>* packed, const T* bias, T* y, Activation activation,
                             int64_t blocks, int64_t block, const RowSplit& rows) {
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), l = g.out_plane(), total = g.batch * l;
  const int64_t block_size = k * block;
  // A 1x1 stride-1 layer's im2col is X itself: at batch 1 every block lies in the one sample, whose
  // rows the GEMM then reads in place.
  const bool x_in_place = g.is_pointwise() && g.batch == 1;
  const auto cols = x_in_place ? nullptr : im2col_blocks(g, x, order, blocks, block);
  std::vector<int64_t> row_offset(k), a_offset(k);
  for (int64_t r = 0; r < k; ++r) row_offset[r] = r * (x_in_place ? l : block), a_offset[r] = r;
  parallel_for(0, g.groups * blocks * rows.count, 1, [&](int64_t begin, int64_t end) {
    const auto tile = scratch<T>(m * block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_block = rows.row_block(task, g.groups * blocks);
      const int64_t gb = rows.column_task(task, g.groups * blocks);
      const int64_t grp = gb / blocks, c0 = gb % blocks * block, nc = std::min(block, total - c0);
      const int64_t row_begin = row_block * rows.size, row_end = std::min(m, row_begin + rows.size);
      auto y_ng = [&](int64_t n) { return y + (n * g.out_channels + grp * m) * l; };
      const T* row_bias = bias ? bias + grp * m : nullptr;
      const T* b = x_in_place ? x + grp * g.in_channels_per_group() * l + c0 : cols.get() + gb * block_size;
      // rows [row_begin, row_end) of C = W_g * B, C's row i at c + i * ldc
      auto product = [&](T* c, int64_t ldc) {
        if (packed) {
          gemm_shifted_b<T>((*packed)[grp], nc, b, row_offset.data(), c, ldc, row_bias, false, row_begin, row_end,
                            activation);
        } else {
          gemm_shifted_ab<T>(row_end - row_begin, k, w + (grp * m + row_begin) * k, k, a_offset.data(), nc, b,
                             row_offset.data(), c + row_begin * ldc, ldc, row_bias ? row_bias + row_begin : nullptr,
                             false, activation);
        }
      };
      const int64_t n_first = c0 / l, l_first = c0 % l;
      if (l_first + nc <= l) {  // inside one sample: write the output directly
        product(y_ng(n_first) + l_first, l);
        continue;
      }
      product(tile.get(), nc);
      for_each_sample_segment(c0, nc, l, [&](int64_t n, int64_t l0, int64_t len, int64_t offset) {
        for (int64_t i = row_begin; i < row_end; ++i)
          copy_values(y_ng(n) + i * l + l0, tile.get() + i * nc + offset, len);
      });
    }
  });
}

// Columns run over the flat (sample, output position) index, so small images (7x7 in deep
// layers) still give full-width GEMM calls. A block that spans samples is written to each
// sample's rows in place when every GEMM panel lies inside one sample (8x8), else computed into
// a tile and then copied.
template <typename T>
void conv_forward_gemm(const ConvGeometry& g, const T* x, const T* w, WeightOrder order, const T* bias, T* y,
                       Activation activation) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), l = g.out_plane();
  const int64_t total = g.batch * l, blocks = num_blocks(total, kColumnBlock);
  const int64_t block = num_blocks(num_blocks(total, blocks), gemm_nr<T>()) * gemm_nr<T>();  // even blocks
  // Few column blocks (small images) but many output channels: split the rows too. Otherwise the
  // column blocks are balanced (ColumnBlocks) instead.
  const RowSplit rows(m, gemm_mr<T>(), g.groups * blocks);
  count_route(rows.count > 1 ? ForwardRoute::GemmSplit : ForwardRoute::Gemm);
  if (rows.count > 1 && !weight_cache_serves(w))
    return conv_forward_gemm_split<T>(g, x, w, order, nullptr, bias, y, activation, blocks, block, rows);
  const auto packed = packed_group_weights(g, w);  // packed once (or cached), shared by every task
  const std::vector<PackedA<T>>& weights = *packed;
  if (rows.count > 1)
    return conv_forward_gemm_split(g, x, w, order, &weights, bias, y, activation, blocks, block, rows);
  const bool pointwise = g.is_pointwise();
  const PaddedLayout layout(g);  // im2col through offset tables on a padded copy (conv_im2col.h)
  const OperandVector<T> padded = pointwise ? OperandVector<T>() : pad_planes(g, layout, x, g.batch * g.in_channels);
  const std::vector<int64_t> row_offset = im2col_row_offsets(g, layout, order);
  // A 1x1 layer with few output channels reads X in place: packing B then costs as much as the
  // product, which uses each packed value only m times (1 thread, 64x256x3136: 0.62 -> 0.80 of
  // torch.mm). With more rows, and the long reductions they come with, packing pays.
  constexpr int64_t kPointwiseInPlaceRows = 128;
  std::vector<int64_t> pointwise_rows(pointwise ? g.gemm_k() : 0);
  for (int64_t r = 0; r < int64_t(pointwise_rows.size()); ++r) pointwise_rows[r] = r * l;
  const ColumnBlocks columns(total, nr, g.groups);
  parallel_for(0, g.groups * columns.count, 1, [&](int64_t begin, int64_t end) {
    const auto workspace = scratch<T>(gemm_workspace_size<T>(columns.max_size()));
    const auto tile = scratch<T>(m * columns.max_size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / columns.count, c0 = columns.begin(task % columns.count);
      const int64_t nc = columns.size(task % columns.count);
      const int64_t channel0 = grp * g.in_channels_per_group();
      auto y_ng = [&](int64_t n) { return y + (n * g.out_channels + grp * m) * l; };
      const std::vector<int64_t> column_offset =
          pointwise ? std::vector<int64_t>() : im2col_column_offsets(g, layout, c0, nc);
      const int64_t group = consecutive_column_groups(column_offset, nr);
      const std::vector<int32_t> idx = group == 0 ? gather_indices<T>(column_offset) : std::vector<int32_t>();
      auto pack = [&](int64_t k0, int64_t kc, int64_t j0, int64_t jc, T* dst) {
        if (pointwise) {  // 1x1 stride 1: im2col(X) is X itself
          for_each_sample_segment(c0 + j0, jc, l, [&](int64_t n, int64_t l0, int64_t len, int64_t offset) {
            pack_b_strided(x + (n * g.in_channels + channel0) * l + l0, l, int64_t(1), k0, kc, int64_t(0), len, dst,
                           offset);
          });
        } else {
          const T* x_g = padded.data() + channel0 * layout.plane;
          const int64_t* cols0 = column_offset.data() + j0;
          switch (jc % nr == 0 ? group : 0) {  // small images: whole output rows moved as vectors
            case 4:
              return pack_column_groups<4>(x_g, &row_offset[k0], cols0, jc / nr, kc, dst);
            case 8:
              return pack_column_groups<8>(x_g, &row_offset[k0], cols0, jc / nr, kc, dst);
            case 16:
              return pack_column_groups<16>(x_g, &row_offset[k0], cols0, jc / nr, kc, dst);
          }
          if constexpr (CNNOPS_X86 && std::is_same_v<T, float>) {
            if (!idx.empty()) {
              pack_gathered_avx512(x_g, &row_offset[k0], idx.data() + j0, jc, kc, dst);
              return zero_panel_tail(kc, jc, dst);
            }
          }
          for (int64_t p = 0; p * nr < jc; ++p)
            for (int64_t kk = 0; kk < kc; ++kk) {
              const T* src = x_g + row_offset[k0 + kk];
              const int64_t* cols = cols0 + p * nr;
              T* out = dst + (p * kc + kk) * nr;
              for (int64_t q = 0; q < std::min(nr, jc - p * nr); ++q) out[q] = src[cols[q]];
            }
        }
        zero_panel_tail(kc, jc, dst);
      };
      const T* row_bias = bias ? bias + grp * m : nullptr;
      const int64_t n_first = c0 / l, l_first = c0 % l;
      if (l_first + nc <= l) {                          // inside one sample: write the output directly
        if (pointwise && m <= kPointwiseInPlaceRows) {  // B = X's rows, read where they lie
          const T* x_ng = x + (n_first * g.in_channels + channel0) * l + l_first;
          gemm_shifted_b<T>(weights[grp], nc, x_ng, pointwise_rows.data(), y_ng(n_first) + l_first, l, row_bias, false,
                            0, -1, activation);
        } else {
          gemm<T>(weights[grp], nc, pack, y_ng(n_first) + l_first, l, row_bias, false, workspace.get(), 0, -1,
                  activation);
        }
        continue;
      }
      if (l % nr == 0) {  // every panel inside one sample (8x8 images): each written in place
        std::vector<int64_t> panel_offset(num_blocks(nc, nr));
        for (int64_t p = 0; p < num_blocks(nc, nr); ++p)
          panel_offset[p] = y_ng((c0 + p * nr) / l) - y_ng(0) + (c0 + p * nr) % l;
        gemm<T>(weights[grp], nc, pack, y_ng(0), l, row_bias, false, workspace.get(), 0, -1, activation,
                panel_offset.data());
        continue;
      }
      gemm<T>(weights[grp], nc, pack, tile.get(), nc, row_bias, false, workspace.get(), 0, -1, activation);
      for_each_sample_segment(c0, nc, l, [&](int64_t n, int64_t l0, int64_t len, int64_t offset) {
        for (int64_t i = 0; i < m; ++i) copy_values(y_ng(n) + i * l + l0, tile.get() + i * nc + offset, len);
      });
    }
  });
}

// The general grad input (strided convolutions): dX_ng = col2im(W_g^T * dY_ng), a column block
// at a time. col2im adds each im2col entry back where the forward read it, through the offset
// tables, into a padded dX whose border is dropped at the end.
template <typename T>
void conv_backward_input_gemm(const ConvGeometry& g, const T* dy, const T* w, WeightOrder order, T* dx) {
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), l = g.out_plane();
  const int64_t cg = g.in_channels_per_group();
  std::vector<PackedA<T>> weights_t;  // W_g^T: K x M
  for (int64_t grp = 0; grp < g.groups; ++grp) weights_t.push_back(pack_a(k, m, w + grp * m * k, int64_t(1), k));
  const PaddedLayout layout(g);
  const std::vector<int64_t> row_offset = im2col_row_offsets(g, layout, order);
  // A task owns one (sample, group) slice of dX, so the col2im additions never race.
  parallel_for(0, g.batch * g.groups, 1, [&](int64_t begin, int64_t end) {
    const auto workspace = scratch<T>(gemm_workspace_size<T>(kColumnBlock));
    const auto col = scratch<T>(k * kColumnBlock);
    std::vector<T> dx_padded(cg * layout.plane);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task % g.groups, n = task / g.groups;
      const T* dy_ng = dy + (n * g.out_channels + grp * m) * l;
      std::fill(dx_padded.begin(), dx_padded.end(), T(0));
      for (int64_t n0 = 0; n0 < l; n0 += kColumnBlock) {
        const int64_t nc = std::min(kColumnBlock, l - n0);
        auto pack = [&](int64_t k0, int64_t kc, int64_t j0, int64_t jc, T* dst) {
          pack_b_strided(dy_ng, l, int64_t(1), k0, kc, n0 + j0, jc, dst);
          zero_panel_tail(kc, jc, dst);
        };
        gemm<T>(weights_t[grp], nc, pack, col.get(), nc, nullptr, false, workspace.get());
        const std::vector<int64_t> column_offset = im2col_column_offsets(g, layout, n0, nc);  // sample 0's
        for (int64_t r = 0; r < k; ++r) {
          T* dst = dx_padded.data() + row_offset[r];
          const T* src = col.get() + r * nc;
          for (int64_t j = 0; j < nc; ++j) dst[column_offset[j]] += src[j];
        }
      }
      unpad_planes(g, layout, dx_padded.data(), cg, dx + (n * g.in_channels + grp * cg) * g.in_plane());
    }
  });
}

// Narrow groups run the direct kernels of conv_grouped.cpp, unless Winograd takes the layer (only
// when tests force it: by its size rules it needs 64 channels a group).
bool use_grouped(const ConvGeometry& g, bool is_float) {
  return use_grouped_direct(g) && !(is_float && use_winograd(g));
}

std::atomic<int64_t> weight_conversions{0};

// A weight as the kernels read it: where it lies, in its WeightOrder, or (for the kernels that read
// only ChannelTap) rewritten in that order on the first channel_tap() call.
template <typename T>
class KernelWeight {
 public:
  KernelWeight(const ConvGeometry& g, const T* w, WeightOrder order) : g_(g), w_(w), order_(order) {}
  const T* data() const { return w_; }
  WeightOrder order() const { return order_; }
  const T* channel_tap() {
    if (order_ == WeightOrder::ChannelTap) return w_;
    weight_conversions.fetch_add(1, std::memory_order_relaxed);
    const int64_t k = g_.gemm_k(), taps = g_.kernel_volume(), cg = g_.in_channels_per_group();
    converted_.resize(g_.out_channels * k);
    parallel_for(0, g_.out_channels, 16, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o)
        for (int64_t tap = 0; tap < taps; ++tap)
          for (int64_t c = 0; c < cg; ++c) converted_[o * k + c * taps + tap] = w_[o * k + tap * cg + c];
    });
    order_ = WeightOrder::ChannelTap;
    return w_ = converted_.data();
  }

 private:
  const ConvGeometry& g_;
  const T* w_;
  WeightOrder order_;
  std::vector<T> converted_;
};

// Whether Winograd suits g where the kernels before it in conv_forward_any do not take it. Narrow
// layers (fewer than 64 channels on a side) on maps up to 16x16 run faster on the NHWC row segments
// (DenseNet's 128->32 3x3 at 14x14, batch 8, torch/cnnops: forward 0.93 vs Winograd's 0.71 at 1
// thread); from 28x28 Winograd is ahead (forward 1.16 vs 0.86, grad input 1.22 vs 0.88).
bool winograd_serves(const ConvGeometry& g, bool nhwc) {
  const bool narrow_segments = nhwc && !winograd_size_rules_replaced() &&
                               std::min(g.in_channels_per_group(), g.out_channels_per_group()) < 64 &&
                               g.out_plane() <= 256 && nhwc_row_segments_serve(g);
  return use_winograd(g) && !narrow_segments;
}

// Whether conv_forward_any runs g (float32) through Winograd, unless an input is not finite.
bool forward_runs_winograd(const ConvGeometry& g, bool nhwc) {
  return !use_window_dot(g, nhwc) && !use_space_to_depth(g) && !use_grouped(g, true) && winograd_serves(g, nhwc);
}

// g's 3x3 (3x3x3) weight w, in `order`, as Winograd reads it in place. Rotated: g is the transposed problem
// of conv_backward_input_as_forward, whose kernel is w (the forward's weight) turned 180 degrees
// with its channels swapped: g's (co, ci) is w's (ci, co).
WinogradWeightView winograd_view(const ConvGeometry& g, const float* w, WeightOrder order, bool rotated) {
  const int64_t co_g = g.out_channels_per_group(), ci_g = g.in_channels_per_group(), taps = g.kernel_volume();
  const int64_t w_cin = rotated ? co_g : ci_g;  // input channels a group of the weight as it lies
  // Strides of the weight's own (output channel, input channel, tap) in its order.
  const int64_t o_stride = taps * w_cin, i_stride = order == WeightOrder::ChannelTap ? taps : 1;
  const int64_t t_stride = order == WeightOrder::ChannelTap ? 1 : w_cin;
  const int64_t group_stride = taps * co_g * ci_g;
  const int64_t co_stride = rotated ? i_stride : o_stride, ci_stride = rotated ? o_stride : i_stride;
  const float* end = w + g.groups * group_stride;
  return WinogradWeightView{w, co_stride, ci_stride, t_stride, group_stride, g.kernel[0], rotated, end};
}

// A 1x1 convolution without padding and with a stride reads only every stride-th input position:
// those, copied into a dense (N, C_in, D_out, H_out, W_out) input, make it a pointwise one whose
// product reads X in place, where the strided one gathers im2col columns (ResNet's 512->1024
// downsampling at 28x28, batch 8, 2 threads: 5.4 -> 4.2 ms). NCHW: channels-last inputs pick
// the strided positions as they pack rows.
bool use_subsampled_pointwise(const ConvGeometry& g, bool nhwc) {
  if (nhwc) return false;
  bool strided = false;
  for (int i = 0; i < 3; ++i) {
    if (g.kernel[i] != 1 || g.pad[i] != 0) return false;
    strided = strided || g.stride[i] != 1;
  }
  return strided;
}

// x's positions that g's 1x1 windows read: xs[n, c, od, oh, ow] = x[n, c, od * s_d, oh * s_h, ow * s_w].
template <typename T>
void subsample_positions(const ConvGeometry& g, const T* x, T* xs) {
  const int64_t in_plane = g.in_plane(), out_plane = g.out_plane();
  at::parallel_for(0, g.batch * g.in_channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T* src = x + p * in_plane;
      T* dst = xs + p * out_plane;
      for (int64_t od = 0; od < g.out[0]; ++od)
        for (int64_t oh = 0; oh < g.out[1]; ++oh) {
          const T* row = src + (od * g.stride[0] * g.in[1] + oh * g.stride[1]) * g.in[2];
          for (int64_t ow = 0; ow < g.out[2]; ++ow) *dst++ = row[ow * g.stride[2]];
        }
    }
  });
}

// The forward kernel that suits the geometry and layout (x and y channels-last when nhwc).
// Each applies the activation in its own output step, where the bias is added. The GEMM kernels
// read the weight in either order; the others get it in ChannelTap order.
template <typename T>
void conv_forward_any(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, bool nhwc,
                      Activation activation, WeightOrder order = WeightOrder::ChannelTap) {
  KernelWeight<T> weight(g, w, order);
  if (use_window_dot(g, nhwc)) {  // 1x1 maps
    count_route(ForwardRoute::WindowDot);
    return conv_forward_window_dot(g, x, weight.channel_tap(), bias, y, activation);
  }
  if (use_space_to_depth(g)) {  // the 7x7 stride-2 stem as a stride-1 convolution
    SpaceToDepth<T> s;
    if (space_to_depth(g, x, weight.channel_tap(), nhwc, s)) {
      count_route(ForwardRoute::SpaceToDepth);
      return conv_forward_any(s.g, s.x.data(), s.w.data(), bias, y, nhwc, activation);
    }
  }
  if (use_grouped(g, std::is_same_v<T, float>)) {
    if (use_first_layer(g)) {  // groups = 1: no phase planes
      count_route(ForwardRoute::FirstLayer);
      return conv_first_layer_forward(g, x, weight.channel_tap(), bias, y, activation, nhwc);
    }
    count_route(ForwardRoute::Grouped);
    return conv_grouped_forward(g, x, weight.channel_tap(), bias, y, activation, nhwc);
  }
  if (use_subsampled_pointwise(g, nhwc)) {
    count_route(ForwardRoute::Subsampled);
    ConvGeometry pointwise = g;
    for (int i = 0; i < 3; ++i) pointwise.in[i] = g.out[i], pointwise.stride[i] = 1, pointwise.dilation[i] = 1;
    thread_local KeptStorage kept;
    Scratch<T> fresh;
    T* xs = kept.values<T>(g.batch * g.in_channels * g.out_plane(), fresh);
    subsample_positions(g, x, xs);
    return conv_forward_any(pointwise, static_cast<const T*>(xs), w, bias, y, nhwc, activation, order);
  }
  if constexpr (std::is_same_v<T, float>) {  // 3x3 stride 1: Winograd (winograd_tile) where it pays
    if (winograd_serves(g, nhwc) &&
        conv_forward_winograd(g, x, winograd_view(g, w, order, false), bias, y, nhwc, activation))
      return count_route(ForwardRoute::Winograd);
  }
  // (grad input's transposed problem may be depthwise in NHWC where no depthwise kernel serves it)
  if (g.is_depthwise() && (!nhwc || depthwise_nhwc_supported(g, std::is_same_v<T, double>))) {
    count_route(ForwardRoute::Depthwise);
    conv_depthwise_forward(g, x, weight.channel_tap(), bias, y, activation, nhwc);
  } else if (nhwc) {
    count_route(ForwardRoute::Nhwc);
    conv_forward_nhwc(g, x, weight.data(), weight.order(), bias, y, activation);
  } else if (use_shifted_grid(g)) {
    count_route(ForwardRoute::Shifted);
    if (use_shifted_rows(g)) return conv_forward_shifted_rows(g, x, weight.data(), weight.order(), bias, y, activation);
    conv_forward_shifted(g, x, weight.data(), weight.order(), bias, y, activation);
  } else {
    conv_forward_gemm(g, x, weight.data(), weight.order(), bias, y, activation);  // counts Gemm or GemmSplit
  }
}

// The transposed problem t of conv_backward_input_as_forward with few columns (small maps, batch
// 1), NCHW: the rotated weight is read in place as the GEMM's A,
//   A_g[c, (m, r)] = W[g*M + m, c, taps - 1 - r]          (formulas.md §Conv backward)
// so the call neither rotates nor packs the whole weight, which the product reads only a few
// times. im2col(dY) blocks are written once and read in place; the rows (dX's channels) are split
// between tasks as in conv_forward_gemm_split. No sum depends on the split.
template <typename T>
void conv_backward_input_small(const ConvGeometry& t, const T* dy, const T* w, WeightOrder order, T* dx) {
  const int64_t m = t.out_channels_per_group(), k = t.gemm_k(), l = t.out_plane(), total = t.batch * l;
  const int64_t cg = t.in_channels_per_group(), taps = t.kernel_volume();
  const int64_t blocks = num_blocks(total, kColumnBlock);
  const int64_t block = num_blocks(num_blocks(total, blocks), gemm_nr<T>()) * gemm_nr<T>();
  const RowSplit rows(m, gemm_mr<T>(), t.groups * blocks);
  const int64_t block_size = k * block;
  const auto cols = im2col_blocks(t, dy, WeightOrder::ChannelTap, blocks, block);  // im2col(dY)
  std::vector<int64_t> row_offset(k), a_offset(k);
  for (int64_t r = 0; r < k; ++r) row_offset[r] = r * block;
  // W[o, c, tap] at o * m * taps + c * c_step + tap * tap_step (m: W's input channels a group).
  const bool tap_channel = order == WeightOrder::TapChannel;
  const int64_t c_step = tap_channel ? 1 : taps, tap_step = tap_channel ? m : 1;
  // Column (j, r) of A (j: dY's channel in the group, r: tap) at W[j, 0, taps - 1 - r]; row c adds c * c_step.
  for (int64_t j = 0; j < cg; ++j)
    for (int64_t r = 0; r < taps; ++r) a_offset[j * taps + r] = j * m * taps + (taps - 1 - r) * tap_step;
  parallel_for(0, t.groups * blocks * rows.count, 1, [&](int64_t begin, int64_t end) {
    const auto tile = scratch<T>(m * block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_block = rows.row_block(task, t.groups * blocks);
      const int64_t gb = rows.column_task(task, t.groups * blocks);
      const int64_t grp = gb / blocks, c0 = gb % blocks * block, nc = std::min(block, total - c0);
      const int64_t row_begin = row_block * rows.size, row_end = std::min(m, row_begin + rows.size);
      auto dx_ng = [&](int64_t n) { return dx + (n * t.out_channels + grp * m) * l; };
      const T* a = w + grp * cg * m * taps + row_begin * c_step;  // W's group grp, input channel row_begin
      const T* b = cols.get() + gb * block_size;
      const int64_t n_first = c0 / l, l_first = c0 % l;
      if (l_first + nc <= l) {  // inside one sample: write dX directly
        gemm_shifted_ab<T>(row_end - row_begin, k, a, c_step, a_offset.data(), nc, b, row_offset.data(),
                           dx_ng(n_first) + row_begin * l + l_first, l, nullptr, false);
        continue;
      }
      gemm_shifted_ab<T>(row_end - row_begin, k, a, c_step, a_offset.data(), nc, b, row_offset.data(),
                         tile.get() + row_begin * nc, nc, nullptr, false);
      for_each_sample_segment(c0, nc, l, [&](int64_t n, int64_t l0, int64_t len, int64_t offset) {
        for (int64_t i = row_begin; i < row_end; ++i)
          copy_values(dx_ng(n) + i * l + l0, tile.get() + i * nc + offset, len);
      });
    }
  });
}

// Whether conv_backward_input_small serves the transposed problem t: NCHW, not depthwise nor
// Winograd, and at most two column blocks, where rotating and packing the whole weight costs
// more than the product saves by reading it packed.
bool use_backward_input_small(const ConvGeometry& t, bool nhwc, bool is_float) {
  if (nhwc || t.is_depthwise() || (is_float && use_winograd(t))) return false;
  return double(t.batch) * double(t.out_plane()) <= double(2 * kColumnBlock);
}

// For stride 1, dX = dY correlated with the kernel rotated 180 degrees and its in/out channels
// swapped, zero padded by d(k-1) - p (formulas.md §Conv backward): a forward
// convolution, with no col2im scatter. Returns false when it does not apply (stride > 1, or
// padding beyond the dilated kernel).
template <typename T>
bool conv_backward_input_as_forward(const ConvGeometry& g, const T* dy, const T* w, WeightOrder order, T* dx,
                                    bool nhwc) {
  ConvGeometry t = g;  // the transposed problem: dY in, dX out
  std::swap(t.in_channels, t.out_channels);
  for (int i = 0; i < 3; ++i) {
    if (g.stride[i] != 1) return false;
    t.in[i] = g.out[i];
    t.out[i] = g.in[i];
    t.pad[i] = g.dilation[i] * (g.kernel[i] - 1) - g.pad[i];
    if (t.pad[i] < 0) return false;
  }
  if (use_backward_input_small(t, nhwc, std::is_same_v<T, float>)) {
    conv_backward_input_small(t, dy, w, order, dx);
    return true;
  }
  if constexpr (std::is_same_v<T, float>) {  // Winograd reads the rotated kernel in place
    if (forward_runs_winograd(t, nhwc) &&
        conv_forward_winograd(t, dy, winograd_view(t, w, order, true), nullptr, dx, nhwc, Activation::None)) {
      count_route(ForwardRoute::Winograd);
      return true;
    }
  }
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t taps = g.kernel_volume();
  thread_local KeptStorage kept_rotated;
  Scratch<T> fresh_rotated;
  T* const rotated = kept_rotated.values<T>(g.out_channels * cin_g * taps, fresh_rotated);  // [C_in][C_out/g][taps]
  // A transpose of (m, c) with the taps reversed, in 16 x 16 tiles: row by row it would write
  // (or read) one value per cache line, milliseconds for a 2048 x 512 weight.
  constexpr int64_t tile = 16;
  const int64_t c_tiles = num_blocks(cin_g, tile), m_tiles = num_blocks(cout_g, tile);
  const int64_t tap_step = weight_column(g, order, 0, 1) - weight_column(g, order, 0, 0);
  parallel_for(0, g.groups * c_tiles * m_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t grp = t / (c_tiles * m_tiles), c0 = t / m_tiles % c_tiles * tile, m0 = t % m_tiles * tile;
      for (int64_t c = c0; c < std::min(cin_g, c0 + tile); ++c)
        for (int64_t m = m0; m < std::min(cout_g, m0 + tile); ++m) {
          const T* src = w + (grp * cout_g + m) * cin_g * taps + weight_column(g, order, c, 0);
          T* dst = rotated + ((grp * cin_g + c) * cout_g + m) * taps;
          for (int64_t r = 0; r < taps; ++r) dst[taps - 1 - r] = src[r * tap_step];
        }
    }
  });
  conv_forward_any(t, dy, static_cast<const T*>(rotated), static_cast<const T*>(nullptr), dx, nhwc, Activation::None);
  return true;
}

#if defined(__SSE2__)
// Four rows of 4 floats stored as four columns: dst[k * stride + j] = r_j[k].
inline void store_transposed_4x4(__m128 r0, __m128 r1, __m128 r2, __m128 r3, float* dst, int64_t stride) {
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(dst, r0);
  _mm_storeu_ps(dst + stride, r1);
  _mm_storeu_ps(dst + 2 * stride, r2);
  _mm_storeu_ps(dst + 3 * stride, r3);
}
#endif

// dW_g = sum over chunks of dY_chunk * im2col(X)_chunk^T (see reduce_weight_gradient).
// One B panel of the weight gradient: B[i, q] = x_g[rows[q] + columns[i]] for positions
// i in [0, kc) and im2col rows q in [0, cols), panel row i at out + i * NR: the transpose of
// an im2col block. Where four positions are adjacent in memory (stride 1, inside one output
// row), SSE transposes 4 x 4 tiles of them; elsewhere it is an element-by-element gather.
template <typename T, int64_t NR>
void pack_transposed_im2col_panel(const T* x_g, const int64_t* rows, int64_t cols, const int64_t* columns, int64_t kc,
                                  T* out) {
  auto gather_row = [&](int64_t i) {
    const T* src = x_g + columns[i];
    for (int64_t q = 0; q < cols; ++q) out[i * NR + q] = src[rows[q]];
  };
  int64_t i = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    for (; cols == NR && i + 4 <= kc; i += 4) {
      if (columns[i + 3] != columns[i] + 3) {
        for (int64_t t = 0; t < 4; ++t) gather_row(i + t);
        continue;
      }
      const float* base = x_g + columns[i];
      for (int64_t q = 0; q < NR; q += 4) {
        store_transposed_4x4(_mm_loadu_ps(base + rows[q]), _mm_loadu_ps(base + rows[q + 1]),
                             _mm_loadu_ps(base + rows[q + 2]), _mm_loadu_ps(base + rows[q + 3]), out + i * NR + q, NR);
      }
    }
  }
#endif
  for (; i < kc; ++i) gather_row(i);
}

std::atomic<int64_t> weight_rows_calls{0};

// Whether conv_backward_weight_rows serves g: stride 1, a kernel of several taps, one B panel
// (more than half of it used) of output channels a group, and whole A panels of input channels
// per tap. Measured (1 thread): conv3d 32->32 16x28x28 k3 14.2 -> 11.5 ms, conv1d 64->32 k9
// 12.8 -> 10.4 ms; slower with two B panels (conv1d 64->64 k9: 22.5 -> 24.1 ms), on 1x1 layers
// (96->24 56x56: 1.5 -> 1.8 ms, the untransposed product packs no gathered im2col there) and
// with half a panel (16 channels).
bool use_backward_weight_rows(const ConvGeometry& g, int64_t mr, int64_t nr) {
  for (int i = 0; i < 3; ++i)
    if (g.stride[i] != 1) return false;
  const int64_t m = g.out_channels_per_group();
  return g.kernel_volume() > 1 && 2 * m > nr && m <= nr && g.in_channels_per_group() % mr == 0;
}

// The weight gradient transposed, for few output channels a group (one B panel: 17-32 in float32,
// as in conv1d/conv3d layers of 32 channels): dW_g^T[K, M] = im2col(X_g)[K, R] * dY_g^T[R, M], R
// the (sample, position) range. The untransposed product packs im2col (K x R values) for only
// M / MR A panels; here the packed operand is dY^T (M x R), used by all K / MR panels, and im2col
// is read where it lies, rows in (tap, channel) order so a panel's rows are one plane apart. R is
// cut into chunks summed into up to 8 partials (WeightGradientChunks, as reduce_weight_gradient), the rows into
// slices; both fixed by the sizes.
template <typename T>
void conv_backward_weight_rows(const ConvGeometry& g, const T* dy, const T* x_base, const PaddedLayout& layout, T* dw) {
  constexpr int64_t nr = gemm_nr<T>();
  weight_rows_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), l = g.out_plane();
  const int64_t cg = g.in_channels_per_group(), taps = g.kernel_volume();
  const WeightGradientChunks split(g);
  const int64_t total = split.total, chunks = split.chunks, partials = split.partials;
  const int64_t slice = 16 * gemm_mr<T>(), slices = num_blocks(k, slice), padded_m = num_blocks(m, nr) * nr;
  const std::vector<int64_t> row_offset = im2col_row_offsets(g, layout, WeightOrder::TapChannel);
  const int64_t size = checked_numel({g.groups, m, k}, "conv_backward (weight)", true);
  // B[r, j] = dY[j, r0 + r] of every chunk, packed once (in parallel) for every task that reads it:
  // chunk c of group grp at b + (grp * chunks + c) * chunk_size, as gemm's panels: reduction block
  // k0 (kKc rows) at + k0 * padded_m, its panel of columns j0 kc * NR further on, zero past M.
  const int64_t chunk_size = kColumnBlock * padded_m;
  // Kept between calls (KeptStorage): a fresh buffer of MBs was page-faulted in as it was packed, 3.1
  // of 9.5 ms on conv3d 32ch 16x28x28 batch 2 (1 thread).
  thread_local KeptStorage kept_b;
  Scratch<T> fresh_b;
  T* const b_data =
      kept_b.values<T>(checked_numel({g.groups, chunks, chunk_size}, "conv_backward (weight)", true), fresh_b);
  parallel_for(0, g.groups * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / chunks, r0 = task % chunks * kColumnBlock, rc = std::min(kColumnBlock, total - r0);
      for (int64_t k0 = 0; k0 < rc; k0 += kKc) {
        const int64_t kc = std::min(kKc, rc - k0);
        T* block = b_data + task * chunk_size + k0 * padded_m;
        for (int64_t j = m; j < padded_m; ++j)
          for (int64_t kk = 0; kk < kc; ++kk) block[(j / nr * kc + kk) * nr + j % nr] = T(0);
        for_each_sample_segment(r0 + k0, kc, l, [&](int64_t n, int64_t l0, int64_t len, int64_t offset) {
          for (int64_t j = 0; j < m; ++j) {
            const T* src = dy + (n * g.out_channels + grp * m + j) * l + l0;
            T* dst = block + (j / nr * kc + offset) * nr + j % nr;
            for (int64_t q = 0; q < len; ++q) dst[q * nr] = src[q];
          }
        });
      }
    }
  });
  const auto partial = scratch<T>(partials > 1 ? partials * size : 0);  // each value written by one task
  parallel_for(0, g.groups * partials * slices, 1, [&](int64_t begin, int64_t end) {
    const auto tile = scratch<T>(slice * m);  // rows [i0, i0 + rows) of dW_g^T
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = task % slices * slice, rows = std::min(slice, k - i0), p = task / slices % partials;
      const int64_t grp = task / slices / partials;
      const T* x_g = x_base + grp * cg * layout.plane;
      for (int64_t chunk = split.first(p); chunk < split.first(p + 1); ++chunk) {
        const int64_t r0 = chunk * kColumnBlock, rc = std::min(kColumnBlock, total - r0);
        const T* b_chunk = b_data + (grp * chunks + chunk) * chunk_size;
        const std::vector<int64_t> column_offset = im2col_column_offsets(g, layout, r0, rc);
        gemm_offset_a_packed_b<T>(
            rows, rc, x_g, row_offset.data() + i0, column_offset.data(), m,
            [&](int64_t k0, int64_t kc, int64_t j0) { return b_chunk + k0 * padded_m + j0 * kc; }, tile.get(), m,
            chunk > split.first(p));
      }
      // Row i of dW_g^T is (tap, channel) = (i / cg, i % cg): dW[grp * m + j][channel * taps + tap].
      T* out = (partials > 1 ? partial.get() + p * size : dw) + grp * m * k;
      for (int64_t i = i0; i < i0 + rows; ++i)
        for (int64_t j = 0; j < m; ++j) out[j * k + (i % cg) * taps + i / cg] = tile[(i - i0) * m + j];
    }
  });
  if (partials > 1) sum_partials(partial.get(), partials, size, dw);
}

// dW in ChannelTap order, or in `preferred` where Winograd serves (it writes either); returns the order.
template <typename T>
WeightOrder conv_backward_weight_gemm(const ConvGeometry& g, const T* dy, const T* x, T* dw, WeightOrder preferred) {
  if constexpr (std::is_same_v<T, float>) {  // 3x3 stride 1: Winograd where the forward takes it
    if (use_winograd_weight_gradient(g) && conv_backward_weight_winograd(g, dy, x, dw, /*nhwc=*/false, preferred))
      return preferred;
  }
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), l = g.out_plane();
  const PaddedLayout layout(g);
  // Without padding the padded copy would equal x: im2col reads x itself.
  const bool padding = g.pad[0] != 0 || g.pad[1] != 0 || g.pad[2] != 0;
  const OperandVector<T> padded = padding ? pad_planes(g, layout, x, g.batch * g.in_channels) : OperandVector<T>();
  const T* x_base = padding ? padded.data() : x;
  if (use_backward_weight_rows(g, gemm_mr<T>(), gemm_nr<T>())) {
    conv_backward_weight_rows(g, dy, x_base, layout, dw);
    return WeightOrder::ChannelTap;
  }
  const std::vector<int64_t> row_offset = im2col_row_offsets(g, layout);
  reduce_weight_gradient<T>(
      g, dw, [&](int64_t r0, int64_t rc, int64_t grp, int64_t j0, int64_t jw, T* dw_slice, T* workspace) {
        // A = dY over the chunk (M x rc), read in place from each sample's planes: A[i, r] at
        // dy[a_offset[r] + i * l]. B = im2col over the chunk, transposed (rc x K), packed.
        std::vector<int64_t> a_offset(rc);
        for_each_sample_segment(r0, rc, l, [&](int64_t n, int64_t l0, int64_t len, int64_t offset) {
          for (int64_t q = 0; q < len; ++q) a_offset[offset + q] = (n * g.out_channels + grp * m) * l + l0 + q;
        });
        const T* x_g = x_base + grp * g.in_channels_per_group() * layout.plane;
        const std::vector<int64_t> column_offset = im2col_column_offsets(g, layout, r0, rc);
        auto pack = [&](int64_t k0, int64_t kc, int64_t jj, int64_t jc, T* dst) {
          for (int64_t p = 0; p * nr < jc; ++p)
            pack_transposed_im2col_panel<T, nr>(x_g, row_offset.data() + j0 + jj + p * nr, std::min(nr, jc - p * nr),
                                                column_offset.data() + k0, kc, dst + p * kc * nr);
          zero_panel_tail(kc, jc, dst);
        };
        gemm_shifted_a<T>(m, rc, dy, l, a_offset.data(), jw, pack, dw_slice, g.gemm_k(), workspace, true);
      });
  return WeightOrder::ChannelTap;
}

template <typename T>
void conv_backward_bias(const ConvGeometry& g, const T* dy, T* db) {
  const int64_t l = g.out_plane();
  parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      T sum = 0;
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* plane = dy + (n * g.out_channels + c) * l;
        T plane_sum = 0;
        for (int64_t i = 0; i < l; ++i) plane_sum += plane[i];
        sum += plane_sum;
      }
      db[c] = sum;
    }
  });
}

// db[c] = sum of dY[r, c] over every (sample, position) r, in NHWC rows of C_out values: fixed
// row chunks summed lane-wise into partial rows, then added in order.
template <typename T>
void conv_backward_bias_nhwc(const ConvGeometry& g, const T* dy, T* db) {
  const int64_t rows = g.batch * g.out_plane(), c_out = g.out_channels;
  const int64_t chunks = std::min<int64_t>(rows, 8);
  std::vector<T> partial(chunks * c_out, T(0));
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* sum = partial.data() + p * c_out;
      for (int64_t r = rows * p / chunks; r < rows * (p + 1) / chunks; ++r)
        for (int64_t c = 0; c < c_out; ++c) sum[c] += dy[r * c_out + c];
    }
  });
  for (int64_t c = 0; c < c_out; ++c) {
    T sum = partial[c];
    for (int64_t p = 1; p < chunks; ++p) sum += partial[p * c_out + c];
    db[c] = sum;
  }
}

// Reduced-precision tensors run through the float kernels: float accumulation, as torch does.
bool is_reduced(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }
at::Tensor compute_copy(const at::Tensor& t, at::MemoryFormat format = at::MemoryFormat::Contiguous,
                        KeptStorage* storage = nullptr) {
  return contiguous_as(is_reduced(t) ? t.to(at::kFloat) : t, format, storage);
}

// Where a kernel writes a result that `format` and `input`'s dtype give back to the caller: kept
// storage when a conversion (a fresh tensor) follows, else a fresh tensor, which is returned as it is.
// (Whether `layout` is already `format` for these sizes is asked of a meta tensor: no storage.)
at::Tensor kernel_result(KeptStorage& storage, c10::IntArrayRef sizes, const at::TensorOptions& options,
                         at::MemoryFormat layout, const at::Tensor& input, at::MemoryFormat format) {
  const bool returned_as_is =
      !is_reduced(input) && at::empty(sizes, options.device(at::kMeta).memory_format(layout)).is_contiguous(format);
  return returned_as_is ? empty_result(sizes, options, layout) : storage.empty(sizes, options, layout);
}

// The weight as the forward kernels read it: float32 or float64, dense, in either WeightOrder
// (a channels-last weight is not converted).
std::pair<at::Tensor, WeightOrder> kernel_weight(const at::Tensor& weight) {
  const at::Tensor w = is_reduced(weight) ? weight.to(at::kFloat) : weight;
  if (weight_is_channels_last(w)) return {w, WeightOrder::TapChannel};  // (to() kept the strides)
  return {contiguous_as(w, at::MemoryFormat::Contiguous), WeightOrder::ChannelTap};
}

// A flat buffer holding a weight-shaped tensor in TapChannel order, as that tensor (channels-last
// strides): [O, C, taps...] viewed from [O, taps..., C].
at::Tensor tap_channel_view(const at::Tensor& flat, c10::IntArrayRef sizes) {
  std::vector<int64_t> stored{sizes[0]};
  for (size_t i = 2; i < sizes.size(); ++i) stored.push_back(sizes[i]);
  stored.push_back(sizes[1]);
  std::vector<int64_t> to_weight{0, int64_t(sizes.size()) - 1};
  for (size_t i = 1; i + 1 < sizes.size(); ++i) to_weight.push_back(int64_t(i));
  return flat.view(stored).permute(to_weight);
}

// Ungrouped 3-d convolutions run the NHWC kernels with more than 16 channels on the product's output
// side (the forward's output channels, the backward's input channels: grad input is the larger
// share); with 16 or fewer the NCHW shifted-window path and its transposed product run 1.1-1.9x
// faster despite the conversions (1 thread, batch 2, 16x28x28: 32->16 forward 3.7 vs 6.2 ms, 16->32
// grad input 3.5 vs 5.9 ms). Above that the NHWC kernels win (3x3x3, batch 2, 1 thread,
// NCHW-converted -> NHWC, forward / grad input / grad weight, ms: 32ch 16x28x28 6.7 / 8.1 / 6.7 ->
// 5.8 / 5.9 / 5.9; 16^3 3.7 / 4.0 / 3.9 -> 1.7 / 1.8 / 1.9; 48ch 16^3 7.3 / 7.8 / 8.1 -> 5.4 / 5.4 /
// 5.5; 64->128 8x14x14 8.8 / 10.4 / 6.5 -> 5.4 / 5.8 / 5.9; kernel (1,3,3) 6.9 / 8.4 / 9.1 -> 2.1 /
// 2.1 / 2.2; stride 2 1.9 / 2.9 / 1.9 -> 1.0 / 0.8 / 1.4). Except two backwards, where the NHWC grad
// input loses: a large weight over few output rows (it packs the weight, the NCHW one reads it in
// place; 128ch 4x7x7 batch 2: 2.1 -> 3.7 ms, 256ch 6x7x7: 11.8 -> 18.5 ms; at 784 rows 128ch 8x7x7
// 6.0 -> 4.8) and 1x1x1 layers that widen (64->256 8x14x14 grad input + weight 0.9 -> 1.2 ms).
bool nhwc_serves_3d(const ConvGeometry& g, bool forward, double weight_bytes) {
  if (g.groups != 1 || (forward ? g.out_channels : g.in_channels) <= 16) return false;
  if (forward) return true;
  const bool few_rows = g.batch * g.out_plane() < 768 && weight_bytes > 1e6;
  return !few_rows && !(g.is_pointwise() && g.out_channels > g.in_channels);
}

// Channels-last inputs run the NHWC kernels (depthwise ones where conv_depthwise_direct.cpp has
// one, else they are converted). Not for 1-3 input channels per group (the RGB stem): the NHWC
// im2col copies runs of that many values per tap, where converting the small input to NCHW and
// back costs far less; except the stem's forward through space to depth, whose NHWC input phases
// have 4 * C channels and whose output would cost a conversion back. Nor for grouped layers with
// fewer output channels a group than a B panel is wide (RegNet, ResNeXt), where the NHWC GEMM
// wastes most of each panel: 3-10x slower than converting to NCHW and back; except those the
// direct grouped kernels serve, which read and write either layout. 3-d ones: nhwc_serves_3d.
// Nor for small inputs (at most 64 positions a sample, or 256 in all: ResNet's last stage, batch 1
// at 14x14), where the NCHW small-map paths run 1.1-5x faster than the NHWC kernels and converting
// costs little (512ch 7x7, batch 1, 1 thread: grad input 13.0 -> 2.4 ms, grad weight 3.7 -> 2.3 ms).
// The forward goes by the input's size (a stride-2 layer's larger input costs more to convert than
// the NCHW kernel saves), the backward by the output's (the NHWC strided grad input is the slower
// one: 14.8 vs 8.7 ms on 256->512 14x14 stride 2, batch 8).
std::atomic<bool> nhwc_forced{false};
std::atomic<int64_t> nhwc_calls{0};

// A contiguous input's 3x3 stride-2 forward (ResNet's downsampling) runs converted to channels-last
// on the NHWC row-segment kernel (conversions by layout.cpp, both ways): it beats the NCHW im2col +
// GEMM by more than they cost. float32, 1 thread, torch/cnnops before -> after: batch 8, 128ch
// 56x56 0.83 -> 0.89, 256ch 28x28 0.88 -> 0.95, 64->128 56x56 0.78 -> 0.83, 128->256 28x28
// 0.94 -> 0.97, 512ch 28x28 0.86 -> 1.06, 512ch 20x20 0.81 -> 0.94; batch 1, 128ch 56x56
// 0.87 -> 0.93, 64->128 56x56 0.88 -> 0.99, 256ch 20x20 0.85 -> 0.92. Not for 7x7 outputs
// (14x14 inputs: 512ch 0.86 -> 0.84 batch 8, 1.29 -> 0.63 batch 1), nor for a large weight on few
// rows, which the NCHW kernel reads in place and the NHWC one packs (512ch batch 1: 28x28 1.02 -> 0.83).
constexpr int64_t kStridedNhwcMinChannels = 64;
constexpr int64_t kStridedNhwcMinOutputs = 100;  // output positions a sample (10x10)
// Over kStridedNhwcWideChannels input channels, only with kStridedNhwcWideMinRows output positions in all.
constexpr int64_t kStridedNhwcWideChannels = 256;
constexpr int64_t kStridedNhwcWideMinRows = 800;
bool strided_forward_as_nhwc(const at::Tensor& input, const ConvGeometry& g) {
  const bool wide = g.in_channels > kStridedNhwcWideChannels;
  const bool resnet_3x3_s2 = g.kernel[1] == 3 && g.kernel[2] == 3 && g.stride[1] == 2 && g.stride[2] == 2 &&
                             g.pad[1] == 1 && g.pad[2] == 1 && g.dilation[1] == 1 && g.dilation[2] == 1;
  return input.dim() == 4 && input.scalar_type() != at::kDouble && g.groups == 1 && resnet_3x3_s2 &&
         g.in_channels >= kStridedNhwcMinChannels && g.out_plane() >= kStridedNhwcMinOutputs &&
         (!wide || g.batch * g.out_plane() >= kStridedNhwcWideMinRows) && nhwc_row_segments_serve(g);
}

// Whether a channels-last input stays channels-last for the NHWC kernels.
bool nhwc_kernel_serves(const at::Tensor& input, const ConvGeometry& g, bool forward) {
  const int64_t plane = forward ? g.in_plane() : g.out_plane();
  // A forward whose output rows the NHWC row-segment kernel serves stays channels-last on small maps
  // too, unless a large weight meets few rows (the NCHW kernel reads it in place, the NHWC one packs
  // it). Batch 8, 1 thread, torch/cnnops: DenseNet's 128->32 3x3 at 7x7 0.48 -> 0.95, 512ch 7x7
  // 0.82 -> 0.95, 256ch 7x7 0.76 -> 0.85; batch 1: 256ch 14x14 0.71 -> 0.86, 512ch 7x7 0.96 -> 0.84 (kept).
  const double weight_bytes = double(g.out_channels) * double(g.gemm_k()) * double(input.element_size());
  const bool segments =
      forward && nhwc_row_segments_serve(g) && (g.batch * g.out_plane() >= 128 || weight_bytes <= 2e6);
  // A 1x1 forward stays channels-last too: its NHWC product reads X in place, the NCHW one pays two
  // layout copies (2 threads, torch/cnnops, NCHW kernels -> NHWC: DenseNet's 960->128 at 7x7 batch 8
  // 0.80 -> 1.07, EfficientNet's 160->960 0.78 -> 1.06, 1024->256 14x14 batch 1 0.96 -> 1.18).
  const bool pointwise_forward = forward && g.is_pointwise();
  const bool small_maps = !segments && !pointwise_forward && (plane <= 64 || g.batch * plane <= 256);
  if (g.is_depthwise())  // NHWC kernels for some geometries only
    return depthwise_nhwc_supported(g, input.scalar_type() == at::kDouble);
  if (use_grouped(g, input.scalar_type() != at::kDouble) || nhwc_forced.load(std::memory_order_relaxed)) return true;
  if (input.dim() == 5) return !small_maps && nhwc_serves_3d(g, forward, weight_bytes);
  return !has_narrow_groups(g) && !small_maps &&
         (g.in_channels_per_group() >= 4 || (forward && use_space_to_depth(g)));
}

// The layout the kernels run in: channels-last inputs where the NHWC kernels serve them, and
// contiguous ones of ResNet's stride-2 forward (strided_forward_as_nhwc).
at::MemoryFormat kernel_memory_format(const at::Tensor& input, const ConvGeometry& g, bool forward = false) {
  const bool channels_last = input.dim() >= 4 && input.suggest_memory_format() == channels_last_format(input.dim());
  const bool nhwc = channels_last ? nhwc_kernel_serves(input, g, forward) : forward && strided_forward_as_nhwc(input, g);
  if (!nhwc) return at::MemoryFormat::Contiguous;
  nhwc_calls.fetch_add(1, std::memory_order_relaxed);
  return channels_last_format(input.dim());
}

}  // namespace

void set_nhwc_kernels_forced(bool on) { nhwc_forced.store(on, std::memory_order_relaxed); }
int64_t nhwc_kernel_call_count() { return nhwc_calls.load(std::memory_order_relaxed); }

std::vector<std::pair<std::string, int64_t>> conv_forward_route_counts() {
  std::vector<std::pair<std::string, int64_t>> counts;
  for (size_t r = 0; r < size_t(ForwardRoute::kCount); ++r)
    counts.emplace_back(kForwardRouteNames[r], forward_route_calls[r].load(std::memory_order_relaxed));
  return counts;
}

int64_t conv_weight_rows_call_count() { return weight_rows_calls.load(std::memory_order_relaxed); }

int64_t conv_weight_conversion_count() { return weight_conversions.load(std::memory_order_relaxed); }

void check_cpu_dtype(const char* op, const at::Tensor& input) {
  const auto t = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
                              ": dtype ", t, " is not supported on the CPU (float32, float64, bfloat16, float16)");
}

at::Tensor conv_forward_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                            int64_t groups, c10::string_view activation_name) {
  const ConvGeometry g = make_conv_geometry("conv_forward()", input, weight, bias, stride, padding, dilation, groups);
  const SerialRegion small(is_small_conv(g));
  const Activation activation = parse_activation(activation_name);
  TORCH_CHECK(input.device().is_cpu(), "conv_forward(): input must be a CPU tensor, got ", input.device());
  check_cpu_dtype("conv_forward()", input);
  const auto layout = kernel_memory_format(input, g, /*forward=*/true);
  const bool nhwc = layout != at::MemoryFormat::Contiguous;
  thread_local KeptStorage kept_x, kept_y;  // temporaries: the input and the output in the kernels' layout
  const auto x = compute_copy(input, layout, &kept_x);
  const auto [w, order] = kernel_weight(weight);
  const WeightCacheScope weight_cache(weight, w.data_ptr());  // under no_grad: kernels may keep w packed
  const bool has_bias = bias.has_value() && bias->defined();
  const auto b = has_bias ? compute_copy(*bias) : at::Tensor();
  const auto out_format = conv_output_memory_format(input, weight);
  auto y = kernel_result(kept_y, conv_output_shape(g, weight.dim() - 2), x.options(), layout, input, out_format);
  if (y.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_forward_cpu", [&] {
      const scalar_t* bias_ptr = has_bias ? b.data_ptr<scalar_t>() : nullptr;
      conv_forward_any(g, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bias_ptr, y.data_ptr<scalar_t>(), nhwc,
                       activation, order);
    });
  }
  return contiguous_as(y.to(input.scalar_type()), out_format);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                                 const at::Tensor& weight, c10::IntArrayRef stride,
                                                                 c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                                                 int64_t groups, std::array<bool, 3> output_mask) {
  const ConvGeometry g =
      make_conv_geometry("conv_backward()", input, weight, std::nullopt, stride, padding, dilation, groups);
  check_grad_output(grad_output, input, g, weight.dim() - 2);
  const SerialRegion small(is_small_conv(g));
  TORCH_CHECK(input.device().is_cpu(), "conv_backward(): input must be a CPU tensor, got ", input.device());
  check_cpu_dtype("conv_backward()", input);
  const auto layout = kernel_memory_format(input, g);
  const bool nhwc = layout != at::MemoryFormat::Contiguous;
  thread_local KeptStorage kept_dy, kept_x, kept_dx;  // temporaries, as in conv_forward_cpu
  const auto dy = compute_copy(grad_output, layout, &kept_dy);
  const auto x = output_mask[1] ? compute_copy(input, layout, &kept_x) : at::Tensor();  // only dW reads X
  const auto [w, order] = kernel_weight(weight);
  // Masked-out gradients are distinct empty tensors: outputs of an op must not alias each other.
  auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor dx = empty(), dw = empty(), db = empty();
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv_backward_cpu", [&] {
    const scalar_t* dy_ptr = dy.data_ptr<scalar_t>();
    KernelWeight<scalar_t> kw(g, w.data_ptr<scalar_t>(), order);
    if (output_mask[0]) {
      const auto dx_format = conv_output_memory_format(input, input);
      dx = kernel_result(kept_dx, input.sizes(), dy.options(), layout, input, dx_format);
      scalar_t* dx_ptr = dx.data_ptr<scalar_t>();
      const bool work = dx.numel() > 0 && dy.numel() > 0;
      // Every path writes every value of dX; only an empty dY leaves it to be zeroed.
      const bool window = work && use_window_dot(g, nhwc);
      if (window) conv_backward_input_window(g, dy_ptr, kw.channel_tap(), dx_ptr);
      const bool grouped = work && !window && use_grouped(g, std::is_same_v<scalar_t, float>);
      if (grouped) conv_grouped_backward_input(g, dy_ptr, kw.channel_tap(), dx_ptr, nhwc);
      const bool depthwise = work && !window && g.is_depthwise();
      if (depthwise) conv_depthwise_backward_input(g, dy_ptr, kw.channel_tap(), dx_ptr, nhwc);
      const bool as_forward = work && !window && !depthwise && !grouped &&
                              conv_backward_input_as_forward(g, dy_ptr, kw.data(), kw.order(), dx_ptr, nhwc);
      if (!as_forward && !depthwise && !grouped && !window) {
        if (!work) {
          dx.zero_();
        } else if (!nhwc) {  // strided: col2im
          conv_backward_input_gemm(g, dy_ptr, kw.data(), kw.order(), dx_ptr);
        } else {  // strided, channels-last: NHWC col2im
          conv_backward_input_nhwc(g, dy_ptr, kw.data(), kw.order(), dx_ptr);
        }
      }
      dx = contiguous_as(dx.to(input.scalar_type()), dx_format);
    }
    if (output_mask[2]) db = at::zeros({g.out_channels}, dy.options());
    bool db_done = false;  // the depthwise and first-layer kernels may sum db in their pass over dY
    if (output_mask[1]) {
      // dW in the forward output's layout (conv_output_memory_format, as the fake states; torch's
      // float32 CPU convolution gives the same): channels-last when the input or the weight is. The
      // NHWC kernel writes it in (tap, channel) order directly, the other kernels in ChannelTap
      // order, then converted.
      const bool dw_channels_last = conv_output_memory_format(input, weight) != at::MemoryFormat::Contiguous;
      const WeightOrder dw_preferred = dw_channels_last ? WeightOrder::TapChannel : WeightOrder::ChannelTap;
      at::Tensor dw_flat = at::zeros({w.numel()}, w.options());
      WeightOrder dw_order = WeightOrder::ChannelTap;
      if (dw_flat.numel() > 0 && dy.numel() > 0) {
        scalar_t* dw_ptr = dw_flat.data_ptr<scalar_t>();
        const scalar_t* x_ptr = x.data_ptr<scalar_t>();
        if (use_window_dot(g, nhwc))
          conv_backward_weight_window(g, dy_ptr, x_ptr, dw_ptr);
        else if (g.is_depthwise())
          db_done = conv_depthwise_backward_weight(g, dy_ptr, x_ptr, dw_ptr,
                                                   output_mask[2] ? db.data_ptr<scalar_t>() : nullptr, nhwc);
        else if (use_grouped(g, std::is_same_v<scalar_t, float>) && use_first_layer(g))
          db_done = conv_first_layer_backward_weight(g, dy_ptr, x_ptr, dw_ptr,
                                                     output_mask[2] ? db.data_ptr<scalar_t>() : nullptr, nhwc);
        else if (use_grouped(g, std::is_same_v<scalar_t, float>))
          conv_grouped_backward_weight(g, dy_ptr, x_ptr, dw_ptr, nhwc);
        else if (nhwc)
          dw_order = conv_backward_weight_nhwc(g, dy_ptr, x_ptr, dw_ptr, dw_preferred);
        else
          dw_order = conv_backward_weight_gemm(g, dy_ptr, x_ptr, dw_ptr, dw_preferred);
      }
      // One tap or one channel a group: both orders are the same memory, which .contiguous(format)
      // (the fake's) leaves with contiguous strides.
      const bool one_order = g.kernel_volume() == 1 || g.in_channels_per_group() == 1;
      if (!dw_channels_last || one_order)
        dw = dw_flat.view(w.sizes());
      else if (dw_order == WeightOrder::TapChannel)
        dw = tap_channel_view(dw_flat, w.sizes());
      else
        dw = contiguous_as(dw_flat.view(w.sizes()), channels_last_format(w.dim()));
      dw = dw.to(weight.scalar_type());
    }
    if (output_mask[2]) {
      if (dy.numel() > 0 && !db_done) {
        if (nhwc)
          conv_backward_bias_nhwc(g, dy_ptr, db.data_ptr<scalar_t>());
        else
          conv_backward_bias(g, dy_ptr, db.data_ptr<scalar_t>());
      }
      db = db.to(input.scalar_type());
    }
  });
  return {dx, dw, db};
}

}  // namespace cpu
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("conv_forward", &cnnops::cpu::conv_forward_cpu);
  m.impl("conv_backward", &cnnops::cpu::conv_backward_cpu);
}
