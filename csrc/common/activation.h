#pragma once
// The activation a convolution applies in its output step: conv_forward(..., activation="relu")
// computes relu(W * x + b) with the ReLU applied where each output value is written (after the
// bias, on the final value), so a conv + ReLU pair costs no extra pass over the output. Shared by
// the CPU and CUDA kernels.
#include <c10/util/Exception.h>

#include <string_view>

#include "macros.h"

namespace cnnops {

enum class Activation : int { None = 0, Relu = 1 };

// The schema's `str activation`: "none" or "relu"; anything else is a RuntimeError naming it.
inline Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  TORCH_CHECK(false, "activation: expected one of 'none', 'relu', but got activation='", name, "'");
}

// relu(v) = max(v, 0). Written as `v < 0 ? 0 : v` so a NaN passes through, as in torch.relu
// (the CPU GEMM's micro-kernel applies the same expression to its vector registers).
template <typename T>
CNNOPS_HD T relu(T v) {
  const T zero{};
  return v < zero ? zero : v;
}

// One output value after the activation.
template <typename T>
CNNOPS_HD T apply_activation(T v, Activation activation) {
  return activation == Activation::Relu ? relu(v) : v;
}

}  // namespace cnnops
