// The inner loops of the CPU normalization kernels (see norm_cpu.h). They are written as plain
// loops over fixed-size lane arrays or over channels, which GCC vectorizes: CNNOPS_ALWAYS_INLINE
// bodies, which the exported functions at the end run through simd_dispatch (simd.h), compiled
// for AVX-512, AVX2 and the baseline and picked by cpu_isa().
#include "common/macros.h"
#include "cpu/norm_cpu.h"
#include "cpu/simd.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace cnnops {
namespace cpu {

namespace {

// Independent Welford lanes of a span: 64 floats (four AVX-512 vectors) or 32 doubles, enough
// independent chains to hide the add latency.
template <typename acc_t>
constexpr int span_lanes() {
  return sizeof(acc_t) == 8 ? 32 : 64;
}

// Sum of L lane accumulators as a tree of halves (a[l] += a[l + half]): the halves are whole
// vectors, so this vectorizes, whereas a left-to-right sum is a chain of L dependent scalar adds
// (the order is fixed either way, so the result is deterministic). Overwrites a.
template <int L, typename acc_t>
CNNOPS_ALWAYS_INLINE acc_t lane_tree_sum(acc_t* a) {
#pragma GCC unroll 8
  for (int half = L / 2; half >= 1; half /= 2)
#pragma GCC unroll 64
    for (int l = 0; l < half; ++l) a[l] += a[l + half];
  return a[0];
}

}  // namespace

// Welford over x[0, n) in L lanes that share the count, merged as a tree of equal-count pairs,
// then the tail (fewer than L values) by its own two-pass statistics and one Chan merge.
template <int L, typename scalar_t>
CNNOPS_ALWAYS_INLINE Welford<acc_type<scalar_t>> welford_lanes(const scalar_t* __restrict x, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  acc_t mean[L] = {};
  acc_t m2[L] = {};
  const int64_t steps = n / L;
  for (int64_t s = 0; s < steps; ++s) {
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(s + 1);
    const scalar_t* p = x + s * L;
    for (int l = 0; l < L; ++l) welford_add_shared_count(mean[l], m2[l], static_cast<acc_t>(p[l]), inv_count);
  }
  acc_t count = static_cast<acc_t>(steps);
  for (int half = L / 2; half >= 1; half /= 2) {
    for (int l = 0; l < half; ++l) welford_merge_equal_count(mean[l], m2[l], mean[l + half], m2[l + half], count);
    count += count;
  }
  Welford<acc_t> total;
  if (steps > 0) {
    total.mean = mean[0];
    total.m2 = m2[0];
    total.count = count;
  }
  const int64_t tail = n - steps * L;
  if (tail > 0) {
    const scalar_t* p = x + steps * L;
    acc_t sum = 0;
    for (int64_t i = 0; i < tail; ++i) sum += static_cast<acc_t>(p[i]);
    Welford<acc_t> rest;
    rest.count = static_cast<acc_t>(tail);
    rest.mean = sum / rest.count;
    for (int64_t i = 0; i < tail; ++i) {
      const acc_t d = static_cast<acc_t>(p[i]) - rest.mean;
      rest.m2 += d * d;
    }
    total.merge(rest);
  }
  return total;
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE Welford<acc_type<scalar_t>> welford_span_impl(const scalar_t* __restrict x, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  // Long spans: four vectors of lanes (independent chains hide the add latency); short spans
  // (a ConvNeXt layer-norm row of 64 channels): one vector, so the merge tree stays small.
  constexpr int kWide = span_lanes<acc_t>();
  constexpr int kNarrow = kWide / 4;
  return n >= 4 * kWide ? welford_lanes<kWide>(x, n) : welford_lanes<kNarrow>(x, n);
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void normalize_span_impl(const scalar_t* __restrict x, scalar_t* __restrict y, int64_t n,
                                              acc_type<scalar_t> mean, acc_type<scalar_t> scale,
                                              acc_type<scalar_t> bias) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean) * scale + bias);
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void grad_sums_span_impl(const scalar_t* __restrict dy, const scalar_t* __restrict x, int64_t n,
                                              acc_type<scalar_t> mean, acc_type<scalar_t>* sum_dy,
                                              acc_type<scalar_t>* sum_dy_xmu) {
  using acc_t = acc_type<scalar_t>;
  constexpr int L = span_lanes<acc_t>();
  acc_t a[L] = {};
  acc_t b[L] = {};
  const int64_t steps = n / L;
  for (int64_t s = 0; s < steps; ++s) {
    const scalar_t* pd = dy + s * L;
    const scalar_t* px = x + s * L;
    for (int l = 0; l < L; ++l) {
      const acc_t g = static_cast<acc_t>(pd[l]);
      a[l] += g;
      b[l] += g * (static_cast<acc_t>(px[l]) - mean);
    }
  }
  acc_t sa = lane_tree_sum<L>(a);
  acc_t sb = lane_tree_sum<L>(b);
  for (int64_t i = steps * L; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(dy[i]);
    sa += g;
    sb += g * (static_cast<acc_t>(x[i]) - mean);
  }
  *sum_dy = sa;
  *sum_dy_xmu = sb;
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void input_grad_span_impl(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                               scalar_t* __restrict dx, int64_t n, acc_type<scalar_t> w,
                                               acc_type<scalar_t> invstd, acc_type<scalar_t> mean,
                                               acc_type<scalar_t> coef_g, acc_type<scalar_t> coef_xmu) {
  using acc_t = acc_type<scalar_t>;
  if (coef_xmu == acc_t(0) && coef_g == acc_t(0)) {  // eval: dx = invstd * w * dy, x not read
    for (int64_t i = 0; i < n; ++i) dx[i] = static_cast<scalar_t>(invstd * (w * static_cast<acc_t>(dy[i])));
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    dx[i] = static_cast<scalar_t>(invstd * (w * static_cast<acc_t>(dy[i]) + coef_g) +
                                  coef_xmu * (static_cast<acc_t>(x[i]) - mean));
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void layer_norm_row_impl(const scalar_t* __restrict x, scalar_t* __restrict y, int64_t n,
                                              acc_type<scalar_t> mean, acc_type<scalar_t> invstd,
                                              const acc_type<scalar_t>* w, const acc_type<scalar_t>* b) {
  using acc_t = acc_type<scalar_t>;
  if (w && b) {
    for (int64_t i = 0; i < n; ++i)
      y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean) * invstd * w[i] + b[i]);
  } else if (w) {
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean) * invstd * w[i]);
  } else if (b) {
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean) * invstd + b[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean) * invstd);
  }
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void layer_norm_row_grad_sums_impl(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                                        int64_t n, acc_type<scalar_t> mean, const acc_type<scalar_t>* w,
                                                        acc_type<scalar_t>* sum_g, acc_type<scalar_t>* sum_g_xmu) {
  using acc_t = acc_type<scalar_t>;
  if (!w) {
    grad_sums_span_impl(dy, x, n, mean, sum_g, sum_g_xmu);
    return;
  }
  constexpr int L = span_lanes<acc_t>();
  acc_t a[L] = {};
  acc_t b[L] = {};
  const int64_t steps = n / L;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t o = s * L;
    for (int l = 0; l < L; ++l) {
      const acc_t g = static_cast<acc_t>(dy[o + l]) * w[o + l];
      a[l] += g;
      b[l] += g * (static_cast<acc_t>(x[o + l]) - mean);
    }
  }
  acc_t sa = lane_tree_sum<L>(a);
  acc_t sb = lane_tree_sum<L>(b);
  for (int64_t i = steps * L; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(dy[i]) * w[i];
    sa += g;
    sb += g * (static_cast<acc_t>(x[i]) - mean);
  }
  *sum_g = sa;
  *sum_g_xmu = sb;
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void layer_norm_row_input_grad_impl(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                                         scalar_t* __restrict dx, int64_t n, acc_type<scalar_t> mean,
                                                         acc_type<scalar_t> invstd, const acc_type<scalar_t>* w,
                                                         acc_type<scalar_t> coef_g, acc_type<scalar_t> coef_xmu) {
  using acc_t = acc_type<scalar_t>;
  if (!w) {
    input_grad_span_impl(dy, x, dx, n, acc_t(1), invstd, mean, coef_g, coef_xmu);
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    dx[i] = static_cast<scalar_t>(invstd * (static_cast<acc_t>(dy[i]) * w[i] + coef_g) +
                                  coef_xmu * (static_cast<acc_t>(x[i]) - mean));
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void layer_norm_row_param_grad_impl(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                                         int64_t n, acc_type<scalar_t> mean, acc_type<scalar_t> invstd,
                                                         acc_type<scalar_t>* __restrict dw,
                                                         acc_type<scalar_t>* __restrict db) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(dy[i]);
    dw[i] += g * ((static_cast<acc_t>(x[i]) - mean) * invstd);
    db[i] += g;
  }
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void layer_norm_row_backward_sums_impl(
    const scalar_t* __restrict dy, const scalar_t* __restrict x, int64_t n, acc_type<scalar_t> mean,
    acc_type<scalar_t> invstd, const acc_type<scalar_t>* __restrict w, acc_type<scalar_t>* sum_g,
    acc_type<scalar_t>* sum_g_xmu, acc_type<scalar_t>* __restrict dw, acc_type<scalar_t>* __restrict db) {
  using acc_t = acc_type<scalar_t>;
  constexpr int L = span_lanes<acc_t>() / 4;
  acc_t a[L] = {};
  acc_t b[L] = {};
  const int64_t steps = n / L;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t o = s * L;
    for (int l = 0; l < L; ++l) {
      const acc_t d = static_cast<acc_t>(dy[o + l]);
      const acc_t xmu = static_cast<acc_t>(x[o + l]) - mean;
      const acc_t g = w ? d * w[o + l] : d;
      a[l] += g;
      b[l] += g * xmu;
      dw[o + l] += d * (xmu * invstd);
      db[o + l] += d;
    }
  }
  acc_t sa = lane_tree_sum<L>(a);
  acc_t sb = lane_tree_sum<L>(b);
  for (int64_t i = steps * L; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(dy[i]);
    const acc_t xmu = static_cast<acc_t>(x[i]) - mean;
    const acc_t g = w ? d * w[i] : d;
    sa += g;
    sb += g * xmu;
    dw[i] += d * (xmu * invstd);
    db[i] += d;
  }
  *sum_g = sa;
  *sum_g_xmu = sb;
}

// Many short rows (a ConvNeXt layer norm over 64 channels): the row loop inside the compiled
// function, so the per-row statistics and coefficients are inlined rather than called row by row.
template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void layer_norm_rows_forward_impl(const scalar_t* x, scalar_t* y, int64_t rows, int64_t n,
                                                       acc_type<scalar_t> eps, const acc_type<scalar_t>* w,
                                                       const acc_type<scalar_t>* b, acc_type<scalar_t>* mean_out,
                                                       acc_type<scalar_t>* invstd_out) {
  // Short rows: the statistics of a group of rows first, so their independent merge trees
  // (latency-bound for a 64-value row) overlap; the same arithmetic per row either way.
  constexpr int64_t kGroup = 4;
  int64_t r = 0;
  if (n < 4 * span_lanes<acc_type<scalar_t>>()) {
    for (; r + kGroup <= rows; r += kGroup) {
      Welford<acc_type<scalar_t>> st[kGroup];
      for (int64_t j = 0; j < kGroup; ++j) st[j] = welford_span_impl(x + (r + j) * n, n);
      for (int64_t j = 0; j < kGroup; ++j) {
        const auto inv = norm_invstd(st[j].biased_variance(), eps);
        layer_norm_row_impl(x + (r + j) * n, y + (r + j) * n, n, st[j].mean, inv, w, b);
        mean_out[r + j] = st[j].mean;
        invstd_out[r + j] = inv;
      }
    }
  }
  for (; r < rows; ++r) {
    const auto st = welford_span_impl(x + r * n, n);
    const auto inv = norm_invstd(st.biased_variance(), eps);
    layer_norm_row_impl(x + r * n, y + r * n, n, st.mean, inv, w, b);
    mean_out[r] = st.mean;
    invstd_out[r] = inv;
  }
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void layer_norm_rows_backward_impl(const scalar_t* dy, const scalar_t* x, scalar_t* dx,
                                                        int64_t rows, int64_t n, const acc_type<scalar_t>* mean,
                                                        const acc_type<scalar_t>* invstd, const acc_type<scalar_t>* w,
                                                        acc_type<scalar_t>* dw, acc_type<scalar_t>* db) {
  using acc_t = acc_type<scalar_t>;
  int64_t r = 0;
  if (n < 4 * span_lanes<acc_t>()) {
    // Short rows in groups, sums first (as in the forward): the row reductions overlap. The
    // rows still add into dw/db in order, so the results are the same.
    constexpr int64_t kGroup = 8;
    for (; r + kGroup <= rows; r += kGroup) {
      acc_t sum_g[kGroup], sum_g_xmu[kGroup];
      for (int64_t j = 0; j < kGroup; ++j) {
        const int64_t o = (r + j) * n;
        if (dw)
          layer_norm_row_backward_sums_impl(dy + o, x + o, n, mean[r + j], invstd[r + j], w, &sum_g[j], &sum_g_xmu[j],
                                            dw, db);
        else
          layer_norm_row_grad_sums_impl(dy + o, x + o, n, mean[r + j], w, &sum_g[j], &sum_g_xmu[j]);
      }
      if (!dx) continue;
      for (int64_t j = 0; j < kGroup; ++j) {
        const int64_t o = (r + j) * n;
        const auto coef = norm_input_grad_coef(invstd[r + j], sum_g[j], sum_g_xmu[j], static_cast<acc_t>(n));
        layer_norm_row_input_grad_impl(dy + o, x + o, dx + o, n, mean[r + j], invstd[r + j], w, coef.coef_g,
                                       coef.coef_xmu);
      }
    }
  }
  for (; r < rows; ++r) {
    acc_t sum_g, sum_g_xmu;
    if (dw)
      layer_norm_row_backward_sums_impl(dy + r * n, x + r * n, n, mean[r], invstd[r], w, &sum_g, &sum_g_xmu, dw, db);
    else
      layer_norm_row_grad_sums_impl(dy + r * n, x + r * n, n, mean[r], w, &sum_g, &sum_g_xmu);
    if (!dx) continue;
    const auto coef = norm_input_grad_coef(invstd[r], sum_g, sum_g_xmu, static_cast<acc_t>(n));
    layer_norm_row_input_grad_impl(dy + r * n, x + r * n, dx + r * n, n, mean[r], invstd[r], w, coef.coef_g,
                                   coef.coef_xmu);
  }
}

// Channels-last loops work on blocks of kChannelBlock channels: a block's lanes stay in
// registers across the rows (a row of C channels is C / kChannelBlock blocks side by side).
constexpr int64_t kChannelBlock = 64;

// Rows go in runs of kWelfordRunRows, each run's statistics merged into the total with Chan's
// formula: one long Welford in float drifts, every mean update rounding at the mean's magnitude
// (on (8, 4, 14, 14) data of mean 1e4, 2.3x torch's error against float64; runs: about torch's).
constexpr int64_t kWelfordRunRows = 64;

// Per-channel mean and M2 of `width` channels (kWidth when it is not 0: then the lanes stay in
// registers) over `rows` rows of C values.
template <int64_t kWidth, typename scalar_t>
CNNOPS_ALWAYS_INLINE void welford_rows_block(const scalar_t* __restrict x, int64_t rows, int64_t C, int64_t width,
                                             acc_type<scalar_t>* __restrict mean, acc_type<scalar_t>* __restrict m2) {
  using acc_t = acc_type<scalar_t>;
  const int64_t w = kWidth > 0 ? kWidth : width;
  acc_t total_mean[kChannelBlock] = {}, total_m2[kChannelBlock] = {};
  for (int64_t r0 = 0; r0 < rows; r0 += kWelfordRunRows) {
    const int64_t run = std::min(kWelfordRunRows, rows - r0);
    acc_t run_mean[kChannelBlock] = {}, run_m2[kChannelBlock] = {};
    for (int64_t r = 0; r < run; ++r) {
      const acc_t inv_count = acc_t(1) / static_cast<acc_t>(r + 1);
      const scalar_t* p = x + (r0 + r) * C;
      for (int64_t l = 0; l < w; ++l)
        welford_add_shared_count(run_mean[l], run_m2[l], static_cast<acc_t>(p[l]), inv_count);
    }
    const acc_t b_share = static_cast<acc_t>(run) / static_cast<acc_t>(r0 + run);
    const acc_t cross_weight = static_cast<acc_t>(r0) * b_share;  // n_a * n_b / n
    for (int64_t l = 0; l < w; ++l)
      welford_merge_shared_counts(total_mean[l], total_m2[l], run_mean[l], run_m2[l], b_share, cross_weight);
  }
  for (int64_t l = 0; l < w; ++l) {
    mean[l] = total_mean[l];
    m2[l] = total_m2[l];
  }
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void welford_rows_impl(const scalar_t* __restrict x, int64_t rows, int64_t C,
                                            acc_type<scalar_t>* __restrict mean, acc_type<scalar_t>* __restrict m2) {
  int64_t c0 = 0;
  for (; c0 + kChannelBlock <= C; c0 += kChannelBlock)
    welford_rows_block<kChannelBlock>(x + c0, rows, C, kChannelBlock, mean + c0, m2 + c0);
  if (c0 < C) welford_rows_block<0>(x + c0, rows, C, C - c0, mean + c0, m2 + c0);  // the remaining channels
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void normalize_rows_impl(const scalar_t* __restrict x, scalar_t* __restrict y, int64_t rows,
                                              int64_t C, const acc_type<scalar_t>* __restrict mean,
                                              const acc_type<scalar_t>* __restrict scale,
                                              const acc_type<scalar_t>* __restrict bias) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* p = x + r * C;
    scalar_t* q = y + r * C;
    for (int64_t c = 0; c < C; ++c)
      q[c] = static_cast<scalar_t>((static_cast<acc_t>(p[c]) - mean[c]) * scale[c] + bias[c]);
  }
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void grad_sums_rows_impl(const scalar_t* __restrict dy, const scalar_t* __restrict x, int64_t rows,
                                              int64_t C, const acc_type<scalar_t>* __restrict mean,
                                              acc_type<scalar_t>* __restrict sum_dy,
                                              acc_type<scalar_t>* __restrict sum_dy_xmu) {
  using acc_t = acc_type<scalar_t>;
  int64_t c0 = 0;
  for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) {
    acc_t a[kChannelBlock] = {};
    acc_t b[kChannelBlock] = {};
    acc_t mu[kChannelBlock];
    for (int64_t l = 0; l < kChannelBlock; ++l) mu[l] = mean[c0 + l];
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* pd = dy + r * C + c0;
      const scalar_t* px = x + r * C + c0;
      for (int64_t l = 0; l < kChannelBlock; ++l) {
        const acc_t g = static_cast<acc_t>(pd[l]);
        a[l] += g;
        b[l] += g * (static_cast<acc_t>(px[l]) - mu[l]);
      }
    }
    for (int64_t l = 0; l < kChannelBlock; ++l) {
      sum_dy[c0 + l] = a[l];
      sum_dy_xmu[c0 + l] = b[l];
    }
  }
  for (int64_t c = c0; c < C; ++c) sum_dy[c] = sum_dy_xmu[c] = acc_t(0);
  for (int64_t r = 0; r < rows && c0 < C; ++r) {
    const scalar_t* pd = dy + r * C;
    const scalar_t* px = x + r * C;
    for (int64_t c = c0; c < C; ++c) {
      const acc_t g = static_cast<acc_t>(pd[c]);
      sum_dy[c] += g;
      sum_dy_xmu[c] += g * (static_cast<acc_t>(px[c]) - mean[c]);
    }
  }
}

template <typename scalar_t>
CNNOPS_ALWAYS_INLINE void input_grad_rows_impl(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                               scalar_t* __restrict dx, int64_t rows, int64_t C,
                                               const acc_type<scalar_t>* __restrict w,
                                               const acc_type<scalar_t>* __restrict invstd,
                                               const acc_type<scalar_t>* __restrict mean,
                                               const acc_type<scalar_t>* __restrict coef_g,
                                               const acc_type<scalar_t>* __restrict coef_xmu) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* pd = dy + r * C;
    const scalar_t* px = x + r * C;
    scalar_t* q = dx + r * C;
    for (int64_t c = 0; c < C; ++c)
      q[c] = static_cast<scalar_t>(invstd[c] * (w[c] * static_cast<acc_t>(pd[c]) + coef_g[c]) +
                                   coef_xmu[c] * (static_cast<acc_t>(px[c]) - mean[c]));
  }
}

// ---- the exported loops, each compiled per ISA (simd.h) -----------------------------------

template <typename scalar_t>
Welford<acc_type<scalar_t>> welford_span(const scalar_t* x, int64_t n) {
  return CNNOPS_SIMD_CALL(welford_span_impl(x, n));
}

template <typename scalar_t>
void normalize_span(const scalar_t* x, scalar_t* y, int64_t n, acc_type<scalar_t> mean, acc_type<scalar_t> scale,
                    acc_type<scalar_t> bias) {
  CNNOPS_SIMD_CALL(normalize_span_impl(x, y, n, mean, scale, bias));
}

template <typename scalar_t>
void grad_sums_span(const scalar_t* dy, const scalar_t* x, int64_t n, acc_type<scalar_t> mean,
                    acc_type<scalar_t>* sum_dy, acc_type<scalar_t>* sum_dy_xmu) {
  CNNOPS_SIMD_CALL(grad_sums_span_impl(dy, x, n, mean, sum_dy, sum_dy_xmu));
}

template <typename scalar_t>
void input_grad_span(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, acc_type<scalar_t> w,
                     acc_type<scalar_t> invstd, acc_type<scalar_t> mean, acc_type<scalar_t> coef_g,
                     acc_type<scalar_t> coef_xmu) {
  CNNOPS_SIMD_CALL(input_grad_span_impl(dy, x, dx, n, w, invstd, mean, coef_g, coef_xmu));
}

template <typename scalar_t>
void layer_norm_row_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t n, acc_type<scalar_t> mean,
                              const acc_type<scalar_t>* w, acc_type<scalar_t>* sum_g, acc_type<scalar_t>* sum_g_xmu) {
  CNNOPS_SIMD_CALL(layer_norm_row_grad_sums_impl(dy, x, n, mean, w, sum_g, sum_g_xmu));
}

template <typename scalar_t>
void layer_norm_row_input_grad(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, acc_type<scalar_t> mean,
                               acc_type<scalar_t> invstd, const acc_type<scalar_t>* w, acc_type<scalar_t> coef_g,
                               acc_type<scalar_t> coef_xmu) {
  CNNOPS_SIMD_CALL(layer_norm_row_input_grad_impl(dy, x, dx, n, mean, invstd, w, coef_g, coef_xmu));
}

template <typename scalar_t>
void layer_norm_row_param_grad(const scalar_t* dy, const scalar_t* x, int64_t n, acc_type<scalar_t> mean,
                               acc_type<scalar_t> invstd, acc_type<scalar_t>* dw, acc_type<scalar_t>* db) {
  CNNOPS_SIMD_CALL(layer_norm_row_param_grad_impl(dy, x, n, mean, invstd, dw, db));
}

template <typename scalar_t>
void layer_norm_rows_forward(const scalar_t* x, scalar_t* y, int64_t rows, int64_t n, acc_type<scalar_t> eps,
                             const acc_type<scalar_t>* w, const acc_type<scalar_t>* b, acc_type<scalar_t>* mean_out,
                             acc_type<scalar_t>* invstd_out) {
  CNNOPS_SIMD_CALL(layer_norm_rows_forward_impl(x, y, rows, n, eps, w, b, mean_out, invstd_out));
}

template <typename scalar_t>
void layer_norm_rows_backward(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t rows, int64_t n,
                              const acc_type<scalar_t>* mean, const acc_type<scalar_t>* invstd,
                              const acc_type<scalar_t>* w, acc_type<scalar_t>* dw, acc_type<scalar_t>* db) {
  CNNOPS_SIMD_CALL(layer_norm_rows_backward_impl(dy, x, dx, rows, n, mean, invstd, w, dw, db));
}

template <typename scalar_t>
void welford_rows(const scalar_t* x, int64_t rows, int64_t C, acc_type<scalar_t>* mean, acc_type<scalar_t>* m2) {
  CNNOPS_SIMD_CALL(welford_rows_impl(x, rows, C, mean, m2));
}

template <typename scalar_t>
void normalize_rows(const scalar_t* x, scalar_t* y, int64_t rows, int64_t C, const acc_type<scalar_t>* mean,
                    const acc_type<scalar_t>* scale, const acc_type<scalar_t>* bias) {
  CNNOPS_SIMD_CALL(normalize_rows_impl(x, y, rows, C, mean, scale, bias));
}

template <typename scalar_t>
void grad_sums_rows(const scalar_t* dy, const scalar_t* x, int64_t rows, int64_t C, const acc_type<scalar_t>* mean,
                    acc_type<scalar_t>* sum_dy, acc_type<scalar_t>* sum_dy_xmu) {
  CNNOPS_SIMD_CALL(grad_sums_rows_impl(dy, x, rows, C, mean, sum_dy, sum_dy_xmu));
}

template <typename scalar_t>
void input_grad_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t rows, int64_t C,
                     const acc_type<scalar_t>* w, const acc_type<scalar_t>* invstd, const acc_type<scalar_t>* mean,
                     const acc_type<scalar_t>* coef_g, const acc_type<scalar_t>* coef_xmu) {
  CNNOPS_SIMD_CALL(input_grad_rows_impl(dy, x, dx, rows, C, w, invstd, mean, coef_g, coef_xmu));
}

// ---- host helpers --------------------------------------------------------------------------

template <typename acc_t>
std::vector<acc_t> load_param(const c10::optional<at::Tensor>& param, int64_t n, acc_t fill) {
  std::vector<acc_t> out(static_cast<size_t>(n), fill);
  if (!param.has_value() || !param->defined()) return out;
  const at::Tensor& t = *param;
  const int64_t stride = t.dim() == 1 ? t.stride(0) : 1;
  TORCH_INTERNAL_ASSERT(t.numel() == n);
  const at::Tensor tc = t.dim() == 1 ? t : t.contiguous();  // layer norm: any shape, dense read
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "load_param", [&] {
    const scalar_t* p = tc.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i * stride]);
  });
  return out;
}

template <typename acc_t>
void store_param(at::Tensor& param, const std::vector<acc_t>& values) {
  TORCH_INTERNAL_ASSERT(param.dim() == 1 && param.numel() == static_cast<int64_t>(values.size()));
  const int64_t stride = param.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "store_param", [&] {
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) p[i * stride] = static_cast<scalar_t>(values[i]);
  });
}

bool use_rows_layout(const at::Tensor& input, int64_t spatial) {
  if (spatial == 1) return true;
  const auto fmt = input.suggest_memory_format();
  return (input.dim() == 4 && fmt == at::MemoryFormat::ChannelsLast) ||
         (input.dim() == 5 && fmt == at::MemoryFormat::ChannelsLast3d);
}

at::Tensor dense_for_layout(const at::Tensor& t, bool rows_layout) {
  if (rows_layout && t.dim() == 4) return t.contiguous(at::MemoryFormat::ChannelsLast);
  if (rows_layout && t.dim() == 5) return t.contiguous(at::MemoryFormat::ChannelsLast3d);
  return t.contiguous();
}

// ---- instantiations ------------------------------------------------------------------------

#define CNNOPS_INSTANTIATE_NORM(T)                                                                                   \
  template Welford<acc_type<T>> welford_span<T>(const T*, int64_t);                                                  \
  template void normalize_span<T>(const T*, T*, int64_t, acc_type<T>, acc_type<T>, acc_type<T>);                     \
  template void grad_sums_span<T>(const T*, const T*, int64_t, acc_type<T>, acc_type<T>*, acc_type<T>*);             \
  template void input_grad_span<T>(const T*, const T*, T*, int64_t, acc_type<T>, acc_type<T>, acc_type<T>,           \
                                   acc_type<T>, acc_type<T>);                                                        \
  template void layer_norm_row_grad_sums<T>(const T*, const T*, int64_t, acc_type<T>, const acc_type<T>*,            \
                                            acc_type<T>*, acc_type<T>*);                                             \
  template void layer_norm_row_input_grad<T>(const T*, const T*, T*, int64_t, acc_type<T>, acc_type<T>,              \
                                             const acc_type<T>*, acc_type<T>, acc_type<T>);                          \
  template void layer_norm_row_param_grad<T>(const T*, const T*, int64_t, acc_type<T>, acc_type<T>, acc_type<T>*,    \
                                             acc_type<T>*);                                                          \
  template void layer_norm_rows_forward<T>(const T*, T*, int64_t, int64_t, acc_type<T>, const acc_type<T>*,          \
                                           const acc_type<T>*, acc_type<T>*, acc_type<T>*);                          \
  template void layer_norm_rows_backward<T>(const T*, const T*, T*, int64_t, int64_t, const acc_type<T>*,            \
                                            const acc_type<T>*, const acc_type<T>*, acc_type<T>*, acc_type<T>*);     \
  template void welford_rows<T>(const T*, int64_t, int64_t, acc_type<T>*, acc_type<T>*);                             \
  template void normalize_rows<T>(const T*, T*, int64_t, int64_t, const acc_type<T>*, const acc_type<T>*,            \
                                  const acc_type<T>*);                                                               \
  template void grad_sums_rows<T>(const T*, const T*, int64_t, int64_t, const acc_type<T>*, acc_type<T>*,            \
                                  acc_type<T>*);                                                                     \
  template void input_grad_rows<T>(const T*, const T*, T*, int64_t, int64_t, const acc_type<T>*, const acc_type<T>*, \
                                   const acc_type<T>*, const acc_type<T>*, const acc_type<T>*);

CNNOPS_INSTANTIATE_NORM(float)
CNNOPS_INSTANTIATE_NORM(double)
CNNOPS_INSTANTIATE_NORM(c10::BFloat16)
CNNOPS_INSTANTIATE_NORM(c10::Half)
#undef CNNOPS_INSTANTIATE_NORM

template std::vector<float> load_param<float>(const c10::optional<at::Tensor>&, int64_t, float);
template std::vector<double> load_param<double>(const c10::optional<at::Tensor>&, int64_t, double);
template void store_param<float>(at::Tensor&, const std::vector<float>&);
template void store_param<double>(at::Tensor&, const std::vector<double>&);

}  // namespace cpu
}  // namespace cnnops
