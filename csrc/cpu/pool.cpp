// Pooling ops on the CPU: argument checks, output allocation and the choice of kernel.
//
// Every pool is 3-d inside (1d and 2d get unit leading dims, csrc/common/pool_checks.h). Any
// strided input is accepted: it is made contiguous in its suggested memory format, which the
// outputs keep, and channels_last tensors run the NHWC kernels (pool_max.cpp, pool_avg.cpp,
// pool_index.cpp) while everything else, 1d included, runs the NCHW ones.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/pool_checks.h"
#include "cpu/pool_cpu.h"
#include "cpu/result_memory.h"

namespace cnnops {
namespace cpu {
namespace {

using at::Tensor;
using c10::IntArrayRef;

void check_floating(const char* op, const Tensor& input) {
  const auto t = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
      ": cnnops pooling supports float32, float64, bfloat16 and float16 on the CPU, but got input of dtype ", t);
}

Tensor empty_like_format(IntArrayRef shape, const Tensor& like, at::MemoryFormat format,
                         std::optional<at::ScalarType> dtype = std::nullopt) {
  return empty_result(shape, like.options().dtype(dtype.value_or(like.scalar_type())), format);
}

// A backward's gradient w.r.t. the pooled-from input: input's sizes and memory format.
struct BackwardTensors {
  at::MemoryFormat format;
  bool channels_last;
  Tensor grad_output, grad_input;
};
BackwardTensors backward_tensors(const Tensor& grad_output, const Tensor& input) {
  const auto format = pool_memory_format(input);
  return {format, is_channels_last(format), grad_output.contiguous(format),
          empty_like_format(input.sizes(), input, format)};
}

std::tuple<Tensor, Tensor> max_pool_forward_cpu(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                                                IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool_forward()";
  check_floating(op, input);
  const PoolGeometry g =
      make_pool_geometry(op, PoolKind::kMax, input, kernel_size, stride, padding, dilation, ceil_mode);
  const auto format = pool_memory_format(input);
  const auto shape = pool_output_shape(g, kernel_size.size());
  Tensor output = empty_like_format(shape, input, format);
  Tensor indices = empty_like_format(shape, input, format, at::kLong);
  if (output.numel() > 0)
    max_pool_forward_kernel(g, input.contiguous(format), output, indices, is_channels_last(format));
  return {output, indices};
}

// Backward of max pool and adaptive max pool alike: grad_output added at the argmax indices.
// Indices in [in_plane, skip_limit) get no gradient (max_pool_index_limit); others outside the
// plane are an error.
Tensor max_backward(const char* op, const PoolGeometry& g, int64_t dims, const Tensor& grad_output, const Tensor& input,
                    const Tensor& indices, int64_t skip_limit) {
  check_pool_grad_output(op, grad_output, input, g, dims);
  check_pool_indices(op, indices, grad_output.sizes(), input);
  BackwardTensors t = backward_tensors(grad_output, input);
  const IndexedPlanes p{g.batch, g.channels, g.out_plane(), g.in_plane()};
  int64_t bad = 0;
  const bool ok = index_scatter_add_kernel(p, t.grad_output, indices.contiguous(t.format), t.grad_input,
                                           t.channels_last, skip_limit, &bad);
  TORCH_CHECK(ok, op, ": indices must lie in [0, ", g.in_plane(), ") (each input plane has ", g.in_plane(),
              " elements), but found index ", bad);
  return t.grad_input;
}

Tensor max_pool_backward_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& indices,
                             IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                             bool ceil_mode) {
  const char* op = "max_pool_backward()";
  check_floating(op, input);
  const PoolGeometry g =
      make_pool_geometry(op, PoolKind::kMax, input, kernel_size, stride, padding, dilation, ceil_mode);
  return max_backward(op, g, kernel_size.size(), grad_output, input, indices, max_pool_index_limit(g));
}

Tensor avg_pool_forward_cpu(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                            bool ceil_mode, bool count_include_pad, int64_t divisor_override) {
  const char* op = "avg_pool_forward()";
  check_floating(op, input);
  const std::vector<int64_t> dilation(kernel_size.size(), 1);
  const PoolGeometry g =
      make_pool_geometry(op, PoolKind::kAvg, input, kernel_size, stride, padding, dilation, ceil_mode);
  check_avg_pool3d_input_size(op, g, kernel_size.size());
  const auto format = pool_memory_format(input);
  Tensor output = empty_like_format(pool_output_shape(g, kernel_size.size()), input, format);
  if (output.numel() > 0)
    avg_pool_forward_kernel(g, input.contiguous(format), output, is_channels_last(format), count_include_pad,
                            divisor_override);
  return output;
}

Tensor avg_pool_backward_cpu(const Tensor& grad_output, const Tensor& input, IntArrayRef kernel_size,
                             IntArrayRef stride, IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                             int64_t divisor_override) {
  const char* op = "avg_pool_backward()";
  check_floating(op, input);
  const std::vector<int64_t> dilation(kernel_size.size(), 1);
  const PoolGeometry g =
      make_pool_geometry(op, PoolKind::kAvg, input, kernel_size, stride, padding, dilation, ceil_mode);
  check_avg_pool3d_input_size(op, g, kernel_size.size());
  check_pool_grad_output(op, grad_output, input, g, kernel_size.size());
  BackwardTensors t = backward_tensors(grad_output, input);
  if (t.grad_input.numel() > 0)
    avg_pool_backward_kernel(g, t.grad_output, t.grad_input, t.channels_last, count_include_pad, divisor_override);
  return t.grad_input;
}

Tensor adaptive_avg_pool_forward_cpu(const Tensor& input, IntArrayRef output_size) {
  const char* op = "adaptive_avg_pool_forward()";
  check_floating(op, input);
  const PoolGeometry g = make_adaptive_pool_geometry(op, input, output_size);
  const auto format = pool_memory_format(input);
  Tensor output = empty_like_format(pool_output_shape(g, output_size.size()), input, format);
  if (output.numel() > 0)
    adaptive_avg_pool_forward_kernel(g, input.contiguous(format), output, is_channels_last(format));
  return output;
}

Tensor adaptive_avg_pool_backward_cpu(const Tensor& grad_output, const Tensor& input) {
  const char* op = "adaptive_avg_pool_backward()";
  check_floating(op, input);
  const PoolGeometry g = make_adaptive_backward_geometry(op, grad_output, input);
  BackwardTensors t = backward_tensors(grad_output, input);
  if (t.grad_input.numel() > 0) adaptive_avg_pool_backward_kernel(g, t.grad_output, t.grad_input, t.channels_last);
  return t.grad_input;
}

std::tuple<Tensor, Tensor> adaptive_max_pool_forward_cpu(const Tensor& input, IntArrayRef output_size) {
  const char* op = "adaptive_max_pool_forward()";
  check_floating(op, input);
  const PoolGeometry g = make_adaptive_pool_geometry(op, input, output_size);
  const auto format = pool_memory_format(input);
  const auto shape = pool_output_shape(g, output_size.size());
  Tensor output = empty_like_format(shape, input, format);
  Tensor indices = empty_like_format(shape, input, format, at::kLong);
  if (output.numel() > 0)
    adaptive_max_pool_forward_kernel(g, input.contiguous(format), output, indices, is_channels_last(format));
  return {output, indices};
}

Tensor adaptive_max_pool_backward_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& indices) {
  const char* op = "adaptive_max_pool_backward()";
  check_floating(op, input);
  const PoolGeometry g = make_adaptive_backward_geometry(op, grad_output, input);
  return max_backward(op, g, input.dim() - 2, grad_output, input, indices, g.in_plane());
}

// Max unpool: `input` is the pooled side, its (N, C) planes are spread into planes of
// output_size.
PoolGeometry unpool_geometry(const Tensor& input, IntArrayRef output_spatial) {
  PoolGeometry g{};
  g.batch = input.size(0);
  g.channels = input.size(1);
  const int64_t dims = input.dim() - 2, lift = 3 - dims;
  for (int64_t i = 0; i < 3; ++i) {
    g.in[i] = i >= lift ? input.size(2 + i - lift) : 1;
    g.out[i] = i >= lift ? output_spatial[i - lift] : 1;
    g.kernel[i] = g.stride[i] = g.dilation[i] = 1;
    g.pad[i] = 0;
  }
  return g;
}

Tensor max_unpool_forward_cpu(const Tensor& input, const Tensor& indices, IntArrayRef output_size) {
  const char* op = "max_unpool_forward()";
  check_floating(op, input);
  check_max_unpool(op, input, indices, output_size);
  const PoolGeometry g = unpool_geometry(input, output_size);
  const auto format = pool_memory_format(input);
  Tensor output = empty_like_format(pool_output_shape(g, output_size.size()), input, format);
  if (output.numel() == 0 && input.numel() == 0) return output;
  const IndexedPlanes p{g.batch, g.channels, g.in_plane(), g.out_plane()};
  int64_t bad = 0;
  const bool ok = index_scatter_kernel(p, input.contiguous(format), indices.contiguous(format), output,
                                       is_channels_last(format), &bad);
  check_max_unpool_index(op, ok, bad, output_size);
  return output;
}

Tensor max_unpool_backward_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& indices) {
  const char* op = "max_unpool_backward()";
  check_floating(op, input);
  check_max_unpool_backward(op, grad_output, input, indices);
  const IntArrayRef output_spatial = grad_output.sizes().slice(2);
  const PoolGeometry g = unpool_geometry(input, output_spatial);
  BackwardTensors t = backward_tensors(grad_output, input);
  if (t.grad_input.numel() == 0) return t.grad_input;
  const IndexedPlanes p{g.batch, g.channels, g.in_plane(), g.out_plane()};
  int64_t bad = 0;
  const bool ok =
      index_gather_kernel(p, t.grad_output, indices.contiguous(t.format), t.grad_input, t.channels_last, &bad);
  check_max_unpool_index(op, ok, bad, output_spatial);
  return t.grad_input;
}

}  // namespace
}  // namespace cpu
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("max_pool_forward", &cnnops::cpu::max_pool_forward_cpu);
  m.impl("max_pool_backward", &cnnops::cpu::max_pool_backward_cpu);
  m.impl("avg_pool_forward", &cnnops::cpu::avg_pool_forward_cpu);
  m.impl("avg_pool_backward", &cnnops::cpu::avg_pool_backward_cpu);
  m.impl("adaptive_avg_pool_forward", &cnnops::cpu::adaptive_avg_pool_forward_cpu);
  m.impl("adaptive_avg_pool_backward", &cnnops::cpu::adaptive_avg_pool_backward_cpu);
  m.impl("adaptive_max_pool_forward", &cnnops::cpu::adaptive_max_pool_forward_cpu);
  m.impl("adaptive_max_pool_backward", &cnnops::cpu::adaptive_max_pool_backward_cpu);
  m.impl("max_unpool_forward", &cnnops::cpu::max_unpool_forward_cpu);
  m.impl("max_unpool_backward", &cnnops::cpu::max_unpool_backward_cpu);
}
