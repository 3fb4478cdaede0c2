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

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/pool_shape.h"

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64; the dynamic loader picks the
// widest the CPU has (GCC function multi-versioning). The loops themselves are plain C++ that
// the compiler vectorizes, so other architectures simply get the default version.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CNNOPS_POOL_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CNNOPS_POOL_SIMD
#endif
#define CNNOPS_POOL_INLINE inline __attribute__((always_inline))

namespace cnnops {
namespace cpu {

// float for float, bfloat16 and half; double for double (sums and comparisons run in it).
template <typename T>
using pool_acc_t = at::opmath_type<T>;

inline int64_t pool_blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Grain for at::parallel_for: enough tasks of ~`work` element-reads each to amortize a task.
inline int64_t pool_grain(int64_t work_per_task) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1));
}

// Channel blocks for NHWC scatters: tasks are (image, channel block) pairs, and channel blocks
// are only cut (in multiples of 16) when there are too few images to keep every thread busy.
struct ChannelBlocks {
  int64_t size, count;
  ChannelBlocks(int64_t batch, int64_t channels) {
    const int64_t wanted = pool_blocks(2 * at::get_num_threads(), std::max<int64_t>(batch, 1));
    size = std::max<int64_t>(16, pool_blocks(pool_blocks(channels, wanted), 16) * 16);
    size = std::min(size, std::max<int64_t>(channels, 1));
    count = pool_blocks(channels, size);
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
template <typename T, typename Body>
void with_accumulator(T* dst, int64_t rows, int64_t width, int64_t dst_stride,
                      std::vector<pool_acc_t<T>>& buffer, Body&& body) {
  using A = pool_acc_t<T>;
  if constexpr (std::is_same_v<T, A>) {
    for (int64_t r = 0; r < rows; ++r) std::fill_n(dst + r * dst_stride, width, T(0));
    body(dst, dst_stride);
  } else {
    buffer.assign(rows * width, A(0));
    body(buffer.data(), width);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < width; ++i) dst[r * dst_stride + i] = T(buffer[r * width + i]);
  }
}

// The kernels. Tensors are contiguous in the layout named by channels_last, outputs allocated
// by the caller with the geometry's sizes. Each returns after all threads are done.
void max_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output,
                             at::Tensor& indices, bool channels_last);
void avg_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output,
                             bool channels_last, bool count_include_pad, int64_t divisor_override);
void avg_pool_backward_kernel(const PoolGeometry& g, const at::Tensor& grad_output,
                              at::Tensor& grad_input, bool channels_last, bool count_include_pad,
                              int64_t divisor_override);
void adaptive_avg_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input,
                                      at::Tensor& output, bool channels_last);
void adaptive_avg_pool_backward_kernel(const PoolGeometry& g, const at::Tensor& grad_output,
                                       at::Tensor& grad_input, bool channels_last);
void adaptive_max_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input,
                                      at::Tensor& output, at::Tensor& indices, bool channels_last);

// The index scatters and gathers behind max-pool backward and max unpool. `small` is the
// pooled side (the side indices live on), `large` the side indices point into: an index must lie
// in [0, large_plane). An out-of-range index is skipped (never an out-of-bounds access) and
// reported: the kernels return false and set *bad_index to one such index.
struct IndexedPlanes {
  int64_t batch, channels, small_plane, large_plane;
};
// large[plane][indices[i]] += small[plane][i]: max pool backward (plain and adaptive).
bool index_scatter_add_kernel(const IndexedPlanes& p, const at::Tensor& small,
                              const at::Tensor& indices, at::Tensor& large, bool channels_last,
                              int64_t* bad_index);
// large[plane][indices[i]] = small[plane][i], zero elsewhere: max unpool forward.
bool index_scatter_kernel(const IndexedPlanes& p, const at::Tensor& small,
                          const at::Tensor& indices, at::Tensor& large, bool channels_last,
                          int64_t* bad_index);
// small[plane][i] = large[plane][indices[i]]: max unpool backward.
bool index_gather_kernel(const IndexedPlanes& p, const at::Tensor& large,
                         const at::Tensor& indices, at::Tensor& small, bool channels_last,
                         int64_t* bad_index);

}  // namespace cpu
}  // namespace cnnops
