// Depthwise convolution on the CPU: each output channel co reads only input channel
// co / multiplier, so a direct loop over kernel taps beats a GEMM with a reduction of length K.
// Every kernel walks one tap at a time over the output rows where that tap lands inside the
// input (valid_output_range), so the innermost loop over ow has no bounds test and vectorizes.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/conv_cpu.h"

namespace cnnops {
namespace cpu {
namespace {

// Calls fn(out_row_offset, in_row_offset, ow_begin, ow_end, iw_of_ow_begin) for every output
// row of a plane where kernel tap r lands inside the input.
template <typename Fn>
void for_each_tap_row(const ConvGeometry& g, int64_t r, Fn&& fn) {
  const int64_t kw = r % g.kernel[2], kh = r / g.kernel[2] % g.kernel[1], kd = r / g.kernel[2] / g.kernel[1];
  int64_t d_lo, d_hi, h_lo, h_hi, w_lo, w_hi;
  valid_output_range(g.in[0], g.out[0], kd, g.stride[0], g.pad[0], g.dilation[0], &d_lo, &d_hi);
  valid_output_range(g.in[1], g.out[1], kh, g.stride[1], g.pad[1], g.dilation[1], &h_lo, &h_hi);
  valid_output_range(g.in[2], g.out[2], kw, g.stride[2], g.pad[2], g.dilation[2], &w_lo, &w_hi);
  if (w_lo >= w_hi) return;
  const int64_t iw0 = conv_input_index(w_lo, kw, g.stride[2], g.pad[2], g.dilation[2]);
  for (int64_t od = d_lo; od < d_hi; ++od) {
    const int64_t id = conv_input_index(od, kd, g.stride[0], g.pad[0], g.dilation[0]);
    for (int64_t oh = h_lo; oh < h_hi; ++oh) {
      const int64_t ih = conv_input_index(oh, kh, g.stride[1], g.pad[1], g.dilation[1]);
      fn((od * g.out[1] + oh) * g.out[2], (id * g.in[1] + ih) * g.in[2], w_lo, w_hi, iw0);
    }
  }
}

}  // namespace

// y[co] = b[co] + sum over taps of w[co, tap] * shifted x[co / multiplier]
template <typename T>
void conv_depthwise_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.kernel_volume();
  const int64_t in_plane = g.in_plane(), out_plane = g.out_plane(), sw = g.stride[2];
  at::parallel_for(0, g.batch * g.out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t co = plane % g.out_channels, n = plane / g.out_channels;
      const T* x_plane = x + (n * g.in_channels + co / multiplier) * in_plane;
      T* y_plane = y + plane * out_plane;
      std::fill(y_plane, y_plane + out_plane, bias ? bias[co] : T(0));
      for (int64_t r = 0; r < taps; ++r) {
        const T weight = w[co * taps + r];
        for_each_tap_row(g, r, [&](int64_t out_row, int64_t in_row, int64_t ow0, int64_t ow1, int64_t iw0) {
          T* out = y_plane + out_row;
          const T* in = x_plane + in_row + iw0 - ow0 * sw;
          if (sw == 1) {
            for (int64_t ow = ow0; ow < ow1; ++ow) out[ow] += weight * in[ow];
          } else {
            for (int64_t ow = ow0; ow < ow1; ++ow) out[ow] += weight * in[ow * sw];
          }
        });
      }
    }
  });
}

// dx[ci] = sum over its output channels co and taps of w[co, tap] * dy[co] shifted back
// (the gradient of each read in the forward, added where it was read).
template <typename T>
void conv_depthwise_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.kernel_volume();
  const int64_t in_plane = g.in_plane(), out_plane = g.out_plane(), sw = g.stride[2];
  at::parallel_for(0, g.batch * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {  // a task owns its dx plane: no races
      const int64_t ci = plane % g.in_channels, n = plane / g.in_channels;
      T* dx_plane = dx + plane * in_plane;
      for (int64_t j = 0; j < multiplier; ++j) {
        const int64_t co = ci * multiplier + j;
        const T* dy_plane = dy + (n * g.out_channels + co) * out_plane;
        for (int64_t r = 0; r < taps; ++r) {
          const T weight = w[co * taps + r];
          for_each_tap_row(g, r, [&](int64_t out_row, int64_t in_row, int64_t ow0, int64_t ow1, int64_t iw0) {
            const T* grad = dy_plane + out_row;
            T* in = dx_plane + in_row + iw0 - ow0 * sw;
            if (sw == 1) {
              for (int64_t ow = ow0; ow < ow1; ++ow) in[ow] += weight * grad[ow];
            } else {
              for (int64_t ow = ow0; ow < ow1; ++ow) in[ow * sw] += weight * grad[ow];
            }
          });
        }
      }
    }
  });
}

// dw[co, tap] = sum over n and output positions of dy[n, co] * x[n, ci] at the tap's shift.
template <typename T>
void conv_depthwise_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.kernel_volume();
  const int64_t in_plane = g.in_plane(), out_plane = g.out_plane(), sw = g.stride[2];
  at::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
    // Products are summed lane-wise into a row buffer first, so the inner loop vectorizes
    // without reassociating a scalar sum; the row is reduced once per tap, in order.
    std::vector<T> row_sum(g.out[2]);
    for (int64_t co = begin; co < end; ++co) {
      for (int64_t r = 0; r < taps; ++r) {
        std::fill(row_sum.begin(), row_sum.end(), T(0));
        T* acc = row_sum.data();
        for (int64_t n = 0; n < g.batch; ++n) {
          const T* dy_plane = dy + (n * g.out_channels + co) * out_plane;
          const T* x_plane = x + (n * g.in_channels + co / multiplier) * in_plane;
          for_each_tap_row(g, r, [&](int64_t out_row, int64_t in_row, int64_t ow0, int64_t ow1, int64_t iw0) {
            const T* grad = dy_plane + out_row;
            const T* in = x_plane + in_row + iw0 - ow0 * sw;
            if (sw == 1) {
              for (int64_t ow = ow0; ow < ow1; ++ow) acc[ow] += grad[ow] * in[ow];
            } else {
              for (int64_t ow = ow0; ow < ow1; ++ow) acc[ow] += grad[ow] * in[ow * sw];
            }
          });
        }
        T sum = 0;
        for (T v : row_sum) sum += v;
        dw[co * taps + r] = sum;
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
