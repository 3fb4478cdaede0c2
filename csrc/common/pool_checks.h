#pragma once
// Host-side argument checks for the pooling ops, shared by the CPU and CUDA kernels. Messages
// follow torch's own wording, so users see the errors they know.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "checked_math.h"
#include "pool_shape.h"

namespace cnnops {

inline void check_pool_param(const char* op, const char* name, c10::IntArrayRef value, int64_t dims) {
  TORCH_CHECK(static_cast<int64_t>(value.size()) == dims, op, ": expected ", name, " to have ", dims,
              " values (one per spatial dim), but got ", name, "=", value);
}

// input must be N x C x *spatial with `dims` spatial dims; only the batch may be empty.
inline void check_pool_input(const char* op, const at::Tensor& input, int64_t dims) {
  TORCH_CHECK(input.dim() == dims + 2, op, ": expected a ", dims + 2, "D (batched) input, but got input of size ",
              input.sizes());
  for (int64_t i = 1; i < input.dim(); ++i)
    TORCH_CHECK(input.size(i) > 0, op, ": Expected ", dims + 2,
                "D (batch mode) tensor with optional 0 dim batch size for input, but got:", input.sizes());
}

// torch's max_pool1d takes its arguments as int64; its other pools (avg_pool1d included,
// which runs as a 2d pool) convert them to int first and reject what does not fit.
enum class PoolKind { kMax, kAvg };

inline void check_pool_int32(const char* op, const char* name, c10::IntArrayRef value) {
  for (const int64_t v : value)
    TORCH_CHECK(v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max(), op, ": ", name,
                "=", value, ": value cannot be converted to type int without overflow");
}

// Validates a max or average pool (dilation all 1 for average) and returns its geometry with
// 1d/2d lifted to 3d. All size arithmetic is exact (checked_math.h): afterwards every window
// offset o * stride - pad + k * dilation of an output o and a tap k fits int64.
inline PoolGeometry make_pool_geometry(const char* op, PoolKind kind, const at::Tensor& input,
                                       c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                       c10::IntArrayRef dilation, bool ceil_mode) {
  const int64_t dims = static_cast<int64_t>(kernel_size.size());
  TORCH_CHECK(dims >= 1 && dims <= 3, op,
              ": expected kernel_size to have 1, 2 or 3 values, but got kernel_size=", kernel_size);
  check_pool_param(op, "stride", stride, dims);
  check_pool_param(op, "padding", padding, dims);
  check_pool_param(op, "dilation", dilation, dims);
  if (kind != PoolKind::kMax || dims != 1) {
    check_pool_int32(op, "kernel_size", kernel_size);
    check_pool_int32(op, "stride", stride);
    check_pool_int32(op, "padding", padding);
    check_pool_int32(op, "dilation", dilation);
  }
  check_pool_input(op, input, dims);
  for (int64_t i = 0; i < dims; ++i) {
    TORCH_CHECK(kernel_size[i] > 0, op, ": kernel_size should be greater than zero, but got kernel_size=", kernel_size);
    TORCH_CHECK(stride[i] > 0, op, ": stride should be greater than zero, but got stride=", stride);
    TORCH_CHECK(dilation[i] > 0, op, ": dilation should be greater than zero, but got dilation=", dilation);
    TORCH_CHECK(padding[i] >= 0, op, ": pad must be non-negative, but got padding=", padding);
    // torch bounds the padding by half the kernel itself, not the dilated window
    TORCH_CHECK(padding[i] <= kernel_size[i] / 2, op,
                ": pad should be at most half of kernel size, but got pad=", padding[i],
                " and kernel_size=", kernel_size[i]);
    // window offsets in the kernels need the extent; torch's own arithmetic wraps past this
    TORCH_CHECK(extent_fits(kernel_size[i], dilation[i]), op,
                ": the dilated kernel extent dilation * (kernel_size - 1) + 1 does not fit int64 (kernel_size=",
                kernel_size, ", dilation=", dilation, ")");
  }
  PoolGeometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  const int64_t lift = 3 - dims;
  bool empty = false;
  for (int64_t i = 0; i < 3; ++i) {
    const bool real = i >= lift;
    const int64_t j = i - lift;
    g.in[i] = real ? input.size(2 + j) : 1;
    g.kernel[i] = real ? kernel_size[j] : 1;
    g.stride[i] = real ? stride[j] : 1;
    g.pad[i] = real ? padding[j] : 0;
    g.dilation[i] = real ? dilation[j] : 1;
    g.out[i] = window_count(g.in[i], g.kernel[i], g.stride[i], g.pad[i], g.dilation[i], ceil_mode);
    empty = empty || g.out[i] < 1;
  }
  TORCH_CHECK(!empty, op, ": Given input size: ", input.sizes().slice(1), ". Calculated output size: (", g.out[0], ", ",
              g.out[1], ", ", g.out[2], ") in (D, H, W). Output size is too small");
  checked_numel({g.batch, g.channels, g.out[0], g.out[1], g.out[2]}, op);
  if (kind == PoolKind::kAvg)  // count_include_pad divisors multiply per-dim window sizes <= kernel
    checked_numel({g.kernel[0], g.kernel[1], g.kernel[2]}, op);
  return g;
}

// One past the largest index a max-pool forward can return. A window whose taps all lie in
// the padding (dilation > 1) returns -inf at its first tap, as torch does, and that index may
// lie past the input plane; the backward gives it no gradient (torch's result) instead of
// calling it invalid. A bound, saturating at int64's max.
inline int64_t max_pool_index_limit(const PoolGeometry& g) {
  int64_t flat = 0;
  for (int i = 0; i < 3; ++i) {
    // the largest window start: the last output's, or one left in [0, D) by the padding
    const int64_t last =
        max_pool_window(g.out[i] - 1, g.in[i], g.kernel[i], g.stride[i], g.pad[i], g.dilation[i]).start;
    const int64_t start = max64(last, g.pad[i] > 0 ? g.dilation[i] - 1 : 0);
    int64_t next;
    flat = add_fits(saturating_mul(flat, g.in[i]), start, &next) ? next : kInt64Max;
  }
  int64_t limit;
  return add_fits(flat, 1, &limit) ? limit : kInt64Max;
}

// Whether the window walks fit 32-bit offsets (the CUDA kernels' int32 variant): a coordinate
// plus one stride or dilation step must stay below 2^31 (max_pool1d takes int64 arguments).
inline bool pool_windows_fit_int32(const PoolGeometry& g) {
  constexpr int64_t kQuarter = int64_t(1) << 29;
  for (int i = 0; i < 3; ++i)
    if (g.in[i] > kQuarter || g.out[i] > kQuarter || g.kernel[i] > kQuarter || g.stride[i] > kQuarter ||
        g.pad[i] > kQuarter || g.dilation[i] > kQuarter)
      return false;
  return true;
}

// torch's avg_pool3d (and only it) also rejects an input smaller than the kernel in any dim,
// padding or not; the average pool ops mirror that for 3-d pools.
inline void check_avg_pool3d_input_size(const char* op, const PoolGeometry& g, int64_t dims) {
  if (dims != 3) return;
  TORCH_CHECK(g.in[0] >= g.kernel[0] && g.in[1] >= g.kernel[1] && g.in[2] >= g.kernel[2], op,
              ": input image (T: ", g.in[0], " H: ", g.in[1], " W: ", g.in[2],
              ") smaller than kernel size (kT: ", g.kernel[0], " kH: ", g.kernel[1], " kW: ", g.kernel[2], ")");
}

// Adaptive pools: any output size >= 0; every input size except the batch must be positive
// (channels may be 0 as in torch).
inline PoolGeometry make_adaptive_pool_geometry(const char* op, const at::Tensor& input, c10::IntArrayRef output_size) {
  const int64_t dims = static_cast<int64_t>(output_size.size());
  TORCH_CHECK(dims >= 1 && dims <= 3, op,
              ": expected output_size to have 1, 2 or 3 values, but got output_size=", output_size);
  TORCH_CHECK(input.dim() == dims + 2, op, ": expected a ", dims + 2, "D (batched) input, but got input of size ",
              input.sizes());
  for (int64_t i = 2; i < input.dim(); ++i)
    TORCH_CHECK(input.size(i) > 0, op,
                ": expected input to have non-zero size for non-batch dimensions, but input has sizes ", input.sizes(),
                " with dimension ", i, " being empty");
  PoolGeometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  const int64_t lift = 3 - dims;
  for (int64_t i = 0; i < 3; ++i) {
    const bool real = i >= lift;
    const int64_t j = i - lift;
    TORCH_CHECK(!real || output_size[j] >= 0, op,
                ": output_size must be non-negative, but got output_size=", output_size);
    g.in[i] = real ? input.size(2 + j) : 1;
    g.out[i] = real ? output_size[j] : 1;
    g.kernel[i] = g.stride[i] = g.dilation[i] = 1;  // unused: windows come from adaptive_start/end
    g.pad[i] = 0;
  }
  return g;
}

inline std::vector<int64_t> pool_output_shape(const PoolGeometry& g, int64_t dims) {
  std::vector<int64_t> shape{g.batch, g.channels};
  for (int64_t i = 3 - dims; i < 3; ++i) shape.push_back(g.out[i]);
  return shape;
}

// Outputs keep the input's memory format (channels_last in, channels_last out).
inline at::MemoryFormat pool_memory_format(const at::Tensor& input) { return input.suggest_memory_format(); }

// channels_last (2d or 3d) tensors run the NHWC / NDHWC kernels.
inline bool is_channels_last(at::MemoryFormat format) {
  return format == at::MemoryFormat::ChannelsLast || format == at::MemoryFormat::ChannelsLast3d;
}

// grad_output (and indices) must have the forward output's shape, device and dtype.
inline void check_pool_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                   const PoolGeometry& g, int64_t dims) {
  const auto expected = pool_output_shape(g, dims);
  TORCH_CHECK(grad_output.sizes() == c10::IntArrayRef(expected), op, ": grad_output: expected size ",
              c10::IntArrayRef(expected), ", but got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output must be on the input's device ",
              input.device(), ", but is on ", grad_output.device());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output: expected dtype ",
              input.scalar_type(), ", but got ", grad_output.scalar_type());
}

inline void check_pool_indices(const char* op, const at::Tensor& indices, c10::IntArrayRef expected_sizes,
                               const at::Tensor& input) {
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices: expected dtype int64, but got ",
              indices.scalar_type());
  TORCH_CHECK(indices.sizes() == expected_sizes, op, ": indices: expected size ", expected_sizes, ", but got ",
              indices.sizes());
  TORCH_CHECK(indices.device() == input.device(), op, ": indices must be on the input's device ", input.device(),
              ", but are on ", indices.device());
}

// The adaptive backward ops read the output size off grad_output, so its rank is checked first;
// grad_output must then match that output (size, device, dtype). Like torch, the backward
// rejects an empty output (or channel) dim, although the forward produces one.
inline PoolGeometry make_adaptive_backward_geometry(const char* op, const at::Tensor& grad_output,
                                                    const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 3 && input.dim() <= 5, op,
              ": expected a 3D, 4D or 5D (batched) input, but got input of size ", input.sizes());
  TORCH_CHECK(grad_output.dim() == input.dim(), op, ": grad_output: expected ", input.dim(),
              " dimensions like input, but got grad_output of size ", grad_output.sizes());
  for (int64_t i = 1; i < grad_output.dim(); ++i)
    TORCH_CHECK(grad_output.size(i) > 0, op,
                ": Expected grad_output to have non-zero size for non-batch dimensions, but grad_output has sizes ",
                grad_output.sizes(), " with dimension ", i, " being empty");
  const PoolGeometry g = make_adaptive_pool_geometry(op, input, grad_output.sizes().slice(2));
  check_pool_grad_output(op, grad_output, input, g, input.dim() - 2);
  return g;
}

// Max unpool: `input` is the pooled side (N x C x *spatial, non-empty non-batch dims), indices
// int64 of its shape on its device, output_size one non-negative value per spatial dim.
inline void check_max_unpool(const char* op, const at::Tensor& input, const at::Tensor& indices,
                             c10::IntArrayRef output_size) {
  TORCH_CHECK(input.dim() >= 3 && input.dim() <= 5, op,
              ": expected a 3D, 4D or 5D (batched) input, but got input of size ", input.sizes());
  TORCH_CHECK(static_cast<int64_t>(output_size.size()) == input.dim() - 2, op, ": output_size must have ",
              input.dim() - 2, " elements (one per spatial dim), but got output_size=", output_size);
  check_pool_input(op, input, input.dim() - 2);
  for (const int64_t s : output_size)
    TORCH_CHECK(s >= 0, op, ": output_size must be non-negative, but got output_size=", output_size);
  check_pool_indices(op, indices, input.sizes(), input);
}

// Max unpool backward: grad_output is N x C x *output_size of the input's device and dtype.
inline void check_max_unpool_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                      const at::Tensor& indices) {
  TORCH_CHECK(input.dim() >= 3 && input.dim() <= 5, op,
              ": expected a 3D, 4D or 5D (batched) input, but got input of size ", input.sizes());
  TORCH_CHECK(
      grad_output.dim() == input.dim() && grad_output.size(0) == input.size(0) && grad_output.size(1) == input.size(1),
      op, ": grad_output: expected size (", input.size(0), ", ", input.size(1), ", *output_size), but got ",
      grad_output.sizes());
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output must be on the input's device ",
              input.device(), ", but is on ", grad_output.device());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output: expected dtype ",
              input.scalar_type(), ", but got ", grad_output.scalar_type());
  check_max_unpool(op, input, indices, grad_output.sizes().slice(2));
}

// torch's error for an unpool index outside its output plane (`bad` is the index itself).
inline void check_max_unpool_index(const char* op, bool ok, int64_t bad, c10::IntArrayRef output_size) {
  if (ok) return;
  std::string sizes;  // "DxHxW", as torch names the output volume
  for (size_t i = 0; i < output_size.size(); ++i) sizes += (i ? "x" : "") + std::to_string(output_size[i]);
  TORCH_CHECK(false, op, ": Found an invalid max index: ", bad, " (output volumes are of size ", sizes, ")");
}

}  // namespace cnnops
