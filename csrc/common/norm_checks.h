#pragma once
// Host-side argument checks for the normalization ops, shared by the CPU and CUDA kernels, and
// the small structs that describe each reduction. Messages follow torch's own wording where
// torch has one (so users see the errors they know) and always name the argument, the expected
// and the actual value. After these checks a kernel may index every tensor it is given.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace cnnops {

// Batch and group norm see the input as N x C x S (S = product of the spatial sizes, 1 when
// there are none). Batch norm: statistics per channel over N * S values. Group norm: statistics
// per (n, group) over (C / groups) * S values; groups = 1 for batch norm.
struct ChannelNormShape {
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t spatial = 1;   // S
  int64_t groups = 1;    // G (group norm only)
  int64_t channels_per_group() const { return groups > 0 ? channels / groups : 0; }
  int64_t numel() const { return batch * channels * spatial; }
};

// Layer norm sees the input as rows x cols: cols = prod(normalized_shape), one row per leading
// index; statistics per row, affine per column.
struct RowNormShape {
  int64_t rows = 0;
  int64_t cols = 0;
};

// Statistics (mean, invstd) are returned in the op-math type: float for half and bfloat16.
inline at::ScalarType norm_stat_dtype(const at::Tensor& input) { return at::toOpMathType(input.scalar_type()); }

inline void check_norm_input_dtype(const char* op, const at::Tensor& input) {
  const auto t = input.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              ": expected input of a floating dtype (float32, float64, bfloat16, float16), but got ", t);
}

// Parameters (weight, bias, running stats) have the input's dtype, or float for a half or
// bfloat16 input (mixed precision, as torch allows).
inline void check_norm_param_dtype(const char* op, const char* name, const at::Tensor& param, const at::Tensor& input) {
  const auto t = param.scalar_type();
  const auto in = input.scalar_type();
  const bool mixed = (in == at::kHalf || in == at::kBFloat16) && t == at::kFloat;
  TORCH_CHECK(t == in || mixed, op, ": expected ", name, " to have the input's dtype ", in,
              (in == at::kHalf || in == at::kBFloat16) ? " (or float32)" : "", ", but got ", t);
  TORCH_CHECK(param.device() == input.device(), op, ": expected ", name, " on the input's device ", input.device(),
              ", but it is on ", param.device());
}

// ------------------------------------------------------------------------------------------
// batch norm
// ------------------------------------------------------------------------------------------

inline ChannelNormShape channel_norm_shape(const at::Tensor& input, int64_t groups) {
  ChannelNormShape s;
  s.batch = input.size(0);
  s.channels = input.size(1);
  s.spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) s.spatial *= input.size(d);
  s.groups = groups;
  return s;
}

// input: N x C x *.
inline ChannelNormShape check_batch_norm_input(const char* op, const at::Tensor& input) {
  check_norm_input_dtype(op, input);
  TORCH_CHECK(input.dim() >= 2, op, ": expected input of shape N x C x * (at least 2 dims), but got input of size ",
              input.sizes());
  return channel_norm_shape(input, 1);
}

// weight, bias, running_mean, running_var: C values (torch: "weight should contain 6 elements not 4").
inline void check_batch_norm_param(const char* op, const char* name, const c10::optional<at::Tensor>& param,
                                   const at::Tensor& input, const ChannelNormShape& s) {
  if (!param.has_value() || !param->defined()) return;
  TORCH_CHECK(param->dim() == 1 && param->numel() == s.channels, op, ": ", name, " should contain ", s.channels,
              " elements not ", param->numel(), " (expected size [", s.channels, "], got ", param->sizes(), ")");
  check_norm_param_dtype(op, name, *param, input);
}

// ------------------------------------------------------------------------------------------
// group norm
// ------------------------------------------------------------------------------------------

// input: N x C x *, num_groups > 0 dividing C.
inline ChannelNormShape check_group_norm_input(const char* op, const at::Tensor& input, int64_t num_groups) {
  check_norm_input_dtype(op, input);
  TORCH_CHECK(input.dim() >= 2, op, ": expected input of shape N x C x * (at least 2 dims), but got input of size ",
              input.sizes());
  TORCH_CHECK(num_groups > 0, op, ": expected num_groups to be positive, but got num_groups=", num_groups);
  TORCH_CHECK(input.size(1) % num_groups == 0,
              "Expected number of channels in input to be divisible by num_groups, but got input of shape ",
              input.sizes(), " and num_groups=", num_groups);
  // torch's native_group_norm: no empty groups, no empty planes (an empty batch is fine)
  const ChannelNormShape s = channel_norm_shape(input, num_groups);
  TORCH_CHECK(s.channels > 0, "Expected number of channels to be greater than 0, got ", s.channels, " (", op, ")");
  TORCH_CHECK(s.spatial > 0, "Expected HxW to be greater than 0, got ", s.spatial, " (", op, ")");
  return s;
}

inline void check_group_norm_param(const char* op, const char* name, const c10::optional<at::Tensor>& param,
                                   const at::Tensor& input, const ChannelNormShape& s) {
  if (!param.has_value() || !param->defined()) return;
  TORCH_CHECK(param->dim() == 1 && param->numel() == s.channels, "Expected ", name,
              " to be a vector of size equal to the number of channels in input, but got ", name, " of shape ",
              param->sizes(), " and input of shape ", input.sizes(), " (", op, ")");
  check_norm_param_dtype(op, name, *param, input);
}

// ------------------------------------------------------------------------------------------
// layer norm
// ------------------------------------------------------------------------------------------

// normalized_shape must equal the input's trailing sizes; weight and bias have that shape.
inline RowNormShape check_layer_norm_input(const char* op, const at::Tensor& input, c10::IntArrayRef normalized_shape) {
  check_norm_input_dtype(op, input);
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1,
              "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element, but got "
              "normalized_shape = ",
              normalized_shape, " (", op, ")");
  const int64_t lead = input.dim() - k;
  bool match = lead >= 0;
  for (int64_t i = 0; match && i < k; ++i) match = input.size(lead + i) == normalized_shape[i];
  TORCH_CHECK(
      match, "Given normalized_shape=", normalized_shape, ", expected input with shape [*",
      [&] {
        std::string s;
        for (int64_t d : normalized_shape) s += ", " + std::to_string(d);
        return s;
      }(),
      "], but got input of size", input.sizes(), " (", op, ")");
  RowNormShape s;
  s.rows = 1;
  for (int64_t d = 0; d < lead; ++d) s.rows *= input.size(d);
  s.cols = 1;
  for (int64_t d : normalized_shape) s.cols *= d;
  return s;
}

inline void check_layer_norm_param(const char* op, const char* name, const c10::optional<at::Tensor>& param,
                                   const at::Tensor& input, c10::IntArrayRef normalized_shape) {
  if (!param.has_value() || !param->defined()) return;
  TORCH_CHECK(param->sizes() == normalized_shape, "Expected ", name,
              " to be of same shape as normalized_shape, but got ", name, " of shape ", param->sizes(),
              " and normalized_shape = ", normalized_shape, " (", op, ")");
  check_norm_param_dtype(op, name, *param, input);
}

// mean/invstd of layer norm: the input's leading shape.
inline std::vector<int64_t> layer_norm_stat_shape(const at::Tensor& input, c10::IntArrayRef normalized_shape) {
  const auto lead = input.sizes().slice(0, input.dim() - normalized_shape.size());
  return std::vector<int64_t>(lead.begin(), lead.end());
}

// ------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------

// grad_output must have the input's shape, dtype and device.
inline void check_norm_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": grad_output: expected size ", input.sizes(),
              " (the input's), but got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output: expected dtype ",
              input.scalar_type(), ", but got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output must be on the input's device ",
              input.device(), ", but is on ", grad_output.device());
}

// mean and invstd as the forward returned them: `expected` shape, op-math dtype, input's device.
inline void check_norm_stat(const char* op, const char* name, const at::Tensor& stat, c10::IntArrayRef expected,
                            const at::Tensor& input) {
  TORCH_CHECK(stat.sizes() == expected, op, ": ", name, ": expected size ", expected, ", but got ", stat.sizes());
  TORCH_CHECK(stat.scalar_type() == norm_stat_dtype(input), op, ": ", name, ": expected dtype ", norm_stat_dtype(input),
              ", but got ", stat.scalar_type());
  TORCH_CHECK(stat.device() == input.device(), op, ": ", name, " must be on the input's device ", input.device(),
              ", but is on ", stat.device());
}

// Unselected outputs of a backward (output_mask false) are empty tensors of shape {0}.
inline at::Tensor norm_unselected(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace cnnops

// ------------------------------------------------------------------------------------------
// SyncBatchNorm: batch_norm_backward_elemt's count is the number of values per channel over all
// ranks, so at least this rank's N x spatial.
// ------------------------------------------------------------------------------------------

namespace cnnops {

inline void check_sync_count(const char* op, int64_t count, const ChannelNormShape& s) {
  TORCH_CHECK(count >= s.batch * s.spatial, op,
              ": count: expected the number of values per channel over all ranks, "
              "at least this input's N x spatial = ",
              s.batch * s.spatial, ", but got ", count);
}

// The arguments of batch_norm_elemt (normalize with given statistics), for CPU and CUDA.
inline ChannelNormShape check_batch_norm_elemt(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                               const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                               const at::Tensor& invstd) {
  constexpr const char* op = "batch_norm_elemt()";
  const ChannelNormShape s = check_batch_norm_input(op, input);
  check_batch_norm_param(op, "weight", weight, input, s);
  check_batch_norm_param(op, "bias", bias, input, s);
  check_norm_stat(op, "mean", mean, {s.channels}, input);
  check_norm_stat(op, "invstd", invstd, {s.channels}, input);
  return s;
}

// The arguments of batch_norm_backward_elemt (grad_input from the all-ranks sums), for CPU and CUDA.
inline ChannelNormShape check_batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& mean, const at::Tensor& invstd,
                                                        const c10::optional<at::Tensor>& weight,
                                                        const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                                        int64_t count) {
  constexpr const char* op = "batch_norm_backward_elemt()";
  const ChannelNormShape s = check_batch_norm_input(op, input);
  check_norm_grad_output(op, grad_output, input);
  check_batch_norm_param(op, "weight", weight, input, s);
  check_norm_stat(op, "mean", mean, {s.channels}, input);
  check_norm_stat(op, "invstd", invstd, {s.channels}, input);
  check_norm_stat(op, "sum_dy", sum_dy, {s.channels}, input);
  check_norm_stat(op, "sum_dy_xmu", sum_dy_xmu, {s.channels}, input);
  check_sync_count(op, count, s);
  return s;
}

}  // namespace cnnops
