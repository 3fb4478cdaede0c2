// Convolutions whose window covers the whole input, one output position per sample: the 1x1
// convolutions on 1x1 maps of squeeze-excitation blocks, or a k x k kernel on a k x k map. Each
// output is one dot product of two contiguous rows (slides: each output is an inner product over
// C_in/groups x K_d x K_h x K_w):
//   Y[n, g*M + co] = act(b[g*M + co] + W_g[co, :] . X[n, g*K : (g+1)*K])
// The GEMM would pack the whole weight into panels and pad the few columns (the batch) to NR,
// costing more than the products themselves; here W and X are read in place, a block of
// BM weight rows by BN samples at a time, BM * BN vector accumulators.
#include "cpu/conv_small.h"

#include <algorithm>
#include <atomic>

#include "cpu/conv_cpu.h"
#include "cpu/simd.h"

namespace cnnops {
namespace cpu {
namespace {

#define CNNOPS_ALWAYS_INLINE inline __attribute__((always_inline))

// out[a * BN + b] = w[a] . x[b] over k values, for BM weight rows and BN input rows.
// Lane l of the vector sums holds the terms k = l (mod lanes); the lanes, then the tail, are
// added in order, so the result depends on the ISA only, never on the thread count.
template <typename T, int kBytes, int BM, int BN>
CNNOPS_ALWAYS_INLINE void dot_block_body(int64_t k, const T* const* w, const T* const* x, T* out) {
  typedef T V __attribute__((vector_size(kBytes), aligned(sizeof(T)), __may_alias__));
  constexpr int kLanes = kBytes / sizeof(T);
  V acc[BM][BN];
#pragma GCC unroll 16
  for (int a = 0; a < BM; ++a)
#pragma GCC unroll 16
    for (int b = 0; b < BN; ++b) acc[a][b] = V{};
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    V wv[BM], xv[BN];
#pragma GCC unroll 16
    for (int a = 0; a < BM; ++a) wv[a] = *reinterpret_cast<const V*>(w[a] + j);
#pragma GCC unroll 16
    for (int b = 0; b < BN; ++b) xv[b] = *reinterpret_cast<const V*>(x[b] + j);
#pragma GCC unroll 16
    for (int a = 0; a < BM; ++a)
#pragma GCC unroll 16
      for (int b = 0; b < BN; ++b) acc[a][b] += wv[a] * xv[b];  // contracts to FMA
  }
  for (int a = 0; a < BM; ++a)
    for (int b = 0; b < BN; ++b) {
      T sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += acc[a][b][l];
      for (int64_t t = j; t < k; ++t) sum += w[a][t] * x[b][t];
      out[a * BN + b] = sum;
    }
}

template <typename T>
using DotBlock = void (*)(int64_t, const T* const*, const T* const*, T*);

// Register budget: BM * BN accumulators plus BM + BN operands (32 zmm; 16 ymm or xmm).
#define CNNOPS_DEFINE_DOT_BLOCK(NAME, ATTRIBUTE, BYTES, BM, BN)                  \
  template <typename T>                                                          \
  ATTRIBUTE void NAME(int64_t k, const T* const* w, const T* const* x, T* out) { \
    dot_block_body<T, BYTES, BM, BN>(k, w, x, out);                              \
  }
#if CNNOPS_X86
CNNOPS_DEFINE_DOT_BLOCK(dot_block_avx512, CNNOPS_TARGET_AVX512, 64, 4, 4)
CNNOPS_DEFINE_DOT_BLOCK(dot_block_avx2, CNNOPS_TARGET_AVX2, 32, 2, 4)
#endif
CNNOPS_DEFINE_DOT_BLOCK(dot_block_portable, , 16, 2, 4)

template <typename T>
struct DotChoice {
  DotBlock<T> fn;
  int bm, bn;
};

template <typename T>
DotChoice<T> dot_choice() {
  switch (cpu_isa()) {
#if CNNOPS_X86
    case Isa::Avx512:
      return {dot_block_avx512<T>, 4, 4};
    case Isa::Avx2:
      return {dot_block_avx2<T>, 2, 4};
#endif
    default:
      return {dot_block_portable<T>, 2, 4};
  }
}

}  // namespace

bool use_window_dot(const ConvGeometry& g, bool nhwc) {
  if (g.out_plane() != 1) return false;
  for (int i = 0; i < 3; ++i) {
    // The window must be exactly the input: no padding, every tap on a distinct input value.
    if (g.pad[i] != 0 || g.kernel[i] != g.in[i] || (g.kernel[i] > 1 && g.dilation[i] != 1)) return false;
  }
  // In NHWC a sample's (c, tap) values are tap-major, not the weight's order, unless 1 tap.
  if (nhwc && g.in_plane() != 1) return false;
  // Many samples fill the GEMM's panels, where it beats dot products.
  return g.batch <= 64;
}

template <typename T>
void conv_forward_window_dot(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y,
                             Activation activation) {
  const DotChoice<T> choice = dot_choice<T>();
  const int bm = choice.bm, bn = choice.bn;
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k();
  const int64_t row_blocks = num_blocks(m, bm);
  // Tasks: (group, block of weight rows); each sweeps every sample, so W is read once.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, bm * k * g.batch));
  parallel_for(0, g.groups * row_blocks, grain, [&](int64_t begin, int64_t end) {
    const T* w_rows[4];
    const T* x_rows[4];
    T out[16];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / row_blocks, co0 = (task % row_blocks) * bm;
      const int64_t rows = std::min<int64_t>(bm, m - co0);
      for (int a = 0; a < bm; ++a)  // past the last row: repeat it, the result is dropped
        w_rows[a] = w + (grp * m + co0 + std::min<int64_t>(a, rows - 1)) * k;
      for (int64_t n0 = 0; n0 < g.batch; n0 += bn) {
        const int64_t samples = std::min<int64_t>(bn, g.batch - n0);
        for (int b = 0; b < bn; ++b) x_rows[b] = x + ((n0 + std::min<int64_t>(b, samples - 1)) * g.groups + grp) * k;
        choice.fn(k, w_rows, x_rows, out);
        for (int64_t a = 0; a < rows; ++a) {
          const int64_t co = grp * m + co0 + a;
          const T b_co = bias ? bias[co] : T(0);
          for (int64_t b = 0; b < samples; ++b)
            y[(n0 + b) * g.out_channels + co] = apply_activation(out[a * bn + b] + b_co, activation);
        }
      }
    }
  });
}

// Tasks: (group, block of kWindowColumns of the K columns). Each sums over co in order, one
// axpy of a W row per output channel, so no sum depends on the split.
constexpr int64_t kWindowColumns = 256;
std::atomic<int64_t> window_backward_calls{0};

// out[0:width] = sum over r < rows, in order, of scale[r * scale_stride] * src[r * ld : r * ld + width]:
// the rows of W (dX) or of X (dW) weighted by dY, vectorized along the row (compiled per ISA).
template <typename T>
CNNOPS_ALWAYS_INLINE void sum_scaled_rows(int64_t rows, const T* scale, int64_t scale_stride, const T* src, int64_t ld,
                                          int64_t width, T* __restrict out) {
  for (int64_t j = 0; j < width; ++j) out[j] = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const T s = scale[r * scale_stride];
    const T* __restrict row = src + r * ld;
    for (int64_t j = 0; j < width; ++j) out[j] += s * row[j];
  }
}

// Tasks: (sample, group, block of kWindowColumns of the K columns); no sum depends on the split.
template <typename T>
void conv_backward_input_window(const ConvGeometry& g, const T* dy, const T* w, T* dx) {
  window_backward_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), col_blocks = num_blocks(k, kWindowColumns);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, kWindowColumns * m));
  parallel_for(0, g.batch * g.groups * col_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ng = task / col_blocks, grp = ng % g.groups, j0 = task % col_blocks * kWindowColumns;
      const T* d = dy + ng / g.groups * g.out_channels + grp * m;
      CNNOPS_SIMD_CALL(sum_scaled_rows(m, d, int64_t(1), w + grp * m * k + j0, k, std::min(kWindowColumns, k - j0),
                                       dx + ng * k + j0));
    }
  });
}

// Tasks: output channels; each sums over the samples in order.
template <typename T>
void conv_backward_weight_window(const ConvGeometry& g, const T* dy, const T* x, T* dw) {
  window_backward_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, k * g.batch));
  parallel_for(0, g.out_channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      CNNOPS_SIMD_CALL(sum_scaled_rows(g.batch, dy + o, g.out_channels, x + o / m * k, g.groups * k, k, dw + o * k));
  });
}

template void conv_forward_window_dot<float>(const ConvGeometry&, const float*, const float*, const float*, float*,
                                             Activation);
template void conv_forward_window_dot<double>(const ConvGeometry&, const double*, const double*, const double*, double*,
                                              Activation);

int64_t window_backward_call_count() { return window_backward_calls.load(std::memory_order_relaxed); }

template void conv_backward_input_window<float>(const ConvGeometry&, const float*, const float*, float*);
template void conv_backward_input_window<double>(const ConvGeometry&, const double*, const double*, double*);
template void conv_backward_weight_window<float>(const ConvGeometry&, const float*, const float*, float*);
template void conv_backward_weight_window<double>(const ConvGeometry&, const double*, const double*, double*);

}  // namespace cpu
}  // namespace cnnops
