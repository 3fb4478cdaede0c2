// SyncBatchNorm pieces on CUDA (cnnops.nn.SyncBatchNorm): per-rank statistics, normalization
// with given statistics, grad_input from all-reduced sums. Built from the batch norm kernels
// (norm_kernels.cuh) and their launchers (norm_launch.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/norm_checks.h"
#include "../common/norm_cuda_math.h"
#include "../common/norm_math.h"
#include "norm_kernels.cuh"
#include "norm_launch.cuh"

namespace cnnops {

using namespace norm;

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input_) {
  const char* op = "batch_norm_stats()";
  const ChannelNormShape s = check_batch_norm_input(op, input_);
  TORCH_CHECK(input_.is_cuda(), op, ": expected a CUDA input");
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = kernel_memory_format(input_);
  const bool channels_last = format != at::MemoryFormat::Contiguous;
  const at::Tensor x = input_.contiguous(format);
  const auto acc_options = input_.options().dtype(norm_stat_dtype(input_));
  at::Tensor mean = at::empty({s.channels}, acc_options), m2 = at::empty({s.channels}, acc_options);
  if (s.channels == 0) return {mean, m2};
  if (x.numel() == 0) {
    mean.zero_();
    m2.zero_();
    return {mean, m2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    // The reduction of batch_norm_forward's training path.
    const WelfordOp<scalar_t, acc_t> welford{x.const_data_ptr<scalar_t>()};
    const ChannelPartials r = reduce_per_channel<acc_t>(welford, 3, channels_last, s.batch, s.channels, s.spatial,
                                                        acc_options, x.numel(), op);
    finalize_mean_m2<acc_t>(r.p, r.pi, s.channels, mean, m2);
  });
  return {mean, m2};
}

at::Tensor batch_norm_elemt_cuda(const at::Tensor& input_, const c10::optional<at::Tensor>& weight_,
                                 const c10::optional<at::Tensor>& bias_, const at::Tensor& mean_,
                                 const at::Tensor& invstd_) {
  const char* op = "batch_norm_elemt()";
  const ChannelNormShape s = check_batch_norm_elemt(input_, weight_, bias_, mean_, invstd_);
  TORCH_CHECK(input_.is_cuda(), op, ": expected a CUDA input");
  const bool mixed = params_are_mixed(op, input_, {{"weight", &weight_}, {"bias", &bias_}});
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = kernel_memory_format(input_);
  const bool channels_last = format != at::MemoryFormat::Contiguous;
  const at::Tensor x = input_.contiguous(format);
  const at::Tensor weight = defined_contiguous(weight_), bias = defined_contiguous(bias_);
  const at::Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
  at::Tensor output = at::empty(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_elemt_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    with_param_type<scalar_t>(mixed, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      launch_normalize<scalar_t, param_t, acc_t>(channels_last, x, output, mean, invstd, weight, bias, s.channels,
                                                 s.spatial, 0, 1);
    });
  });
  return output;
}

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad_output_, const at::Tensor& input_,
                                          const at::Tensor& mean_, const at::Tensor& invstd_,
                                          const c10::optional<at::Tensor>& weight_, const at::Tensor& sum_dy_,
                                          const at::Tensor& sum_dy_xmu_, int64_t count) {
  const char* op = "batch_norm_backward_elemt()";
  const ChannelNormShape s =
      check_batch_norm_backward_elemt(grad_output_, input_, mean_, invstd_, weight_, sum_dy_, sum_dy_xmu_, count);
  TORCH_CHECK(input_.is_cuda(), op, ": expected a CUDA input");
  const bool mixed = params_are_mixed(op, input_, {{"weight", &weight_}});
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = kernel_memory_format(input_);
  const bool channels_last = format != at::MemoryFormat::Contiguous;
  const at::Tensor x = input_.contiguous(format);
  const at::Tensor dy = grad_output_.contiguous(format);
  const at::Tensor weight = defined_contiguous(weight_);
  const at::Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const at::Tensor sum_dy = sum_dy_.contiguous(), sum_dy_xmu = sum_dy_xmu_.contiguous();
  const auto acc_options = input_.options().dtype(norm_stat_dtype(input_));
  at::Tensor grad_input = at::empty(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_elemt_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    with_param_type<scalar_t>(mixed, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      // batch_norm_backward's training coefficients, from the all-ranks sums and count.
      at::Tensor coef_g = at::empty({s.channels}, acc_options), coef_xmu = at::empty({s.channels}, acc_options);
      launch_batch_norm_coeffs<acc_t, param_t>(sum_dy, sum_dy_xmu, invstd, weight, s.channels, count, nullptr, nullptr,
                                               coef_g.mutable_data_ptr<acc_t>(), coef_xmu.mutable_data_ptr<acc_t>());
      launch_grad_input<scalar_t, param_t, acc_t>(channels_last, dy, x, grad_input, mean, invstd, weight, coef_g,
                                                  coef_xmu, s.channels, s.spatial, 0, 1);
    });
  });
  return grad_input;
}

}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("batch_norm_stats", &cnnops::batch_norm_stats_cuda);
  m.impl("batch_norm_elemt", &cnnops::batch_norm_elemt_cuda);
  m.impl("batch_norm_backward_elemt", &cnnops::batch_norm_backward_elemt_cuda);
}
