// Batch, layer and group norm on CUDA (instance norm is group norm with num_groups = C).
// Statistics are one-pass Welford merged with Chan's formula; every reduction runs in two
// stages (per-block partials, then a fixed-order merge), so results are bitwise reproducible
// and there are no atomics. Which kernels each op launches is described in norm_kernels.cuh.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../common/norm_checks.h"
#include "../common/norm_cuda_math.h"
#include "../common/norm_math.h"
#include "norm_kernels.cuh"
#include "norm_launch.cuh"

namespace cnnops {

using namespace norm;

// ---------------------------------------------------------------------------------------------
// Batch norm
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(const at::Tensor& input_,
                                                                       const c10::optional<at::Tensor>& weight_,
                                                                       const c10::optional<at::Tensor>& bias_,
                                                                       const c10::optional<at::Tensor>& running_mean_,
                                                                       const c10::optional<at::Tensor>& running_var_,
                                                                       bool training, double momentum, double eps) {
  const char* op = "batch_norm_forward()";
  const ChannelNormShape s = check_batch_norm_input(op, input_);
  TORCH_CHECK(input_.is_cuda(), op, ": expected a CUDA input");
  check_batch_norm_param(op, "weight", weight_, input_, s);
  check_batch_norm_param(op, "bias", bias_, input_, s);
  check_batch_norm_param(op, "running_mean", running_mean_, input_, s);
  check_batch_norm_param(op, "running_var", running_var_, input_, s);
  const bool has_rm = running_mean_.has_value() && running_mean_->defined();
  const bool has_rv = running_var_.has_value() && running_var_->defined();
  TORCH_CHECK(has_rm == has_rv, op, ": running_mean and running_var must be given together");
  TORCH_CHECK(training || has_rm, op, ": running_mean and running_var must be given when training=False");
  const bool mixed = params_are_mixed(
      op, input_,
      {{"weight", &weight_}, {"bias", &bias_}, {"running_mean", &running_mean_}, {"running_var", &running_var_}});
  c10::cuda::OptionalCUDAGuard guard(input_.device());

  const at::MemoryFormat format = kernel_memory_format(input_);
  const bool channels_last = format != at::MemoryFormat::Contiguous;
  const at::Tensor x = input_.contiguous(format);
  const at::Tensor weight = defined_contiguous(weight_), bias = defined_contiguous(bias_);
  // Running stats are updated in place; a non-contiguous one is updated through a copy.
  at::Tensor running_mean = has_rm ? running_mean_->contiguous() : at::Tensor();
  at::Tensor running_var = has_rv ? running_var_->contiguous() : at::Tensor();
  at::Tensor output = at::empty(x.sizes(), x.options().memory_format(format));
  const auto acc_options = input_.options().dtype(norm_stat_dtype(input_));
  at::Tensor mean = at::empty({s.channels}, acc_options), invstd = at::empty({s.channels}, acc_options);
  if (s.channels == 0) return {output, mean, invstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    with_param_type<scalar_t>(mixed, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      if (training) {
        // Statistics per channel over N x spatial (formulas.md §Norm statistics: mu, sigma are 1 x C x 1 x 1).
        const WelfordOp<scalar_t, acc_t> welford{x.const_data_ptr<scalar_t>()};
        const ChannelPartials r = reduce_per_channel<acc_t>(welford, 3, channels_last, s.batch, s.channels, s.spatial,
                                                            acc_options, x.numel(), op);
        finalize_stats<acc_t, param_t>(r.p, r.pi, s.channels, mean, invstd, mutable_ptr_or_null<param_t>(running_mean),
                                       mutable_ptr_or_null<param_t>(running_var), momentum, eps);
      } else {
        running_stats_kernel<acc_t, param_t>
            <<<grid_for(s.channels, kSmallThreads), kSmallThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                running_mean.const_data_ptr<param_t>(), running_var.const_data_ptr<param_t>(), s.channels,
                mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(), static_cast<acc_t>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      launch_normalize<scalar_t, param_t, acc_t>(channels_last, x, output, mean, invstd, weight, bias, s.channels,
                                                 s.spatial, 0, 1);
    });
  });
  if (training && has_rm) {
    if (!running_mean.is_same(*running_mean_)) running_mean_->copy_(running_mean);
    if (!running_var.is_same(*running_var_)) running_var_->copy_(running_var);
  }
  return {output, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const c10::optional<at::Tensor>& weight_,
    const at::Tensor& mean_, const at::Tensor& invstd_, bool training, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_backward()";
  const ChannelNormShape s = check_batch_norm_input(op, input_);
  TORCH_CHECK(input_.is_cuda(), op, ": expected a CUDA input");
  check_norm_grad_output(op, grad_output_, input_);
  check_batch_norm_param(op, "weight", weight_, input_, s);
  check_norm_stat(op, "mean", mean_, {s.channels}, input_);
  check_norm_stat(op, "invstd", invstd_, {s.channels}, input_);
  const bool mixed = params_are_mixed(op, input_, {{"weight", &weight_}});
  c10::cuda::OptionalCUDAGuard guard(input_.device());

  const at::MemoryFormat format = kernel_memory_format(input_);
  const bool channels_last = format != at::MemoryFormat::Contiguous;
  const at::Tensor x = input_.contiguous(format);
  const at::Tensor dy = grad_output_.contiguous(format);
  const at::Tensor weight = defined_contiguous(weight_);
  const at::Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const auto acc_options = input_.options().dtype(norm_stat_dtype(input_));
  const auto p_options = param_options(input_, mixed);

  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = at::empty(x.sizes(), x.options().memory_format(format));
  if (output_mask[1]) grad_weight = at::empty({s.channels}, p_options);
  if (output_mask[2]) grad_bias = at::empty({s.channels}, p_options);
  const bool need_sums = output_mask[1] || output_mask[2] || (output_mask[0] && training);
  if (x.numel() == 0) {  // batch 0: parameter gradients are empty sums
    if (output_mask[1]) grad_weight.zero_();
    if (output_mask[2]) grad_bias.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      with_param_type<scalar_t>(mixed, [&](auto tag) {
        using param_t = typename decltype(tag)::type;
        at::Tensor coef_g, coef_xmu;
        if (need_sums) {
          // sum(dy) and sum(dy * (x - mean)) per channel.
          const GradSumsOp<scalar_t, param_t, acc_t> sums{dy.const_data_ptr<scalar_t>(),
                                                          x.const_data_ptr<scalar_t>(),
                                                          mean.const_data_ptr<acc_t>(),
                                                          invstd.const_data_ptr<acc_t>(),
                                                          nullptr,
                                                          0,
                                                          1,
                                                          false};
          const ChannelPartials r = reduce_per_channel<acc_t>(sums, 2, channels_last, s.batch, s.channels, s.spatial,
                                                              acc_options, x.numel(), op);
          auto [sum_a, sum_b] = finalize_sums<acc_t>(r.p, r.pi, s.channels, acc_options);
          if (output_mask[0] && training) {
            coef_g = at::empty({s.channels}, acc_options);
            coef_xmu = at::empty({s.channels}, acc_options);
          }
          launch_batch_norm_coeffs<acc_t, param_t>(
              sum_a, sum_b, invstd, weight, s.channels, s.batch * s.spatial, mutable_ptr_or_null<param_t>(grad_weight),
              mutable_ptr_or_null<param_t>(grad_bias), mutable_ptr_or_null<acc_t>(coef_g),
              mutable_ptr_or_null<acc_t>(coef_xmu));
        }
        if (output_mask[0]) {
          launch_grad_input<scalar_t, param_t, acc_t>(channels_last, dy, x, grad_input, mean, invstd, weight, coef_g,
                                                      coef_xmu, s.channels, s.spatial, 0, 1);
        }
      });
    });
  }
  return {output_mask[0] ? grad_input : norm_unselected(input_), output_mask[1] ? grad_weight : norm_unselected(input_),
          output_mask[2] ? grad_bias : norm_unselected(input_)};
}

// ---------------------------------------------------------------------------------------------
// Layer norm
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cuda(const at::Tensor& input_,
                                                                       c10::IntArrayRef normalized_shape,
                                                                       const c10::optional<at::Tensor>& weight_,
                                                                       const c10::optional<at::Tensor>& bias_,
                                                                       double eps) {
  const char* op = "layer_norm_forward()";
  const RowNormShape s = check_layer_norm_input(op, input_, normalized_shape);
  TORCH_CHECK(input_.is_cuda(), op, ": expected a CUDA input");
  check_layer_norm_param(op, "weight", weight_, input_, normalized_shape);
  check_layer_norm_param(op, "bias", bias_, input_, normalized_shape);
  const bool mixed = params_are_mixed(op, input_, {{"weight", &weight_}, {"bias", &bias_}});
  c10::cuda::OptionalCUDAGuard guard(input_.device());

  const at::Tensor x = input_.contiguous();
  const at::Tensor weight = defined_contiguous(weight_), bias = defined_contiguous(bias_);
  at::Tensor output = at::empty(x.sizes(), x.options());
  const auto acc_options = input_.options().dtype(norm_stat_dtype(input_));
  const auto stat_shape = layer_norm_stat_shape(input_, normalized_shape);
  at::Tensor mean = at::empty(stat_shape, acc_options), invstd = at::empty(stat_shape, acc_options);
  if (s.rows == 0) return {output, mean, invstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    with_param_type<scalar_t>(mixed, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      // Statistics per row (formulas.md §Norm statistics: mu, sigma are N x 1).
      const WelfordOp<scalar_t, acc_t> welford{x.const_data_ptr<scalar_t>()};
      const Partials p = reduce_planes<acc_t>(welford, 3, 1, s.rows, s.cols, acc_options, x.numel(), op);
      finalize_stats<acc_t, param_t>(p, planes_partials(p.chunks), s.rows, mean, invstd, nullptr, nullptr, 0.0, eps);
      launch_normalize<scalar_t, param_t, acc_t>(true, x, output, mean, invstd, weight, bias, s.cols, 1, 1, s.cols);
    });
  });
  return {output, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, c10::IntArrayRef normalized_shape,
    const at::Tensor& mean_, const at::Tensor& invstd_, const c10::optional<at::Tensor>& weight_,
    std::array<bool, 3> output_mask) {
  const char* op = "layer_norm_backward()";
  const RowNormShape s = check_layer_norm_input(op, input_, normalized_shape);
  TORCH_CHECK(input_.is_cuda(), op, ": expected a CUDA input");
  check_norm_grad_output(op, grad_output_, input_);
  check_layer_norm_param(op, "weight", weight_, input_, normalized_shape);
  const auto stat_shape = layer_norm_stat_shape(input_, normalized_shape);
  check_norm_stat(op, "mean", mean_, stat_shape, input_);
  check_norm_stat(op, "invstd", invstd_, stat_shape, input_);
  const bool mixed = params_are_mixed(op, input_, {{"weight", &weight_}});
  c10::cuda::OptionalCUDAGuard guard(input_.device());

  const at::Tensor x = input_.contiguous(), dy = grad_output_.contiguous();
  const at::Tensor weight = defined_contiguous(weight_);
  const at::Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const auto acc_options = input_.options().dtype(norm_stat_dtype(input_));
  const auto p_options = param_options(input_, mixed);

  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = at::empty(x.sizes(), x.options());
  if (output_mask[1]) grad_weight = at::empty(normalized_shape, p_options);
  if (output_mask[2]) grad_bias = at::empty(normalized_shape, p_options);
  const bool param_grads = (output_mask[1] || output_mask[2]) && s.cols > 0;
  if (param_grads && s.rows == 0) {  // nothing to sum over
    if (output_mask[1]) grad_weight.zero_();
    if (output_mask[2]) grad_bias.zero_();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    with_param_type<scalar_t>(mixed, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      if (output_mask[0] && x.numel() > 0) {
        // Per row: sum(dy * w) and sum(dy * w * (x - mean)).
        const GradSumsOp<scalar_t, param_t, acc_t> sums{dy.const_data_ptr<scalar_t>(),
                                                        x.const_data_ptr<scalar_t>(),
                                                        mean.const_data_ptr<acc_t>(),
                                                        invstd.const_data_ptr<acc_t>(),
                                                        ptr_or_null<param_t>(weight),
                                                        0,
                                                        1,
                                                        false};
        const Partials p = reduce_planes<acc_t>(sums, 2, 1, s.rows, s.cols, acc_options, x.numel(), op);
        auto [sum_a, sum_b] = finalize_sums<acc_t>(p, planes_partials(p.chunks), s.rows, acc_options);
        at::Tensor coef_g = at::empty({s.rows}, acc_options), coef_xmu = at::empty({s.rows}, acc_options);
        layer_norm_coeffs_kernel<acc_t>
            <<<grid_for(s.rows, kSmallThreads), kSmallThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                sum_a.const_data_ptr<acc_t>(), sum_b.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), s.rows,
                static_cast<acc_t>(s.cols), coef_g.mutable_data_ptr<acc_t>(), coef_xmu.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_grad_input<scalar_t, param_t, acc_t>(true, dy, x, grad_input, mean, invstd, weight, coef_g, coef_xmu,
                                                    s.cols, 1, 1, s.cols);
      }
      if (param_grads && s.rows > 0) {
        // Per column, over rows, in two stages: dbias = sum(dy), dweight = sum(dy * xhat).
        const GradSumsOp<scalar_t, param_t, acc_t> sums{dy.const_data_ptr<scalar_t>(),
                                                        x.const_data_ptr<scalar_t>(),
                                                        mean.const_data_ptr<acc_t>(),
                                                        invstd.const_data_ptr<acc_t>(),
                                                        nullptr,
                                                        0,
                                                        1,
                                                        true};
        const Partials p = reduce_columns<acc_t>(sums, 2, 1, s.rows, s.cols, acc_options, x.numel(), op);
        auto [sum_a, sum_b] =
            finalize_sums<acc_t>(p, columns_partials(p.chunks, s.cols, s.cols, 1), s.cols, acc_options);
        cast_pair_kernel<acc_t, param_t>
            <<<grid_for(s.cols, kSmallThreads), kSmallThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                sum_a.const_data_ptr<acc_t>(), sum_b.const_data_ptr<acc_t>(), s.cols,
                mutable_ptr_or_null<param_t>(grad_weight), mutable_ptr_or_null<param_t>(grad_bias));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {output_mask[0] ? grad_input : norm_unselected(input_), output_mask[1] ? grad_weight : norm_unselected(input_),
          output_mask[2] ? grad_bias : norm_unselected(input_)};
}

// ---------------------------------------------------------------------------------------------
// Group norm (and instance norm, num_groups = C)
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward_cuda(const at::Tensor& input_,
                                                                       const c10::optional<at::Tensor>& weight_,
                                                                       const c10::optional<at::Tensor>& bias_,
                                                                       int64_t num_groups, double eps) {
  const char* op = "group_norm_forward()";
  const ChannelNormShape s = check_group_norm_input(op, input_, num_groups);
  TORCH_CHECK(input_.is_cuda(), op, ": expected a CUDA input");
  check_group_norm_param(op, "weight", weight_, input_, s);
  check_group_norm_param(op, "bias", bias_, input_, s);
  const bool mixed = params_are_mixed(op, input_, {{"weight", &weight_}, {"bias", &bias_}});
  c10::cuda::OptionalCUDAGuard guard(input_.device());

  const at::MemoryFormat format = kernel_memory_format(input_);
  const bool channels_last = format != at::MemoryFormat::Contiguous;
  const at::Tensor x = input_.contiguous(format);
  const at::Tensor weight = defined_contiguous(weight_), bias = defined_contiguous(bias_);
  at::Tensor output = at::empty(x.sizes(), x.options().memory_format(format));
  const auto acc_options = input_.options().dtype(norm_stat_dtype(input_));
  const int64_t groups = s.groups, per_group = s.channels_per_group();
  at::Tensor mean = at::empty({s.batch, groups}, acc_options), invstd = at::empty({s.batch, groups}, acc_options);
  if (s.batch == 0) return {output, mean, invstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    with_param_type<scalar_t>(mixed, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      // Statistics per (n, group) over (C / G) x spatial values (formulas.md §Norm statistics;
      // instance norm, mu, sigma N x C x 1 x 1, is G = C).
      const WelfordOp<scalar_t, acc_t> welford{x.const_data_ptr<scalar_t>()};
      Partials p;
      PartialIndex pi;
      if (channels_last && x.numel() > 0) {
        // Per (n, c) over spatial, threads along channels; the second stage merges the group's
        // channels (and chunks) of each (n, g).
        p = reduce_columns<acc_t>(welford, 3, s.batch, s.spatial, s.channels, acc_options, x.numel(), op);
        pi = columns_partials(p.chunks, s.channels, groups, per_group);
      } else {
        // NCHW: each (n, g) is one contiguous run of (C / G) * spatial values.
        p = reduce_planes<acc_t>(welford, 3, 1, s.batch * groups, per_group * s.spatial, acc_options, x.numel(), op);
        pi = planes_partials(p.chunks);
      }
      finalize_stats<acc_t, param_t>(p, pi, s.batch * groups, mean, invstd, nullptr, nullptr, 0.0, eps);
      launch_normalize<scalar_t, param_t, acc_t>(channels_last, x, output, mean, invstd, weight, bias, s.channels,
                                                 s.spatial, groups, per_group);
    });
  });
  return {output, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& mean_, const at::Tensor& invstd_,
    const c10::optional<at::Tensor>& weight_, int64_t num_groups, std::array<bool, 3> output_mask) {
  const char* op = "group_norm_backward()";
  const ChannelNormShape s = check_group_norm_input(op, input_, num_groups);
  TORCH_CHECK(input_.is_cuda(), op, ": expected a CUDA input");
  check_norm_grad_output(op, grad_output_, input_);
  check_group_norm_param(op, "weight", weight_, input_, s);
  check_norm_stat(op, "mean", mean_, {s.batch, s.groups}, input_);
  check_norm_stat(op, "invstd", invstd_, {s.batch, s.groups}, input_);
  const bool mixed = params_are_mixed(op, input_, {{"weight", &weight_}});
  c10::cuda::OptionalCUDAGuard guard(input_.device());

  const at::MemoryFormat format = kernel_memory_format(input_);
  const bool channels_last = format != at::MemoryFormat::Contiguous;
  const at::Tensor x = input_.contiguous(format);
  const at::Tensor dy = grad_output_.contiguous(format);
  const at::Tensor weight = defined_contiguous(weight_);
  const at::Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const auto acc_options = input_.options().dtype(norm_stat_dtype(input_));
  const auto p_options = param_options(input_, mixed);
  const int64_t groups = s.groups, per_group = s.channels_per_group();

  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = at::empty(x.sizes(), x.options().memory_format(format));
  if (output_mask[1]) grad_weight = at::empty({s.channels}, p_options);
  if (output_mask[2]) grad_bias = at::empty({s.channels}, p_options);
  if (x.numel() == 0) {  // batch 0 or no spatial values: parameter gradients are empty sums
    if (output_mask[1]) grad_weight.zero_();
    if (output_mask[2]) grad_bias.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      with_param_type<scalar_t>(mixed, [&](auto tag) {
        using param_t = typename decltype(tag)::type;
        // Per (n, c): sum_l dy and sum_l dy * (x - mean[n, g(c)]).
        const GradSumsOp<scalar_t, param_t, acc_t> sums{dy.const_data_ptr<scalar_t>(),
                                                        x.const_data_ptr<scalar_t>(),
                                                        mean.const_data_ptr<acc_t>(),
                                                        invstd.const_data_ptr<acc_t>(),
                                                        nullptr,
                                                        groups,
                                                        per_group,
                                                        false};
        Partials p;
        PartialIndex pi;
        if (channels_last) {
          p = reduce_columns<acc_t>(sums, 2, s.batch, s.spatial, s.channels, acc_options, x.numel(), op);
          pi = columns_partials(p.chunks, s.channels, s.channels, 1);
        } else {
          // Planes (n, c) of the [1][N * C][spatial] view; statistic of plane p is p / (C / G).
          p = reduce_planes<acc_t>(sums, 2, 1, s.batch * s.channels, s.spatial, acc_options, x.numel(), op);
          pi = planes_partials(p.chunks);
        }
        auto [sum_a, sum_b] = finalize_sums<acc_t>(p, pi, s.batch * s.channels, acc_options);
        const auto stream = at::cuda::getCurrentCUDAStream();
        if (output_mask[0]) {
          at::Tensor coef_g = at::empty({s.batch * groups}, acc_options);
          at::Tensor coef_xmu = at::empty({s.batch * groups}, acc_options);
          group_norm_coeffs_kernel<acc_t, param_t>
              <<<grid_for(s.batch * groups, kSmallThreads), kSmallThreads, 0, stream>>>(
                  sum_a.const_data_ptr<acc_t>(), sum_b.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                  ptr_or_null<param_t>(weight), s.batch, s.channels, groups, static_cast<acc_t>(per_group * s.spatial),
                  coef_g.mutable_data_ptr<acc_t>(), coef_xmu.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          launch_grad_input<scalar_t, param_t, acc_t>(channels_last, dy, x, grad_input, mean, invstd, weight, coef_g,
                                                      coef_xmu, s.channels, s.spatial, groups, per_group);
        }
        if (output_mask[1] || output_mask[2]) {
          group_norm_param_grads_kernel<acc_t, param_t>
              <<<grid_for(s.channels, kSmallThreads), kSmallThreads, 0, stream>>>(
                  sum_a.const_data_ptr<acc_t>(), sum_b.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), s.batch,
                  s.channels, groups, mutable_ptr_or_null<param_t>(grad_weight),
                  mutable_ptr_or_null<param_t>(grad_bias));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  }
  return {output_mask[0] ? grad_input : norm_unselected(input_), output_mask[1] ? grad_weight : norm_unselected(input_),
          output_mask[2] ? grad_bias : norm_unselected(input_)};
}

}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("batch_norm_forward", &cnnops::batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &cnnops::batch_norm_backward_cuda);
  m.impl("layer_norm_forward", &cnnops::layer_norm_forward_cuda);
  m.impl("layer_norm_backward", &cnnops::layer_norm_backward_cuda);
  m.impl("group_norm_forward", &cnnops::group_norm_forward_cuda);
  m.impl("group_norm_backward", &cnnops::group_norm_backward_cuda);
}
