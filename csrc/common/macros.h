#pragma once
// Macros and small helpers shared by every kernel family (CPU and CUDA).
#include <stdint.h>

#include <initializer_list>
#include <limits>

// Functions in csrc/common are compiled for the host and, under nvcc, for the device too,
// so the CPU tests exercise the very index math the CUDA kernels run.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define CNNOPS_HD __host__ __device__ __forceinline__
#else
#define CNNOPS_HD inline
#endif

// Hot inner helpers of the CPU kernels: inlined even into functions compiled for another ISA
// (a target attribute otherwise blocks inlining of a function compiled without it).
#define CNNOPS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace cnnops {

// Ceil division for a positive divisor and a numerator of either sign; no intermediate can
// overflow (a + b - 1 would, for the int64 strides max_pool1d accepts).
CNNOPS_HD int64_t ceil_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a > 0) ? q + 1 : q;
}

// Whether a CUDA kernel may index these tensors with int32: every offset a kernel forms is below
// the numel of the tensor it indexes, and the margin covers thread indices that run up to one
// grid-stride step (< 2^25) past the end.
inline bool fits_int32(std::initializer_list<int64_t> numels) {
  for (int64_t n : numels)
    if (n > std::numeric_limits<int32_t>::max() - (int64_t{1} << 25)) return false;
  return true;
}

// Calls f(int32_t{}) when int32 indices suffice (cheaper index math), else f(int64_t{}).
template <typename F>
void with_index_type(bool int32_ok, F&& f) {
  if (int32_ok)
    f(int32_t{});
  else
    f(int64_t{});
}

}  // namespace cnnops
