#pragma once
// Statistic and gradient formulas shared by the CPU and CUDA normalization kernels (host and
// device), so the CPU tests exercise the arithmetic the GPU runs. Statistics themselves come
// from Welford/Chan (welford.h).
#include <math.h>

#include "macros.h"

namespace cnnops {

// invstd = 1 / sqrt(var + eps) (formulas.md §Norm statistics).
CNNOPS_HD float norm_invstd(float biased_var, float eps) { return 1.0f / sqrtf(biased_var + eps); }
CNNOPS_HD double norm_invstd(double biased_var, double eps) { return 1.0 / sqrt(biased_var + eps); }

// One Welford step for a lane whose new count is known and shared by many lanes (SIMD lanes
// that all see the same number of values, CUDA threads striding in lockstep): inv_count is
// 1 / (count after adding x), computed once for all of them, so the loop has no division.
template <typename acc_t>
CNNOPS_HD void welford_add_shared_count(acc_t& mean, acc_t& m2, acc_t x, acc_t inv_count) {
  const acc_t delta = x - mean;
  mean += delta * inv_count;
  m2 += delta * (x - mean);
}

// Chan's merge of two partials that have the same count n (SIMD lanes or warp lanes that ran in
// lockstep): no division, so a tree of these merges vectorizes.
//   mean = (mean_a + mean_b) / 2,  m2 = m2_a + m2_b + (mean_b - mean_a)^2 * n / 2
template <typename acc_t>
CNNOPS_HD void welford_merge_equal_count(acc_t& mean, acc_t& m2, acc_t other_mean, acc_t other_m2, acc_t count) {
  const acc_t delta = other_mean - mean;
  mean = acc_t(0.5) * (mean + other_mean);
  m2 = m2 + other_m2 + delta * delta * (acc_t(0.5) * count);
}

// Chan's merge of a partial of count n_b into one of count n_a, for lanes that share both counts
// (a block of channels over the same rows): the caller computes the weights once, so the lane
// loop has no division. With n = n_a + n_b and delta = mean_b - mean_a:
//   mean += delta * (n_b / n),  m2 += m2_b + delta^2 * (n_a * n_b / n)
template <typename acc_t>
CNNOPS_HD void welford_merge_shared_counts(acc_t& mean, acc_t& m2, acc_t other_mean, acc_t other_m2, acc_t b_share,
                                           acc_t cross_weight) {
  const acc_t delta = other_mean - mean;
  mean += delta * b_share;
  m2 += other_m2 + delta * delta * cross_weight;
}

// Running statistics (torch's momentum convention): running = (1 - m) * running + m * batch,
// where the variance fed in is the unbiased one, m2 / (count - 1).
template <typename acc_t>
CNNOPS_HD acc_t running_stat_update(acc_t running, acc_t batch, acc_t momentum) {
  return (acc_t(1) - momentum) * running + momentum * batch;
}

// Forward: y = (x - mean) * scale + bias with scale = invstd * weight. Subtracting the mean
// first (rather than x * scale + (bias - mean * scale)) keeps inputs with a large mean exact:
// x - mean is exact for nearby values, whereas x * scale rounds at the magnitude of x.
template <typename acc_t>
CNNOPS_HD acc_t norm_scale(acc_t invstd, acc_t weight) {
  return invstd * weight;
}

// Backward of x_hat = (x - mean) * invstd over a set of `count` values sharing mean and invstd
// (a batch-norm channel, a group-norm group, a layer-norm row), with g = dL/dx_hat = w * dy:
//   dx = invstd * (g - mean(g) - x_hat * mean(g * x_hat))          (formulas.md §Norm backward)
// The kernels accumulate sum_g = sum(g) and sum_g_xmu = sum(g * (x - mean)), subtracting the
// known mean per element (not sum(g * x) - mean * sum(g), which cancels for a large mean), and
// then write, per element,
//   dx = invstd * (g + coef_g) + coef_xmu * (x - mean).
// g - mean(g) is formed before the multiplication by invstd (large when the variance is tiny),
// so e.g. a single-element layer norm, whose exact dx is 0, gets dx = 0 up to one rounding of g
// times invstd: not exactly 0, since the compiler may fuse w * dy + coef_g into one FMA (w * dy
// unrounded, coef_g = -round(w * dy)), leaving up to about ulp(g) * invstd (torch leaves more;
// tests/test_input_safety.py bounds it).
template <typename acc_t>
struct InputGradCoef {
  acc_t coef_g;    // -mean(g)
  acc_t coef_xmu;  // -invstd^3 * mean(g * (x - mean))
};

template <typename acc_t>
CNNOPS_HD InputGradCoef<acc_t> norm_input_grad_coef(acc_t invstd, acc_t sum_g, acc_t sum_g_xmu, acc_t count) {
  // invstd * x_hat * mean(g * x_hat) = (x - mean) * invstd^3 * sum_g_xmu / count
  return {-sum_g / count, -invstd * invstd * invstd * sum_g_xmu / count};
}

// dweight = sum(dy * x_hat) = invstd * sum(dy * (x - mean)); dbias = sum(dy).
template <typename acc_t>
CNNOPS_HD acc_t norm_weight_grad(acc_t invstd, acc_t sum_dy_xmu) {
  return invstd * sum_dy_xmu;
}

}  // namespace cnnops
