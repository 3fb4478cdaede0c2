#pragma once
// The per-channel passes of batch norm on the CPU, shared by batch_norm.cpp and
// sync_batch_norm.cpp (SyncBatchNorm's per-rank pieces run the same reductions).
#include <ATen/Parallel.h>

#include <vector>

#include "common/norm_checks.h"
#include "cpu/norm_cpu.h"

namespace cnnops {
namespace cpu {

// Per-channel Welford statistics of x (dense in its layout).
template <typename scalar_t>
std::vector<Welford<acc_type<scalar_t>>> channel_stats(const scalar_t* x, const ChannelNormShape& s, bool rows_layout) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = s.batch, C = s.channels, S = s.spatial;
  std::vector<Welford<acc_t>> stats(static_cast<size_t>(C));
  if (N * S == 0) return stats;
  if (!rows_layout) {
    const int64_t chunks = ceil_div(S, kSpanChunk);
    const int64_t chunk_len = std::min(S, kSpanChunk);
    std::vector<Welford<acc_t>> partial(static_cast<size_t>(N * C * chunks));
    at::parallel_for(0, N * C * chunks, grain_for(chunk_len), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t plane = i / chunks, k = i % chunks;
        const int64_t start = k * kSpanChunk;
        partial[i] = welford_span(x + plane * S + start, std::min(kSpanChunk, S - start));
      }
    });
    // N * C * chunks merges: too little work for another parallel region.
    for (int64_t c = 0; c < C; ++c)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < chunks; ++k) stats[c].merge(partial[(n * C + c) * chunks + k]);
    return stats;
  }
  const RowBlocks blocks(N * S, C);
  std::vector<acc_t> mean(static_cast<size_t>(blocks.count * C)), m2(mean.size());
  at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      welford_rows(x + blocks.begin(b) * C, blocks.size(b), C, &mean[b * C], &m2[b * C]);
  });
  for (int64_t b = 0; b < blocks.count; ++b)
    for (int64_t c = 0; c < C; ++c) {
      Welford<acc_t> part;
      part.mean = mean[b * C + c];
      part.m2 = m2[b * C + c];
      part.count = static_cast<acc_t>(blocks.size(b));
      stats[c].merge(part);
    }
  return stats;
}

// Elementwise pass with per-channel coefficients: NCHW plane by plane, channels-last in row
// blocks (any partition: every element is independent).
template <typename PlaneFn, typename RowsFn>
void for_each_channel_slice(const ChannelNormShape& s, bool rows_layout, int64_t values_per_elem,
                            const PlaneFn& plane_fn, const RowsFn& rows_fn) {
  const int64_t N = s.batch, C = s.channels, S = s.spatial;
  if (N * C * S == 0) return;
  if (!rows_layout) {
    at::parallel_for(0, N * C, grain_for(S * values_per_elem), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) plane_fn(p * S, S, p % C);
    });
    return;
  }
  const int64_t rows = N * S;
  const int64_t per = std::max<int64_t>(1, kParallelGrainValues / (C * values_per_elem));
  at::parallel_for(0, ceil_div(rows, per), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) rows_fn(b * per * C, std::min(per, rows - b * per));
  });
}

// y = (x - mean) * invstd * w + b per channel (formulas.md §Norm statistics).
template <typename scalar_t, typename acc_t>
void normalize_channels(const ChannelNormShape& s, bool rows, const scalar_t* xp, scalar_t* yp,
                        const std::vector<acc_t>& mean, const std::vector<acc_t>& invstd,
                        const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t C = s.channels;
  const auto w = load_param<acc_t>(weight, C, 1);
  const auto b = load_param<acc_t>(bias, C, 0);
  std::vector<acc_t> scale(C);
  for (int64_t c = 0; c < C; ++c) scale[c] = norm_scale(invstd[c], w[c]);
  for_each_channel_slice(
      s, rows, 2,
      [&](int64_t off, int64_t len, int64_t c) { normalize_span(xp + off, yp + off, len, mean[c], scale[c], b[c]); },
      [&](int64_t off, int64_t nrows) {
        normalize_rows(xp + off, yp + off, nrows, C, mean.data(), scale.data(), b.data());
      });
}

}  // namespace cpu
}  // namespace cnnops
