#pragma once
// Strided convolutions with few input channels and kernels wider than the direct kernels take
// (AlexNet's 11x11 stride 4; the 7x7 stride-2 stem runs the direct first-layer kernels, which read
// the input with no zero taps: forward 1.15-1.4x faster) as stride-1 ones.
//
// With stride s, tap kh = s*a + p reads padded row s*(oh + a) + p: phase p of the input at row
// oh + a. So y = conv_s(x, w) = conv_1(X', W') with X'[(c, p, q), i, j] = x_pad[c, s*i + p, s*j + q]
// and W'[co, (c, p, q), a, b] = w[co, c, s*a + p, s*b + q] (zero past the kernel): C*s^2 channels,
// a ceil(K/s) kernel, no padding (formulas.md §Space to depth). The stride-1 convolution runs
// on the shifted-window grid, which reads the input in place, where the strided one packs an
// im2col matrix of K^2 rows per input channel; the zero taps cost (s*ceil(K/s)/K)^2 more
// multiply-adds (1.31x for 7x7, s = 2).
#include <cstdint>
#include <vector>

#include "common/conv_shape.h"

namespace cnnops {
namespace cpu {

// 2-d, dilation 1, equal strides s >= 2, not depthwise, at most 4 input channels a group, a kernel
// wider than 2s; not what the direct kernels take (use_grouped_direct: kernels up to 7).
bool use_space_to_depth(const ConvGeometry& g);

template <typename T>
struct SpaceToDepth {
  ConvGeometry g;       // the stride-1 problem: same batch, C_out and output size
  std::vector<T> x, w;  // X' (in x's layout) and W' ([C_out][C/groups*s*s][K'][K'])
};

// False (and nothing built) when x holds an inf or NaN: a zero tap of W' times inf is NaN where
// the strided convolution never reads that value. x and X' are channels-last when nhwc.
template <typename T>
bool space_to_depth(const ConvGeometry& g, const T* x, const T* w, bool nhwc, SpaceToDepth<T>& out);

// Convolutions run through space to depth since the process started (tests of the path choice).
int64_t space_to_depth_call_count();

}  // namespace cpu
}  // namespace cnnops
