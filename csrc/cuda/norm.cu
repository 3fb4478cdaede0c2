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

namespace cnnops {
namespace {

using namespace norm;

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int kSmallThreads = 256;  // per-statistic kernels

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Every offset a kernel forms is below the numel of the tensor it indexes; the margin covers
// thread indices that run past the end of the last block or grid-stride step (< 2^24).
bool fits_int32(int64_t numel) {
  return numel <= std::numeric_limits<int32_t>::max() - (int64_t{1} << 25);
}

unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, threads), 65536)));
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<param_t>{}) with the parameters' C++ type: the input's, or float for a half or
// bfloat16 input with float parameters (mixed precision).
template <typename scalar_t, typename F>
void with_param_type(bool float_params, F&& f) {
  using acc_t = at::acc_type<scalar_t, true>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    f(TypeTag<scalar_t>{});
  } else {
    if (float_params) f(TypeTag<acc_t>{});
    else f(TypeTag<scalar_t>{});
  }
}

// All given parameters share one dtype (each was checked to be the input's or float); returns
// whether that dtype differs from the input's.
bool params_are_mixed(const char* op, const at::Tensor& input,
                      std::initializer_list<std::pair<const char*, const c10::optional<at::Tensor>*>> params) {
  const char* first_name = nullptr;
  at::ScalarType first = input.scalar_type();
  for (const auto& [name, p] : params) {
    if (!p->has_value() || !(*p)->defined()) continue;
    if (first_name == nullptr) {
      first_name = name;
      first = (*p)->scalar_type();
    }
    TORCH_CHECK((*p)->scalar_type() == first, op, ": expected ", name, " to have the dtype of ",
                first_name, " (", first, "), but got ", (*p)->scalar_type());
  }
  return first != input.scalar_type();
}

// channels_last kernels for 4-d and 5-d inputs whose strides suggest it; NCHW otherwise.
at::MemoryFormat kernel_memory_format(const at::Tensor& input) {
  const at::MemoryFormat suggested = input.suggest_memory_format();
  if (input.dim() == 4 && suggested == at::MemoryFormat::ChannelsLast) return suggested;
  if (input.dim() == 5 && suggested == at::MemoryFormat::ChannelsLast3d) return suggested;
  return at::MemoryFormat::Contiguous;
}

at::Tensor defined_contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mutable_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Two-stage reductions
// ---------------------------------------------------------------------------------------------

// First-stage partial results: `fields` arrays of `count` accumulators, plus how to find the
// partials of one statistic (filled in by the caller, which knows what a statistic is).
struct Partials {
  at::Tensor buffer;
  int64_t count = 0;
  int64_t chunks = 1;
};

// Planes view [outer][channels][inner]: one partial per (channel, chunk), at channel * chunks + chunk.
template <typename acc_t, typename Op>
Partials reduce_planes(const Op& op, int fields, int64_t outer, int64_t channels, int64_t inner,
                       const at::TensorOptions& acc_options, int64_t numel) {
  TORCH_CHECK_NOT_IMPLEMENTED(channels <= kMaxGridX, "cnnops normalization (CUDA): too many statistics (",
                              channels, ") for one grid");
  const PlanesConfig cfg = planes_config(outer, channels, inner);
  Partials p;
  p.chunks = cfg.chunks;
  p.count = channels * p.chunks;
  p.buffer = at::empty({fields * p.count}, acc_options);
  const int64_t chunk_len = cfg.chunk_len;
  const int threads = cfg.threads;
  const dim3 grid(static_cast<unsigned>(channels), static_cast<unsigned>(p.chunks));
  const auto stream = at::cuda::getCurrentCUDAStream();
  acc_t* out = p.buffer.mutable_data_ptr<acc_t>();
  if (fits_int32(numel)) {
    reduce_planes_kernel<Op, acc_t, int32_t><<<grid, threads, 0, stream>>>(
        op, out, static_cast<int32_t>(outer), static_cast<int32_t>(channels),
        static_cast<int32_t>(inner), static_cast<int32_t>(chunk_len), p.count);
  } else {
    reduce_planes_kernel<Op, acc_t, int64_t><<<grid, threads, 0, stream>>>(op, out, outer, channels, inner,
                                                                           chunk_len, p.count);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

// Columns view [batch][rows][cols]: one partial per (b, chunk, col), at (b * chunks + chunk) * cols + col.
template <typename acc_t, typename Op>
Partials reduce_columns(const Op& op, int fields, int64_t batch, int64_t rows, int64_t cols,
                        const at::TensorOptions& acc_options, int64_t numel) {
  const ColumnsConfig cfg = columns_config(batch, rows, cols);
  TORCH_CHECK_NOT_IMPLEMENTED(cfg.col_blocks <= kMaxGridX, "cnnops normalization (CUDA): too many channels (",
                              cols, ") for one grid");
  Partials p;
  p.chunks = cfg.chunks;
  p.count = batch * p.chunks * cols;
  p.buffer = at::empty({fields * p.count}, acc_options);
  const int64_t chunk_len = cfg.chunk_len;
  const dim3 grid(static_cast<unsigned>(cfg.col_blocks), static_cast<unsigned>(p.chunks),
                  static_cast<unsigned>(cfg.grid_z));
  const dim3 block(kColumnThreadsX, kColumnThreadsY);
  const auto stream = at::cuda::getCurrentCUDAStream();
  acc_t* out = p.buffer.mutable_data_ptr<acc_t>();
  if (fits_int32(numel)) {
    reduce_columns_kernel<Op, acc_t, int32_t><<<grid, block, 0, stream>>>(
        op, out, static_cast<int32_t>(batch), static_cast<int32_t>(rows), static_cast<int32_t>(cols),
        static_cast<int32_t>(chunk_len), p.count);
  } else {
    reduce_columns_kernel<Op, acc_t, int64_t><<<grid, block, 0, stream>>>(op, out, batch, rows, cols,
                                                                          chunk_len, p.count);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

template <typename acc_t, typename param_t>
void finalize_stats(const Partials& p, const PartialIndex& pi, int64_t outputs, at::Tensor& mean,
                    at::Tensor& invstd, param_t* running_mean, param_t* running_var, double momentum,
                    double eps) {
  welford_finalize_kernel<acc_t, param_t>
      <<<grid_for(outputs, kSmallThreads), kSmallThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          p.buffer.const_data_ptr<acc_t>(), p.count, pi, outputs, mean.mutable_data_ptr<acc_t>(),
          invstd.mutable_data_ptr<acc_t>(), running_mean, running_var, static_cast<acc_t>(momentum),
          static_cast<acc_t>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Merged gradient sums (sum_a, sum_b) of `outputs` statistics, as two acc tensors.
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> finalize_sums(const Partials& p, const PartialIndex& pi, int64_t outputs,
                                                const at::TensorOptions& acc_options) {
  at::Tensor sum_a = at::empty({outputs}, acc_options), sum_b = at::empty({outputs}, acc_options);
  sums_finalize_kernel<acc_t><<<grid_for(outputs, kSmallThreads), kSmallThreads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(
      p.buffer.const_data_ptr<acc_t>(), p.count, pi, outputs, sum_a.mutable_data_ptr<acc_t>(),
      sum_b.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum_a, sum_b};
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename param_t, typename acc_t>
void launch_normalize(bool channels_last, const at::Tensor& x, at::Tensor& y, const at::Tensor& mean,
                      const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                      int64_t channels, int64_t inner, int64_t stats_per_sample, int64_t channels_per_stat) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const unsigned blocks = grid_for(numel, kElementwiseThreads);
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const NormIndex<index_t> ix(static_cast<index_t>(channels), static_cast<index_t>(inner),
                                static_cast<index_t>(stats_per_sample), static_cast<index_t>(channels_per_stat));
    auto kernel = channels_last ? normalize_kernel<true, scalar_t, param_t, acc_t, index_t>
                                : normalize_kernel<false, scalar_t, param_t, acc_t, index_t>;
    kernel<<<blocks, kElementwiseThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
        invstd.const_data_ptr<acc_t>(), ptr_or_null<param_t>(weight), ptr_or_null<param_t>(bias), ix,
        static_cast<index_t>(numel));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (fits_int32(numel)) launch(int32_t{});
  else launch(int64_t{});
}

template <typename scalar_t, typename param_t, typename acc_t>
void launch_grad_input(bool channels_last, const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx,
                       const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                       const at::Tensor& coef_a, const at::Tensor& coef_b, int64_t channels, int64_t inner,
                       int64_t stats_per_sample, int64_t channels_per_stat) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const unsigned blocks = grid_for(numel, kElementwiseThreads);
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const NormIndex<index_t> ix(static_cast<index_t>(channels), static_cast<index_t>(inner),
                                static_cast<index_t>(stats_per_sample), static_cast<index_t>(channels_per_stat));
    auto kernel = channels_last ? grad_input_kernel<true, scalar_t, param_t, acc_t, index_t>
                                : grad_input_kernel<false, scalar_t, param_t, acc_t, index_t>;
    kernel<<<blocks, kElementwiseThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
        mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), ptr_or_null<param_t>(weight),
        ptr_or_null<acc_t>(coef_a), ptr_or_null<acc_t>(coef_b), ix, static_cast<index_t>(numel));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (fits_int32(numel)) launch(int32_t{});
  else launch(int64_t{});
}

at::TensorOptions param_options(const at::Tensor& input, bool mixed) {
  return input.options().dtype(mixed ? at::kFloat : input.scalar_type());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Batch norm
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(
    const at::Tensor& input_, const c10::optional<at::Tensor>& weight_, const c10::optional<at::Tensor>& bias_,
    const c10::optional<at::Tensor>& running_mean_, const c10::optional<at::Tensor>& running_var_,
    bool training, double momentum, double eps) {
  const char* op = "cnnops.batch_norm_forward";
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
  const bool mixed = params_are_mixed(op, input_, {{"weight", &weight_}, {"bias", &bias_},
                                                   {"running_mean", &running_mean_}, {"running_var", &running_var_}});
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
        // Statistics per channel over N x spatial (lecture, batch norm for ConvNets: mu, sigma are 1 x C x 1 x 1).
        const WelfordOp<scalar_t, acc_t> welford{x.const_data_ptr<scalar_t>()};
        Partials p;
        PartialIndex pi;
        if (channels_last || s.spatial == 1) {  // [N * spatial][C]: channels contiguous
          p = reduce_columns<acc_t>(welford, 3, 1, s.batch * s.spatial, s.channels,
                                                       acc_options, x.numel());
          pi = columns_partials(p.chunks, s.channels, s.channels, 1);
        } else {
          p = reduce_planes<acc_t>(welford, 3, s.batch, s.channels, s.spatial,
                                                      acc_options, x.numel());
          pi = planes_partials(p.chunks);
        }
        finalize_stats<acc_t, param_t>(p, pi, s.channels, mean, invstd, mutable_ptr_or_null<param_t>(running_mean),
                                       mutable_ptr_or_null<param_t>(running_var), momentum, eps);
      } else {
        running_stats_kernel<acc_t, param_t><<<grid_for(s.channels, kSmallThreads), kSmallThreads, 0,
                                               at::cuda::getCurrentCUDAStream()>>>(
            running_mean.const_data_ptr<param_t>(), running_var.const_data_ptr<param_t>(), s.channels,
            mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(), static_cast<acc_t>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      launch_normalize<scalar_t, param_t, acc_t>(channels_last, x, output, mean, invstd, weight, bias,
                                                 s.channels, s.spatial, 0, 1);
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
  const char* op = "cnnops.batch_norm_backward";
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
        at::Tensor coef_a, coef_b;
        if (need_sums) {
          // sum(dy) and sum(dy * (x - mean)) per channel.
          const GradSumsOp<scalar_t, param_t, acc_t> sums{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                          mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                                          nullptr, 0, 1, false};
          Partials p;
          PartialIndex pi;
          if (channels_last || s.spatial == 1) {
            p = reduce_columns<acc_t>(sums, 2, 1, s.batch * s.spatial, s.channels, acc_options,
                                                      x.numel());
            pi = columns_partials(p.chunks, s.channels, s.channels, 1);
          } else {
            p = reduce_planes<acc_t>(sums, 2, s.batch, s.channels, s.spatial, acc_options, x.numel());
            pi = planes_partials(p.chunks);
          }
          auto [sum_a, sum_b] = finalize_sums<acc_t>(p, pi, s.channels, acc_options);
          if (output_mask[0] && training) {
            coef_a = at::empty({s.channels}, acc_options);
            coef_b = at::empty({s.channels}, acc_options);
          }
          const int64_t m = s.batch * s.spatial;
          batch_norm_coeffs_kernel<acc_t, param_t><<<grid_for(s.channels, kSmallThreads), kSmallThreads, 0,
                                                     at::cuda::getCurrentCUDAStream()>>>(
              sum_a.const_data_ptr<acc_t>(), sum_b.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
              ptr_or_null<param_t>(weight), s.channels, m > 0 ? acc_t(1) / static_cast<acc_t>(m) : acc_t(0),
              mutable_ptr_or_null<param_t>(grad_weight), mutable_ptr_or_null<param_t>(grad_bias),
              mutable_ptr_or_null<acc_t>(coef_a), mutable_ptr_or_null<acc_t>(coef_b));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (output_mask[0]) {
          launch_grad_input<scalar_t, param_t, acc_t>(channels_last, dy, x, grad_input, mean, invstd, weight,
                                                      coef_a, coef_b, s.channels, s.spatial, 0, 1);
        }
      });
    });
  }
  return {output_mask[0] ? grad_input : norm_unselected(input_),
          output_mask[1] ? grad_weight : norm_unselected(input_),
          output_mask[2] ? grad_bias : norm_unselected(input_)};
}

// ---------------------------------------------------------------------------------------------
// Layer norm
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cuda(
    const at::Tensor& input_, c10::IntArrayRef normalized_shape, const c10::optional<at::Tensor>& weight_,
    const c10::optional<at::Tensor>& bias_, double eps) {
  const char* op = "cnnops.layer_norm_forward";
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
      // Statistics per row (lecture, layer norm: mu, sigma are N x 1, one per sample).
      const WelfordOp<scalar_t, acc_t> welford{x.const_data_ptr<scalar_t>()};
      const Partials p = reduce_planes<acc_t>(welford, 3, 1, s.rows, s.cols, acc_options,
                                                                 x.numel());
      finalize_stats<acc_t, param_t>(p, planes_partials(p.chunks), s.rows, mean, invstd, nullptr, nullptr, 0.0, eps);
      launch_normalize<scalar_t, param_t, acc_t>(true, x, output, mean, invstd, weight, bias, s.cols, 1, 1,
                                                 s.cols);
    });
  });
  return {output, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, c10::IntArrayRef normalized_shape,
    const at::Tensor& mean_, const at::Tensor& invstd_, const c10::optional<at::Tensor>& weight_,
    std::array<bool, 3> output_mask) {
  const char* op = "cnnops.layer_norm_backward";
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
        const GradSumsOp<scalar_t, param_t, acc_t> sums{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                        mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                                        ptr_or_null<param_t>(weight), 0, 1, false};
        const Partials p = reduce_planes<acc_t>(sums, 2, 1, s.rows, s.cols, acc_options, x.numel());
        auto [sum_a, sum_b] = finalize_sums<acc_t>(p, planes_partials(p.chunks), s.rows, acc_options);
        at::Tensor coef_a = at::empty({s.rows}, acc_options), coef_b = at::empty({s.rows}, acc_options);
        layer_norm_coeffs_kernel<acc_t><<<grid_for(s.rows, kSmallThreads), kSmallThreads, 0,
                                          at::cuda::getCurrentCUDAStream()>>>(
            sum_a.const_data_ptr<acc_t>(), sum_b.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), s.rows,
            acc_t(1) / static_cast<acc_t>(s.cols), coef_a.mutable_data_ptr<acc_t>(), coef_b.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_grad_input<scalar_t, param_t, acc_t>(true, dy, x, grad_input, mean, invstd, weight, coef_a, coef_b,
                                                    s.cols, 1, 1, s.cols);
      }
      if (param_grads && s.rows > 0) {
        // Per column, over rows, in two stages: dbias = sum(dy), dweight = sum(dy * xhat).
        const GradSumsOp<scalar_t, param_t, acc_t> sums{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                        mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                                        nullptr, 0, 1, true};
        const Partials p = reduce_columns<acc_t>(sums, 2, 1, s.rows, s.cols, acc_options, x.numel());
        auto [sum_a, sum_b] = finalize_sums<acc_t>(p, columns_partials(p.chunks, s.cols, s.cols, 1), s.cols, acc_options);
        cast_pair_kernel<acc_t, param_t><<<grid_for(s.cols, kSmallThreads), kSmallThreads, 0,
                                           at::cuda::getCurrentCUDAStream()>>>(
            sum_a.const_data_ptr<acc_t>(), sum_b.const_data_ptr<acc_t>(), s.cols,
            mutable_ptr_or_null<param_t>(grad_weight), mutable_ptr_or_null<param_t>(grad_bias));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {output_mask[0] ? grad_input : norm_unselected(input_),
          output_mask[1] ? grad_weight : norm_unselected(input_),
          output_mask[2] ? grad_bias : norm_unselected(input_)};
}

// ---------------------------------------------------------------------------------------------
// Group norm (and instance norm, num_groups = C)
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward_cuda(
    const at::Tensor& input_, const c10::optional<at::Tensor>& weight_, const c10::optional<at::Tensor>& bias_,
    int64_t num_groups, double eps) {
  const char* op = "cnnops.group_norm_forward";
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
      // Statistics per (n, group) over (C / G) x spatial values (lecture: group norm, Wu and He;
      // instance norm, mu, sigma N x C x 1 x 1, is G = C).
      const WelfordOp<scalar_t, acc_t> welford{x.const_data_ptr<scalar_t>()};
      Partials p;
      PartialIndex pi;
      if (channels_last && x.numel() > 0) {
        // Per (n, c) over spatial, threads along channels; the second stage merges the group's
        // channels (and chunks) of each (n, g).
        p = reduce_columns<acc_t>(welford, 3, s.batch, s.spatial, s.channels, acc_options,
                                                     x.numel());
        pi = columns_partials(p.chunks, s.channels, groups, per_group);
      } else {
        // NCHW: each (n, g) is one contiguous run of (C / G) * spatial values.
        p = reduce_planes<acc_t>(welford, 3, 1, s.batch * groups, per_group * s.spatial,
                                                    acc_options, x.numel());
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
  const char* op = "cnnops.group_norm_backward";
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
        const GradSumsOp<scalar_t, param_t, acc_t> sums{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                        mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                                        nullptr, groups, per_group, false};
        Partials p;
        PartialIndex pi;
        if (channels_last) {
          p = reduce_columns<acc_t>(sums, 2, s.batch, s.spatial, s.channels, acc_options, x.numel());
          pi = columns_partials(p.chunks, s.channels, s.channels, 1);
        } else {
          // Planes (n, c) of the [1][N * C][spatial] view; statistic of plane p is p / (C / G).
          p = reduce_planes<acc_t>(sums, 2, 1, s.batch * s.channels, s.spatial, acc_options,
                                                   x.numel());
          pi = planes_partials(p.chunks);
        }
        auto [sum_a, sum_b] = finalize_sums<acc_t>(p, pi, s.batch * s.channels, acc_options);
        const auto stream = at::cuda::getCurrentCUDAStream();
        if (output_mask[0]) {
          at::Tensor coef_a = at::empty({s.batch * groups}, acc_options);
          at::Tensor coef_b = at::empty({s.batch * groups}, acc_options);
          group_norm_coeffs_kernel<acc_t, param_t><<<grid_for(s.batch * groups, kSmallThreads), kSmallThreads, 0, stream>>>(
              sum_a.const_data_ptr<acc_t>(), sum_b.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
              ptr_or_null<param_t>(weight), s.batch, s.channels, groups,
              acc_t(1) / static_cast<acc_t>(per_group * s.spatial), coef_a.mutable_data_ptr<acc_t>(),
              coef_b.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          launch_grad_input<scalar_t, param_t, acc_t>(channels_last, dy, x, grad_input, mean, invstd, weight, coef_a,
                                                      coef_b, s.channels, s.spatial, groups, per_group);
        }
        if (output_mask[1] || output_mask[2]) {
          group_norm_param_grads_kernel<acc_t, param_t><<<grid_for(s.channels, kSmallThreads), kSmallThreads, 0, stream>>>(
              sum_a.const_data_ptr<acc_t>(), sum_b.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), s.batch,
              s.channels, groups, mutable_ptr_or_null<param_t>(grad_weight), mutable_ptr_or_null<param_t>(grad_bias));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  }
  return {output_mask[0] ? grad_input : norm_unselected(input_),
          output_mask[1] ? grad_weight : norm_unselected(input_),
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

// ---------------------------------------------------------------------------------------------
// SyncBatchNorm pieces (cnnops.nn.SyncBatchNorm): per-rank statistics, normalization with given
// statistics, grad_input from all-reduced sums. Built from the batch norm kernels above.
// ---------------------------------------------------------------------------------------------

namespace cnnops {
namespace {

// Merged Welford partials of each channel: mean and m2 (the ranks merge these with Chan's
// formula; an empty batch gives zeros).
template <typename acc_t>
__global__ void welford_mean_m2_kernel(const acc_t* partial, int64_t partial_count, PartialIndex pi,
                                       int64_t outputs, acc_t* mean, acc_t* m2) {
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < outputs;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Welford<acc_t> w = merge_partials<Welford<acc_t>>(partial, partial_count, pi, o);
    mean[o] = w.mean;
    m2[o] = w.m2;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input_) {
  const char* op = "cnnops.batch_norm_stats";
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
    Partials p;
    PartialIndex pi;
    if (channels_last || s.spatial == 1) {
      p = reduce_columns<acc_t>(welford, 3, 1, s.batch * s.spatial, s.channels, acc_options, x.numel());
      pi = columns_partials(p.chunks, s.channels, s.channels, 1);
    } else {
      p = reduce_planes<acc_t>(welford, 3, s.batch, s.channels, s.spatial, acc_options, x.numel());
      pi = planes_partials(p.chunks);
    }
    welford_mean_m2_kernel<acc_t><<<grid_for(s.channels, kSmallThreads), kSmallThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
        p.buffer.const_data_ptr<acc_t>(), p.count, pi, s.channels, mean.mutable_data_ptr<acc_t>(),
        m2.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, m2};
}

at::Tensor batch_norm_elemt_cuda(const at::Tensor& input_, const c10::optional<at::Tensor>& weight_,
                                 const c10::optional<at::Tensor>& bias_, const at::Tensor& mean_,
                                 const at::Tensor& invstd_) {
  const char* op = "cnnops.batch_norm_elemt";
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
  const char* op = "cnnops.batch_norm_backward_elemt";
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
      at::Tensor coef_a = at::empty({s.channels}, acc_options), coef_b = at::empty({s.channels}, acc_options);
      batch_norm_coeffs_kernel<acc_t, param_t><<<grid_for(s.channels, kSmallThreads), kSmallThreads, 0,
                                                 at::cuda::getCurrentCUDAStream()>>>(
          sum_dy.const_data_ptr<acc_t>(), sum_dy_xmu.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
          ptr_or_null<param_t>(weight), s.channels, count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0),
          nullptr, nullptr, coef_a.mutable_data_ptr<acc_t>(), coef_b.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_grad_input<scalar_t, param_t, acc_t>(channels_last, dy, x, grad_input, mean, invstd, weight, coef_a,
                                                  coef_b, s.channels, s.spatial, 0, 1);
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
