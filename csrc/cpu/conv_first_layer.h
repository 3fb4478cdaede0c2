#pragma once
// Direct kernels for first layers: groups = 1, at most 4 input channels (the RGB image), any number of
// output channels (conv_first_layer.cpp). Channels-last, they read the NHWC input where it lies and
// write the NHWC output directly; NCHW, they interleave the input rows and transpose the output (dY) rows.
#include <cstdint>

#include "common/activation.h"
#include "common/conv_shape.h"

namespace cnnops {
namespace cpu {

// groups = 1 layers that use_grouped_direct takes (kernels up to 7, strides up to 4, ...).
bool use_first_layer(const ConvGeometry& g);
int64_t first_layer_call_count();  // calls of the two kernels below (tests)

// x and y channels-last when nhwc, the weight as torch's [C_out][C_in][KH][KW]. Writes every value of y.
template <typename T>
void conv_first_layer_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation,
                              bool nhwc);
// dW (torch's layout) and, when db is not null, the bias gradient in the same pass over dY.
// Partial sums over fixed tasks, added in a fixed order: the same bits at any thread count.
// Returns whether it wrote db.
template <typename T>
bool conv_first_layer_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw, T* db, bool nhwc);

}  // namespace cpu
}  // namespace cnnops
