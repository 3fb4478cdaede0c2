// Group norm on the CPU: N x C x *, statistics per (n, group) over the group's C/G channels and
// all spatial positions, affine per channel (formulas.md §Norm statistics; Wu and He).
// Instance norm is this op with G = C.
//
// NCHW: a group is one contiguous span of (C/G) * S values; each (n, g) is reduced with Welford
// and normalized while it is still in cache, one parallel task per group.
// Channels-last: per image, rows of C channels; per-channel Welford lanes over fixed blocks of
// rows, merged (blocks in order, then the group's channels in order) with Chan's formula; with
// enough images, one image per task so the normalizing pass reads it from cache.
// Backward: per (n, c) sums of dy and dy * (x - mean), combined with the weights into the
// group's sums for dx (dx = invstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = w * dy);
// dweight and dbias add the per-(n, c) sums over n in order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/norm_checks.h"
#include "cpu/norm_cpu.h"
#include "cpu/result_memory.h"

namespace cnnops {
namespace cpu {
namespace {

constexpr const char* kForward = "group_norm_forward()";
constexpr const char* kBackward = "group_norm_backward()";

}  // namespace

TensorTriple group_norm_forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps) {
  const ChannelNormShape s = check_group_norm_input(kForward, input, num_groups);
  check_group_norm_param(kForward, "weight", weight, input, s);
  check_group_norm_param(kForward, "bias", bias, input, s);
  const bool rows = use_rows_layout(input, s.spatial);
  const at::Tensor x = dense_for_layout(input, rows);
  at::Tensor y = empty_result_like(x);
  const auto stat_opts = input.options().dtype(norm_stat_dtype(input));
  at::Tensor mean_out = at::empty({s.batch, num_groups}, stat_opts);
  at::Tensor invstd_out = at::empty({s.batch, num_groups}, stat_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t N = s.batch, C = s.channels, S = s.spatial, G = num_groups;
    const int64_t D = s.channels_per_group();
    const auto w = load_param<acc_t>(weight, C, 1);
    const auto b = load_param<acc_t>(bias, C, 0);
    const acc_t eps_a = static_cast<acc_t>(eps);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t* mo = mean_out.mutable_data_ptr<acc_t>();
    acc_t* io = invstd_out.mutable_data_ptr<acc_t>();
    if (!rows) {
      at::parallel_for(0, N * G, grain_for(2 * D * S), [&](int64_t begin, int64_t end) {
        for (int64_t ng = begin; ng < end; ++ng) {
          const scalar_t* xg = xp + ng * D * S;
          const Welford<acc_t> st = welford_span(xg, D * S);
          const acc_t inv = norm_invstd(st.biased_variance(), eps_a);
          const int64_t c0 = (ng % G) * D;
          for (int64_t d = 0; d < D; ++d)
            normalize_span(xg + d * S, yp + ng * D * S + d * S, S, st.mean, norm_scale(inv, w[c0 + d]), b[c0 + d]);
          mo[ng] = st.mean;
          io[ng] = inv;
        }
      });
      return;
    }
    // Channels-last: per-channel Welford lanes over the row blocks of every image, merged per
    // (n, g) (blocks in order, each block's channels of the group in order), then the rows
    // normalized with per-channel coefficients.
    const RowBlocks blocks(S, C);
    std::vector<acc_t> pmean(static_cast<size_t>(N * blocks.count * C)), pm2(pmean.size());
    std::vector<acc_t> mean_c(N * C), scale_c(N * C);
    auto block_stats = [&](int64_t n, int64_t blk) {
      const int64_t i = n * blocks.count + blk;
      welford_rows(xp + (n * S + blocks.begin(blk)) * C, blocks.size(blk), C, &pmean[i * C], &pm2[i * C]);
    };
    auto merge_image = [&](int64_t n) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t c0 = g * D;
        Welford<acc_t> st;
        for (int64_t blk = 0; blk < blocks.count; ++blk)
          for (int64_t d = 0; d < D; ++d) {
            const int64_t i = (n * blocks.count + blk) * C + c0 + d;
            Welford<acc_t> part;
            part.mean = pmean[i];
            part.m2 = pm2[i];
            part.count = static_cast<acc_t>(blocks.size(blk));
            st.merge(part);
          }
        const acc_t inv = norm_invstd(st.biased_variance(), eps_a);
        mo[n * G + g] = st.mean;
        io[n * G + g] = inv;
        for (int64_t d = 0; d < D; ++d) {
          mean_c[n * C + c0 + d] = st.mean;
          scale_c[n * C + c0 + d] = norm_scale(inv, w[c0 + d]);
        }
      }
    };
    auto normalize_block = [&](int64_t n, int64_t blk) {
      const int64_t off = (n * S + blocks.begin(blk)) * C;
      normalize_rows(xp + off, yp + off, blocks.size(blk), C, &mean_c[n * C], &scale_c[n * C], b.data());
    };
    if (N >= 2 * at::get_num_threads()) {
      // Enough images to keep every thread busy: one image per task, so its second pass reads
      // it from cache. Same partition and merge order as below, hence the same bits.
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t blk = 0; blk < blocks.count; ++blk) block_stats(n, blk);
          merge_image(n);
          for (int64_t blk = 0; blk < blocks.count; ++blk) normalize_block(n, blk);
        }
      });
      return;
    }
    at::parallel_for(0, N * blocks.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) block_stats(i / blocks.count, i % blocks.count);
    });
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) merge_image(n);
    });
    at::parallel_for(0, N * blocks.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) normalize_block(i / blocks.count, i % blocks.count);
    });
  });
  return {y, mean_out, invstd_out};
}

TensorTriple group_norm_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& invstd, const c10::optional<at::Tensor>& weight, int64_t num_groups,
                                 std::array<bool, 3> output_mask) {
  const ChannelNormShape s = check_group_norm_input(kBackward, input, num_groups);
  check_norm_grad_output(kBackward, grad_output, input);
  check_group_norm_param(kBackward, "weight", weight, input, s);
  check_norm_stat(kBackward, "mean", mean, {s.batch, num_groups}, input);
  check_norm_stat(kBackward, "invstd", invstd, {s.batch, num_groups}, input);
  const bool has_w = weight.has_value() && weight->defined();
  const auto pdtype = has_w ? weight->scalar_type() : input.scalar_type();

  const bool rows = use_rows_layout(input, s.spatial);
  const at::Tensor x = dense_for_layout(input, rows);
  const at::Tensor dy = dense_for_layout(grad_output, rows);
  const at::Tensor mean_d = mean.contiguous();
  const at::Tensor invstd_d = invstd.contiguous();
  at::Tensor dx = output_mask[0] ? empty_result_like(x) : norm_unselected(input);
  at::Tensor dw = output_mask[1] ? at::empty({s.channels}, input.options().dtype(pdtype)) : norm_unselected(input);
  at::Tensor db = output_mask[2] ? at::empty({s.channels}, input.options().dtype(pdtype)) : norm_unselected(input);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t N = s.batch, C = s.channels, S = s.spatial, G = num_groups;
    const int64_t D = s.channels_per_group();
    const auto w = load_param<acc_t>(weight, C, 1);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = output_mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* mp = mean_d.const_data_ptr<acc_t>();
    const acc_t* ip = invstd_d.const_data_ptr<acc_t>();
    const acc_t count = static_cast<acc_t>(D * S);
    // Per (n, c): sum(dy) and sum(dy * (x - mean)).
    std::vector<acc_t> sum_dy(N * C), sum_dy_xmu(N * C);
    // dx coefficients of one (n, g) from its channels' sums.
    auto group_coef = [&](int64_t ng) {
      const int64_t c0 = (ng % G) * D, n = ng / G;
      acc_t sum_g = 0, sum_g_xmu = 0;
      for (int64_t d = 0; d < D; ++d) {
        sum_g += w[c0 + d] * sum_dy[n * C + c0 + d];
        sum_g_xmu += w[c0 + d] * sum_dy_xmu[n * C + c0 + d];
      }
      return norm_input_grad_coef(ip[ng], sum_g, sum_g_xmu, count);
    };
    if (!rows) {
      at::parallel_for(0, N * G, grain_for(3 * D * S), [&](int64_t begin, int64_t end) {
        for (int64_t ng = begin; ng < end; ++ng) {
          const int64_t c0 = (ng % G) * D, n = ng / G;
          for (int64_t d = 0; d < D; ++d) {
            const int64_t off = (ng * D + d) * S;
            grad_sums_span(dyp + off, xp + off, S, mp[ng], &sum_dy[n * C + c0 + d], &sum_dy_xmu[n * C + c0 + d]);
          }
          if (!dxp) continue;
          const auto coef = group_coef(ng);
          for (int64_t d = 0; d < D; ++d) {
            const int64_t off = (ng * D + d) * S;
            input_grad_span(dyp + off, xp + off, dxp + off, S, w[c0 + d], ip[ng], mp[ng], coef.coef_g, coef.coef_xmu);
          }
        }
      });
    } else {
      const RowBlocks blocks(S, C);
      std::vector<acc_t> mean_c(N * C);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) mean_c[n * C + c] = mp[n * G + c / D];
      std::vector<acc_t> pa(static_cast<size_t>(N * blocks.count * C)), pb(pa.size());
      std::vector<acc_t> invstd_c(N * C), coef_g(N * C), coef_xmu(N * C);
      auto block_sums = [&](int64_t n, int64_t blk) {
        const int64_t i = n * blocks.count + blk;
        const int64_t off = (n * S + blocks.begin(blk)) * C;
        grad_sums_rows(dyp + off, xp + off, blocks.size(blk), C, &mean_c[n * C], &pa[i * C], &pb[i * C]);
      };
      // Per (n, c) sums (blocks in order), then the image's dx coefficients.
      auto merge_image = [&](int64_t n) {
        for (int64_t blk = 0; blk < blocks.count; ++blk)
          for (int64_t c = 0; c < C; ++c) {
            sum_dy[n * C + c] += pa[(n * blocks.count + blk) * C + c];
            sum_dy_xmu[n * C + c] += pb[(n * blocks.count + blk) * C + c];
          }
        if (!dxp) return;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t c0 = g * D;
          const auto coef = group_coef(n * G + g);
          for (int64_t d = 0; d < D; ++d) {
            invstd_c[n * C + c0 + d] = ip[n * G + g];
            coef_g[n * C + c0 + d] = coef.coef_g;
            coef_xmu[n * C + c0 + d] = coef.coef_xmu;
          }
        }
      };
      auto input_grad_block = [&](int64_t n, int64_t blk) {
        const int64_t off = (n * S + blocks.begin(blk)) * C;
        input_grad_rows(dyp + off, xp + off, dxp + off, blocks.size(blk), C, w.data(), &invstd_c[n * C], &mean_c[n * C],
                        &coef_g[n * C], &coef_xmu[n * C]);
      };
      if (N >= 2 * at::get_num_threads()) {  // one image per task, second pass from cache
        at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
          for (int64_t n = begin; n < end; ++n) {
            for (int64_t blk = 0; blk < blocks.count; ++blk) block_sums(n, blk);
            merge_image(n);
            for (int64_t blk = 0; dxp && blk < blocks.count; ++blk) input_grad_block(n, blk);
          }
        });
      } else {
        at::parallel_for(0, N * blocks.count, 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) block_sums(i / blocks.count, i % blocks.count);
        });
        at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
          for (int64_t n = begin; n < end; ++n) merge_image(n);
        });
        if (dxp)
          at::parallel_for(0, N * blocks.count, 1, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) input_grad_block(i / blocks.count, i % blocks.count);
          });
      }
    }
    // dweight[c] = sum_n invstd[n, g] * sum(dy * (x - mean)), dbias[c] = sum_n sum(dy), n in order.
    if (output_mask[1] || output_mask[2]) {
      std::vector<acc_t> gw(C, acc_t(0)), gb(C, acc_t(0));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          gw[c] += norm_weight_grad(ip[n * G + c / D], sum_dy_xmu[n * C + c]);
          gb[c] += sum_dy[n * C + c];
        }
      if (output_mask[1]) store_param(dw, gw);
      if (output_mask[2]) store_param(db, gb);
    }
  });
  return {dx, dw, db};
}

}  // namespace cpu
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("group_norm_forward", &cnnops::cpu::group_norm_forward);
  m.impl("group_norm_backward", &cnnops::cpu::group_norm_backward);
}
