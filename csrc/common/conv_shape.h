#pragma once
// Convolution geometry shared by the CPU and CUDA kernels. Every convolution is handled as a
// 3-d one: conv1d is (1, 1, W) and conv2d is (1, H, W) with unit leading dims.
#include <cstdint>

#include "macros.h"

namespace cnnops {

// Output sizes (formulas.md §Conv output size: O = (I + 2P - D(K-1) - 1) / S + 1)
// come from window_count (checked_math.h), computed once by make_conv_geometry.

struct ConvGeometry {
  int64_t batch, groups;
  int64_t in_channels, out_channels;  // totals over all groups
  int64_t in[3], out[3], kernel[3];   // (D, H, W)
  int64_t stride[3], pad[3], dilation[3];

  CNNOPS_HD int64_t in_channels_per_group() const { return in_channels / groups; }
  CNNOPS_HD int64_t out_channels_per_group() const { return out_channels / groups; }
  CNNOPS_HD int64_t in_plane() const { return in[0] * in[1] * in[2]; }
  CNNOPS_HD int64_t out_plane() const { return out[0] * out[1] * out[2]; }
  CNNOPS_HD int64_t kernel_volume() const { return kernel[0] * kernel[1] * kernel[2]; }
  // GEMM reduction length of one group: each output is an inner product over C_in/groups x K.
  CNNOPS_HD int64_t gemm_k() const { return in_channels_per_group() * kernel_volume(); }
  CNNOPS_HD bool is_depthwise() const { return groups > 1 && groups == in_channels; }
  CNNOPS_HD bool is_pointwise() const {  // 1x1x1, stride 1, no padding: im2col is the identity
    for (int i = 0; i < 3; ++i)
      if (kernel[i] != 1 || stride[i] != 1 || pad[i] != 0) return false;
    return true;
  }
};

// Row r of the im2col matrix names an input channel and a kernel tap: r = (c, kd, kh, kw).
struct KernelTap {
  int64_t channel, kd, kh, kw;
};
CNNOPS_HD KernelTap decompose_gemm_row(const ConvGeometry& g, int64_t r) {
  KernelTap t;
  t.kw = r % g.kernel[2];
  r /= g.kernel[2];
  t.kh = r % g.kernel[1];
  r /= g.kernel[1];
  t.kd = r % g.kernel[0];
  t.channel = r / g.kernel[0];
  return t;
}

// Input coordinate read by output position o through kernel tap k along one dim; it may fall
// in the zero padding (outside [0, in)).
CNNOPS_HD int64_t conv_input_index(int64_t o, int64_t k, int64_t stride, int64_t pad, int64_t dilation) {
  return o * stride - pad + k * dilation;
}

// Output positions [lo, hi) along one dim whose tap k lands inside the input: the loop bounds
// that let im2col and direct kernels run their interior without a bounds test per element.
CNNOPS_HD void valid_output_range(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad, int64_t dilation,
                                  int64_t* lo, int64_t* hi) {
  const int64_t offset = k * dilation - pad;  // input index = o * stride + offset
  // ceil(-offset / stride) without -offset + stride - 1, which overflows for huge strides
  int64_t first = offset >= 0 ? 0 : (-offset) / stride + ((-offset) % stride != 0);
  int64_t last = in - 1 - offset < 0 ? -1 : (in - 1 - offset) / stride;  // inclusive
  if (last > out - 1) last = out - 1;
  *lo = first < out ? first : out;
  *hi = last + 1 > *lo ? last + 1 : *lo;
}

}  // namespace cnnops
