// Batch norm on the CPU: statistics per channel over N x spatial (formulas.md §Norm statistics:
// mu, sigma: 1 x C x 1 x 1; y = gamma * (x - mu) / sigma + beta).
//
// NCHW: every (n, c) plane is a contiguous span. Pass 1 reduces each plane (in fixed chunks)
// with Welford in parallel; the partial results of a channel are merged with Chan's formula in
// (n, chunk) order. Pass 2 normalizes plane by plane.
// Channels-last: rows of C channels; pass 1 runs per-channel Welford lanes over fixed blocks of
// rows, merged in block order; pass 2 normalizes the rows.
// Backward (training): dx = invstd * (w * dy - mean(w * dy)) - w * invstd * x_hat * mean(dy * x_hat), from the
// per-channel sums of dy and dy * (x - mean) reduced the same two-stage way.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/norm_checks.h"
#include "cpu/batch_norm_cpu.h"
#include "cpu/result_memory.h"

namespace cnnops {
namespace cpu {
namespace {

constexpr const char* kForward = "batch_norm_forward()";
constexpr const char* kBackward = "batch_norm_backward()";

// Per-channel sum(dy) and sum(dy * (x - mean[c])).
template <typename scalar_t>
void channel_grad_sums(const scalar_t* dy, const scalar_t* x, const ChannelNormShape& s, bool rows_layout,
                       const std::vector<acc_type<scalar_t>>& mean, std::vector<acc_type<scalar_t>>& sum_dy,
                       std::vector<acc_type<scalar_t>>& sum_dy_xmu) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = s.batch, C = s.channels, S = s.spatial;
  sum_dy.assign(static_cast<size_t>(C), acc_t(0));
  sum_dy_xmu.assign(static_cast<size_t>(C), acc_t(0));
  if (N * S == 0) return;
  if (!rows_layout) {
    const int64_t chunks = ceil_div(S, kSpanChunk);
    const int64_t chunk_len = std::min(S, kSpanChunk);
    std::vector<acc_t> pa(static_cast<size_t>(N * C * chunks)), pb(pa.size());
    at::parallel_for(0, N * C * chunks, grain_for(2 * chunk_len), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t plane = i / chunks, k = i % chunks;
        const int64_t start = k * kSpanChunk, off = plane * S + start;
        grad_sums_span(dy + off, x + off, std::min(kSpanChunk, S - start), mean[plane % C], &pa[i], &pb[i]);
      }
    });
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < chunks; ++k) {
          sum_dy[c] += pa[(n * C + c) * chunks + k];
          sum_dy_xmu[c] += pb[(n * C + c) * chunks + k];
        }
    return;
  }
  const RowBlocks blocks(N * S, C);
  std::vector<acc_t> pa(static_cast<size_t>(blocks.count * C)), pb(pa.size());
  at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t off = blocks.begin(b) * C;
      grad_sums_rows(dy + off, x + off, blocks.size(b), C, mean.data(), &pa[b * C], &pb[b * C]);
    }
  });
  for (int64_t b = 0; b < blocks.count; ++b)
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += pa[b * C + c];
      sum_dy_xmu[c] += pb[b * C + c];
    }
}

at::ScalarType param_grad_dtype(const c10::optional<at::Tensor>& weight, const at::Tensor& input) {
  return weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
}

}  // namespace

TensorTriple batch_norm_forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var, bool training, double momentum,
                                double eps) {
  const ChannelNormShape s = check_batch_norm_input(kForward, input);
  check_batch_norm_param(kForward, "weight", weight, input, s);
  check_batch_norm_param(kForward, "bias", bias, input, s);
  check_batch_norm_param(kForward, "running_mean", running_mean, input, s);
  check_batch_norm_param(kForward, "running_var", running_var, input, s);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(training || (has_rm && has_rv), kForward,
              ": running_mean and running_var must be given when training=False");

  const bool rows = use_rows_layout(input, s.spatial);
  const at::Tensor x = dense_for_layout(input, rows);
  at::Tensor y = empty_result_like(x);
  const auto stat_opts = input.options().dtype(norm_stat_dtype(input));
  at::Tensor mean_out = at::empty({s.channels}, stat_opts);
  at::Tensor invstd_out = at::empty({s.channels}, stat_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t C = s.channels;
    const acc_t eps_a = static_cast<acc_t>(eps), momentum_a = static_cast<acc_t>(momentum);
    std::vector<acc_t> mean(C), invstd(C);
    if (training) {
      const auto stats = channel_stats(x.const_data_ptr<scalar_t>(), s, rows);
      for (int64_t c = 0; c < C; ++c) {
        mean[c] = stats[c].mean;
        invstd[c] = norm_invstd(stats[c].biased_variance(), eps_a);
      }
      // Running statistics: unchanged for an empty batch (as torch), else the momentum update
      // with the unbiased variance.
      const int64_t count = s.batch * s.spatial;
      if (count > 0 && has_rm) {
        auto rm = load_param<acc_t>(running_mean, C, 0);
        for (int64_t c = 0; c < C; ++c) rm[c] = running_stat_update(rm[c], mean[c], momentum_a);
        at::Tensor t = *running_mean;
        store_param(t, rm);
      }
      if (count > 0 && has_rv) {
        auto rv = load_param<acc_t>(running_var, C, 0);
        for (int64_t c = 0; c < C; ++c) rv[c] = running_stat_update(rv[c], stats[c].unbiased_variance(), momentum_a);
        at::Tensor t = *running_var;
        store_param(t, rv);
      }
    } else {
      mean = load_param<acc_t>(running_mean, C, 0);
      const auto rv = load_param<acc_t>(running_var, C, 0);
      for (int64_t c = 0; c < C; ++c) invstd[c] = norm_invstd(rv[c], eps_a);
    }
    normalize_channels(s, rows, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mean, invstd, weight,
                       bias);
    acc_t* mo = mean_out.mutable_data_ptr<acc_t>();
    acc_t* io = invstd_out.mutable_data_ptr<acc_t>();
    std::copy(mean.begin(), mean.end(), mo);
    std::copy(invstd.begin(), invstd.end(), io);
  });
  return {y, mean_out, invstd_out};
}

TensorTriple batch_norm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                 const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  const ChannelNormShape s = check_batch_norm_input(kBackward, input);
  check_norm_grad_output(kBackward, grad_output, input);
  check_batch_norm_param(kBackward, "weight", weight, input, s);
  check_norm_stat(kBackward, "mean", mean, {s.channels}, input);
  check_norm_stat(kBackward, "invstd", invstd, {s.channels}, input);

  const bool rows = use_rows_layout(input, s.spatial);
  const at::Tensor x = dense_for_layout(input, rows);
  const at::Tensor dy = dense_for_layout(grad_output, rows);
  const auto pdtype = param_grad_dtype(weight, input);
  at::Tensor dx = output_mask[0] ? empty_result_like(x) : norm_unselected(input);
  at::Tensor dw = output_mask[1] ? at::empty({s.channels}, input.options().dtype(pdtype)) : norm_unselected(input);
  at::Tensor db = output_mask[2] ? at::empty({s.channels}, input.options().dtype(pdtype)) : norm_unselected(input);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t C = s.channels;
    const auto mu = load_param<acc_t>(mean, C, 0);
    const auto is = load_param<acc_t>(invstd, C, 0);
    const auto w = load_param<acc_t>(weight, C, 1);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    std::vector<acc_t> sum_dy, sum_dy_xmu;
    const bool need_sums = (training && output_mask[0]) || output_mask[1] || output_mask[2];
    if (need_sums) channel_grad_sums(dyp, xp, s, rows, mu, sum_dy, sum_dy_xmu);
    if (output_mask[1]) {
      std::vector<acc_t> v(C);
      for (int64_t c = 0; c < C; ++c) v[c] = norm_weight_grad(is[c], sum_dy_xmu[c]);
      store_param(dw, v);
    }
    if (output_mask[2]) store_param(db, sum_dy);
    if (!output_mask[0]) return;
    // dx = invstd * (w * dy + coef_g) + coef_xmu * (x - mean); in eval the statistics are
    // constants and only invstd * w * dy remains.
    const acc_t count = static_cast<acc_t>(s.batch * s.spatial);
    std::vector<acc_t> coef_g(C, acc_t(0)), coef_xmu(C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      if (training && count > 0) {
        const auto coef = norm_input_grad_coef(is[c], w[c] * sum_dy[c], w[c] * sum_dy_xmu[c], count);
        coef_g[c] = coef.coef_g;
        coef_xmu[c] = coef.coef_xmu;
      }
    }
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    for_each_channel_slice(
        s, rows, 3,
        [&](int64_t off, int64_t len, int64_t c) {
          input_grad_span(dyp + off, xp + off, dxp + off, len, w[c], is[c], mu[c], coef_g[c], coef_xmu[c]);
        },
        [&](int64_t off, int64_t nrows) {
          input_grad_rows(dyp + off, xp + off, dxp + off, nrows, C, w.data(), is.data(), mu.data(), coef_g.data(),
                          coef_xmu.data());
        });
  });
  return {dx, dw, db};
}

}  // namespace cpu
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("batch_norm_forward", &cnnops::cpu::batch_norm_forward);
  m.impl("batch_norm_backward", &cnnops::cpu::batch_norm_backward);
}
