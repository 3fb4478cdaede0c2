#pragma once
// Device side of csrc/cuda/pool.cu: one thread per element, in a grid-stride loop, for every
// pooling op. The window and output-range math is the host+device code of
// csrc/common/pool_shape.h, which the CPU kernels run too.
//
// Every kernel comes in two layouts, chosen by the `channels_last` template argument:
//   NCDHW (contiguous): element i of the walk is w fastest, so a warp covers a row of one plane;
//   NDHWC (channels_last / channels_last_3d): c fastest, so a warp covers 32 channels of one
//   position and every read of a window tap is one coalesced transaction.
// 1d and 2d pools run as 3d ones with unit leading dims (PoolGeometry lifts them).
//
// Backward passes are gathers: each input element visits the output windows that cover it and
// sums their gradients in a fixed order, so there are no atomics and results are bitwise
// reproducible. Only max unpool scatters (its forward is a scatter by definition).
//
// This header also compiles for the host (tests/test_pool_kernels_host.py runs every kernel on
// the CPU with a serial threadIdx/blockIdx shim): device-only intrinsics stay out of it except
// atomicMin, which the shim provides.
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>

#include <cstdint>
#include <limits>

#include "../common/pool_shape.h"

namespace cnnops {

constexpr int kPoolThreads = 256;

// ---------------------------------------------------------------------------------------------
// Addressing
// ---------------------------------------------------------------------------------------------

// The grid-stride walk over [0, total). The host caps the grid at 65536 blocks, so
// first + step never overflows an index_t that holds total (see fits_int32 in pool.cu).
template <typename index_t>
__device__ __forceinline__ index_t first_element() {
  return static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + static_cast<index_t>(threadIdx.x);
}
template <typename index_t>
__device__ __forceinline__ index_t element_step() {
  return static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
}

// Element (n, c, d, h, w) of an N x C x D x H x W tensor.
template <typename index_t>
struct Element {
  index_t n, c, d, h, w;
};

// Position i in memory order -> (n, c, d, h, w), for a tensor of `channels` channels and
// spatial sizes `size` (D, H, W).
template <bool channels_last, typename index_t>
__device__ __forceinline__ Element<index_t> element_at(index_t i, index_t channels, const index_t (&size)[3]) {
  Element<index_t> e;
  if (channels_last) {
    e.c = i % channels;
    i /= channels;
  }
  e.w = i % size[2];
  i /= size[2];
  e.h = i % size[1];
  i /= size[1];
  e.d = i % size[0];
  i /= size[0];
  if (channels_last) {
    e.n = i;
  } else {
    e.c = i % channels;
    e.n = i / channels;
  }
  return e;
}

// Position i in memory order -> its (n, c) only (max unpool needs no more).
template <bool channels_last, typename index_t>
__device__ __forceinline__ Element<index_t> plane_of_element(index_t i, index_t channels, index_t plane_size) {
  Element<index_t> e{};
  if (channels_last) {
    e.c = i % channels;
    e.n = i / channels / plane_size;
  } else {
    const index_t nc = i / plane_size;
    e.c = nc % channels;
    e.n = nc / channels;
  }
  return e;
}

// The (n, c) plane of a tensor with `plane_size` spatial elements per plane: spatial element
// s = (d * H + h) * W + w (the flat index max pool returns) lives at base + s * step.
template <typename index_t>
struct Plane {
  index_t base, step;
  __device__ __forceinline__ index_t at(index_t s) const { return base + s * step; }
};

template <bool channels_last, typename index_t>
__device__ __forceinline__ Plane<index_t> plane_at(const Element<index_t>& e, index_t channels, index_t plane_size) {
  if (channels_last) return {e.n * plane_size * channels + e.c, channels};
  return {(e.n * channels + e.c) * plane_size, index_t(1)};
}

// The geometry's sizes in the kernel's index type (every one of them is below a tensor's numel).
template <typename index_t>
struct PoolSizes {
  index_t channels, in[3], out[3], in_plane, out_plane;
  __device__ __forceinline__ explicit PoolSizes(const PoolGeometry& g)
      : channels(static_cast<index_t>(g.channels)),
        in_plane(static_cast<index_t>(g.in_plane())),
        out_plane(static_cast<index_t>(g.out_plane())) {
    for (int i = 0; i < 3; ++i) {
      in[i] = static_cast<index_t>(g.in[i]);
      out[i] = static_cast<index_t>(g.out[i]);
    }
  }
  __device__ __forceinline__ index_t in_flat(index_t d, index_t h, index_t w) const {
    return (d * in[1] + h) * in[2] + w;
  }
  __device__ __forceinline__ index_t out_flat(index_t d, index_t h, index_t w) const {
    return (d * out[1] + h) * out[2] + w;
  }
};

// A loop range [begin, end) by step in the kernel's index type (the shared math is int64; its
// results lie inside a tensor dim, so they fit).
template <typename index_t>
struct Range {
  index_t begin, end, step;
};
template <typename index_t>
__device__ __forceinline__ Range<index_t> range_of(const PoolWindow& w) {
  return {static_cast<index_t>(w.start), static_cast<index_t>(w.end), static_cast<index_t>(w.step)};
}
template <typename index_t>
__device__ __forceinline__ Range<index_t> range_of(const AvgWindow& w) {
  return {static_cast<index_t>(w.start), static_cast<index_t>(w.end), index_t(1)};
}
template <typename index_t>
__device__ __forceinline__ Range<index_t> range_of(const OutputRange& r) {
  return {static_cast<index_t>(r.lo), static_cast<index_t>(r.hi), index_t(1)};
}

// The running max of a window, as torch's kernels keep it: starts at -inf with the first
// in-window tap as argmax; a later tap wins only if strictly greater (the first maximum is
// kept) or NaN (so a NaN anywhere in the window propagates, with the last NaN's index).
template <typename acc_t>
struct RunningMax {
  acc_t value;
  int64_t index;
  __device__ __forceinline__ explicit RunningMax(int64_t first_index)
      : value(-std::numeric_limits<acc_t>::infinity()), index(first_index) {}
  __device__ __forceinline__ void update(acc_t v, int64_t at) {
    if (v > value || at::_isnan(v)) {
      value = v;
      index = at;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Max pool
// ---------------------------------------------------------------------------------------------

// y = max over the window (formulas.md §Max pool, §Pool output size), with
// the argmax as a flat index into the input plane.
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    max_pool_forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
                            int64_t* __restrict__ indices, const PoolGeometry g, index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const Element<index_t> e = element_at<channels_last>(i, s.channels, s.out);
    const Plane<index_t> in = plane_at<channels_last>(e, s.channels, s.in_plane);
    const PoolWindow wd = max_pool_window(e.d, g.in[0], g.kernel[0], g.stride[0], g.pad[0], g.dilation[0]);
    const PoolWindow wh = max_pool_window(e.h, g.in[1], g.kernel[1], g.stride[1], g.pad[1], g.dilation[1]);
    const PoolWindow ww = max_pool_window(e.w, g.in[2], g.kernel[2], g.stride[2], g.pad[2], g.dilation[2]);
    const Range<index_t> rd = range_of<index_t>(wd), rh = range_of<index_t>(wh), rw = range_of<index_t>(ww);
    // torch's first argmax candidate, even for a window with no tap inside the input.
    RunningMax<acc_t> best((wd.start * g.in[1] + wh.start) * g.in[2] + ww.start);
    for (index_t d = rd.begin; d < rd.end; d += rd.step)
      for (index_t h = rh.begin; h < rh.end; h += rh.step)
        for (index_t w = rw.begin; w < rw.end; w += rw.step) {
          const index_t flat = s.in_flat(d, h, w);
          best.update(static_cast<acc_t>(input[in.at(flat)]), flat);
        }
    output[i] = static_cast<scalar_t>(best.value);
    indices[i] = best.index;
  }
}

// dl/dx = sum of dl/dy over the outputs whose argmax is x (formulas.md §Max pool),
// as a gather: every output window that spans x is checked, in a fixed order.
// Indices that match no input element (out of range, garbage) are simply never matched.
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    max_pool_backward_kernel(const scalar_t* __restrict__ grad_output, const int64_t* __restrict__ indices,
                             scalar_t* __restrict__ grad_input, const PoolGeometry g, index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const Element<index_t> e = element_at<channels_last>(i, s.channels, s.in);
    const Plane<index_t> out = plane_at<channels_last>(e, s.channels, s.out_plane);
    const int64_t own = static_cast<int64_t>(s.in_flat(e.d, e.h, e.w));
    const Range<index_t> rd = range_of<index_t>(
        pool_outputs_covering(e.d, g.out[0], g.dilation[0] * (g.kernel[0] - 1) + 1, g.stride[0], g.pad[0]));
    const Range<index_t> rh = range_of<index_t>(
        pool_outputs_covering(e.h, g.out[1], g.dilation[1] * (g.kernel[1] - 1) + 1, g.stride[1], g.pad[1]));
    const Range<index_t> rw = range_of<index_t>(
        pool_outputs_covering(e.w, g.out[2], g.dilation[2] * (g.kernel[2] - 1) + 1, g.stride[2], g.pad[2]));
    acc_t grad = acc_t(0);
    for (index_t od = rd.begin; od < rd.end; ++od)
      for (index_t oh = rh.begin; oh < rh.end; ++oh)
        for (index_t ow = rw.begin; ow < rw.end; ++ow) {
          const index_t slot = out.at(s.out_flat(od, oh, ow));
          if (indices[slot] == own) grad += static_cast<acc_t>(grad_output[slot]);
        }
    grad_input[i] = static_cast<scalar_t>(grad);
  }
}

// ---------------------------------------------------------------------------------------------
// Average pool
// ---------------------------------------------------------------------------------------------

// y = sum over the window / divisor (avg_pool_divisor: torch's count_include_pad, ceil_mode and
// divisor_override rules).
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    avg_pool_forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output, const PoolGeometry g,
                            bool count_include_pad, int64_t divisor_override, index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const Element<index_t> e = element_at<channels_last>(i, s.channels, s.out);
    const Plane<index_t> in = plane_at<channels_last>(e, s.channels, s.in_plane);
    const AvgWindow wd = avg_pool_window(e.d, g.in[0], g.kernel[0], g.stride[0], g.pad[0]);
    const AvgWindow wh = avg_pool_window(e.h, g.in[1], g.kernel[1], g.stride[1], g.pad[1]);
    const AvgWindow ww = avg_pool_window(e.w, g.in[2], g.kernel[2], g.stride[2], g.pad[2]);
    if (wd.start >= wd.end || wh.start >= wh.end || ww.start >= ww.end) {  // as torch: 0
      output[i] = static_cast<scalar_t>(0);
      continue;
    }
    const Range<index_t> rd = range_of<index_t>(wd), rh = range_of<index_t>(wh), rw = range_of<index_t>(ww);
    acc_t sum = acc_t(0);
    for (index_t d = rd.begin; d < rd.end; ++d)
      for (index_t h = rh.begin; h < rh.end; ++h)
        for (index_t w = rw.begin; w < rw.end; ++w) sum += static_cast<acc_t>(input[in.at(s.in_flat(d, h, w))]);
    const int64_t divisor = avg_pool_divisor(wd, wh, ww, count_include_pad, divisor_override);
    output[i] = static_cast<scalar_t>(sum / static_cast<acc_t>(divisor));
  }
}

// dl/dx = sum over the windows containing x of dl/dy / divisor (formulas.md
// §Avg pool), as a gather over the covering outputs.
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    avg_pool_backward_kernel(const scalar_t* __restrict__ grad_output, scalar_t* __restrict__ grad_input,
                             const PoolGeometry g, bool count_include_pad, int64_t divisor_override, index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const Element<index_t> e = element_at<channels_last>(i, s.channels, s.in);
    const Plane<index_t> out = plane_at<channels_last>(e, s.channels, s.out_plane);
    const Range<index_t> rd =
        range_of<index_t>(pool_outputs_covering(e.d, g.out[0], g.kernel[0], g.stride[0], g.pad[0]));
    const Range<index_t> rh =
        range_of<index_t>(pool_outputs_covering(e.h, g.out[1], g.kernel[1], g.stride[1], g.pad[1]));
    const Range<index_t> rw =
        range_of<index_t>(pool_outputs_covering(e.w, g.out[2], g.kernel[2], g.stride[2], g.pad[2]));
    acc_t grad = acc_t(0);
    for (index_t od = rd.begin; od < rd.end; ++od) {
      const AvgWindow wd = avg_pool_window(od, g.in[0], g.kernel[0], g.stride[0], g.pad[0]);
      for (index_t oh = rh.begin; oh < rh.end; ++oh) {
        const AvgWindow wh = avg_pool_window(oh, g.in[1], g.kernel[1], g.stride[1], g.pad[1]);
        for (index_t ow = rw.begin; ow < rw.end; ++ow) {
          const AvgWindow ww = avg_pool_window(ow, g.in[2], g.kernel[2], g.stride[2], g.pad[2]);
          if (wd.start >= wd.end || wh.start >= wh.end || ww.start >= ww.end) continue;
          const int64_t divisor = avg_pool_divisor(wd, wh, ww, count_include_pad, divisor_override);
          grad += static_cast<acc_t>(grad_output[out.at(s.out_flat(od, oh, ow))]) / static_cast<acc_t>(divisor);
        }
      }
    }
    grad_input[i] = static_cast<scalar_t>(grad);
  }
}

// ---------------------------------------------------------------------------------------------
// Adaptive pools: output o of O covers [floor(o*I/O), ceil((o+1)*I/O)) in every dim
// ---------------------------------------------------------------------------------------------

template <typename index_t>
__device__ __forceinline__ Range<index_t> adaptive_range(index_t o, int64_t in, int64_t out) {
  return {static_cast<index_t>(adaptive_start(o, in, out)), static_cast<index_t>(adaptive_end(o, in, out)), index_t(1)};
}

// y = mean of the window. Divided one dim at a time, as torch's kernel does (same rounding).
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    adaptive_avg_pool_forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
                                     const PoolGeometry g, index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const Element<index_t> e = element_at<channels_last>(i, s.channels, s.out);
    const Plane<index_t> in = plane_at<channels_last>(e, s.channels, s.in_plane);
    const Range<index_t> rd = adaptive_range(e.d, g.in[0], g.out[0]);
    const Range<index_t> rh = adaptive_range(e.h, g.in[1], g.out[1]);
    const Range<index_t> rw = adaptive_range(e.w, g.in[2], g.out[2]);
    acc_t sum = acc_t(0);
    for (index_t d = rd.begin; d < rd.end; ++d)
      for (index_t h = rh.begin; h < rh.end; ++h)
        for (index_t w = rw.begin; w < rw.end; ++w) sum += static_cast<acc_t>(input[in.at(s.in_flat(d, h, w))]);
    output[i] = static_cast<scalar_t>(sum / static_cast<acc_t>(rd.end - rd.begin) /
                                      static_cast<acc_t>(rh.end - rh.begin) / static_cast<acc_t>(rw.end - rw.begin));
  }
}

// Large windows (global average pooling: N*C outputs of H*W taps each) leave one thread per
// output with too little parallelism and long serial loops. They run in two passes instead:
// `chunks` threads share each window, thread j summing taps j, j + chunks, ... (so a warp reads
// consecutive taps in NCDHW, consecutive channels in NDHWC), then one thread per output adds
// the chunk sums in order. The split depends only on the sizes: results are reproducible.
//
// Partial sums are stored in the walk order of the first pass: for output position o (memory
// order) and chunk j, at o * chunks + j (NCDHW), or (o / C * chunks + j) * C + o % C (NDHWC).
template <bool channels_last, typename index_t>
__device__ __forceinline__ index_t partial_slot(index_t o, index_t j, index_t channels, index_t chunks) {
  if (channels_last) return ((o / channels) * chunks + j) * channels + o % channels;
  return o * chunks + j;
}

template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    adaptive_avg_pool_partial_kernel(const scalar_t* __restrict__ input,
                                     at::acc_type<scalar_t, true>* __restrict__ partial, const PoolGeometry g,
                                     index_t chunks, index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    // i -> (output position o in memory order, chunk j), inverting partial_slot
    index_t o, j;
    if (channels_last) {
      const index_t rest = i / s.channels;
      j = rest % chunks;
      o = (rest / chunks) * s.channels + i % s.channels;
    } else {
      j = i % chunks;
      o = i / chunks;
    }
    const Element<index_t> e = element_at<channels_last>(o, s.channels, s.out);
    const Plane<index_t> in = plane_at<channels_last>(e, s.channels, s.in_plane);
    const Range<index_t> rd = adaptive_range(e.d, g.in[0], g.out[0]);
    const Range<index_t> rh = adaptive_range(e.h, g.in[1], g.out[1]);
    const Range<index_t> rw = adaptive_range(e.w, g.in[2], g.out[2]);
    const index_t kh = rh.end - rh.begin, kw = rw.end - rw.begin;
    const index_t taps = (rd.end - rd.begin) * kh * kw;
    acc_t sum = acc_t(0);
    for (index_t t = j; t < taps; t += chunks) {
      const index_t w = t % kw, hd = t / kw;
      sum += static_cast<acc_t>(input[in.at(s.in_flat(rd.begin + hd / kh, rh.begin + hd % kh, rw.begin + w))]);
    }
    partial[i] = sum;
  }
}

template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    adaptive_avg_pool_finish_kernel(const at::acc_type<scalar_t, true>* __restrict__ partial,
                                    scalar_t* __restrict__ output, const PoolGeometry g, index_t chunks,
                                    index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t o = first_element<index_t>(); o < total; o += element_step<index_t>()) {
    const Element<index_t> e = element_at<channels_last>(o, s.channels, s.out);
    const Range<index_t> rd = adaptive_range(e.d, g.in[0], g.out[0]);
    const Range<index_t> rh = adaptive_range(e.h, g.in[1], g.out[1]);
    const Range<index_t> rw = adaptive_range(e.w, g.in[2], g.out[2]);
    acc_t sum = acc_t(0);
    for (index_t j = 0; j < chunks; ++j) sum += partial[partial_slot<channels_last>(o, j, s.channels, chunks)];
    output[o] = static_cast<scalar_t>(sum / static_cast<acc_t>(rd.end - rd.begin) /
                                      static_cast<acc_t>(rh.end - rh.begin) / static_cast<acc_t>(rw.end - rw.begin));
  }
}

// dl/dx = sum over the adaptive windows containing x of dl/dy / window size (a gather).
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    adaptive_avg_pool_backward_kernel(const scalar_t* __restrict__ grad_output, scalar_t* __restrict__ grad_input,
                                      const PoolGeometry g, index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const Element<index_t> e = element_at<channels_last>(i, s.channels, s.in);
    const Plane<index_t> out = plane_at<channels_last>(e, s.channels, s.out_plane);
    const Range<index_t> rd = range_of<index_t>(adaptive_outputs_covering(e.d, g.in[0], g.out[0]));
    const Range<index_t> rh = range_of<index_t>(adaptive_outputs_covering(e.h, g.in[1], g.out[1]));
    const Range<index_t> rw = range_of<index_t>(adaptive_outputs_covering(e.w, g.in[2], g.out[2]));
    acc_t grad = acc_t(0);
    for (index_t od = rd.begin; od < rd.end; ++od) {
      const Range<index_t> wd = adaptive_range(od, g.in[0], g.out[0]);
      const acc_t kd = static_cast<acc_t>(wd.end - wd.begin);
      for (index_t oh = rh.begin; oh < rh.end; ++oh) {
        const Range<index_t> wh = adaptive_range(oh, g.in[1], g.out[1]);
        const acc_t kh = static_cast<acc_t>(wh.end - wh.begin);
        for (index_t ow = rw.begin; ow < rw.end; ++ow) {
          const Range<index_t> ww = adaptive_range(ow, g.in[2], g.out[2]);
          const acc_t kw = static_cast<acc_t>(ww.end - ww.begin);
          grad += static_cast<acc_t>(grad_output[out.at(s.out_flat(od, oh, ow))]) / kd / kh / kw;
        }
      }
    }
    grad_input[i] = static_cast<scalar_t>(grad);
  }
}

// y = max of the adaptive window, with its flat argmax (same NaN and tie rules as max pool).
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    adaptive_max_pool_forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
                                     int64_t* __restrict__ indices, const PoolGeometry g, index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const Element<index_t> e = element_at<channels_last>(i, s.channels, s.out);
    const Plane<index_t> in = plane_at<channels_last>(e, s.channels, s.in_plane);
    const Range<index_t> rd = adaptive_range(e.d, g.in[0], g.out[0]);
    const Range<index_t> rh = adaptive_range(e.h, g.in[1], g.out[1]);
    const Range<index_t> rw = adaptive_range(e.w, g.in[2], g.out[2]);
    RunningMax<acc_t> best(static_cast<int64_t>(s.in_flat(rd.begin, rh.begin, rw.begin)));
    for (index_t d = rd.begin; d < rd.end; ++d)
      for (index_t h = rh.begin; h < rh.end; ++h)
        for (index_t w = rw.begin; w < rw.end; ++w) {
          const index_t flat = s.in_flat(d, h, w);
          best.update(static_cast<acc_t>(input[in.at(flat)]), flat);
        }
    output[i] = static_cast<scalar_t>(best.value);
    indices[i] = best.index;
  }
}

// Gather over the adaptive windows containing x whose argmax is x.
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    adaptive_max_pool_backward_kernel(const scalar_t* __restrict__ grad_output, const int64_t* __restrict__ indices,
                                      scalar_t* __restrict__ grad_input, const PoolGeometry g, index_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  const PoolSizes<index_t> s(g);
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const Element<index_t> e = element_at<channels_last>(i, s.channels, s.in);
    const Plane<index_t> out = plane_at<channels_last>(e, s.channels, s.out_plane);
    const int64_t own = static_cast<int64_t>(s.in_flat(e.d, e.h, e.w));
    const Range<index_t> rd = range_of<index_t>(adaptive_outputs_covering(e.d, g.in[0], g.out[0]));
    const Range<index_t> rh = range_of<index_t>(adaptive_outputs_covering(e.h, g.in[1], g.out[1]));
    const Range<index_t> rw = range_of<index_t>(adaptive_outputs_covering(e.w, g.in[2], g.out[2]));
    acc_t grad = acc_t(0);
    for (index_t od = rd.begin; od < rd.end; ++od)
      for (index_t oh = rh.begin; oh < rh.end; ++oh)
        for (index_t ow = rw.begin; ow < rw.end; ++ow) {
          const index_t slot = out.at(s.out_flat(od, oh, ow));
          if (indices[slot] == own) grad += static_cast<acc_t>(grad_output[slot]);
        }
    grad_input[i] = static_cast<scalar_t>(grad);
  }
}

// ---------------------------------------------------------------------------------------------
// Max unpool
// ---------------------------------------------------------------------------------------------

// Sizes of an unpool: `in_plane` spatial elements per (n, c) of the pooled tensor (input and
// indices), `out_plane` of the unpooled one (output, or grad_output in backward).
template <typename index_t>
struct UnpoolSizes {
  index_t channels, in_plane, out_plane;
};

// Records an index outside [0, out_plane): the smallest offending position wins, so the error
// the host reports does not depend on thread timing.
__device__ __forceinline__ void record_invalid_index(unsigned long long* first_invalid, int64_t position) {
  atomicMin(first_invalid, static_cast<unsigned long long>(position));
}

// output[n, c][indices[i]] = input[i] on a zero-filled output. Out-of-range indices are never
// written, only recorded. Duplicate indices race (the last writer is unspecified, as in torch).
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    max_unpool_forward_kernel(const scalar_t* __restrict__ input, const int64_t* __restrict__ indices,
                              scalar_t* __restrict__ output, const UnpoolSizes<index_t> s, index_t total,
                              unsigned long long* __restrict__ first_invalid) {
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const int64_t target = indices[i];
    if (target < 0 || target >= static_cast<int64_t>(s.out_plane)) {
      record_invalid_index(first_invalid, static_cast<int64_t>(i));
      continue;
    }
    const Element<index_t> e = plane_of_element<channels_last>(i, s.channels, s.in_plane);
    const Plane<index_t> out = plane_at<channels_last>(e, s.channels, s.out_plane);
    output[out.at(static_cast<index_t>(target))] = input[i];
  }
}

// grad_input[i] = grad_output[n, c][indices[i]] (a gather; out-of-range indices read nothing,
// give 0 and are recorded).
template <typename scalar_t, typename index_t, bool channels_last>
__global__ void __launch_bounds__(kPoolThreads)
    max_unpool_backward_kernel(const scalar_t* __restrict__ grad_output, const int64_t* __restrict__ indices,
                               scalar_t* __restrict__ grad_input, const UnpoolSizes<index_t> s, index_t total,
                               unsigned long long* __restrict__ first_invalid) {
  for (index_t i = first_element<index_t>(); i < total; i += element_step<index_t>()) {
    const int64_t target = indices[i];
    if (target < 0 || target >= static_cast<int64_t>(s.out_plane)) {
      record_invalid_index(first_invalid, static_cast<int64_t>(i));
      grad_input[i] = static_cast<scalar_t>(0);
      continue;
    }
    const Element<index_t> e = plane_of_element<channels_last>(i, s.channels, s.in_plane);
    const Plane<index_t> out = plane_at<channels_last>(e, s.channels, s.out_plane);
    grad_input[i] = grad_output[out.at(static_cast<index_t>(target))];
  }
}

}  // namespace cnnops
