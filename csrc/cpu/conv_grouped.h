#pragma once
// Direct kernels for grouped 2-d convolution with few channels per group (RegNet's 8, ResNeXt's
// 4 to 16), and for first layers (3 input channels): no im2col and no GEMM, whose M = C_out / groups
// rows would leave most of each micro-kernel call idle, or whose K = 27 would make packing most of
// the time (conv_grouped.cpp). NCHW and NHWC, float and double. (conv.cpp runs groups = 1 first layers'
// forward and grad weight through conv_first_layer.h; their grad input stays here.)
#include <cstdint>

#include "common/activation.h"
#include "common/conv_shape.h"

namespace cnnops {
namespace cpu {

// Grouped (not depthwise) 2-d convolutions with at most kGroupedMaxChannels input and output
// channels a group, or at most kNarrowInputChannels input channels a group and any number of groups
// and outputs (first layers: the image's 3 channels in), with small kernels, strides and dilations.
bool use_grouped_direct(const ConvGeometry& g);
int64_t grouped_direct_call_count();  // calls of the three kernels below (tests)

// x, y, dy, dx channels-last when nhwc, the weight as torch's. Each writes every value of its output.
template <typename T>
void conv_grouped_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation,
                          bool nhwc);
template <typename T>
void conv_grouped_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx, bool nhwc);
template <typename T>
void conv_grouped_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw, bool nhwc);

}  // namespace cpu
}  // namespace cnnops
