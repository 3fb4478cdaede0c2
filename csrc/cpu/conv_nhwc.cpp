// Channels-last convolution on the CPU. In NHWC the output of one position is a row of
// C_out values, so the GEMM is transposed with respect to the NCHW one:
//   forward      Y[r, co]      = act(sum over (tap, c) of im2col[r, (tap, c)] * W[co, c, tap] + b[co])
//   grad weight  dW[co, (tap,c)] = sum over r of dY[r, co] * im2col[r, (tap, c)]
// with r the flat (sample, output position) index. The im2col columns are ordered (tap, c),
// channel fastest, so each tap contributes a contiguous run of the input's channels and every
// row of the output is written in place, with no layout conversion. Every kernel reads the input
// from a zero-padded copy split by the stride (PhaseGrid), where the forward GEMM reads A in place.
// With AVX-512 the forward computes only real output rows (conv_forward_nhwc_rows) and a strided
// grad input runs by input stride phases (conv_backward_input_nhwc_phases), both on
// gemm_row_segments (gemm_segments.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/checked_math.h"
#include "cpu/conv_cpu.h"
#include "cpu/conv_winograd.h"
#include "cpu/conv_nhwc.h"
#include "cpu/gemm.h"
#include "cpu/gemm_segments.h"
#include "cpu/simd.h"
#include "cpu/simd_transpose.h"
#include "cpu/weight_cache.h"

namespace cnnops {
namespace cpu {
namespace {

// formulas.md §Conv as GEMM, "phase grid": the input as the channels-last GEMMs read it, zero
// padded and split by the stride into phase images (phase a_i of dim i holds the padded coordinates
// a_i mod s_i), G_d x G_h x G_w pixels per sample, G_i = ceil(padded_i / s_i). Output (n, od, oh, ow)
// reads tap (kd, kh, kw) at padded (od*s + kd*dil, ...): pixel (od + kd*dil / s, ...) of phase
// (kd*dil mod s, ...). With grid row r' = ((n*G_d + od)*G_h + oh)*G_w + ow,
//   im2col[r', (tap, c)] = grid[r' * C_in + column_offset(tap, c)],
// so every column is the buffer at a fixed offset, rows C_in apart, and the GEMM reads A in place.
// Rows with od >= D_out, oh >= H_out or ow >= W_out are computed and dropped (stride 1: the
// shifted-window grid of conv_shifted.h, channel innermost, samples back to back). Only the phases
// some tap reads are stored, phase-major: [phase][n][G_d][G_h][G_w][C_in].
template <typename T>
struct PhaseGrid {
  int64_t size[3];                     // G_d, G_h, G_w
  int64_t plane;                       // G_d * G_h * G_w: grid rows per sample
  int64_t rows;                        // grid rows up to the last real output position
  std::vector<int64_t> column_offset;  // per im2col column (tap, c) of group 0
  Scratch<T> copy;                     // the padded copy; none for 1x1 stride 1 without padding
  const T* data;                       // the copy, or the input itself; null where not filled (fill_rows)
  bool slack;                          // whether reads may run past the last grid row (the copy has slack)
  int64_t phase_size;                  // values per stored phase: batch * plane * C_in
  std::vector<std::array<int64_t, 3>> residue;  // per stored phase: its padded coordinates mod s

  int64_t row_of(const ConvGeometry& g, int64_t r) const {  // grid row of flat output position r
    const int64_t ow = r % g.out[2], oh = r / g.out[2] % g.out[1];
    const int64_t od = r / g.out[2] / g.out[1] % g.out[0], n = r / g.out_plane();
    return ((n * size[0] + od) * size[1] + oh) * size[2] + ow;
  }
};

// Fraction of grid rows that are real outputs.
double phase_grid_efficiency(const ConvGeometry& g) {
  double rows = 1;
  for (int i = 0; i < 3; ++i) rows *= double(ceil_div(g.in[i] + 2 * g.pad[i], g.stride[i]));
  return double(g.out_plane()) / rows;
}

// Grid rows (phase, sample n, qd, qh) of the phase grid: the input pixels that land there (pixels of
// a phase row are s_w apart in the input, or a run when s_w = 1), zeros for the padding. dst: the
// row's G_w x C_in values.
template <typename T>
void fill_grid_row(const ConvGeometry& g, const PhaseGrid<T>& grid, const T* x, int64_t phase, int64_t n,
                   int64_t qd, int64_t qh, T* dst) {
  const int64_t c_in = g.in_channels;
  const std::array<int64_t, 3>& a = grid.residue[phase];
  const int64_t d = qd * g.stride[0] + a[0] - g.pad[0], h = qh * g.stride[1] + a[1] - g.pad[1];
  if (d < 0 || d >= g.in[0] || h < 0 || h >= g.in[1]) {  // a row of padding
    std::fill(dst, dst + grid.size[2] * c_in, T(0));
    return;
  }
  const T* src = x + ((n * g.in[0] + d) * g.in[1] + h) * g.in[2] * c_in;
  // Grid column qw holds input w = qw * s_w + a_w - pad_w: columns [first, last) are inside.
  const int64_t first = std::min(grid.size[2], std::max<int64_t>(0, ceil_div(g.pad[2] - a[2], g.stride[2])));
  const int64_t last = std::clamp<int64_t>(ceil_div(g.in[2] + g.pad[2] - a[2], g.stride[2]), first, grid.size[2]);
  std::fill(dst, dst + first * c_in, T(0));
  if (g.stride[2] == 1) {  // one run
    std::memcpy(dst + first * c_in, src + (first + a[2] - g.pad[2]) * c_in, (last - first) * c_in * sizeof(T));
  } else {
    for (int64_t qw = first; qw < last; ++qw)
      std::memcpy(dst + qw * c_in, src + (qw * g.stride[2] + a[2] - g.pad[2]) * c_in, c_in * sizeof(T));
  }
  std::fill(dst + last * c_in, dst + grid.size[2] * c_in, T(0));
}

// The phase grid of x; with fill = false only its layout (sizes, column offsets), for a kernel that
// fills the rows each task reads itself (conv_forward_nhwc_rows).
template <typename T>
PhaseGrid<T> make_phase_grid(const ConvGeometry& g, const T* x, bool fill = true) {
  PhaseGrid<T> grid;
  int64_t padded[3];
  std::vector<int64_t> phase_index[3];  // per dim: phase a -> its index among the used ones, or -1
  int64_t used[3];
  for (int i = 0; i < 3; ++i) {
    padded[i] = g.in[i] + 2 * g.pad[i];
    grid.size[i] = ceil_div(padded[i], g.stride[i]);
    phase_index[i].assign(g.stride[i], -1);
    for (int64_t k = 0; k < g.kernel[i]; ++k) phase_index[i][k * g.dilation[i] % g.stride[i]] = 0;
    used[i] = 0;
    for (auto& index : phase_index[i])
      if (index == 0) index = used[i]++;
  }
  grid.plane = grid.size[0] * grid.size[1] * grid.size[2];
  grid.rows = ((g.batch - 1) * grid.size[0] + g.out[0] - 1) * grid.size[1] * grid.size[2] +
              (g.out[1] - 1) * grid.size[2] + g.out[2];
  const int64_t c_in = g.in_channels, cg = g.in_channels_per_group(), phases = used[0] * used[1] * used[2];
  const int64_t phase_size = checked_numel({g.batch, grid.plane, c_in}, "conv (channels-last grid)", true);
  grid.phase_size = phase_size;
  const int64_t taps = g.kernel_volume();
  grid.column_offset.resize(g.gemm_k());
  for (int64_t tap = 0; tap < taps; ++tap) {
    const int64_t k[3] = {tap / g.kernel[2] / g.kernel[1], tap / g.kernel[2] % g.kernel[1], tap % g.kernel[2]};
    int64_t phase = 0, pixel = 0;
    for (int i = 0; i < 3; ++i) {
      const int64_t offset = k[i] * g.dilation[i];
      phase = phase * used[i] + phase_index[i][offset % g.stride[i]];
      pixel = pixel * grid.size[i] + offset / g.stride[i];
    }
    for (int64_t c = 0; c < cg; ++c) grid.column_offset[tap * cg + c] = phase * phase_size + pixel * c_in + c;
  }
  grid.residue.resize(phases);
  for (int64_t phase = 0; phase < phases; ++phase) {
    int64_t rest = phase;
    for (int i = 2; i >= 0; --i) {
      const int64_t index = rest % used[i];
      rest /= used[i];
      grid.residue[phase][i] =
          std::find(phase_index[i].begin(), phase_index[i].end(), index) - phase_index[i].begin();
    }
  }
  if (g.is_pointwise()) {  // the grid is the input itself
    grid.data = x;
    grid.slack = false;
    return grid;
  }
  grid.slack = true;
  grid.data = nullptr;
  if (!fill) return grid;
  const int64_t size = checked_numel({phases, phase_size}, "conv (channels-last grid)", true);
  const int64_t slack = (grid.plane + 2 * kGemmMaxMr) * c_in;  // for reads past the last row of the last phase
  grid.copy = scratch<T>(size + slack);
  grid.data = grid.copy.get();
  std::fill(grid.copy.get() + size, grid.copy.get() + size + slack, T(0));
  // One task per (phase, sample, grid row of depth and height).
  const int64_t row_tasks = phases * g.batch * grid.size[0] * grid.size[1];
  T* out = grid.copy.get();
  parallel_for(0, row_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qh = task % grid.size[1], qd = task / grid.size[1] % grid.size[0];
      const int64_t n = task / grid.size[1] / grid.size[0] % g.batch,
                    phase = task / grid.size[1] / grid.size[0] / g.batch;
      T* dst = out + phase * phase_size + ((n * grid.size[0] + qd) * grid.size[1] + qh) * grid.size[2] * c_in;
      fill_grid_row(g, grid, x, phase, n, qd, qh, dst);
    }
  });
  return grid;
}

// W_g^T (from either WeightOrder), rows (tap, c) and columns co, as the B operand of the channels-last GEMMs, packed like
// gemm()'s B: per group, kc-row blocks (kc = the micro-kernel's reduction block), each ceil(M / NR)
// panels of kc x NR values, zero past M, which the GEMMs read in place. Kept between calls by
// the weight cache (weight_cache.h).
template <typename T>
struct WeightPanels {
  int64_t k = 0, padded_m = 0;
  OperandVector<T> data;
  // Panels [j0 / NR, ...) of reduction block k0 (kc rows) of group grp.
  const T* block(int64_t grp, int64_t k0, int64_t kc, int64_t j0) const {
    return data.data() + (grp * k + k0) * padded_m + (j0 / gemm_nr<T>()) * kc * gemm_nr<T>();
  }
};

template <typename T>
std::shared_ptr<const WeightPanels<T>> weight_panels(const ConvGeometry& g, const T* w, WeightOrder order) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), taps = g.kernel_volume();
  const int64_t cg = g.in_channels_per_group(), panels = num_blocks(m, nr), kc_max = gemm_spec().kc;
  const WeightTag tag{order == WeightOrder::TapChannel ? 3 : 2, g.groups, m, k, kc_max, int64_t(sizeof(T))};
  return cached_weight<WeightPanels<T>>(w, tag, g.groups * k * panels * nr * int64_t(sizeof(T)), [&] {
    auto out = std::make_shared<WeightPanels<T>>();
    out->k = k;
    out->padded_m = panels * nr;
    const int64_t size = checked_numel({g.groups, k, panels * nr}, "conv (channels-last weight)", true);
    if (m % nr == 0) {
      out->data.resize(size);  // left uninitialized: the loop below writes every value
    } else {
      out->data.assign(size, T(0));
    }
    T* data = out->data.data();
    if (order == WeightOrder::TapChannel || taps == 1) {
      // W_g's rows hold K in (tap, c) order already: each panel of a reduction block is the
      // transpose of NR rows' kc-value runs, moved in vector blocks.
      const int64_t k_blocks = num_blocks(k, kc_max);
      parallel_for(0, g.groups * panels * k_blocks, 1, [&](int64_t begin, int64_t end) {
        simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t grp = task / k_blocks / panels, p = task / k_blocks % panels;
            const int64_t k0 = task % k_blocks * kc_max, kc = std::min(kc_max, k - k0);
            transpose_matrix<T, vector_bytes(decltype(isa)::value)>(
                w + (grp * m + p * nr) * k + k0, k, std::min(nr, m - p * nr), kc,
                data + (grp * k + k0) * panels * nr + p * kc * nr, nr);
          }
        });
      });
      return out;
    }
    // Per NR output channels and a tile of channels: the tile's taps of those rows (NR runs of
    // tile * taps values, in L1 after the first pass) go out as whole panel rows (tap, c).
    constexpr int64_t tile = 16;
    const int64_t tiles = num_blocks(cg, tile);
    parallel_for(0, g.groups * panels * tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t grp = task / tiles / panels, p = task / tiles % panels, c0 = task % tiles * tile;
        const int64_t rows = std::min(nr, m - p * nr);
        const T* src = w + (grp * m + p * nr) * k;  // row j at src + j * k
        for (int64_t c = c0; c < std::min(cg, c0 + tile); ++c)
          for (int64_t tap = 0; tap < taps; ++tap) {
            const int64_t col = tap * cg + c, k0 = col / kc_max * kc_max, kc = std::min(kc_max, k - k0);
            const int64_t column = weight_column(g, order, c, tap);
            T* dst = data + (grp * k + k0) * panels * nr + p * kc * nr + (col - k0) * nr;
            for (int64_t j = 0; j < rows; ++j) dst[j] = src[j * k + column];
          }
      }
    });
    return out;
  });
}

// W_g itself, rows co and columns (tap, c), in the same panel layout: the B operand of the strided
// grad input's GEMM (columns of dX's im2col), made on every call.
template <typename T>
std::unique_ptr<const WeightPanels<T>> weight_panels_by_rows(const ConvGeometry& g, const T* w, WeightOrder order) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k();
  const int64_t cg = g.in_channels_per_group(), panels = num_blocks(k, nr), kc_max = gemm_spec().kc;
  auto out = std::make_unique<WeightPanels<T>>();
  out->k = m;
  out->padded_m = panels * nr;
  out->data.assign(checked_numel({g.groups, m, panels * nr}, "conv (channels-last weight)", true), T(0));
  T* data = out->data.data();
  const int64_t m_blocks = num_blocks(m, kc_max);
  parallel_for(0, g.groups * panels * m_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / m_blocks / panels, p = task / m_blocks % panels, m0 = task % m_blocks * kc_max;
      const int64_t mc = std::min(kc_max, m - m0);
      T* dst = data + (grp * m + m0) * panels * nr + p * mc * nr;
      const int64_t width = std::min(nr, k - p * nr);
      const bool runs = order == WeightOrder::TapChannel || g.kernel_volume() == 1;  // columns in (tap, c) order
      for (int64_t i = 0; i < mc; ++i) {
        const T* src = w + (grp * m + m0 + i) * k;
        if (runs) {
          std::copy_n(src + p * nr, width, dst + i * nr);
          continue;
        }
        for (int64_t j = 0; j < width; ++j) {
          const int64_t col = p * nr + j;  // (tap, c)
          dst[i * nr + j] = src[weight_column(g, order, col % cg, col / cg)];
        }
      }
    }
  });
  return out;
}

// Rows [i0, i0 + rows) x columns [k0, k0 + kc) of one group's channels-last im2col matrix, as a
// GEMM A panel dst[kk * mr + i]: row i reads grid[base[i] + column_offset[k]]. Within one tap
// the columns are a run of channels, copied from mr row pointers (the rest of the panel is zero).
template <typename T>
void read_im2col_panel_nhwc(const ConvGeometry& g, const T* grid, const int64_t* column_offset, const int64_t* base,
                            int64_t rows, int64_t k0, int64_t kc, T* dst, int64_t mr) {
  const int64_t cg = g.in_channels_per_group();
  for (int64_t j = 0; j < kc;) {
    const int64_t run = std::min(cg - (k0 + j) % cg, kc - j);
    const T* src = grid + column_offset[k0 + j];
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = src + base[i];
      for (int64_t q = 0; q < run; ++q) dst[(j + q) * mr + i] = row[q];
    }
    j += run;
  }
}

// y row = bias + C row, then the activation: the output step of the grid kernel.
template <typename T>
void write_output_row(T* out, const T* src, const T* bias, int64_t n, Activation activation) {
  if (bias) {
    for (int64_t co = 0; co < n; ++co) out[co] = src[co] + bias[co];
  } else {
    std::memcpy(out, src, n * sizeof(T));
  }
  if (activation == Activation::Relu)
    for (int64_t co = 0; co < n; ++co) out[co] = relu(out[co]);
}

// Blocks of at most kColumnBlock output rows; where there are several but few, a multiple of the
// thread count, so that no thread runs one block more than the others (5 blocks on 2 threads run
// in 3 rounds, 6 smaller ones in 3 shorter ones). Each row sums the same terms in the same order
// whatever the blocks.
int64_t row_blocks(int64_t rows) {
  const int64_t blocks = num_blocks(rows, kColumnBlock), threads = at::get_num_threads();
  return blocks > 1 && blocks < 4 * threads ? num_blocks(blocks, threads) * threads : blocks;
}

// Runs fn(task) for tasks [0, cost.size()) split into one contiguous run per thread of about equal
// total cost: a task goes to the thread whose share holds its cost's midpoint. at::parallel_for's
// even split of the task count would leave one thread the heavy tasks where costs differ (the
// grad input phases of a 3x3 stride 2 layer have 4, 2, 2 and 1 taps). Every task computes the same
// values whichever thread runs it.
template <typename Fn>
void parallel_for_by_cost(const std::vector<int64_t>& cost, const Fn& fn) {
  const int64_t tasks = int64_t(cost.size());
  std::vector<int64_t> before(tasks + 1, 0);  // total cost of the tasks before each
  for (int64_t t = 0; t < tasks; ++t) before[t + 1] = before[t] + cost[t];
  const int64_t total = std::max<int64_t>(before[tasks], 1);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t share = (2 * before[t] + cost[t]) * threads / (2 * total);  // midpoint's share
      if (share >= begin && share < end) fn(t);
    }
  });
}

// Splits the columns (output channels) into whole NR panels when the row tasks are too few to
// give every thread two.
struct ColumnSplit {
  int64_t size, count;
  ColumnSplit(int64_t m, int64_t nr, int64_t tasks) {
    const int64_t wanted = num_blocks(2 * at::get_num_threads(), tasks);
    const int64_t splits = std::min(wanted, num_blocks(m, nr));
    size = num_blocks(num_blocks(m, nr), splits) * nr;
    count = num_blocks(m, size);
  }
};

// Y rows = im2col rows read in place on the phase grid (A) times W_g^T (B, the panels read in place).
template <typename T>
void conv_forward_nhwc_grid(const ConvGeometry& g, const PhaseGrid<T>& grid, const WeightPanels<T>& panels,
                            const T* bias, T* y, Activation activation) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), c_in = g.in_channels;
  const int64_t cg = g.in_channels_per_group(), mr = gemm_mr<T>();
  const int64_t blocks = row_blocks(grid.rows), block = num_blocks(grid.rows, blocks);
  const ColumnSplit cols(m, nr, g.groups * blocks);
  bool direct = true;  // grid rows are output positions (1x1 without padding, no waste)
  for (int i = 0; i < 3; ++i) direct = direct && grid.size[i] == g.out[i];
  parallel_for(0, g.groups * blocks * cols.count, 1, [&](int64_t begin, int64_t end) {
    // C for one block of grid rows, before dropping waste; none when every grid row is an output.
    const auto tile = scratch<T>(direct ? 0 : block * cols.size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j0 = (task % cols.count) * cols.size, nj = std::min(cols.size, m - j0);
      const int64_t r0 = (task / cols.count % blocks) * block, grp = task / cols.count / blocks;
      const int64_t rc = std::min(block, grid.rows - r0);
      // B: the weight panels read where they lie (the GEMM's reduction blocks are theirs).
      auto panel = [&](int64_t k0, int64_t kc, int64_t n0) { return panels.block(grp, k0, kc, j0 + n0); };
      // Direct: C is Y's rows, started from the bias (which runs along columns here), and the GEMM
      // applies the activation as it writes the last reduction block.
      T* c = direct ? y + r0 * g.out_channels + grp * m + j0 : tile.get();
      const int64_t ldc = direct ? g.out_channels : nj;
      const bool accumulate = direct && bias;
      const Activation act = direct ? activation : Activation::None;
      if (accumulate)
        for (int64_t i = 0; i < rc; ++i) std::copy_n(bias + grp * m + j0, nj, c + i * ldc);
      // Without slack (the input read in place), the rows of a last micro-kernel panel that would
      // read past the input's end come from a zero-padded copy of them.
      const int64_t in_place = grid.slack || grid.rows - r0 - rc >= mr ? rc : rc / mr * mr;
      if (in_place > 0)
        gemm_shifted_a_packed_b<T>(in_place, k, grid.data + r0 * c_in + grp * cg, c_in, grid.column_offset.data(), nj,
                                   panel, c, ldc, accumulate, act);
      if (in_place < rc) {
        std::vector<T> rest(mr * c_in, T(0));
        std::copy_n(grid.data + (r0 + in_place) * c_in, (rc - in_place) * c_in, rest.data());
        gemm_shifted_a_packed_b<T>(rc - in_place, k, rest.data() + grp * cg, c_in, grid.column_offset.data(), nj, panel,
                                   c + in_place * ldc, ldc, accumulate, act);
      }
      if (direct) continue;
      for (int64_t i = 0; i < rc; ++i) {  // keep the real outputs: grid row -> (n, od, oh, ow)
        const int64_t r = r0 + i, ow = r % grid.size[2], oh = r / grid.size[2] % grid.size[1];
        const int64_t od = r / grid.size[2] / grid.size[1] % grid.size[0], n = r / grid.plane;
        if (ow >= g.out[2] || oh >= g.out[1] || od >= g.out[0]) continue;
        T* out = y + (((n * g.out[0] + od) * g.out[1] + oh) * g.out[2] + ow) * g.out_channels + grp * m + j0;
        write_output_row(out, tile.get() + i * nj, bias ? bias + grp * m + j0 : nullptr, nj, activation);
      }
    }
  });
}

// Y rows = im2col rows (A, packed per block of output positions from the phase grid) times
// W_g^T: for grids that would waste many rows (small maps, 7x7).
template <typename T>
void conv_forward_nhwc_packed(const ConvGeometry& g, const PhaseGrid<T>& grid, const WeightPanels<T>& panels,
                              const T* bias, T* y, Activation activation) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), rows = g.batch * g.out_plane();
  const int64_t cg = g.in_channels_per_group();
  const int64_t blocks = row_blocks(rows), block = num_blocks(rows, blocks);  // even blocks
  const ColumnSplit cols(m, nr, g.groups * blocks);
  parallel_for(0, g.groups * blocks * cols.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> base(block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j0 = (task % cols.count) * cols.size, nj = std::min(cols.size, m - j0);
      const int64_t grp = task / cols.count / blocks, r0 = (task / cols.count % blocks) * block;
      const int64_t rc = std::min(block, rows - r0);
      for (int64_t i = 0; i < rc; ++i) base[i] = grid.row_of(g, r0 + i) * g.in_channels + grp * cg;
      const PackedA<T> a =
          pack_a_panels<T>(rc, k, [&](int64_t i0, int64_t n, int64_t k0, int64_t kc, T* dst, int64_t mr) {
            read_im2col_panel_nhwc(g, grid.data, grid.column_offset.data(), base.data() + i0, n, k0, kc, dst, mr);
          });
      T* c = y + r0 * g.out_channels + grp * m + j0;  // rows of C_out values, this task's columns
      if (bias) {  // the bias runs along columns here: start C from it and accumulate
        for (int64_t i = 0; i < rc; ++i) std::copy_n(bias + grp * m + j0, nj, c + i * g.out_channels);
      }
      auto panel = [&](int64_t k0, int64_t kc, int64_t n0) { return panels.block(grp, k0, kc, j0 + n0); };
      // The activation goes on as the last reduction block is written.
      gemm_packed_b<T>(a, nj, panel, c, g.out_channels, bias != nullptr, activation);
    }
  });
}

// Rows per micro-kernel call of conv_forward_nhwc_rows for output rows of `width` positions: the
// row split into equal segments of at most the widest segment kernel's rows (7 -> 7, 14 -> 7 + 7,
// 28 -> 10 + 10 + 8, 56 -> 5 x 12 less 4); 0 where no segment kernel serves.
int64_t row_segment_mr(int64_t width) {
  const int64_t max_mr = gemm_row_segments_max_mr();
  if (max_mr == 0 || width < gemm_row_segments_min_mr()) return 0;
  return num_blocks(width, num_blocks(width, max_mr));
}

// Y rows = im2col rows read in place on the phase grid times W_g^T, like the grid kernel, but only
// the real output positions: each output row (width positions, consecutive grid rows) is cut into
// segments of `mr` rows, each a micro-kernel call that writes Y in place (gemm_row_segments). No
// grid row is computed and dropped, and no tile is copied out. The segments of a last output row
// read up to mr - 1 grid rows past it: the grid's slack covers them.
//
// A grid without data (make_phase_grid with fill = false; 2-d, one group) is filled by the tasks:
// each copies the grid rows its output rows read, all phases, into a buffer of its own and runs on
// that while it is in cache, instead of one pass writing the whole grid to memory and the GEMMs
// reading it back (row_tasks_fill_grid).
template <typename T>
void conv_forward_nhwc_rows(const ConvGeometry& g, const PhaseGrid<T>& grid, const WeightPanels<T>& panels,
                            const T* bias, T* y, Activation activation, int64_t mr, const T* x) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), c_in = g.in_channels;
  const int64_t cg = g.in_channels_per_group(), width = g.out[2], per_row = num_blocks(width, mr);
  const int64_t out_rows = g.batch * g.out[0] * g.out[1];  // rows of `width` output positions
  // Several blocks: a multiple of the thread count, the rows dealt out evenly (block b holds rows
  // [b R / B, (b + 1) R / B)), so each thread gets the same rows within one (17 blocks of 14 rows ran
  // 9 against 8 on 2 threads; 18 of 12-13 run 112 rows each).
  int64_t blocks = row_blocks(out_rows * width);
  if (blocks > 1) blocks = num_blocks(blocks, at::get_num_threads()) * at::get_num_threads();
  blocks = std::min(out_rows, blocks);
  const int64_t block = num_blocks(out_rows, blocks);
  const ColumnSplit cols(m, nr, g.groups * blocks);
  // Own fill (2-d: grid rows f = n G_h + qh): the rows [f0, f1] of every phase, f1 the last output
  // row's plus the largest tap shift; `halo` rows more than the block's output rows at most.
  const bool own_fill = grid.data == nullptr;
  const int64_t phases = int64_t(grid.residue.size()), row_values = grid.size[2] * c_in;
  const int64_t halo = (g.kernel[1] - 1) * g.dilation[1] / g.stride[1];
  // A block of qc output rows spans qc - 1 + halo grid rows, plus G_h - H_out for each sample it enters.
  const int64_t local_rows =
      own_fill ? block + halo + (block / g.out[1] + 1) * (grid.size[1] - g.out[1]) : 0;
  const int64_t local_size = phases * local_rows * row_values;
  const int64_t local_slack = (grid.size[2] + 2 * kGemmMaxMr) * c_in;  // a last segment's reads past its row
  parallel_for(0, g.groups * blocks * cols.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> a_row(block * per_row), c_row(block * per_row), seg_rows(block * per_row);
    std::vector<int64_t> local_offset(own_fill ? k : 0);
    const auto local = scratch<T>(own_fill ? local_size + local_slack : 0);
    if (own_fill) std::fill(local.get() + local_size, local.get() + local_size + local_slack, T(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j0 = (task % cols.count) * cols.size, nj = std::min(cols.size, m - j0);
      const int64_t b = task / cols.count % blocks, grp = task / cols.count / blocks;
      const int64_t q0 = b * out_rows / blocks, qc = (b + 1) * out_rows / blocks - q0;
      if (qc <= 0) continue;
      const T* a = grid.data;
      const int64_t* column_offset = grid.column_offset.data();
      int64_t f0 = 0;  // first grid row in `local`
      if (own_fill) {
        f0 = q0 / g.out[1] * grid.size[1] + q0 % g.out[1];
        const int64_t f1 = (q0 + qc - 1) / g.out[1] * grid.size[1] + (q0 + qc - 1) % g.out[1] + halo;
        const int64_t stride = (f1 - f0 + 1) * row_values;  // values per phase in `local`
        for (int64_t phase = 0; phase < phases; ++phase)
          for (int64_t f = f0; f <= f1; ++f)
            fill_grid_row(g, grid, x, phase, f / grid.size[1], 0, f % grid.size[1],
                          local.get() + phase * stride + (f - f0) * row_values);
        for (int64_t kk = 0; kk < k; ++kk) {  // phase * phase_size + pixel offset -> phase * stride + the same
          const int64_t offset = grid.column_offset[kk];
          local_offset[kk] = offset / grid.phase_size * stride + offset % grid.phase_size;
        }
        a = local.get();
        column_offset = local_offset.data();
      }
      int64_t segments = 0;
      for (int64_t q = q0; q < q0 + qc; ++q) {
        const int64_t oh = q % g.out[1], od = q / g.out[1] % g.out[0], n = q / g.out[1] / g.out[0];
        const int64_t base = ((n * grid.size[0] + od) * grid.size[1] + oh) * grid.size[2] - f0 * grid.size[2];
        for (int64_t ow = 0; ow < width; ow += mr, ++segments) {
          a_row[segments] = (base + ow) * c_in + grp * cg;
          c_row[segments] = (q * width + ow) * g.out_channels + grp * m + j0;
          seg_rows[segments] = std::min(mr, width - ow);
        }
      }
      if (bias) {  // the bias runs along columns: start Y from it and accumulate
        for (int64_t r = q0 * width; r < (q0 + qc) * width; ++r)
          std::copy_n(bias + grp * m + j0, nj, y + r * g.out_channels + grp * m + j0);
      }
      auto panel = [&](int64_t k0, int64_t kc, int64_t n0) { return panels.block(grp, k0, kc, j0 + n0); };
      gemm_row_segments<T>(mr, segments, a_row.data(), c_row.data(), seg_rows.data(), k, a, c_in, column_offset, nj,
                           panel, y, g.out_channels, bias != nullptr, activation);
    }
  });
}

}  // namespace

// Grids where at least this share of the rows are outputs read A in place; the rest pack it.
// (stride 1: 14x14 maps keep 77% of the grid, 28x28 87%, 56x56 97%; 7x7 maps 60%.) Packing an
// im2col row costs about as much as its product with a few B panels, so layers with at most
// kNarrowOutputs output channels a group take the grid from a lower share (DenseNet's 128->32 3x3
// at 14x14, batch 8, 1 thread: torch/cnnops 0.37 packed, 0.65 on the grid; 256->256: level).
constexpr double kMinGridEfficiency = 0.85;
constexpr double kMinGridEfficiencyNarrow = 0.7;
constexpr int64_t kNarrowOutputs = 128;

namespace {

std::atomic<int64_t> packed_forward_calls{0};
std::atomic<int64_t> row_segment_forward_calls{0};
std::atomic<int64_t> row_segment_own_fill_calls{0};
std::atomic<int64_t> phase_backward_input_calls{0};

std::atomic<bool> row_segments_enabled{true};

// The row-segment kernels run wherever they serve (AVX-512, rows of at least 6 outputs, a grid with
// slack): in every case measured they beat the grid and packed kernels, which compute waste rows
// and copy them out (batch 8, 1 thread, torch/cnnops, forward: DenseNet's 128->32 3x3 at 14x14
// 0.68 -> 0.86, ResNet-50's 3x3 64/128/256 without Winograd 0.80/0.75/0.72 -> 0.86/0.84/0.83,
// 3x3 stride 2 128ch 56x56 0.63 -> 0.77, 1x1 stride 2 512->1024 level).
bool use_row_segments(const ConvGeometry& g) {
  return row_segments_enabled.load(std::memory_order_relaxed) && !g.is_pointwise() && row_segment_mr(g.out[2]) > 0;
}

// The strided grad input by input phases, where taps overlap (kernel volume > 1): ResNet-50's 3x3
// stride 2, batch 8, 1 thread, torch/cnnops: 64ch 56x56 0.70 -> 0.81, 128ch 0.72 -> 0.87, 256ch
// 28x28 0.86 -> 0.95. A 1x1 stride-2 layer (one phase of four has its tap) keeps col2im: 0.91 vs 0.88.
bool use_phase_backward_input(const ConvGeometry& g) {
  return row_segments_enabled.load(std::memory_order_relaxed) && g.kernel_volume() > 1 &&
         gemm_row_segments_max_mr() > 0;
}

// The row-segment forward's tasks fill the grid rows they read (conv_forward_nhwc_rows): 2-d
// stride-2 layers of one group with at least 14x14 outputs. 3x3, 1 thread, torch/cnnops
// channels-last before -> after: batch 8, 128ch 56x56 0.78 -> 0.86, 256ch 28x28 0.88 -> 0.93,
// 64->128 56x56 0.81 -> 0.85, 128->256 28x28 0.93 -> 0.95; batch 1 level (0.90, 1.04, 0.91, 1.08);
// 7x7 outputs level or a little worse (512ch batch 8 0.98 -> 0.96), so left out.
constexpr int64_t kOwnFillMinOutputs = 196;
bool row_tasks_fill_grid(const ConvGeometry& g) {
  return g.in[0] == 1 && g.kernel[0] == 1 && g.pad[0] == 0 && g.stride[0] == 1 && g.groups == 1 &&
         g.stride[1] == 2 && g.stride[2] == 2 && !g.is_pointwise() && g.out_plane() >= kOwnFillMinOutputs;
}

bool use_phase_grid(const ConvGeometry& g) {
  const bool narrow = g.out_channels_per_group() <= kNarrowOutputs;
  return phase_grid_efficiency(g) >= (narrow ? kMinGridEfficiencyNarrow : kMinGridEfficiency);
}

}  // namespace

template <typename T>
void conv_forward_nhwc(const ConvGeometry& g, const T* x, const T* w, WeightOrder order, const T* bias, T* y,
                       Activation activation) {
  const bool own_fill = use_row_segments(g) && row_tasks_fill_grid(g);
  const PhaseGrid<T> grid = make_phase_grid(g, x, !own_fill);
  const auto panels = weight_panels(g, w, order);
  if (grid.slack && use_row_segments(g)) {  // slack: a row's last segment reads past it
    row_segment_forward_calls.fetch_add(1, std::memory_order_relaxed);
    if (own_fill) row_segment_own_fill_calls.fetch_add(1, std::memory_order_relaxed);
    conv_forward_nhwc_rows(g, grid, *panels, bias, y, activation, row_segment_mr(g.out[2]), x);
  } else if (use_phase_grid(g)) {
    conv_forward_nhwc_grid(g, grid, *panels, bias, y, activation);
  } else {
    packed_forward_calls.fetch_add(1, std::memory_order_relaxed);
    conv_forward_nhwc_packed(g, grid, *panels, bias, y, activation);
  }
}

int64_t nhwc_packed_forward_count() { return packed_forward_calls.load(std::memory_order_relaxed); }

void set_nhwc_row_segments_enabled(bool on) { row_segments_enabled.store(on, std::memory_order_relaxed); }

bool nhwc_row_segments_serve(const ConvGeometry& g) { return use_row_segments(g); }

int64_t nhwc_row_segment_forward_count() { return row_segment_forward_calls.load(std::memory_order_relaxed); }

int64_t nhwc_row_segment_own_fill_count() { return row_segment_own_fill_calls.load(std::memory_order_relaxed); }

int64_t nhwc_phase_backward_input_count() { return phase_backward_input_calls.load(std::memory_order_relaxed); }

namespace {

std::atomic<int64_t> nhwc_weight_rows_calls{0};

// Whether conv_backward_weight_nhwc_rows serves g: one B panel of output channels a group (more
// than half of it used) and whole A panels of input channels a tap. It runs before Winograd:
// DenseNet's 128->32 3x3 (batch 8, 1 thread, torch/cnnops) at 14x14 0.57 -> 0.80, at 28x28 0.62
// (Winograd) -> 0.73, at 56x56 level with Winograd (0.75) and closer to float64.
bool use_nhwc_weight_rows(const ConvGeometry& g, int64_t mr, int64_t nr) {
  const int64_t m = g.out_channels_per_group();
  return g.kernel_volume() > 1 && 2 * m > nr && m <= nr && g.in_channels_per_group() % mr == 0;
}

// The weight gradient transposed, for few output channels a group (DenseNet's 128->32 3x3):
// dW_g^T[(tap, c), co] = sum over positions r of im2col[r, (tap, c)] * dY[r, co]. The untransposed
// product packs im2col (R x K values) for only M / MR A panels; here the packed operand is dY
// (R x M, one B panel), used by all K / MR panels, and im2col^T is read in place from the phase
// grid: its rows (tap, c) for one tap are channels, adjacent in a grid row, and its columns are
// the positions' grid rows. Positions are summed chunk by chunk into the partial sums of
// WeightGradientChunks; the rows of dW^T split among tasks in any way (each value is summed by one
// task, in chunk order), so the split may follow the thread count.
template <typename T>
void conv_backward_weight_nhwc_rows(const ConvGeometry& g, const PhaseGrid<T>& grid, const T* dy, T* dw,
                                    WeightOrder order) {
  constexpr int64_t nr = gemm_nr<T>();
  nhwc_weight_rows_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), cg = g.in_channels_per_group();
  const int64_t taps = g.kernel_volume(), mr = gemm_mr<T>(), kc_max = gemm_spec().kc;
  const WeightGradientChunks split(g);
  const int64_t total = split.total, partials = split.partials, padded_m = num_blocks(m, nr) * nr;
  const int64_t size = checked_numel({g.groups, m, k}, "conv_backward (weight)", true);
  // Grid row offset of every position r (grid.row_of(g, r) * C_in), counted without divisions.
  std::vector<int64_t> base(total);
  int64_t r = 0;
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t od = 0; od < g.out[0]; ++od)
      for (int64_t oh = 0; oh < g.out[1]; ++oh) {
        const int64_t row = ((n * grid.size[0] + od) * grid.size[1] + oh) * grid.size[2];
        for (int64_t ow = 0; ow < g.out[2]; ++ow) base[r++] = (row + ow) * g.in_channels;
      }
  // Rows of dW^T a task: all of them at one thread, so a chunk's grid rows stay in L2 while every
  // tap reads them; else enough tasks for two a thread.
  const int64_t panels = num_blocks(k, mr), threads = SerialRegion::active() ? 1 : at::get_num_threads();
  const int64_t slices = std::clamp<int64_t>(num_blocks(2 * threads, g.groups * partials), 1, panels);
  const int64_t slice = num_blocks(panels, slices) * mr, tasks = g.groups * partials * num_blocks(k, slice);
  // Each value written by one task.
  const auto partial = scratch<T>(partials > 1 ? checked_numel({partials, size}, "conv_backward (weight)", true) : 0);
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const auto tile = scratch<T>(slice * m);  // rows [i0, i0 + rows) of dW_g^T
    const auto b = scratch<T>(kColumnBlock * padded_m);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = task % num_blocks(k, slice) * slice, rows = std::min(slice, k - i0);
      const int64_t p = task / num_blocks(k, slice) % partials, grp = task / num_blocks(k, slice) / partials;
      for (int64_t chunk = split.first(p); chunk < split.first(p + 1); ++chunk) {
        const int64_t r0 = chunk * kColumnBlock, rc = std::min(kColumnBlock, total - r0);
        // B[r, j] = dY[r0 + r, j] as gemm's panels: reduction block k0 (kc rows) at b + k0 * padded_m,
        // its panel of columns j0 kc * NR further on, zero past M.
        for (int64_t k0 = 0; k0 < rc; k0 += kc_max) {
          const int64_t kc = std::min(kc_max, rc - k0);
          T* block = b.get() + k0 * padded_m;
          for (int64_t kk = 0; kk < kc; ++kk) {
            const T* src = dy + (r0 + k0 + kk) * g.out_channels + grp * m;
            for (int64_t j0 = 0; j0 < m; j0 += nr) {
              T* dst = block + (j0 / nr * kc + kk) * nr;
              if (j0 + nr <= m) {
                std::memcpy(dst, src + j0, nr * sizeof(T));  // fixed size: two vector moves
              } else {
                std::copy_n(src + j0, m - j0, dst);
                std::fill(dst + m - j0, dst + nr, T(0));
              }
            }
          }
        }
        gemm_offset_a_packed_b<T>(
            rows, rc, grid.data + grp * cg, grid.column_offset.data() + i0, base.data() + r0, m,
            [&](int64_t k0, int64_t kc, int64_t j0) { return b.get() + k0 * padded_m + j0 * kc; }, tile.get(), m,
            chunk > split.first(p));
      }
      // Row i of dW_g^T is (tap, c) = (i / cg, i % cg).
      T* out = (partials > 1 ? partial.get() + p * size : dw) + grp * m * k;
      for (int64_t i = i0; i < i0 + rows; ++i) {
        const int64_t column = order == WeightOrder::TapChannel ? i : (i % cg) * taps + i / cg;
        for (int64_t j = 0; j < m; ++j) out[j * k + column] = tile[(i - i0) * m + j];
      }
    }
  });
  if (partials > 1) sum_partials(partial.get(), partials, size, dw);
}

std::atomic<int64_t> nhwc_weight_pointwise_calls{0};

// Whether conv_backward_weight_nhwc_pointwise serves g: packing costs about R * (M + K) values
// against R * M * K multiply-adds, the in-place product about 15% of its time (A and B read from
// L2), so it pays where M or K is small; and rows of dY and X at most 1 KB apart (further, the
// kc rows a panel reads share few L1 sets). Measured (batch 8, 1 thread, torch/cnnops packed -> in
// place): 64->256 56x56 0.76 -> 0.89, 96->128 0.70 -> 0.82, 256->64 0.74 -> 0.89, 96->24 0.95,
// 128->128 28x28 0.74 -> 0.78; level at 256->128 and 512->128, slower at 128->512 28x28
// (0.78 -> 0.73) and 64->2048 14x14 (0.84 -> 0.69).
bool use_nhwc_weight_pointwise(const ConvGeometry& g, int64_t value_bytes) {
  const int64_t m = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const bool near_rows = std::max(g.in_channels, g.out_channels) * value_bytes <= 1024;
  return g.is_pointwise() && near_rows && (std::min(m, cg) <= 64 || std::max(m, cg) <= 128);
}

// dW_g[co, c] = sum over positions r of dY[r, co] * X[r, c] for 1x1 stride-1 layers without
// padding, where im2col is the input itself: both operands read in place, no packing. A = dY_g^T
// (A[co, r] = dy[r * C_out + co]: a panel's MR channels adjacent), B = X_g (rows of C_in values).
template <typename T>
void conv_backward_weight_nhwc_pointwise(const ConvGeometry& g, const T* dy, const T* x, T* dw) {
  nhwc_weight_pointwise_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t m = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const int64_t block = std::min(kColumnBlock, g.batch * g.out_plane());
  std::vector<int64_t> a_offset(block), b_offset(block);
  for (int64_t r = 0; r < block; ++r) {
    a_offset[r] = r * g.out_channels;
    b_offset[r] = r * g.in_channels;
  }
  reduce_weight_gradient<T>(g, dw, [&](int64_t r0, int64_t rc, int64_t grp, int64_t j0, int64_t jw, T* dw_slice, T*) {
    gemm_shifted_ab<T>(m, rc, dy + r0 * g.out_channels + grp * m, 1, a_offset.data(), jw,
                       x + r0 * g.in_channels + grp * cg + j0, b_offset.data(), dw_slice, cg, nullptr, true);
  });
}

}  // namespace

int64_t nhwc_weight_rows_count() { return nhwc_weight_rows_calls.load(std::memory_order_relaxed); }
int64_t nhwc_weight_pointwise_count() { return nhwc_weight_pointwise_calls.load(std::memory_order_relaxed); }

// dW_t[co, (tap, c)] = sum over positions r of dY[r, co] * im2col[r, (tap, c)]: transposed for few
// output channels, both operands in place for small 1x1 layers, else A = dY^T over a chunk of
// positions, B = the chunk's im2col rows copied from the phase grid.
template <typename T>
WeightOrder conv_backward_weight_nhwc(const ConvGeometry& g, const T* dy, const T* x, T* dw, WeightOrder preferred) {
  // The transposed product goes before Winograd on 2-d layers, unless a test has replaced Winograd's
  // size rules; 3x3x3 layers take Winograd (2 threads, 32 channels 16x28x28 batch 2: 3.2 -> 2.3 ms).
  const bool winograd = std::is_same_v<T, float> && use_winograd_weight_gradient(g);
  const bool rows = use_nhwc_weight_rows(g, gemm_mr<T>(), gemm_nr<T>()) && !winograd_size_rules_replaced() &&
                    !(winograd && g.kernel[0] > 1);
  if constexpr (std::is_same_v<T, float>) {  // 3x3 stride 1: Winograd where the forward takes it
    if (winograd && !rows && conv_backward_weight_winograd(g, dy, x, dw, /*nhwc=*/true, preferred)) return preferred;
  }
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), taps = g.kernel_volume();
  const int64_t cg = g.in_channels_per_group();
  const PhaseGrid<T> grid = make_phase_grid(g, x);
  if (rows) {
    conv_backward_weight_nhwc_rows(g, grid, dy, dw, preferred);
    return preferred;
  }
  if (use_nhwc_weight_pointwise(g, sizeof(T))) {
    conv_backward_weight_nhwc_pointwise(g, dy, x, dw);
    return preferred;
  }
  const int64_t* column_offset = grid.column_offset.data();
  // Whether each NR-column panel of B (they start at multiples of NR) reads one run of values.
  std::vector<char> one_run(num_blocks(k, nr), 1);
  for (int64_t col = 1; col < k; ++col)
    if (col % nr != 0 && column_offset[col] != column_offset[col - 1] + 1) one_run[col / nr] = 0;
  // Columns ordered (tap, c): straight into dw when that order is wanted, else reordered at the end.
  const bool reorder = preferred != WeightOrder::TapChannel;
  std::vector<T> dw_t(reorder ? g.groups * m * k : 0);
  // The chunks and partial sums of reduce_weight_gradient (so the sums are the same), with the K
  // columns split in slices of 8 panels, several a task: all of them at one thread, so each chunk's
  // A is packed once for every slice (ResNet's 128->128 3x3 stride 2 at 56x56 packed it 5 times,
  // 7% of the time); else enough tasks for two a thread, splitting the rows (output channels) too
  // where slices and partial sums are fewer (64->2048 1x1 at 14x14 ran on one thread). Each value
  // is summed by one task, in chunk order, whatever the split.
  T* target = reorder ? dw_t.data() : dw;
  const WeightGradientChunks split(g);
  const int64_t partials = split.partials, size = checked_numel({g.groups, m, k}, "conv_backward (weight)", true);
  const int64_t slice = 8 * nr, slices = num_blocks(k, slice);
  const int64_t threads = SerialRegion::active() ? 1 : at::get_num_threads();
  const int64_t per_task = num_blocks(slices, std::clamp<int64_t>(num_blocks(2 * threads, partials), 1, slices));
  const int64_t slice_tasks = num_blocks(slices, per_task), mr = gemm_mr<T>();
  const int64_t row_parts = std::clamp<int64_t>(num_blocks(2 * threads, partials * slice_tasks), 1, num_blocks(m, mr));
  const int64_t part = num_blocks(num_blocks(m, mr), row_parts) * mr, parts = num_blocks(m, part);
  std::vector<T> partial(partials > 1 ? checked_numel({partials, size}, "conv_backward (weight)", true) : 0, T(0));
  parallel_for(0, partials * slice_tasks * parts, 1, [&](int64_t begin, int64_t end) {
    const auto workspace = scratch<T>(gemm_workspace_size<T>(slice));
    std::vector<int64_t> base(std::min(kColumnBlock, split.total));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / parts / slice_tasks, s0 = task / parts % slice_tasks * per_task;
      const int64_t s1 = std::min(slices, s0 + per_task), row0 = task % parts * part, mp = std::min(part, m - row0);
      T* out = partials > 1 ? partial.data() + p * size : target;
      for (int64_t chunk = split.first(p); chunk < split.first(p + 1); ++chunk) {
        const int64_t r0 = chunk * kColumnBlock, rc = std::min(kColumnBlock, split.total - r0);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          // A = rows [row0, row0 + mp) of dY^T over the chunk: in NHWC a position's C_out values are
          // contiguous. Panel column kk is position r0 + kk's run of `rows` channels: one copy each.
          const T* dy_chunk = dy + r0 * g.out_channels + grp * m + row0;
          const PackedA<T> a =
              pack_a_panels<T>(mp, rc, [&](int64_t i0, int64_t rows, int64_t k0, int64_t kc, T* dst, int64_t mr) {
                // A fixed-size copy for whole panels: vector moves, where a run-time length calls memmove.
                if (rows == kGemmAvx512.mr) {
                  for (int64_t kk = 0; kk < kc; ++kk)
                    std::memcpy(dst + kk * mr, dy_chunk + (k0 + kk) * g.out_channels + i0, kGemmAvx512.mr * sizeof(T));
                  return;
                }
                for (int64_t kk = 0; kk < kc; ++kk)
                  std::copy_n(dy_chunk + (k0 + kk) * g.out_channels + i0, rows, dst + kk * mr);
              });
          for (int64_t i = 0; i < rc; ++i) base[i] = grid.row_of(g, r0 + i) * g.in_channels + grp * cg;
          for (int64_t sl = s0; sl < s1; ++sl) {
            const int64_t j0 = sl * slice, jw = std::min(slice, k - j0);
            // B = the chunk's im2col rows, columns [j0, j0 + jw), copied from the phase grid a panel
            // row (NR columns, one run of channels inside a tap) at a time.
            auto pack = [&](int64_t k0, int64_t kc, int64_t jj, int64_t jc, T* dst) {
              for (int64_t q0 = 0; q0 < jc; q0 += nr) {
                const int64_t col = j0 + jj + q0, width = std::min(nr, jc - q0);
                const T* src = grid.data + column_offset[col];
                T* panel = dst + q0 * kc;
                if (col % nr == 0 && one_run[col / nr] && width == nr) {  // fixed size: vector moves
                  for (int64_t i = 0; i < kc; ++i) std::memcpy(panel + i * nr, src + base[k0 + i], nr * sizeof(T));
                } else if (col % nr == 0 && one_run[col / nr]) {
                  for (int64_t i = 0; i < kc; ++i) std::memcpy(panel + i * nr, src + base[k0 + i], width * sizeof(T));
                } else {
                  for (int64_t i = 0; i < kc; ++i)
                    for (int64_t q = 0; q < width; ++q)
                      panel[i * nr + q] = grid.data[base[k0 + i] + column_offset[col + q]];
                }
              }
              zero_panel_tail(kc, jc, dst);
            };
            gemm<T>(a, jw, pack, out + (grp * m + row0) * k + j0, k, nullptr, true, workspace.get());
          }
        }
      }
    }
  });
  if (partials > 1) sum_partials(partial.data(), partials, size, target);
  if (!reorder) return WeightOrder::TapChannel;
  parallel_for(0, g.out_channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t co = begin; co < end; ++co)
      for (int64_t c = 0; c < cg; ++c)
        for (int64_t tap = 0; tap < taps; ++tap) dw[(co * cg + c) * taps + tap] = dw_t[co * k + tap * cg + c];
  });
  return WeightOrder::ChannelTap;
}

namespace {

// The input positions of one stride phase: along dim i, x_i = s_i u_i + residue_i - p_i for u_i in
// [first_i, first_i + count_i), and the taps k with k_i d_i = residue_i (mod s_i), each reading dY
// at u - e(k), e_i = (k_i d_i - residue_i) / s_i.
struct InputPhase {
  int64_t residue[3], first[3], count[3];
  std::vector<int64_t> taps, shift[3];  // per tap of the phase: its index and e_i
};

std::vector<InputPhase> input_phases(const ConvGeometry& g) {
  std::vector<InputPhase> phases(g.stride[0] * g.stride[1] * g.stride[2]);
  for (int64_t index = 0; index < int64_t(phases.size()); ++index) {
    InputPhase& ph = phases[index];
    ph.residue[0] = index / g.stride[2] / g.stride[1], ph.residue[1] = index / g.stride[2] % g.stride[1];
    ph.residue[2] = index % g.stride[2];
    for (int i = 0; i < 3; ++i) {
      ph.first[i] = ceil_div(std::max<int64_t>(0, g.pad[i] - ph.residue[i]), g.stride[i]);  // x_i >= 0
      const int64_t last = g.in[i] - 1 + g.pad[i] - ph.residue[i];                          // x_i < in_i
      ph.count[i] = last < 0 ? 0 : std::max<int64_t>(0, last / g.stride[i] - ph.first[i] + 1);
    }
    for (int64_t tap = 0; tap < g.kernel_volume(); ++tap) {
      const int64_t k[3] = {tap / g.kernel[2] / g.kernel[1], tap / g.kernel[2] % g.kernel[1], tap % g.kernel[2]};
      bool in_phase = true;
      for (int i = 0; i < 3; ++i) in_phase = in_phase && (k[i] * g.dilation[i]) % g.stride[i] == ph.residue[i];
      if (!in_phase) continue;
      ph.taps.push_back(tap);
      for (int i = 0; i < 3; ++i) ph.shift[i].push_back((k[i] * g.dilation[i] - ph.residue[i]) / g.stride[i]);
    }
  }
  return phases;
}

// Whether every phase that has taps and positions has rows long enough for the segment kernels
// (else the col2im path runs).
bool phases_fit_segments(const std::vector<InputPhase>& phases) {
  for (const auto& ph : phases)
    if (!ph.taps.empty() && ph.count[0] * ph.count[1] * ph.count[2] > 0 && row_segment_mr(ph.count[2]) == 0)
      return false;
  return true;
}

// dX of a strided channels-last convolution by input phases: dX at the positions of one phase
// receives only the phase's taps, from dY shifted by e (InputPhase), so each phase is a stride-1
// correlation of dY, zero padded in front by the largest e, with those taps:
//   dX[s u + residue - p, c] = sum over (tap, co) of dY[u - e(tap), co] * W[co, c, tap]
// (formulas.md §Conv backward, grouped by residue). Each row of a phase (positions along w, s_w C_in
// apart in dX) runs through gemm_row_segments with the padded dY read in place: no im2col buffer,
// no col2im scatter, no zeroed dX copy, and every dX value is one task's full sum (deterministic).
template <typename T>
void conv_backward_input_nhwc_phases(const ConvGeometry& g, const std::vector<InputPhase>& phases, const T* dy,
                                     const T* w, WeightOrder order, T* dx) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t m = g.out_channels_per_group(), cg = g.in_channels_per_group(), k_all = g.gemm_k();
  const int64_t c_out = g.out_channels, kc_max = gemm_spec().kc, max_mr = gemm_row_segments_max_mr();
  // dY zero padded: front[i] (the largest e) before, and room for the largest u after.
  int64_t front[3], size[3];
  for (int i = 0; i < 3; ++i) {
    front[i] = (g.kernel[i] - 1) * g.dilation[i] / g.stride[i];
    size[i] = front[i] + std::max(g.out[i], (g.in[i] - 1 + g.pad[i]) / g.stride[i] + 1);
  }
  const int64_t padded = checked_numel({g.batch, size[0], size[1], size[2], c_out}, "conv (grad input phases)", true);
  const int64_t slack = (max_mr + 1) * c_out;  // a last segment reads up to mr - 1 pixels past its row
  const auto dy_padded = scratch<T>(padded + slack);
  T* dyp = dy_padded.get();
  std::fill(dyp + padded, dyp + padded + slack, T(0));
  parallel_for(0, g.batch * size[0] * size[1], 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qh = task % size[1], qd = task / size[1] % size[0], n = task / size[1] / size[0];
      T* dst = dyp + task * size[2] * c_out;
      const int64_t d = qd - front[0], h = qh - front[1];
      if (d < 0 || d >= g.out[0] || h < 0 || h >= g.out[1]) {
        std::fill(dst, dst + size[2] * c_out, T(0));
        continue;
      }
      std::fill(dst, dst + front[2] * c_out, T(0));
      std::memcpy(dst + front[2] * c_out, dy + ((n * g.out[0] + d) * g.out[1] + h) * g.out[2] * c_out,
                  g.out[2] * c_out * sizeof(T));
      std::fill(dst + (front[2] + g.out[2]) * c_out, dst + size[2] * c_out, T(0));
    }
  });
  // Per phase: B = the phase's taps of W_g, rows (tap, co), columns c, as WeightPanels; A's column
  // offsets (tap, co) relative to a row's dY pixel.
  const int64_t panels_per_group = num_blocks(cg, nr);
  std::vector<WeightPanels<T>> b(phases.size());
  std::vector<std::vector<int64_t>> column_offset(phases.size());
  for (size_t index = 0; index < phases.size(); ++index) {
    const InputPhase& ph = phases[index];
    const int64_t k = int64_t(ph.taps.size()) * m;
    b[index].k = k;
    b[index].padded_m = panels_per_group * nr;
    b[index].data.assign(checked_numel({g.groups, k, panels_per_group * nr}, "conv (grad input phases)", true), T(0));
    column_offset[index].resize(k);
    for (int64_t t = 0; t < int64_t(ph.taps.size()); ++t) {
      const int64_t shift = (ph.shift[0][t] * size[1] + ph.shift[1][t]) * size[2] + ph.shift[2][t];
      for (int64_t co = 0; co < m; ++co) column_offset[index][t * m + co] = co - shift * c_out;
    }
  }
  parallel_for(0, int64_t(phases.size()) * g.groups * m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t index = task / m / g.groups, grp = task / m % g.groups, co = task % m;
      const InputPhase& ph = phases[index];
      const int64_t k = b[index].k;
      for (int64_t t = 0; t < int64_t(ph.taps.size()); ++t) {
        const int64_t kk = t * m + co, k0 = kk / kc_max * kc_max, kc = std::min(kc_max, k - k0);
        T* row = b[index].data.data() + (grp * k + k0) * panels_per_group * nr + (kk - k0) * nr;
        const T* src = w + (grp * m + co) * k_all;
        for (int64_t c = 0; c < cg; ++c) row[c / nr * kc * nr + c % nr] = src[weight_column(g, order, c, ph.taps[t])];
      }
    }
  });
  // Tasks: blocks of phase rows (n, u_d, u_h) of one phase and group, and a share of the columns.
  struct Task {
    int64_t phase, q0, qc;
  };
  std::vector<Task> tasks;
  for (size_t index = 0; index < phases.size(); ++index) {
    const InputPhase& ph = phases[index];
    const int64_t rows = g.batch * ph.count[0] * ph.count[1];
    if (rows == 0 || ph.count[2] == 0) continue;
    const int64_t blocks = std::min(rows, row_blocks(rows * ph.count[2])), block = num_blocks(rows, blocks);
    for (int64_t q0 = 0; q0 < rows; q0 += block) tasks.push_back({int64_t(index), q0, std::min(block, rows - q0)});
  }
  const ColumnSplit cols(cg, nr, g.groups * int64_t(tasks.size()));
  std::vector<int64_t> cost(tasks.size() * g.groups * cols.count);
  for (size_t task = 0; task < cost.size(); ++task) {  // multiply-adds, or values written for a zero fill
    const Task& t = tasks[task / cols.count / g.groups];
    const int64_t nj = std::min(cols.size, cg - int64_t(task) % cols.count * cols.size);
    const int64_t taps = int64_t(phases[t.phase].taps.size());
    cost[task] = t.qc * phases[t.phase].count[2] * nj * (taps == 0 ? 1 : taps * m);
  }
  parallel_for_by_cost(cost, [&](int64_t task) {
    const int64_t j0 = task % cols.count * cols.size, nj = std::min(cols.size, cg - j0);
    const int64_t grp = task / cols.count % g.groups;
    const Task& t = tasks[task / cols.count / g.groups];
    const InputPhase& ph = phases[t.phase];
    const int64_t width = ph.count[2];
    // dX pixel of phase position u: x_i = s_i u_i + residue_i - p_i
    auto x_of = [&](int i, int64_t u) { return g.stride[i] * u + ph.residue[i] - g.pad[i]; };
    const int64_t ldc = g.stride[2] * g.in_channels;
    if (ph.taps.empty()) {  // no tap reaches these positions: dX is zero there
      for (int64_t q = t.q0; q < t.q0 + t.qc; ++q) {
        const int64_t uh = q % ph.count[1] + ph.first[1], ud = q / ph.count[1] % ph.count[0] + ph.first[0];
        const int64_t n = q / ph.count[1] / ph.count[0];
        T* row =
            dx +
            (((n * g.in[0] + x_of(0, ud)) * g.in[1] + x_of(1, uh)) * g.in[2] + x_of(2, ph.first[2])) * g.in_channels +
            grp * cg + j0;
        for (int64_t i = 0; i < width; ++i) std::fill(row + i * ldc, row + i * ldc + nj, T(0));
      }
      return;
    }
    const int64_t mr = row_segment_mr(width), per_row = num_blocks(width, mr);
    std::vector<int64_t> a_row(t.qc * per_row), c_row(t.qc * per_row), seg_rows(t.qc * per_row);
    int64_t segments = 0;
    for (int64_t q = t.q0; q < t.q0 + t.qc; ++q) {
      const int64_t uh = q % ph.count[1] + ph.first[1], ud = q / ph.count[1] % ph.count[0] + ph.first[0];
      const int64_t n = q / ph.count[1] / ph.count[0];
      const int64_t a_base = ((n * size[0] + ud + front[0]) * size[1] + uh + front[1]) * size[2] + front[2];
      const int64_t c_base = ((n * g.in[0] + x_of(0, ud)) * g.in[1] + x_of(1, uh)) * g.in[2];
      for (int64_t i = 0; i < width; i += mr, ++segments) {
        const int64_t uw = ph.first[2] + i;
        a_row[segments] = (a_base + uw) * c_out + grp * m;
        c_row[segments] = (c_base + x_of(2, uw)) * g.in_channels + grp * cg + j0;
        seg_rows[segments] = std::min(mr, width - i);
      }
    }
    const WeightPanels<T>& panels = b[t.phase];
    auto panel = [&](int64_t k0, int64_t kc, int64_t n0) { return panels.block(grp, k0, kc, j0 + n0); };
    gemm_row_segments<T>(mr, segments, a_row.data(), c_row.data(), seg_rows.data(), panels.k, dyp, c_out,
                         column_offset[t.phase].data(), nj, panel, dx, ldc, false);
  });
}

}  // namespace

// dX for strided convolutions (stride 1 runs as a forward convolution instead), per sample n and
// group: col = dY_n * W_g, rows the output positions and columns (tap, c), then col2im: each row
// adds its taps' runs of channels into a zero-padded NHWC copy of dX_n (formulas.md §Conv backward).
// A task owns one (sample, group) slice of dX and adds in a fixed order: no races, no atomics.
template <typename T>
void conv_backward_input_nhwc(const ConvGeometry& g, const T* dy, const T* w, WeightOrder order, T* dx) {
  if (use_phase_backward_input(g)) {
    const auto phases = input_phases(g);
    if (phases_fit_segments(phases)) {
      phase_backward_input_calls.fetch_add(1, std::memory_order_relaxed);
      return conv_backward_input_nhwc_phases(g, phases, dy, w, order, dx);
    }
  }
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), taps = g.kernel_volume();
  const int64_t cg = g.in_channels_per_group(), l = g.out_plane(), mr = gemm_mr<T>();
  const int64_t dp = g.in[0] + 2 * g.pad[0], hp = g.in[1] + 2 * g.pad[1], wp = g.in[2] + 2 * g.pad[2];
  const auto panels = weight_panels_by_rows(g, w, order);
  std::vector<int64_t> tap_offset(taps), dy_column(m);
  for (int64_t tap = 0; tap < taps; ++tap) {
    const int64_t kd = tap / g.kernel[2] / g.kernel[1], kh = tap / g.kernel[2] % g.kernel[1], kw = tap % g.kernel[2];
    tap_offset[tap] = ((kd * g.dilation[0] * hp + kh * g.dilation[1]) * wp + kw * g.dilation[2]) * cg;
  }
  for (int64_t co = 0; co < m; ++co) dy_column[co] = co;
  const int64_t padded_size = checked_numel({dp, hp, wp, cg}, "conv (channels-last grad input)", true);
  const int64_t block = std::min(kColumnBlock, l);
  parallel_for(0, g.batch * g.groups, 1, [&](int64_t begin, int64_t end) {
    const auto col = scratch<T>(block * k);
    std::vector<T> dx_padded(padded_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.groups, grp = task % g.groups;
      std::fill(dx_padded.begin(), dx_padded.end(), T(0));
      auto panel = [&](int64_t k0, int64_t kc, int64_t n0) { return panels->block(grp, k0, kc, n0); };
      for (int64_t r0 = 0; r0 < l; r0 += block) {
        const int64_t rc = std::min(block, l - r0);
        const T* a = dy + (n * l + r0) * g.out_channels + grp * m;
        // Rows of a last micro-kernel panel that would read past dY's end come from a zero-padded copy.
        const int64_t in_place = (g.batch - n) * l - r0 - rc >= mr ? rc : rc / mr * mr;
        if (in_place > 0)
          gemm_shifted_a_packed_b<T>(in_place, m, a, g.out_channels, dy_column.data(), k, panel, col.get(), k);
        if (in_place < rc) {
          std::vector<T> rest(mr * g.out_channels, T(0));
          std::copy_n(a - grp * m + in_place * g.out_channels, (rc - in_place) * g.out_channels, rest.data());
          gemm_shifted_a_packed_b<T>(rc - in_place, m, rest.data() + grp * m, g.out_channels, dy_column.data(), k,
                                     panel, col.get() + in_place * k, k);
        }
        for (int64_t i = 0; i < rc; ++i) {
          const int64_t r = r0 + i, ow = r % g.out[2], oh = r / g.out[2] % g.out[1], od = r / g.out[2] / g.out[1];
          T* origin = dx_padded.data() + ((od * g.stride[0] * hp + oh * g.stride[1]) * wp + ow * g.stride[2]) * cg;
          const T* src = col.get() + i * k;
          for (int64_t tap = 0; tap < taps; ++tap) {
            T* dst = origin + tap_offset[tap];
            const T* run = src + tap * cg;
            for (int64_t c = 0; c < cg; ++c) dst[c] += run[c];
          }
        }
      }
      for (int64_t d = 0; d < g.in[0]; ++d)  // the interior back into dX_n's channels of this group
        for (int64_t h = 0; h < g.in[1]; ++h) {
          const T* src = dx_padded.data() + (((d + g.pad[0]) * hp + h + g.pad[1]) * wp + g.pad[2]) * cg;
          T* dst = dx + (((n * g.in[0] + d) * g.in[1] + h) * g.in[2]) * g.in_channels + grp * cg;
          if (g.groups == 1) {
            std::memcpy(dst, src, g.in[2] * cg * sizeof(T));
            continue;
          }
          for (int64_t x = 0; x < g.in[2]; ++x) std::memcpy(dst + x * g.in_channels, src + x * cg, cg * sizeof(T));
        }
    }
  });
}

#define CNNOPS_INSTANTIATE_NHWC(T)                                                                                    \
  template void conv_forward_nhwc<T>(const ConvGeometry&, const T*, const T*, WeightOrder, const T*, T*, Activation); \
  template WeightOrder conv_backward_weight_nhwc<T>(const ConvGeometry&, const T*, const T*, T*, WeightOrder);        \
  template void conv_backward_input_nhwc<T>(const ConvGeometry&, const T*, const T*, WeightOrder, T*);
CNNOPS_INSTANTIATE_NHWC(float)
CNNOPS_INSTANTIATE_NHWC(double)

}  // namespace cpu
}  // namespace cnnops
