// Depthwise convolution on the CPU: output channel co reads only input channel
// ci = co / multiplier, so direct loops over the kernel taps beat a GEMM whose reduction would
// be just the K_d*K_h*K_w taps. Each kernel first copies the plane it reads into a zero-padded
// buffer, so the loops over output positions need no bounds tests and the innermost loop over
// ow (unit stride when stride_w is 1) vectorizes. MobileNet's, EfficientNet's and ConvNeXt's geometries run
// the SIMD kernels of conv_depthwise_direct.cpp instead; these loops serve the rest (other kernel
// sizes, dilations, multipliers > 1, 1-d and 3-d).
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/conv_cpu.h"
#include "cpu/conv_depthwise_direct.h"
#include "cpu/conv_im2col.h"

namespace cnnops {
namespace cpu {
namespace {

// Calls fn(first tap of the kernel row, output row offset, padded input row) for every output
// row and kernel row (kd, kh): output (od, oh) reads padded row (od*s + kd*d, oh*s + kh*d),
// tap kw from column kw*d on, every stride_w-th element.
template <typename T, typename Fn>
void for_each_row_and_kernel_row(const ConvGeometry& g, PaddedPlane<T>& padded, Fn&& fn) {
  for (int64_t od = 0; od < g.out[0]; ++od)
    for (int64_t oh = 0; oh < g.out[1]; ++oh)
      for (int64_t kd = 0; kd < g.kernel[0]; ++kd)
        for (int64_t kh = 0; kh < g.kernel[1]; ++kh)
          fn((kd * g.kernel[1] + kh) * g.kernel[2], (od * g.out[1] + oh) * g.out[2],
             padded.row(od * g.stride[0] + kd * g.dilation[0], oh * g.stride[1] + kh * g.dilation[1]));
}

// The row loops below take the kernel width as a template argument for the common widths, so
// the taps unroll inside a loop over ow that the compiler vectorizes; 0 means a runtime width.
template <int KW>
int64_t kernel_width(const ConvGeometry& g) {
  return KW > 0 ? KW : g.kernel[2];
}

// out[ow] += sum over kw of w[kw] * in[ow*s + kw*d]; with RELU (the last kernel row, whose sums
// are final) the row is written through the ReLU.
template <typename T, int KW, bool RELU = false>
void forward_row(const ConvGeometry& g, const T* w, const T* in, T* out) {
  const int64_t kw_end = kernel_width<KW>(g), sw = g.stride[2], dw = g.dilation[2];
  for (int64_t ow = 0; ow < g.out[2]; ++ow) {
    T sum = out[ow];
    for (int64_t kw = 0; kw < kw_end; ++kw) sum += w[kw] * in[ow * sw + kw * dw];
    out[ow] = RELU ? relu(sum) : sum;
  }
}

// acc[kw][ow] += dy[ow] * in[ow*s + kw*d]: per-lane partial sums of the weight gradient
template <typename T, int KW>
void weight_grad_row(const ConvGeometry& g, const T* dy, const T* in, T* acc) {
  const int64_t kw_end = kernel_width<KW>(g), sw = g.stride[2], dw = g.dilation[2], ow_end = g.out[2];
  for (int64_t kw = 0; kw < kw_end; ++kw)
    for (int64_t ow = 0; ow < ow_end; ++ow) acc[kw * ow_end + ow] += dy[ow] * in[ow * sw + kw * dw];
}

// The whole 2-d window in one pass for a 3x3 stride-1 kernel (MobileNet's), so each output is
// written once: y[oh, ow] = act(b + sum over kh, kw of w[kh, kw] * x_padded[oh + kh*d, ow + kw*d]).
template <typename T, bool RELU>
void forward_plane_3x3(const ConvGeometry& g, const T* w, T bias, PaddedPlane<T>& padded, T* y_plane) {
  const int64_t dh = g.dilation[1], dw = g.dilation[2], ow_end = g.out[2];
  for (int64_t oh = 0; oh < g.out[1]; ++oh) {
    const T* r0 = padded.row(0, oh);
    const T* r1 = padded.row(0, oh + dh);
    const T* r2 = padded.row(0, oh + 2 * dh);
    T* out = y_plane + oh * ow_end;
    for (int64_t ow = 0; ow < ow_end; ++ow) {
      const T sum = bias + w[0] * r0[ow] + w[1] * r0[ow + dw] + w[2] * r0[ow + 2 * dw] + w[3] * r1[ow] +
                    w[4] * r1[ow + dw] + w[5] * r1[ow + 2 * dw] + w[6] * r2[ow] + w[7] * r2[ow + dw] +
                    w[8] * r2[ow + 2 * dw];
      out[ow] = RELU ? relu(sum) : sum;
    }
  }
}

bool is_2d_3x3_stride1(const ConvGeometry& g) {
  return g.kernel[0] == 1 && g.kernel[1] == 3 && g.kernel[2] == 3 && g.in[0] == 1 && g.stride[1] == 1 &&
         g.stride[2] == 1;
}

// Runs body.template operator()<KW>() with KW the kernel width when it is a common one and the
// stride is 1, else with KW = 0.
template <typename Body>
void dispatch_kernel_width(const ConvGeometry& g, Body&& body) {
  if (g.stride[2] == 1 && g.kernel[2] == 3) return body(std::integral_constant<int, 3>());
  if (g.stride[2] == 1 && g.kernel[2] == 5) return body(std::integral_constant<int, 5>());
  if (g.stride[2] == 1 && g.kernel[2] == 7) return body(std::integral_constant<int, 7>());
  body(std::integral_constant<int, 0>());
}

// y[co] = act(b[co] + sum over taps of w[co, tap] * x[co / multiplier] at the tap's shift)
template <typename T>
void generic_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.kernel_volume();
  const int64_t last_kernel_row = taps - g.kernel[2];  // first tap of the last (kd, kh) row
  const bool relu_out = activation == Activation::Relu;
  dispatch_kernel_width(g, [&](auto kw_constant) {
    constexpr int KW = decltype(kw_constant)::value;
    parallel_for(0, g.batch * g.out_channels, 1, [&](int64_t begin, int64_t end) {
      PaddedPlane<T> padded(g);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t co = plane % g.out_channels, n = plane / g.out_channels;
        padded.load(g, x + (n * g.in_channels + co / multiplier) * g.in_plane());
        T* y_plane = y + plane * g.out_plane();
        const T b = bias ? bias[co] : T(0);
        if (is_2d_3x3_stride1(g)) {
          if (relu_out)
            forward_plane_3x3<T, true>(g, w + co * taps, b, padded, y_plane);
          else
            forward_plane_3x3<T, false>(g, w + co * taps, b, padded, y_plane);
          continue;
        }
        std::fill(y_plane, y_plane + g.out_plane(), b);
        // Each output row takes its kernel rows one after the other: the last one writes the
        // final sums, through the activation.
        for_each_row_and_kernel_row(g, padded, [&](int64_t tap, int64_t out_row, const T* in) {
          if (relu_out && tap == last_kernel_row)
            forward_row<T, KW, true>(g, w + co * taps + tap, in, y_plane + out_row);
          else
            forward_row<T, KW>(g, w + co * taps + tap, in, y_plane + out_row);
        });
      }
    });
  });
}

// dx[ci] = sum over ci's output channels co and taps of w[co, tap] * dy[co], added back where the
// forward read it (the backprop of each read), into a zeroed dx.
template <typename T>
void generic_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.kernel_volume();
  const int64_t ow_end = g.out[2], sw = g.stride[2], dw = g.dilation[2];
  parallel_for(0, g.batch * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    PaddedPlane<T> padded(g);                            // accumulates dx with its border, which is then dropped
    for (int64_t plane = begin; plane < end; ++plane) {  // a task owns its dx plane: no races
      const int64_t ci = plane % g.in_channels, n = plane / g.in_channels;
      std::fill(padded.data.begin(), padded.data.end(), T(0));
      for (int64_t co = ci * multiplier; co < (ci + 1) * multiplier; ++co) {
        const T* dy_plane = dy + (n * g.out_channels + co) * g.out_plane();
        for_each_row_and_kernel_row(g, padded, [&](int64_t tap, int64_t out_row, T* in) {
          const T* grad = dy_plane + out_row;
          for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
            const T weight = w[co * taps + tap + kw];
            T* in_kw = in + kw * dw;
            for (int64_t ow = 0; ow < ow_end; ++ow) in_kw[ow * sw] += weight * grad[ow];
          }
        });
      }
      padded.store(g, dx + plane * g.in_plane());
    }
  });
}

// dw[co, tap] = sum over n and output positions of dy[n, co] * x[n, ci] at the tap's shift.
template <typename T>
void generic_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.kernel_volume();
  const int64_t ow_end = g.out[2];
  dispatch_kernel_width(g, [&](auto kw_constant) {
    constexpr int KW = decltype(kw_constant)::value;
    parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
      PaddedPlane<T> padded(g);
      // Products are summed lane-wise into one row per tap, so the inner loop vectorizes without
      // reassociating a scalar sum; each row is reduced once at the end, in a fixed order.
      std::vector<T> row_sums(taps * ow_end);
      for (int64_t co = begin; co < end; ++co) {
        std::fill(row_sums.begin(), row_sums.end(), T(0));
        for (int64_t n = 0; n < g.batch; ++n) {
          padded.load(g, x + (n * g.in_channels + co / multiplier) * g.in_plane());
          const T* dy_plane = dy + (n * g.out_channels + co) * g.out_plane();
          for_each_row_and_kernel_row(g, padded, [&](int64_t tap, int64_t out_row, const T* in) {
            weight_grad_row<T, KW>(g, dy_plane + out_row, in, row_sums.data() + tap * ow_end);
          });
        }
        for (int64_t tap = 0; tap < taps; ++tap) {
          T sum = 0;
          for (int64_t ow = 0; ow < ow_end; ++ow) sum += row_sums[tap * ow_end + ow];
          dw[co * taps + tap] = sum;
        }
      }
    });
  });
}

}  // namespace

bool depthwise_nhwc_supported(const ConvGeometry& g, bool is_double) {
  return depthwise_direct_supported(g, true, is_double ? sizeof(double) : sizeof(float));
}

template <typename T>
void conv_depthwise_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation,
                            bool nhwc) {
  if (depthwise_direct_supported(g, nhwc, sizeof(T)))
    return depthwise_direct_forward(g, x, w, bias, y, activation, nhwc);
  TORCH_INTERNAL_ASSERT(!nhwc, "depthwise convolution: no channels-last kernel for this geometry");
  generic_forward(g, x, w, bias, y, activation);
}

template <typename T>
void conv_depthwise_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx, bool nhwc) {
  if (depthwise_direct_supported(g, nhwc, sizeof(T))) return depthwise_direct_backward_input(g, dy, w, dx, nhwc);
  TORCH_INTERNAL_ASSERT(!nhwc, "depthwise convolution: no channels-last kernel for this geometry");
  // For stride 1 and one output per input channel, dX = dY correlated with the rotated kernel,
  // zero padded by d(k-1) - p (formulas.md §Conv backward): a depthwise forward.
  ConvGeometry t = g;
  bool as_forward = g.out_channels == g.in_channels;
  for (int i = 0; i < 3; ++i) {
    t.in[i] = g.out[i], t.out[i] = g.in[i];
    t.pad[i] = g.dilation[i] * (g.kernel[i] - 1) - g.pad[i];
    as_forward = as_forward && g.stride[i] == 1 && t.pad[i] >= 0;
  }
  if (as_forward) {
    const int64_t taps = g.kernel_volume();
    std::vector<T> rotated(g.out_channels * taps);
    for (int64_t c = 0; c < g.out_channels; ++c)
      for (int64_t r = 0; r < taps; ++r) rotated[c * taps + taps - 1 - r] = w[c * taps + r];
    return generic_forward(t, dy, rotated.data(), static_cast<const T*>(nullptr), dx, Activation::None);
  }
  std::fill(dx, dx + g.batch * g.in_channels * g.in_plane(), T(0));
  generic_backward_input(g, dy, w, dx);
}

template <typename T>
bool conv_depthwise_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw, T* db, bool nhwc) {
  if (depthwise_direct_supported(g, nhwc, sizeof(T))) {
    depthwise_direct_backward_weight(g, dy, x, dw, db, nhwc);
    return db != nullptr;
  }
  TORCH_INTERNAL_ASSERT(!nhwc, "depthwise convolution: no channels-last kernel for this geometry");
  generic_backward_weight(g, dy, x, dw);
  return false;
}

#define CNNOPS_INSTANTIATE_DEPTHWISE(T)                                                                             \
  template void conv_depthwise_forward<T>(const ConvGeometry&, const T*, const T*, const T*, T*, Activation, bool); \
  template void conv_depthwise_backward_input<T>(const ConvGeometry&, const T*, const T*, T*, bool);                \
  template bool conv_depthwise_backward_weight<T>(const ConvGeometry&, const T*, const T*, T*, T*, bool);
CNNOPS_INSTANTIATE_DEPTHWISE(float)
CNNOPS_INSTANTIATE_DEPTHWISE(double)

}  // namespace cpu
}  // namespace cnnops
