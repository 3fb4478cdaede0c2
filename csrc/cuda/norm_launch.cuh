#pragma once
// Host side of the CUDA normalization ops: launch shapes, the two-stage reductions and the
// elementwise passes over the kernels of norm_kernels.cuh, shared by norm.cu (batch, layer and
// group norm) and sync_batch_norm.cu.
#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>

#include "../common/norm_cuda_math.h"
#include "norm_kernels.cuh"

namespace cnnops {
namespace norm {

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int kSmallThreads = 256;  // per-statistic kernels

inline unsigned grid_for(int64_t n, int threads) {
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
    if (float_params)
      f(TypeTag<acc_t>{});
    else
      f(TypeTag<scalar_t>{});
  }
}

// All given parameters share one dtype (each was checked to be the input's or float); returns
// whether that dtype differs from the input's.
inline bool params_are_mixed(const char* op, const at::Tensor& input,
                             std::initializer_list<std::pair<const char*, const c10::optional<at::Tensor>*>> params) {
  const char* first_name = nullptr;
  at::ScalarType first = input.scalar_type();
  for (const auto& [name, p] : params) {
    if (!p->has_value() || !(*p)->defined()) continue;
    if (first_name == nullptr) {
      first_name = name;
      first = (*p)->scalar_type();
    }
    TORCH_CHECK((*p)->scalar_type() == first, op, ": expected ", name, " to have the dtype of ", first_name, " (",
                first, "), but got ", (*p)->scalar_type());
  }
  return first != input.scalar_type();
}

// channels_last kernels for 4-d and 5-d inputs whose strides suggest it; NCHW otherwise.
inline at::MemoryFormat kernel_memory_format(const at::Tensor& input) {
  const at::MemoryFormat suggested = input.suggest_memory_format();
  if (input.dim() == 4 && suggested == at::MemoryFormat::ChannelsLast) return suggested;
  if (input.dim() == 5 && suggested == at::MemoryFormat::ChannelsLast3d) return suggested;
  return at::MemoryFormat::Contiguous;
}

inline at::Tensor defined_contiguous(const c10::optional<at::Tensor>& t) {
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
                       const at::TensorOptions& acc_options, int64_t numel, const char* op_name) {
  TORCH_CHECK_NOT_IMPLEMENTED(channels <= kMaxGridX, op_name, " (CUDA): too many statistics (", channels,
                              ") for one grid");
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
  with_index_type(fits_int32({numel}), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    reduce_planes_kernel<Op, acc_t, index_t>
        <<<grid, threads, 0, stream>>>(op, out, static_cast<index_t>(outer), static_cast<index_t>(channels),
                                       static_cast<index_t>(inner), static_cast<index_t>(chunk_len), p.count);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

// Columns view [batch][rows][cols]: one partial per (b, chunk, col), at (b * chunks + chunk) * cols + col.
template <typename acc_t, typename Op>
Partials reduce_columns(const Op& op, int fields, int64_t batch, int64_t rows, int64_t cols,
                        const at::TensorOptions& acc_options, int64_t numel, const char* op_name) {
  const ColumnsConfig cfg = columns_config(batch, rows, cols);
  TORCH_CHECK_NOT_IMPLEMENTED(cfg.col_blocks <= kMaxGridX, op_name, " (CUDA): too many channels (", cols,
                              ") for one grid");
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
  with_index_type(fits_int32({numel}), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    reduce_columns_kernel<Op, acc_t, index_t>
        <<<grid, block, 0, stream>>>(op, out, static_cast<index_t>(batch), static_cast<index_t>(rows),
                                     static_cast<index_t>(cols), static_cast<index_t>(chunk_len), p.count);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

// Batch norm's per-channel reduction over N x spatial: columns where the channels are contiguous
// (channels_last, or no spatial extent), planes otherwise.
struct ChannelPartials {
  Partials p;
  PartialIndex pi;
};
template <typename acc_t, typename Op>
ChannelPartials reduce_per_channel(const Op& op, int fields, bool channels_last, int64_t batch, int64_t channels,
                                   int64_t spatial, const at::TensorOptions& acc_options, int64_t numel,
                                   const char* op_name) {
  if (channels_last || spatial == 1) {
    Partials p = reduce_columns<acc_t>(op, fields, 1, batch * spatial, channels, acc_options, numel, op_name);
    return {p, columns_partials(p.chunks, channels, channels, 1)};
  }
  Partials p = reduce_planes<acc_t>(op, fields, batch, channels, spatial, acc_options, numel, op_name);
  return {p, planes_partials(p.chunks)};
}

template <typename acc_t, typename param_t>
void finalize_stats(const Partials& p, const PartialIndex& pi, int64_t outputs, at::Tensor& mean, at::Tensor& invstd,
                    param_t* running_mean, param_t* running_var, double momentum, double eps) {
  welford_finalize_kernel<acc_t, param_t>
      <<<grid_for(outputs, kSmallThreads), kSmallThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          p.buffer.const_data_ptr<acc_t>(), p.count, pi, outputs, mean.mutable_data_ptr<acc_t>(),
          invstd.mutable_data_ptr<acc_t>(), running_mean, running_var, static_cast<acc_t>(momentum),
          static_cast<acc_t>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Merged per-channel mean and M2 (SyncBatchNorm's per-rank statistics).
template <typename acc_t>
void finalize_mean_m2(const Partials& p, const PartialIndex& pi, int64_t outputs, at::Tensor& mean, at::Tensor& m2) {
  welford_mean_m2_kernel<acc_t>
      <<<grid_for(outputs, kSmallThreads), kSmallThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          p.buffer.const_data_ptr<acc_t>(), p.count, pi, outputs, mean.mutable_data_ptr<acc_t>(),
          m2.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Merged gradient sums (sum_a, sum_b) of `outputs` statistics, as two acc tensors.
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> finalize_sums(const Partials& p, const PartialIndex& pi, int64_t outputs,
                                                const at::TensorOptions& acc_options) {
  at::Tensor sum_a = at::empty({outputs}, acc_options), sum_b = at::empty({outputs}, acc_options);
  sums_finalize_kernel<acc_t><<<grid_for(outputs, kSmallThreads), kSmallThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      p.buffer.const_data_ptr<acc_t>(), p.count, pi, outputs, sum_a.mutable_data_ptr<acc_t>(),
      sum_b.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum_a, sum_b};
}

// Batch norm backward's per-channel results from the sums over `count` values: grad_weight,
// grad_bias and the grad_input coefficients, each written where its pointer is not null.
template <typename acc_t, typename param_t>
void launch_batch_norm_coeffs(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& invstd,
                              const at::Tensor& weight, int64_t channels, int64_t count, param_t* grad_weight,
                              param_t* grad_bias, acc_t* coef_g, acc_t* coef_xmu) {
  batch_norm_coeffs_kernel<acc_t, param_t>
      <<<grid_for(channels, kSmallThreads), kSmallThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          sum_dy.const_data_ptr<acc_t>(), sum_dy_xmu.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
          ptr_or_null<param_t>(weight), channels, static_cast<acc_t>(count), grad_weight, grad_bias, coef_g, coef_xmu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename param_t, typename acc_t>
void launch_normalize(bool channels_last, const at::Tensor& x, at::Tensor& y, const at::Tensor& mean,
                      const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias, int64_t channels,
                      int64_t inner, int64_t stats_per_sample, int64_t channels_per_stat) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const unsigned blocks = grid_for(numel, kElementwiseThreads);
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_index_type(fits_int32({numel}), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const NormIndex<index_t> ix(static_cast<index_t>(channels), static_cast<index_t>(inner),
                                static_cast<index_t>(stats_per_sample), static_cast<index_t>(channels_per_stat));
    auto kernel = channels_last ? normalize_kernel<true, scalar_t, param_t, acc_t, index_t>
                                : normalize_kernel<false, scalar_t, param_t, acc_t, index_t>;
    kernel<<<blocks, kElementwiseThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                                       mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                                       ptr_or_null<param_t>(weight), ptr_or_null<param_t>(bias), ix,
                                                       static_cast<index_t>(numel));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename param_t, typename acc_t>
void launch_grad_input(bool channels_last, const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx,
                       const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                       const at::Tensor& coef_g, const at::Tensor& coef_xmu, int64_t channels, int64_t inner,
                       int64_t stats_per_sample, int64_t channels_per_stat) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const unsigned blocks = grid_for(numel, kElementwiseThreads);
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_index_type(fits_int32({numel}), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const NormIndex<index_t> ix(static_cast<index_t>(channels), static_cast<index_t>(inner),
                                static_cast<index_t>(stats_per_sample), static_cast<index_t>(channels_per_stat));
    auto kernel = channels_last ? grad_input_kernel<true, scalar_t, param_t, acc_t, index_t>
                                : grad_input_kernel<false, scalar_t, param_t, acc_t, index_t>;
    kernel<<<blocks, kElementwiseThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
        mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), ptr_or_null<param_t>(weight),
        ptr_or_null<acc_t>(coef_g), ptr_or_null<acc_t>(coef_xmu), ix, static_cast<index_t>(numel));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

inline at::TensorOptions param_options(const at::Tensor& input, bool mixed) {
  return input.options().dtype(mixed ? at::kFloat : input.scalar_type());
}

}  // namespace norm
}  // namespace cnnops
