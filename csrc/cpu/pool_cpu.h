#pragma once
// Pooling on the CPU: the kernels behind csrc/cpu/pool.cpp's ops, and the loop helpers they share.
//
// Layouts. A contiguous (NCHW) tensor is N*C planes of D*H*W values; a channels_last (NHWC)
// one is N images of D*H*W positions, each holding C channel values side by side. Each layout
// has its own kernels: NCHW ones work a plane (or a row of output) at a time and vectorize
// along W; NHWC ones work one output position at a time and vectorize over the channels.
//
// Determinism. Every output element is computed by one task in a fixed order, and every
// scatter (the backward passes, max unpool) gives each task whole planes, or whole channels of
// one image, so no two threads ever write the same element and results never depend on the
// thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/pool_shape.h"

#include "cpu/simd.h"

// SIMD (simd.h): the kernels are plain C++ loops, CNNOPS_ALWAYS_INLINE templates that
// simd_dispatch compiles for AVX-512, AVX2 and the baseline and picks by cpu_isa(); the
// compiler vectorizes them. Only the running max with its index update is not vectorized well
// that way: pool_max.cpp has AVX-512 intrinsics for it (float, int32 indices), which its
// AVX-512 instances call. Callers allocate the kernels' scratch (MaxScratch, AvgScratch) before
// entering them, so the loops themselves never allocate.

namespace cnnops {
namespace cpu {

// float for float, bfloat16 and half; double for double (sums and comparisons run in it).
template <typename T>
using pool_acc_t = at::opmath_type<T>;

// Grain for at::parallel_for: enough tasks of ~`work` element-reads each to amortize a task.
inline int64_t pool_grain(int64_t work_per_task) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1));
}

// Walks the flat (n, od, oh, ow) range of output positions with counters: NHWC kernels do
// little work per position, so a division per position would show.
struct PositionCursor {
  int64_t OD, OH, OW;
  int64_t n, od, oh, ow;
  PositionCursor(const PoolGeometry& g, int64_t q) : OD(g.out[0]), OH(g.out[1]), OW(g.out[2]) {
    ow = q % OW;
    oh = (q / OW) % OH;
    od = (q / (OW * OH)) % OD;
    n = q / (OW * OH * OD);
  }
  void next() {
    if (++ow < OW) return;
    ow = 0;
    if (++oh < OH) return;
    oh = 0;
    if (++od < OD) return;
    od = 0;
    ++n;
  }
};

// Channel blocks for NHWC scatters: tasks are (image, channel block) pairs, and channel blocks
// are only cut (in multiples of 16) when there are too few images to keep every thread busy.
struct ChannelBlocks {
  int64_t size, count;
  ChannelBlocks(int64_t batch, int64_t channels) {
    const int64_t wanted = ceil_div(2 * at::get_num_threads(), std::max<int64_t>(batch, 1));
    size = std::max<int64_t>(16, ceil_div(ceil_div(channels, wanted), 16) * 16);
    size = std::min(size, std::max<int64_t>(channels, 1));
    count = ceil_div(channels, size);
  }
};

// Remembers the first bad index a parallel scatter/gather met (it skips the access instead of
// going out of bounds); the op raises after the loop.
struct BadIndex {
  std::atomic<bool> seen{false};
  std::atomic<int64_t> value{0};
  void report(int64_t index) {
    bool expected = false;
    if (seen.compare_exchange_strong(expected, true)) value.store(index);
  }
};

// Runs body(acc, stride) over a zeroed accumulator for `rows` rows of `width` values that live
// at dst + r * dst_stride: dst itself when T is its own accumulation type, else a float
// buffer that is rounded into dst at the end (half and bfloat16 gradients accumulate in float).
// Callers reserve rows * width in `buffer` beforehand, so the kernels' loops do not allocate.
template <typename T, typename Body>
CNNOPS_ALWAYS_INLINE void with_accumulator(T* dst, int64_t rows, int64_t width, int64_t dst_stride,
                                           std::vector<pool_acc_t<T>>& buffer, Body&& body) {
  using A = pool_acc_t<T>;
  if constexpr (std::is_same_v<T, A>) {
    for (int64_t r = 0; r < rows; ++r) std::fill_n(dst + r * dst_stride, width, T(0));
    body(dst, dst_stride);
  } else {
    buffer.assign(rows * width, A(0));  // no allocation when the caller reserved enough
    body(buffer.data(), width);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < width; ++i) dst[r * dst_stride + i] = T(buffer[r * width + i]);
  }
}

// NCHW row loops run over the outputs of a row padded to a multiple of this (one AVX-512
// vector of float), so their vectorized loops never need a tail.
constexpr int64_t kRowBlock = 16;

// A padded input row split into its `stride` phases: phase p holds padded columns p, p + S,
// p + 2S, ... Output o's tap at padded column o*S + t is then phase t % S at o + t / S, so every
// tap loop reads consecutive memory whatever the stride (which the compiler vectorizes; it
// does not vectorize strided loads with a running max and index well). Columns outside the
// input hold `fill` (-inf for max pooling, 0 for sums).
// Whether rows of width W take the phased path: its row buffer spans padded_ow * stride
// columns plus the dilated kernel's extent, which a stride or kernel far beyond the row would
// blow up (outputs then read the row sparsely anyway, and a direct loop serves them). Each
// factor is bounded first, so the products cannot overflow.
inline bool use_phased_rows(int64_t out_w, int64_t in_w, int64_t kernel, int64_t stride, int64_t pad,
                            int64_t dilation) {
  constexpr int64_t kLimit = int64_t(1) << 24;
  if (out_w > kLimit || in_w > kLimit || kernel > kLimit || stride > kLimit || pad > kLimit || dilation > kLimit)
    return false;
  return ceil_div(out_w, kRowBlock) * kRowBlock * stride <= 4 * (in_w + 2 * pad) + 64 * kRowBlock &&
         (kernel - 1) * dilation <= 2 * in_w + 64 * kRowBlock;
}

// phase[j] = src[2j] for j in [j0, j1). bfloat16 is a float's upper half, so for bfloat16 into float
// each 32-bit word (src[2j], src[2j+1]) holds the wanted bits in its low half (little endian): one
// shift per value and no 16-bit lane shuffles, which GCC's AVX-512BW code for the plain loop needs
// (~10% slower pooling). The last value is read alone: src[2j+1] may lie past the input.
template <typename T, typename A>
CNNOPS_ALWAYS_INLINE void load_even_columns(const T* __restrict src, int64_t j0, int64_t j1, A* __restrict phase) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    for (int64_t j = j0; j < j1 - 1; ++j) {
      uint32_t pair;
      std::memcpy(&pair, src + 2 * j, sizeof(pair));
      phase[j] = std::bit_cast<float>(pair << 16);
    }
    if (j0 < j1) phase[j1 - 1] = A(src[2 * (j1 - 1)]);
    return;
  }
#endif
  for (int64_t j = j0; j < j1; ++j) phase[j] = A(src[2 * j]);
}

template <typename A>
struct PhasedRow {
  int64_t stride, pad, width, phase_len;
  std::vector<A> data;
  std::vector<int64_t> first, last;  // per phase: the range of j that holds input columns
  std::vector<int64_t> tap_offset;   // per tap k: where taps(k * dilation) starts in data
  PhasedRow(int64_t stride_, int64_t pad_, int64_t width_, int64_t padded_width, int64_t kernel, int64_t dilation,
            A fill)
      : stride(stride_),
        pad(pad_),
        width(width_),
        phase_len(ceil_div(padded_width, stride_)),
        data(stride_ * phase_len, fill) {
    for (int64_t p = 0; p < stride; ++p) {  // phase p, slot j: input column j*S + p - pad
      first.push_back(max64(ceil_div(pad - p, stride), 0));
      last.push_back(ceil_div(width + pad - p, stride));
    }
    for (int64_t k = 0; k < kernel; ++k) {
      const int64_t t = k * dilation;
      tap_offset.push_back((t % stride) * phase_len + t / stride);
    }
  }
  template <typename T>
  CNNOPS_ALWAYS_INLINE void load(const T* row) {  // input column iw goes to padded column iw + pad
    for (int64_t p = 0; p < stride; ++p) {
      A* __restrict phase = data.data() + p * phase_len;
      const T* __restrict src = row + p - pad;
      const int64_t j0 = first[p], j1 = last[p];
      if (stride == 1)  // constant strides vectorize
        for (int64_t j = j0; j < j1; ++j) phase[j] = A(src[j]);
      else if (stride == 2)
        load_even_columns(src, j0, j1, phase);
      else
        for (int64_t j = j0; j < j1; ++j) phase[j] = A(src[j * stride]);
    }
  }
  // Tap k of every output: output o reads taps(k)[o], the padded column o*S + k*D.
  const A* taps(int64_t k) const { return data.data() + tap_offset[k]; }
};

// The kernels. Tensors are contiguous in the layout named by channels_last, outputs allocated
// by the caller with the geometry's sizes. Each returns after all threads are done.
void max_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output, at::Tensor& indices,
                             bool channels_last);
void avg_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output, bool channels_last,
                             bool count_include_pad, int64_t divisor_override);
void avg_pool_backward_kernel(const PoolGeometry& g, const at::Tensor& grad_output, at::Tensor& grad_input,
                              bool channels_last, bool count_include_pad, int64_t divisor_override);
void adaptive_avg_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output,
                                      bool channels_last);
void adaptive_avg_pool_backward_kernel(const PoolGeometry& g, const at::Tensor& grad_output, at::Tensor& grad_input,
                                       bool channels_last);
void adaptive_max_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output,
                                      at::Tensor& indices, bool channels_last);

// The index scatters and gathers behind max-pool backward and max unpool. `small` is the
// pooled side (the side indices live on), `large` the side indices point into: an index must lie
// in [0, large_plane). An out-of-range index is skipped (never an out-of-bounds access) and
// reported: the kernels return false and set *bad_index to one such index.
struct IndexedPlanes {
  int64_t batch, channels, small_plane, large_plane;
};
// large[plane][indices[i]] += small[plane][i]: max pool backward (plain and adaptive). Indices
// in [large_plane, skip_limit) are skipped without a report (all-padding windows).
bool index_scatter_add_kernel(const IndexedPlanes& p, const at::Tensor& small, const at::Tensor& indices,
                              at::Tensor& large, bool channels_last, int64_t skip_limit, int64_t* bad_index);
// large[plane][indices[i]] = small[plane][i], zero elsewhere: max unpool forward.
bool index_scatter_kernel(const IndexedPlanes& p, const at::Tensor& small, const at::Tensor& indices, at::Tensor& large,
                          bool channels_last, int64_t* bad_index);
// small[plane][i] = large[plane][indices[i]]: max unpool backward.
bool index_gather_kernel(const IndexedPlanes& p, const at::Tensor& large, const at::Tensor& indices, at::Tensor& small,
                         bool channels_last, int64_t* bad_index);

}  // namespace cpu
}  // namespace cnnops
