// Convolution 1d/2d/3d on CUDA: implicit-GEMM kernels (CUDA-core FMA and tensor-core WMMA) for
// the general case, direct kernels for depthwise convolution. Backward passes are gather
// formulations and fixed-order reductions: no atomics, so results are deterministic.
//
// Which GEMM each pass is, and how its operands are addressed without an im2col buffer, is in
// csrc/common/cuda_implicit_gemm.h.
#include <ATen/AccumulateType.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <limits>

#include "../common/activation.h"
#include "../common/conv_checks.h"
#include "conv_kernels.cuh"
#include "conv_mma.cuh"

namespace cnnops {
namespace {

constexpr int64_t kMaxGridYZ = 65535;

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

bool use_tensor_cores(at::ScalarType dtype) {
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  if (dtype == at::kHalf || dtype == at::kBFloat16) return true;
  // Per-op query, as torch's own convolution does: the op-less overload throws when the conv and
  // RNN TF32 flags differ (torch.backends.cudnn.conv.fp32_precision = "ieee", say).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return dtype == at::kFloat && at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else  // before the per-op precision API
  return dtype == at::kFloat && at::globalContext().allowTF32CuDNN();
#endif
}

// Launches OUT = A x B for one pass over all groups (and split-K chunks); the forward pass
// adds the bias and applies the activation in the kernels' epilogue.
template <ConvGemm kind, typename scalar_t, typename out_t>
void launch_conv_gemm(const ConvGeometry& g, const scalar_t* a, const scalar_t* b, const scalar_t* bias, out_t* out,
                      int64_t chunks, int64_t r_chunk, bool int32_ok, Activation activation = Activation::None) {
  GemmArgs<scalar_t, out_t> args{g,
                                 a,
                                 b,
                                 bias,
                                 out,
                                 gemm_m<kind>(g),
                                 gemm_n<kind>(g),
                                 gemm_r<kind>(g),
                                 r_chunk,
                                 chunks,
                                 g.out_channels * g.gemm_k(),
                                 activation};
  const bool mma = use_tensor_cores(c10::CppTypeToScalarType<scalar_t>::value);
  const int64_t bm = mma ? kMmaBM : kFmaBM, bn = mma ? kMmaBN : kFmaBN;
  const int64_t grid_y = ceil_div(args.m, bm), grid_z = g.groups * chunks;
  const int64_t grid_x = ceil_div(args.n, bn);
  TORCH_CHECK_NOT_IMPLEMENTED(grid_y <= kMaxGridYZ && grid_z <= kMaxGridYZ,
                              kind == ConvGemm::Forward ? "conv_forward()" : "conv_backward()",
                              " (CUDA): too many channels per group (", args.m, ") or groups (", g.groups, ")");
  TORCH_CHECK_NOT_IMPLEMENTED(grid_x <= std::numeric_limits<int32_t>::max(),
                              kind == ConvGemm::Forward ? "conv_forward()" : "conv_backward()",
                              " (CUDA): GEMM too wide (", args.n, " columns)");
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), static_cast<unsigned>(grid_z));
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_index_type(int32_ok, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (mma) {
        conv_gemm_mma_kernel<kind, scalar_t, out_t, index_t><<<grid, kMmaThreads, 0, stream>>>(args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    conv_gemm_fma_kernel<kind, scalar_t, out_t, index_t><<<grid, kFmaThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename acc_t>
void launch_sum_chunks(const acc_t* partial, scalar_t* out, int64_t count, int64_t chunks) {
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(count, threads), 65536));
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_index_type(fits_int32({count * chunks}), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    sum_chunks_kernel<scalar_t, acc_t, index_t>
        <<<blocks, threads, 0, stream>>>(partial, out, static_cast<index_t>(count), static_cast<index_t>(chunks));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The split-K chunk count depends only on the sizes, so a given problem always sums in the
// same order. Enough chunks to give the GPU ~1024 blocks, each chunk at least `min_len` long.
int64_t reduction_chunks(int64_t blocks_per_chunk, int64_t length, int64_t min_len, int64_t max_chunks) {
  int64_t chunks = ceil_div(1024, std::max<int64_t>(blocks_per_chunk, 1));
  chunks = std::min(chunks, std::max<int64_t>(length / min_len, 1));
  return std::max<int64_t>(std::min(chunks, max_chunks), 1);
}

bool depthwise_fits(const ConvGeometry& g, size_t acc_size) {
  const int64_t mult = g.out_channels / g.in_channels;
  // grid.y is out_channels (forward) or in_channels (grad_input; larger when C_out == 0).
  return g.is_depthwise() && g.out_channels <= kMaxGridYZ && g.in_channels <= kMaxGridYZ &&
         mult * g.kernel_volume() * static_cast<int64_t>(acc_size) <= kDepthwiseMaxSmem;
}

at::Tensor in_conv_output_format(const at::Tensor& result, const at::Tensor& input, const at::Tensor& weight) {
  return result.contiguous(conv_output_memory_format(input, weight));
}

}  // namespace

at::Tensor conv_forward_cuda(const at::Tensor& input_, const at::Tensor& weight_,
                             const std::optional<at::Tensor>& bias_, c10::IntArrayRef stride, c10::IntArrayRef padding,
                             c10::IntArrayRef dilation, int64_t groups, c10::string_view activation_name) {
  const ConvGeometry g =
      make_conv_geometry("conv_forward()", input_, weight_, bias_, stride, padding, dilation, groups);
  const Activation activation = parse_activation(activation_name);
  TORCH_CHECK(input_.is_cuda(), "conv_forward(): input must be a CUDA tensor");
  const int64_t dims = weight_.dim() - 2;
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const bool has_bias = bias_.has_value() && bias_->defined();
  const at::Tensor bias = has_bias ? bias_->contiguous() : at::Tensor();
  at::Tensor output = at::empty(conv_output_shape(g, dims), input.options());
  if (output.numel() == 0) return in_conv_output_format(output, input_, weight_);

  const bool int32_ok = fits_int32({input.numel(), weight.numel(), output.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* bias_ptr = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
    if (depthwise_fits(g, sizeof(acc_t))) {
      const dim3 grid(static_cast<unsigned>(ceil_div(g.out_plane(), kDepthwiseThreads)),
                      static_cast<unsigned>(g.out_channels),
                      static_cast<unsigned>(std::min<int64_t>(g.batch, kMaxGridYZ)));
      const auto stream = at::cuda::getCurrentCUDAStream();
      with_index_type(int32_ok, [&](auto index_tag) {
        depthwise_forward_kernel<scalar_t, decltype(index_tag)><<<grid, kDepthwiseThreads, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias_ptr,
            output.mutable_data_ptr<scalar_t>(), g, activation);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    launch_conv_gemm<ConvGemm::Forward>(g, weight.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                        bias_ptr, output.mutable_data_ptr<scalar_t>(), 1, gemm_r<ConvGemm::Forward>(g),
                                        int32_ok, activation);
  });
  return in_conv_output_format(output, input_, weight_);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_cuda(const at::Tensor& grad_output_,
                                                                  const at::Tensor& input_, const at::Tensor& weight_,
                                                                  c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                                  c10::IntArrayRef dilation, int64_t groups,
                                                                  std::array<bool, 3> output_mask) {
  const ConvGeometry g =
      make_conv_geometry("conv_backward()", input_, weight_, c10::nullopt, stride, padding, dilation, groups);
  const int64_t dims = weight_.dim() - 2;
  check_grad_output(grad_output_, input_, g, dims);
  TORCH_CHECK(input_.is_cuda(), "conv_backward(): input must be a CUDA tensor");
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = at::empty(input.sizes(), input.options());
  if (output_mask[1]) grad_weight = at::empty(weight.sizes(), weight.options());
  if (output_mask[2]) grad_bias = at::empty({g.out_channels}, input.options());
  const bool no_outputs = grad_output.numel() == 0;  // batch 0 (or no output channels)
  if (output_mask[1] && no_outputs) grad_weight.zero_();
  if (output_mask[2] && no_outputs) grad_bias.zero_();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const at::ScalarType acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const bool depthwise = depthwise_fits(g, sizeof(acc_t));

    // dX = W^T * dY with col2im folded into the gather (formulas.md §Conv backward)
    if (output_mask[0] && grad_input.numel() > 0) {
      const bool int32_ok = fits_int32({input.numel(), weight.numel(), grad_output.numel()});
      if (depthwise) {
        const dim3 grid(static_cast<unsigned>(ceil_div(g.in_plane(), kDepthwiseThreads)),
                        static_cast<unsigned>(g.in_channels),
                        static_cast<unsigned>(std::min<int64_t>(g.batch, kMaxGridYZ)));
        scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
        with_index_type(int32_ok, [&](auto index_tag) {
          depthwise_grad_input_kernel<scalar_t, decltype(index_tag)>
              <<<grid, kDepthwiseThreads, 0, stream>>>(dy, w, dx, g);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        launch_conv_gemm<ConvGemm::GradInput>(g, w, dy, static_cast<const scalar_t*>(nullptr),
                                              grad_input.mutable_data_ptr<scalar_t>(), 1,
                                              gemm_r<ConvGemm::GradInput>(g), int32_ok);
      }
    }

    // dW = dY * im2col(X)^T, split over (batch, L) into chunks summed in a fixed order.
    if (output_mask[1] && !no_outputs && grad_weight.numel() > 0) {
      if (depthwise) {
        const int64_t kvol = g.kernel_volume();
        const int64_t chunks =
            reduction_chunks(g.out_channels * kvol, g.batch * g.out_plane(), 16 * kReduceThreads, kMaxGridYZ);
        at::Tensor partial = at::empty({chunks, weight.numel()}, input.options().dtype(acc_dtype));
        const bool int32_ok = fits_int32({input.numel(), grad_output.numel(), partial.numel()});
        const dim3 grid(static_cast<unsigned>(g.out_channels * kvol), static_cast<unsigned>(chunks));
        acc_t* part = partial.mutable_data_ptr<acc_t>();
        with_index_type(int32_ok, [&](auto index_tag) {
          using index_t = decltype(index_tag);
          depthwise_grad_weight_kernel<scalar_t, index_t>
              <<<grid, kReduceThreads, 0, stream>>>(dy, x, part, g, static_cast<index_t>(chunks));
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_sum_chunks(part, grad_weight.mutable_data_ptr<scalar_t>(), weight.numel(), chunks);
      } else {
        const int64_t r = gemm_r<ConvGemm::GradWeight>(g);
        const int64_t tiles =
            g.groups * ceil_div(gemm_m<ConvGemm::GradWeight>(g), 64) * ceil_div(gemm_n<ConvGemm::GradWeight>(g), 64);
        // Workspace at most ~256 MiB or 16 copies of the weight, whichever is larger.
        const int64_t max_chunks =
            std::min<int64_t>(kMaxGridYZ / g.groups,
                              std::max<int64_t>(16, (int64_t{256} << 20) / (weight.numel() * int64_t(sizeof(acc_t)))));
        int64_t chunks = reduction_chunks(tiles, r, 8 * kMmaBK, max_chunks);
        const int64_t r_chunk = ceil_div(ceil_div(r, chunks), kMmaBK) * kMmaBK;  // whole K-slices
        chunks = ceil_div(r, r_chunk);
        at::Tensor partial = at::empty({chunks, weight.numel()}, input.options().dtype(acc_dtype));
        const bool int32_ok = fits_int32({input.numel(), grad_output.numel(), partial.numel()});
        launch_conv_gemm<ConvGemm::GradWeight>(g, dy, x, static_cast<const scalar_t*>(nullptr),
                                               partial.mutable_data_ptr<acc_t>(), chunks, r_chunk, int32_ok);
        launch_sum_chunks(partial.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<scalar_t>(), weight.numel(),
                          chunks);
      }
    }

    // db[co] = sum_{b, l} dY[b, co, l], two fixed-order stages.
    if (output_mask[2] && !no_outputs) {
      const int64_t total = g.batch * g.out_plane();
      const int64_t chunks = reduction_chunks(g.out_channels, total, 16 * kReduceThreads, kMaxGridYZ);
      const int64_t chunk_len = ceil_div(total, chunks);
      at::Tensor partial = at::empty({chunks, g.out_channels}, input.options().dtype(acc_dtype));
      const bool int32_ok = fits_int32({grad_output.numel(), partial.numel()});
      const dim3 grid(static_cast<unsigned>(g.out_channels), static_cast<unsigned>(chunks));
      acc_t* part = partial.mutable_data_ptr<acc_t>();
      with_index_type(int32_ok, [&](auto index_tag) {
        using index_t = decltype(index_tag);
        bias_grad_partial_kernel<scalar_t, index_t><<<grid, kReduceThreads, 0, stream>>>(
            dy, part, static_cast<index_t>(g.out_channels), static_cast<index_t>(g.out_plane()),
            static_cast<index_t>(total), static_cast<index_t>(chunk_len));
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_sum_chunks(part, grad_bias.mutable_data_ptr<scalar_t>(), g.out_channels, chunks);
    }
  });

  if (output_mask[0]) grad_input = in_conv_output_format(grad_input, input_, input_);
  if (output_mask[1]) grad_weight = grad_weight.contiguous(conv_output_memory_format(input_, weight_));  // as torch's
  // Masked-out gradients are distinct empty tensors: outputs of an op must not alias each other.
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, input.options()); };
  return std::make_tuple(or_empty(grad_input), or_empty(grad_weight), or_empty(grad_bias));
}

}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("conv_forward", &cnnops::conv_forward_cuda);
  m.impl("conv_backward", &cnnops::conv_backward_cuda);
}
