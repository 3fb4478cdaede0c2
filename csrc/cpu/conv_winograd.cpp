// Winograd convolution F(4x4, 3x3) and F(2x2, 3x3) for float32 3x3 stride-1 layers (formulas.md
// §Winograd; Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"; points below):
// each m x m output tile is
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A
// over an (m + 2) x (m + 2) input tile d, so (m + 2)^2 products per tile and channel pair replace
// 9 m^2 multiply-adds (F(4x4): 36 for 144). Summed over input channels, each transform position xi
// is a GEMM:
//   M[xi] (C_out x tiles) = U[xi] (C_out x C_in) * V[xi] (C_in x tiles)
// F(4x4) does the fewest products; F(2x2) has 4 times the tiles, the GEMMs' columns, which small
// maps at small batches need (winograd_tile).
// Steps, for a block of whole tile rows at a time (so V and M stay in cache):
//   input transform  V = B^T d B per tile and channel, vectorized over the tiles of a tile row
//   (m + 2)^2 GEMMs  the project's GEMM, B read in place (gemm_shifted_b); U made all at once
//                    first, or slab by slab inside them where all of it would not fit the caches
//   output transform A^T M A, + bias, activation, written straight into y
// A 3x3x3 layer repeats the first two steps per depth tap kd, on input plane od + kd - pad,
// summing into M (formulas.md §Winograd).
// The weight is read where it lies (WinogradWeightView): grad input's turned kernel too.
// The weight gradient runs the same steps backwards: dU[xi] = Z[xi] * V[xi]^T summed over tiles,
// with Z = A dY A^T per output-gradient tile, then dW = G^T dU G (3x3x3: one dU per depth tap, each
// output plane's Z against the V of the input plane that tap reads).
// The transforms change rounding (not bitwise equal to the direct path), hence the switch
// cnnops.backends.cpu.allow_winograd.
#include "cpu/conv_winograd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "common/checked_math.h"
#include "cpu/conv_cpu.h"
#include "cpu/simd.h"
#include "cpu/simd_transpose.h"

// The vector helpers are always inlined into the per-ISA functions: their ABI never shows.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace cnnops {
namespace cpu {

namespace {

std::atomic<bool> allowed{true};
std::atomic<int64_t> calls{0};
std::atomic<int64_t> weight_calls{0};
std::atomic<int64_t> forced_min_tiles{-1};
std::atomic<int64_t> forced_streaming{-1};
std::atomic<int64_t> streamed_calls{0};
std::atomic<int64_t> forced_tile{0};
std::atomic<int64_t> small_tile_calls{0};

// The weight gradient's F(4x4, 3x3); the forward runs F(4x4, 3x3) or F(2x2, 3x3) (winograd_tile).
constexpr int64_t kTile = 4;          // output tile side (m in F(m, r))
constexpr int64_t kAlpha = 6;         // input tile side m + r - 1
constexpr int64_t kPositions = 36;    // kAlpha^2 transform positions, the most of either tile
constexpr int64_t kTargetValues = 96 * kPositions;  // V values a channel per block (96 F(4x4) tiles): V and M
                                                     // of a block stay in L2 for ~64 channels
constexpr int64_t kSlabRows = 32, kSlabChannels = 128;  // U made and used a slab at a time (stream_weights)
constexpr double kStreamedWeightBytes = 4e6;            // U larger than this is streamed
constexpr int64_t kMinTiles = 32;                       // fewer tiles than this: the direct path
constexpr int64_t kF2MinChannels = 128;                 // F(2x2, 3x3) takes layers this wide on each side

// ---- vectors of L floats (GCC vector extensions), compiled once per ISA below -----------------

template <int L>
struct Lanes {
  typedef float V __attribute__((vector_size(L * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(L * sizeof(float))));
};

#define CNNOPS_INLINE inline __attribute__((always_inline))

template <int L>
CNNOPS_INLINE typename Lanes<L>::V load(const float* p) {
  typename Lanes<L>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int L>
CNNOPS_INLINE void store(float* p, typename Lanes<L>::V v) {
  std::memcpy(p, &v, sizeof(v));
}

// Lanes [8p, 8p + 8) of v to d + offset[p]: output channels into the 8-row panels of a packed A.
template <int L>
CNNOPS_INLINE void store_eighths(typename Lanes<L>::V v, float* d, const int64_t* offset) {
  typedef float V8 __attribute__((vector_size(8 * sizeof(float))));
  static_assert(L == 8 || L == 16);
  if constexpr (L == 8) {
    std::memcpy(d + offset[0], &v, sizeof(v));
  } else {
    const V8 low = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    const V8 high = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    std::memcpy(d + offset[0], &low, sizeof(low));
    std::memcpy(d + offset[1], &high, sizeof(high));
  }
}

// Constant shuffle masks built from an index function (simd_transpose.h's make_mask), so the
// compiler sees immediates.
template <int L, typename F>
constexpr typename Lanes<L>::I mask() {
  return make_mask<typename Lanes<L>::I, F>(std::make_integer_sequence<int, L>());
}
template <int L>
struct Even {
  static constexpr int at(int i) { return 2 * i; }
};
template <int L>
struct Odd {
  static constexpr int at(int i) { return 2 * i + 1; }
};
template <int L, int K>  // lanes 1..L-1 of a, then lane K of b
struct ShiftIn {
  static constexpr int at(int i) { return i < L - 1 ? i + 1 : L + K; }
};
template <int L, int Half>  // a0 b0 a1 b1 ... from half Half of a and b
struct ZipLanes {
  static constexpr int at(int i) { return (i % 2 ? L : 0) + Half * L / 2 + i / 2; }
};
template <int L, int Half>  // pairs of lanes: a01 b01 a23 b23 ... from half Half of a and b
struct ZipPairs {
  static constexpr int at(int i) { return ((i / 2) % 2 ? L : 0) + Half * L / 2 + (i / 4) * 2 + i % 2; }
};

template <int L, typename F>
CNNOPS_INLINE typename Lanes<L>::V shuffle(typename Lanes<L>::V a, typename Lanes<L>::V b) {
  constexpr typename Lanes<L>::I m = mask<L, F>();
  return __builtin_shuffle(a, b, m);
}

template <int M>
struct Transforms;  // F(M x M, 3x3): bt = B^T, at = A^T, g = G on vectors of values, one lane a tile

// F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -1/2, inf (Lavin & Gray 2016, section 4; the
// point -1/2 in place of -2 after Barabasz et al. 2020, "Error analysis and improving the accuracy
// of Winograd convolution": about half the float32 error, which keeps layers with weights of a
// trained layer's scale inside the float32 test tolerance; N(0, 1) weights at 128+ channels exceed
// it on a few outputs per million). Rows of B^T are scaled by powers of 2 (exact), G's rows by the
// inverses.
// B^T = [2 3 -4 -3 2 0; 0 -2 -5 -1 2 0; 0 2 1 -5 2 0; 0 -1 -2 1 2 0; 0 2 -1 -2 1 0; 0 2 3 -4 -3 2]
template <>
struct Transforms<4> {
  static constexpr int alpha = 6;
  template <typename V>
  static CNNOPS_INLINE void bt(const V* d, V* o) {
    o[0] = 2.0f * (d[0] + d[4] - 2.0f * d[2]) + 3.0f * (d[1] - d[3]);
    o[1] = 2.0f * (d[4] - d[1]) - 5.0f * d[2] - d[3];
    o[2] = 2.0f * (d[1] + d[4]) + d[2] - 5.0f * d[3];
    o[3] = 2.0f * (d[4] - d[2]) + d[3] - d[1];
    o[4] = 2.0f * (d[1] - d[3]) + d[4] - d[2];
    o[5] = 2.0f * (d[1] + d[5] - 2.0f * d[3]) + 3.0f * (d[2] - d[4]);
  }

  // A^T = [1 1 1 1 1 0; 0 1 -1 2 -1/2 0; 0 1 1 4 1/4 0; 0 1 -1 8 -1/8 1]
  template <typename V>
  static CNNOPS_INLINE void at(const V* m, V* o) {
    const V s12 = m[1] + m[2], d12 = m[1] - m[2];
    o[0] = m[0] + s12 + m[3] + m[4];
    o[1] = d12 + 2.0f * m[3] - 0.5f * m[4];
    o[2] = s12 + 4.0f * m[3] + 0.25f * m[4];
    o[3] = d12 + 8.0f * m[3] - 0.125f * m[4] + m[5];
  }

  // G = [1/2 0 0; -1/6 -1/6 -1/6; 1/6 -1/6 1/6; 1/30 1/15 2/15; -16/15 8/15 -4/15; 0 0 1/2]
  template <typename V>
  static CNNOPS_INLINE void g(const V* g, V* o) {
    const V s = g[0] + g[2];
    o[0] = g[0] * 0.5f;
    o[1] = (s + g[1]) * (-1.0f / 6);
    o[2] = (s - g[1]) * (1.0f / 6);
    o[3] = g[0] * (1.0f / 30) + g[1] * (1.0f / 15) + g[2] * (2.0f / 15);
    o[4] = g[0] * (-16.0f / 15) + g[1] * (8.0f / 15) + g[2] * (-4.0f / 15);
    o[5] = g[2] * 0.5f;
  }
};

// F(2x2, 3x3) with interpolation points 0, 1, -1, inf (Lavin & Gray 2016, section 4.1): 16 products
// per 2x2 tile and channel pair, 4 an output (direct: 9, F(4x4): 2.25), but 4 times F(4x4)'s tiles:
// the GEMMs' columns on small maps, where F(4x4) leaves too few of them.
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
// A^T = [1 1 1 0; 0 1 -1 -1]
template <>
struct Transforms<2> {
  static constexpr int alpha = 4;
  template <typename V>
  static CNNOPS_INLINE void bt(const V* d, V* o) {
    o[0] = d[0] - d[2];
    o[1] = d[1] + d[2];
    o[2] = d[2] - d[1];
    o[3] = d[1] - d[3];
  }
  template <typename V>
  static CNNOPS_INLINE void at(const V* m, V* o) {
    o[0] = m[0] + m[1] + m[2];
    o[1] = m[1] - m[2] - m[3];
  }
  template <typename V>
  static CNNOPS_INLINE void g(const V* g, V* o) {
    const V s = (g[0] + g[2]) * 0.5f, h = g[1] * 0.5f;
    o[0] = g[0];
    o[1] = s + h;
    o[2] = s - h;
    o[3] = g[2];
  }
};

// Columns M tx + j, j < M + 2, of the windows of L tiles tx0 + lane in a row p (whose first M L + L
// values they read): lanes are tiles, a stride-M deinterleave. Adds x * 0 of what it reads to
// nonfinite (NaN for an inf or NaN, else 0).
template <int M, int L>
CNNOPS_INLINE void window_columns(const float* p, typename Lanes<L>::V* d, typename Lanes<L>::V& nonfinite) {
  using V = typename Lanes<L>::V;
  if constexpr (M == 4) {
    const V v0 = load<L>(p), v1 = load<L>(p + L), v2 = load<L>(p + 2 * L), v3 = load<L>(p + 3 * L);
    const V v4 = load<L>(p + 4 * L);
    nonfinite += (v0 + v1 + v2 + v3 + v4) * 0.0f;
    const V e01 = shuffle<L, Even<L>>(v0, v1), o01 = shuffle<L, Odd<L>>(v0, v1);
    const V e23 = shuffle<L, Even<L>>(v2, v3), o23 = shuffle<L, Odd<L>>(v2, v3);
    d[0] = shuffle<L, Even<L>>(e01, e23);
    d[2] = shuffle<L, Odd<L>>(e01, e23);
    d[1] = shuffle<L, Even<L>>(o01, o23);
    d[3] = shuffle<L, Odd<L>>(o01, o23);
    d[4] = shuffle<L, ShiftIn<L, 0>>(d[0], v4);
    d[5] = shuffle<L, ShiftIn<L, 1>>(d[1], v4);
  } else {
    static_assert(M == 2);
    const V v0 = load<L>(p), v1 = load<L>(p + L), v2 = load<L>(p + 2 * L);
    nonfinite += (v0 + v1 + v2) * 0.0f;
    d[0] = shuffle<L, Even<L>>(v0, v1);
    d[1] = shuffle<L, Odd<L>>(v0, v1);
    d[2] = shuffle<L, ShiftIn<L, 0>>(d[0], v2);
    d[3] = shuffle<L, ShiftIn<L, 1>>(d[1], v2);
  }
}

// The input transform of one tile row of F(M x M, 3x3): tiles tx in [0, tw), tile tx's window at
// rows[r * ld + M * tx + j] (a zero-padded copy of the plane). Writes V[xi][tx] at
// v[xi * xi_stride + tx]; whole vectors, so up to L - 1 values past tw are written too.
// Returns false when the window holds an infinity or NaN.
template <int M, int L>
CNNOPS_INLINE bool input_row_body(const float* rows, int64_t ld, int64_t tw, float* v, int64_t xi_stride) {
  using V = typename Lanes<L>::V;
  using T = Transforms<M>;
  constexpr int alpha = T::alpha;
  V nonfinite = V{};  // x * 0 is NaN for inf and NaN, else 0
  for (int64_t tx0 = 0; tx0 < tw; tx0 += L) {
    V e[alpha][alpha];  // e[r][k]: row r of d B
    for (int r = 0; r < alpha; ++r) {
      V d[alpha];  // d[j]: column M * tx + j of each tile
      window_columns<M, L>(rows + r * ld + M * tx0, d, nonfinite);
      T::bt(d, e[r]);
    }
    for (int k = 0; k < alpha; ++k) {
      V col[alpha], out[alpha];
      for (int r = 0; r < alpha; ++r) col[r] = e[r][k];
      T::bt(col, out);
      for (int i = 0; i < alpha; ++i) store<L>(v + (i * alpha + k) * xi_stride + tx0, out[i]);
    }
  }
  bool finite = true;
  for (int l = 0; l < L; ++l) finite = finite && nonfinite[l] == 0.0f;
  return finite;
}

// Output row a of L tiles, column j of each in out[j], back in pixel order: M vectors of
// columns M * tx + j.
template <int M, int L>
CNNOPS_INLINE void interleave_columns(const typename Lanes<L>::V* out, typename Lanes<L>::V* row) {
  using V = typename Lanes<L>::V;
  if constexpr (M == 4) {
    const V ab0 = shuffle<L, ZipLanes<L, 0>>(out[0], out[1]), ab1 = shuffle<L, ZipLanes<L, 1>>(out[0], out[1]);
    const V cd0 = shuffle<L, ZipLanes<L, 0>>(out[2], out[3]), cd1 = shuffle<L, ZipLanes<L, 1>>(out[2], out[3]);
    row[0] = shuffle<L, ZipPairs<L, 0>>(ab0, cd0);
    row[1] = shuffle<L, ZipPairs<L, 1>>(ab0, cd0);
    row[2] = shuffle<L, ZipPairs<L, 0>>(ab1, cd1);
    row[3] = shuffle<L, ZipPairs<L, 1>>(ab1, cd1);
  } else {
    static_assert(M == 2);
    row[0] = shuffle<L, ZipLanes<L, 0>>(out[0], out[1]);
    row[1] = shuffle<L, ZipLanes<L, 1>>(out[0], out[1]);
  }
}

// The output transform of one tile row of F(M x M, 3x3): M[xi][tx] at m[xi * xi_stride + tx];
// writes activation(A^T M A + bias) to the output rows [0, rows) (at most M) of y_row, columns
// < wo, with strides (sh, sw).
template <int M, int L>
CNNOPS_INLINE void output_row_body(const float* m, int64_t xi_stride, int64_t tw, float bias, Activation act,
                                   float* y_row, int64_t sh, int64_t sw, int64_t rows, int64_t wo) {
  using V = typename Lanes<L>::V;
  using T = Transforms<M>;
  constexpr int alpha = T::alpha;
  const V zero = V{} * 0.0f;
  for (int64_t tx0 = 0; tx0 < tw; tx0 += L) {
    V s[alpha][M];  // s[i][j]: row i of M A
    for (int i = 0; i < alpha; ++i) {
      V mi[alpha];
      for (int k = 0; k < alpha; ++k) mi[k] = load<L>(m + (i * alpha + k) * xi_stride + tx0);
      T::at(mi, s[i]);
    }
    V out[M][M];  // out[a][j]: output row a, column j of each tile
    for (int j = 0; j < M; ++j) {
      V col[alpha], o[M];
      for (int i = 0; i < alpha; ++i) col[i] = s[i][j];
      T::at(col, o);
      for (int a = 0; a < M; ++a) {
        V value = o[a] + bias;
        if (act == Activation::Relu) value = value < zero ? zero : value;  // NaN passes, as torch.relu
        out[a][j] = value;
      }
    }
    const int64_t cols = std::min<int64_t>(M * L, wo - M * tx0);
    for (int64_t a = 0; a < rows; ++a) {
      V row[M];
      interleave_columns<M, L>(out[a], row);
      float* dst = y_row + a * sh + M * tx0 * sw;
      if (sw == 1 && cols == M * L) {
        for (int q = 0; q < M; ++q) store<L>(dst + q * L, row[q]);
      } else {
        float tmp[M * L];
        for (int q = 0; q < M; ++q) store<L>(tmp + q * L, row[q]);
        for (int64_t j = 0; j < cols; ++j) dst[j * sw] = tmp[j];
      }
    }
  }
}

// A = (A^T)^T on a vector of 4: o = A d, the transform of the output gradient (formulas.md
// §Winograd: Y = A^T M A gives dM = A dY A^T).
template <typename V>
CNNOPS_INLINE void a6(const V* d, V* o) {
  o[0] = d[0];
  o[1] = d[0] + d[1] + d[2] + d[3];
  o[2] = d[0] - d[1] + d[2] - d[3];
  o[3] = d[0] + 2.0f * d[1] + 4.0f * d[2] + 8.0f * d[3];
  o[4] = d[0] - 0.5f * d[1] + 0.25f * d[2] - 0.125f * d[3];
  o[5] = d[3];
}

// The gradient transform of one tile row: Z = A dY A^T per 4x4 tile of dY, tiles tx in [0, tw),
// tile tx's rows at rows[a * ld + 4 * tx + b] (a copy zero past the output's edges). Writes
// Z[xi][tx] to z[xi * xi_stride + tx], whole vectors as input_row_body. Returns false when the
// tile row holds an infinity or NaN.
template <int L>
CNNOPS_INLINE bool grad_row_body(const float* rows, int64_t ld, int64_t tw, float* z, int64_t xi_stride) {
  using V = typename Lanes<L>::V;
  V nonfinite = V{};
  for (int64_t tx0 = 0; tx0 < tw; tx0 += L) {
    V e[kTile][kAlpha];  // e[a][j]: row a of dY A^T
    for (int a = 0; a < kTile; ++a) {
      const float* p = rows + a * ld + 4 * tx0;
      const V v0 = load<L>(p), v1 = load<L>(p + L), v2 = load<L>(p + 2 * L), v3 = load<L>(p + 3 * L);
      nonfinite += (v0 + v1 + v2 + v3) * 0.0f;
      const V e01 = shuffle<L, Even<L>>(v0, v1), o01 = shuffle<L, Odd<L>>(v0, v1);
      const V e23 = shuffle<L, Even<L>>(v2, v3), o23 = shuffle<L, Odd<L>>(v2, v3);
      V d[kTile];  // d[b]: column 4 * tx + b of each tile
      d[0] = shuffle<L, Even<L>>(e01, e23);
      d[2] = shuffle<L, Odd<L>>(e01, e23);
      d[1] = shuffle<L, Even<L>>(o01, o23);
      d[3] = shuffle<L, Odd<L>>(o01, o23);
      a6(d, e[a]);
    }
    for (int j = 0; j < kAlpha; ++j) {
      V col[kTile], out[kAlpha];
      for (int a = 0; a < kTile; ++a) col[a] = e[a][j];
      a6(col, out);
      for (int i = 0; i < kAlpha; ++i) store<L>(z + (i * kAlpha + j) * xi_stride + tx0, out[i]);
    }
  }
  bool finite = true;
  for (int l = 0; l < L; ++l) finite = finite && nonfinite[l] == 0.0f;
  return finite;
}

// G^T applied to 6 values: rows [1/2 -1/6 1/6 1/30 -16/15 0; 0 -1/6 -1/6 1/15 8/15 0;
// 0 -1/6 1/6 2/15 -4/15 1/2] (G in Transforms<4>::g).
template <typename V>
CNNOPS_INLINE void gt6(const V* u, V* o) {
  const V s = (u[2] - u[1]) * (1.0f / 6), d = (u[1] + u[2]) * (-1.0f / 6);
  o[0] = u[0] * 0.5f + s + u[3] * (1.0f / 30) + u[4] * (-16.0f / 15);
  o[1] = d + u[3] * (1.0f / 15) + u[4] * (8.0f / 15);
  o[2] = s + u[3] * (2.0f / 15) + u[4] * (-4.0f / 15) + u[5] * 0.5f;
}

// dW[co, ci] = G^T dU[., co, ci] G for n <= L input channels ci (the lanes), dU's position xi at
// u[xi * xi_stride]. Tap t of channel l goes to out[t * tap_stride + l] (OHWI), or to
// out[l * channel_stride + t] when tap_stride is 0 (OIHW).
template <int L>
CNNOPS_INLINE void weight_grad_body(const float* u, int64_t xi_stride, int64_t n, float* out, int64_t tap_stride,
                                    int64_t channel_stride) {
  using V = typename Lanes<L>::V;
  float part[kPositions][L];  // a last group of fewer than L channels, zero past them
  if (n < L) {
    for (int64_t xi = 0; xi < kPositions; ++xi)
      for (int64_t l = 0; l < L; ++l) part[xi][l] = l < n ? u[xi * xi_stride + l] : 0.0f;
    u = part[0], xi_stride = L;
  }
  V t[3][kAlpha];  // t[a][j] = (G^T dU)[a][j]
  for (int j = 0; j < kAlpha; ++j) {
    V col[kAlpha];
    for (int i = 0; i < kAlpha; ++i) col[i] = load<L>(u + (i * kAlpha + j) * xi_stride);
    V o[3];
    gt6(col, o);
    for (int a = 0; a < 3; ++a) t[a][j] = o[a];
  }
  float taps[9][L];
  for (int a = 0; a < 3; ++a) {
    V o[3];
    gt6(t[a], o);
    for (int b = 0; b < 3; ++b) {
      if (tap_stride != 0 && n == L)
        store<L>(out + (a * 3 + b) * tap_stride, o[b]);
      else
        store<L>(taps[a * 3 + b], o[b]);
    }
  }
  if (tap_stride != 0 && n == L) return;
  for (int64_t l = 0; l < n; ++l)
    for (int k = 0; k < 9; ++k) out[tap_stride != 0 ? k * tap_stride + l : l * channel_stride + k] = taps[k][l];
}

// Transposes the L x L matrix whose rows are r[0..L-1] (simd_transpose.h's butterfly: Lanes<L>::V
// is Simd<float, 4L>'s vector).
template <int L>
CNNOPS_INLINE void transpose(typename Lanes<L>::V* r) {
  transpose_block<Simd<float, L* int(sizeof(float))>>(r);
}

// Where element (i, k) of an A operand packed for the GEMM lies (gemm.h, PackedA: per kKc block of
// columns, panels of mr rows, each kc x mr).
struct PackedLayout {
  int64_t mr, padded_m, k;
  int64_t at(int64_t i, int64_t kk) const {
    const int64_t k0 = kk - kk % kKc, kc = std::min(kKc, k - k0), m0 = i - i % mr;
    return k0 * padded_m + m0 * kc + (kk - k0) * mr + (i - m0);
  }
};

// U[xi] = G g G^T of F(M x M, 3x3) for output channels [co0, co1) and input channels [0, ci_count) of
// the view w (already at the group's and slab's first channels), written straight into the packed
// GEMM operands dst[xi] (vectors over output channels), column ci at layout column ci. Returns false
// when a weight is inf or NaN.
template <int M, int L>
CNNOPS_INLINE bool weight_body(const WinogradWeightView& w, int64_t ci_count, int64_t co0, int64_t co1,
                               float* const* dst, PackedLayout layout) {
  using V = typename Lanes<L>::V;
  constexpr int alpha = Transforms<M>::alpha;
  // How the L lanes' taps lie, each read with whole vectors where the lanes are full:
  const bool channel_tap = !w.rotated && w.ci_stride == 9 && w.tap_stride == 1;  // OIHW: a lane's 9L values a row
  const bool tap_channel = !w.rotated && w.ci_stride == 1;                      // OHWI: a lane's L channels a row
  const bool rotated_taps = w.rotated && w.co_stride == 9 && w.tap_stride == 1 && L >= 9;  // a lane's taps a row
  const bool rotated_lanes = w.rotated && w.co_stride == 1;                      // the lanes a row
  auto tap_at = [&](int64_t co, int64_t ci, int k) {
    return w.w + co * w.co_stride + ci * w.ci_stride + (w.rotated ? 8 - k : k) * w.tap_stride;
  };
  V nonfinite = V{};
  for (int64_t co = co0; co < co1; co += L) {
    const int64_t n = std::min<int64_t>(L, co1 - co);
    const bool panels = n == L && L % layout.mr == 0 && co % layout.mr == 0;  // whole panels: vector stores
    float block[9 * L][L];  // block[ci' * 9 + k][l]: L input channels from ci0, L output channels
    for (int64_t ci = 0; ci < ci_count; ++ci) {
      const int64_t ci0 = ci - ci % L;
      const bool in_block = n == L && ci0 + L <= ci_count && (channel_tap || tap_channel);
      if (in_block && ci == ci0) {
        // The weights of L output and L input channels, transposed L x L at a time: OIHW rows of
        // (channel, tap) pairs, OHWI rows of channels one tap at a time.
        for (int b = 0; b < 9; ++b) {
          V r[L];
          for (int l = 0; l < L; ++l)
            r[l] = load<L>(channel_tap ? tap_at(co + l, ci0, 0) + b * L : tap_at(co + l, ci0, b));
          transpose<L>(r);
          for (int q = 0; q < L; ++q) store<L>(block[channel_tap ? b * L + q : q * 9 + b], r[q]);
        }
      }
      float tmp[9][L];
      if (in_block) {
        std::memcpy(tmp, block[(ci - ci0) * 9], sizeof(tmp));
      } else if (n == L && rotated_taps && tap_at(co + L - 1, ci, 8) + L <= w.end) {
        V r[L];  // lane l's 9 taps (and L - 9 values past them), transposed
        for (int l = 0; l < L; ++l) r[l] = load<L>(tap_at(co + l, ci, 8));
        transpose<L>(r);
        for (int k = 0; k < 9; ++k) store<L>(tmp[k], r[8 - k]);
      } else if (n == L && rotated_lanes) {
        for (int k = 0; k < 9; ++k) store<L>(tmp[k], load<L>(tap_at(co, ci, k)));
      } else {
        for (int64_t l = 0; l < L; ++l)
          for (int k = 0; k < 9; ++k) tmp[k][l] = l < n ? *tap_at(co + l, ci, k) : 0.0f;
      }
      V gc[3][alpha];  // g G^T: each kernel row a transformed along its columns
      for (int a = 0; a < 3; ++a) {
        const V row[3] = {load<L>(tmp[a * 3]), load<L>(tmp[a * 3 + 1]), load<L>(tmp[a * 3 + 2])};
        Transforms<M>::g(row, gc[a]);
        nonfinite += (row[0] + row[1] + row[2]) * 0.0f;
      }
      int64_t offset[L / 8 + 1];  // where each 8-row panel's slice of column ci lies (same for every xi)
      for (int64_t l = 0; l < L; l += 8) offset[l / 8] = layout.at(co + l, ci);
      for (int j = 0; j < alpha; ++j) {
        const V col[3] = {gc[0][j], gc[1][j], gc[2][j]};
        V o[alpha];
        Transforms<M>::g(col, o);
        for (int i = 0; i < alpha; ++i) {
          float* d = dst[i * alpha + j];
          if constexpr (L % 8 == 0) {  // whole 8-row panels: each 8 lanes one store
            if (panels && layout.mr == 8) {
              store_eighths<L>(o[i], d, offset);
              continue;
            }
          }
          float out[L];
          store<L>(out, o[i]);
          for (int64_t l = 0; l < n; ++l) d[layout.at(co + l, ci)] = out[l];
        }
      }
    }
  }
  bool finite = true;
  for (int l = 0; l < L; ++l) finite = finite && nonfinite[l] == 0.0f;
  return finite;
}

// The forward's transforms of F(m x m, 3x3), compiled for one ISA.
struct TileKernels {
  bool (*input_row)(const float*, int64_t, int64_t, float*, int64_t);
  void (*output_row)(const float*, int64_t, int64_t, float, Activation, float*, int64_t, int64_t, int64_t, int64_t);
  bool (*weights)(const WinogradWeightView&, int64_t, int64_t, int64_t, float* const*, PackedLayout);
};

struct Kernels {
  TileKernels f4, f2;  // F(4x4, 3x3) and F(2x2, 3x3)
  void (*transpose)(const float*, int64_t, float*, int64_t);
  void (*transpose_part)(const float*, int64_t, int64_t, float*, int64_t, int64_t);
  bool (*grad_row)(const float*, int64_t, int64_t, float*, int64_t);
  void (*weight_grad)(const float*, int64_t, int64_t, float*, int64_t, int64_t);
  int64_t lanes;
  const TileKernels& tile(int64_t m) const { return m == 2 ? f2 : f4; }
};

#define CNNOPS_WINOGRAD_TILE_KERNELS(NAME, ATTRIBUTE, M, L)                                                 \
  ATTRIBUTE bool NAME##_input##M(const float* rows, int64_t ld, int64_t tw, float* v, int64_t xs) {          \
    return input_row_body<M, L>(rows, ld, tw, v, xs);                                                        \
  }                                                                                                          \
  ATTRIBUTE void NAME##_output##M(const float* m, int64_t xs, int64_t tw, float bias, Activation act, float* y, \
                                  int64_t sh, int64_t sw, int64_t rows, int64_t wo) {                        \
    output_row_body<M, L>(m, xs, tw, bias, act, y, sh, sw, rows, wo);                                        \
  }                                                                                                          \
  ATTRIBUTE bool NAME##_weights##M(const WinogradWeightView& w, int64_t ci_count, int64_t co0, int64_t co1, \
                                   float* const* dst, PackedLayout layout) {                                 \
    return weight_body<M, L>(w, ci_count, co0, co1, dst, layout);                                            \
  }

#define CNNOPS_WINOGRAD_KERNELS(NAME, ATTRIBUTE, L)                                                          \
  CNNOPS_WINOGRAD_TILE_KERNELS(NAME, ATTRIBUTE, 4, L)                                                        \
  CNNOPS_WINOGRAD_TILE_KERNELS(NAME, ATTRIBUTE, 2, L)                                                        \
  /* dst[q * dst_stride + i] = src[i * src_stride + q] for i, q < L: channels-last <-> planes */             \
  ATTRIBUTE void NAME##_transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {    \
    typename Lanes<L>::V r[L];                                                                               \
    for (int i = 0; i < L; ++i) r[i] = load<L>(src + i * src_stride);                                        \
    transpose<L>(r);                                                                                         \
    for (int q = 0; q < L; ++q) store<L>(dst + q * dst_stride, r[q]);                                        \
  }                                                                                                          \
  /* The same for src's first src_rows rows (the others zeros), storing dst's first dst_rows rows: */       \
  /* the last pixels of a channels-last row narrower than a multiple of L. */                               \
  ATTRIBUTE void NAME##_transpose_part(const float* src, int64_t src_stride, int64_t src_rows, float* dst,  \
                                       int64_t dst_stride, int64_t dst_rows) {                              \
    typename Lanes<L>::V r[L];                                                                               \
    for (int i = 0; i < L; ++i) r[i] = i < src_rows ? load<L>(src + i * src_stride) : typename Lanes<L>::V{}; \
    transpose<L>(r);                                                                                         \
    for (int q = 0; q < L; ++q)                                                                              \
      if (q < dst_rows) store<L>(dst + q * dst_stride, r[q]);                                                \
  }                                                                                                          \
  ATTRIBUTE bool NAME##_grad(const float* rows, int64_t ld, int64_t tw, float* z, int64_t xs) {              \
    return grad_row_body<L>(rows, ld, tw, z, xs);                                                            \
  }                                                                                                          \
  ATTRIBUTE void NAME##_weight_grad(const float* u, int64_t xs, int64_t n, float* out, int64_t tap_stride,   \
                                    int64_t channel_stride) {                                                \
    weight_grad_body<L>(u, xs, n, out, tap_stride, channel_stride);                                          \
  }                                                                                                          \
  const Kernels NAME##_kernels{{NAME##_input4, NAME##_output4, NAME##_weights4},                              \
                               {NAME##_input2, NAME##_output2, NAME##_weights2},                              \
                               NAME##_transpose,                                                              \
                               NAME##_transpose_part,                                                         \
                               NAME##_grad,                                                                   \
                               NAME##_weight_grad,                                                            \
                               L};

#if CNNOPS_X86
CNNOPS_WINOGRAD_KERNELS(avx512, CNNOPS_TARGET_AVX512, 16)
CNNOPS_WINOGRAD_KERNELS(avx2, CNNOPS_TARGET_AVX2, 8)
#endif
CNNOPS_WINOGRAD_KERNELS(portable, , 4)

const Kernels& kernels() {
  static const Kernels& chosen = [&]() -> const Kernels& {
    switch (cpu_isa()) {
#if CNNOPS_X86
      case Isa::Avx512:
        return avx512_kernels;
      case Isa::Avx2:
        return avx2_kernels;
#endif
      default:
        return portable_kernels;
    }
  }();
  return chosen;
}

// The tile-row transforms for rows of `tiles` tiles: the next narrower vectors when a row fills at
// most half of this CPU's, whose other lanes would compute tiles past the row's end (7x7 to 28x28
// maps: 2 to 7 tiles a row).
const Kernels& row_kernels(int64_t tiles) {
  const Kernels& widest = kernels();
  if (tiles > widest.lanes / 2) return widest;
#if CNNOPS_X86
  if (&widest == &avx512_kernels) return avx2_kernels;
  if (&widest == &avx2_kernels) return portable_kernels;
#endif
  return widest;
}

// One input row of cn channels into the transforms' plane copies: pixel p of channel q from
// src[q * c_stride + p * p_stride] to dst[q * plane_size + p]. L channels of a channels-last row
// move by L x L transposes, the row's last pixels by a partial one (its lanes past the row are
// zeros: the copy's right padding); planar rows by copies, anything else value by value.
void copy_row_into_planes(const Kernels& kern, const float* src, int64_t c_stride, int64_t p_stride, int64_t width,
                          int64_t cn, float* dst, int64_t plane_size) {
  const int64_t lanes = kern.lanes;
  int64_t j = 0;
  if (cn == lanes && p_stride != 1) {
    for (; j + lanes <= width; j += lanes) kern.transpose(src + j * p_stride, p_stride, dst + j, plane_size);
    if (j < width) kern.transpose_part(src + j * p_stride, p_stride, width - j, dst + j, plane_size, lanes), j = width;
  }
  for (int64_t q = 0; q < cn; ++q)
    if (p_stride == 1)
      std::memcpy(dst + q * plane_size + j, src + q * c_stride + j, (width - j) * sizeof(float));
    else
      for (int64_t p = j; p < width; ++p) dst[q * plane_size + p] = src[q * c_stride + p * p_stride];
}

// fn(i) for i in [0, n) on the pool's threads, each taking the next index when done: under load,
// a thread that starts late or is preempted leaves its share to the others. Each index's work is
// independent of the others, so the result does not depend on which thread runs it.
template <typename Fn>
void parallel_dynamic(int64_t n, const Fn& fn) {
  const bool inline_only = SerialRegion::active() || at::in_parallel_region();
  const int64_t workers = inline_only ? 1 : std::min<int64_t>(n, at::get_num_threads());
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  });
}

}  // namespace

void set_winograd_allowed(bool value) { allowed.store(value, std::memory_order_relaxed); }
bool winograd_allowed() { return allowed.load(std::memory_order_relaxed); }
int64_t winograd_call_count() { return calls.load(std::memory_order_relaxed); }
int64_t winograd_weight_call_count() { return weight_calls.load(std::memory_order_relaxed); }
void set_winograd_min_tiles(int64_t tiles) { forced_min_tiles.store(tiles, std::memory_order_relaxed); }

void set_winograd_weight_streaming(int64_t mode) { forced_streaming.store(mode, std::memory_order_relaxed); }
int64_t winograd_streamed_call_count() { return streamed_calls.load(std::memory_order_relaxed); }

void set_winograd_tile(int64_t m) { forced_tile.store(m, std::memory_order_relaxed); }
int64_t winograd_small_tile_call_count() { return small_tile_calls.load(std::memory_order_relaxed); }

bool winograd_size_rules_replaced() { return forced_min_tiles.load(std::memory_order_relaxed) >= 0; }

namespace {

// 2-d (a depth of one tap) or 3-d with 3 taps in depth, each depth tap a 2-d F(m x m, 3x3); stride 1,
// dilation 1, not depthwise, not empty.
bool winograd_geometry(const ConvGeometry& g) {
  const bool planar = g.kernel[0] == 1 && g.in[0] == 1 && g.pad[0] == 0;
  if (!(planar || g.kernel[0] == 3) || g.kernel[1] != 3 || g.kernel[2] != 3) return false;
  for (int i = 0; i < 3; ++i)
    if (g.stride[i] != 1 || g.dilation[i] != 1) return false;
  return !g.is_depthwise() && g.batch > 0 && g.out[0] > 0;
}

int64_t tile_count(const ConvGeometry& g, int64_t m) {
  return g.batch * g.out[0] * num_blocks(g.out[1], m) * num_blocks(g.out[2], m);
}

// Where F(4x4, 3x3) pays (measured on 1 and 2 AVX-512 cores, benchmarks/bench_winograd.py): the GEMMs
// must outweigh the transforms, whose cost per tile grows with C_in + C_out while the GEMMs' grows
// with C_in * C_out; and the per-call weight transform (36 C_in C_out values written, memory
// bound once past the caches) must be spread over enough tiles, each using every value once.
bool f4_pays(const ConvGeometry& g) {
  // Grouped layers (ResNeXt, RegNet) pay one transform per group for small per-group GEMMs: below
  // 64 channels a group the direct path won in every measured case.
  const int64_t cin = g.in_channels_per_group(), cout = g.out_channels_per_group();
  const int64_t min_channels = g.groups > 1 ? 64 : 16;
  if (cin < min_channels || cout < min_channels || g.out[1] < 4 || g.out[2] < 4) return false;
  // Few channels on either side, on maps the tiles do not divide: the transforms (C_in + C_out values
  // a tile) outweigh GEMMs of C_in x C_out, and a quarter of the tiles is waste (DenseNet's 128->32 at
  // 14x14, batch 8, 1 thread, torch/cnnops: forward 0.60 NCHW and 0.46 channels-last, the direct
  // paths 0.74 and 0.65; its channels-last grad input, 32->128: 0.55, direct 0.66).
  const int64_t covered = num_blocks(g.out[1], kTile) * num_blocks(g.out[2], kTile) * kTile * kTile;
  if (std::min(cin, cout) < 64 && double(g.out[1] * g.out[2]) < 0.85 * double(covered)) return false;
  // At least one full GEMM panel of tiles (nr = 32 columns). With U streamed (stream_weights) the
  // weight transform costs no memory traffic, so large weights need no more tiles (1 thread,
  // torch/cnnops, Winograd vs direct: 512 channels at 7x7, 32 tiles, 1.35 vs 0.74; 256 at 14x14,
  // 32 tiles, 1.56 vs 0.90; 16 tiles lose: 0.77 vs 0.89 and 0.87 vs 0.95).
  return tile_count(g, kTile) >= kMinTiles;
}

// Where F(2x2, 3x3) pays once F(4x4) does not: too few tiles of 4x4 for the GEMMs.
bool f2_pays(const ConvGeometry& g) {
  const int64_t cin = g.in_channels_per_group(), cout = g.out_channels_per_group();
  if (cin < kF2MinChannels || cout < kF2MinChannels || g.out[1] < 2 || g.out[2] < 2) return false;
  return tile_count(g, 2) >= kMinTiles;
}

}  // namespace

int64_t winograd_tile(const ConvGeometry& g) {
  if (!winograd_allowed() || !winograd_geometry(g)) return 0;
  const int64_t forced = forced_min_tiles.load(std::memory_order_relaxed);
  const int64_t tile = forced_tile.load(std::memory_order_relaxed);
  if (forced >= 0) return tile_count(g, tile ? tile : kTile) >= forced ? (tile ? tile : kTile) : 0;
  const int64_t chosen = f4_pays(g) ? 4 : f2_pays(g) ? 2 : 0;
  return chosen && tile ? tile : chosen;
}

bool use_winograd(const ConvGeometry& g) { return winograd_tile(g) != 0; }

bool use_winograd_weight_gradient(const ConvGeometry& g) {
  if (!winograd_allowed() || !winograd_geometry(g)) return false;
  const int64_t forced = forced_min_tiles.load(std::memory_order_relaxed);
  return forced >= 0 ? tile_count(g, kTile) >= forced : f4_pays(g);
}

namespace {

// The view at group grp, output channel co0, input channel ci0 and depth tap kd: the 3x3 slice of
// taps [9 kd, 9 kd + 9) (of the turned kernel's taps when rotated).
WinogradWeightView view_at(const WinogradWeightView& w, int64_t grp, int64_t co0, int64_t ci0, int64_t kd) {
  WinogradWeightView at = w;
  at.w += grp * w.group_stride + co0 * w.co_stride + ci0 * w.ci_stride +
          9 * (w.rotated ? w.depth - 1 - kd : kd) * w.tap_stride;
  return at;
}

}  // namespace

void winograd_weights(const ConvGeometry& g, int64_t m, const WinogradWeightView& w, WinogradWeights& out) {
  const int64_t cin = g.in_channels_per_group(), cout = g.out_channels_per_group();
  const Kernels& kern = kernels();
  const int64_t mr = gemm_mr<float>();
  const PackedLayout layout{mr, round_up(cout, mr), cin};
  const int64_t depth = g.kernel[0], positions = (m + 2) * (m + 2);
  out.tile = m;
  out.u.resize(depth * positions * g.groups);
  for (auto& a : out.u) {  // reuses the storage of an earlier call where it is large enough
    a.m = cout;
    a.k = cin;
    a.mr = mr;
    a.data.resize(layout.padded_m * cin);
    if (cout % mr != 0) std::fill(a.data.begin(), a.data.end(), 0.0f);  // the padding rows
  }
  const int64_t chunk = 2 * kern.lanes, chunks = num_blocks(cout, chunk);
  std::atomic<bool> finite{true};
  parallel_dynamic(depth * g.groups * chunks, [&](int64_t task) {
    const int64_t kd = task / (g.groups * chunks), grp = task / chunks % g.groups, co0 = (task % chunks) * chunk;
    float* dst[kPositions];
    for (int64_t xi = 0; xi < positions; ++xi) dst[xi] = out.u[(kd * positions + xi) * g.groups + grp].data.data();
    const int64_t co1 = std::min(cout, co0 + chunk);
    if (!kern.tile(m).weights(view_at(w, grp, 0, 0, kd), cin, co0, co1, dst, layout)) finite = false;
  });
  out.finite = finite;
}

namespace {

// The forward of F(m x m, 3x3) over blocks of tile rows: input transform, the (m + 2)^2 products
// M = U V, output transform.
// U comes from `transformed`, or, when that is null, is made from `weight` a slab at a time inside the
// products (stream_weights). 3-d: output plane od sums, over depth taps kd, the 2-d products of U's
// slice kd with V of input plane od + kd - pad (zero outside the input), M = sum_kd U_kd V_kd.
bool forward_tiles(const ConvGeometry& g, int64_t tile, const float* x, const WinogradWeights* transformed,
                   const WinogradWeightView& weight, const float* bias, float* y, bool nhwc, Activation activation) {
  if (transformed && !transformed->finite) return false;
  std::atomic<bool> finite{true};
  const Kernels& kern = kernels();
  const int64_t lanes = kern.lanes;
  const int64_t c_in = g.in_channels, c_out = g.out_channels, groups = g.groups;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t h = g.in[1], w = g.in[2], ho = g.out[1], wo = g.out[2], ph = g.pad[1], pw = g.pad[2];
  const int64_t positions = (tile + 2) * (tile + 2);
  const Kernels& rows_kern = row_kernels(num_blocks(wo, tile));
  const TileKernels& row_transforms = rows_kern.tile(tile);
  const int64_t d = g.in[0], dout = g.out[0], pd = g.pad[0], depth = g.kernel[0];
  // Element strides (n, c, depth, h, w) of x and y.
  const int64_t xs_n = c_in * d * h * w, xs_c = nhwc ? 1 : d * h * w, xs_d = h * w * (nhwc ? c_in : 1);
  const int64_t xs_h = nhwc ? w * c_in : w, xs_w = nhwc ? c_in : 1;
  const int64_t ys_n = c_out * dout * ho * wo, ys_c = nhwc ? 1 : dout * ho * wo, ys_d = ho * wo * (nhwc ? c_out : 1);
  const int64_t ys_h = nhwc ? wo * c_out : wo, ys_w = nhwc ? c_out : 1;
  // Tile rows r = (plane, ty) over the output planes (sample, od), plane = n * dout + od.
  const int64_t th = num_blocks(ho, tile), tw = num_blocks(wo, tile), tile_rows = g.batch * dout * th;
  // Padded plane copy: rows of the m * th + 2 input rows the tiles read, wide enough for whole
  // vectors of tiles (m + 1 vectors of L floats per chunk of L tiles).
  const int64_t plane_h = tile * th + 2, plane_w = tile * round_up(tw, lanes) + lanes;
  // Blocks of whole tile rows, one thread each (a single parallel region: cheap on a busy machine).
  // Fewer blocks than threads: one per thread while each still fills a GEMM panel of columns, else
  // a single block with parallel steps inside.
  int64_t rows_per_block = std::max<int64_t>(1, kTargetValues / positions / tw);
  int64_t blocks = num_blocks(tile_rows, rows_per_block);
  const int64_t threads = SerialRegion::active() ? 1 : at::get_num_threads();
  if (blocks < threads) blocks = tile_rows * tw / threads >= gemm_nr<float>() ? std::min(threads, tile_rows) : 1;
  rows_per_block = num_blocks(tile_rows, blocks);
  blocks = num_blocks(tile_rows, rows_per_block);
  const int64_t nr = gemm_nr<float>();
  // V[xi][c][tile] and M[xi][c][tile]: row stride ld; one cache line more per xi, so the 36 rows
  // a transform touches do not all map to the same cache set.
  const int64_t ld = round_up(rows_per_block * tw, nr) + round_up(lanes, nr);
  const int64_t v_xi = c_in * ld + 16, m_xi = c_out * ld + 16;
  // Channels per transform task: L for channels-last rows (moved by L x L transposes, a row's last
  // pixels by a partial one), else 1.
  const int64_t group = nhwc ? lanes : 1;
  const int64_t out_w = tile * round_up(tw, lanes);  // a row of the channels-last output planes
  std::vector<int64_t> row_offset(cin_g);
  for (int64_t k = 0; k < cin_g; ++k) row_offset[k] = k * ld;

  auto run_block = [&](int64_t block, float* v, float* m) {
    const int64_t r0 = block * rows_per_block, r1 = std::min(tile_rows, r0 + rows_per_block);
    const int64_t tiles = (r1 - r0) * tw;
    const int64_t plane_size = plane_h * plane_w;
    for (int64_t kd = 0; kd < depth && finite; ++kd) {
      // Input transform: a padded copy of the block's rows of each (sample, channel) plane, then its
      // tile rows in order (a row's vectors spill into the next row's slots, which it overwrites).
      // Channels-last input is copied L channels at a time, transposed L x L.
      parallel_dynamic(num_blocks(c_in, group), [&](int64_t task) {
        const int64_t c0 = task * group, cn = std::min(group, c_in - c0);
        thread_local OperandVector<float> plane_buffer;
        plane_buffer.resize(std::max<size_t>(plane_buffer.size(), group * plane_size));
        float* planes = plane_buffer.data();
        for (int64_t r = r0; r < r1;) {
          const int64_t plane = r / th, ty0 = r % th, ty1 = std::min(th, ty0 + (r1 - r));
          const int64_t n = plane / dout, id = plane % dout + kd - pd;  // the input plane depth tap kd reads
          const bool plane_inside = id >= 0 && id < d;
          for (int64_t hp = tile * ty0; hp < tile * ty1 + 2; ++hp) {
            const bool inside = plane_inside && hp >= ph && hp < ph + h;
            for (int64_t q = 0; q < cn; ++q) {
              float* dst = planes + q * plane_size + hp * plane_w;
              std::fill(dst, dst + (inside ? pw : plane_w), 0.0f);
              if (inside) std::fill(dst + pw + w, dst + plane_w, 0.0f);
            }
            if (!inside) continue;
            const float* src = x + n * xs_n + id * xs_d + c0 * xs_c + (hp - ph) * xs_h;  // channel c0, column 0
            copy_row_into_planes(kern, src, xs_c, xs_w, w, cn, planes + hp * plane_w + pw, plane_size);
          }
          for (int64_t q = 0; q < cn; ++q)
            for (int64_t ty = ty0; ty < ty1; ++ty)
              if (!row_transforms.input_row(planes + q * plane_size + tile * ty * plane_w, plane_w, tw,
                                            v + (c0 + q) * ld + (plane * th + ty - r0) * tw, v_xi))
                finite = false;
          r += ty1 - ty0;
        }
      });
      if (!finite) return;
      // The (m + 2)^2 GEMMs per group: M[xi] = U[xi] * V[xi] (+ M[xi] past the first depth tap).
      if (transformed) {
        parallel_dynamic(positions * groups, [&](int64_t task) {
          const int64_t xi = task / groups, grp = task % groups;
          const PackedA<float>& u = transformed->u[kd * positions * groups + task];
          gemm_shifted_b<float>(u, tiles, v + xi * v_xi + grp * cin_g * ld, row_offset.data(),
                                m + xi * m_xi + grp * cout_g * ld, ld, nullptr, kd > 0);
        });
      } else {
        // U made from the weight for a slab of kSlabRows output x kSlabChannels input channels (36 x 32 x 128
        // values: 590 KB, in L2) and multiplied at once into M's rows, summed over the input slabs
        // in order. Each task streams the weights once and reads V's slab rows from L1 for every
        // panel of its rows.
        const int64_t row_blocks = num_blocks(cout_g, kSlabRows), mr = gemm_mr<float>();
        parallel_dynamic(groups * row_blocks, [&](int64_t task) {
          const int64_t grp = task / row_blocks, co0 = task % row_blocks * kSlabRows;
          const int64_t rows = std::min(kSlabRows, cout_g - co0);
          thread_local std::vector<PackedA<float>> slab(kPositions);
          for (int64_t ci0 = 0; ci0 < cin_g && finite; ci0 += kSlabChannels) {
            const int64_t kc = std::min(kSlabChannels, cin_g - ci0);
            const PackedLayout layout{mr, round_up(rows, mr), kc};
            float* dst[kPositions];
            for (int64_t xi = 0; xi < positions; ++xi) {
              PackedA<float>& u = slab[xi];
              u.m = rows, u.k = kc, u.mr = mr;
              u.data.resize(layout.padded_m * kc);
              if (rows % mr != 0) std::fill(u.data.begin(), u.data.end(), 0.0f);  // the padding rows
              dst[xi] = u.data.data();
            }
            if (!kern.tile(tile).weights(view_at(weight, grp, co0, ci0, kd), kc, 0, rows, dst, layout)) {
              finite = false;
              return;
            }
            for (int64_t xi = 0; xi < positions; ++xi)
              gemm_shifted_b<float>(slab[xi], tiles, v + xi * v_xi + (grp * cin_g + ci0) * ld, row_offset.data(),
                                    m + xi * m_xi + (grp * cout_g + co0) * ld, ld, nullptr, ci0 > 0 || kd > 0);
          }
        });
      }
    }
    if (!finite) return;
    // Output transform, bias and activation into y; channels-last output L channels at a time,
    // through planes of 4 rows transposed L x L.
    parallel_dynamic(num_blocks(c_out, group), [&](int64_t task) {
      const int64_t co0 = task * group, cn = std::min(group, c_out - co0);
      const bool grouped = cn == lanes;
      thread_local OperandVector<float> rows_buffer;
      if (grouped) rows_buffer.resize(std::max<size_t>(rows_buffer.size(), lanes * tile * out_w));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t plane = r / th, ty = r % th, rows = std::min(tile, ho - tile * ty);
        float* y_row = y + plane / dout * ys_n + plane % dout * ys_d + tile * ty * ys_h;
        for (int64_t q = 0; q < cn; ++q) {
          const float b = bias ? bias[co0 + q] : 0.0f;
          if (grouped)
            row_transforms.output_row(m + (co0 + q) * ld + (r - r0) * tw, m_xi, tw, b, activation,
                                      rows_buffer.data() + q * tile * out_w, out_w, 1, rows, wo);
          else
            row_transforms.output_row(m + (co0 + q) * ld + (r - r0) * tw, m_xi, tw, b, activation,
                                      y_row + (co0 + q) * ys_c, ys_h, ys_w, rows, wo);
        }
        if (!grouped) continue;
        for (int64_t a = 0; a < rows; ++a) {
          const float* src = rows_buffer.data() + a * out_w;
          float* dst = y_row + a * ys_h + co0;
          int64_t j = 0;
          for (; j + lanes <= wo; j += lanes) kern.transpose(src + j, tile * out_w, dst + j * ys_w, ys_w);
          if (j < wo) kern.transpose_part(src + j, tile * out_w, lanes, dst + j * ys_w, ys_w, wo - j), j = wo;
          for (int64_t q = 0; q < cn; ++q)
            for (int64_t jj = j; jj < wo; ++jj) dst[jj * ys_w + q] = src[q * tile * out_w + jj];
        }
      }
    });
  };
  // Per-thread buffers kept between calls (no page faults, no zeroing): nothing read from them is
  // used before this call writes it, except GEMM columns and vector lanes past the block's
  // tiles, whose results are dropped.
  auto run_blocks = [&](int64_t block) {
    thread_local OperandVector<float> v_buffer, m_buffer;
    v_buffer.resize(std::max<size_t>(v_buffer.size(), positions * v_xi));
    m_buffer.resize(std::max<size_t>(m_buffer.size(), positions * m_xi));
    run_block(block, v_buffer.data(), m_buffer.data());
  };
  if (blocks == 1)
    run_blocks(0);
  else
    parallel_dynamic(blocks, run_blocks);
  if (finite) calls.fetch_add(1, std::memory_order_relaxed);
  if (finite && tile == 2) small_tile_calls.fetch_add(1, std::memory_order_relaxed);
  return finite;
}

}  // namespace

bool conv_forward_winograd(const ConvGeometry& g, const float* x, const WinogradWeights& weights, const float* bias,
                           float* y, bool nhwc, Activation activation) {
  return forward_tiles(g, weights.tile, x, &weights, WinogradWeightView{}, bias, y, nhwc, activation);
}

bool stream_weights(const ConvGeometry& g, int64_t tile) {
  const int64_t forced = forced_streaming.load(std::memory_order_relaxed);
  if (forced >= 0) return forced == 1;
  // Past a few MB, U made first is read back from L3 or memory by every product (1 thread, 56x56 to
  // 7x7 maps, batch 1 to 32: 192 to 512 channels 6-40% faster streamed, up to 2.4x at 512x512
  // 14x14 batch 2); below, the products read it from L2 and one full-width GEMM per position beats
  // the slabs' 36 narrower ones (128 channels: 8-17% slower streamed).
  const double positions = double((tile + 2) * (tile + 2));
  const double u_bytes =
      double(g.kernel[0]) * positions * double(g.out_channels) * double(g.in_channels_per_group()) * sizeof(float);
  return u_bytes > kStreamedWeightBytes;
}

bool conv_forward_winograd(const ConvGeometry& g, const float* x, const WinogradWeightView& w, const float* bias,
                           float* y, bool nhwc, Activation activation) {
  const int64_t tile = winograd_tile(g) == 2 ? 2 : kTile;
  if (stream_weights(g, tile)) {
    if (!forward_tiles(g, tile, x, nullptr, w, bias, y, nhwc, activation)) return false;
    streamed_calls.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  thread_local WinogradWeights weights;  // storage reused by the next call on this thread
  winograd_weights(g, tile, w, weights);
  return conv_forward_winograd(g, x, weights, bias, y, nhwc, activation);
}

// dW = G^T dU G with dU[xi] = sum over tiles of Z[xi] (C_out x tiles) * V[xi]^T (tiles x C_in),
// the gradient of U = G g G^T through M = U V and Y = A^T M A (formulas.md §Winograd). Blocks of
// whole tile rows, their size fixed by the layer's sizes, add into dU in order, so no sum depends
// on the thread count.
bool conv_backward_weight_winograd(const ConvGeometry& g, const float* dy, const float* x, float* dw, bool nhwc,
                                   WeightOrder order) {
  const Kernels& kern = kernels();
  const int64_t lanes = kern.lanes, nr = gemm_nr<float>();
  const int64_t c_in = g.in_channels, c_out = g.out_channels, groups = g.groups;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t h = g.in[1], w = g.in[2], ho = g.out[1], wo = g.out[2], ph = g.pad[1], pw = g.pad[2];
  const int64_t d = g.in[0], dout = g.out[0], pd = g.pad[0], depth = g.kernel[0];
  const Kernels& rows_kern = row_kernels(num_blocks(wo, kTile));
  // Tile rows r = (plane, ty) over the output planes (sample, od), plane = n * dout + od, as in the
  // forward; depth tap kd pairs output plane od with input plane od + kd - pad (zero outside).
  const int64_t th = num_blocks(ho, kTile), tw = num_blocks(wo, kTile), tile_rows = g.batch * dout * th;
  // V and Z of a block: at least 8 MB, and twice dU, which every block after the first reads and
  // writes again; at least one tile row.
  const double row_bytes = double(kPositions) * double(c_in + c_out) * double(tw) * sizeof(float);
  const double du_bytes = double(depth * kPositions) * double(c_out) * double(cin_g) * sizeof(float);
  const double target = std::max(double(int64_t(8) << 20), 2 * du_bytes);
  const int64_t rows_per_block = std::clamp<int64_t>(int64_t(std::min(target / row_bytes, 1e15)), 1, tile_rows);
  const int64_t blocks = num_blocks(tile_rows, rows_per_block);
  const int64_t ld = round_up(rows_per_block * tw, nr) + round_up(lanes, nr);
  const int64_t v_xi = checked_numel({c_in, ld}, "conv_backward() Winograd grad_weight", true) + 16;
  const int64_t z_xi = checked_numel({c_out, ld}, "conv_backward() Winograd grad_weight", true) + 16;  // see forward
  const int64_t plane_w = kTile * round_up(tw, lanes) + lanes, plane_size = (kTile + 2) * plane_w;
  const int64_t step = nhwc ? lanes : 1;  // channels per transform task
  const int64_t in_tasks = num_blocks(c_in, step), out_tasks = num_blocks(c_out, step);
  const char* what = "conv_backward() Winograd grad_weight";
  const int64_t v_size = checked_numel({kPositions, v_xi}, what, true),
                z_size = checked_numel({kPositions, z_xi}, what, true);
  const int64_t du_kd = checked_numel({kPositions, c_out, cin_g}, what, true);  // [xi][grp][cout_g][cin_g]
  const int64_t du_size = checked_numel({depth, du_kd}, what, true);
  // Buffers kept between calls on this thread, as the forward's: fresh ones would page-fault on
  // every call. Every value the GEMMs read is written first (lanes past a block's tiles are not read).
  thread_local OperandVector<float> v_buffer, z_buffer, du_buffer;
  v_buffer.resize(std::max<size_t>(v_buffer.size(), v_size));
  z_buffer.resize(std::max<size_t>(z_buffer.size(), z_size));
  du_buffer.resize(std::max<size_t>(du_buffer.size(), du_size));
  float *v = v_buffer.data(), *z = z_buffer.data(), *du = du_buffer.data();
  std::vector<int64_t> a_offset(rows_per_block * tw);
  for (int64_t k = 0; k < rows_per_block * tw; ++k) a_offset[k] = k;
  // Element strides (n, c, depth, h, w) of x (channels c_in) and dy (c_out).
  auto strides = [&](int64_t channels, int64_t planes, int64_t rows, int64_t cols) {
    const int64_t plane = rows * cols * (nhwc ? channels : 1);
    return std::array<int64_t, 5>{channels * planes * rows * cols, nhwc ? 1 : planes * rows * cols, plane,
                                  cols * (nhwc ? channels : 1), nhwc ? channels : 1};
  };
  const auto xs = strides(c_in, d, h, w), ys = strides(c_out, dout, ho, wo);
  std::atomic<bool> finite{true};
  for (int64_t block = 0; block < blocks && finite; ++block) {
    const int64_t r0 = block * rows_per_block, r1 = std::min(tile_rows, r0 + rows_per_block);
    const int64_t tiles = (r1 - r0) * tw;
    for (int64_t kd = 0; kd < depth && finite; ++kd) {
      // Input transform, V = B^T d B, of the input planes depth tap kd reads, and (with the first
      // tap) the gradient transform, Z = A dY A^T, per channel plane: tasks [0, in_tasks) take
      // `step` input channels each, the rest `step` output channels. Channels-last rows are moved
      // L channels at a time, transposed L x L, as in the forward.
      parallel_for(0, in_tasks + (kd == 0 ? out_tasks : 0), 1, [&](int64_t begin, int64_t end) {
        std::vector<float> planes(step * plane_size);
        for (int64_t task = begin; task < end && finite; ++task) {
          const bool input = task < in_tasks;
          const int64_t channels = input ? c_in : c_out;
          const int64_t c0 = (input ? task : task - in_tasks) * step, cn = std::min(step, channels - c0);
          const float* t = input ? x : dy;
          const auto& ts = input ? xs : ys;
          const int64_t t_h = input ? h : ho, t_w = input ? w : wo;
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t plane = r / th, ty = r % th, n = plane / dout, od = plane % dout;
            const int64_t t_d = input ? od + kd - pd : od;  // the plane read
            const bool plane_inside = !input || (t_d >= 0 && t_d < d);
            // The rows this tile row reads, zero outside the (padded) input or the output.
            const int64_t rows = input ? kTile + 2 : kTile;
            for (int64_t q = 0; q < rows; ++q) {
              float* dst = planes.data() + q * plane_w;
              for (int64_t k = 0; k < cn; ++k) std::fill(dst + k * plane_size, dst + k * plane_size + plane_w, 0.0f);
              const int64_t row = input ? kTile * ty + q - ph : kTile * ty + q;
              if (!plane_inside || row < 0 || row >= t_h) continue;
              if (input) dst += pw;
              const float* src = t + n * ts[0] + c0 * ts[1] + t_d * ts[2] + row * ts[3];  // channel c0, column 0
              copy_row_into_planes(kern, src, ts[1], ts[4], t_w, cn, dst, plane_size);
            }
            for (int64_t k = 0; k < cn; ++k) {
              const float* tile_rows_copy = planes.data() + k * plane_size;
              const int64_t c = c0 + k, at = c * ld + (r - r0) * tw;
              const bool ok = input ? rows_kern.f4.input_row(tile_rows_copy, plane_w, tw, v + at, v_xi)
                                    : rows_kern.grad_row(tile_rows_copy, plane_w, tw, z + at, z_xi);
              if (!ok) finite = false;
            }
          }
        }
      });
      if (!finite) break;
      // dU[kd][xi][group] (+)= Z[xi] * V[xi]^T: Z read in place, V's rows transposed into B panels.
      parallel_for(0, kPositions * groups, 1, [&](int64_t begin, int64_t end) {
        const auto workspace = scratch<float>(gemm_workspace_size<float>(cin_g));
        for (int64_t task = begin; task < end; ++task) {
          const int64_t xi = task / groups, grp = task % groups;
          const float* v_g = v + xi * v_xi + grp * cin_g * ld;
          auto pack = [&](int64_t k0, int64_t kc, int64_t j0, int64_t jc, float* dst) {
            for (int64_t p = 0; p * nr < jc; ++p) {  // panel p: B[k0 + kk, j0 + p * NR + q] = V[q'][k0 + kk]
              const int64_t cols = std::min(nr, jc - p * nr);
              const float* src = v_g + (j0 + p * nr) * ld + k0;
              float* panel = dst + p * kc * nr;
              int64_t kk = 0;
              if (cols % lanes == 0)
                for (; kk + lanes <= kc; kk += lanes)
                  for (int64_t q0 = 0; q0 < cols; q0 += lanes)
                    kern.transpose(src + q0 * ld + kk, ld, panel + kk * nr + q0, nr);
              for (; kk < kc; ++kk)
                for (int64_t q = 0; q < cols; ++q) panel[kk * nr + q] = src[q * ld + kk];
            }
            zero_panel_tail(kc, jc, dst);
          };
          gemm_shifted_a<float>(cout_g, tiles, z + xi * z_xi + grp * cout_g * ld, ld, a_offset.data(), cin_g, pack,
                                du + kd * du_kd + (xi * groups + grp) * cout_g * cin_g, cin_g, workspace.get(),
                                block > 0);
        }
      });
    }
  }
  if (!finite) return false;
  // dW[co, ci, kd] = G^T dU[kd][., co, ci] G, L input channels at a time, in the order asked
  // (OIHW: a channel's 9 * depth taps together; OHWI: a tap's channels together).
  const int64_t taps = 9 * depth, tap_stride = order == WeightOrder::TapChannel ? cin_g : 0;
  parallel_for(0, c_out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t co = begin; co < end; ++co)
      for (int64_t kd = 0; kd < depth; ++kd) {
        const float* du_co = du + kd * du_kd + co * cin_g;  // position 0 of dU[kd][xi][grp][cout_g][cin_g]
        // Where tap 9 kd of channel ci0 lies: OHWI (tap, ci) rows, or OIHW (ci, tap) rows.
        float* dw_kd = dw + co * cin_g * taps + (tap_stride != 0 ? kd * 9 * cin_g : kd * 9);
        for (int64_t ci0 = 0; ci0 < cin_g; ci0 += lanes) {
          float* out = dw_kd + (tap_stride != 0 ? ci0 : ci0 * taps);
          kern.weight_grad(du_co + ci0, c_out * cin_g, std::min(lanes, cin_g - ci0), out, tap_stride, taps);
        }
      }
  });
  weight_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace cpu
}  // namespace cnnops
