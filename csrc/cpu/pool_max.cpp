// Max pooling and adaptive max pooling forward on the CPU, NCHW and NHWC kernels.
//
// formulas.md §Max pool: y = max over the window, and the argmax is remembered for backprop (the gradient
// flows only to the element that won). Ties keep the first tap in (d, h, w) order and a NaN
// always wins, later NaNs over earlier ones, exactly as torch's CPU loop
// `if (val > maxval || isnan(val))` starting from -inf and the window's first tap.
//
// Indices are tracked in an index type I: int32 while a plane has under 2^30 elements (half
// the bytes, and lanes as wide as float's, so the selects vectorize), int64 beyond.
#include <ATen/Dispatch.h>

#include <optional>

#include <cmath>
#include <limits>

#include "common/checked_math.h"
#include "common/pool_checks.h"
#include "cpu/pool_cpu.h"

#if CNNOPS_X86
#include <immintrin.h>
#endif

namespace cnnops {
namespace cpu {
namespace {

// One tap of the running max: take v if it is larger or NaN.
template <typename A>
CNNOPS_ALWAYS_INLINE bool max_takes(A v, A best) {
  return (v > best) | (v != v);
}

// NCHW: every tap k of one input row for every output of an output row: tap value
// row.taps(k)[o], in-plane index index0 + k*D + o*S (-inf where the window leaves the input:
// never taken). `count`, the padded output width, is a multiple of kRowBlock.
template <typename A, typename I>
CNNOPS_ALWAYS_INLINE void max_row_generic(const PhasedRow<A>& row, int64_t kernel, int64_t dilation, int64_t count,
                                          int64_t index0, A* __restrict best, I* __restrict where) {
  for (int64_t k = 0; k < kernel; ++k) {
    const A* __restrict taps = row.taps(k);
    const int64_t first = index0 + k * dilation;
    for (int64_t o = 0; o < count; ++o) {
      const A v = taps[o];
      const bool take = max_takes(v, best[o]);
      best[o] = take ? v : best[o];
      where[o] = take ? I(first + o * row.stride) : where[o];
    }
  }
}

#if CNNOPS_X86
// The same for float with int32 indices, 16 outputs per AVX-512 vector (the compiler does not
// vectorize the generic loop's masked index update on its own). Each block of outputs stays in
// registers across the taps, in tap order. Out of line: inlined into the row loop, it raises the
// register pressure there.
CNNOPS_TARGET_AVX512 __attribute__((noinline)) void max_row_avx512(const PhasedRow<float>& row, int64_t kernel,
                                                                   int64_t dilation, int64_t count, int64_t index0,
                                                                   float* best, int32_t* where) {
  const int32_t stride = static_cast<int32_t>(row.stride);
  const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(stride));
  const __m512i step = _mm512_set1_epi32(static_cast<int32_t>(dilation));
  for (int64_t o = 0; o < count; o += 16) {
    __m512 b = _mm512_loadu_ps(best + o);
    __m512i w = _mm512_loadu_si512(where + o);
    __m512i index = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(index0 + o * stride)));
    for (int64_t k = 0; k < kernel; ++k) {
      const __m512 v = _mm512_loadu_ps(row.taps(k) + o);
      const __mmask16 take = _mm512_cmp_ps_mask(v, b, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      b = _mm512_mask_blend_ps(take, b, v);
      w = _mm512_mask_blend_epi32(take, w, index);
      index = _mm512_add_epi32(index, step);
    }
    _mm512_storeu_ps(best + o, b);
    _mm512_storeu_si512(where + o, w);
  }
}

// NHWC, float with int32 indices: one output position, 16 channels per AVX-512 vector kept in
// registers across the window's taps, written straight to the output and the int64 indices.
CNNOPS_TARGET_AVX512 void max_position_avx512(const float* xn, int64_t channels, int64_t H, int64_t W, PoolWindow wd,
                                              PoolWindow wh, PoolWindow ww, float* y, int64_t* indices) {
  const int32_t first = static_cast<int32_t>((wd.start * H + wh.start) * W + ww.start);
  int64_t c0 = 0;
  // 64 channels at a time: four independent (best, where) vector pairs share each tap's address.
  for (; c0 + 64 <= channels; c0 += 64) {
    __m512 b[4];
    __m512i w[4];
    for (int j = 0; j < 4; ++j) {
      b[j] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      w[j] = _mm512_set1_epi32(first);
    }
    for (int64_t id = wd.start; id < wd.end; id += wd.step)
      for (int64_t ih = wh.start; ih < wh.end; ih += wh.step)
        for (int64_t iw = ww.start; iw < ww.end; iw += ww.step) {
          const int64_t tap = (id * H + ih) * W + iw;
          const float* src = xn + tap * channels + c0;
          const __m512i t = _mm512_set1_epi32(static_cast<int32_t>(tap));
          for (int j = 0; j < 4; ++j) {
            const __m512 v = _mm512_loadu_ps(src + 16 * j);
            const __mmask16 take = _mm512_cmp_ps_mask(v, b[j], _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            b[j] = _mm512_mask_blend_ps(take, b[j], v);
            w[j] = _mm512_mask_blend_epi32(take, w[j], t);
          }
        }
    for (int j = 0; j < 4; ++j) {
      _mm512_storeu_ps(y + c0 + 16 * j, b[j]);
      _mm512_storeu_si512(indices + c0 + 16 * j, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(w[j])));
      _mm512_storeu_si512(indices + c0 + 16 * j + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(w[j], 1)));
    }
  }
  for (; c0 < channels; c0 += 16) {
    const int64_t width = std::min<int64_t>(16, channels - c0);
    const __mmask16 lanes = static_cast<__mmask16>((1u << width) - 1);
    __m512 b = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512i w = _mm512_set1_epi32(first);  // before any tap, as the generic kernel
    for (int64_t id = wd.start; id < wd.end; id += wd.step)
      for (int64_t ih = wh.start; ih < wh.end; ih += wh.step)
        for (int64_t iw = ww.start; iw < ww.end; iw += ww.step) {
          const int64_t tap = (id * H + ih) * W + iw;
          const __m512 v = _mm512_maskz_loadu_ps(lanes, xn + tap * channels + c0);
          const __mmask16 take = _mm512_cmp_ps_mask(v, b, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          b = _mm512_mask_blend_ps(take, b, v);
          w = _mm512_mask_blend_epi32(take, w, _mm512_set1_epi32(static_cast<int32_t>(tap)));
        }
    _mm512_mask_storeu_ps(y + c0, lanes, b);
    // Widen the int32 indices to int64 in registers: two masked stores of 8 lanes each.
    _mm512_mask_storeu_epi64(indices + c0, static_cast<__mmask8>(lanes),
                             _mm512_cvtepi32_epi64(_mm512_castsi512_si256(w)));
    _mm512_mask_storeu_epi64(indices + c0 + 8, static_cast<__mmask8>(lanes >> 8),
                             _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(w, 1)));
  }
}
#endif

// Whether the AVX-512 kernels above serve (T, I) in the kIsa instance of a kernel.
template <Isa kIsa, typename T, typename I>
constexpr bool kMaxAvx512 = CNNOPS_X86 && kIsa == Isa::Avx512 && std::is_same_v<T, float> && std::is_same_v<I, int32_t>;

template <Isa kIsa, typename A, typename I>
CNNOPS_ALWAYS_INLINE void max_row(const PhasedRow<A>& row, int64_t kernel, int64_t dilation, int64_t count,
                                  int64_t index0, A* best, I* where) {
#if CNNOPS_X86
  if constexpr (kMaxAvx512<kIsa, A, I>) return max_row_avx512(row, kernel, dilation, count, index0, best, where);
#endif
  max_row_generic(row, kernel, dilation, count, index0, best, where);
}

// NHWC: one tap (in-plane index `tap`) of every channel of one output position. The window's
// first tap initializes (best, where): that is what the -inf start and one update give.
template <bool kFirst, typename T, typename A, typename I>
CNNOPS_ALWAYS_INLINE void max_update_channels(const T* __restrict src, int64_t channels, I tap, A* __restrict best,
                                              I* __restrict where) {
  for (int64_t c = 0; c < channels; ++c) {
    const A v = A(src[c]);
    if (kFirst) {
      best[c] = v;
      where[c] = tap;
    } else {
      const bool take = max_takes(v, best[c]);
      best[c] = take ? v : best[c];
      where[c] = take ? tap : where[c];
    }
  }
}

#if CNNOPS_X86
// y = half(best) by the hardware conversion (exact here, see store_max), 16 values a step.
CNNOPS_TARGET_AVX512 void narrow_to_half_avx512(const float* best, int64_t count, c10::Half* y) {
  for (int64_t i = 0; i < count; i += 16) {
    const int64_t width = std::min<int64_t>(16, count - i);
    const __mmask16 lanes = static_cast<__mmask16>((1u << width) - 1);
    const __m256i h = _mm512_maskz_cvtps_ph(lanes, _mm512_maskz_loadu_ps(lanes, best + i), _MM_FROUND_TO_NEAREST_INT);
    _mm256_mask_storeu_epi16(y + i, lanes, h);
  }
}
#endif

// A maximum is one of its window's values (or -inf), so it converts back to T exactly, which
// c10's rounding does one value at a time (a NaN test and a rounding add for bfloat16, a dozen
// operations for half). For bfloat16 the float's upper half is that value (a shift that
// vectorizes; a NaN keeps its input's bits), for half the AVX-512 conversion instruction is.
template <Isa kIsa, typename T, typename A, typename I>
CNNOPS_ALWAYS_INLINE void store_max(int64_t count, const A* best, const I* where, T* y, int64_t* indices) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    for (int64_t i = 0; i < count; ++i) y[i].x = uint16_t(std::bit_cast<uint32_t>(best[i]) >> 16);
#if CNNOPS_X86
  } else if constexpr (kIsa == Isa::Avx512 && std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    narrow_to_half_avx512(best, count, y);
#endif
  } else {
    for (int64_t i = 0; i < count; ++i) y[i] = T(best[i]);
  }
  for (int64_t i = 0; i < count; ++i) indices[i] = int64_t(where[i]);
}

// The windows of output o along dim i, for the kernels that serve both pools. Adaptive windows
// [floor(o*I/O), ceil((o+1)*I/O)) are never empty and have unit steps: once inlined, the loops
// compile as for a constant step of 1.
struct FixedWindows {
  const PoolGeometry& g;
  CNNOPS_ALWAYS_INLINE PoolWindow operator()(int i, int64_t o) const {
    return max_pool_window(o, g.in[i], g.kernel[i], g.stride[i], g.pad[i], g.dilation[i]);
  }
};
struct AdaptiveWindows {
  const PoolGeometry& g;
  CNNOPS_ALWAYS_INLINE PoolWindow operator()(int i, int64_t o) const {
    return {adaptive_start(o, g.in[i], g.out[i]), adaptive_end(o, g.in[i], g.out[i]), 1};
  }
};

// The buffers of the kernels below, allocated by their callers (pool_cpu.h).
template <typename A, typename I>
struct MaxScratch {
  std::optional<PhasedRow<A>> row;  // NCHW rows: one input row, -inf padded
  std::vector<A> best;              // running max per output (NCHW rows) or channel (NHWC)
  std::vector<I> where, first_column;
};

template <typename A, typename I>
MaxScratch<A, I> max_scratch_none(const PoolGeometry&) {
  return {};
}

template <typename A, typename I>
MaxScratch<A, I> max_scratch_rows(const PoolGeometry& g) {
  const int64_t KW = g.kernel[2], SW = g.stride[2], PW = g.pad[2], DW = g.dilation[2], W = g.in[2];
  const int64_t padded_ow = ceil_div(g.out[2], kRowBlock) * kRowBlock;
  MaxScratch<A, I> s;
  s.row.emplace(SW, PW, W, std::max(padded_ow * SW + (KW - 1) * DW, W + PW), KW, DW,
                -std::numeric_limits<A>::infinity());
  s.best.resize(padded_ow);
  s.where.resize(padded_ow);
  s.first_column.assign(padded_ow, 0);
  return s;
}

template <typename A, typename I>
MaxScratch<A, I> max_scratch_channels(const PoolGeometry& g) {
  MaxScratch<A, I> s;
  s.best.resize(g.channels);
  s.where.resize(g.channels);
  return s;
}

// Output rows [begin, end) of the flat (plane, od, oh) range. Per row, every tap of every window
// is visited in (id, ih, kw) order, with the outputs along W as the vectorized inner loop. Each
// input row a window reads is first loaded into a PhasedRow padded with -inf, wide enough for
// a whole number of vectors of outputs, so the tap loops need no bounds. Fixed windows only (the
// FixedWindows argument is CNNOPS_MAX_KERNEL's signature): it calls max_pool_window itself, which
// measured faster than the policy in this loop (~10% on adaptive max 7, NCHW float32).
template <Isa kIsa, typename T, typename I>
CNNOPS_ALWAYS_INLINE void max_pool_nchw_rows(FixedWindows, const PoolGeometry& g, MaxScratch<pool_acc_t<T>, I>& s,
                                             const T* x, T* y, int64_t* indices, int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  constexpr A kLowest = -std::numeric_limits<A>::infinity();
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t H = g.in[1], W = g.in[2];
  const int64_t KW = g.kernel[2], PW = g.pad[2], DW = g.dilation[2];
  const int64_t padded_ow = ceil_div(OW, kRowBlock) * kRowBlock;
  PhasedRow<A>& row = *s.row;
  std::vector<A>& best = s.best;
  std::vector<I>& where = s.where;
  std::vector<I>& first_column = s.first_column;  // of each output's window along W
  for (int64_t ow = 0; ow < OW; ++ow) first_column[ow] = I(max_pool_window(ow, W, KW, g.stride[2], PW, DW).start);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t oh = r % OH, od = (r / OH) % OD, plane = r / (OH * OD);
    const PoolWindow wd = max_pool_window(od, g.in[0], g.kernel[0], g.stride[0], g.pad[0], g.dilation[0]);
    const PoolWindow wh = max_pool_window(oh, H, g.kernel[1], g.stride[1], g.pad[1], g.dilation[1]);
    const T* xp = x + plane * g.in_plane();
    // Before any tap: -inf at the window's first tap (what an all -inf window returns).
    const I first_row = I((wd.start * H + wh.start) * W);
    for (int64_t ow = 0; ow < padded_ow; ++ow) {
      best[ow] = kLowest;
      where[ow] = first_row + first_column[ow];
    }
    for (int64_t id = wd.start; id < wd.end; id += wd.step)
      for (int64_t ih = wh.start; ih < wh.end; ih += wh.step) {
        const int64_t base = (id * H + ih) * W;
        row.load(xp + base);
        max_row<kIsa>(row, KW, DW, padded_ow, base - PW, best.data(), where.data());
      }
    store_max<kIsa>(OW, best.data(), where.data(), y + r * OW, indices + r * OW);
  }
}

// NCHW one output at a time: adaptive windows of uneven sizes, and fixed ones with strides too
// large for phased rows. Output rows [begin, end) of the flat (plane, od, oh) range.
template <Isa kIsa, typename T, typename I, typename Windows>
CNNOPS_ALWAYS_INLINE void max_pool_nchw_direct(Windows window, const PoolGeometry& g, MaxScratch<pool_acc_t<T>, I>&,
                                               const T* x, T* y, int64_t* indices, int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2], H = g.in[1], W = g.in[2];
  for (int64_t r = begin; r < end; ++r) {
    const int64_t oh = r % OH, od = (r / OH) % OD, plane = r / (OH * OD);
    const PoolWindow wd = window(0, od), wh = window(1, oh);
    const T* xp = x + plane * g.in_plane();
    for (int64_t ow = 0; ow < OW; ++ow) {
      const PoolWindow ww = window(2, ow);
      A best = -std::numeric_limits<A>::infinity();
      int64_t where = (wd.start * H + wh.start) * W + ww.start;
      for (int64_t id = wd.start; id < wd.end; id += wd.step)
        for (int64_t ih = wh.start; ih < wh.end; ih += wh.step)
          for (int64_t iw = ww.start; iw < ww.end; iw += ww.step) {
            const int64_t tap = (id * H + ih) * W + iw;
            const A v = A(xp[tap]);
            const bool take = max_takes(v, best);  // branch-free: selects, not jumps
            best = take ? v : best;
            where = take ? tap : where;
          }
      y[r * OW + ow] = T(best);
      indices[r * OW + ow] = where;
    }
  }
}

// NHWC: output positions [begin, end) of the flat (n, od, oh, ow) range, all channels at once.
template <Isa kIsa, typename T, typename I, typename Windows>
CNNOPS_ALWAYS_INLINE void max_pool_nhwc_positions(Windows window, const PoolGeometry& g,
                                                  MaxScratch<pool_acc_t<T>, I>& s, const T* x, T* y, int64_t* indices,
                                                  int64_t begin, int64_t end) {
  using A = pool_acc_t<T>;
  const int64_t C = g.channels, H = g.in[1], W = g.in[2];
  std::vector<A>& best = s.best;
  std::vector<I>& where = s.where;
  PositionCursor pos(g, begin);
  for (int64_t q = begin; q < end; ++q, pos.next()) {
    const PoolWindow wd = window(0, pos.od), wh = window(1, pos.oh), ww = window(2, pos.ow);
    const T* xn = x + pos.n * g.in_plane() * C;
#if CNNOPS_X86
    if constexpr (kMaxAvx512<kIsa, T, I>) {
      max_position_avx512(xn, C, H, W, wd, wh, ww, y + q * C, indices + q * C);
      continue;
    }
#endif
    const int64_t first = (wd.start * H + wh.start) * W + ww.start;
    if (wd.start >= wd.end || wh.start >= wh.end || ww.start >= ww.end) {
      // A dilated window with no tap inside the input: -inf at the window's first position,
      // as the NCHW kernels and torch give.
      std::fill(best.begin(), best.end(), -std::numeric_limits<A>::infinity());
      std::fill(where.begin(), where.end(), I(first));
    }
    for (int64_t id = wd.start; id < wd.end; id += wd.step)
      for (int64_t ih = wh.start; ih < wh.end; ih += wh.step)
        for (int64_t iw = ww.start; iw < ww.end; iw += ww.step) {
          const int64_t tap = (id * H + ih) * W + iw;
          if (tap == first)
            max_update_channels<true>(xn + tap * C, C, I(tap), best.data(), where.data());
          else
            max_update_channels<false>(xn + tap * C, C, I(tap), best.data(), where.data());
        }
    store_max<kIsa>(C, best.data(), where.data(), y + q * C, indices + q * C);
  }
}

// Runs rows(g, x, y, indices, begin, end) over `tasks` rows (NCHW) or positions (NHWC), with
// the index type the plane size allows.
template <template <typename, typename> class Kernel>
void run_max_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output, at::Tensor& indices,
                    int64_t tasks, int64_t work_per_task) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "max_pool_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    int64_t* ind = indices.mutable_data_ptr<int64_t>();
    // int32 leaves room for the padded-row arithmetic of the NCHW kernel (indices stay below
    // 2^30, those of all-padding windows too)
    const bool narrow = g.in_plane() < (int64_t(1) << 30) && max_pool_index_limit(g) < (int64_t(1) << 30);
    at::parallel_for(0, tasks, pool_grain(work_per_task), [&](int64_t begin, int64_t end) {
      if (narrow)
        Kernel<scalar_t, int32_t>::run(g, x, y, ind, begin, end);
      else
        Kernel<scalar_t, int64_t>::run(g, x, y, ind, begin, end);
    });
  });
}

// run() allocates the kernel's scratch, then runs the kernel compiled for cpu_isa() (simd.h).
#define CNNOPS_MAX_KERNEL(NAME, FN, WINDOWS, SCRATCH)                                                            \
  template <typename T, typename I>                                                                              \
  struct NAME {                                                                                                  \
    static void run(const PoolGeometry& g, const T* x, T* y, int64_t* ind, int64_t b, int64_t e) {               \
      auto scratch = SCRATCH<pool_acc_t<T>, I>(g);                                                               \
      simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY { FN<isa, T, I>(WINDOWS{g}, g, scratch, x, y, ind, b, e); }); \
    }                                                                                                            \
  };
CNNOPS_MAX_KERNEL(MaxNchw, max_pool_nchw_rows, FixedWindows, max_scratch_rows)
CNNOPS_MAX_KERNEL(MaxNchwDirect, max_pool_nchw_direct, FixedWindows, max_scratch_none)
CNNOPS_MAX_KERNEL(MaxNhwc, max_pool_nhwc_positions, FixedWindows, max_scratch_channels)
CNNOPS_MAX_KERNEL(AdaptiveMaxNchw, max_pool_nchw_direct, AdaptiveWindows, max_scratch_none)
CNNOPS_MAX_KERNEL(AdaptiveMaxNhwc, max_pool_nhwc_positions, AdaptiveWindows, max_scratch_channels)
#undef CNNOPS_MAX_KERNEL

}  // namespace

void max_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output, at::Tensor& indices,
                             bool channels_last) {
  // taps a window reads (kernel sizes may reach 2^63 for max_pool1d: saturate)
  int64_t window = 1;
  for (int i = 0; i < 3; ++i) window = saturating_mul(window, std::min(g.kernel[i], g.in[i]));
  if (channels_last)
    run_max_kernel<MaxNhwc>(g, input, output, indices, g.batch * g.out_plane(), saturating_mul(window, g.channels));
  else if (use_phased_rows(g.out[2], g.in[2], g.kernel[2], g.stride[2], g.pad[2], g.dilation[2]))
    run_max_kernel<MaxNchw>(g, input, output, indices, g.planes() * g.out[0] * g.out[1],
                            saturating_mul(window, g.out[2]));
  else
    run_max_kernel<MaxNchwDirect>(g, input, output, indices, g.planes() * g.out[0] * g.out[1],
                                  saturating_mul(window, g.out[2]));
}

void adaptive_max_pool_forward_kernel(const PoolGeometry& g, const at::Tensor& input, at::Tensor& output,
                                      at::Tensor& indices, bool channels_last) {
  // Where every size divides evenly, the adaptive windows [o*I/O, (o+1)*I/O) are a plain max
  // pool's with kernel = stride = I/O: the NCHW case takes that (vectorized) kernel.
  bool uniform = !channels_last;
  for (int i = 0; i < 3; ++i) uniform = uniform && g.out[i] > 0 && g.in[i] % g.out[i] == 0;
  if (uniform) {
    PoolGeometry plain = g;
    for (int i = 0; i < 3; ++i) {
      plain.kernel[i] = plain.stride[i] = g.in[i] / g.out[i];
      plain.pad[i] = 0;
      plain.dilation[i] = 1;
    }
    max_pool_forward_kernel(plain, input, output, indices, false);
    return;
  }
  // a window holds about in/out elements per dim
  const int64_t window = ceil_div(g.in_plane(), std::max<int64_t>(g.out_plane(), 1));
  if (channels_last)
    run_max_kernel<AdaptiveMaxNhwc>(g, input, output, indices, g.batch * g.out_plane(), window * g.channels);
  else
    run_max_kernel<AdaptiveMaxNchw>(g, input, output, indices, g.planes() * g.out[0] * g.out[1], window * g.out[2]);
}

}  // namespace cpu
}  // namespace cnnops
