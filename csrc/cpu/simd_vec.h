#pragma once
// Fixed-width vectors (GCC vector extensions) for the direct convolution kernels written once and
// compiled per ISA through simd_dispatch (conv_depthwise_direct.cpp, conv_grouped.cpp): BYTES is
// vector_bytes() of the ISA the body is instantiated for.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/macros.h"
#include "cpu/simd.h"

namespace cnnops {
namespace cpu {

// Bytes per vector: AVX-512 64, AVX2 32, the baseline 16 (SSE2, NEON).
constexpr int vector_bytes(Isa isa) { return isa == Isa::Avx512 ? 64 : isa == Isa::Avx2 ? 32 : 16; }

constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <typename T, int BYTES>
struct Simd {
  typedef T vec __attribute__((vector_size(BYTES)));
  using int_type = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef int_type mask __attribute__((vector_size(BYTES)));
  static constexpr int lanes = BYTES / sizeof(T);

  static CNNOPS_ALWAYS_INLINE vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(vec));
    return v;
  }
  static CNNOPS_ALWAYS_INLINE mask load_mask(const int_type* p) {
    mask v;
    std::memcpy(&v, p, sizeof(mask));
    return v;
  }
  static CNNOPS_ALWAYS_INLINE void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
  // Lanes [0, n) only (n < lanes), a lane at a time: no library call.
  static CNNOPS_ALWAYS_INLINE void store_first(T* p, vec v, int64_t n) {
    for (int64_t i = 0; i < n; ++i) p[i] = v[i];
  }
  static CNNOPS_ALWAYS_INLINE vec load_first(const T* p, int64_t n) {  // zeros after lane n
    vec v{};
    for (int64_t i = 0; i < n; ++i) v[i] = p[i];
    return v;
  }
  // dst[0, n) = src[0, n) in whole vectors, the last one overlapping the one before
  static CNNOPS_ALWAYS_INLINE void copy_row(T* dst, const T* src, int64_t n) {
    if (n < lanes) {
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
      return;
    }
    for (int64_t i = 0; i + lanes <= n; i += lanes) store(dst + i, load(src + i));
    if (n % lanes) store(dst + n - lanes, load(src + n - lanes));
  }
  // Every lane s. (vec{} + s would add 0 first: an extra instruction, and -0.0 would become +0.0.)
  static CNNOPS_ALWAYS_INLINE vec splat(T s) {
    vec v;
    for (int i = 0; i < lanes; ++i) v[i] = s;
    return v;
  }
  static CNNOPS_ALWAYS_INLINE vec relu(vec v) { return v < vec{} ? vec{} : v; }  // NaN passes, as relu()
  static CNNOPS_ALWAYS_INLINE mask first_lanes(int64_t n) {
    mask m;
    for (int i = 0; i < lanes; ++i) m[i] = i < n ? -1 : 0;
    return m;
  }
  // even[j] = src[2j], odd[j] = src[2j + 1] for j < n (n a multiple of lanes)
  static CNNOPS_ALWAYS_INLINE void deinterleave(const T* src, int64_t n, T* even, T* odd) {
    mask ev, od;
    for (int i = 0; i < lanes; ++i) ev[i] = 2 * i, od[i] = 2 * i + 1;
    for (int64_t j = 0; j < n; j += lanes) {
      const vec a = load(src + 2 * j), b = load(src + 2 * j + lanes);
      store(even + j, __builtin_shuffle(a, b, ev));
      store(odd + j, __builtin_shuffle(a, b, od));
    }
  }
};

}  // namespace cpu
}  // namespace cnnops
