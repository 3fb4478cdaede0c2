// SyncBatchNorm pieces (cnnops.nn.SyncBatchNorm). Each rank computes its statistics with
// batch_norm_stats, the ranks merge them in Python (Chan), each rank normalizes its slice with
// batch_norm_elemt, and the backward turns the all-reduced gradient sums into grad_input with
// batch_norm_backward_elemt. The local sums come from batch_norm_backward (see autograd.py).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/norm_checks.h"
#include "cpu/batch_norm_cpu.h"
#include "cpu/result_memory.h"

namespace cnnops {
namespace cpu {

TensorPair batch_norm_stats(const at::Tensor& input) {
  constexpr const char* op = "batch_norm_stats()";
  const ChannelNormShape s = check_batch_norm_input(op, input);
  const bool rows = use_rows_layout(input, s.spatial);
  const at::Tensor x = dense_for_layout(input, rows);
  const auto stat_opts = input.options().dtype(norm_stat_dtype(input));
  at::Tensor mean = at::empty({s.channels}, stat_opts);
  at::Tensor m2 = at::empty({s.channels}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats", [&] {
    using acc_t = acc_type<scalar_t>;
    // Same Welford/Chan reduction as batch_norm_forward; an empty batch gives zeros.
    const auto stats = channel_stats(x.const_data_ptr<scalar_t>(), s, rows);
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* m2p = m2.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < s.channels; ++c) {
      mp[c] = stats[c].mean;
      m2p[c] = stats[c].m2;
    }
  });
  return {mean, m2};
}

at::Tensor batch_norm_elemt(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd) {
  const ChannelNormShape s = check_batch_norm_elemt(input, weight, bias, mean, invstd);
  const bool rows = use_rows_layout(input, s.spatial);
  const at::Tensor x = dense_for_layout(input, rows);
  at::Tensor y = empty_result_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_elemt", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto mu = load_param<acc_t>(mean, s.channels, 0);
    const auto is = load_param<acc_t>(invstd, s.channels, 0);
    normalize_channels(s, rows, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mu, is, weight, bias);
  });
  return y;
}

at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                                     const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, int64_t count) {
  const ChannelNormShape s =
      check_batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
  const bool rows = use_rows_layout(input, s.spatial);
  const at::Tensor x = dense_for_layout(input, rows);
  const at::Tensor dy = dense_for_layout(grad_output, rows);
  at::Tensor dx = empty_result_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_elemt", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t C = s.channels;
    const auto mu = load_param<acc_t>(mean, C, 0);
    const auto is = load_param<acc_t>(invstd, C, 0);
    const auto w = load_param<acc_t>(weight, C, 1);
    const auto sdy = load_param<acc_t>(sum_dy, C, 0);
    const auto sdyx = load_param<acc_t>(sum_dy_xmu, C, 0);
    // The training formula of batch_norm_backward over the global batch: the sums and the count
    // are the all-ranks ones, the elements this rank's.
    std::vector<acc_t> coef_g(C, acc_t(0)), coef_xmu(C, acc_t(0));
    if (count > 0) {
      for (int64_t c = 0; c < C; ++c) {
        const auto coef = norm_input_grad_coef(is[c], w[c] * sdy[c], w[c] * sdyx[c], static_cast<acc_t>(count));
        coef_g[c] = coef.coef_g;
        coef_xmu[c] = coef.coef_xmu;
      }
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
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
  return dx;
}

}  // namespace cpu
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("batch_norm_stats", &cnnops::cpu::batch_norm_stats);
  m.impl("batch_norm_elemt", &cnnops::cpu::batch_norm_elemt);
  m.impl("batch_norm_backward_elemt", &cnnops::cpu::batch_norm_backward_elemt);
}
