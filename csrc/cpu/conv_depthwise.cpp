// Depthwise convolution on the CPU: output channel co reads only input channel
// ci = co / multiplier, so direct loops over the kernel taps beat a GEMM whose reduction would
// be just the K_d*K_h*K_w taps. Each kernel first copies the plane it reads into a zero-padded
// buffer, so the loops over output positions need no bounds tests and the innermost loop over
// ow (unit stride when stride_w is 1) vectorizes.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/conv_cpu.h"

namespace cnnops {
namespace cpu {
namespace {

// A zero-padded (D+2p, H+2p, W+2p) copy of one channel plane.
template <typename T>
struct PaddedPlane {
  int64_t hp, wp;
  std::vector<T> data;

  explicit PaddedPlane(const ConvGeometry& g)
      : hp(g.in[1] + 2 * g.pad[1]), wp(g.in[2] + 2 * g.pad[2]),
        data((g.in[0] + 2 * g.pad[0]) * hp * wp, T(0)) {}

  T* row(int64_t d, int64_t h) { return data.data() + (d * hp + h) * wp; }

  void load(const ConvGeometry& g, const T* plane) {  // borders stay zero
    for (int64_t d = 0; d < g.in[0]; ++d)
      for (int64_t h = 0; h < g.in[1]; ++h)
        std::memcpy(row(d + g.pad[0], h + g.pad[1]) + g.pad[2], plane + (d * g.in[1] + h) * g.in[2], g.in[2] * sizeof(T));
  }
  void store(const ConvGeometry& g, T* plane) {  // the interior back out
    for (int64_t d = 0; d < g.in[0]; ++d)
      for (int64_t h = 0; h < g.in[1]; ++h)
        std::memcpy(plane + (d * g.in[1] + h) * g.in[2], row(d + g.pad[0], h + g.pad[1]) + g.pad[2], g.in[2] * sizeof(T));
  }
};

// Calls fn(tap, output row offset, padded input row) for every output row and kernel tap:
// output (od, oh) with tap (kd, kh, kw) reads padded row (od*s + kd*d, oh*s + kh*d) from
// column kw*d on, every stride_w-th element.
template <typename T, typename Fn>
void for_each_row_and_tap(const ConvGeometry& g, PaddedPlane<T>& padded, Fn&& fn) {
  for (int64_t od = 0; od < g.out[0]; ++od)
    for (int64_t oh = 0; oh < g.out[1]; ++oh)
      for (int64_t kd = 0, tap = 0; kd < g.kernel[0]; ++kd)
        for (int64_t kh = 0; kh < g.kernel[1]; ++kh) {
          T* in_row = padded.row(od * g.stride[0] + kd * g.dilation[0], oh * g.stride[1] + kh * g.dilation[1]);
          for (int64_t kw = 0; kw < g.kernel[2]; ++kw, ++tap)
            fn(tap, (od * g.out[1] + oh) * g.out[2], in_row + kw * g.dilation[2]);
        }
}

}  // namespace

// y[co] = b[co] + sum over taps of w[co, tap] * x[co / multiplier] at the tap's shift
template <typename T>
void conv_depthwise_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.kernel_volume();
  const int64_t ow_end = g.out[2], sw = g.stride[2];
  at::parallel_for(0, g.batch * g.out_channels, 1, [&](int64_t begin, int64_t end) {
    PaddedPlane<T> padded(g);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t co = plane % g.out_channels, n = plane / g.out_channels;
      padded.load(g, x + (n * g.in_channels + co / multiplier) * g.in_plane());
      T* y_plane = y + plane * g.out_plane();
      std::fill(y_plane, y_plane + g.out_plane(), bias ? bias[co] : T(0));
      const T* w_co = w + co * taps;
      for_each_row_and_tap(g, padded, [&](int64_t tap, int64_t out_row, const T* in) {
        T* out = y_plane + out_row;
        const T weight = w_co[tap];
        if (sw == 1) {  // separate loop so the compiler sees unit stride and vectorizes
          for (int64_t ow = 0; ow < ow_end; ++ow) out[ow] += weight * in[ow];
        } else {
          for (int64_t ow = 0; ow < ow_end; ++ow) out[ow] += weight * in[ow * sw];
        }
      });
    }
  });
}

// dx[ci] = sum over ci's output channels co and taps of w[co, tap] * dy[co], added back where the
// forward read it (the backprop of each read).
template <typename T>
void conv_depthwise_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.kernel_volume();
  const int64_t ow_end = g.out[2], sw = g.stride[2];
  at::parallel_for(0, g.batch * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    PaddedPlane<T> padded(g);  // accumulates dx with its border, which is then dropped
    for (int64_t plane = begin; plane < end; ++plane) {  // a task owns its dx plane: no races
      const int64_t ci = plane % g.in_channels, n = plane / g.in_channels;
      std::fill(padded.data.begin(), padded.data.end(), T(0));
      for (int64_t co = ci * multiplier; co < (ci + 1) * multiplier; ++co) {
        const T* dy_plane = dy + (n * g.out_channels + co) * g.out_plane();
        const T* w_co = w + co * taps;
        for_each_row_and_tap(g, padded, [&](int64_t tap, int64_t out_row, T* in) {
          const T* grad = dy_plane + out_row;
          const T weight = w_co[tap];
          if (sw == 1) {
            for (int64_t ow = 0; ow < ow_end; ++ow) in[ow] += weight * grad[ow];
          } else {
            for (int64_t ow = 0; ow < ow_end; ++ow) in[ow * sw] += weight * grad[ow];
          }
        });
      }
      padded.store(g, dx + plane * g.in_plane());
    }
  });
}

// dw[co, tap] = sum over n and output positions of dy[n, co] * x[n, ci] at the tap's shift.
template <typename T>
void conv_depthwise_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.kernel_volume();
  const int64_t ow_end = g.out[2], sw = g.stride[2];
  at::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
    PaddedPlane<T> padded(g);
    // Products are summed lane-wise into one row per tap, so the inner loop vectorizes without
    // reassociating a scalar sum; each row is reduced once at the end, in a fixed order.
    std::vector<T> row_sums(taps * ow_end);
    for (int64_t co = begin; co < end; ++co) {
      std::fill(row_sums.begin(), row_sums.end(), T(0));
      for (int64_t n = 0; n < g.batch; ++n) {
        padded.load(g, x + (n * g.in_channels + co / multiplier) * g.in_plane());
        const T* dy_plane = dy + (n * g.out_channels + co) * g.out_plane();
        for_each_row_and_tap(g, padded, [&](int64_t tap, int64_t out_row, const T* in) {
          const T* grad = dy_plane + out_row;
          T* acc = row_sums.data() + tap * ow_end;
          if (sw == 1) {
            for (int64_t ow = 0; ow < ow_end; ++ow) acc[ow] += grad[ow] * in[ow];
          } else {
            for (int64_t ow = 0; ow < ow_end; ++ow) acc[ow] += grad[ow] * in[ow * sw];
          }
        });
      }
      for (int64_t tap = 0; tap < taps; ++tap) {
        T sum = 0;
        for (int64_t ow = 0; ow < ow_end; ++ow) sum += row_sums[tap * ow_end + ow];
        dw[co * taps + tap] = sum;
      }
    }
  });
}

#define CNNOPS_INSTANTIATE_DEPTHWISE(T)                                                          \
  template void conv_depthwise_forward<T>(const ConvGeometry&, const T*, const T*, const T*, T*); \
  template void conv_depthwise_backward_input<T>(const ConvGeometry&, const T*, const T*, T*);    \
  template void conv_depthwise_backward_weight<T>(const ConvGeometry&, const T*, const T*, T*);
CNNOPS_INSTANTIATE_DEPTHWISE(float)
CNNOPS_INSTANTIATE_DEPTHWISE(double)

}  // namespace cpu
}  // namespace cnnops
