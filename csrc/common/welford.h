#pragma once
// One-pass mean and variance (Welford), and Chan's formula to merge two partial results, shared
// by the CPU normalization kernels (threads, SIMD lanes) and the CUDA ones (warp shuffles,
// blocks). Subtracting a running mean keeps the variance exact for inputs with a large mean,
// where E[x^2] - E[x]^2 cancels catastrophically.
#include "macros.h"

namespace cnnops {

template <typename acc_t>
struct Welford {
  acc_t mean = 0;
  acc_t m2 = 0;     // sum of squared deviations from mean
  acc_t count = 0;  // acc_t, not an integer: merges divide by it

  CNNOPS_HD void add(acc_t x) {
    count += 1;
    const acc_t delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }

  // Chan et al.: the statistics of the union of two disjoint sets.
  CNNOPS_HD void merge(const Welford& other) {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    const acc_t total = count + other.count;
    const acc_t delta = other.mean - mean;
    const acc_t other_share = other.count / total;
    mean += delta * other_share;
    m2 += other.m2 + delta * delta * count * other_share;
    count = total;
  }

  CNNOPS_HD acc_t biased_variance() const { return count > 0 ? m2 / count : acc_t(0); }
  CNNOPS_HD acc_t unbiased_variance() const { return m2 / (count - 1); }
};

}  // namespace cnnops
