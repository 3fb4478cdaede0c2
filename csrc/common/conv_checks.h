#pragma once
// Host-side argument checks for the convolution ops. They run before any kernel, on CPU and
// CUDA alike, so an op called directly through torch.ops.cnnops never reads out of bounds.
// Messages follow torch.nn.functional.conv*d's wording.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>

#include "checked_math.h"
#include "conv_shape.h"

namespace cnnops {

inline void check_conv_param(const char* name, c10::IntArrayRef value, int64_t dims) {
  TORCH_CHECK(static_cast<int64_t>(value.size()) == dims, "expected ", name, " to be a list of ", dims,
              " values to match the convolution dimensions, but got ", name, "=", value);
}

// Validates input (N, C_in, *spatial), weight (C_out, C_in/groups, *kernel) and bias (C_out)
// and returns the geometry with 1d/2d lifted to 3d. `op` ("conv_forward()") names the op in the
// messages of cnnops' own limits; the others are torch's words.
inline ConvGeometry make_conv_geometry(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                       c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const int64_t dims = weight.dim() - 2;
  TORCH_CHECK(dims >= 1 && dims <= 3,
              "weight: expected 3, 4 or 5 dimensions (C_out, C_in/groups, *kernel), but got weight of size ",
              weight.sizes());
  TORCH_CHECK(input.dim() == dims + 2, "input: expected ", dims + 2, "D (batched) input to conv", dims,
              "d, but got input of size: ", input.sizes());
  check_conv_param("stride", stride, dims);
  check_conv_param("padding", padding, dims);
  check_conv_param("dilation", dilation, dims);
  TORCH_CHECK(input.device() == weight.device(), "input and weight must be on the same device, but got input on ",
              input.device(), " and weight on ", weight.device());
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "Input type (", input.scalar_type(), ") and weight type (",
              weight.scalar_type(), ") should be the same");
  TORCH_CHECK(groups > 0, "non-positive groups is not supported: groups=", groups);
  for (int64_t i = 0; i < dims; ++i) {
    TORCH_CHECK(stride[i] > 0, "non-positive stride is not supported: stride=", stride);
    TORCH_CHECK(padding[i] >= 0, "negative padding is not supported: padding=", padding);
    // dilation 0 passes torch's shape checks; its kernels reject it (below)
    TORCH_CHECK(dilation[i] >= 0, "negative dilation is not supported: dilation=", dilation);
    // torch's bound: 2 * padding must fit int64
    TORCH_CHECK(padding[i] <= kInt64Max / 2, "Given padding=", padding[i], " at dimension ", i,
                " , expected padding to be at most ", kInt64Max / 2);
  }
  const int64_t out_channels = weight.size(0);
  TORCH_CHECK(out_channels >= groups, "Given groups=", groups, ", expected weight to be at least ", groups,
              " at dimension 0, but got weight of size ", weight.sizes(), " instead");
  TORCH_CHECK(out_channels % groups == 0, "Given groups=", groups, ", expected weight to be divisible by ", groups,
              " at dimension 0, but got weight of size ", weight.sizes(), " instead");
  // groups <= out_channels, so weight.size(1) * groups <= the weight's numel... unless the weight
  // is a stride-0 view: check
  int64_t expected_in = 0;
  TORCH_CHECK(mul_fits(weight.size(1), groups, &expected_in) && input.size(1) == expected_in, "Given groups=", groups,
              ", weight of size ", weight.sizes(), ", expected input", input.sizes(), " to have ",
              static_cast<__int128>(weight.size(1)) * groups > kInt64Max ? std::string("more than 2^63 - 1")
                                                                         : std::to_string(weight.size(1) * groups),
              " channels, but got ", input.size(1), " channels instead");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, "Given weight of size ", weight.sizes(),
                ", expected bias to be 1-dimensional with ", out_channels, " elements, but got bias of size ",
                bias->sizes(), " instead");
    TORCH_CHECK(bias->device() == input.device(), "input and bias must be on the same device, but got input on ",
                input.device(), " and bias on ", bias->device());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "Input type (", input.scalar_type(), ") and bias type (",
                bias->scalar_type(), ") should be the same");
  }

  for (int64_t i = 2; i < input.dim(); ++i)
    TORCH_CHECK(input.size(i) > 0 || input.size(0) == 0 || input.size(1) == 0,
                "Only zero batch or zero channel inputs are supported, but got input shape: ", input.sizes());

  ConvGeometry g;
  g.batch = input.size(0);
  g.groups = groups;
  g.in_channels = input.size(1);
  g.out_channels = out_channels;
  const int64_t lift = 3 - dims;  // leading unit dims
  for (int64_t i = 0; i < 3; ++i) {
    const bool real = i >= lift;
    const int64_t j = i - lift;
    g.in[i] = real ? input.size(2 + j) : 1;
    g.kernel[i] = real ? weight.size(2 + j) : 1;
    g.stride[i] = real ? stride[j] : 1;
    g.pad[i] = real ? padding[j] : 0;
    g.dilation[i] = real ? dilation[j] : 1;
    // exact arithmetic: in + 2 * pad and dilation * (kernel - 1) + 1 may not fit int64
    const WindowDim w = window_dim(g.in[i], g.kernel[i], g.pad[i], g.dilation[i]);
    TORCH_CHECK(w.padded >= w.extent, "Calculated padded input size per channel: ", input.sizes().slice(2),
                " + 2 * padding ", padding, ". Kernel size: ", weight.sizes().slice(2), " dilated by ", dilation,
                " (in dim ", j, "). Kernel size can't be greater than actual input size");
    TORCH_CHECK(w.padded <= kInt64Max, "Calculated padded input size per channel: ", input.sizes().slice(2),
                " + 2 * padding ", padding, " does not fit int64");
    g.out[i] = window_count(g.in[i], g.kernel[i], g.stride[i], g.pad[i], g.dilation[i], false);
  }
  // torch returns an output with zero channels here; we would rather say so than guess.
  TORCH_CHECK_NOT_IMPLEMENTED(input.size(1) > 0, op, ": an input with zero channels (input of size ", input.sizes(),
                              ") is not supported");
  // torch checks this in its kernels, after the padded size (where a zero kernel spans
  // 1 - dilation, exact above) and after its zero-channel path. A batch-0 input takes torch's
  // empty path instead, which indexes the empty weight: IndexError.
  for (int64_t i = 0; i < dims; ++i) {
    TORCH_CHECK_INDEX(weight.size(2 + i) > 0 || input.size(0) > 0,
                      "weight: kernel size should be greater than zero, but got weight of size ", weight.sizes(),
                      " (for a batch-0 input torch raises IndexError: index 0 out of range for its empty weight)");
    TORCH_CHECK(weight.size(2 + i) > 0, "weight: kernel size should be greater than zero, but got weight of size ",
                weight.sizes());
  }
  for (int64_t i = 0; i < dims; ++i)
    TORCH_CHECK(dilation[i] > 0 || input.size(0) == 0,
                "dilation should be greater than zero, but got dilation=", dilation);
  // Every buffer the kernels size from the geometry: output, zero-padded input planes, the
  // im2col matrix, the weight as GEMM operands. torch pads implicitly, so a padded input or an
  // im2col matrix too large to address is a cnnops gap, not an error of the arguments.
  checked_numel({g.batch, g.out_channels, g.out[0], g.out[1], g.out[2]}, (std::string(op) + ": output").c_str());
  const int64_t padded_plane = checked_numel({g.in[0] + 2 * g.pad[0], g.in[1] + 2 * g.pad[1], g.in[2] + 2 * g.pad[2]},
                                             (std::string(op) + ": padded input plane").c_str(), true);
  checked_numel({g.batch, g.in_channels, padded_plane}, (std::string(op) + ": padded input").c_str(), true);
  const int64_t kernel_volume =
      checked_numel({g.kernel[0], g.kernel[1], g.kernel[2]}, (std::string(op) + ": kernel").c_str(), true);
  const int64_t out_plane = checked_numel({g.out[0], g.out[1], g.out[2]}, (std::string(op) + ": output plane").c_str());
  checked_numel({g.batch, g.in_channels, kernel_volume, out_plane}, (std::string(op) + ": im2col matrix").c_str(),
                true);
  checked_numel({g.out_channels, g.in_channels, kernel_volume}, (std::string(op) + ": weight").c_str(), true);
  return g;
}

inline std::vector<int64_t> conv_output_shape(const ConvGeometry& g, int64_t dims) {
  std::vector<int64_t> shape{g.batch, g.out_channels};
  for (int64_t i = 3 - dims; i < 3; ++i) shape.push_back(g.out[i]);
  return shape;
}

// The memory format of 4-d and 5-d tensors whose channels are innermost.
inline at::MemoryFormat channels_last_format(int64_t dim) {
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// Output layout, as torch's: channels_last when the input or the weight suggests it (4-d and
// 5-d only). grad_input passes the input twice; grad_weight takes the output's. Shared by the CPU and CUDA ops and mirrored by
// the fake kernels in cnnops/_ops.py.
inline at::MemoryFormat conv_output_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  if (input.dim() < 4) return at::MemoryFormat::Contiguous;
  const auto channels_last = channels_last_format(input.dim());
  if (input.suggest_memory_format() == channels_last || weight.suggest_memory_format() == channels_last)
    return channels_last;
  return at::MemoryFormat::Contiguous;
}

// Whether a weight is laid out channels-last only (OHWI: not also contiguous): the CPU kernels then
// read it in (tap, channel) order.
inline bool weight_is_channels_last(const at::Tensor& weight) {
  return (weight.dim() == 4 || weight.dim() == 5) && !weight.is_contiguous() &&
         weight.is_contiguous(channels_last_format(weight.dim()));
}

// grad_output must have exactly the forward output's shape.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const ConvGeometry& g,
                              int64_t dims) {
  const auto expected = conv_output_shape(g, dims);
  TORCH_CHECK(grad_output.sizes() == c10::IntArrayRef(expected), "grad_output: expected size ",
              c10::IntArrayRef(expected), ", but got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == input.device(), "grad_output must be on the input's device ", input.device(),
              ", but is on ", grad_output.device());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "grad_output: expected dtype ", input.scalar_type(),
              ", but got ", grad_output.scalar_type());
}

}  // namespace cnnops
