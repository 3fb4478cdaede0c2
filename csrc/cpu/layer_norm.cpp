// Layer norm on the CPU: statistics per row of K = prod(normalized_shape) values, affine per
// column (formulas.md §Norm statistics: mu, sigma: N x 1). Each row is reduced with Welford
// and normalized while it is still in cache. The output is contiguous, as torch's.
// Backward: dx per row (dx = invstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = w * dy);
// dweight = sum over rows of dy * x_hat and dbias = sum of dy are reduced deterministically:
// in two stages (one partial per fixed block of rows, then the blocks added in order), or for
// a few long rows column chunk by column chunk, rows in order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/norm_checks.h"
#include "cpu/norm_cpu.h"
#include "cpu/result_memory.h"

namespace cnnops {
namespace cpu {
namespace {

constexpr const char* kForward = "layer_norm_forward()";
constexpr const char* kBackward = "layer_norm_backward()";

// Rows per partial dweight/dbias block: at most 64 blocks, and at most ~4M partial values.
int64_t layer_norm_rows_per_block(int64_t rows, int64_t cols) {
  int64_t per = std::max<int64_t>((rows + 63) / 64, 1);
  const int64_t cap = (int64_t(1) << 22) / std::max<int64_t>(cols, 1);
  if (cap > 0 && ceil_div(rows, per) > cap) per = ceil_div(rows, cap);
  return std::max<int64_t>(per, 1);
}

}  // namespace

TensorTriple layer_norm_forward(const at::Tensor& input, c10::IntArrayRef normalized_shape,
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                double eps) {
  const RowNormShape s = check_layer_norm_input(kForward, input, normalized_shape);
  check_layer_norm_param(kForward, "weight", weight, input, normalized_shape);
  check_layer_norm_param(kForward, "bias", bias, input, normalized_shape);
  const at::Tensor x = input.contiguous();
  at::Tensor y = empty_result(input.sizes(), input.options());
  const auto stat_shape = layer_norm_stat_shape(input, normalized_shape);
  const auto stat_opts = input.options().dtype(norm_stat_dtype(input));
  at::Tensor mean_out = at::empty(stat_shape, stat_opts);
  at::Tensor invstd_out = at::empty(stat_shape, stat_opts);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t K = s.cols;
    const auto w = load_param<acc_t>(weight, has_w ? K : 0, 1);
    const auto b = load_param<acc_t>(bias, has_b ? K : 0, 0);
    const acc_t eps_a = static_cast<acc_t>(eps);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t* mo = mean_out.mutable_data_ptr<acc_t>();
    acc_t* io = invstd_out.mutable_data_ptr<acc_t>();
    const acc_t* wp = has_w ? w.data() : nullptr;
    const acc_t* bp = has_b ? b.data() : nullptr;
    at::parallel_for(0, s.rows, grain_for(2 * K), [&](int64_t begin, int64_t end) {
      layer_norm_rows_forward(xp + begin * K, yp + begin * K, end - begin, K, eps_a, wp, bp, mo + begin, io + begin);
    });
  });
  return {y, mean_out, invstd_out};
}

TensorTriple layer_norm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                 c10::IntArrayRef normalized_shape, const at::Tensor& mean, const at::Tensor& invstd,
                                 const c10::optional<at::Tensor>& weight, std::array<bool, 3> output_mask) {
  const RowNormShape s = check_layer_norm_input(kBackward, input, normalized_shape);
  check_norm_grad_output(kBackward, grad_output, input);
  check_layer_norm_param(kBackward, "weight", weight, input, normalized_shape);
  const auto stat_shape = layer_norm_stat_shape(input, normalized_shape);
  check_norm_stat(kBackward, "mean", mean, stat_shape, input);
  check_norm_stat(kBackward, "invstd", invstd, stat_shape, input);
  const bool has_w = weight.has_value() && weight->defined();
  const auto pdtype = has_w ? weight->scalar_type() : input.scalar_type();

  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor invstd_c = invstd.contiguous();
  at::Tensor dx = output_mask[0] ? empty_result(input.sizes(), input.options()) : norm_unselected(input);
  at::Tensor dw = output_mask[1] ? at::empty(normalized_shape, input.options().dtype(pdtype)) : norm_unselected(input);
  at::Tensor db = output_mask[2] ? at::empty(normalized_shape, input.options().dtype(pdtype)) : norm_unselected(input);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t M = s.rows, K = s.cols;
    const auto w = load_param<acc_t>(weight, has_w ? K : 0, 1);
    const acc_t* wp = has_w ? w.data() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const acc_t* mp = mean_c.const_data_ptr<acc_t>();
    const acc_t* ip = invstd_c.const_data_ptr<acc_t>();
    scalar_t* dxp = output_mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    const bool params = output_mask[1] || output_mask[2];
    const int64_t per = layer_norm_rows_per_block(M, K);
    const int64_t blocks = M > 0 ? ceil_div(M, per) : 0;
    // dweight/dbias: with several rows per block, each block accumulates its partial while it
    // computes dx (one pass over dy and x), and the partials are added in block order. With
    // few long rows, partials would cost as much as the data: then a separate pass over column
    // chunks adds the rows in order instead. Either way the partition depends on sizes only.
    const bool by_columns = params && per < 4;
    const bool by_blocks = params && !by_columns;
    std::vector<acc_t> pdw(by_blocks ? blocks * K : 0, acc_t(0)), pdb(pdw.size(), acc_t(0));
    // dx = invstd[r] * (w * dy + coef_g[r]) + coef_xmu[r] * (x - mean[r])
    std::vector<acc_t> coef_g(M), coef_xmu(M);
    constexpr int64_t kColumnChunk = 8192;  // long enough runs for the prefetchers
    const int64_t chunks = ceil_div(K, kColumnChunk);
    at::parallel_for(0, (dxp || by_blocks) ? blocks : 0, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * per, nrows = std::min(M, (blk + 1) * per) - r0;
        if (!by_columns) {  // dx while the row is in cache, dweight/dbias into the block partial
          layer_norm_rows_backward(dyp + r0 * K, xp + r0 * K, dxp ? dxp + r0 * K : nullptr, nrows, K, mp + r0, ip + r0,
                                   wp, by_blocks ? &pdw[blk * K] : nullptr, by_blocks ? &pdb[blk * K] : nullptr);
          continue;
        }
        // By columns: only the coefficients here; dx comes with dweight/dbias below.
        for (int64_t r = r0; r < r0 + nrows; ++r) {
          acc_t sum_g, sum_g_xmu;
          layer_norm_row_grad_sums(dyp + r * K, xp + r * K, K, mp[r], wp, &sum_g, &sum_g_xmu);
          const auto coef = norm_input_grad_coef(ip[r], sum_g, sum_g_xmu, static_cast<acc_t>(K));
          coef_g[r] = coef.coef_g;
          coef_xmu[r] = coef.coef_xmu;
        }
      }
    });
    std::vector<acc_t> gw(params ? K : 0, acc_t(0)), gb(params ? K : 0, acc_t(0));
    at::parallel_for(0, params ? chunks : 0, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t k0 = chunk * kColumnChunk, len = std::min(kColumnChunk, K - k0);
        if (by_columns) {  // dx of the chunk and its dweight/dbias, rows in order
          for (int64_t r = 0; r < M; ++r) {
            const int64_t off = r * K + k0;
            if (dxp)
              layer_norm_row_input_grad(dyp + off, xp + off, dxp + off, len, mp[r], ip[r], wp ? wp + k0 : nullptr,
                                        coef_g[r], coef_xmu[r]);
            layer_norm_row_param_grad(dyp + off, xp + off, len, mp[r], ip[r], &gw[k0], &gb[k0]);
          }
        } else {
          for (int64_t blk = 0; blk < blocks; ++blk)
            for (int64_t k = k0; k < k0 + len; ++k) {
              gw[k] += pdw[blk * K + k];
              gb[k] += pdb[blk * K + k];
            }
        }
      }
    });
    if (output_mask[1]) {
      at::Tensor flat = dw.view({K});
      store_param(flat, gw);
    }
    if (output_mask[2]) {
      at::Tensor flat = db.view({K});
      store_param(flat, gb);
    }
  });
  return {dx, dw, db};
}

}  // namespace cpu
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("layer_norm_forward", &cnnops::cpu::layer_norm_forward);
  m.impl("layer_norm_backward", &cnnops::cpu::layer_norm_backward);
}
