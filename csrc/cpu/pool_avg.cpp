// Average pooling and adaptive average pooling on the CPU, forward and backward, NCHW and NHWC.
//
// formulas.md §Avg pool: y = (1/n) * sum over the window, so the backward spreads dl/dy / n evenly over the
// window (dl/dx_i = sum over the windows containing x_i of dl/dy / n). Sums run in float for
// half and bfloat16 (double for double). The divisor n follows torch: the window's size in the
// padded input with count_include_pad, the taps inside the input without it, or the override.
#include <ATen/Dispatch.h>

#include <optional>
#include <type_traits>

#include "common/checked_math.h"

#include "cpu/pool_cpu.h"

namespace cnnops {
namespace cpu {
namespace {

// The backward's counterpart: row[o*S + off] += delta[o].
template <int kStride, typename A>
CNNOPS_ALWAYS_INLINE void spread_row(A* __restrict row, int64_t stride, int64_t lo, int64_t hi, int64_t off,
                                     const A* __restrict delta) {
  const int64_t s = kStride > 0 ? kStride : stride;
  for (int64_t o = lo; o < hi; ++o) row[o * s + off] += delta[o];
}

// Sum of n contiguous values with 64 independent partial sums: the compiler vectorizes it
// (a single running sum would not be, since float addition is not associative).
template <typename T, typename A>
CNNOPS_ALWAYS_INLINE A sum_contiguous(const T* __restrict p, int64_t n) {
  constexpr int kLanes = 64;
  A part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += A(p[i + l]);
  A sum = 0;
  for (; i < n; ++i) sum += A(p[i]);
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

struct AvgParams {
  bool count_include_pad;
  int64_t divisor_override;
};

// The divisor of output (od, oh, ow), or 0 when its window holds no input element (torch
// writes 0 there).
CNNOPS_ALWAYS_INLINE int64_t avg_divisor(const AvgWindow& d, const AvgWindow& h, const AvgWindow& w,
                                         const AvgParams& p) {
  if (d.end <= d.start || h.end <= h.start || w.end <= w.start) return 0;
  return avg_pool_divisor(d, h, w, p.count_include_pad, p.divisor_override);
}

CNNOPS_ALWAYS_INLINE AvgWindow avg_window(const PoolGeometry& g, int dim, int64_t o) {
  return avg_pool_window(o, g.in[dim], g.kernel[dim], g.stride[dim], g.pad[dim]);
}

// The windows of output o along dim i and their divisors, for the NHWC kernels that serve both
// pools (the NCHW ones differ: fixed windows all have one size, which their row loops use).
// Adaptive windows [floor(o*I/O), ceil((o+1)*I/O)) are never empty and divide by their size.
struct FixedWindows {
  const PoolGeometry& g;
  AvgParams p;
  CNNOPS_ALWAYS_INLINE AvgWindow operator()(int i, int64_t o) const { return avg_window(g, i, o); }
  CNNOPS_ALWAYS_INLINE int64_t divisor(const AvgWindow& d, const AvgWindow& h, const AvgWindow& w) const {
    return avg_divisor(d, h, w, p);
  }
};
struct AdaptiveWindows {
  const PoolGeometry& g;
  CNNOPS_ALWAYS_INLINE AvgWindow operator()(int i, int64_t o) const {
    const int64_t start = adaptive_start(o, g.in[i], g.out[i]), end = adaptive_end(o, g.in[i], g.out[i]);
    return {start, end, end - start};
  }
  CNNOPS_ALWAYS_INLINE int64_t divisor(const AvgWindow& d, const AvgWindow& h, const AvgWindow& w) const {
    return (d.end - d.start) * (h.end - h.start) * (w.end - w.start);
  }
};

// Outputs along W whose tap kw (at iw = ow*SW + kw - PW) lies inside the row: [lo, hi).
CNNOPS_ALWAYS_INLINE OutputRange avg_tap_outputs(const PoolGeometry& g, int64_t kw) {
  const int64_t off = kw - g.pad[2], s = g.stride[2];
  return {max64(ceil_div(-off, s), 0), min64(floor_div(g.in[2] - 1 - off, s) + 1, g.out[2])};
}

// sum[o] += every tap k of one input row, row.taps(k)[o] (0 outside the input), for the
// `count` (a multiple of kRowBlock) outputs of a row; each block's sums stay in registers.
template <typename A>
CNNOPS_ALWAYS_INLINE void sum_taps_row(const PhasedRow<A>& row, int64_t kernel, int64_t count, A* __restrict sum) {
  for (int64_t o0 = 0; o0 < count; o0 += kRowBlock) {
    A acc[kRowBlock];
    for (int64_t j = 0; j < kRowBlock; ++j) acc[j] = sum[o0 + j];
    for (int64_t k = 0; k < kernel; ++k) {
      const A* __restrict taps = row.taps(k) + o0;
      for (int64_t j = 0; j < kRowBlock; ++j) acc[j] += taps[j];
    }
    for (int64_t j = 0; j < kRowBlock; ++j) sum[o0 + j] = acc[j];
  }
}

// The buffers of the kernels below, allocated by their callers (pool_cpu.h).
template <typename T>
struct AvgScratch {
  using A = pool_acc_t<T>;
  std::optional<PhasedRow<A>> row;  // NCHW forward: one input row, zero padded
  std::vector<A> values;            // per-output sums or per-channel deltas
  std::vector<A> buffer;            // with_accumulator's, reserved to its largest use
  AvgScratch(int64_t values_size, int64_t buffer_size) : values(values_size) {
    if constexpr (!std::is_same_v<T, A>) buffer.reserve(buffer_size);
  }
};

// Forward NCHW: output rows [begin, end) of the flat (plane, od, oh) range; taps summed in
// (id, ih, kw) order per output (as torch), the outputs along W in vectors. Each input row is
// first loaded into a zero-padded PhasedRow (pool_cpu.h), so the tap loops need no bounds.
template <typename T>
CNNOPS_ALWAYS_INLINE void avg_nchw_rows(const PoolGeometry& g, AvgScratch<T>& s, AvgParams p, const T* x, T* y,
                                        int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2], H = g.in[1], W = g.in[2];
  const int64_t KW = g.kernel[2];
  const int64_t padded_ow = ceil_div(OW, kRowBlock) * kRowBlock;
  PhasedRow<A>& row = *s.row;
  std::vector<A>& sum = s.values;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t oh = r % OH, od = (r / OH) % OD, plane = r / (OH * OD);
    const AvgWindow wd = avg_window(g, 0, od), wh = avg_window(g, 1, oh);
    const T* xp = x + plane * g.in_plane();
    std::fill(sum.begin(), sum.end(), A(0));
    for (int64_t id = wd.start; id < wd.end; ++id)
      for (int64_t ih = wh.start; ih < wh.end; ++ih) {
        row.load(xp + (id * H + ih) * W);
        sum_taps_row(row, KW, padded_ow, sum.data());
      }
    T* yr = y + r * OW;
    for (int64_t ow = 0; ow < OW; ++ow) {
      const int64_t divisor = avg_divisor(wd, wh, avg_window(g, 2, ow), p);
      yr[ow] = divisor == 0 ? T(0) : T(sum[ow] / A(divisor));
    }
  }
}

// The direct NCHW loop, one output at a time, for strides too large for phased rows.
template <typename T>
CNNOPS_ALWAYS_INLINE void avg_nchw_direct(const PoolGeometry& g, AvgParams p, const T* x, T* y, int64_t begin,
                                          int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2], H = g.in[1], W = g.in[2];
  for (int64_t r = begin; r < end; ++r) {
    const int64_t oh = r % OH, od = (r / OH) % OD, plane = r / (OH * OD);
    const AvgWindow wd = avg_window(g, 0, od), wh = avg_window(g, 1, oh);
    const T* xp = x + plane * g.in_plane();
    for (int64_t ow = 0; ow < OW; ++ow) {
      const AvgWindow ww = avg_window(g, 2, ow);
      A sum = 0;
      for (int64_t id = wd.start; id < wd.end; ++id)
        for (int64_t ih = wh.start; ih < wh.end; ++ih)
          for (int64_t iw = ww.start; iw < ww.end; ++iw) sum += A(xp[(id * H + ih) * W + iw]);
      const int64_t divisor = avg_divisor(wd, wh, ww, p);
      y[r * OW + ow] = divisor == 0 ? T(0) : T(sum / A(divisor));
    }
  }
}

// Forward NHWC: output positions [begin, end) of the flat (n, od, oh, ow) range. Channels go in
// blocks of kChannelBlock whose running sums stay in registers across the window's taps
// (64 floats: four AVX-512 vectors per tap address, which keeps the loads streaming).
constexpr int64_t kChannelBlock = 64;

template <int64_t kWidth, typename T, typename A>
CNNOPS_ALWAYS_INLINE void add_channels(const T* __restrict src, int64_t width, A* __restrict acc) {
  const int64_t w = kWidth > 0 ? kWidth : width;  // a constant width unrolls into registers
  for (int64_t c = 0; c < w; ++c) acc[c] += A(src[c]);
}

template <typename T, typename Windows>
CNNOPS_ALWAYS_INLINE void avg_nhwc_positions(Windows window, const PoolGeometry& g, const T* x, T* y, int64_t begin,
                                             int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t C = g.channels, H = g.in[1], W = g.in[2];
  PositionCursor pos(g, begin);
  for (int64_t q = begin; q < end; ++q, pos.next()) {
    const AvgWindow wd = window(0, pos.od), wh = window(1, pos.oh), ww = window(2, pos.ow);
    const T* xn = x + pos.n * g.in_plane() * C;
    const int64_t divisor = window.divisor(wd, wh, ww);
    T* __restrict yq = y + q * C;
    if (divisor == 0) {
      std::fill_n(yq, C, T(0));
      continue;
    }
    const A d = A(divisor);
    for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
      const int64_t width = std::min(kChannelBlock, C - c0);
      A acc[kChannelBlock] = {};
      for (int64_t id = wd.start; id < wd.end; ++id)
        for (int64_t ih = wh.start; ih < wh.end; ++ih)
          for (int64_t iw = ww.start; iw < ww.end; ++iw) {
            const T* src = xn + ((id * H + ih) * W + iw) * C + c0;
            if (width == kChannelBlock)
              add_channels<kChannelBlock>(src, width, acc);
            else
              add_channels<0>(src, width, acc);
          }
      for (int64_t c = 0; c < width; ++c) yq[c0 + c] = T(acc[c] / d);
    }
  }
}

// Backward NCHW: planes [begin, end), each spread row by row into its own accumulator.
template <typename T>
CNNOPS_ALWAYS_INLINE void avg_backward_nchw_planes(const PoolGeometry& g, AvgScratch<T>& s, AvgParams p, const T* dy,
                                                   T* dx, int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2], H = g.in[1], W = g.in[2];
  const int64_t SW = g.stride[2];
  std::vector<A>& buffer = s.buffer;
  std::vector<A>& delta = s.values;  // OW
  for (int64_t plane = begin; plane < end; ++plane) {
    with_accumulator(dx + plane * g.in_plane(), 1, g.in_plane(), 0, buffer, [&](A* acc, int64_t) CNNOPS_SIMD_BODY {
      for (int64_t od = 0; od < OD; ++od)
        for (int64_t oh = 0; oh < OH; ++oh) {
          const AvgWindow wd = avg_window(g, 0, od), wh = avg_window(g, 1, oh);
          const T* dyr = dy + ((plane * OD + od) * OH + oh) * OW;
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t divisor = avg_divisor(wd, wh, avg_window(g, 2, ow), p);
            delta[ow] = divisor == 0 ? A(0) : A(dyr[ow]) / A(divisor);
          }
          for (int64_t id = wd.start; id < wd.end; ++id)
            for (int64_t ih = wh.start; ih < wh.end; ++ih) {
              A* row = acc + (id * H + ih) * W;
              for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
                const OutputRange o = avg_tap_outputs(g, kw);
                const int64_t off = kw - g.pad[2];
                if (SW == 1)
                  spread_row<1>(row, SW, o.lo, o.hi, off, delta.data());
                else if (SW == 2)
                  spread_row<2>(row, SW, o.lo, o.hi, off, delta.data());
                else
                  spread_row<0>(row, SW, o.lo, o.hi, off, delta.data());
              }
            }
        }
    });
  }
}

// Backward NHWC: tasks [begin, end) of the flat (n, channel block) range.
template <typename T, typename Windows>
CNNOPS_ALWAYS_INLINE void avg_backward_nhwc_blocks(Windows window, const PoolGeometry& g, AvgScratch<T>& s,
                                                   ChannelBlocks cb, const T* dy, T* dx, int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t C = g.channels, H = g.in[1], W = g.in[2];
  std::vector<A>& buffer = s.buffer;
  std::vector<A>& delta = s.values;  // cb.size
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / cb.count, c0 = (task % cb.count) * cb.size;
    const int64_t cw = std::min(cb.size, C - c0);
    with_accumulator(dx + n * g.in_plane() * C + c0, g.in_plane(), cw, C, buffer,
                     [&](A* acc, int64_t stride) CNNOPS_SIMD_BODY {
                       PositionCursor pos(g, 0);
                       for (int64_t o = 0; o < g.out_plane(); ++o, pos.next()) {
                         const AvgWindow wd = window(0, pos.od), wh = window(1, pos.oh), ww = window(2, pos.ow);
                         const int64_t divisor = window.divisor(wd, wh, ww);
                         if (divisor == 0) continue;
                         const T* __restrict dyo = dy + (n * g.out_plane() + o) * C + c0;
                         A* __restrict d = delta.data();
                         for (int64_t c = 0; c < cw; ++c) d[c] = A(dyo[c]) / A(divisor);
                         for (int64_t id = wd.start; id < wd.end; ++id)
                           for (int64_t ih = wh.start; ih < wh.end; ++ih)
                             for (int64_t iw = ww.start; iw < ww.end; ++iw) {
                               A* __restrict a = acc + ((id * H + ih) * W + iw) * stride;
                               for (int64_t c = 0; c < cw; ++c) a[c] += d[c];
                             }
                       }
                     });
  }
}

// Adaptive average, forward NCHW: rows [begin, end) of (plane, od, oh). A window spanning
// whole rows is one contiguous run per depth slice (the global pool: the whole plane).
template <typename T>
CNNOPS_ALWAYS_INLINE void adaptive_avg_nchw_rows(const PoolGeometry& g, const T* x, T* y, int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2], D = g.in[0], H = g.in[1], W = g.in[2];
  for (int64_t r = begin; r < end; ++r) {
    const int64_t oh = r % OH, od = (r / OH) % OD, plane = r / (OH * OD);
    const int64_t d0 = adaptive_start(od, D, OD), d1 = adaptive_end(od, D, OD);
    const int64_t h0 = adaptive_start(oh, H, OH), h1 = adaptive_end(oh, H, OH);
    const T* xp = x + plane * g.in_plane();
    for (int64_t ow = 0; ow < OW; ++ow) {
      const int64_t w0 = adaptive_start(ow, W, OW), w1 = adaptive_end(ow, W, OW);
      A sum = 0;
      for (int64_t id = d0; id < d1; ++id) {
        if (w0 == 0 && w1 == W) {
          sum += sum_contiguous<T, A>(xp + (id * H + h0) * W, (h1 - h0) * W);
          continue;
        }
        for (int64_t ih = h0; ih < h1; ++ih) sum += sum_contiguous<T, A>(xp + (id * H + ih) * W + w0, w1 - w0);
      }
      y[r * OW + ow] = T(sum / A((d1 - d0) * (h1 - h0) * (w1 - w0)));
    }
  }
}

template <typename T>
CNNOPS_ALWAYS_INLINE void adaptive_avg_backward_nchw_planes(const PoolGeometry& g, AvgScratch<T>& s, const T* dy, T* dx,
                                                            int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2], D = g.in[0], H = g.in[1], W = g.in[2];
  std::vector<A>& buffer = s.buffer;
  for (int64_t plane = begin; plane < end; ++plane) {
    with_accumulator(dx + plane * g.in_plane(), 1, g.in_plane(), 0, buffer, [&](A* acc, int64_t) CNNOPS_SIMD_BODY {
      for (int64_t od = 0; od < OD; ++od)
        for (int64_t oh = 0; oh < OH; ++oh)
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t d0 = adaptive_start(od, D, OD), d1 = adaptive_end(od, D, OD);
            const int64_t h0 = adaptive_start(oh, H, OH), h1 = adaptive_end(oh, H, OH);
            const int64_t w0 = adaptive_start(ow, W, OW), w1 = adaptive_end(ow, W, OW);
            const A delta = A(dy[((plane * OD + od) * OH + oh) * OW + ow]) / A((d1 - d0) * (h1 - h0) * (w1 - w0));
            for (int64_t id = d0; id < d1; ++id)
              for (int64_t ih = h0; ih < h1; ++ih) {
                A* __restrict row = acc + (id * H + ih) * W;
                for (int64_t iw = w0; iw < w1; ++iw) row[iw] += delta;
              }
          }
    });
  }
}

// Taps one window reads, for grain sizes.
int64_t avg_window_taps(const PoolGeometry& g) {
  int64_t window = 1;
  for (int i = 0; i < 3; ++i) window = saturating_mul(window, std::min(g.kernel[i], g.in[i] + 2 * g.pad[i]));
  return window;
}

#define CNNOPS_DISPATCH_POOL_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace

void avg_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output, bool channels_last,
                             bool count_include_pad, int64_t divisor_override) {
  const AvgParams p{count_include_pad, divisor_override};
  const int64_t window = avg_window_taps(g);
  CNNOPS_DISPATCH_POOL_TYPES(input.scalar_type(), "avg_pool_forward_cpu", [&] {
    using A = pool_acc_t<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      at::parallel_for(0, g.batch * g.out_plane(), pool_grain(saturating_mul(window, g.channels)),
                       [&](int64_t b, int64_t e) {
                         CNNOPS_SIMD_CALL(avg_nhwc_positions<scalar_t>(FixedWindows{g, p}, g, x, y, b, e));
                       });
    } else {
      const bool phased = use_phased_rows(g.out[2], g.in[2], g.kernel[2], g.stride[2], g.pad[2], 1);
      at::parallel_for(0, g.planes() * g.out[0] * g.out[1], pool_grain(saturating_mul(window, g.out[2])),
                       [&](int64_t b, int64_t e) {
                         if (phased) {
                           const int64_t KW = g.kernel[2], SW = g.stride[2], PW = g.pad[2], W = g.in[2];
                           const int64_t padded_ow = ceil_div(g.out[2], kRowBlock) * kRowBlock;
                           AvgScratch<scalar_t> s(padded_ow, 0);
                           s.row.emplace(SW, PW, W, std::max(padded_ow * SW + KW - 1, W + PW), KW, 1, A(0));
                           CNNOPS_SIMD_CALL(avg_nchw_rows<scalar_t>(g, s, p, x, y, b, e));
                         } else {
                           CNNOPS_SIMD_CALL(avg_nchw_direct<scalar_t>(g, p, x, y, b, e));
                         }
                       });
    }
  });
}

void avg_pool_backward_kernel(const PoolGeometry& g, const at::Tensor& grad_output, at::Tensor& grad_input,
                              bool channels_last, bool count_include_pad, int64_t divisor_override) {
  const AvgParams p{count_include_pad, divisor_override};
  const int64_t window = avg_window_taps(g);
  CNNOPS_DISPATCH_POOL_TYPES(grad_output.scalar_type(), "avg_pool_backward_cpu", [&] {
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      const ChannelBlocks cb(g.batch, g.channels);
      at::parallel_for(0, g.batch * cb.count, 1, [&](int64_t b, int64_t e) {
        AvgScratch<scalar_t> s(cb.size, g.in_plane() * cb.size);
        CNNOPS_SIMD_CALL(avg_backward_nhwc_blocks<scalar_t>(FixedWindows{g, p}, g, s, cb, dy, dx, b, e));
      });
    } else {
      at::parallel_for(0, g.planes(), pool_grain(g.in_plane() + saturating_mul(g.out_plane(), window)),
                       [&](int64_t b, int64_t e) {
                         AvgScratch<scalar_t> s(g.out[2], g.in_plane());
                         CNNOPS_SIMD_CALL(avg_backward_nchw_planes<scalar_t>(g, s, p, dy, dx, b, e));
                       });
    }
  });
}

void adaptive_avg_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output,
                                      bool channels_last) {
  const int64_t window = ceil_div(g.in_plane(), std::max<int64_t>(g.out_plane(), 1));
  CNNOPS_DISPATCH_POOL_TYPES(input.scalar_type(), "adaptive_avg_pool_forward_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      at::parallel_for(0, g.batch * g.out_plane(), pool_grain(window * g.channels), [&](int64_t b, int64_t e) {
        CNNOPS_SIMD_CALL(avg_nhwc_positions<scalar_t>(AdaptiveWindows{g}, g, x, y, b, e));
      });
    } else {
      at::parallel_for(0, g.planes() * g.out[0] * g.out[1], pool_grain(window * g.out[2]), [&](int64_t b, int64_t e) {
        CNNOPS_SIMD_CALL(adaptive_avg_nchw_rows<scalar_t>(g, x, y, b, e));
      });
    }
  });
}

void adaptive_avg_pool_backward_kernel(const PoolGeometry& g, const at::Tensor& grad_output, at::Tensor& grad_input,
                                       bool channels_last) {
  CNNOPS_DISPATCH_POOL_TYPES(grad_output.scalar_type(), "adaptive_avg_pool_backward_cpu", [&] {
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      const ChannelBlocks cb(g.batch, g.channels);
      at::parallel_for(0, g.batch * cb.count, 1, [&](int64_t b, int64_t e) {
        AvgScratch<scalar_t> s(cb.size, g.in_plane() * cb.size);
        CNNOPS_SIMD_CALL(avg_backward_nhwc_blocks<scalar_t>(AdaptiveWindows{g}, g, s, cb, dy, dx, b, e));
      });
    } else {
      at::parallel_for(0, g.planes(), pool_grain(2 * g.in_plane()), [&](int64_t b, int64_t e) {
        AvgScratch<scalar_t> s(0, g.in_plane());
        CNNOPS_SIMD_CALL(adaptive_avg_backward_nchw_planes<scalar_t>(g, s, dy, dx, b, e));
      });
    }
  });
}

}  // namespace cpu
}  // namespace cnnops
