// Channels-last direct convolution for first layers (conv_first_layer.h). Tasks (sample, block of
// output rows), so batch 1 keeps every thread busy:
//  - The task's input rows are copied, zero padded, into a buffer [rows][W_p][C] (W_p: the padded
//    columns its outputs read), so entry e = (kh, kw, c) of output (oh, ow) lies at a fixed offset from
//    output ow's base: no bounds in the loops. A few KB a row, which stay in L2. Output ow + 1 reads
//    S_w * C values after output ow: a template argument, so P outputs' values are P fixed displacements
//    from one pointer. Past stride 2 the forward's buffer splits each row's columns by phase (column
//    j*S_w + q at phase q, index j), which brings that step down to C.
//  - Forward, y[n, oh, ow, co] = b[co] + sum over e of w[co, c, kh, kw] * x_pad[n, oh*S_h + kh*D_h,
//    ow*S_w + kw*D_w, c] (formulas.md §Conv / grouped, groups = 1): per block of P pixels and V vectors
//    of output channels, acc[p][v] += broadcast(x[p's entry e]) * w'[e][v], w' the weight repacked once
//    to [e][C_out rounded up to a vector]. Bias and ReLU in the store.
//  - Grad weight, dW[co, c, kh, kw] = sum over n, oh, ow of dY[n, oh, ow, co] * x_pad[...] (the same
//    entries): per block of E entries and V vectors of output channels, acc[e][v] += broadcast(x[ow's
//    entry e]) * dY[ow][v] over the pixels of a row. Each task sums into its own partial dW (and dB),
//    and the partials are added in task order: the same bits at any thread count.
// Written once with GCC vector extensions and instantiated per ISA through simd_dispatch.
#include "cpu/conv_first_layer.h"

// Vector values only cross always-inlined calls, so no function has a vector in its ABI (before the
// includes: the warning points at simd_vec.h).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/checked_math.h"
#include "cpu/conv_cpu.h"
#include "cpu/conv_grouped.h"
#include "cpu/simd.h"
#include "cpu/simd_transpose.h"
#include "cpu/simd_vec.h"

namespace cnnops {
namespace cpu {
namespace {

std::atomic<int64_t> calls{0};

constexpr int64_t kForwardPoints = 1024;  // output pixels a forward task
constexpr int64_t kWeightPoints = 2048;   // output pixels a grad-weight task (a partial dW each)

// Accumulator registers: 32 vector registers with AVX-512, 16 below.
constexpr int accumulators(int bytes) { return bytes == 64 ? 24 : 12; }

struct Plan {
  int64_t channels, row;          // C, values in a buffer row
  int64_t phase;                  // values in a phase of a row (phased: W_p / S_w columns rounded up; else the row)
  int64_t rows_per_task, blocks;  // output rows a task, tasks a sample
  int64_t buf_rows;               // buffer rows of a full task
  int64_t pixel_step;             // from one output's entries to the next's: C phased, else S_w * C (<= 8)
  int64_t cop;                    // C_out rounded up to a vector
  bool phased;
  bool nhwc;                    // x (and y, dY) channels-last; else NCHW, read by element and transposed
  std::vector<int64_t> offset;  // per entry e = (kh * KW + kw) * C + c
};

Plan make_plan(const ConvGeometry& g, int64_t lanes, int64_t points, bool phased, bool nhwc) {
  Plan p;
  p.nhwc = nhwc;
  const int64_t C = g.in_channels, sw = g.stride[2];
  const int64_t wp = (g.out[2] - 1) * sw + (g.kernel[2] - 1) * g.dilation[2] + 1;
  p.channels = C;
  p.phased = phased && sw > 2;
  p.phase = checked_numel({p.phased ? num_blocks(wp, sw) : wp, C}, "first-layer conv (input row)", true);
  p.row = checked_numel({p.phased ? sw : 1, p.phase}, "first-layer conv (input row)", true);
  p.rows_per_task = std::clamp<int64_t>(points / g.out[2], 1, g.out[1]);
  p.blocks = num_blocks(g.out[1], p.rows_per_task);
  p.buf_rows = (p.rows_per_task - 1) * g.stride[1] + (g.kernel[1] - 1) * g.dilation[1] + 1;
  p.pixel_step = p.phased ? C : sw * C;
  p.cop = round_up(g.out_channels, lanes);
  for (int64_t kh = 0; kh < g.kernel[1]; ++kh)
    for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
      const int64_t col = kw * g.dilation[2];  // padded column of output 0's tap
      const int64_t at = p.phased ? col % sw * p.phase + col / sw * C : col * C;
      for (int64_t c = 0; c < C; ++c) p.offset.push_back(kh * g.dilation[1] * p.row + at + c);
    }
  return p;
}

// Calls body(integral_constant V) for the runtime v, one of Values (the last also serves any other v):
// the channel count C in [1, 4] and the pixel step C * stride become template arguments.
template <int... Values, typename Body>
CNNOPS_ALWAYS_INLINE void with_constant(int64_t v, const Body& body) {
  constexpr int kValues[] = {Values...};
  constexpr int kLast = kValues[sizeof...(Values) - 1];
  const bool done = ((v == Values && Values != kLast && (body(std::integral_constant<int, Values>()), true)) || ...);
  if (!done) body(std::integral_constant<int, kLast>());
}

// dst[j * C + c] = src[c * plane + j] for j < count: C channel rows to pixels, a vector of each channel
// at a time through two-source shuffles (an element loop took about 0.4 of a 3x3 layer's forward).
template <typename T, int BYTES, int C>
CNNOPS_ALWAYS_INLINE void interleave(const T* src, int64_t plane, int64_t count, T* dst) {
  using S = Simd<T, BYTES>;
  using vec = typename S::vec;
  constexpr int L = S::lanes;
  int64_t j = 0;
  if constexpr (C >= 2) {
    // Lane l of output vector k is channel (k*L + l) % C of pixel (k*L + l) / C. Stage one takes
    // channels 0-1 (and 2-3 when C = 4), stage two the rest.
    typename S::mask first[C], second[C], third[C];
    for (int k = 0; k < C; ++k)
      for (int l = 0; l < L; ++l) {
        const int m = k * L + l, c = m % C, i = m / C;
        first[k][l] = c == 0 ? i : c == 1 ? L + i : 0;
        third[k][l] = c == 2 ? i : c == 3 ? L + i : 0;
        second[k][l] = c < 2 ? l : L + (C == 4 ? l : i);
      }
    for (; j + L <= count; j += L) {
      vec in[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) in[c] = S::load(src + c * plane + j);
#pragma GCC unroll 4
      for (int k = 0; k < C; ++k) {
        vec out = __builtin_shuffle(in[0], in[1], first[k]);
        if constexpr (C == 3) out = __builtin_shuffle(out, in[2], second[k]);
        if constexpr (C == 4) out = __builtin_shuffle(out, __builtin_shuffle(in[2], in[3], third[k]), second[k]);
        S::store(dst + j * C + k * L, out);
      }
    }
  }
  for (; j < count; ++j)
    for (int c = 0; c < C; ++c) dst[j * C + c] = src[c * plane + j];
}

// The input rows of output rows [oh0, oh1) of sample n into buf, zero outside x.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void fill_rows(const ConvGeometry& g, const Plan& p, const T* x, int64_t n, int64_t oh0,
                                    int64_t oh1, T* buf) {
  const int64_t C = p.channels, W = g.in[2], sw = g.stride[2], pad = g.pad[2];
  const int64_t rows = (oh1 - oh0 - 1) * g.stride[1] + (g.kernel[1] - 1) * g.dilation[1] + 1;
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = buf + r * p.row;
    const int64_t ih = oh0 * g.stride[1] - g.pad[1] + r;
    if (ih < 0 || ih >= g.in[1]) {
      std::fill(dst, dst + p.row, T(0));
      continue;
    }
    if (!p.nhwc) {  // NCHW: the C planes' rows interleaved
      const int64_t plane = g.in[1] * W;
      const T* src = x + n * C * plane + ih * W;
      std::fill(dst, dst + p.row, T(0));
      if (!p.phased) {  // stride 1 or 2: the row as it lies
        const int64_t count = std::clamp<int64_t>(p.row / C - pad, 0, W);
        with_constant<1, 2, 3, 4>(C, [&](auto channels) CNNOPS_SIMD_BODY {
          interleave<T, BYTES, decltype(channels)::value>(src, plane, count, dst + pad * C);
        });
        continue;
      }
      for (int64_t q = 0; q < sw; ++q) {
        const int64_t step = sw;
        T* d = dst + q * p.phase;
        const int64_t first = std::max<int64_t>(0, ceil_div(pad - q, step));  // iw = j * step + q - pad >= 0
        const int64_t last = std::min<int64_t>(p.phase / C, ceil_div(W + pad - q, step));  // ... < W
        for (int64_t c = 0; c < C; ++c)
          for (int64_t jj = first; jj < last; ++jj) d[jj * C + c] = src[c * plane + jj * step + q - pad];
      }
      continue;
    }
    const T* src = x + (n * g.in[1] + ih) * W * C;
    if (!p.phased) {
      const int64_t left = pad * C, count = std::clamp<int64_t>(p.row - left, 0, W * C);  // x values read
      std::fill(dst, dst + left, T(0));
      std::memcpy(dst + left, src, count * sizeof(T));
      std::fill(dst + left + count, dst + p.row, T(0));
      continue;
    }
    for (int64_t q = 0; q < sw; ++q) {
      T* d = dst + q * p.phase;
      for (int64_t j = 0; j < p.phase / C; ++j) {
        const int64_t iw = j * sw + q - pad;
        if (iw >= 0 && iw < W)
          for (int64_t c = 0; c < C; ++c) d[j * C + c] = src[iw * C + c];
        else
          for (int64_t c = 0; c < C; ++c) d[j * C + c] = T(0);
      }
    }
  }
}
// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

template <int BYTES, int V>
constexpr int pixels_for() {  // P with P * V accumulators
  return accumulators(BYTES) / V;
}

// y[p][v] = act(bias[v] + sum over e < entries of x[p * STEP + offset[e]] * wt[e * cop + v]) for p < P
// and V vectors of channels; y's pixels y_pixel apart, the last vector only `tail` lanes.
template <typename T, int BYTES, int STEP, int P, int V>
CNNOPS_ALWAYS_INLINE void forward_block(const T* x, const int64_t* offset, int64_t entries, const T* wt, int64_t cop,
                                        const T* bias, bool relu, T* y, int64_t y_pixel, int64_t tail) {
  using S = Simd<T, BYTES>;
  using vec = typename S::vec;
  constexpr int L = S::lanes;
  vec acc[P][V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    const vec b = S::load(bias + v * L);
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p) acc[p][v] = b;
  }
  for (int64_t e = 0; e < entries; ++e) {
    const T* xe = x + offset[e];
    const T* we = wt + e * cop;
    vec w[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) w[v] = S::load(we + v * L);
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p) {
      const T xs = xe[p * STEP];  // (scalar * vector: a broadcast, which the multiply-add takes from memory)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[p][v] += xs * w[v];
    }
  }
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const vec r = relu ? S::relu(acc[p][v]) : acc[p][v];
      if (v == V - 1 && tail < L)
        S::store_first(y + p * y_pixel + v * L, r, tail);
      else
        S::store(y + p * y_pixel + v * L, r);
    }
}

template <typename T>
struct ForwardJob {
  const ConvGeometry* g;
  const Plan* plan;
  const T* x;
  const T* wt;    // [entry][cop]
  const T* bias;  // cop values, zeros past C_out (and all zeros without a bias)
  T* y;
  bool relu;
};

// Output row oh of sample n, channel vectors [v0, v0 + V), from the row's buffer: blocks of P pixels,
// the last one overlapping the one before (rewriting the same values).
template <typename T, int BYTES, int STEP, int V>
CNNOPS_ALWAYS_INLINE void forward_row_block(const ForwardJob<T>& j, const T* xrow, T* yrow, int64_t v0) {
  const ConvGeometry& g = *j.g;
  const Plan& p = *j.plan;
  constexpr int L = Simd<T, BYTES>::lanes;
  constexpr int P = pixels_for<BYTES, V>();
  const int64_t ow_n = g.out[2], entries = int64_t(p.offset.size()), c_out = g.out_channels;
  const int64_t tail = std::min<int64_t>(L, c_out - (v0 + V - 1) * L);
  const T* wt = j.wt + v0 * L;
  const T* bias = j.bias + v0 * L;
  T* y = yrow + v0 * L;
  if (ow_n < P) {
    for (int64_t ow = 0; ow < ow_n; ++ow)
      forward_block<T, BYTES, STEP, 1, V>(xrow + ow * STEP, p.offset.data(), entries, wt, p.cop, bias, j.relu,
                                          y + ow * c_out, c_out, tail);
    return;
  }
  for (int64_t o = 0; o < ow_n; o += P) {
    const int64_t ow = std::min(o, ow_n - P);
    forward_block<T, BYTES, STEP, P, V>(xrow + ow * STEP, p.offset.data(), entries, wt, p.cop, bias, j.relu,
                                        y + ow * c_out, c_out, tail);
  }
}

// Calls body(integral_constant V, v0) for blocks of V vectors covering `vectors`: the widest block
// the accumulators allow first (4 vectors with AVX-512, 2 below).
template <int BYTES, typename Body>
CNNOPS_ALWAYS_INLINE void for_each_channel_block(int64_t vectors, const Body& body) {
  int64_t v0 = 0;
  if constexpr (BYTES == 64) {
    for (; vectors - v0 >= 4; v0 += 4) body(std::integral_constant<int, 4>(), v0);
    if (vectors - v0 == 3) return body(std::integral_constant<int, 3>(), v0);
  }
  for (; vectors - v0 >= 2; v0 += 2) body(std::integral_constant<int, 2>(), v0);
  if (vectors - v0 == 1) body(std::integral_constant<int, 1>(), v0);
}

// Output rows [oh0, oh1) of sample n. NCHW: each row into tile ([W_out][C_out] pixels), then
// transposed into the channel planes.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void forward_task(const ForwardJob<T>& j, int64_t n, int64_t oh0, int64_t oh1, T* buf, T* tile) {
  const ConvGeometry& g = *j.g;
  const Plan& p = *j.plan;
  const int64_t c_out = g.out_channels, ow_n = g.out[2], plane = g.out[1] * ow_n;
  fill_rows<T, BYTES>(g, p, j.x, n, oh0, oh1, buf);
  with_constant<1, 2, 3, 4, 6, 8>(p.pixel_step, [&](auto step) CNNOPS_SIMD_BODY {
    constexpr int STEP = decltype(step)::value;
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const T* xrow = buf + (oh - oh0) * g.stride[1] * p.row;
      T* yrow = p.nhwc ? j.y + (n * g.out[1] + oh) * ow_n * c_out : tile;
      for_each_channel_block<BYTES>(p.cop / Simd<T, BYTES>::lanes, [&](auto size, int64_t v0) CNNOPS_SIMD_BODY {
        forward_row_block<T, BYTES, STEP, decltype(size)::value>(j, xrow, yrow, v0);
      });
      if (!p.nhwc) transpose_matrix<T, BYTES>(tile, c_out, ow_n, c_out, j.y + n * c_out * plane + oh * ow_n, plane);
    }
  });
}

// ------------------------------------------------------------------------------------------
// Grad weight
// ------------------------------------------------------------------------------------------

// acc[e][v] (the vector at part + e * cop + v * L) += sum over pixels i < count of
// x[i * pixel_step + e] * dy[i * dy_pixel + v * L], for e < E, v < V: E entries whose x values are
// adjacent (a run of (kw, c) of one kh), so each pixel's are E fixed displacements from one pointer.
template <typename T, int BYTES, int E, int V>
CNNOPS_ALWAYS_INLINE void weight_block(const T* x, int64_t pixel_step, const T* dy, int64_t dy_pixel, int64_t count,
                                       T* part, int64_t cop) {
  using S = Simd<T, BYTES>;
  using vec = typename S::vec;
  constexpr int L = S::lanes;
  vec acc[E][V];
#pragma GCC unroll 32
  for (int e = 0; e < E; ++e)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[e][v] = S::load(part + e * cop + v * L);
  for (int64_t i = 0; i < count; ++i) {
    const T* xi = x + i * pixel_step;
    vec d[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) d[v] = S::load(dy + i * dy_pixel + v * L);
#pragma GCC unroll 32
    for (int e = 0; e < E; ++e) {
      const T xs = xi[e];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[e][v] += xs * d[v];
    }
  }
#pragma GCC unroll 32
  for (int e = 0; e < E; ++e)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) S::store(part + e * cop + v * L, acc[e][v]);
}

// Entries a weight_block may take: E * V accumulators at most.
constexpr int kEntryBlocks[] = {24, 18, 16, 12, 9, 8, 6, 4, 3, 2, 1};

// weight_block<E> for the runtime e (one of kEntryBlocks that fits).
template <typename T, int BYTES, int V, int I = 0>
CNNOPS_ALWAYS_INLINE void weight_block_of(int64_t e, const T* x, int64_t pixel_step, const T* dy, int64_t dy_pixel,
                                          int64_t count, T* part, int64_t cop) {
  if constexpr (I < int(std::size(kEntryBlocks))) {
    constexpr int E = kEntryBlocks[I];
    if constexpr (E * V <= accumulators(BYTES)) {
      if (e == E) return weight_block<T, BYTES, E, V>(x, pixel_step, dy, dy_pixel, count, part, cop);
    }
    weight_block_of<T, BYTES, V, I + 1>(e, x, pixel_step, dy, dy_pixel, count, part, cop);
  }
}

struct EntryBlock {
  int64_t first, count;  // entries [first, first + count), adjacent in the buffer
};

// The runs of entries whose x values are adjacent (every (kw, c) of a kh when D_w = 1), cut greedily
// into the largest blocks of kEntryBlocks with E * V accumulators at most.
std::vector<EntryBlock> entry_blocks(const std::vector<int64_t>& offset, int budget) {
  std::vector<EntryBlock> blocks;
  const int64_t n = int64_t(offset.size());
  for (int64_t e0 = 0; e0 < n;) {
    int64_t run = 1;
    while (e0 + run < n && offset[e0 + run] == offset[e0] + run) ++run;
    for (int64_t left = run; left > 0;) {
      int64_t take = 1;
      for (int e : kEntryBlocks)
        if (e <= budget && e <= left) {
          take = e;
          break;
        }
      blocks.push_back({e0 + run - left, take});
      left -= take;
    }
    e0 += run;
  }
  return blocks;
}

template <typename T>
struct WeightJob {
  const ConvGeometry* g;
  const Plan* plan;
  const T* x;
  const T* dy;
  const std::vector<EntryBlock>* blocks_by_v;  // entry blocks for V = 1..4 (index V)
  bool bias;
};

// Task (n, rows [oh0, oh1)): part[e * cop + co] += its sums (zero on entry), bpart[co] the dY sums.
template <typename T, int BYTES>
CNNOPS_ALWAYS_INLINE void weight_task(const WeightJob<T>& j, int64_t n, int64_t oh0, int64_t oh1, T* buf, T* dy_row,
                                      T* part, T* bpart) {
  const ConvGeometry& g = *j.g;
  const Plan& p = *j.plan;
  constexpr int L = Simd<T, BYTES>::lanes;
  const int64_t ow_n = g.out[2], c_out = g.out_channels;
  fill_rows<T, BYTES>(g, p, j.x, n, oh0, oh1, buf);
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const T* xrow = buf + (oh - oh0) * g.stride[1] * p.row;
    const T* dy = j.dy + (n * g.out[1] + oh) * ow_n * c_out;
    int64_t dy_pixel = c_out;
    if (!p.nhwc) {  // NCHW: the row's pixels from the channel planes (dy_row's lanes past C_out stay zero)
      const int64_t plane = g.out[1] * ow_n;
      transpose_matrix<T, BYTES>(j.dy + n * c_out * plane + oh * ow_n, plane, c_out, ow_n, dy_row, p.cop);
      dy = dy_row, dy_pixel = p.cop;
    } else if (c_out != p.cop) {  // whole vectors of every pixel: the row again with zeros past C_out
      for (int64_t ow = 0; ow < ow_n; ++ow) {
        std::memcpy(dy_row + ow * p.cop, dy + ow * c_out, c_out * sizeof(T));
        std::fill(dy_row + ow * p.cop + c_out, dy_row + (ow + 1) * p.cop, T(0));
      }
      dy = dy_row, dy_pixel = p.cop;
    }
    for_each_channel_block<BYTES>(p.cop / L, [&](auto size, int64_t v0) CNNOPS_SIMD_BODY {
      constexpr int V = decltype(size)::value;
      for (const EntryBlock& b : j.blocks_by_v[V])
        weight_block_of<T, BYTES, V>(b.count, xrow + p.offset[b.first], p.pixel_step, dy + v0 * L, dy_pixel, ow_n,
                                     part + b.first * p.cop + v0 * L, p.cop);
    });
    if (j.bias)
      for (int64_t ow = 0; ow < ow_n; ++ow)
        for (int64_t co = 0; co < p.cop; ++co) bpart[co] += dy[ow * dy_pixel + co];
  }
}

}  // namespace

int64_t first_layer_call_count() { return calls.load(std::memory_order_relaxed); }

bool use_first_layer(const ConvGeometry& g) { return g.groups == 1 && use_grouped_direct(g); }

template <typename T>
void conv_first_layer_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y, Activation activation,
                              bool nhwc) {
  calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t lanes = vector_bytes(cpu_isa()) / int64_t(sizeof(T));
  const Plan p = make_plan(g, lanes, kForwardPoints, /*phased=*/true, nhwc);
  const int64_t entries = int64_t(p.offset.size()), taps = g.kernel_volume(), C = g.in_channels;
  std::vector<T> wt(checked_numel({entries, p.cop}, "first-layer conv (packed weight)", true), T(0));
  for (int64_t co = 0; co < g.out_channels; ++co)  // w'[(tap, c)][co] = w[co][c][tap]
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < taps; ++t) wt[(t * C + c) * p.cop + co] = w[(co * C + c) * taps + t];
  std::vector<T> b(p.cop, T(0));
  if (bias) std::copy(bias, bias + g.out_channels, b.begin());
  const ForwardJob<T> j{&g, &p, x, wt.data(), b.data(), y, activation == Activation::Relu};
  const int64_t buf_size = checked_numel({p.buf_rows, p.row}, "first-layer conv (input rows)", true);
  const int64_t tile_size = nhwc ? 0 : checked_numel({g.out[2], p.cop}, "first-layer conv (output row)", true);
  parallel_for(0, g.batch * p.blocks, 1, [&](int64_t begin, int64_t end) {
    const auto buf = scratch<T>(buf_size);
    const auto tile = scratch<T>(tile_size);
    simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / p.blocks, oh0 = task % p.blocks * p.rows_per_task;
        forward_task<T, vector_bytes(decltype(isa)::value)>(j, n, oh0, std::min(g.out[1], oh0 + p.rows_per_task),
                                                            buf.get(), tile.get());
      }
    });
  });
}

template <typename T>
bool conv_first_layer_backward_weight(const ConvGeometry& g, const T* dy, const T* x, T* dw, T* db, bool nhwc) {
  calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t bytes = vector_bytes(cpu_isa()), lanes = bytes / int64_t(sizeof(T));
  const Plan p = make_plan(g, lanes, kWeightPoints, /*phased=*/false, nhwc);
  const int64_t entries = int64_t(p.offset.size());
  std::vector<EntryBlock> blocks_by_v[5];
  for (int v = 1; v <= 4; ++v) blocks_by_v[v] = entry_blocks(p.offset, accumulators(int(bytes)) / v);
  const int64_t tasks = g.batch * p.blocks, kv = entries * p.cop;
  std::vector<T> part(checked_numel({tasks, kv}, "first-layer conv (grad weight parts)", true), T(0));
  std::vector<T> bpart(db ? checked_numel({tasks, p.cop}, "first-layer conv (grad bias parts)", true) : 0, T(0));
  const WeightJob<T> j{&g, &p, x, dy, blocks_by_v, db != nullptr};
  const int64_t buf_size = checked_numel({p.buf_rows, p.row}, "first-layer conv (input rows)", true);
  const int64_t row_size = checked_numel({g.out[2], p.cop}, "first-layer conv (grad output row)", true);
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const auto buf = scratch<T>(buf_size);
    const auto dy_row = scratch<T>(row_size);
    std::fill(dy_row.get(), dy_row.get() + row_size, T(0));  // (lanes past C_out: NCHW rows leave them)
    simd_dispatch([&](auto tag) CNNOPS_SIMD_BODY {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / p.blocks, oh0 = task % p.blocks * p.rows_per_task;
        weight_task<T, vector_bytes(decltype(tag)::value)>(j, n, oh0, std::min(g.out[1], oh0 + p.rows_per_task),
                                                           buf.get(), dy_row.get(), part.data() + task * kv,
                                                           db ? bpart.data() + task * p.cop : nullptr);
      }
    });
  });
  // dW[co][c][tap] = the sum of the tasks' entries (tap, c) in task order.
  const int64_t taps = g.kernel_volume(), C = g.in_channels, total = g.out_channels * C * taps;
  parallel_for(0, total, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t co = i / (C * taps), c = i / taps % C, t = i % taps;
      const T* s = part.data() + (t * C + c) * p.cop + co;
      T sum = s[0];
      for (int64_t k = 1; k < tasks; ++k) sum += s[k * kv];
      dw[i] = sum;
    }
  });
  if (db)
    for (int64_t co = 0; co < g.out_channels; ++co) {
      T sum = bpart[co];
      for (int64_t k = 1; k < tasks; ++k) sum += bpart[k * p.cop + co];
      db[co] = sum;
    }
  return db != nullptr;
}

#define CNNOPS_INSTANTIATE_FIRST_LAYER(T)                                                                             \
  template void conv_first_layer_forward<T>(const ConvGeometry&, const T*, const T*, const T*, T*, Activation, bool); \
  template bool conv_first_layer_backward_weight<T>(const ConvGeometry&, const T*, const T*, T*, T*, bool);
CNNOPS_INSTANTIATE_FIRST_LAYER(float)
CNNOPS_INSTANTIATE_FIRST_LAYER(double)

}  // namespace cpu
}  // namespace cnnops
