#pragma once
// Kernels shared between the CPU convolution files.
#include "common/conv_shape.h"

namespace cnnops {
namespace cpu {

// Depthwise convolution (groups == C_in, C_out = C_in * multiplier): direct loops, no GEMM.
template <typename T>
void conv_depthwise_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y);
template <typename T>
void conv_depthwise_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx);
template <typename T>
void conv_depthwise_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw);

}  // namespace cpu
}  // namespace cnnops
