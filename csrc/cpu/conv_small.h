#pragma once
// Convolutions with one output position per sample whose window is the whole input (1x1 on 1x1
// maps: squeeze-excitation blocks): dot products read in place, no GEMM packing (conv_small.cpp).
#include "common/activation.h"
#include "common/conv_shape.h"

namespace cnnops {
namespace cpu {

// Whether conv_forward_window_dot serves this geometry (x and y channels-last when nhwc).
bool use_window_dot(const ConvGeometry& g, bool nhwc);

template <typename T>
void conv_forward_window_dot(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation);

}  // namespace cpu
}  // namespace cnnops
