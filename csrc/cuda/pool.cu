// Pooling 1d/2d/3d on CUDA: max pool with argmax indices, average pool, adaptive average and
// max pool, max unpool, forward and backward. The kernels (pool_kernels.cuh) run one thread per
// output (forward) or input (backward) element; backward passes are gathers with no atomics, so
// they are deterministic. Arguments are checked by the same functions as on the CPU
// (csrc/common/pool_checks.h), and outputs keep the input's memory format: contiguous inputs get
// the NCDHW kernels, channels_last ones the NDHWC kernels.
#include <ATen/AccumulateType.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/pool_checks.h"
#include "pool_kernels.cuh"

namespace cnnops {
namespace {

// Blocks of a grid-stride launch. 65536 x 256 = 2^24 threads is plenty to fill any GPU and keeps
// the last step of the walk far below the int32 limit (see fits_int32).
constexpr int64_t kMaxBlocks = 65536;

dim3 grid_for(int64_t total) {
  return dim3(static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kPoolThreads), kMaxBlocks)));
}

// Calls launch(index_t{}, std::integral_constant<bool, channels_last>{}) for the kernel variant
// that fits: int32 offsets when every tensor allows it, the NDHWC kernels for channels_last.
template <typename F>
void with_variant(bool int32_ok, bool channels_last, const F& launch) {
  with_index_type(int32_ok, [&](auto index_tag) {
    if (channels_last)
      launch(index_tag, std::true_type{});
    else
      launch(index_tag, std::false_type{});
  });
}

void check_cuda(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), op, ": expected input on a CUDA device, but got input on ", input.device());
}

std::vector<int64_t> ones(size_t n) { return std::vector<int64_t>(n, 1); }

// A device word the unpool kernels atomicMin an offending position into; all ones = none.
at::Tensor invalid_index_flag(const at::Tensor& like, cudaStream_t stream) {
  at::Tensor flag = at::empty({1}, like.options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(flag.mutable_data_ptr<int64_t>(), 0xFF, sizeof(int64_t), stream));
  return flag;
}

unsigned long long* flag_ptr(at::Tensor& flag) {
  return reinterpret_cast<unsigned long long*>(flag.mutable_data_ptr<int64_t>());
}

// Raises torch's error for an index outside the output plane. This costs one stream-ordered
// copy of 8 bytes (a sync) per unpool call: the price of reporting bad indices as an error
// instead of torch's device-side assert, which would leave the CUDA context unusable.
void raise_if_invalid_index(const char* op, const at::Tensor& flag, const at::Tensor& indices,
                            c10::IntArrayRef output_size, cudaStream_t stream) {
  unsigned long long first_invalid = 0;
  c10::cuda::memcpy_and_sync(&first_invalid, flag.const_data_ptr<int64_t>(), sizeof(first_invalid),
                             cudaMemcpyDeviceToHost, stream);
  if (first_invalid == std::numeric_limits<unsigned long long>::max()) return;
  int64_t value = 0;  // the offending index itself, for the message
  c10::cuda::memcpy_and_sync(&value, indices.const_data_ptr<int64_t>() + first_invalid, sizeof(value),
                             cudaMemcpyDeviceToHost, stream);
  check_max_unpool_index(op, false, value, output_size);
}

// How many threads share one adaptive-average window (1: one thread per output). Splitting pays
// when windows are large and outputs too few to fill the GPU, as in global average pooling
// (N*C outputs of H*W taps). Each chunk then sums at least ~32 taps.
int64_t adaptive_avg_chunks(const PoolGeometry& g, int64_t outputs) {
  int64_t window = 1;  // an upper bound on the taps of one window
  for (int i = 0; i < 3; ++i) window *= std::min(g.in[i], ceil_div(g.in[i], g.out[i]) + 1);
  if (window < 64 || outputs >= (int64_t{1} << 18)) return 1;
  return std::min<int64_t>(window / 32, 64);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Max pool
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> max_pool_forward_cuda(const at::Tensor& input_, c10::IntArrayRef kernel_size,
                                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                         c10::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool_forward()";
  const PoolGeometry g =
      make_pool_geometry(op, PoolKind::kMax, input_, kernel_size, stride, padding, dilation, ceil_mode);
  check_cuda(op, input_);
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor input = input_.contiguous(format);
  const auto shape = pool_output_shape(g, static_cast<int64_t>(kernel_size.size()));
  at::Tensor output = at::empty(shape, input.options().memory_format(format));
  at::Tensor indices = at::empty(shape, input.options().dtype(at::kLong).memory_format(format));
  const int64_t total = output.numel();
  if (total == 0) return std::make_tuple(output, indices);

  const bool int32_ok = fits_int32({input.numel(), total}) && pool_windows_fit_int32(g);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool_forward_cuda", [&] {
    with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
      using index_t = decltype(index_tag);
      max_pool_forward_kernel<scalar_t, index_t, decltype(layout)::value><<<grid_for(total), kPoolThreads, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>(), g,
          static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return std::make_tuple(output, indices);
}

at::Tensor max_pool_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& indices_,
                                  c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                  c10::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool_backward()";
  const PoolGeometry g =
      make_pool_geometry(op, PoolKind::kMax, input_, kernel_size, stride, padding, dilation, ceil_mode);
  check_pool_grad_output(op, grad_output_, input_, g, static_cast<int64_t>(kernel_size.size()));
  check_pool_indices(op, indices_, grad_output_.sizes(), input_);
  check_cuda(op, input_);
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor grad_output = grad_output_.contiguous(format);
  const at::Tensor indices = indices_.contiguous(format);
  at::Tensor grad_input = at::empty(input_.sizes(), grad_output.options().memory_format(format));
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;

  const bool int32_ok = fits_int32({total, grad_output.numel()}) && pool_windows_fit_int32(g);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "max_pool_backward_cuda", [&] {
    with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
      using index_t = decltype(index_tag);
      max_pool_backward_kernel<scalar_t, index_t, decltype(layout)::value>
          <<<grid_for(total), kPoolThreads, 0, stream>>>(
              grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
              grad_input.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_input;
}

// ---------------------------------------------------------------------------------------------
// Average pool
// ---------------------------------------------------------------------------------------------

at::Tensor avg_pool_forward_cuda(const at::Tensor& input_, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                                 int64_t divisor_override) {
  const char* op = "avg_pool_forward()";
  const PoolGeometry g =
      make_pool_geometry(op, PoolKind::kAvg, input_, kernel_size, stride, padding, ones(kernel_size.size()), ceil_mode);
  check_avg_pool3d_input_size(op, g, static_cast<int64_t>(kernel_size.size()));
  check_cuda(op, input_);
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor input = input_.contiguous(format);
  at::Tensor output =
      at::empty(pool_output_shape(g, static_cast<int64_t>(kernel_size.size())), input.options().memory_format(format));
  const int64_t total = output.numel();
  if (total == 0) return output;

  const bool int32_ok = fits_int32({input.numel(), total}) && pool_windows_fit_int32(g);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "avg_pool_forward_cuda", [&] {
    with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
      using index_t = decltype(index_tag);
      avg_pool_forward_kernel<scalar_t, index_t, decltype(layout)::value><<<grid_for(total), kPoolThreads, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), g, count_include_pad, divisor_override,
          static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

at::Tensor avg_pool_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input_,
                                  c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                  bool ceil_mode, bool count_include_pad, int64_t divisor_override) {
  const char* op = "avg_pool_backward()";
  const PoolGeometry g =
      make_pool_geometry(op, PoolKind::kAvg, input_, kernel_size, stride, padding, ones(kernel_size.size()), ceil_mode);
  check_avg_pool3d_input_size(op, g, static_cast<int64_t>(kernel_size.size()));
  check_pool_grad_output(op, grad_output_, input_, g, static_cast<int64_t>(kernel_size.size()));
  check_cuda(op, input_);
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor grad_output = grad_output_.contiguous(format);
  at::Tensor grad_input = at::empty(input_.sizes(), grad_output.options().memory_format(format));
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;

  const bool int32_ok = fits_int32({total, grad_output.numel()}) && pool_windows_fit_int32(g);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "avg_pool_backward_cuda", [&] {
    with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
      using index_t = decltype(index_tag);
      avg_pool_backward_kernel<scalar_t, index_t, decltype(layout)::value>
          <<<grid_for(total), kPoolThreads, 0, stream>>>(grad_output.const_data_ptr<scalar_t>(),
                                                         grad_input.mutable_data_ptr<scalar_t>(), g, count_include_pad,
                                                         divisor_override, static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_input;
}

// ---------------------------------------------------------------------------------------------
// Adaptive pools
// ---------------------------------------------------------------------------------------------

at::Tensor adaptive_avg_pool_forward_cuda(const at::Tensor& input_, c10::IntArrayRef output_size) {
  const char* op = "adaptive_avg_pool_forward()";
  const PoolGeometry g = make_adaptive_pool_geometry(op, input_, output_size);
  check_cuda(op, input_);
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor input = input_.contiguous(format);
  at::Tensor output =
      at::empty(pool_output_shape(g, static_cast<int64_t>(output_size.size())), input.options().memory_format(format));
  const int64_t total = output.numel();
  if (total == 0) return output;

  const int64_t chunks = adaptive_avg_chunks(g, total);
  const bool int32_ok = fits_int32({input.numel(), total * chunks});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "adaptive_avg_pool_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
      using index_t = decltype(index_tag);
      constexpr bool channels_last = decltype(layout)::value;
      if (chunks == 1) {
        adaptive_avg_pool_forward_kernel<scalar_t, index_t, channels_last>
            <<<grid_for(total), kPoolThreads, 0, stream>>>(
                input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      at::Tensor partial = at::empty({total * chunks}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      adaptive_avg_pool_partial_kernel<scalar_t, index_t, channels_last>
          <<<grid_for(total * chunks), kPoolThreads, 0, stream>>>(
              input.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), g, static_cast<index_t>(chunks),
              static_cast<index_t>(total * chunks));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      adaptive_avg_pool_finish_kernel<scalar_t, index_t, channels_last><<<grid_for(total), kPoolThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(chunks),
          static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

at::Tensor adaptive_avg_pool_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input_) {
  const char* op = "adaptive_avg_pool_backward()";
  const PoolGeometry g = make_adaptive_backward_geometry(op, grad_output_, input_);
  check_cuda(op, input_);
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor grad_output = grad_output_.contiguous(format);
  at::Tensor grad_input = at::empty(input_.sizes(), grad_output.options().memory_format(format));
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;

  const bool int32_ok = fits_int32({total, grad_output.numel()});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "adaptive_avg_pool_backward_cuda", [&] {
        with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
          using index_t = decltype(index_tag);
          adaptive_avg_pool_backward_kernel<scalar_t, index_t, decltype(layout)::value>
              <<<grid_for(total), kPoolThreads, 0, stream>>>(grad_output.const_data_ptr<scalar_t>(),
                                                             grad_input.mutable_data_ptr<scalar_t>(), g,
                                                             static_cast<index_t>(total));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor> adaptive_max_pool_forward_cuda(const at::Tensor& input_,
                                                                  c10::IntArrayRef output_size) {
  const char* op = "adaptive_max_pool_forward()";
  const PoolGeometry g = make_adaptive_pool_geometry(op, input_, output_size);
  check_cuda(op, input_);
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor input = input_.contiguous(format);
  const auto shape = pool_output_shape(g, static_cast<int64_t>(output_size.size()));
  at::Tensor output = at::empty(shape, input.options().memory_format(format));
  at::Tensor indices = at::empty(shape, input.options().dtype(at::kLong).memory_format(format));
  const int64_t total = output.numel();
  if (total == 0) return std::make_tuple(output, indices);

  const bool int32_ok = fits_int32({input.numel(), total});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "adaptive_max_pool_forward_cuda", [&] {
    with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
      using index_t = decltype(index_tag);
      adaptive_max_pool_forward_kernel<scalar_t, index_t, decltype(layout)::value>
          <<<grid_for(total), kPoolThreads, 0, stream>>>(
              input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
              indices.mutable_data_ptr<int64_t>(), g, static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return std::make_tuple(output, indices);
}

at::Tensor adaptive_max_pool_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input_,
                                           const at::Tensor& indices_) {
  const char* op = "adaptive_max_pool_backward()";
  const PoolGeometry g = make_adaptive_backward_geometry(op, grad_output_, input_);
  check_pool_indices(op, indices_, grad_output_.sizes(), input_);
  check_cuda(op, input_);
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor grad_output = grad_output_.contiguous(format);
  const at::Tensor indices = indices_.contiguous(format);
  at::Tensor grad_input = at::empty(input_.sizes(), grad_output.options().memory_format(format));
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;

  const bool int32_ok = fits_int32({total, grad_output.numel()});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "adaptive_max_pool_backward_cuda", [&] {
                                    with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
                                      using index_t = decltype(index_tag);
                                      adaptive_max_pool_backward_kernel<scalar_t, index_t, decltype(layout)::value>
                                          <<<grid_for(total), kPoolThreads, 0, stream>>>(
                                              grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
                                              grad_input.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(total));
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
                                  });
  return grad_input;
}

// ---------------------------------------------------------------------------------------------
// Max unpool
// ---------------------------------------------------------------------------------------------

at::Tensor max_unpool_forward_cuda(const at::Tensor& input_, const at::Tensor& indices_, c10::IntArrayRef output_size) {
  const char* op = "max_unpool_forward()";
  check_max_unpool(op, input_, indices_, output_size);
  check_cuda(op, input_);
  // Duplicate indices make the result depend on which thread writes last (torch raises the
  // same alert for its own kernel).
  at::globalContext().alertNotDeterministic("max_unpool_forward() (CUDA)");
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor input = input_.contiguous(format);
  const at::Tensor indices = indices_.contiguous(format);
  std::vector<int64_t> shape{input.size(0), input.size(1)};
  shape.insert(shape.end(), output_size.begin(), output_size.end());
  at::Tensor output = at::empty(shape, input.options().memory_format(format));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (output.numel() > 0)
    C10_CUDA_CHECK(cudaMemsetAsync(output.mutable_data_ptr(), 0, output.nbytes(), stream));  // 0 bits = +0.0
  const int64_t total = input.numel();
  if (total == 0) return output;

  int64_t out_plane = 1;
  for (int64_t size : output_size) out_plane *= size;
  const int64_t in_plane = total / (input.size(0) * input.size(1));
  at::Tensor flag = invalid_index_flag(input, stream);
  const bool int32_ok = fits_int32({total, output.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_unpool_forward_cuda", [&] {
    with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
      using index_t = decltype(index_tag);
      const UnpoolSizes<index_t> s{static_cast<index_t>(input.size(1)), static_cast<index_t>(in_plane),
                                   static_cast<index_t>(out_plane)};
      max_unpool_forward_kernel<scalar_t, index_t, decltype(layout)::value>
          <<<grid_for(total), kPoolThreads, 0, stream>>>(
              input.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(), output.mutable_data_ptr<scalar_t>(),
              s, static_cast<index_t>(total), flag_ptr(flag));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  raise_if_invalid_index(op, flag, indices, output_size, stream);
  return output;
}

at::Tensor max_unpool_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input_,
                                    const at::Tensor& indices_) {
  const char* op = "max_unpool_backward()";
  check_max_unpool_backward(op, grad_output_, input_, indices_);
  const c10::IntArrayRef output_size = grad_output_.sizes().slice(2);
  check_cuda(op, input_);
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::MemoryFormat format = pool_memory_format(input_);
  const at::Tensor grad_output = grad_output_.contiguous(format);
  const at::Tensor indices = indices_.contiguous(format);
  at::Tensor grad_input = at::empty(input_.sizes(), grad_output.options().memory_format(format));
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t out_plane = grad_output.numel() / (input_.size(0) * input_.size(1));
  const int64_t in_plane = total / (input_.size(0) * input_.size(1));
  at::Tensor flag = invalid_index_flag(grad_input, stream);
  const bool int32_ok = fits_int32({total, grad_output.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "max_unpool_backward_cuda", [&] {
    with_variant(int32_ok, is_channels_last(format), [&](auto index_tag, auto layout) {
      using index_t = decltype(index_tag);
      const UnpoolSizes<index_t> s{static_cast<index_t>(input_.size(1)), static_cast<index_t>(in_plane),
                                   static_cast<index_t>(out_plane)};
      max_unpool_backward_kernel<scalar_t, index_t, decltype(layout)::value>
          <<<grid_for(total), kPoolThreads, 0, stream>>>(
              grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
              grad_input.mutable_data_ptr<scalar_t>(), s, static_cast<index_t>(total), flag_ptr(flag));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  raise_if_invalid_index(op, flag, indices, output_size, stream);
  return grad_input;
}

}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("max_pool_forward", &cnnops::max_pool_forward_cuda);
  m.impl("max_pool_backward", &cnnops::max_pool_backward_cuda);
  m.impl("avg_pool_forward", &cnnops::avg_pool_forward_cuda);
  m.impl("avg_pool_backward", &cnnops::avg_pool_backward_cuda);
  m.impl("adaptive_avg_pool_forward", &cnnops::adaptive_avg_pool_forward_cuda);
  m.impl("adaptive_avg_pool_backward", &cnnops::adaptive_avg_pool_backward_cuda);
  m.impl("adaptive_max_pool_forward", &cnnops::adaptive_max_pool_forward_cuda);
  m.impl("adaptive_max_pool_backward", &cnnops::adaptive_max_pool_backward_cuda);
  m.impl("max_unpool_forward", &cnnops::max_unpool_forward_cuda);
  m.impl("max_unpool_backward", &cnnops::max_unpool_backward_cuda);
}
