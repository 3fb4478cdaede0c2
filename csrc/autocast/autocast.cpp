// torch.autocast for cnnops ops (AutocastCPU / AutocastCUDA keys), with ATen's policy for each
// op's torch twin, so a raw op autocasts as the torch.nn.functional call does:
//   convolution                  -> the autocast dtype (CPU and CUDA)
//   CPU: 3d pools, max unpool    -> float32
//   CUDA: layer norm, group norm -> float32
// Everything else (and every backward op) falls through and runs in its input's dtype. Only
// floating tensors other than float64 are cast (at::autocast::cached_cast).
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "op_call.h"

namespace cnnops::autocast {
namespace {

using at::Tensor;
using c10::IntArrayRef;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

CNNOPS_OP_CALL(conv_forward, Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, IntArrayRef,
                                    IntArrayRef, IntArrayRef, int64_t, c10::string_view))
CNNOPS_OP_CALL(max_pool_forward, Tensor2(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, bool))
CNNOPS_OP_CALL(avg_pool_forward, Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool, bool, int64_t))
CNNOPS_OP_CALL(adaptive_avg_pool_forward, Tensor(const Tensor&, IntArrayRef))
CNNOPS_OP_CALL(adaptive_max_pool_forward, Tensor2(const Tensor&, IntArrayRef))
CNNOPS_OP_CALL(max_unpool_forward, Tensor(const Tensor&, const Tensor&, IntArrayRef))
CNNOPS_OP_CALL(layer_norm_forward,
               Tensor3(const Tensor&, IntArrayRef, const std::optional<Tensor>&, const std::optional<Tensor>&, double))
CNNOPS_OP_CALL(group_norm_forward,
               Tensor3(const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, int64_t, double))

constexpr c10::DispatchKey autocast_key(c10::DeviceType device) {
  return device == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA : c10::DispatchKey::AutocastCPU;
}

// The target dtype of a policy, and the cast of one argument to it.
template <c10::DeviceType device>
struct Cast {
  at::ScalarType dtype;
  template <typename T>
  decltype(auto) operator()(const T& tensor) const {
    return at::autocast::cached_cast(dtype, tensor, device);
  }
};
template <c10::DeviceType device>
Cast<device> to_lower_precision() {
  return {at::autocast::get_autocast_dtype(device)};
}
template <c10::DeviceType device>
Cast<device> to_float32() {
  return {at::kFloat};
}

template <c10::DeviceType device>
Tensor conv_forward(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, IntArrayRef stride,
                    IntArrayRef padding, IntArrayRef dilation, int64_t groups, c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(device));
  const auto cast = to_lower_precision<device>();
  return call::conv_forward(cast(input), cast(weight), cast(bias), stride, padding, dilation, groups, activation);
}

// CPU pools: float32 for the 3d ones (ATen's max_pool3d, avg_pool3d, adaptive_*_pool3d) and
// for max unpool in every dim; the others run in the input's dtype.
constexpr auto kCpu = c10::DeviceType::CPU;

Cast<kCpu> cpu_pool_cast(const Tensor& input, size_t spatial_dims) {
  return {spatial_dims == 3 ? at::kFloat : input.scalar_type()};
}

Tensor2 max_pool_forward_cpu(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                             IntArrayRef dilation, bool ceil_mode) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(kCpu));
  return call::max_pool_forward(cpu_pool_cast(input, kernel_size.size())(input), kernel_size, stride, padding, dilation,
                                ceil_mode);
}

Tensor avg_pool_forward_cpu(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                            bool ceil_mode, bool count_include_pad, int64_t divisor_override) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(kCpu));
  return call::avg_pool_forward(cpu_pool_cast(input, kernel_size.size())(input), kernel_size, stride, padding,
                                ceil_mode, count_include_pad, divisor_override);
}

Tensor adaptive_avg_pool_forward_cpu(const Tensor& input, IntArrayRef output_size) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(kCpu));
  return call::adaptive_avg_pool_forward(cpu_pool_cast(input, output_size.size())(input), output_size);
}

Tensor2 adaptive_max_pool_forward_cpu(const Tensor& input, IntArrayRef output_size) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(kCpu));
  return call::adaptive_max_pool_forward(cpu_pool_cast(input, output_size.size())(input), output_size);
}

Tensor max_unpool_forward_cpu(const Tensor& input, const Tensor& indices, IntArrayRef output_size) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(kCpu));
  return call::max_unpool_forward(to_float32<kCpu>()(input), indices, output_size);
}

constexpr auto kCuda = c10::DeviceType::CUDA;

Tensor3 layer_norm_forward_cuda(const Tensor& input, IntArrayRef normalized_shape, const std::optional<Tensor>& weight,
                                const std::optional<Tensor>& bias, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(kCuda));
  const auto cast = to_float32<kCuda>();
  return call::layer_norm_forward(cast(input), normalized_shape, cast(weight), cast(bias), eps);
}

Tensor3 group_norm_forward_cuda(const Tensor& input, const std::optional<Tensor>& weight,
                                const std::optional<Tensor>& bias, int64_t num_groups, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(kCuda));
  const auto cast = to_float32<kCuda>();
  return call::group_norm_forward(cast(input), cast(weight), cast(bias), num_groups, eps);
}

}  // namespace
}  // namespace cnnops::autocast

TORCH_LIBRARY_IMPL(cnnops, AutocastCPU, m) {
  using namespace cnnops::autocast;
  m.impl("conv_forward", &conv_forward<c10::DeviceType::CPU>);
  m.impl("max_pool_forward", &max_pool_forward_cpu);
  m.impl("avg_pool_forward", &avg_pool_forward_cpu);
  m.impl("adaptive_avg_pool_forward", &adaptive_avg_pool_forward_cpu);
  m.impl("adaptive_max_pool_forward", &adaptive_max_pool_forward_cpu);
  m.impl("max_unpool_forward", &max_unpool_forward_cpu);
}

TORCH_LIBRARY_IMPL(cnnops, AutocastCUDA, m) {
  using namespace cnnops::autocast;
  m.impl("conv_forward", &conv_forward<c10::DeviceType::CUDA>);
  m.impl("layer_norm_forward", &layer_norm_forward_cuda);
  m.impl("group_norm_forward", &group_norm_forward_cuda);
}
