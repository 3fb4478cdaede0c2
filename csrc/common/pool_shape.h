#pragma once
// Pooling geometry shared by the CPU and CUDA kernels. Like convolution, every pool is handled
// as a 3-d one: 1d is (1, 1, W) and 2d is (1, H, W) with unit leading dims.
#include <cstdint>

#include "macros.h"

namespace cnnops {

// Floor division for a positive divisor and a numerator of either sign (ceil_div: macros.h).
CNNOPS_HD int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
CNNOPS_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
CNNOPS_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Output sizes come from window_count (checked_math.h; formulas.md §Pool output size),
// computed once by the geometry builders in exact arithmetic.

struct PoolGeometry {
  int64_t batch, channels;
  int64_t in[3], out[3];  // (D, H, W)
  int64_t kernel[3], stride[3], pad[3], dilation[3];

  CNNOPS_HD int64_t in_plane() const { return in[0] * in[1] * in[2]; }
  CNNOPS_HD int64_t out_plane() const { return out[0] * out[1] * out[2]; }
  CNNOPS_HD int64_t planes() const { return batch * channels; }
};

// The input coordinates one output position's window reads along one dim: start, start + step,
// ... below end. Every coordinate is inside the input.
struct PoolWindow {
  int64_t start, end, step;
};

// Max pool: taps o*S - P + k*D for k < K; taps in the (-inf) padding are skipped. With the
// geometry validated (pool_checks.h), o*S - P and (K-1)*D fit int64, but their sum may not: the
// end is clamped to the input first.
CNNOPS_HD PoolWindow max_pool_window(int64_t o, int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                     int64_t dilation) {
  int64_t start = o * stride - pad;
  const int64_t last = (kernel - 1) * dilation;  // offset of the last tap
  const int64_t end = (start >= in || last >= in - start) ? in : start + last + 1;
  if (start < 0) {  // first tap at or after 0: start + ceil(-start / D) * D
    const int64_t r = (-start) % dilation;
    start = r == 0 ? 0 : dilation - r;
  }
  return {start, end, dilation};
}

// Average pool: the window [o*S - P, o*S - P + K) clipped to the padded input and then to the
// input. `padded_count` is what count_include_pad divides by: the window's size inside the
// padded bounds (a ceil_mode window running past them counts only what it covers).
struct AvgWindow {
  int64_t start, end, padded_count;
};
CNNOPS_HD AvgWindow avg_pool_window(int64_t o, int64_t in, int64_t kernel, int64_t stride, int64_t pad) {
  const int64_t start = o * stride - pad;
  const int64_t end = min64(start + kernel, in + pad);
  return {max64(start, 0), min64(end, in), end - start};
}

// The divisor of one 3-d average-pool window, as torch defines it.
CNNOPS_HD int64_t avg_pool_divisor(const AvgWindow& d, const AvgWindow& h, const AvgWindow& w, bool count_include_pad,
                                   int64_t divisor_override) {
  if (divisor_override != 0) return divisor_override;
  if (count_include_pad) return d.padded_count * h.padded_count * w.padded_count;
  return (d.end - d.start) * (h.end - h.start) * (w.end - w.start);
}

// Adaptive pools: output o of `out` covers [floor(o*I/O), ceil((o+1)*I/O)).
CNNOPS_HD int64_t adaptive_start(int64_t o, int64_t in, int64_t out) { return (o * in) / out; }
CNNOPS_HD int64_t adaptive_end(int64_t o, int64_t in, int64_t out) { return ((o + 1) * in + out - 1) / out; }

// Backward as a gather: the output positions [lo, hi) whose window span [o*S - P,
// o*S - P + span) contains input coordinate i. span = D(K-1)+1 for max pool (a dilated window
// may still skip i: the caller checks the argmax) and K for average pool.
struct OutputRange {
  int64_t lo, hi;
};
CNNOPS_HD OutputRange pool_outputs_covering(int64_t i, int64_t out, int64_t span, int64_t stride, int64_t pad) {
  const int64_t lo = max64(ceil_div(i + pad - span + 1, stride), 0);
  const int64_t hi = min64(floor_div(i + pad, stride) + 1, out);
  return {lo, hi};
}

// Adaptive pools' gather: o covers i iff floor(o*I/O) <= i < ceil((o+1)*I/O), which solves to
// floor(i*O/I) <= o < ceil((i+1)*O/I).
CNNOPS_HD OutputRange adaptive_outputs_covering(int64_t i, int64_t in, int64_t out) {
  return {(i * out) / in, min64(((i + 1) * out + in - 1) / in, out)};
}

}  // namespace cnnops
