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

// The gradients of the same geometries (use_window_dot), products of rows read in place: with
// N samples, a GEMM would pad N columns to a whole panel (31 of 32 lanes wasted at batch 1).
//   dX[n, g*K + j] = sum over co of dY[n, g*M + co] * W_g[co, j]    (w in ChannelTap order)
//   dW_g[co, j]    = sum over n of dY[n, g*M + co] * X[n, g*K + j]
template <typename T>
void conv_backward_input_window(const ConvGeometry& g, const T* dy, const T* w, T* dx);
template <typename T>
void conv_backward_weight_window(const ConvGeometry& g, const T* dy, const T* x, T* dw);
// Tests: gradients (dX or dW) computed by the two above.
int64_t window_backward_call_count();

}  // namespace cpu
}  // namespace cnnops
