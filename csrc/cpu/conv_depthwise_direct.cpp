// Direct depthwise convolution for MobileNet's, EfficientNet's and ConvNeXt's layers: 3x3 and 5x5
// at stride 1 and 2, 7x7 at stride 1; NCHW and NHWC, forward and both gradients. Kernel size and stride are template
// arguments, so every tap loop unrolls and the taps index registers.
//  - NCHW vectorizes along the output row. Each (sample, channel) plane is first copied into a
//    zero-padded buffer whose rows are split into `stride` column phases (phase q holds padded
//    columns q, q + s, q + 2s, ...), so tap kw of an output vector is one unit-stride load:
//    phase kw % s, offset kw / s. Several output rows share each loaded input vector.
//    Outputs narrower than two vectors instead transpose a vector's worth of channels into a
//    small channels-last block and run the NHWC loop on it.
//  - NHWC vectorizes over channels: a channel block's taps stay in registers while the loop walks
//    the output row, several pixels sharing each loaded input vector.
//  - Grad input (dl/dx_i = sum_j dl/dy_j (star) w_ij): the forward loop with the kernel rotated
//    180 degrees over dY, which NCHW places on a zero-interleaved grid for stride 2 (no scatter);
//    NHWC stride 2 gathers each dX pixel's taps instead.
//  - Grad weight: per-lane partial sums in registers, reduced in an order fixed by the sizes
//    alone, so the result does not depend on the thread count; grad bias is summed from the
//    same dY loads.
// The loops are written once with GCC vector extensions; per-ISA functions instantiate them at 64
// (AVX-512), 32 (AVX2) and 16 (portable) bytes per vector (simd.h).
#include "cpu/conv_depthwise_direct.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/conv_cpu.h"
#include "cpu/simd.h"
#include "cpu/simd_transpose.h"
#include "cpu/simd_vec.h"

// Vector values only cross always-inlined calls, so no function has a vector in its ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace cnnops {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------------------
// NCHW: one (sample, channel) plane at a time, through the phase-split padded buffer.
// ------------------------------------------------------------------------------------------

template <typename T>
struct PlaneJob {
  int64_t batch, channels;
  int64_t src_h, src_w;  // the plane read: x, or dY for grad input
  int64_t out_h, out_w;  // the plane the loop runs over: y (dX for grad input), or dY for grad weight
  int64_t pad_h, pad_w;  // buffer position of source (0, 0); negative crops
  int64_t spacing;       // source step on the buffer grid: 1, or the stride for grad input's dY
  int64_t rows, seg;     // buffer rows, per-phase row length (a multiple of the vector)
  const T* src;
  const T* w;  // [C][K*K], rotated for grad input
  const T* bias;
  T* out;
  bool relu;
  const T* dy;  // grad weight
};

// Fills the buffer from one source plane. Every plane writes the same positions, so the zeros
// around them, set once per buffer, stay zero.
template <typename T, int S, int BYTES>
CNNOPS_ALWAYS_INLINE void build_plane(const PlaneJob<T>& j, const T* src, T* buf, T* tmp) {
  const int64_t width = S * j.seg;  // padded columns per buffer row
  if (j.spacing == 1 && j.pad_w >= 0) {
    const int64_t n = std::min(j.src_w, width - j.pad_w);
    if (n <= 0) return;
    for (int64_t r = 0; r < j.rows; ++r) {
      const int64_t ih = r - j.pad_h;
      if (ih < 0 || ih >= j.src_h) continue;
      T* dst = S == 1 ? buf + r * width : tmp;
      Simd<T, BYTES>::copy_row(dst + j.pad_w, src + ih * j.src_w, n);
      if (S == 2) Simd<T, BYTES>::deinterleave(tmp, j.seg, buf + r * width, buf + r * width + j.seg);
    }
    return;
  }
  static_assert(S == 1 || S == 2);
  if constexpr (S == 1) {  // source (i, k) at (pad_h + i * spacing, pad_w + k * spacing)
    for (int64_t i = 0; i < j.src_h; ++i) {
      const int64_t r = j.pad_h + i * j.spacing;
      if (r < 0 || r >= j.rows) continue;
      T* dst = buf + r * width;
      const T* s = src + i * j.src_w;
      for (int64_t k = 0; k < j.src_w; ++k) {
        const int64_t col = j.pad_w + k * j.spacing;
        if (col >= 0 && col < width) dst[col] = s[k];
      }
    }
  }
}

// Output rows [oh0, oh0 + R): out[oh, ow] = act(b + sum over kh, kw of w[kh, kw] *
// padded[oh*S + kh, ow*S + kw]), one vector of ow at a time. Input row r of the block serves
// output row i through kernel row r - i*S.
template <typename T, int K, int S, int BYTES, int R>
CNNOPS_ALWAYS_INLINE void forward_rows(const T* buf, int64_t seg, int64_t oh0, int64_t out_w, const T* w, T b,
                                       bool relu, T* out) {
  using V = Simd<T, BYTES>;
  using vec = typename V::vec;
  constexpr int L = V::lanes;
  const int64_t width = S * seg;
  for (int64_t ow = 0; ow < out_w; ow += L) {
    // the last vector of a row at least one vector wide ends at out_w, overlapping the one before
    const int64_t ow0 = ow + L > out_w && out_w >= L ? out_w - L : ow;
    vec acc[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) acc[i] = V::splat(b);
#pragma GCC unroll 16
    for (int r = 0; r < (R - 1) * S + K; ++r) {
      const T* row = buf + (oh0 * S + r) * width + ow0;
#pragma GCC unroll 8
      for (int kw = 0; kw < K; ++kw) {
        const vec v = V::load(row + (kw % S) * seg + kw / S);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          const int kh = r - i * S;
          if (kh >= 0 && kh < K) acc[i] += w[kh * K + kw] * v;
        }
      }
    }
    const int64_t n = std::min<int64_t>(L, out_w - ow0);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const vec v = relu ? V::relu(acc[i]) : acc[i];
      if (n == L)
        V::store(out + (oh0 + i) * out_w + ow0, v);
      else
        V::store_first(out + (oh0 + i) * out_w + ow0, v, n);
    }
  }
}

template <typename T, int K, int S, int BYTES>
CNNOPS_ALWAYS_INLINE void nchw_forward_body(const PlaneJob<T>& j, int64_t begin, int64_t end, T* buf, T* tmp) {
  const int64_t src_plane = j.src_h * j.src_w, out_plane = j.out_h * j.out_w;
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t c = plane % j.channels;
    build_plane<T, S, BYTES>(j, j.src + plane * src_plane, buf, tmp);
    const T* w = j.w + c * K * K;
    const T b = j.bias ? j.bias[c] : T(0);
    T* out = j.out + plane * out_plane;
    int64_t oh = 0;
    for (; oh + 4 <= j.out_h; oh += 4) forward_rows<T, K, S, BYTES, 4>(buf, j.seg, oh, j.out_w, w, b, j.relu, out);
    for (; oh < j.out_h; ++oh) forward_rows<T, K, S, BYTES, 1>(buf, j.seg, oh, j.out_w, w, b, j.relu, out);
  }
}

// acc[kh*K + kw] += dy[oh, ow] * padded[oh*S + kh, ow*S + kw] over rows [oh0, oh0 + R) and the
// lanes of one ow vector; in the last, partial vector (TAIL) the lanes past out_w add zero.
template <typename T, int K, int S, int BYTES, int R, bool TAIL>
CNNOPS_ALWAYS_INLINE void weight_block(const T* buf, int64_t seg, int64_t oh0, int64_t ow0, int64_t out_w, const T* dy,
                                       typename Simd<T, BYTES>::vec (&acc)[K * K],
                                       typename Simd<T, BYTES>::vec& bias_acc) {
  using V = Simd<T, BYTES>;
  using vec = typename V::vec;
  const int64_t width = S * seg, n = out_w - ow0;
  vec d[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
    d[i] = TAIL ? V::load_first(dy + (oh0 + i) * out_w + ow0, n) : V::load(dy + (oh0 + i) * out_w + ow0);
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) bias_acc += d[i];  // db = sum of dy, from the same loads
  // x past the last output may be inf or NaN: masked, not multiplied by zero
  const typename V::mask valid = TAIL ? V::first_lanes(n) : typename V::mask{};
#pragma GCC unroll 16
  for (int r = 0; r < (R - 1) * S + K; ++r) {
    const T* row = buf + (oh0 * S + r) * width + ow0;
#pragma GCC unroll 8
    for (int kw = 0; kw < K; ++kw) {
      vec v = V::load(row + (kw % S) * seg + kw / S);
      if (TAIL) v = valid ? v : vec{};
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const int kh = r - i * S;
        if (kh >= 0 && kh < K) acc[kh * K + kw] += d[i] * v;
      }
    }
  }
}

template <typename T, int K, int S, int BYTES, int R>
CNNOPS_ALWAYS_INLINE void weight_rows(const T* buf, int64_t seg, int64_t oh0, int64_t out_w, const T* dy,
                                      typename Simd<T, BYTES>::vec (&acc)[K * K],
                                      typename Simd<T, BYTES>::vec& bias_acc) {
  constexpr int L = Simd<T, BYTES>::lanes;
  int64_t ow0 = 0;
  for (; ow0 + L <= out_w; ow0 += L)
    weight_block<T, K, S, BYTES, R, false>(buf, seg, oh0, ow0, out_w, dy, acc, bias_acc);
  if (ow0 < out_w) weight_block<T, K, S, BYTES, R, true>(buf, seg, oh0, ow0, out_w, dy, acc, bias_acc);
}

// Channels [begin, end): dw[c, tap] = sum over samples and positions of dy * x at the tap (and
// db[c] = sum of dy when db is not null), summed lane-wise in a fixed order (samples, row blocks,
// ow vectors), then across the lanes.
template <typename T, int K, int S, int BYTES>
CNNOPS_ALWAYS_INLINE void nchw_weight_body(const PlaneJob<T>& j, int64_t begin, int64_t end, T* buf, T* tmp, T* dw,
                                           T* db) {
  using V = Simd<T, BYTES>;
  using vec = typename V::vec;
  const int64_t src_plane = j.src_h * j.src_w, out_plane = j.out_h * j.out_w;
  for (int64_t c = begin; c < end; ++c) {
    vec acc[K * K];
#pragma GCC unroll 32
    for (int t = 0; t < K * K; ++t) acc[t] = vec{};
    vec bias_acc{};
    for (int64_t n = 0; n < j.batch; ++n) {
      const int64_t plane = n * j.channels + c;
      build_plane<T, S, BYTES>(j, j.src + plane * src_plane, buf, tmp);
      const T* dy = j.dy + plane * out_plane;
      int64_t oh = 0;
      for (; oh + 4 <= j.out_h; oh += 4) weight_rows<T, K, S, BYTES, 4>(buf, j.seg, oh, j.out_w, dy, acc, bias_acc);
      for (; oh < j.out_h; ++oh) weight_rows<T, K, S, BYTES, 1>(buf, j.seg, oh, j.out_w, dy, acc, bias_acc);
    }
    if (db) {
      T sum = 0;
      for (int i = 0; i < V::lanes; ++i) sum += bias_acc[i];
      db[c] = sum;
    }
    for (int t = 0; t < K * K; ++t) {
      T sum = 0;
      for (int i = 0; i < V::lanes; ++i) sum += acc[t][i];
      dw[c * K * K + t] = sum;
    }
  }
}

// ------------------------------------------------------------------------------------------
// NHWC: one output row (sample, oh) at a time, a vector of channels at a time.
// ------------------------------------------------------------------------------------------

template <typename T>
struct NhwcJob {
  int64_t batch, channels;
  int64_t in_h, in_w, out_h, out_w, pad_h, pad_w;
  int64_t ow_lo, ow_hi;  // output columns whose taps all lie inside the input
  const T* x;            // dY for grad input
  const T* taps;         // [K*K][taps_stride]: the weight with channels fastest
  int64_t taps_stride;
  const T* bias;  // [C]
  T* y;
  bool relu;
  const T* dy;  // grad weight
};

template <typename T>
void set_interior_columns(NhwcJob<T>& j, int64_t k, int64_t s) {
  j.ow_lo = std::min(j.out_w, (j.pad_w + s - 1) / s);  // ow*s - pad >= 0
  const int64_t last = j.in_w - k + j.pad_w;           // ow*s - pad + k - 1 <= in_w - 1
  j.ow_hi = last < 0 ? j.ow_lo : std::max(j.ow_lo, std::min(j.out_w, last / s + 1));
}

// The K input rows of output row (n, oh), and whether each lies inside the input.
template <typename T, int K, int S>
CNNOPS_ALWAYS_INLINE void input_rows(const NhwcJob<T>& j, const T* x, int64_t n, int64_t oh, const T* (&rows)[K],
                                     bool (&ok)[K]) {
#pragma GCC unroll 8
  for (int kh = 0; kh < K; ++kh) {
    const int64_t ih = oh * S - j.pad_h + kh;
    ok[kh] = ih >= 0 && ih < j.in_h;
    rows[kh] = x + (n * j.in_h + (ok[kh] ? ih : 0)) * j.in_w * j.channels;
  }
}

// 3x3 and 5x5 hold all K*K taps of a channel block in registers for a whole column tile; 7x7's 49
// would spill, so it loads a kernel row's K taps per input row of each pixel group instead.
template <int K>
constexpr bool taps_held() {
  return K * K <= 25;
}

// P pixels from column iw0 = ow*S - pad_w, channels [c0, c0 + lanes): pixel i reads column c
// through tap c - i*S. With CHECK, columns outside the input are skipped (border pixels).
template <typename T, int K, int S, int BYTES, int P, bool CHECK>
CNNOPS_ALWAYS_INLINE void nhwc_forward_pixels(const NhwcJob<T>& j, const T* const (&rows)[K], const bool (&ok)[K],
                                              int64_t iw0, int64_t c0, const typename Simd<T, BYTES>::vec (&wv)[K * K],
                                              typename Simd<T, BYTES>::vec bv, T* out) {
  using V = Simd<T, BYTES>;
  using vec = typename V::vec;
  const int64_t C = j.channels;
  vec acc[P];
#pragma GCC unroll 8
  for (int i = 0; i < P; ++i) acc[i] = bv;
#pragma GCC unroll 8
  for (int kh = 0; kh < K; ++kh) {
    if (!ok[kh]) continue;
    vec w_row[K];
#pragma GCC unroll 8
    for (int kw = 0; kw < K; ++kw)
      w_row[kw] = taps_held<K>() ? wv[kh * K + kw] : V::load(j.taps + (kh * K + kw) * j.taps_stride + c0);
    const T* xr = rows[kh] + iw0 * C + c0;
#pragma GCC unroll 16
    for (int c = 0; c < (P - 1) * S + K; ++c) {
      if (CHECK && (iw0 + c < 0 || iw0 + c >= j.in_w)) continue;
      const vec v = V::load(xr + c * C);
#pragma GCC unroll 8
      for (int i = 0; i < P; ++i) {
        const int kw = c - i * S;
        if (kw >= 0 && kw < K) acc[i] += w_row[kw] * v;
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < P; ++i) V::store(out + i * C + c0, j.relu ? V::relu(acc[i]) : acc[i]);
}

// Output rows [begin, end) of the flat (sample, oh) range, in column tiles: per tile and channel
// block the taps are loaded into registers once, then the tile's pixels run P at a time (the
// ones near the borders with column checks). Channel blocks are whole vectors; the last one
// ends at C and may overlap the one before (the same values written twice).
template <typename T, int K, int S, int BYTES>
CNNOPS_ALWAYS_INLINE void nhwc_forward_body(const NhwcJob<T>& j, int64_t begin, int64_t end) {
  using V = Simd<T, BYTES>;
  using vec = typename V::vec;
  // 3x3: one pixel group per tile, so memory is read in order (9 tap loads per 36 FMAs); 5x5
  // amortizes its 25 tap loads over a longer tile; 7x7 (taps not held) takes 8 pixels a group
  constexpr int L = V::lanes, P = taps_held<K>() ? 4 : 8, TILE = K == 3 ? P : 8 * P;
  const int64_t C = j.channels, blocks = (C + L - 1) / L;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / j.out_h, oh = task % j.out_h;
    const T* rows[K];
    bool ok[K];
    input_rows<T, K, S>(j, j.x, n, oh, rows, ok);
    T* y_row = j.y + task * j.out_w * C;
    for (int64_t t0 = 0; t0 < j.out_w; t0 += TILE) {
      const int64_t t1 = std::min(j.out_w, t0 + TILE);
      for (int64_t cb = 0; cb < blocks; ++cb) {
        const int64_t c0 = std::min(cb * L, C - L);
        vec wv[K * K];
        if constexpr (taps_held<K>()) {
#pragma GCC unroll 32
          for (int t = 0; t < K * K; ++t) wv[t] = V::load(j.taps + t * j.taps_stride + c0);
        }
        const vec bv = V::load(j.bias + c0);
        int64_t ow = t0;
        for (; ow + P <= t1; ow += P) {
          T* out = y_row + ow * C;
          if (ow >= j.ow_lo && ow + P <= j.ow_hi)
            nhwc_forward_pixels<T, K, S, BYTES, P, false>(j, rows, ok, ow * S - j.pad_w, c0, wv, bv, out);
          else
            nhwc_forward_pixels<T, K, S, BYTES, P, true>(j, rows, ok, ow * S - j.pad_w, c0, wv, bv, out);
        }
        if constexpr (P > 4) {  // a narrow row's remainder: one pixel at a time would reload every tap per pixel
          for (; ow + 4 <= t1; ow += 4)
            nhwc_forward_pixels<T, K, S, BYTES, 4, true>(j, rows, ok, ow * S - j.pad_w, c0, wv, bv, y_row + ow * C);
        }
        for (; ow < t1; ++ow)
          nhwc_forward_pixels<T, K, S, BYTES, 1, true>(j, rows, ok, ow * S - j.pad_w, c0, wv, bv, y_row + ow * C);
      }
    }
  }
}

// Rows [r0, r1) of the flat (sample, oh) range added into partial[tap][C] (zeroed by the
// caller): acc[tap] += dy * x at the tap, and row K*K += dy (the bias gradient). Rows go a few
// at a time, all channel blocks of them before the next ones, so what they read stays in cache;
// each lane's sum runs in row order.
template <typename T, int K, int S, int BYTES>
CNNOPS_ALWAYS_INLINE void nhwc_weight_body(const NhwcJob<T>& j, int64_t r0, int64_t r1, T* partial) {
  using V = Simd<T, BYTES>;
  using vec = typename V::vec;
  constexpr int L = V::lanes, P = 4, ROWS = 4;
  const int64_t C = j.channels, blocks = (C + L - 1) / L;
  for (int64_t s0 = r0; s0 < r1; s0 += ROWS)
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const int64_t c0 = std::min(cb * L, C - L);
      // The last block may overlap the one before: its first cb*L - c0 lanes are that block's
      // channels, already summed; they start from zero here and are not stored.
      const typename V::mask overlap = V::first_lanes(cb * L - c0);
      vec acc[K * K];
#pragma GCC unroll 32
      for (int t = 0; t < K * K; ++t) acc[t] = overlap ? vec{} : V::load(partial + t * C + c0);
      vec bias_acc = overlap ? vec{} : V::load(partial + K * K * C + c0);
      for (int64_t row = s0; row < std::min(r1, s0 + ROWS); ++row) {
        const int64_t n = row / j.out_h, oh = row % j.out_h;
        const T* rows[K];
        bool ok[K];
        input_rows<T, K, S>(j, j.x, n, oh, rows, ok);
#pragma GCC unroll 8
        for (int kh = 0; kh < K; ++kh) rows[kh] += c0;
        const T* dy_row = j.dy + row * j.out_w * C + c0;
        int64_t ow = 0;
        auto border_pixel = [&](int64_t ow) __attribute__((always_inline)) {
          const vec d = V::load(dy_row + ow * C);
          bias_acc += d;
          const int64_t iw0 = ow * S - j.pad_w;
#pragma GCC unroll 8
          for (int kh = 0; kh < K; ++kh) {
            if (!ok[kh]) continue;
#pragma GCC unroll 8
            for (int kw = 0; kw < K; ++kw) {
              const int64_t iw = iw0 + kw;
              if (iw >= 0 && iw < j.in_w) acc[kh * K + kw] += d * V::load(rows[kh] + iw * C);
            }
          }
        };
        for (; ow < j.ow_lo; ++ow) border_pixel(ow);
        for (; ow + P <= j.ow_hi; ow += P) {
          vec d[P];
#pragma GCC unroll 8
          for (int i = 0; i < P; ++i) d[i] = V::load(dy_row + (ow + i) * C);
#pragma GCC unroll 8
          for (int i = 0; i < P; ++i) bias_acc += d[i];
#pragma GCC unroll 8
          for (int kh = 0; kh < K; ++kh) {
            if (!ok[kh]) continue;
            const T* xr = rows[kh] + (ow * S - j.pad_w) * C;
#pragma GCC unroll 16
            for (int c = 0; c < (P - 1) * S + K; ++c) {
              const vec v = V::load(xr + c * C);
#pragma GCC unroll 8
              for (int i = 0; i < P; ++i) {
                const int kw = c - i * S;
                if (kw >= 0 && kw < K) acc[kh * K + kw] += d[i] * v;
              }
            }
          }
        }
        for (; ow < j.out_w; ++ow) border_pixel(ow);
      }
#pragma GCC unroll 32
      for (int t = 0; t < K * K; ++t) V::store(partial + t * C + c0, overlap ? V::load(partial + t * C + c0) : acc[t]);
      V::store(partial + K * K * C + c0, overlap ? V::load(partial + K * K * C + c0) : bias_acc);
    }
}

// Grad input by gathering: dX[n, ih, iw] = sum over the taps (kh, kw) that some output reads it
// through, of w[kh, kw] * dY[n, oh, ow] with ih = oh*s - p + kh*d (and alike for iw).
struct TapList {
  int count;
  int tap[8];
  int64_t pos[8];  // the output row or column
};

TapList taps_reading(int64_t i, int64_t k, int64_t s, int64_t p, int64_t d, int64_t out) {
  TapList list{};
  for (int64_t t = 0; t < k; ++t) {
    const int64_t o = i + p - t * d;  // = out position * s
    if (o < 0 || o % s != 0 || o / s >= out) continue;
    list.tap[list.count] = static_cast<int>(t);
    list.pos[list.count++] = o / s;
  }
  return list;
}

template <typename T>
struct GatherJob {
  int64_t channels, kernel, in_h, in_w, out_h, out_w, stride, pad_h, pad_w, dilation;
  const T* dy;             // NHWC
  const T* taps;           // [K*K][C]
  T* dx;                   // NHWC
  const TapList* columns;  // per iw
};

template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void nhwc_gather_body(const GatherJob<T>& j, int64_t begin, int64_t end) {
  using V = Simd<T, BYTES>;
  using vec = typename V::vec;
  constexpr int L = V::lanes;
  const int64_t C = j.channels, blocks = (C + L - 1) / L;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / j.in_h, ih = task % j.in_h;
    const TapList rows = taps_reading(ih, j.kernel, j.stride, j.pad_h, j.dilation, j.out_h);
    T* dx_row = j.dx + task * j.in_w * C;
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const int64_t c0 = std::min(cb * L, C - L);
      for (int64_t iw = 0; iw < j.in_w; ++iw) {
        const TapList& cols = j.columns[iw];
        vec acc = vec{};
        for (int a = 0; a < rows.count; ++a) {
          const T* dy_row = j.dy + ((n * j.out_h + rows.pos[a]) * j.out_w) * C + c0;
          const T* w_row = j.taps + rows.tap[a] * j.kernel * C + c0;
          for (int b = 0; b < cols.count; ++b)
            acc += V::load(w_row + cols.tap[b] * C) * V::load(dy_row + cols.pos[b] * C);
        }
        V::store(dx_row + iw * C + c0, acc);
      }
    }
  }
}

// NCHW forward on narrow outputs (rows shorter than two vectors would waste lanes): one vector's
// worth of channels at a time, transposed into a channels-last block, run by the NHWC loop and
// transposed back. Tasks are (sample, channel block); the last block may overlap the one before.
template <typename T, int K, int S, int BYTES>
CNNOPS_ALWAYS_INLINE void nchw_blocked_body(const NhwcJob<T>& proto, const T* x, T* y, int64_t begin, int64_t end,
                                            T* x_block, T* y_block) {
  constexpr int L = Simd<T, BYTES>::lanes;
  const int64_t C = proto.taps_stride, blocks = (C + L - 1) / L;
  const int64_t in_plane = proto.in_h * proto.in_w, out_plane = proto.out_h * proto.out_w;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / blocks, c0 = std::min(task % blocks * L, C - L);
    transpose_matrix<T, BYTES>(x + (n * C + c0) * in_plane, in_plane, L, in_plane, x_block, L);
    NhwcJob<T> j = proto;
    j.channels = L, j.x = x_block, j.y = y_block, j.taps = proto.taps + c0, j.bias = proto.bias + c0;
    nhwc_forward_body<T, K, S, BYTES>(j, 0, j.out_h);
    transpose_matrix<T, BYTES>(y_block, L, out_plane, L, y + (n * C + c0) * out_plane, out_plane);
  }
}

// ------------------------------------------------------------------------------------------
// Per-ISA instantiations (simd.h) and their choice.
// ------------------------------------------------------------------------------------------

#define CNNOPS_DW_KERNELS(ISA, TARGET, BYTES)                                                                 \
  template <typename T, int K, int S>                                                                         \
  TARGET void nchw_forward_##ISA(const PlaneJob<T>& j, int64_t b, int64_t e, T* buf, T* tmp) {                \
    nchw_forward_body<T, K, S, BYTES>(j, b, e, buf, tmp);                                                     \
  }                                                                                                           \
  template <typename T, int K, int S>                                                                         \
  TARGET void nchw_weight_##ISA(const PlaneJob<T>& j, int64_t b, int64_t e, T* buf, T* tmp, T* dw, T* db) {   \
    nchw_weight_body<T, K, S, BYTES>(j, b, e, buf, tmp, dw, db);                                              \
  }                                                                                                           \
  template <typename T, int K, int S>                                                                         \
  TARGET void nhwc_forward_##ISA(const NhwcJob<T>& j, int64_t b, int64_t e) {                                 \
    nhwc_forward_body<T, K, S, BYTES>(j, b, e);                                                               \
  }                                                                                                           \
  template <typename T, int K, int S>                                                                         \
  TARGET void nhwc_weight_##ISA(const NhwcJob<T>& j, int64_t r0, int64_t r1, T* partial) {                    \
    nhwc_weight_body<T, K, S, BYTES>(j, r0, r1, partial);                                                     \
  }                                                                                                           \
  template <typename T, int K, int S>                                                                         \
  TARGET void nchw_blocked_##ISA(const NhwcJob<T>& j, const T* x, T* y, int64_t b, int64_t e, T* xb, T* yb) { \
    nchw_blocked_body<T, K, S, BYTES>(j, x, y, b, e, xb, yb);                                                 \
  }                                                                                                           \
  template <typename T>                                                                                       \
  TARGET void nhwc_gather_##ISA(const GatherJob<T>& j, int64_t b, int64_t e) {                                \
    nhwc_gather_body<T, BYTES>(j, b, e);                                                                      \
  }

#if CNNOPS_X86
CNNOPS_DW_KERNELS(avx512, CNNOPS_TARGET_AVX512, 64)
CNNOPS_DW_KERNELS(avx2, CNNOPS_TARGET_AVX2, 32)
#define CNNOPS_DW_PICK(KERNEL, ...)                        \
  (cpu_isa() == Isa::Avx512 ? KERNEL##_avx512<__VA_ARGS__> \
   : cpu_isa() == Isa::Avx2 ? KERNEL##_avx2<__VA_ARGS__>   \
                            : KERNEL##_portable<__VA_ARGS__>)
#else
#define CNNOPS_DW_PICK(KERNEL, ...) KERNEL##_portable<__VA_ARGS__>
#endif
CNNOPS_DW_KERNELS(portable, , 16)

// fn(K, S) with both as compile-time constants, for the kernel sizes and strides served here.
template <typename Fn>
void with_kernel_and_stride(const ConvGeometry& g, Fn&& fn) {
  const int64_t k = g.kernel[2], s = g.stride[2];
  if (k == 3 && s == 1) return fn(std::integral_constant<int, 3>(), std::integral_constant<int, 1>());
  if (k == 3 && s == 2) return fn(std::integral_constant<int, 3>(), std::integral_constant<int, 2>());
  if (k == 5 && s == 1) return fn(std::integral_constant<int, 5>(), std::integral_constant<int, 1>());
  if (k == 5 && s == 2) return fn(std::integral_constant<int, 5>(), std::integral_constant<int, 2>());
  if (k == 7 && s == 1) return fn(std::integral_constant<int, 7>(), std::integral_constant<int, 1>());
  TORCH_INTERNAL_ASSERT(false, "depthwise direct kernel: unsupported geometry");
}

// The weight as [tap][C] (channels fastest), rotated 180 degrees for grad input.
template <typename T>
std::vector<T> taps_by_channel(const T* w, int64_t channels, int64_t taps, bool rotate) {
  std::vector<T> out(taps * channels);
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < taps; ++t) out[(rotate ? taps - 1 - t : t) * channels + c] = w[c * taps + t];
  return out;
}

template <typename T>
std::vector<T> rotated(const T* w, int64_t channels, int64_t taps) {
  std::vector<T> out(taps * channels);
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < taps; ++t) out[c * taps + taps - 1 - t] = w[c * taps + t];
  return out;
}

// Runs an NCHW plane kernel over [0, count) with a zeroed buffer per task.
template <typename T, typename Fn>
void run_planes(const PlaneJob<T>& j, int stride, int64_t count, Fn&& fn) {
  const int64_t buf_size = j.rows * stride * j.seg, tmp_size = stride * j.seg;
  parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(buf_size, T(0)), tmp(tmp_size, T(0));
    fn(begin, end, buf.data(), tmp.data());
  });
}

template <typename T>
NhwcJob<T> nhwc_job(const ConvGeometry& g, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, int64_t pad_h,
                    int64_t pad_w, int64_t stride) {
  NhwcJob<T> j{};
  j.batch = g.batch;
  j.channels = g.in_channels;
  j.in_h = in_h, j.in_w = in_w, j.out_h = out_h, j.out_w = out_w, j.pad_h = pad_h, j.pad_w = pad_w;
  j.taps_stride = g.in_channels;
  set_interior_columns(j, g.kernel[2], stride);
  return j;
}

}  // namespace

bool depthwise_direct_supported(const ConvGeometry& g, bool nhwc, std::size_t element_size) {
  const int64_t k = g.kernel[2], s = g.stride[2];
  const bool served = ((k == 3 || k == 5) && (s == 1 || s == 2)) || (k == 7 && s == 1);
  const bool ok = g.groups == g.in_channels && g.out_channels == g.in_channels && g.in[0] == 1 && g.kernel[0] == 1 &&
                  g.pad[0] == 0 && g.kernel[1] == k && g.stride[1] == s && served && g.dilation[1] == 1 &&
                  g.dilation[2] == 1;
  if (!ok) return false;
  // NHWC channel blocks are whole vectors (the last one overlapping the one before)
  return !nhwc || g.in_channels * int64_t(element_size) >= vector_bytes(cpu_isa());
}

template <typename T>
void depthwise_direct_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation,
                              bool nhwc) {
  const int64_t lanes = vector_bytes(cpu_isa()) / sizeof(T);
  with_kernel_and_stride(g, [&](auto k_constant, auto s_constant) {
    constexpr int K = decltype(k_constant)::value, S = decltype(s_constant)::value;
    // NCHW rows shorter than two vectors run through channels-last blocks (7x7: shorter than half a
    // vector, where its 49 taps per output outweigh the transposes less than the idle lanes; 3x3
    // stride 1: shorter than 5/4 of a vector, where the 9 taps pay for the transposes less. Batch 8,
    // 2 threads, blocks -> direct: 256ch 28x28 324 -> 224 us, 24x24 265 -> 191 us, 20x20 166 -> 159 us;
    // 5x5 at 28x28 and 3x3 stride 2 to 28 wide stay blocked: 391 vs 384 us, 330 vs 581 us)
    const int64_t narrow = K == 7 ? lanes / 2 : K == 3 && S == 1 ? lanes + lanes / 4 : 2 * lanes;
    const bool blocked = !nhwc && g.out[2] < narrow && g.in_channels >= lanes;
    if (nhwc || blocked) {
      const std::vector<T> taps = taps_by_channel(w, g.in_channels, K * K, false);
      const std::vector<T> zeros(bias ? 0 : g.in_channels, T(0));
      NhwcJob<T> j = nhwc_job<T>(g, g.in[1], g.in[2], g.out[1], g.out[2], g.pad[1], g.pad[2], S);
      j.x = x, j.taps = taps.data(), j.bias = bias ? bias : zeros.data(), j.y = y;
      j.relu = activation == Activation::Relu;
      if (blocked) {
        const auto kernel = CNNOPS_DW_PICK(nchw_blocked, T, K, S);
        const int64_t blocks = (g.in_channels + lanes - 1) / lanes;
        parallel_for(0, g.batch * blocks, 1, [&](int64_t b, int64_t e) {
          std::vector<T> x_block(g.in_plane() * lanes), y_block(g.out_plane() * lanes);
          kernel(j, x, y, b, e, x_block.data(), y_block.data());
        });
        return;
      }
      const auto kernel = CNNOPS_DW_PICK(nhwc_forward, T, K, S);
      parallel_for(0, g.batch * g.out[1], 1, [&](int64_t b, int64_t e) { kernel(j, b, e); });
      return;
    }
    PlaneJob<T> j{};
    j.batch = g.batch, j.channels = g.in_channels;
    j.src_h = g.in[1], j.src_w = g.in[2], j.out_h = g.out[1], j.out_w = g.out[2];
    j.pad_h = g.pad[1], j.pad_w = g.pad[2], j.spacing = 1;
    j.rows = (g.out[1] - 1) * S + K;
    j.seg = round_up(round_up(g.out[2], lanes) + (K - 1) / S, lanes);
    j.src = x, j.w = w, j.bias = bias, j.out = y, j.relu = activation == Activation::Relu;
    const auto kernel = CNNOPS_DW_PICK(nchw_forward, T, K, S);
    run_planes(j, S, g.batch * g.in_channels, [&](int64_t b, int64_t e, T* buf, T* tmp) { kernel(j, b, e, buf, tmp); });
  });
}

template <typename T>
void depthwise_direct_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx, bool nhwc) {
  const int64_t lanes = vector_bytes(cpu_isa()) / sizeof(T);
  with_kernel_and_stride(g, [&](auto k_constant, auto s_constant) {
    constexpr int K = decltype(k_constant)::value, S = decltype(s_constant)::value;
    // dX = dY, placed S apart and padded by K - 1 - p, correlated with the rotated kernel
    const int64_t pad_h = K - 1 - g.pad[1], pad_w = K - 1 - g.pad[2];
    if (nhwc) {
      if (S == 1 && pad_h >= 0 && pad_w >= 0) {
        const std::vector<T> taps = taps_by_channel(w, g.in_channels, K * K, true), zeros(g.in_channels, T(0));
        NhwcJob<T> j = nhwc_job<T>(g, g.out[1], g.out[2], g.in[1], g.in[2], pad_h, pad_w, 1);
        j.x = dy, j.taps = taps.data(), j.bias = zeros.data(), j.y = dx, j.relu = false;
        const auto kernel = CNNOPS_DW_PICK(nhwc_forward, T, K, 1);
        parallel_for(0, g.batch * g.in[1], 1, [&](int64_t b, int64_t e) { kernel(j, b, e); });
        return;
      }
      const std::vector<T> taps = taps_by_channel(w, g.in_channels, K * K, false);
      std::vector<TapList> columns(g.in[2]);
      for (int64_t iw = 0; iw < g.in[2]; ++iw) columns[iw] = taps_reading(iw, K, S, g.pad[2], 1, g.out[2]);
      const GatherJob<T> j{g.in_channels, K,        g.in[1], g.in[2], g.out[1],    g.out[2], S,
                           g.pad[1],      g.pad[2], 1,       dy,      taps.data(), dx,       columns.data()};
      const auto kernel = CNNOPS_DW_PICK(nhwc_gather, T);
      parallel_for(0, g.batch * g.in[1], 1, [&](int64_t b, int64_t e) { kernel(j, b, e); });
      return;
    }
    const std::vector<T> w_rotated = rotated(w, g.in_channels, K * K);
    PlaneJob<T> j{};
    j.batch = g.batch, j.channels = g.in_channels;
    j.src_h = g.out[1], j.src_w = g.out[2], j.out_h = g.in[1], j.out_w = g.in[2];
    j.pad_h = pad_h, j.pad_w = pad_w, j.spacing = S;
    j.rows = g.in[1] + K - 1;
    j.seg = round_up(round_up(g.in[2], lanes) + K - 1, lanes);
    j.src = dy, j.w = w_rotated.data(), j.bias = nullptr, j.out = dx, j.relu = false;
    const auto kernel = CNNOPS_DW_PICK(nchw_forward, T, K, 1);
    run_planes(j, 1, g.batch * g.in_channels, [&](int64_t b, int64_t e, T* buf, T* tmp) { kernel(j, b, e, buf, tmp); });
  });
}

template <typename T>
void depthwise_direct_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw, T* db, bool nhwc) {
  const int64_t lanes = vector_bytes(cpu_isa()) / sizeof(T);
  with_kernel_and_stride(g, [&](auto k_constant, auto s_constant) {
    constexpr int K = decltype(k_constant)::value, S = decltype(s_constant)::value;
    const int64_t C = g.in_channels;
    if (nhwc) {
      // Row chunks fixed by the sizes, each summed into its own partial, added in order.
      const int64_t rows = g.batch * g.out[1], chunks = std::min<int64_t>(rows, 16);
      const int64_t size = (K * K + 1) * C;  // the taps' rows, then the bias row
      std::vector<T> partial(chunks * size);
      NhwcJob<T> j = nhwc_job<T>(g, g.in[1], g.in[2], g.out[1], g.out[2], g.pad[1], g.pad[2], S);
      j.x = x, j.dy = dy;
      const auto kernel = CNNOPS_DW_PICK(nhwc_weight, T, K, S);
      parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p)
          kernel(j, rows * p / chunks, rows * (p + 1) / chunks, partial.data() + p * size);
      });
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t <= K * K; ++t) {
          T sum = partial[t * C + c];
          for (int64_t p = 1; p < chunks; ++p) sum += partial[p * size + t * C + c];
          if (t < K * K)
            dw[c * K * K + t] = sum;
          else if (db)
            db[c] = sum;
        }
      return;
    }
    PlaneJob<T> j{};
    j.batch = g.batch, j.channels = C;
    j.src_h = g.in[1], j.src_w = g.in[2], j.out_h = g.out[1], j.out_w = g.out[2];
    j.pad_h = g.pad[1], j.pad_w = g.pad[2], j.spacing = 1;
    j.rows = (g.out[1] - 1) * S + K;
    j.seg = round_up(round_up(g.out[2], lanes) + (K - 1) / S, lanes);
    j.src = x, j.dy = dy;
    const auto kernel = CNNOPS_DW_PICK(nchw_weight, T, K, S);
    run_planes(j, S, C, [&](int64_t b, int64_t e, T* buf, T* tmp) { kernel(j, b, e, buf, tmp, dw, db); });
  });
}

#define CNNOPS_INSTANTIATE_DW_DIRECT(T)                                                                               \
  template void depthwise_direct_forward<T>(const ConvGeometry&, const T*, const T*, const T*, T*, Activation, bool); \
  template void depthwise_direct_backward_input<T>(const ConvGeometry&, const T*, const T*, T*, bool);                \
  template void depthwise_direct_backward_weight<T>(const ConvGeometry&, const T*, const T*, T*, T*, bool);
CNNOPS_INSTANTIATE_DW_DIRECT(float)
CNNOPS_INSTANTIATE_DW_DIRECT(double)

}  // namespace cpu
}  // namespace cnnops
