#pragma once
// Index math of the CUDA normalization kernels (csrc/cuda/norm_kernels.cuh), host+device so
// tests/test_norm_cuda.py can run it on the CPU: which statistic and which affine channel an
// element belongs to, where a thread's next element of a reduction lies, and which partial
// results the second stage of a reduction merges, in which order.
#include "macros.h"

namespace cnnops {

// Every normalization as "element i uses statistic stat(i) and affine channel channel(i)",
// for a tensor that is contiguous in its own memory format:
//   channels_first: [N][C][inner]  (NCHW: inner = spatial size)
//   channels_last:  [N][inner][C]  (NHWC)
// stat(i) = n * stats_per_sample + channel(i) / channels_per_stat, so
//   batch norm:  stats_per_sample = 0, channels_per_stat = 1    -> stat = c
//   group norm:  stats_per_sample = G, channels_per_stat = C / G -> stat = n * G + c / (C / G)
//   layer norm:  channels_last, C = K (the normalized size), inner = 1,
//                stats_per_sample = 1, channels_per_stat = K     -> stat = row, channel = k
template <typename index_t>
struct NormIndex {
  index_t channels;
  index_t inner;
  index_t stats_per_sample;
  index_t channels_per_stat;

  template <bool channels_last>
  CNNOPS_HD index_t channel(index_t i) const {
    return channels_last ? i % channels : (i / inner) % channels;
  }
  CNNOPS_HD index_t stat(index_t i, index_t c) const {
    return (i / (inner * channels)) * stats_per_sample + c / channels_per_stat;
  }
};

// Walks the flattened index j = n * inner + l of a [outer][channels][inner] view with a fixed
// step, keeping (n, l) without a division per element: step = q * inner + r.
template <typename index_t>
struct PlaneCursor {
  index_t n, l, q, r, inner;

  CNNOPS_HD PlaneCursor(index_t j, index_t inner_, index_t step)
      : n(j / inner_), l(j % inner_), q(step / inner_), r(step % inner_), inner(inner_) {}

  CNNOPS_HD void advance() {
    n += q;
    l += r;
    if (l >= inner) {
      l -= inner;
      ++n;
    }
  }
  // Offset of element (n, c, l) in [outer][channels][inner].
  CNNOPS_HD index_t offset(index_t c, index_t channels) const { return (n * channels + c) * inner + l; }
};

// Second stage of a two-stage reduction: output o merges the partials
//   (o / groups) * outer_stride + (o % groups) * inner_stride + k * chunk_stride + d * part_stride
// for k = 0 .. chunks-1 (outer loop) and d = 0 .. parts-1 (inner loop), always in that order,
// so a result never depends on scheduling.
struct PartialIndex {
  int64_t groups = 1;
  int64_t outer_stride = 0;
  int64_t inner_stride = 0;
  int64_t chunks = 1;
  int64_t chunk_stride = 0;
  int64_t parts = 1;
  int64_t part_stride = 0;

  CNNOPS_HD int64_t base(int64_t o) const { return (o / groups) * outer_stride + (o % groups) * inner_stride; }
  CNNOPS_HD int64_t at(int64_t o, int64_t k, int64_t d) const {
    return base(o) + k * chunk_stride + d * part_stride;
  }
};

// Chunking of a reduction of `length` elements into at most `max_chunks` pieces of at least
// `min_len`, enough for ~target_blocks blocks overall. Depends only on sizes: deterministic.
inline int64_t norm_chunk_count(int64_t blocks_per_chunk, int64_t length, int64_t min_len,
                                int64_t target_blocks = 1024, int64_t max_chunks = 1024) {
  if (blocks_per_chunk < 1) blocks_per_chunk = 1;
  int64_t chunks = (target_blocks + blocks_per_chunk - 1) / blocks_per_chunk;
  const int64_t by_len = length / (min_len > 0 ? min_len : 1);
  if (chunks > by_len) chunks = by_len;
  if (chunks > max_chunks) chunks = max_chunks;
  return chunks < 1 ? 1 : chunks;
}

}  // namespace cnnops
