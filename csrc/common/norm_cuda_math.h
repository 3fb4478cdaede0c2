#pragma once
// Index math of the CUDA normalization kernels (csrc/cuda/norm_kernels.cuh), host+device so
// tests/test_norm_kernel_math.py runs it, with the kernels, on the CPU: which statistic and
// which affine channel an element belongs to, where a thread's next element of a reduction
// lies, and which partial results the second stage of a reduction merges, in which order.
#include <stdint.h>

#include "macros.h"
#include "norm_math.h"
#include "welford.h"

namespace cnnops {

// Division by a divisor fixed for a whole launch. int64_t: the hardware division. int32_t
// (every index below 2^31): multiply-high by a magic number and shift (Granlund-Montgomery, as
// torch's IntDivider), a few instructions instead of the ~20 of an integer division, which the
// elementwise kernels would otherwise pay several times per element.
CNNOPS_HD uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

template <typename index_t>
struct Divider {
  index_t d;
  CNNOPS_HD explicit Divider(index_t divisor) : d(divisor > 0 ? divisor : 1) {}
  CNNOPS_HD index_t div(index_t n) const { return n / d; }
};

template <>
struct Divider<int32_t> {
  uint32_t magic;
  uint32_t shift;
  // divisor in [1, 2^31 - 1]; n / divisor = (mul_hi(n, magic) + n) >> shift for n in [0, 2^31).
  CNNOPS_HD explicit Divider(int32_t divisor) {
    const uint32_t d = divisor > 0 ? static_cast<uint32_t>(divisor) : 1u;
    shift = 0;
    while ((uint32_t{1} << shift) < d) ++shift;  // smallest 2^shift >= d (shift <= 31)
    const uint64_t one = 1;
    magic = static_cast<uint32_t>(((one << 32) * ((one << shift) - d)) / d + 1);
  }
  CNNOPS_HD int32_t div(int32_t n) const {
    const uint32_t un = static_cast<uint32_t>(n);
    return static_cast<int32_t>((mul_hi_u32(un, magic) + un) >> shift);
  }
};

// Every normalization as "element i uses statistic stat and affine channel c", for a tensor
// that is contiguous in its own memory format:
//   channels_first: [N][C][inner]  (NCHW: inner = spatial size)
//   channels_last:  [N][inner][C]  (NHWC)
// stat = n * stats_per_sample + c / channels_per_stat, so
//   batch norm:  stats_per_sample = 0, channels_per_stat = 1    -> stat = c
//   group norm:  stats_per_sample = G, channels_per_stat = C / G -> stat = n * G + c / (C / G)
//   layer norm:  channels_last, C = K (the normalized size), inner = 1,
//                stats_per_sample = 1, channels_per_stat = K     -> stat = row, channel = k
// All sizes >= 1 (the kernels only run on non-empty tensors).
template <typename index_t>
struct NormIndex {
  index_t channels;
  index_t stats_per_sample;
  Divider<index_t> inner_div;
  Divider<index_t> channels_div;
  Divider<index_t> per_stat_div;

  CNNOPS_HD NormIndex(index_t channels_, index_t inner, index_t stats_per_sample_, index_t channels_per_stat)
      : channels(channels_),
        stats_per_sample(stats_per_sample_),
        inner_div(inner),
        channels_div(channels_),
        per_stat_div(channels_per_stat) {}

  template <bool channels_last>
  CNNOPS_HD void locate(index_t i, index_t& c, index_t& stat) const {
    index_t n;
    if (channels_last) {  // i = (n * inner + l) * C + c
      const index_t q = channels_div.div(i);
      c = i - q * channels;
      n = inner_div.div(q);
    } else {  // i = (n * C + c) * inner + l
      const index_t p = inner_div.div(i);
      n = channels_div.div(p);
      c = p - n * channels;
    }
    stat = n * stats_per_sample + per_stat_div.div(c);
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
  CNNOPS_HD int64_t at(int64_t o, int64_t k, int64_t d) const { return base(o) + k * chunk_stride + d * part_stride; }
};

// Second stage of a planes reduction: statistic o is channel o, partials o * chunks + k.
inline PartialIndex planes_partials(int64_t chunks) {
  PartialIndex pi;
  pi.outer_stride = chunks;
  pi.chunks = chunks;
  pi.chunk_stride = 1;
  return pi;
}

// Second stage of a columns reduction ([batch][rows][cols], partials at (b * chunks + k) * cols
// + col): statistic o = b * stats_per_batch + s merges columns s * parts .. s * parts + parts - 1
// of batch b. Per-column statistics (batch norm, layer norm's weight gradients, group norm's
// per-(n, c) sums): stats_per_batch = cols, parts = 1. Group norm NHWC: stats_per_batch = G,
// parts = C / G.
inline PartialIndex columns_partials(int64_t chunks, int64_t cols, int64_t stats_per_batch, int64_t parts) {
  PartialIndex pi;
  pi.groups = stats_per_batch;
  pi.outer_stride = chunks * cols;
  pi.inner_stride = parts;
  pi.chunks = chunks;
  pi.chunk_stride = cols;
  pi.parts = parts;
  pi.part_stride = 1;
  return pi;
}

// Chunking of a reduction of `length` elements into at most `max_chunks` pieces of at least
// `min_len`, enough for ~target_blocks blocks overall. Depends only on sizes: deterministic.
inline int64_t norm_chunk_count(int64_t blocks_per_chunk, int64_t length, int64_t min_len, int64_t target_blocks = 1024,
                                int64_t max_chunks = 1024) {
  if (blocks_per_chunk < 1) blocks_per_chunk = 1;
  int64_t chunks = ceil_div(target_blocks, blocks_per_chunk);
  const int64_t by_len = length / (min_len > 0 ? min_len : 1);
  if (chunks > by_len) chunks = by_len;
  if (chunks > max_chunks) chunks = max_chunks;
  return chunks < 1 ? 1 : chunks;
}

// Launch shape of a planes reduction ([outer][channels][inner], statistics per channel): a block
// per (channel, chunk) of the flattened (n, l) range. Threads per block: enough to give each a
// few values (layer norm rows of 64 values get one warp, long reductions 256 threads).
struct PlanesConfig {
  int64_t chunks;
  int64_t chunk_len;
  int threads;
};

inline PlanesConfig planes_config(int64_t outer, int64_t channels, int64_t inner) {
  const int64_t total = outer * inner;
  const int64_t want = norm_chunk_count(channels, total, 4096);
  PlanesConfig c;
  c.chunk_len = total > 0 ? ceil_div(total, want) : 1;
  c.chunks = total > 0 ? ceil_div(total, c.chunk_len) : 1;
  c.threads = c.chunk_len >= 1024 ? 256 : c.chunk_len >= 512 ? 128 : c.chunk_len >= 256 ? 64 : 32;
  return c;
}

// Launch shape of a columns reduction ([batch][rows][cols], statistics per (batch, col)): blocks
// of kColumnThreadsX columns x kColumnThreadsY rows, a chunk of rows each, batch on grid z.
constexpr int kColumnThreadsX = 32;
constexpr int kColumnThreadsY = 8;
constexpr int64_t kColumnMaxGridZ = 65535;

struct ColumnsConfig {
  int64_t col_blocks;
  int64_t grid_z;
  int64_t chunks;
  int64_t chunk_len;
};

inline ColumnsConfig columns_config(int64_t batch, int64_t rows, int64_t cols) {
  ColumnsConfig c;
  c.col_blocks = ceil_div(cols, kColumnThreadsX);
  c.grid_z = batch < kColumnMaxGridZ ? batch : kColumnMaxGridZ;
  const int64_t want = norm_chunk_count(c.col_blocks * c.grid_z, rows, 64);
  c.chunk_len = rows > 0 ? ceil_div(rows, want) : 1;
  c.chunks = rows > 0 ? ceil_div(rows, c.chunk_len) : 1;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Reduction states and what the reductions accumulate per element.
// ---------------------------------------------------------------------------------------------

// Gradient sums: a = sum(g), b = sum(g * (x - mean) * scale).
template <typename acc_t>
struct SumPair {
  acc_t a = 0;
  acc_t b = 0;
  CNNOPS_HD void merge(const SumPair& o) {
    a += o.a;
    b += o.b;
  }
};

// Partial buffers are structure-of-arrays: field f of partial p at buffer[f * count + p].
template <typename acc_t>
CNNOPS_HD void store_state(const Welford<acc_t>& w, acc_t* buf, int64_t p, int64_t count) {
  buf[p] = w.mean;
  buf[count + p] = w.m2;
  buf[2 * count + p] = w.count;
}
template <typename acc_t>
CNNOPS_HD void load_state(Welford<acc_t>& w, const acc_t* buf, int64_t p, int64_t count) {
  w.mean = buf[p];
  w.m2 = buf[count + p];
  w.count = buf[2 * count + p];
}
template <typename acc_t>
CNNOPS_HD void store_state(const SumPair<acc_t>& s, acc_t* buf, int64_t p, int64_t count) {
  buf[p] = s.a;
  buf[count + p] = s.b;
}
template <typename acc_t>
CNNOPS_HD void load_state(SumPair<acc_t>& s, const acc_t* buf, int64_t p, int64_t count) {
  s.a = buf[p];
  s.b = buf[count + p];
}

// Second stage: the partials of statistic o merged in PartialIndex order.
template <typename State, typename acc_t>
CNNOPS_HD State merge_partials(const acc_t* partial, int64_t partial_count, const PartialIndex& pi, int64_t o) {
  State s;
  for (int64_t k = 0; k < pi.chunks; ++k)
    for (int64_t d = 0; d < pi.parts; ++d) {
      State p;
      load_state(p, partial, pi.at(o, k, d), partial_count);
      s.merge(p);
    }
  return s;
}

// Statistics: Welford over the values.
template <typename scalar_t, typename acc_t>
struct WelfordOp {
  using State = Welford<acc_t>;
  const scalar_t* x;

  template <typename index_t>
  CNNOPS_HD void plane(State& s, index_t off, index_t /*c*/, index_t /*l*/) const {
    s.add(static_cast<acc_t>(x[off]));
  }
  template <typename index_t>
  CNNOPS_HD void column(State& s, index_t off, index_t /*b*/, index_t /*r*/, index_t /*col*/) const {
    s.add(static_cast<acc_t>(x[off]));
  }
};

// Gradient sums with the statistic each element was normalized with:
//   planes:  stat = c / channels_per_stat; g = dy * weight[l] when weight is given (layer norm
//            rows), else dy;
//   columns: stat = b * stats_per_sample + col / channels_per_stat, scale 1 (batch and group
//            norm), or, when per_row, stat = r and scale = invstd[r] (layer norm's weight grad).
// The known mean is subtracted per element: sum(g * x) - mean * sum(g) would cancel for inputs
// with a large mean.
template <typename scalar_t, typename param_t, typename acc_t>
struct GradSumsOp {
  using State = SumPair<acc_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* mean;
  const acc_t* invstd;
  const param_t* weight;  // planes only, may be null
  int64_t stats_per_sample;
  int64_t channels_per_stat;
  bool per_row;

  template <typename index_t>
  CNNOPS_HD void plane(State& s, index_t off, index_t c, index_t l) const {
    acc_t g = static_cast<acc_t>(dy[off]);
    if (weight != nullptr) g *= static_cast<acc_t>(weight[l]);
    const acc_t mu = mean[c / static_cast<index_t>(channels_per_stat)];
    s.a += g;
    s.b += g * (static_cast<acc_t>(x[off]) - mu);
  }
  template <typename index_t>
  CNNOPS_HD void column(State& s, index_t off, index_t b, index_t r, index_t col) const {
    const acc_t g = static_cast<acc_t>(dy[off]);
    const acc_t xv = static_cast<acc_t>(x[off]);
    s.a += g;
    if (per_row) {
      s.b += g * ((xv - mean[r]) * invstd[r]);
    } else {
      const index_t st = b * static_cast<index_t>(stats_per_sample) + col / static_cast<index_t>(channels_per_stat);
      s.b += g * (xv - mean[st]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Per element.
// ---------------------------------------------------------------------------------------------

// y = (x - mean) * invstd * w + b (formulas.md §Norm statistics); w = 1, b = 0 without
// affine (exact). The difference x - mean comes first: x * scale + shift would lose the digits
// of x_hat for inputs with a large mean.
template <typename acc_t>
CNNOPS_HD acc_t norm_output(acc_t x, acc_t mean, acc_t invstd, acc_t weight, acc_t bias) {
  return (x - mean) * invstd * weight + bias;
}

// dx = invstd * (g + coef_g) + coef_xmu * (x - mean), g = dy * w, with the per-statistic
// coefficients of norm_input_grad_coef (norm_math.h; formulas.md §Norm backward,
// written the way the CPU kernels evaluate it).
template <typename acc_t>
CNNOPS_HD acc_t norm_grad_input(acc_t dy, acc_t x, acc_t mean, acc_t invstd, acc_t weight, acc_t coef_g,
                                acc_t coef_xmu) {
  return invstd * (dy * weight + coef_g) + coef_xmu * (x - mean);
}

// Batch norm eval: mean and invstd are constants (the running statistics), so the map is a
// per-channel scale: dx = dy * w * invstd.
template <typename acc_t>
CNNOPS_HD acc_t norm_grad_input_eval(acc_t dy, acc_t invstd, acc_t weight) {
  return dy * weight * invstd;
}

}  // namespace cnnops
