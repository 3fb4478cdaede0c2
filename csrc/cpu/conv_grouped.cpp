// Direct grouped convolution for narrow groups (conv_grouped.h), per (sample, group):
//  - Forward, y[n, co, o] = b[co] + sum over c, t of w[co, c, t] * x[n, c, o*S - P + t*D]
//    (formulas.md §Conv / grouped). The group's input channels are copied, zero padded, into phase
//    planes (phase (qh, qw) holds padded rows qh, qh + S_h, ... and columns qw, qw + S_w, ...), so
//    tap (kh, kw) of output (oh, ow) is plane (kh*D_h mod S_h, kw*D_w mod S_w) at
//    (oh + kh*D_h div S_h, ow + kw*D_w div S_w). On the flat grid p = oh * W_q + ow every tap is a
//    fixed offset: a vector of consecutive p loads each tap once and feeds every output channel
//    of the group (a broadcast weight each). Grid columns ow >= O_w are computed and dropped.
//  - Grad input (formulas.md §Conv / grouped): dX phase (a, b), the positions (a + S_h*i, b + S_w*j),
//    takes the taps with S_h | a + P_h - kh*D_h, which read dY at i + (a + P_h - kh*D_h) / S_h:
//    the same loop over a zero-padded dY, with each phase's taps. No col2im additions, no zeros interleaved.
//  - Grad weight, dW[co, c, t] = sum over n, p of dY[n, co, p] * x_phase[n, c, p + offset(t)], with
//    dY laid on the forward grid (zero on the dropped columns, where x is masked: no inf * 0).
//    A task owns a (group, channel chunk) slice of dW and runs the batch in order (several samples
//    side by side on one grid for small maps): the sums do not depend on the thread count, and need
//    no atomics. Channels-last: a task owns a block of groups (as below) and a fixed part of the
//    batch passes where blocks are few; the parts' sums are added in order.
//  - Channels-last forward and grad input: tasks (sample, block of groups about a vector of channels
//    wide). Each pixel row's slice of the block goes into the planes by L x L transposes, and each
//    grid row of the tiles back into pixels: one group's slice alone (8 floats of a pixel hundreds
//    apart) read element by element was 1.5x the NCHW time (RegNet 104 channels at 56x56). Strided
//    grad input from batch 4 on takes a sample a task instead, writing whole dX rows (input_sample).
//  - NCHW rows (plane fills, dY gathers, output and dX scatters) move with AVX-512 masked loads and
//    stores in float (copy_rows, spread_rows_avx512): rows of 7 to 28 values at RegNet's stride 2.
//  - First layers with groups >= 2 (few input channels a group, more than 16 outputs): the phase
//    planes of every sample are filled once (fill_all_phases), then forward tasks split each sample's
//    output rows and grad-weight tasks the output channels, so batch 1 keeps every thread busy. With
//    groups = 1 (the RGB stem) conv.cpp runs conv_first_layer.cpp's forward and grad weight instead.
// Loops are written once with GCC vector extensions and instantiated per ISA through simd_dispatch.
#include "cpu/conv_grouped.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checked_math.h"
#include "cpu/conv_cpu.h"
#include "cpu/simd.h"
#include "cpu/simd_transpose.h"
#include "cpu/simd_vec.h"

#if CNNOPS_X86
#include <immintrin.h>
#endif

// Vector values only cross always-inlined calls, so no function has a vector in its ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace cnnops {
namespace cpu {
namespace {

std::atomic<int64_t> calls{0};

// Measured (fwd+bwd, batch 8, one thread): at 16 channels a group 1.5-5x faster than the GEMM
// routes; from 24 to 32 mixed (the shifted grid wins at 28x28 stride 1), so those keep the GEMM.
constexpr int64_t kGroupedMaxChannels = 16;
constexpr int64_t kWeightPoints = 1024;
// First layers (the RGB image in): up to this many input channels a group, any number of output
// channels, groups = 1 included. Measured against space to depth and im2col + GEMM (the stem, the
// 3x3 stride-2 layers of MobileNetV3 and EfficientNet).
constexpr int64_t kNarrowInputChannels = 4;
constexpr int64_t kForwardPoints = 256;   // grid points a first-layer forward task: its tile stays in L2
constexpr int64_t kSweepPoints = 512;     // grid points a grad-weight sweep: its dY rows and planes stay in L1
constexpr int64_t kInputBandRows = 8;     // dX phase rows a channels-last grad-input band (input_sample)
constexpr int64_t kInputSampleBatch = 4;  // from this batch on, channels-last grad input tasks are samples
constexpr int64_t kWeightPart = 4096;     // grid points a first-layer grad-weight task (a multiple of every L)

// Groups the (sample, group) tasks serve; the others (few input channels, many outputs or one group)
// run the first-layer tasks, which split the output rows (forward) and channels (grad weight).
bool narrow_groups(const ConvGeometry& g) {
  return g.groups >= 2 && g.in_channels_per_group() <= kGroupedMaxChannels &&
         g.out_channels_per_group() <= kGroupedMaxChannels;
}

int64_t lanes_for(std::size_t element_size) { return vector_bytes(cpu_isa()) / int64_t(element_size); }
int64_t floor_mod(int64_t a, int64_t m) { return ((a % m) + m) % m; }

// Element (n, c, h, w) of an activation at n * sample + c * channel + h * row + w * col.
struct Layout {
  int64_t sample, channel, row, col;
};
Layout activation_layout(int64_t channels, int64_t h, int64_t w, bool nhwc) {
  return nhwc ? Layout{h * w * channels, 1, w * channels, channels} : Layout{channels * h * w, h * w, w, 1};
}

// The phase planes of one input channel and the flat output grid on them. Each phase holds
// `samples` planes back to back, so one grid runs over several samples (small maps).
struct PhaseGrid {
  int64_t hq, wq, plane, samples;       // a plane is hq x wq, one sample's
  int64_t phase, channel;               // a phase is `samples` planes; a channel S_h * S_w phases and a gap
  int64_t sample_points;                // one plane's grid points up to its last output
  int64_t points, padded;               // the whole grid's, and rounded up to 2 vectors
  std::vector<int64_t> tap_offset;      // per tap (kh, kw), within a channel's planes
  std::vector<int64_t> col_lo, col_hi;  // per column phase qw: plane columns that hold input
  std::vector<int64_t> row_lo, row_hi;  // per row phase qh: plane rows that hold input
};

PhaseGrid phase_grid(const ConvGeometry& g, int64_t lanes, int64_t samples = 1) {
  PhaseGrid p;
  const int64_t sh = g.stride[1], sw = g.stride[2];
  p.hq = g.out[1] + (g.kernel[1] - 1) * g.dilation[1] / sh;
  p.wq = g.out[2] + (g.kernel[2] - 1) * g.dilation[2] / sw;
  p.plane = checked_numel({p.hq, p.wq}, "grouped conv (phase plane)", true);
  p.samples = samples;
  p.phase = checked_numel({samples, p.plane}, "grouped conv (phase planes)", true);
  // Channels an odd number of cache lines apart: at a multiple of 4 KB (8 samples of 8 x 8 planes) the
  // transposes' stores and the sweeps' loads of 16 channels all fell in one L1 set.
  const int64_t lines = num_blocks(checked_numel({sh, sw, p.phase}, "grouped conv (phase planes)", true), 16);
  p.channel = checked_numel({lines + 1 - lines % 2, 16}, "grouped conv (phase planes)", true);
  p.sample_points = (g.out[1] - 1) * p.wq + g.out[2];
  p.points = (samples - 1) * p.plane + p.sample_points;
  p.padded = round_up(p.points, 2 * lanes);
  for (int64_t kh = 0; kh < g.kernel[1]; ++kh)
    for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
      const int64_t dh = kh * g.dilation[1], dw = kw * g.dilation[2];
      p.tap_offset.push_back(((dh % sh) * sw + dw % sw) * p.phase + dh / sh * p.wq + dw / sw);
    }
  // Plane index j of phase q holds padded coordinate j*S + q, input j*S + q - pad when in [0, in).
  auto range = [](int64_t in, int64_t pad, int64_t s, int64_t q, int64_t n, std::vector<int64_t>& lo,
                  std::vector<int64_t>& hi) {
    const int64_t first = pad > q ? (pad - q + s - 1) / s : 0;
    const int64_t last = in - 1 + pad - q;  // j*S <= last
    lo.push_back(std::min(first, n));
    hi.push_back(last < 0 ? lo.back() : std::max(lo.back(), std::min(n, last / s + 1)));
  };
  for (int64_t q = 0; q < sh; ++q) range(g.in[1], g.pad[1], sh, q, p.hq, p.row_lo, p.row_hi);
  for (int64_t q = 0; q < sw; ++q) range(g.in[2], g.pad[2], sw, q, p.wq, p.col_lo, p.col_hi);
  return p;
}

// offset[c * taps + t] = where tap t of channel c's phase planes starts, for `channels` channels:
// the (channel, tap) entries that the correlate and weight loops walk.
void fill_entry_offsets(const PhaseGrid& p, int64_t channels, int64_t* offset) {
  const int64_t taps = int64_t(p.tap_offset.size());
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < taps; ++t) offset[c * taps + t] = c * p.channel + p.tap_offset[t];
}

// A vector accumulator's L lanes summed in lane order (the same bits on every run).
template <typename T, int L>
CNNOPS_ALWAYS_INLINE T lane_sum(const T* lanes) {
  T total = lanes[0];
  for (int i = 1; i < L; ++i) total += lanes[i];
  return total;
}

#if CNNOPS_X86
// Float rows narrower than a few vectors (7 and 28 values at RegNet's stride-2 layers): masked loads
// and stores, where the loops of single values (and their mispredicted exits) were a third of the
// NCHW grad-weight time at 14x14 stride 2. Masked-off lanes are not read, so no read passes a row.
CNNOPS_TARGET_AVX512 inline __mmask16 first_lanes_avx512(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
}

// dst[h * dst_row + w] = src[h * src_row + w * step] for h < rows, w < cols, step 1 or 2.
CNNOPS_TARGET_AVX512 void copy_rows_avx512(const float* src, int64_t src_row, int64_t step, int64_t rows, int64_t cols,
                                           float* dst, int64_t dst_row) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t h = 0; h < rows; ++h) {
    const float* from = src + h * src_row;
    float* to = dst + h * dst_row;
    for (int64_t w = 0; w < cols; w += 16) {
      const __mmask16 out = first_lanes_avx512(cols - w);
      if (step == 1) {
        _mm512_mask_storeu_ps(to + w, out, _mm512_maskz_loadu_ps(out, from + w));
      } else {  // values 2w .. 2(w + n - 1): 2n - 1 of them
        const int64_t span = 2 * std::min<int64_t>(16, cols - w) - 1;
        const __m512 a = _mm512_maskz_loadu_ps(first_lanes_avx512(span), from + 2 * w);
        const __m512 b = _mm512_maskz_loadu_ps(first_lanes_avx512(std::max<int64_t>(0, span - 16)), from + 2 * w + 16);
        _mm512_mask_storeu_ps(to + w, out, _mm512_permutex2var_ps(a, even, b));
      }
    }
  }
}

// dst[h * dst_row + 2 * w] = src[h * src_row + w] for h < rows, w < cols (a stride-2 grad input phase into
// dX): 8 values a masked store of the even lanes, leaving the odd ones (the other phase's) alone.
CNNOPS_TARGET_AVX512 void spread_rows_avx512(const float* src, int64_t src_row, int64_t rows, int64_t cols, float* dst,
                                             int64_t dst_row) {
  const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  for (int64_t h = 0; h < rows; ++h) {
    const float* from = src + h * src_row;
    float* to = dst + h * dst_row;
    for (int64_t w = 0; w < cols; w += 8) {
      const int64_t n = std::min<int64_t>(8, cols - w);
      const __m512 v = _mm512_maskz_loadu_ps(first_lanes_avx512(n), from + w);
      _mm512_mask_storeu_ps(to + 2 * w, first_lanes_avx512(2 * n) & __mmask16(0x5555), _mm512_permutexvar_ps(twice, v));
    }
  }
}
#endif

// dst[h * dst_row + w] = src[h * src_row + w * step] for h < rows, w < cols: the AVX-512 loop above for
// float, else plain loops (step 2: the even lanes of two vectors, the last read below src[2 * cols - 2]).
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void copy_rows(const T* src, int64_t src_row, int64_t step, int64_t rows, int64_t cols, T* dst,
                                    int64_t dst_row) {
#if CNNOPS_X86
  if constexpr (BYTES == 64 && std::is_same_v<T, float>) {
    if (step <= 2) return copy_rows_avx512(src, src_row, step, rows, cols, dst, dst_row);
  }
#endif
  using V = Simd<T, BYTES>;
  constexpr int L = V::lanes;
  for (int64_t h = 0; h < rows; ++h) {
    const T* from = src + h * src_row;
    T* to = dst + h * dst_row;
    if (step == 1) {  // a row copy the compiler vectorizes
      for (int64_t w = 0; w < cols; ++w) to[w] = from[w];
    } else if (step == 2) {
      typename V::mask even;
      for (int l = 0; l < L; ++l) even[l] = 2 * l;
      int64_t w = 0;
      for (; w + L < cols; w += L)
        V::store(to + w, __builtin_shuffle(V::load(from + 2 * w), V::load(from + 2 * w + L), even));
      for (; w < cols; ++w) to[w] = from[2 * w];
    } else {
      for (int64_t w = 0; w < cols; ++w) to[w] = from[w * step];
    }
  }
}

// Copies input channels [c0, c0 + count) of sample n into buf's phase planes. Every call writes
// the same positions, so the zeros around them, set once per buffer, stay zero.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void fill_phases(const ConvGeometry& g, const PhaseGrid& p, const T* x, const Layout& lx,
                                      int64_t n, int64_t c0, int64_t count, T* buf) {
  const int64_t sh = g.stride[1], sw = g.stride[2];
  if (lx.col != 1) {  // NHWC: each pixel's channels are adjacent, moved by vector transposes
    for (int64_t qh = 0; qh < sh; ++qh)
      for (int64_t i = p.row_lo[qh]; i < p.row_hi[qh]; ++i) {
        const T* row = x + n * lx.sample + c0 * lx.channel + (i * sh + qh - g.pad[1]) * lx.row;
        for (int64_t qw = 0; qw < sw; ++qw) {
          const int64_t lo = p.col_lo[qw], hi = p.col_hi[qw];
          transpose_matrix<T, BYTES>(row + (lo * sw + qw - g.pad[2]) * lx.col, sw * lx.col, hi - lo, count,
                                     buf + (qh * sw + qw) * p.phase + i * p.wq + lo, p.channel);
        }
      }
    return;
  }
  // NCHW: per channel and phase, the plane rows that hold input, each from every S_w-th value of a row
  for (int64_t c = 0; c < count; ++c) {
    const T* src = x + n * lx.sample + (c0 + c) * lx.channel;
    for (int64_t qh = 0; qh < sh; ++qh) {
      const int64_t i0 = p.row_lo[qh], rows = p.row_hi[qh] - i0;
      for (int64_t qw = 0; qw < sw; ++qw) {
        const int64_t lo = p.col_lo[qw], hi = p.col_hi[qw];
        if (rows > 0 && hi > lo)
          copy_rows<T, BYTES>(src + (i0 * sh + qh - g.pad[1]) * lx.row + lo * sw + qw - g.pad[2], sh * lx.row, sw, rows,
                              hi - lo, buf + c * p.channel + (qh * sw + qw) * p.phase + i0 * p.wq + lo, p.wq);
      }
    }
  }
}

// dst[m * dst_stride + h * dst_row + w] = src[m * channel + h * row + w * col] for m < count,
// h < rows, w < cols: dY into a buffer (NCHW rows copied whole, NHWC pixels read together).
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void gather_planes(const T* src, const Layout& l, int64_t count, int64_t rows, int64_t cols,
                                        T* dst, int64_t dst_stride, int64_t dst_row) {
  if (l.col == 1) {
    for (int64_t m = 0; m < count; ++m)
      copy_rows<T, BYTES>(src + m * l.channel, l.row, 1, rows, cols, dst + m * dst_stride, dst_row);
    return;
  }
  for (int64_t h = 0; h < rows; ++h)
    transpose_matrix<T, BYTES>(src + h * l.row, l.col, cols, count, dst + h * dst_row, dst_stride);
}

// The reverse for NCHW, onto every row_step-th row and col_step-th column:
// dst[m * channel + h * row_step * row + w * col_step] = src[m * src_stride + h * src_row + w].
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void scatter_planes(const T* src, int64_t src_stride, int64_t src_row, int64_t count, int64_t rows,
                                         int64_t cols, T* dst, const Layout& l, int64_t row_step, int64_t col_step) {
  for (int64_t m = 0; m < count; ++m) {
    if (col_step == 1) {
      copy_rows<T, BYTES>(src + m * src_stride, src_row, 1, rows, cols, dst + m * l.channel, row_step * l.row);
      continue;
    }
#if CNNOPS_X86
    if constexpr (BYTES == 64 && std::is_same_v<T, float>) {
      if (col_step == 2) {
        spread_rows_avx512(src + m * src_stride, src_row, rows, cols, dst + m * l.channel, row_step * l.row);
        continue;
      }
    }
#endif
    for (int64_t h = 0; h < rows; ++h) {
      const T* from = src + m * src_stride + h * src_row;
      T* to = dst + m * l.channel + h * row_step * l.row;
      for (int64_t w = 0; w < cols; ++w) to[w * col_step] = from[w];
    }
  }
}

// out[m * out_stride + p] = act(bias[m] + sum over entries e of wt[e * w_stride + m] * src[offset[e] + p])
// for m < MB and p in [begin, end), VB vectors of p a step (end - begin a multiple of VB vectors).
template <typename T, int BYTES, int MB, int VB>
CNNOPS_ALWAYS_INLINE void correlate_block(const T* src, const int64_t* offset, int64_t entries, const T* wt,
                                          int64_t w_stride, const T* bias, bool relu, int64_t begin, int64_t end,
                                          T* out, int64_t out_stride) {
  using V = Simd<T, BYTES>;
  using vec = typename V::vec;
  constexpr int L = V::lanes;
  for (int64_t p0 = begin; p0 < end; p0 += VB * L) {
    vec a[VB][MB];
#pragma GCC unroll 16
    for (int k = 0; k < VB; ++k)
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) a[k][m] = V::splat(bias ? bias[m] : T(0));
    for (int64_t e = 0; e < entries; ++e) {
      const T* s = src + offset[e] + p0;
      vec v[VB];
#pragma GCC unroll 16
      for (int k = 0; k < VB; ++k) v[k] = V::load(s + k * L);
      const T* wr = wt + e * w_stride;
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
        for (int k = 0; k < VB; ++k) a[k][m] += wr[m] * v[k];
    }
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
      for (int k = 0; k < VB; ++k) V::store(out + m * out_stride + p0 + k * L, relu ? V::relu(a[k][m]) : a[k][m]);
  }
}

// correlate_block over `channels` outputs, in blocks of 8, 4, 3, 2, 1, and p < padded (a multiple of 2
// vectors). Narrow blocks take 4 vectors of p a step: more multiply-adds per load (grad input's 3 channels).
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void correlate(const T* src, const int64_t* offset, int64_t entries, const T* wt, int64_t channels,
                                    const T* bias, bool relu, int64_t padded, T* out) {
  constexpr int L = Simd<T, BYTES>::lanes;
  int64_t m = 0;
  auto block = [&](auto size) CNNOPS_SIMD_BODY {
    constexpr int MB = decltype(size)::value;
    const T* b = bias ? bias + m : nullptr;
    if constexpr (MB >= 8 || (MB > 2 && BYTES < 64)) {  // (16 registers below AVX-512)
      correlate_block<T, BYTES, MB, 2>(src, offset, entries, wt + m, channels, b, relu, 0, padded, out + m * padded,
                                       padded);
    } else {
      const int64_t wide = padded / (4 * L) * (4 * L);
      correlate_block<T, BYTES, MB, 4>(src, offset, entries, wt + m, channels, b, relu, 0, wide, out + m * padded,
                                       padded);
      correlate_block<T, BYTES, MB, 2>(src, offset, entries, wt + m, channels, b, relu, wide, padded, out + m * padded,
                                       padded);
    }
    m += MB;
  };
  while (channels - m >= 8) block(std::integral_constant<int, 8>());
  if (channels - m >= 4) block(std::integral_constant<int, 4>());
  if (channels - m == 3) block(std::integral_constant<int, 3>());
  if (channels - m >= 2) block(std::integral_constant<int, 2>());
  if (channels - m >= 1) block(std::integral_constant<int, 1>());
}

// acc[m][e] += dyg[m * dy_stride + p] * (mask[p] ? src[offset[e] + p] : 0) lane-wise over p < padded, for
// m < MB, e < EB; acc[m][e] is the vector at sum + (m * sum_stride + e) * lanes. Kept as vectors across the
// batch and summed across lanes once at the end: small maps give each call only a few vectors.
template <typename T, int BYTES, int MB, int EB>
CNNOPS_ALWAYS_INLINE void weight_block(const T* src, const int64_t* offset, const T* dyg, int64_t dy_stride,
                                       const typename Simd<T, BYTES>::int_type* mask, int64_t padded, T* sum,
                                       int64_t sum_stride) {
  using V = Simd<T, BYTES>;
  using vec = typename V::vec;
  constexpr int L = V::lanes;
  vec acc[EB][MB];
#pragma GCC unroll 16
  for (int e = 0; e < EB; ++e)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[e][m] = V::load(sum + (m * sum_stride + e) * L);
  for (int64_t p0 = 0; p0 < padded; p0 += L) {
    const typename V::mask valid = V::load_mask(mask + p0);
    vec d[MB];
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) d[m] = V::load(dyg + m * dy_stride + p0);
#pragma GCC unroll 16
    for (int e = 0; e < EB; ++e) {
      vec v = V::load(src + offset[e] + p0);
      v = valid ? v : vec{};
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) acc[e][m] += d[m] * v;
    }
  }
#pragma GCC unroll 16
  for (int e = 0; e < EB; ++e)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) V::store(sum + (m * sum_stride + e) * L, acc[e][m]);
}

// weight_block over dY rows [0, count) (blocks of 4, 2, 1) and entries [0, entries) (blocks of 4, 1) on
// grid points [0, limit): acc (m, e) at sum + (m * entries + e) * lanes. A block of rows runs the points in
// sweeps of kSweepPoints, which keep its sums and the planes' rows in L1; each lane still adds its points
// in order, so the sums do not depend on the sweeps.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void weight_sweep(const T* src, const int64_t* offset, int64_t entries, const T* dyg,
                                       int64_t dy_stride, int64_t count, const typename Simd<T, BYTES>::int_type* mask,
                                       int64_t limit, T* sum) {
  constexpr int L = Simd<T, BYTES>::lanes;
  int64_t m = 0;
  auto rows = [&](auto size) CNNOPS_SIMD_BODY {
    constexpr int MB = decltype(size)::value;
    for (int64_t p0 = 0; p0 < limit; p0 += kSweepPoints) {
      const int64_t len = std::min(kSweepPoints, limit - p0);
      const T* d = dyg + m * dy_stride + p0;
      int64_t e = 0;
      for (; e + 4 <= entries; e += 4)
        weight_block<T, BYTES, MB, 4>(src + p0, offset + e, d, dy_stride, mask + p0, len, sum + (m * entries + e) * L,
                                      entries);
      for (; e < entries; ++e)
        weight_block<T, BYTES, MB, 1>(src + p0, offset + e, d, dy_stride, mask + p0, len, sum + (m * entries + e) * L,
                                      entries);
    }
    m += MB;
  };
  while (count - m >= 4) rows(std::integral_constant<int, 4>());
  if (count - m >= 2) rows(std::integral_constant<int, 2>());
  if (count - m >= 1) rows(std::integral_constant<int, 1>());
}

// The phase planes of every sample and input channel, filled once, in parallel, for the first-layer
// tasks (several read each): pass q (samples q * p.samples on, side by side as PhaseGrid lays them),
// channel c at (q * C_in + c) * p.channel; two vectors of zeros after the last.
template <typename T>
Scratch<T> fill_all_phases(const ConvGeometry& g, const PhaseGrid& p, const T* x, const Layout& lx, int64_t lanes) {
  const int64_t passes = num_blocks(g.batch, p.samples);
  const int64_t size = checked_numel({passes, g.in_channels, p.channel}, "grouped conv (phase planes)", true);
  auto buf = scratch<T>(size + 2 * lanes);
  std::fill(buf.get() + size, buf.get() + size + 2 * lanes, T(0));
  parallel_for(0, passes * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
      constexpr int B = vector_bytes(decltype(isa)::value);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t q = task / g.in_channels, c = task % g.in_channels;
        T* dst = buf.get() + task * p.channel;
        std::fill(dst, dst + p.channel, T(0));  // the padding, and the last pass's unused samples
        for (int64_t s = 0; s < std::min(p.samples, g.batch - q * p.samples); ++s)
          fill_phases<T, B>(g, p, x, lx, q * p.samples + s, c, 1, dst + s * p.plane);
      }
    });
  });
  return buf;
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

template <typename T>
struct ForwardJob {
  const ConvGeometry* g;
  const PhaseGrid* grid;
  Layout lx, ly;
  const T* x;
  const T* wt;  // [group][entry = (c, tap)][m]
  const T* bias;
  T* y;
  bool relu;
  const int64_t* offset;  // per entry
  int64_t entries;
};

template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void forward_task(const ForwardJob<T>& j, int64_t n, int64_t grp, T* buf, T* tile) {
  const ConvGeometry& g = *j.g;
  const PhaseGrid& p = *j.grid;
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group();
  fill_phases<T, BYTES>(g, p, j.x, j.lx, n, grp * cg, cg, buf);
  correlate<T, BYTES>(buf, j.offset, j.entries, j.wt + grp * j.entries * m_count, m_count,
                      j.bias ? j.bias + grp * m_count : nullptr, j.relu, p.padded, tile);
  scatter_planes<T, BYTES>(tile, p.padded, p.wq, m_count, g.out[1], g.out[2],
                           j.y + n * j.ly.sample + grp * m_count * j.ly.channel, j.ly, 1, 1);
}

// forward_task for groups [g0, g1) of channels-last sample n: their channels of each pixel row are
// transposed at once into buf's phase planes, and each grid row of their tiles into pixels.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void forward_groups(const ForwardJob<T>& j, int64_t n, int64_t g0, int64_t g1, T* buf, T* tile) {
  const ConvGeometry& g = *j.g;
  const PhaseGrid& p = *j.grid;
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group(), c = g.in_channels;
  const int64_t sh = g.stride[1], sw = g.stride[2], cin = (g1 - g0) * cg, cout = (g1 - g0) * m_count;
  const T* x = j.x + n * j.lx.sample + g0 * cg;
  for (int64_t qh = 0; qh < sh; ++qh)
    for (int64_t i = p.row_lo[qh]; i < p.row_hi[qh]; ++i) {
      const T* row = x + (i * sh + qh - g.pad[1]) * j.lx.row;
      for (int64_t qw = 0; qw < sw; ++qw) {
        const int64_t lo = p.col_lo[qw], hi = p.col_hi[qw];
        transpose_matrix<T, BYTES>(row + (lo * sw + qw - g.pad[2]) * c, sw * c, hi - lo, cin,
                                   buf + (qh * sw + qw) * p.phase + i * p.wq + lo, p.channel);
      }
    }
  for (int64_t grp = g0; grp < g1; ++grp)
    correlate<T, BYTES>(buf + (grp - g0) * cg * p.channel, j.offset, j.entries, j.wt + grp * j.entries * m_count,
                        m_count, j.bias ? j.bias + grp * m_count : nullptr, j.relu, p.padded,
                        tile + (grp - g0) * m_count * p.padded);
  T* y = j.y + n * j.ly.sample + g0 * m_count;
  for (int64_t oh = 0; oh < g.out[1]; ++oh)
    transpose_matrix<T, BYTES>(tile + oh * p.wq, p.padded, cout, g.out[2], y + oh * j.ly.row, g.out_channels);
}

// A first layer's output rows [oh0, oh1) of sample n, every channel of group grp, from the shared
// phase planes (fill_all_phases): tasks split the rows, so batch 1 keeps every thread busy.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void forward_rows(const ForwardJob<T>& j, const T* planes, int64_t n, int64_t grp, int64_t oh0,
                                       int64_t oh1, T* tile) {
  const ConvGeometry& g = *j.g;
  const PhaseGrid& p = *j.grid;
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group(), first = oh0 * p.wq;
  const int64_t padded = round_up(std::min(oh1 * p.wq, p.sample_points) - first, 2 * Simd<T, BYTES>::lanes);
  correlate<T, BYTES>(planes + (n * g.in_channels + grp * cg) * p.channel + first, j.offset, j.entries,
                      j.wt + grp * j.entries * m_count, m_count, j.bias ? j.bias + grp * m_count : nullptr, j.relu,
                      padded, tile);
  T* y = j.y + n * j.ly.sample + grp * m_count * j.ly.channel + oh0 * j.ly.row;
  if (j.ly.col == 1) return scatter_planes<T, BYTES>(tile, padded, p.wq, m_count, oh1 - oh0, g.out[2], y, j.ly, 1, 1);
  for (int64_t oh = 0; oh < oh1 - oh0; ++oh)
    transpose_matrix<T, BYTES>(tile + oh * p.wq, padded, m_count, g.out[2], y + oh * j.ly.row, g.out_channels);
}

// ------------------------------------------------------------------------------------------
// Grad input
// ------------------------------------------------------------------------------------------

struct InputPhase {
  int64_t a, b, ni, nj, padded;  // dX rows a + S_h*i (i < ni), columns b + S_w*j (j < nj)
  int64_t first, entries;        // its entries in InputPlan's lists
};

struct InputPlan {
  int64_t top, left, hd, wd, plane;  // dY at (top, left) of hd x wd zero-padded planes
  std::vector<InputPhase> phases;
  std::vector<int64_t> offset, source;  // per entry (m, kh, kw): dY buffer offset, m * taps + tap
  int64_t max_padded = 0;
};

InputPlan input_plan(const ConvGeometry& g, int64_t lanes) {
  const int64_t sh = g.stride[1], sw = g.stride[2], kh_n = g.kernel[1], kw_n = g.kernel[2];
  // Per dim and phase a: the taps k with S | a + P - k*D and their dY shift e = (a + P - k*D) / S.
  struct Dim {
    std::vector<int64_t> count;  // outputs per phase
    std::vector<std::vector<int64_t>> tap, shift;
    int64_t pad = 0, size = 0;  // leading zeros, padded length
  };
  auto dim = [](int64_t in, int64_t out, int64_t k, int64_t s, int64_t pad, int64_t d) {
    Dim r;
    int64_t lo = 0, hi = out;  // dY positions read: [lo, hi)
    for (int64_t a = 0; a < s; ++a) {
      r.count.push_back(in > a ? (in - a + s - 1) / s : 0);
      r.tap.emplace_back();
      r.shift.emplace_back();
      for (int64_t t = 0; t < k && r.count[a] > 0; ++t) {
        const int64_t num = a + pad - t * d;
        if (floor_mod(num, s) != 0) continue;
        r.tap[a].push_back(t);
        r.shift[a].push_back(num / s);
        lo = std::min(lo, num / s);
        hi = std::max(hi, r.count[a] + num / s);
      }
    }
    r.pad = -lo;
    r.size = hi - lo;
    return r;
  };
  const Dim h = dim(g.in[1], g.out[1], kh_n, sh, g.pad[1], g.dilation[1]);
  const Dim w = dim(g.in[2], g.out[2], kw_n, sw, g.pad[2], g.dilation[2]);
  InputPlan plan;
  plan.top = h.pad, plan.left = w.pad, plan.hd = h.size, plan.wd = w.size;
  plan.plane = checked_numel({plan.hd, plan.wd}, "grouped conv (padded grad output)", true);
  const int64_t m_count = g.out_channels_per_group(), taps = kh_n * kw_n;
  for (int64_t a = 0; a < sh; ++a)
    for (int64_t b = 0; b < sw; ++b) {
      InputPhase ph{a, b, h.count[a], w.count[b], 0, int64_t(plan.offset.size()), 0};
      if (ph.ni == 0 || ph.nj == 0) continue;
      ph.padded = round_up((ph.ni - 1) * plan.wd + ph.nj, 2 * lanes);
      for (int64_t m = 0; m < m_count; ++m)
        for (size_t u = 0; u < h.tap[a].size(); ++u)
          for (size_t v = 0; v < w.tap[b].size(); ++v) {
            plan.offset.push_back(m * plan.plane + (h.shift[a][u] + plan.top) * plan.wd + w.shift[b][v] + plan.left);
            plan.source.push_back(m * taps + h.tap[a][u] * kw_n + w.tap[b][v]);
          }
      ph.entries = int64_t(plan.offset.size()) - ph.first;
      plan.max_padded = std::max(plan.max_padded, ph.padded);
      plan.phases.push_back(ph);
    }
  return plan;
}

template <typename T>
struct InputJob {
  const ConvGeometry* g;
  const InputPlan* plan;
  Layout ldy, ldx;
  const T* dy;
  const T* wt;  // [group][entry][c]
  T* dx;
};

template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void input_task(const InputJob<T>& j, int64_t n, int64_t grp, T* buf, T* tile) {
  const ConvGeometry& g = *j.g;
  const InputPlan& plan = *j.plan;
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const int64_t entries = int64_t(plan.offset.size()), sh = g.stride[1], sw = g.stride[2];
  gather_planes<T, BYTES>(j.dy + n * j.ldy.sample + grp * m_count * j.ldy.channel, j.ldy, m_count, g.out[1], g.out[2],
                          buf + plan.top * plan.wd + plan.left, plan.plane, plan.wd);
  T* dx = j.dx + n * j.ldx.sample + grp * cg * j.ldx.channel;
  for (const InputPhase& ph : plan.phases) {
    if (ph.entries > 0) {
      correlate<T, BYTES>(buf, plan.offset.data() + ph.first, ph.entries, j.wt + (grp * entries + ph.first) * cg, cg,
                          nullptr, false, ph.padded, tile);
    } else {  // no tap reaches these dX positions
      for (int64_t c = 0; c < cg; ++c) std::fill(tile + c * ph.padded, tile + (c + 1) * ph.padded, T(0));
    }
    scatter_planes<T, BYTES>(tile, ph.padded, plan.wd, cg, ph.ni, ph.nj, dx + ph.a * j.ldx.row + ph.b * j.ldx.col,
                             j.ldx, sh, sw);
  }
}

// Channels-last grad input of sample n at stride >= 2, every group: dY transposed once into buf, then for
// each dX row phase a, bands of kInputBandRows rows: every column phase b's tile of every channel, and
// each dX row written whole (its phases' pixels interleaved) from those tiles. A block of groups wrote
// a line or two of every other pixel, hundreds of bytes apart, each a cache miss (half the time at
// 104 channels 56x56 stride 2).
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void input_sample(const InputJob<T>& j, int64_t n, int64_t tile_ld, T* buf, T* tile) {
  const ConvGeometry& g = *j.g;
  const InputPlan& plan = *j.plan;
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const int64_t entries = int64_t(plan.offset.size()), sh = g.stride[1], sw = g.stride[2];
  constexpr int L = Simd<T, BYTES>::lanes;
  const T* dy = j.dy + n * j.ldy.sample;
  for (int64_t h = 0; h < g.out[1]; ++h)
    transpose_matrix<T, BYTES>(dy + h * j.ldy.row, g.out_channels, g.out[2], g.out_channels,
                               buf + (plan.top + h) * plan.wd + plan.left, plan.plane);
  T* dx = j.dx + n * j.ldx.sample;
  const int64_t count = int64_t(plan.phases.size());
  for (int64_t first = 0; first < count;) {  // the phases (a, b) of one a are adjacent in plan.phases
    int64_t last = first;
    while (last < count && plan.phases[last].a == plan.phases[first].a) ++last;
    const int64_t a = plan.phases[first].a, ni = plan.phases[first].ni;
    for (int64_t i0 = 0; i0 < ni; i0 += kInputBandRows) {
      const int64_t rows = std::min(kInputBandRows, ni - i0);
      for (int64_t k = first; k < last; ++k) {
        const InputPhase& ph = plan.phases[k];
        const int64_t padded = round_up((rows - 1) * plan.wd + ph.nj, 2 * L);
        T* t = tile + (k - first) * g.in_channels * tile_ld;
        if (ph.entries == 0) {  // no tap reaches these dX positions
          std::fill(t, t + g.in_channels * padded, T(0));
          continue;
        }
        for (int64_t grp = 0; grp < g.groups; ++grp)
          correlate<T, BYTES>(buf + grp * m_count * plan.plane + i0 * plan.wd, plan.offset.data() + ph.first,
                              ph.entries, j.wt + (grp * entries + ph.first) * cg, cg, nullptr, false, padded,
                              t + grp * cg * padded);
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t k = first; k < last; ++k) {
          const InputPhase& ph = plan.phases[k];
          const int64_t padded = round_up((rows - 1) * plan.wd + ph.nj, 2 * L);
          transpose_matrix<T, BYTES>(tile + (k - first) * g.in_channels * tile_ld + i * plan.wd, padded, g.in_channels,
                                     ph.nj, dx + (a + sh * (i0 + i)) * j.ldx.row + ph.b * j.ldx.col,
                                     sw * g.in_channels);
        }
    }
    first = last;
  }
}

// input_task for groups [g0, g1) of channels-last sample n, as forward_groups: their channels of each
// dY pixel row transposed at once into buf, and each row of one dX phase of their tiles into pixels.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void input_groups(const InputJob<T>& j, int64_t n, int64_t g0, int64_t g1, T* buf, T* tile) {
  const ConvGeometry& g = *j.g;
  const InputPlan& plan = *j.plan;
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const int64_t entries = int64_t(plan.offset.size()), sh = g.stride[1], sw = g.stride[2];
  const int64_t cin = (g1 - g0) * cg, cout = (g1 - g0) * m_count;
  const T* dy = j.dy + n * j.ldy.sample + g0 * m_count;
  for (int64_t h = 0; h < g.out[1]; ++h)
    transpose_matrix<T, BYTES>(dy + h * j.ldy.row, g.out_channels, g.out[2], cout,
                               buf + (plan.top + h) * plan.wd + plan.left, plan.plane);
  T* dx = j.dx + n * j.ldx.sample + g0 * cg;
  for (const InputPhase& ph : plan.phases) {
    for (int64_t grp = g0; grp < g1; ++grp) {
      T* t = tile + (grp - g0) * cg * ph.padded;
      if (ph.entries > 0) {
        correlate<T, BYTES>(buf + (grp - g0) * m_count * plan.plane, plan.offset.data() + ph.first, ph.entries,
                            j.wt + (grp * entries + ph.first) * cg, cg, nullptr, false, ph.padded, t);
      } else {  // no tap reaches these dX positions
        std::fill(t, t + cg * ph.padded, T(0));
      }
    }
    for (int64_t i = 0; i < ph.ni; ++i)
      transpose_matrix<T, BYTES>(tile + i * plan.wd, ph.padded, cin, ph.nj,
                                 dx + (ph.a + sh * i) * j.ldx.row + ph.b * j.ldx.col, sw * g.in_channels);
  }
}

// ------------------------------------------------------------------------------------------
// Grad weight
// ------------------------------------------------------------------------------------------

template <typename T>
struct WeightJob {
  const ConvGeometry* g;
  const PhaseGrid* grid;
  Layout lx, ldy;
  const T* x;
  const T* dy;
  T* dw;
  int64_t chunks;  // input-channel chunks a group
};

// One pass of the weight gradient's batch loop: samples [n0, n0 + active) of input channels
// [x_channel, x_channel + cin) into buf's phase planes and of dY channels [dy_channel, dy_channel + cout)
// into dyg's, zeros past the active samples. Returns active.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE int64_t load_weight_pass(const WeightJob<T>& j, int64_t n0, int64_t x_channel, int64_t cin,
                                              int64_t dy_channel, int64_t cout, T* buf, T* dyg) {
  const ConvGeometry& g = *j.g;
  const PhaseGrid& p = *j.grid;
  const int64_t active = std::min(p.samples, g.batch - n0);
  for (int64_t s = 0; s < active; ++s) {
    fill_phases<T, BYTES>(g, p, j.x, j.lx, n0 + s, x_channel, cin, buf + s * p.plane);
    gather_planes<T, BYTES>(j.dy + (n0 + s) * j.ldy.sample + dy_channel * j.ldy.channel, j.ldy, cout, g.out[1],
                            g.out[2], dyg + s * p.plane, p.padded, p.wq);
  }
  if (active < p.samples)  // stale samples' dY (x there is masked): zeros, not 0 * inf
    for (int64_t m = 0; m < cout; ++m) std::fill(dyg + m * p.padded + active * p.plane, dyg + (m + 1) * p.padded, T(0));
  return active;
}

template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void weight_task(const WeightJob<T>& j, int64_t grp, int64_t chunk, T* buf, T* dyg,
                                      const typename Simd<T, BYTES>::int_type* mask_full,
                                      const typename Simd<T, BYTES>::int_type* mask_last, T* sum, int64_t* offset) {
  const ConvGeometry& g = *j.g;
  const PhaseGrid& p = *j.grid;
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const int64_t taps = int64_t(p.tap_offset.size());
  const int64_t c0 = cg * chunk / j.chunks, count = cg * (chunk + 1) / j.chunks - c0;
  const int64_t entries = count * taps;
  fill_entry_offsets(p, count, offset);
  constexpr int L = Simd<T, BYTES>::lanes;
  std::fill(sum, sum + m_count * entries * L, T(0));
  for (int64_t n0 = 0; n0 < g.batch; n0 += p.samples) {  // p.samples samples a pass, in order
    const int64_t active = load_weight_pass<T, BYTES>(j, n0, grp * cg + c0, count, grp * m_count, m_count, buf, dyg);
    const auto* mask = active == p.samples ? mask_full : mask_last;
    const int64_t limit = round_up((active - 1) * p.plane + p.sample_points, L);
    weight_sweep<T, BYTES>(buf, offset, entries, dyg, p.padded, m_count, mask, limit, sum);
  }
  const int64_t kv = taps * cg;
  for (int64_t mm = 0; mm < m_count; ++mm)
    for (int64_t e = 0; e < entries; ++e)
      j.dw[(grp * m_count + mm) * kv + c0 * taps + e] = lane_sum<T, L>(sum + (mm * entries + e) * L);
}

// weight_task for the groups [g0, g1) of channels-last tensors, whole (chunks == 1): their channels of each
// pixel are transposed at once, a vector of channels wide (as forward_groups), where one group's few
// values of each pixel, hundreds apart, read alone missed the cache (and half of each line read twice).
// Runs the passes [q0, q1) and writes the block's sums to out (dW's layout from group g0 on).
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void weight_groups(const WeightJob<T>& j, int64_t g0, int64_t g1, int64_t q0, int64_t q1, T* buf,
                                        T* dyg, const typename Simd<T, BYTES>::int_type* mask_full,
                                        const typename Simd<T, BYTES>::int_type* mask_last, T* sum, int64_t* offset,
                                        T* out) {
  const ConvGeometry& g = *j.g;
  const PhaseGrid& p = *j.grid;
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const int64_t taps = int64_t(p.tap_offset.size()), entries = cg * taps, kv = m_count * entries;
  const int64_t cin = (g1 - g0) * cg, cout = (g1 - g0) * m_count;
  fill_entry_offsets(p, cg, offset);
  constexpr int L = Simd<T, BYTES>::lanes;
  std::fill(sum, sum + (g1 - g0) * kv * L, T(0));
  for (int64_t n0 = q0 * p.samples; n0 < std::min(g.batch, q1 * p.samples); n0 += p.samples) {
    const int64_t active = load_weight_pass<T, BYTES>(j, n0, g0 * cg, cin, g0 * m_count, cout, buf, dyg);
    const auto* mask = active == p.samples ? mask_full : mask_last;
    const int64_t limit = round_up((active - 1) * p.plane + p.sample_points, L);
    for (int64_t grp = g0; grp < g1; ++grp)
      weight_sweep<T, BYTES>(buf + (grp - g0) * cg * p.channel, offset, entries, dyg + (grp - g0) * m_count * p.padded,
                             p.padded, m_count, mask, limit, sum + (grp - g0) * kv * L);
  }
  for (int64_t i = 0; i < (g1 - g0) * kv; ++i) out[i] = lane_sum<T, L>(sum + i * L);
}

// dY of every sample laid on the grid of PhaseGrid p, once, in parallel, for the first-layer grad-weight
// tasks: row (q * C_out + m) of pass q, p.padded values, zero off the outputs (dropped columns, the last
// pass's unused samples). Blocks of 16 channels: whole cache lines of a channels-last pixel.
template <typename T>
Scratch<T> fill_all_grad_output(const ConvGeometry& g, const PhaseGrid& p, const T* dy, const Layout& l) {
  constexpr int64_t kBlock = 16;
  const int64_t passes = num_blocks(g.batch, p.samples), blocks = num_blocks(g.out_channels, kBlock);
  const int64_t size = checked_numel({passes, g.out_channels, p.padded}, "grouped conv (grad output grid)", true);
  auto buf = scratch<T>(size);
  parallel_for(0, passes * blocks, 1, [&](int64_t begin, int64_t end) {
    simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
      constexpr int B = vector_bytes(decltype(isa)::value);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t q = task / blocks, m0 = task % blocks * kBlock, count = std::min(kBlock, g.out_channels - m0);
        T* dst = buf.get() + (q * g.out_channels + m0) * p.padded;
        std::fill(dst, dst + count * p.padded, T(0));
        for (int64_t s = 0; s < std::min(p.samples, g.batch - q * p.samples); ++s)
          gather_planes<T, B>(dy + (q * p.samples + s) * l.sample + m0 * l.channel, l, count, g.out[1], g.out[2],
                              dst + s * p.plane, p.padded, p.wq);
      }
    });
  });
  return buf;
}

// A first layer's dW of group grp over grid points [a, b) of pass q (every output channel, input channel
// and tap), summed across lanes into part: dW is then the sum of the parts in a fixed order.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void weight_part(const WeightJob<T>& j, const T* planes, const T* dyg, const int64_t* offset,
                                      int64_t grp, int64_t q, int64_t a, int64_t b,
                                      const typename Simd<T, BYTES>::int_type* mask, T* sum, T* part) {
  const ConvGeometry& g = *j.g;
  const PhaseGrid& p = *j.grid;
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const int64_t entries = cg * int64_t(p.tap_offset.size());
  constexpr int L = Simd<T, BYTES>::lanes;
  std::fill(sum, sum + m_count * entries * L, T(0));
  if (a < b)
    weight_sweep<T, BYTES>(planes + (q * g.in_channels + grp * cg) * p.channel + a, offset, entries,
                           dyg + (q * g.out_channels + grp * m_count) * p.padded + a, p.padded, m_count, mask + a,
                           b - a, sum);
  for (int64_t i = 0; i < m_count * entries; ++i) part[i] = lane_sum<T, L>(sum + i * L);
}

// Runs body(isa, n, g0, g1, buf, tile) for every sample n and block [g0, g1) of `block` groups, in
// parallel (fixed tasks), each worker with its own zeroed buf and its tile, compiled for cpu_isa().
template <typename T, typename Body>
void for_each_group_block(const ConvGeometry& g, int64_t block, int64_t buf_size, int64_t tile_size, const Body& body) {
  const int64_t blocks = num_blocks(g.groups, block);
  parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(buf_size, T(0)), tile(tile_size);
    simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g0 = task % blocks * block;
        body(isa, task / blocks, g0, std::min(g.groups, g0 + block), buf.data(), tile.data());
      }
    });
  });
}

}  // namespace

int64_t grouped_direct_call_count() { return calls.load(std::memory_order_relaxed); }

bool use_grouped_direct(const ConvGeometry& g) {
  if (g.is_depthwise()) return false;
  if (g.in[0] != 1 || g.kernel[0] != 1 || g.stride[0] != 1 || g.pad[0] != 0 || g.dilation[0] != 1) return false;
  if (!narrow_groups(g) && g.in_channels_per_group() > kNarrowInputChannels) return false;
  for (int i = 1; i < 3; ++i)  // bounds that keep the phase planes near the input's size
    if (g.kernel[i] > 7 || g.stride[i] > 4 || g.dilation[i] > 4 || g.pad[i] > g.dilation[i] * (g.kernel[i] - 1))
      return false;
  return true;
}

template <typename T>
void conv_grouped_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation,
                          bool nhwc) {
  calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t lanes = lanes_for(sizeof(T));
  const PhaseGrid p = phase_grid(g, lanes);
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const int64_t taps = g.kernel_volume(), entries = cg * taps;
  std::vector<int64_t> offset(entries);
  fill_entry_offsets(p, cg, offset.data());
  std::vector<T> wt(g.groups * entries * m_count);  // [group][(c, tap)][m]: a row of weights per load
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t m = 0; m < m_count; ++m)
      for (int64_t e = 0; e < entries; ++e)
        wt[(grp * entries + e) * m_count + m] = w[(grp * m_count + m) * entries + e];
  const int64_t buf_size = checked_numel({cg, p.channel}, "grouped conv (phase planes)", true) + 2 * lanes;
  const int64_t tile_size = checked_numel({m_count, p.padded}, "grouped conv (output tile)", true);
  ForwardJob<T> j{&g,
                  &p,
                  activation_layout(g.in_channels, g.in[1], g.in[2], nhwc),
                  activation_layout(g.out_channels, g.out[1], g.out[2], nhwc),
                  x,
                  wt.data(),
                  bias,
                  y,
                  activation == Activation::Relu,
                  offset.data(),
                  entries};
  if (!narrow_groups(g)) {  // first layers: tasks (sample, group, block of output rows)
    const auto planes = fill_all_phases(g, p, x, j.lx, lanes);
    const int64_t rows = std::clamp<int64_t>(kForwardPoints / p.wq, 1, g.out[1]), blocks = num_blocks(g.out[1], rows);
    const int64_t rows_tile =
        checked_numel({m_count, round_up(rows * p.wq, 2 * lanes)}, "grouped conv (output tile)", true);
    parallel_for(0, g.batch * g.groups * blocks, 1, [&](int64_t begin, int64_t end) {
      const auto tile = scratch<T>(rows_tile);
      simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task % blocks, ng = task / blocks;
          forward_rows<T, vector_bytes(decltype(isa)::value)>(j, planes.get(), ng / g.groups, ng % g.groups, b * rows,
                                                              std::min(g.out[1], (b + 1) * rows), tile.get());
        }
      });
    });
    return;
  }
  if (nhwc) {  // tasks (sample, block of groups a vector of channels wide): see forward_groups
    const int64_t block = std::clamp<int64_t>(lanes / cg, 1, g.groups);
    const int64_t block_buf = checked_numel({block * cg, p.channel}, "grouped conv (phase planes)", true) + 2 * lanes;
    const int64_t block_tile = checked_numel({block * m_count, p.padded}, "grouped conv (output tile)", true);
    for_each_group_block<T>(g, block, block_buf, block_tile,
                            [&](auto isa, int64_t n, int64_t g0, int64_t g1, T* buf, T* tile) CNNOPS_SIMD_BODY {
                              forward_groups<T, vector_bytes(decltype(isa)::value)>(j, n, g0, g1, buf, tile);
                            });
    return;
  }
  for_each_group_block<T>(g, 1, buf_size, tile_size,
                          [&](auto isa, int64_t n, int64_t grp, int64_t, T* buf, T* tile) CNNOPS_SIMD_BODY {
                            forward_task<T, vector_bytes(decltype(isa)::value)>(j, n, grp, buf, tile);
                          });
}

template <typename T>
void conv_grouped_backward_input(const ConvGeometry& g, const T* dy, const T* w, T* dx, bool nhwc) {
  calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t lanes = lanes_for(sizeof(T));
  const InputPlan plan = input_plan(g, lanes);
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group();
  const int64_t taps = g.kernel_volume(), entries = int64_t(plan.offset.size());
  std::vector<T> wt(g.groups * entries * cg);  // [group][entry][c]
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t e = 0; e < entries; ++e) {
      const int64_t m = plan.source[e] / taps, t = plan.source[e] % taps;
      for (int64_t c = 0; c < cg; ++c) wt[(grp * entries + e) * cg + c] = w[((grp * m_count + m) * cg + c) * taps + t];
    }
  const int64_t buf_size = checked_numel({m_count, plan.plane}, "grouped conv (padded grad output)", true) + 2 * lanes;
  const int64_t tile_size = checked_numel({cg, plan.max_padded}, "grouped conv (grad input tile)", true);
  const InputJob<T> j{&g,
                      &plan,
                      activation_layout(g.out_channels, g.out[1], g.out[2], nhwc),
                      activation_layout(g.in_channels, g.in[1], g.in[2], nhwc),
                      dy,
                      wt.data(),
                      dx};
  if (nhwc && g.stride[1] * g.stride[2] > 1 && g.batch >= kInputSampleBatch) {  // tasks: samples (input_sample)
    const int64_t band_buf =
        checked_numel({g.out_channels, plan.plane}, "grouped conv (padded grad output)", true) + 2 * lanes;
    int64_t tile_ld = 0;  // the largest band's padded grid
    for (const InputPhase& ph : plan.phases)
      tile_ld = std::max(tile_ld, round_up((std::min(kInputBandRows, ph.ni) - 1) * plan.wd + ph.nj, 2 * lanes));
    const int64_t band_tile =
        checked_numel({g.stride[2], g.in_channels, tile_ld}, "grouped conv (grad input tile)", true);
    parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(band_buf, T(0)), tile(band_tile);
      simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
        for (int64_t n = begin; n < end; ++n)
          input_sample<T, vector_bytes(decltype(isa)::value)>(j, n, tile_ld, buf.data(), tile.data());
      });
    });
    return;
  }
  if (nhwc) {  // as the forward's
    const int64_t block = std::clamp<int64_t>(lanes / m_count, 1, g.groups);
    const int64_t block_buf =
        checked_numel({block * m_count, plan.plane}, "grouped conv (padded grad output)", true) + 2 * lanes;
    const int64_t block_tile = checked_numel({block * cg, plan.max_padded}, "grouped conv (grad input tile)", true);
    for_each_group_block<T>(g, block, block_buf, block_tile,
                            [&](auto isa, int64_t n, int64_t g0, int64_t g1, T* buf, T* tile) CNNOPS_SIMD_BODY {
                              input_groups<T, vector_bytes(decltype(isa)::value)>(j, n, g0, g1, buf, tile);
                            });
    return;
  }
  for_each_group_block<T>(g, 1, buf_size, tile_size,
                          [&](auto isa, int64_t n, int64_t grp, int64_t, T* buf, T* tile) CNNOPS_SIMD_BODY {
                            input_task<T, vector_bytes(decltype(isa)::value)>(j, n, grp, buf, tile);
                          });
}

template <typename T>
void conv_grouped_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw, bool nhwc) {
  calls.fetch_add(1, std::memory_order_relaxed);
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  const int64_t lanes = lanes_for(sizeof(T));
  // Small maps: samples side by side on one grid, about kWeightPoints grid points a pass.
  const int64_t plane = (g.out[1] + (g.kernel[1] - 1) * g.dilation[1] / g.stride[1]) *
                        (g.out[2] + (g.kernel[2] - 1) * g.dilation[2] / g.stride[2]);
  const PhaseGrid p =
      phase_grid(g, lanes, std::clamp<int64_t>(kWeightPoints / std::max<int64_t>(plane, 1), 1, g.batch));
  const int64_t m_count = g.out_channels_per_group(), cg = g.in_channels_per_group(), taps = g.kernel_volume();
  // Fixed by the sizes alone: a few (group, chunk) tasks where groups are few. Each chunk reads the
  // group's dY and its pixels of x again (NHWC: 4x slower at 3 chunks), so no more.
  const int64_t chunks = std::min(cg, num_blocks(4, g.groups));
  const int64_t most = num_blocks(cg, chunks);  // channels in the largest chunk
  // Real output positions of the grid: of every sample, and of the last pass's samples.
  const int64_t last = g.batch - (g.batch - 1) / p.samples * p.samples;
  std::vector<Int> mask_full(p.padded, 0), mask_last(p.padded, 0);
  for (int64_t q = 0; q < p.points; ++q) {
    const int64_t r = q % p.plane;
    const bool real = r < p.sample_points && r % p.wq < g.out[2];
    mask_full[q] = real ? Int(-1) : Int(0);
    mask_last[q] = real && q / p.plane < last ? Int(-1) : Int(0);
  }
  const WeightJob<T> j{&g,
                       &p,
                       activation_layout(g.in_channels, g.in[1], g.in[2], nhwc),
                       activation_layout(g.out_channels, g.out[1], g.out[2], nhwc),
                       x,
                       dy,
                       dw,
                       chunks};
  if (!narrow_groups(g)) {  // first layers: tasks (group, pass, kWeightPart points), partial sums in a fixed order
    const auto planes = fill_all_phases(g, p, x, j.lx, lanes);
    const auto dyg = fill_all_grad_output(g, p, dy, j.ldy);
    const int64_t passes = num_blocks(g.batch, p.samples), parts = num_blocks(p.padded, kWeightPart);
    const int64_t entries = cg * taps, tasks = g.groups * passes * parts;
    std::vector<int64_t> offset(entries);
    fill_entry_offsets(p, cg, offset.data());
    std::vector<T> partial(checked_numel({tasks, m_count, entries}, "grouped conv (grad weight parts)", true));
    parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> sum(m_count * entries * lanes);
      simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
        constexpr int B = vector_bytes(decltype(isa)::value);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t k = task % parts, q = task / parts % passes, grp = task / parts / passes;
          const int64_t active = std::min(p.samples, g.batch - q * p.samples);
          const int64_t limit = round_up((active - 1) * p.plane + p.sample_points, B / int(sizeof(T)));
          weight_part<T, B>(j, planes.get(), dyg.get(), offset.data(), grp, q, std::min(limit, k * kWeightPart),
                            std::min(limit, (k + 1) * kWeightPart),
                            active == p.samples ? mask_full.data() : mask_last.data(), sum.data(),
                            partial.data() + task * m_count * entries);
        }
      });
    });
    const int64_t per_group = passes * parts, kv = m_count * entries;
    parallel_for(0, g.groups * kv, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t grp = i / kv, r = i % kv;
        const T* part = partial.data() + grp * per_group * kv + r;
        T total = part[0];
        for (int64_t t = 1; t < per_group; ++t) total += part[t * kv];
        dw[i] = total;
      }
    });
    return;
  }
  if (nhwc && chunks == 1) {  // tasks: blocks of groups a vector of channels wide (weight_groups)
    const int64_t block = std::clamp<int64_t>(lanes / cg, 1, g.groups), blocks = num_blocks(g.groups, block);
    const int64_t block_buf = checked_numel({block * cg, p.channel}, "grouped conv (phase planes)", true) + 2 * lanes;
    const int64_t block_dyg = checked_numel({block * m_count, p.padded}, "grouped conv (grad output grid)", true);
    const int64_t block_sum = checked_numel({block, m_count, cg, taps, lanes}, "grouped conv (grad weight sums)", true);
    // Few blocks: the passes split into fixed parts too (sizes alone fix them), summed in order below.
    const int64_t passes = num_blocks(g.batch, p.samples), parts = std::min(passes, num_blocks(8, blocks));
    const int64_t numel = g.out_channels * cg * taps;
    std::vector<T> partial(parts > 1 ? checked_numel({parts, numel}, "grouped conv (grad weight parts)", true) : 0);
    parallel_for(0, blocks * parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(block_buf, T(0)), dyg(block_dyg, T(0)), sum(block_sum);
      std::vector<int64_t> offset(cg * taps);
      simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
        constexpr int B = vector_bytes(decltype(isa)::value);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / parts, k = t % parts, g0 = b * block;
          T* out = (parts > 1 ? partial.data() + k * numel : dw) + g0 * m_count * cg * taps;
          weight_groups<T, B>(j, g0, std::min(g.groups, g0 + block), passes * k / parts, passes * (k + 1) / parts,
                              buf.data(), dyg.data(), mask_full.data(), mask_last.data(), sum.data(), offset.data(),
                              out);
        }
      });
    });
    if (parts > 1)
      parallel_for(0, numel, 256, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          T total = partial[i];
          for (int64_t k = 1; k < parts; ++k) total += partial[k * numel + i];
          dw[i] = total;
        }
      });
    return;
  }
  const int64_t buf_size = checked_numel({most, p.channel}, "grouped conv (phase planes)", true) + 2 * lanes;
  const int64_t dyg_size = checked_numel({m_count, p.padded}, "grouped conv (grad output grid)", true);
  parallel_for(0, g.groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(buf_size, T(0)), dyg(dyg_size, T(0)), sum(m_count * most * taps * lanes);
    std::vector<int64_t> offset(most * taps);
    simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
      constexpr int B = vector_bytes(decltype(isa)::value);
      for (int64_t task = begin; task < end; ++task)
        weight_task<T, B>(j, task / chunks, task % chunks, buf.data(), dyg.data(), mask_full.data(), mask_last.data(),
                          sum.data(), offset.data());
    });
  });
}

#define CNNOPS_INSTANTIATE_GROUPED(T)                                                                             \
  template void conv_grouped_forward<T>(const ConvGeometry&, const T*, const T*, const T*, T*, Activation, bool); \
  template void conv_grouped_backward_input<T>(const ConvGeometry&, const T*, const T*, T*, bool);                \
  template void conv_grouped_backward_weight<T>(const ConvGeometry&, const T*, const T*, T*, bool);
CNNOPS_INSTANTIATE_GROUPED(float)
CNNOPS_INSTANTIATE_GROUPED(double)

}  // namespace cpu
}  // namespace cnnops
