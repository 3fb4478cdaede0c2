#pragma once
// Direct SIMD depthwise kernels (conv_depthwise_direct.cpp): 2-d, 3x3 and 5x5 at stride 1 and 2,
// 7x7 at stride 1, dilation 1, one output channel per input channel, float and double, NCHW and NHWC.
#include <cstddef>

#include "common/activation.h"
#include "common/conv_shape.h"

namespace cnnops {
namespace cpu {

// The geometries these kernels serve in NCHW. NHWC additionally needs at least one vector of
// channels (depthwise_direct_supported(g, true, ...)).
bool depthwise_direct_supported(const ConvGeometry& g, bool nhwc, std::size_t element_size);

// Each writes every value of its output.
template <typename T>
void depthwise_direct_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation,
                              bool nhwc);
template <typename T>
void depthwise_direct_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx, bool nhwc);
// db, when not null, gets the bias gradient from the same pass over dY.
template <typename T>
void depthwise_direct_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw, T* db, bool nhwc);

}  // namespace cpu
}  // namespace cnnops
