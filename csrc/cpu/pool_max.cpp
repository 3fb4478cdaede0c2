// Max pooling and adaptive max pooling forward on the CPU, NCHW and NHWC kernels.
//
// Slides: y = max over the window, and the argmax is remembered for backprop (the gradient
// flows only to the element that won). Ties keep the first tap in (d, h, w) order and a NaN
// always wins, later NaNs over earlier ones, exactly as torch's CPU loop
// `if (val > maxval || isnan(val))` starting from -inf and the window's first tap.
//
// Indices are tracked in an index type I: int32 while a plane has under 2^31 elements (half
// the bytes, and lanes as wide as float's, so the selects vectorize), int64 beyond.
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>

#include "cpu/pool_cpu.h"

namespace cnnops {
namespace cpu {
namespace {

// One tap of the running max: take v if it is larger or NaN.
template <typename A>
CNNOPS_POOL_INLINE bool max_takes(A v, A best) {
  return (v > best) | (v != v);
}

// NCHW: for outputs o in [lo, hi) of a row, the tap row[o*S + off] (S = kStride, or `stride`
// when kStride is 0), whose in-plane index is index0 + o*S.
template <int kStride, typename T, typename A, typename I>
CNNOPS_POOL_INLINE void max_update_row(const T* __restrict row, int64_t stride, int64_t lo,
                                       int64_t hi, int64_t off, int64_t index0,
                                       A* __restrict best, I* __restrict where) {
  const int64_t s = kStride > 0 ? kStride : stride;
  for (int64_t o = lo; o < hi; ++o) {
    const A v = A(row[o * s + off]);
    const bool take = max_takes(v, best[o]);
    best[o] = take ? v : best[o];
    where[o] = take ? I(index0 + o * s) : where[o];
  }
}

// NHWC: one tap (in-plane index `tap`) of every channel of one output position.
template <typename T, typename A, typename I>
CNNOPS_POOL_INLINE void max_update_channels(const T* __restrict src, int64_t channels, I tap,
                                            A* __restrict best, I* __restrict where) {
  for (int64_t c = 0; c < channels; ++c) {
    const A v = A(src[c]);
    const bool take = max_takes(v, best[c]);
    best[c] = take ? v : best[c];
    where[c] = take ? tap : where[c];
  }
}

template <typename T, typename A, typename I>
CNNOPS_POOL_INLINE void store_max(int64_t count, const A* best, const I* where, T* y,
                                  int64_t* indices) {
  for (int64_t i = 0; i < count; ++i) y[i] = T(best[i]);
  for (int64_t i = 0; i < count; ++i) indices[i] = int64_t(where[i]);
}

// Output rows [begin, end) of the flat (plane, od, oh) range. Per row, every tap of every window
// is visited in (id, ih, kw) order, with the outputs along W as the vectorized inner loop.
template <typename T, typename I>
CNNOPS_POOL_SIMD void max_pool_nchw_rows(const PoolGeometry& g, const T* x, T* y,
                                         int64_t* indices, int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t H = g.in[1], W = g.in[2];
  const int64_t KW = g.kernel[2], SW = g.stride[2], PW = g.pad[2], DW = g.dilation[2];
  std::vector<A> best(OW);
  std::vector<I> where(OW);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t oh = r % OH, od = (r / OH) % OD, plane = r / (OH * OD);
    const PoolWindow wd = max_pool_window(od, g.in[0], g.kernel[0], g.stride[0], g.pad[0], g.dilation[0]);
    const PoolWindow wh = max_pool_window(oh, H, g.kernel[1], g.stride[1], g.pad[1], g.dilation[1]);
    const T* xp = x + plane * g.in_plane();
    // Before any tap: -inf at the window's first tap (what an all -inf window returns).
    for (int64_t ow = 0; ow < OW; ++ow) {
      const PoolWindow ww = max_pool_window(ow, W, KW, SW, PW, DW);
      best[ow] = -std::numeric_limits<A>::infinity();
      where[ow] = I((wd.start * H + wh.start) * W + ww.start);
    }
    for (int64_t id = wd.start; id < wd.end; id += wd.step)
      for (int64_t ih = wh.start; ih < wh.end; ih += wh.step) {
        const int64_t base = (id * H + ih) * W;
        for (int64_t kw = 0; kw < KW; ++kw) {
          // outputs whose tap kw, at iw = ow*SW + off, lies inside the row
          const int64_t off = kw * DW - PW;
          const int64_t lo = max64(ceil_div(-off, SW), 0);
          const int64_t hi = min64(floor_div(W - 1 - off, SW) + 1, OW);
          if (lo >= hi) continue;
          if (SW == 1)
            max_update_row<1>(xp + base, SW, lo, hi, off, base + off, best.data(), where.data());
          else if (SW == 2)
            max_update_row<2>(xp + base, SW, lo, hi, off, base + off, best.data(), where.data());
          else
            max_update_row<0>(xp + base, SW, lo, hi, off, base + off, best.data(), where.data());
        }
      }
    store_max(OW, best.data(), where.data(), y + r * OW, indices + r * OW);
  }
}

// Output positions [begin, end) of the flat (n, od, oh, ow) range, all channels at once.
template <typename T, typename I>
CNNOPS_POOL_SIMD void max_pool_nhwc_positions(const PoolGeometry& g, const T* x, T* y,
                                              int64_t* indices, int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t C = g.channels, OH = g.out[1], OW = g.out[2], H = g.in[1], W = g.in[2];
  std::vector<A> best(C);
  std::vector<I> where(C);
  for (int64_t q = begin; q < end; ++q) {
    const int64_t ow = q % OW, oh = (q / OW) % OH, od = (q / (OW * OH)) % g.out[0];
    const int64_t n = q / g.out_plane();
    const PoolWindow wd = max_pool_window(od, g.in[0], g.kernel[0], g.stride[0], g.pad[0], g.dilation[0]);
    const PoolWindow wh = max_pool_window(oh, H, g.kernel[1], g.stride[1], g.pad[1], g.dilation[1]);
    const PoolWindow ww = max_pool_window(ow, W, g.kernel[2], g.stride[2], g.pad[2], g.dilation[2]);
    const T* xn = x + n * g.in_plane() * C;
    std::fill(best.begin(), best.end(), -std::numeric_limits<A>::infinity());
    std::fill(where.begin(), where.end(), I((wd.start * H + wh.start) * W + ww.start));
    for (int64_t id = wd.start; id < wd.end; id += wd.step)
      for (int64_t ih = wh.start; ih < wh.end; ih += wh.step)
        for (int64_t iw = ww.start; iw < ww.end; iw += ww.step) {
          const int64_t tap = (id * H + ih) * W + iw;
          max_update_channels(xn + tap * C, C, I(tap), best.data(), where.data());
        }
    store_max(C, best.data(), where.data(), y + q * C, indices + q * C);
  }
}

// Adaptive max, NCHW: output rows of the flat (plane, od, oh) range; window per output
// [floor(o*I/O), ceil((o+1)*I/O)) along each dim.
template <typename T, typename I>
CNNOPS_POOL_SIMD void adaptive_max_nchw_rows(const PoolGeometry& g, const T* x, T* y,
                                             int64_t* indices, int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2], D = g.in[0], H = g.in[1], W = g.in[2];
  for (int64_t r = begin; r < end; ++r) {
    const int64_t oh = r % OH, od = (r / OH) % OD, plane = r / (OH * OD);
    const int64_t d0 = adaptive_start(od, D, OD), d1 = adaptive_end(od, D, OD);
    const int64_t h0 = adaptive_start(oh, H, OH), h1 = adaptive_end(oh, H, OH);
    const T* xp = x + plane * g.in_plane();
    for (int64_t ow = 0; ow < OW; ++ow) {
      const int64_t w0 = adaptive_start(ow, W, OW), w1 = adaptive_end(ow, W, OW);
      A best = -std::numeric_limits<A>::infinity();
      int64_t where = (d0 * H + h0) * W + w0;
      for (int64_t id = d0; id < d1; ++id)
        for (int64_t ih = h0; ih < h1; ++ih)
          for (int64_t iw = w0; iw < w1; ++iw) {
            const int64_t tap = (id * H + ih) * W + iw;
            const A v = A(xp[tap]);
            if (max_takes(v, best)) {
              best = v;
              where = tap;
            }
          }
      y[r * OW + ow] = T(best);
      indices[r * OW + ow] = where;
    }
  }
}

template <typename T, typename I>
CNNOPS_POOL_SIMD void adaptive_max_nhwc_positions(const PoolGeometry& g, const T* x, T* y,
                                                  int64_t* indices, int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t C = g.channels, OH = g.out[1], OW = g.out[2], D = g.in[0], H = g.in[1], W = g.in[2];
  std::vector<A> best(C);
  std::vector<I> where(C);
  for (int64_t q = begin; q < end; ++q) {
    const int64_t ow = q % OW, oh = (q / OW) % OH, od = (q / (OW * OH)) % g.out[0];
    const int64_t n = q / g.out_plane();
    const int64_t d0 = adaptive_start(od, D, g.out[0]), d1 = adaptive_end(od, D, g.out[0]);
    const int64_t h0 = adaptive_start(oh, H, OH), h1 = adaptive_end(oh, H, OH);
    const int64_t w0 = adaptive_start(ow, W, OW), w1 = adaptive_end(ow, W, OW);
    const T* xn = x + n * g.in_plane() * C;
    std::fill(best.begin(), best.end(), -std::numeric_limits<A>::infinity());
    std::fill(where.begin(), where.end(), I((d0 * H + h0) * W + w0));
    for (int64_t id = d0; id < d1; ++id)
      for (int64_t ih = h0; ih < h1; ++ih)
        for (int64_t iw = w0; iw < w1; ++iw) {
          const int64_t tap = (id * H + ih) * W + iw;
          max_update_channels(xn + tap * C, C, I(tap), best.data(), where.data());
        }
    store_max(C, best.data(), where.data(), y + q * C, indices + q * C);
  }
}

// Runs rows(g, x, y, indices, begin, end) over `tasks` rows (NCHW) or positions (NHWC), with
// the index type the plane size allows.
template <template <typename, typename> class Kernel>
void run_max_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output,
                    at::Tensor& indices, int64_t tasks, int64_t work_per_task) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "max_pool_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    int64_t* ind = indices.mutable_data_ptr<int64_t>();
    const bool narrow = g.in_plane() <= std::numeric_limits<int32_t>::max();
    at::parallel_for(0, tasks, pool_grain(work_per_task), [&](int64_t begin, int64_t end) {
      if (narrow)
        Kernel<scalar_t, int32_t>::run(g, x, y, ind, begin, end);
      else
        Kernel<scalar_t, int64_t>::run(g, x, y, ind, begin, end);
    });
  });
}

#define CNNOPS_MAX_KERNEL(NAME, FN)                                                         \
  template <typename T, typename I>                                                         \
  struct NAME {                                                                             \
    static void run(const PoolGeometry& g, const T* x, T* y, int64_t* ind, int64_t b, int64_t e) { \
      FN<T, I>(g, x, y, ind, b, e);                                                         \
    }                                                                                       \
  };
CNNOPS_MAX_KERNEL(MaxNchw, max_pool_nchw_rows)
CNNOPS_MAX_KERNEL(MaxNhwc, max_pool_nhwc_positions)
CNNOPS_MAX_KERNEL(AdaptiveMaxNchw, adaptive_max_nchw_rows)
CNNOPS_MAX_KERNEL(AdaptiveMaxNhwc, adaptive_max_nhwc_positions)
#undef CNNOPS_MAX_KERNEL

}  // namespace

void max_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output,
                             at::Tensor& indices, bool channels_last) {
  const int64_t window = g.kernel[0] * g.kernel[1] * g.kernel[2];
  if (channels_last)
    run_max_kernel<MaxNhwc>(g, input, output, indices, g.batch * g.out_plane(), window * g.channels);
  else
    run_max_kernel<MaxNchw>(g, input, output, indices, g.planes() * g.out[0] * g.out[1], window * g.out[2]);
}

void adaptive_max_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input,
                                      at::Tensor& output, at::Tensor& indices, bool channels_last) {
  // a window holds about in/out elements per dim
  const int64_t window = pool_blocks(g.in_plane(), std::max<int64_t>(g.out_plane(), 1));
  if (channels_last)
    run_max_kernel<AdaptiveMaxNhwc>(g, input, output, indices, g.batch * g.out_plane(), window * g.channels);
  else
    run_max_kernel<AdaptiveMaxNchw>(g, input, output, indices, g.planes() * g.out[0] * g.out[1], window * g.out[2]);
}

}  // namespace cpu
}  // namespace cnnops
