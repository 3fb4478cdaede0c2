#pragma once
// Kernels and loop skeletons shared between the CPU convolution files.
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "common/activation.h"
#include "common/conv_shape.h"
#include "cpu/gemm.h"

namespace cnnops {
namespace cpu {

constexpr int64_t kColumnBlock = 384;  // output positions per GEMM call: a kKc x 384 B block fits L2

inline int64_t num_blocks(int64_t n, int64_t block) { return ceil_div(n, block); }  // common/macros.h

// How a weight row (one output channel) orders its K = C_in/groups x taps values: torch's
// contiguous OIHW as (channel, tap), or a channels-last weight (OHWI) as (tap, channel). The GEMM
// routes read either where it lies (the im2col rows take the weight's order: a product does not
// care in which order it sums K); converting a 512x512x3x3 channels-last weight costs about 1 ms,
// as much as that layer's product at 7x7, batch 1.
enum class WeightOrder { ChannelTap, TapChannel };

// Where W[o, c, tap] lies in row o.
inline int64_t weight_column(const ConvGeometry& g, WeightOrder order, int64_t c, int64_t tap) {
  return order == WeightOrder::TapChannel ? tap * g.in_channels_per_group() + c : c * g.kernel_volume() + tap;
}

// Convolutions below this many multiply-adds run on the calling thread: for them a parallel
// region's fork and join (microseconds, far more on a busy machine) costs more than the work.
constexpr int64_t kMinParallelMacs = int64_t(1) << 16;

// While a SerialRegion is alive on this thread, cpu::parallel_for runs its range inline. Every
// work split is fixed by the sizes alone, so the result is the same either way.
class SerialRegion {
 public:
  explicit SerialRegion(bool serial) : previous_(active()) { active() = previous_ || serial; }
  ~SerialRegion() { active() = previous_; }
  SerialRegion(const SerialRegion&) = delete;
  SerialRegion& operator=(const SerialRegion&) = delete;
  static bool& active() {
    thread_local bool serial = false;
    return serial;
  }

 private:
  bool previous_;
};

inline bool is_small_conv(const ConvGeometry& g) {  // in double: the product may pass 2^63
  return double(g.batch) * double(g.out_channels) * double(g.out_plane()) * double(g.gemm_k()) < kMinParallelMacs;
}

// at::parallel_for, or the whole range on this thread inside a SerialRegion.
template <typename Fn>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  if (SerialRegion::active()) {
    if (begin < end) fn(begin, end);
    return;
  }
  at::parallel_for(begin, end, grain, fn);
}

// Calls fn(n, l0, len, offset) for the pieces of the flat (sample, position) range
// [begin, begin + count) that lie in one sample: positions [l0, l0 + len) of sample n.
template <typename Fn>
void for_each_sample_segment(int64_t begin, int64_t count, int64_t plane, Fn&& fn) {
  for (int64_t offset = 0; offset < count;) {
    const int64_t n = (begin + offset) / plane, l0 = (begin + offset) % plane;
    const int64_t len = std::min(plane - l0, count - offset);
    fn(n, l0, len, offset);
    offset += len;
  }
}

// How the weight gradient's reduction splits the flat (sample, output position) range: chunks of
// kColumnBlock, whose sums go to up to 8 partial sums (chunks [first(p), first(p + 1)) to partial p),
// added in order at the end. Fixed by the sizes alone, so the result never depends on the thread count.
struct WeightGradientChunks {
  int64_t total, chunks, partials;
  explicit WeightGradientChunks(const ConvGeometry& g)
      : total(g.batch * g.out_plane()),
        chunks(num_blocks(total, kColumnBlock)),
        partials(std::clamp<int64_t>(total / 2048, 1, std::min<int64_t>(chunks, 8))) {}
  int64_t first(int64_t p) const { return chunks * p / partials; }
};

// dst[i] = sum over p < partials of partial[p * size + i], added in p order.
template <typename T>
void sum_partials(const T* partial, int64_t partials, int64_t size, T* dst) {
  parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T sum = partial[i];
      for (int64_t p = 1; p < partials; ++p) sum += partial[p * size + i];
      dst[i] = sum;
    }
  });
}

// The weight gradient's reduction, dW_g[M, K] = sum over every (sample, output position) r of
// dY[r, m] * im2col[r, k] (formulas.md §Conv backward). The flat range of r is cut
// into chunks, so small images still give each GEMM call a long reduction. Work is split two
// ways, both fixed by the sizes alone so the result never depends on the thread count: the
// chunks into up to 8 partial sums, added in order at the end (no atomics), and the K columns
// into slices. chunk_gemm(r0, rc, group, j0, jw, dw_slice, workspace) must add the
// chunk's contribution to columns [j0, j0 + jw) of dW_g, at dw_slice (row stride K). dw must be
// zero on entry: a single partial sum (small maps) accumulates straight into it.
template <typename T, typename ChunkGemm>
void reduce_weight_gradient(const ConvGeometry& g, T* dw, ChunkGemm&& chunk_gemm) {
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k();
  const WeightGradientChunks split(g);
  const int64_t total = split.total, chunks = split.chunks, partials = split.partials;
  const int64_t slice = 8 * gemm_nr<T>(), slices = num_blocks(k, slice);
  const int64_t size = g.groups * m * k;
  if (partials == 1) {
    parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
      const auto workspace = scratch<T>(gemm_workspace_size<T>(slice));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t j0 = task * slice, jw = std::min(slice, k - j0);
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const int64_t r0 = chunk * kColumnBlock, rc = std::min(kColumnBlock, total - r0);
          for (int64_t grp = 0; grp < g.groups; ++grp)
            chunk_gemm(r0, rc, grp, j0, jw, dw + grp * m * k + j0, workspace.get());
        }
      }
    });
    return;
  }
  std::vector<T> partial(partials * size, T(0));
  parallel_for(0, partials * slices, 1, [&](int64_t begin, int64_t end) {
    const auto workspace = scratch<T>(gemm_workspace_size<T>(slice));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / slices, j0 = (task % slices) * slice, jw = std::min(slice, k - j0);
      for (int64_t chunk = split.first(p); chunk < split.first(p + 1); ++chunk) {
        const int64_t r0 = chunk * kColumnBlock, rc = std::min(kColumnBlock, total - r0);
        for (int64_t grp = 0; grp < g.groups; ++grp)
          chunk_gemm(r0, rc, grp, j0, jw, partial.data() + p * size + grp * m * k + j0, workspace.get());
      }
    }
  });
  sum_partials(partial.data(), partials, size, dw);
}

// Tests: on, channels-last inputs run the NHWC kernels wherever they serve the geometry, also
// where conv.cpp's speed rules (small maps, 3-d) would convert to NCHW; and how many calls did.
void set_nhwc_kernels_forced(bool on);
int64_t nhwc_kernel_call_count();
// Tests: NHWC forward calls that packed their im2col rows instead of reading the phase grid.
int64_t nhwc_packed_forward_count();
// Tests: calls of each forward kernel conv_forward_any picks (also for grad input's transposed
// problem), by route name.
std::vector<std::pair<std::string, int64_t>> conv_forward_route_counts();
// Tests: channels-last (TapChannel) weights a forward kernel needed converted to ChannelTap.
int64_t conv_weight_conversion_count();
// Tests: weight gradients computed by conv.cpp's transposed product for few output channels
// (conv_backward_weight_rows).
int64_t conv_weight_rows_call_count();
// Tests: channels-last weight gradients computed by conv_nhwc.cpp's transposed product for few
// output channels (conv_backward_weight_nhwc_rows).
int64_t nhwc_weight_rows_count();
// Tests: channels-last 1x1 weight gradients computed with both operands in place
// (conv_backward_weight_nhwc_pointwise).
int64_t nhwc_weight_pointwise_count();

// Channels-last (NHWC / NDHWC) convolution: x, y, dy in that layout, weights as torch's.
// The forward kernels apply `activation` in their output step (csrc/common/activation.h).
template <typename T>
void conv_forward_nhwc(const ConvGeometry& g, const T* x, const T* w, WeightOrder order, const T* bias, T* y,
                       Activation activation);
// dW in `preferred` order where its GEMM can write that order directly, else ChannelTap; returns
// the order written.
template <typename T>
WeightOrder conv_backward_weight_nhwc(const ConvGeometry& g, const T* dy, const T* x, T* dw, WeightOrder preferred);
template <typename T>  // strided convolutions; writes every value of dX
void conv_backward_input_nhwc(const ConvGeometry& g, const T* dy, const T* w, WeightOrder order, T* dx);

// Depthwise convolution (groups == C_in, C_out = C_in * multiplier): direct loops, no GEMM.
// 3x3 and 5x5 at stride 1 and 2 and 7x7 at stride 1 run the SIMD kernels of conv_depthwise_direct.cpp, in NCHW or, when
// depthwise_nhwc_supported, NHWC (nhwc: x, y, dy, dx channels-last); the rest run plain NCHW loops.
// Each writes every value of its output.
bool depthwise_nhwc_supported(const ConvGeometry& g, bool is_double);
template <typename T>
void conv_depthwise_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation,
                            bool nhwc);
template <typename T>
void conv_depthwise_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx, bool nhwc);
// Returns whether it also wrote db (when db is not null): the direct kernels sum it in the same
// pass over dY.
template <typename T>
bool conv_depthwise_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw, T* db, bool nhwc);

}  // namespace cpu
}  // namespace cnnops
