#pragma once
// L x L vector transposes (GCC vector extensions) for the direct convolution kernels that move
// channels-last pixels to channel planes and back (conv_grouped.cpp, conv_first_layer.cpp). Only
// for CNNOPS_SIMD_BODY code: BYTES is vector_bytes() of the ISA the body is compiled for.
#include <algorithm>
#include <cstdint>
#include <utility>

#include "common/macros.h"
#include "cpu/simd_vec.h"

namespace cnnops {
namespace cpu {

// Constant shuffle masks from an index function, so the compiler sees immediates.
template <typename M, typename F, int... Is>
constexpr M make_mask(std::integer_sequence<int, Is...>) {
  return M{F::at(Is)...};
}
template <int L, int S>  // a butterfly step of a transpose: a's lanes c with bit S set from b[c - S]
struct BlockLo {
  static constexpr int at(int c) { return (c & S) ? L + c - S : c; }
};
template <int L, int S>  // ... and b's lanes c without bit S from a[c + S]
struct BlockHi {
  static constexpr int at(int c) { return (c & S) ? L + c : c + S; }
};

// Transposes the L x L block whose rows are r[0..L-1]: log2(L) steps, each swapping the
// off-diagonal S x S blocks.
template <typename V, int S = 1>
CNNOPS_ALWAYS_INLINE void transpose_block(typename V::vec* r) {
  constexpr int L = V::lanes;
  if constexpr (S < L) {
    constexpr auto lo = make_mask<typename V::mask, BlockLo<L, S>>(std::make_integer_sequence<int, L>());
    constexpr auto hi = make_mask<typename V::mask, BlockHi<L, S>>(std::make_integer_sequence<int, L>());
#pragma GCC unroll 16
    for (int i = 0; i < L; i += 2 * S)
#pragma GCC unroll 16
      for (int j = i; j < i + S; ++j) {
        const typename V::vec a = r[j], b = r[j + S];
        r[j] = __builtin_shuffle(a, b, lo);
        r[j + S] = __builtin_shuffle(a, b, hi);
      }
    transpose_block<V, 2 * S>(r);
  }
}

// dst[j * dst_ld + i] = src[i * src_ld + j] for i < rows, j < cols, in L x L blocks: channels-last
// pixels to channel planes and back in one pass over all channels (a group's slice of each pixel
// alone is a few floats hundreds apart). The last block of each dimension overlaps the one before
// (rewriting the same values) rather than falling back to single elements.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void transpose_matrix(const T* src, int64_t src_ld, int64_t rows, int64_t cols, T* dst,
                                           int64_t dst_ld) {
  using V = Simd<T, BYTES>;
  constexpr int L = V::lanes;
  if (rows < L || cols < L) {  // narrower vectors (14 x 14 maps at 16 lanes), else element by element
    if constexpr (BYTES > 16) return transpose_matrix<T, BYTES / 2>(src, src_ld, rows, cols, dst, dst_ld);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) dst[j * dst_ld + i] = src[i * src_ld + j];
    return;
  }
  for (int64_t i0 = 0; i0 < rows; i0 += L) {
    const int64_t i = std::min(i0, rows - L);
    for (int64_t j0 = 0; j0 < cols; j0 += L) {
      const int64_t j = std::min(j0, cols - L);
      typename V::vec r[L];
#pragma GCC unroll 16
      for (int k = 0; k < L; ++k) r[k] = V::load(src + (i + k) * src_ld + j);
      transpose_block<V>(r);
#pragma GCC unroll 16
      for (int k = 0; k < L; ++k) V::store(dst + (j + k) * dst_ld + i, r[k]);
    }
  }
}

}  // namespace cpu
}  // namespace cnnops
