// GEMM micro-kernels and the blocked driver (see gemm.h).
//
// One micro-kernel body, written with GCC vector extensions, is compiled three times under
// different target attributes (AVX-512, AVX2+FMA, baseline x86-64/other) and the widest one the
// CPU supports is picked at run time. Only these functions carry the target attributes, so no
// AVX-512 code can leak into code that runs on other CPUs.
#include "cpu/gemm.h"
#include "cpu/gemm_segments.h"
#include "cpu/simd.h"
#include "common/macros.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

#include <unistd.h>

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace cnnops {
namespace cpu {
namespace {

template <typename T>
struct Vec64 {  // 64 bytes of T, unaligned loads and stores allowed
  typedef T type __attribute__((vector_size(64), aligned(sizeof(T)), __may_alias__));
  static constexpr int kLanes = 64 / sizeof(T);
};

// Adds the valid mr x nr corner of a spilled accumulator tile (row stride NR) to C: the edge
// tiles only. Each ISA's micro-kernel calls its own out-of-line copy (CNNOPS_DEFINE_MICRO_KERNEL_FOR),
// so the full-tile path never spills its registers and these loops still get the ISA's vectors.
template <typename T>
CNNOPS_ALWAYS_INLINE void store_edge_tile_body(const T* tile, T* c, int64_t ldc, int64_t mr, int64_t nr,
                                               const T* row_bias, bool accumulate, Activation activation) {
  constexpr int64_t kNr = gemm_nr<T>();
  for (int64_t i = 0; i < mr; ++i) {
    T* row = c + i * ldc;
    const T* acc = tile + i * kNr;
    if (accumulate) {
      for (int64_t j = 0; j < nr; ++j) row[j] += acc[j];
    } else {
      const T init = row_bias ? row_bias[i] : T(0);
      for (int64_t j = 0; j < nr; ++j) row[j] = init + acc[j];
    }
    if (activation == Activation::Relu)
      for (int64_t j = 0; j < nr; ++j) row[j] = relu(row[j]);
  }
}

template <typename T>
using EdgeStore = void (*)(const T*, T*, int64_t, int64_t, int64_t, const T*, bool, Activation);

// Rows [first, first + rows) of the B panel NR columns to the right of the one a kOffsetB call
// reads, to prefetch into L2 while it computes: B read in place streams from memory, and the
// driver spreads each next panel's rows over the calls that share the current one.
struct NextPanel {
  int64_t first = 0, rows = 0;
};

// C[0:mr, 0:nr] = activation(init + sum_k a[k, 0:MR] (outer) b[k, 0:NR]), NR = gemm_nr<T>(). a is a packed panel
// (a[k*MR + i]) or, kOffsetA, read in place as a[a_offsets[k] + i*lda]; b is a packed panel (row
// k at b + k*NR) or, kOffsetB, rows read in place at b + b_offsets[k]. The driver passes the
// activation only with the last reduction block, when the sum is final.
template <typename T, int MR, bool kOffsetA, bool kOffsetB, EdgeStore<T> kEdge>
CNNOPS_ALWAYS_INLINE void micro_kernel_body(int64_t kc, const T* __restrict a, const int64_t* __restrict a_offsets,
                                            int64_t lda, const T* __restrict b, const int64_t* __restrict b_offsets,
                                            T* __restrict c, int64_t ldc, int64_t mr, int64_t nr, const T* row_bias,
                                            bool accumulate, Activation activation, NextPanel next) {
  using V = typename Vec64<T>::type;
  constexpr int kL = Vec64<T>::kLanes;
  constexpr int kNr = gemm_nr<T>();
  static_assert(kNr == 2 * kL, "the micro-kernel holds a row of B in two 64-byte vectors");
  // C's lines (128 bytes a row, 3 lines when unaligned) are fetched for writing while the k loop
  // runs, instead of missing one by one in the stores at its end.
  for (int64_t i = 0; i < mr; ++i) {
    __builtin_prefetch(c + i * ldc, 1);
    __builtin_prefetch(c + i * ldc + kL, 1);
    __builtin_prefetch(c + i * ldc + kNr - 1, 1);
  }
  V acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = V{};
  for (int64_t k = 0; k < kc; ++k) {
    const T* b_row = kOffsetB ? b + b_offsets[k] : b + k * kNr;
    const T* a_k = kOffsetA ? a + a_offsets[k] : a + k * MR;
    const int64_t a_step = kOffsetA ? lda : 1;
    if constexpr (kOffsetB) {
      if (k < next.rows) {  // the row's NR values span 2 lines, 3 when unaligned
        const T* row = b + b_offsets[next.first + k] + kNr;
        __builtin_prefetch(row, 0, 2);
        __builtin_prefetch(row + kL, 0, 2);
        __builtin_prefetch(row + kNr - 1, 0, 2);
      }
    }
    const V b0 = *reinterpret_cast<const V*>(b_row);
    const V b1 = *reinterpret_cast<const V*>(b_row + kL);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T ai = a_k[i * a_step];
      acc0[i] += ai * b0;  // contracts to FMA
      acc1[i] += ai * b1;
    }
  }
  if (mr == MR && nr == kNr) [[likely]] {
    const bool relu_out = activation == Activation::Relu;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      V* row = reinterpret_cast<V*>(c + i * ldc);
      V out0, out1;
      if (accumulate) {
        out0 = row[0] + acc0[i];
        out1 = row[1] + acc1[i];
      } else {
        const T init = row_bias ? row_bias[i] : T(0);
        out0 = acc0[i] + init;
        out1 = acc1[i] + init;
      }
      if (relu_out) {    // the fused ReLU (common/activation.h's relu), lane-wise on the registers
        const V zero{};  // written out here: a call taking vectors would warn of an ABI change
        out0 = out0 < zero ? zero : out0;
        out1 = out1 < zero ? zero : out1;
      }
      row[0] = out0;
      row[1] = out1;
    }
    return;
  }
  alignas(64) T tile[MR * kNr];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    *reinterpret_cast<V*>(tile + i * kNr) = acc0[i];
    *reinterpret_cast<V*>(tile + i * kNr + kL) = acc1[i];
  }
  kEdge(tile, c, ldc, mr, nr, row_bias, accumulate, activation);
}

template <typename T>
using MicroKernel = void (*)(int64_t, const T*, const int64_t*, int64_t, const T*, const int64_t*, T*, int64_t, int64_t,
                             int64_t, const T*, bool, Activation, NextPanel);

// The micro-kernel of one ISA: its spec (gemm.h) gives MR as the template argument.
#define CNNOPS_DEFINE_MICRO_KERNEL_FOR(NAME, ATTRIBUTE, T, MR)                                                       \
  ATTRIBUTE __attribute__((noinline)) void NAME##_edge(const T* tile, T* c, int64_t ldc, int64_t mr, int64_t nr,     \
                                                       const T* bias, bool acc, Activation act) {                    \
    store_edge_tile_body<T>(tile, c, ldc, mr, nr, bias, acc, act);                                                   \
  }                                                                                                                  \
  ATTRIBUTE void NAME(int64_t kc, const T* a, const int64_t* a_offsets, int64_t lda, const T* b,                     \
                      const int64_t* b_offsets, T* c, int64_t ldc, int64_t mr, int64_t nr, const T* bias, bool acc,  \
                      Activation act, NextPanel next) {                                                              \
    if (a_offsets && b_offsets)                                                                                      \
      micro_kernel_body<T, MR, true, true, NAME##_edge>(kc, a, a_offsets, lda, b, b_offsets, c, ldc, mr, nr, bias,   \
                                                        acc, act, next);                                             \
    else if (a_offsets)                                                                                              \
      micro_kernel_body<T, MR, true, false, NAME##_edge>(kc, a, a_offsets, lda, b, b_offsets, c, ldc, mr, nr, bias,  \
                                                         acc, act, next);                                            \
    else if (b_offsets)                                                                                              \
      micro_kernel_body<T, MR, false, true, NAME##_edge>(kc, a, a_offsets, lda, b, b_offsets, c, ldc, mr, nr, bias,  \
                                                         acc, act, next);                                            \
    else                                                                                                             \
      micro_kernel_body<T, MR, false, false, NAME##_edge>(kc, a, a_offsets, lda, b, b_offsets, c, ldc, mr, nr, bias, \
                                                          acc, act, next);                                           \
  }
#define CNNOPS_DEFINE_MICRO_KERNEL(NAME, ATTRIBUTE, SPEC)             \
  CNNOPS_DEFINE_MICRO_KERNEL_FOR(NAME##_f, ATTRIBUTE, float, SPEC.mr) \
  CNNOPS_DEFINE_MICRO_KERNEL_FOR(NAME##_d, ATTRIBUTE, double, SPEC.mr)

#if CNNOPS_X86
CNNOPS_DEFINE_MICRO_KERNEL(kernel_avx512, CNNOPS_TARGET_AVX512, kGemmAvx512)
CNNOPS_DEFINE_MICRO_KERNEL(kernel_avx512_wide, CNNOPS_TARGET_AVX512, kGemmAvx512Wide)
CNNOPS_DEFINE_MICRO_KERNEL(kernel_avx2, CNNOPS_TARGET_AVX2, kGemmAvx2)
#endif
CNNOPS_DEFINE_MICRO_KERNEL(kernel_portable, , kGemmPortable)

template <typename T>
struct KernelChoice {
  MicroKernel<T> fn;
  const GemmSpec* spec;
};

template <typename T>
KernelChoice<T> make_choice(MicroKernel<float> f, MicroKernel<double> d, const GemmSpec& spec) {
  // weight_cache.cpp and conv_winograd.cpp pack A in kKc blocks, the driver walks spec.kc ones.
  static_assert(kGemmAvx512.kc == kKc && kGemmAvx2.kc == kKc && kGemmPortable.kc == kKc,
                "gemm_workspace_size and the packers size blocks by kKc");
  static_assert(kGemmAvx512.nc % gemm_nr<float>() == 0 && kGemmAvx2.nc % gemm_nr<float>() == 0 &&
                    kGemmPortable.nc % gemm_nr<float>() == 0,
                "an L2 block of B is whole panels of either dtype");
  static_assert(kGemmAvx512.mc % kGemmAvx512.mr == 0 && kGemmAvx2.mc % kGemmAvx2.mr == 0 &&
                    kGemmPortable.mc % kGemmPortable.mr == 0,
                "an L2 block of A is whole panels");
  if constexpr (sizeof(T) == sizeof(float)) {
    return {f, &spec};
  } else {
    return {d, &spec};
  }
}

// The specs' nc suits a 2 MB L2 (Sapphire Rapids): a 512 KB block of B beside a 384 KB block of
// A. Where the L2 is smaller, B's block shrinks to a quarter of it, so A's and B's blocks still
// share it. On Zen 5 (1 MB L2), 1 thread, batch 8, runs alternating nc 512 and 256: 1x1 512->128
// at 28x28 3.44-3.67 vs 3.34-3.48 ms; the other shapes measured (3x3 at 56x56, 14x14 and 7x7,
// 1x1 1024->256, channels-last 1x1) level within the machine's noise (about 10%).
GemmSpec fit_to_l2(GemmSpec spec) {
  const int64_t l2 = l2_cache_bytes(), nr = gemm_nr<float>();
  if (l2 <= 0) return spec;
  const int64_t fitted = l2 / 4 / (spec.kc * int64_t(sizeof(float))) / nr * nr;
  spec.nc = std::clamp(fitted, 2 * nr, spec.nc);
  return spec;
}

// kSpec fitted to this CPU's L2, made once (the kernel choices keep a pointer to it).
template <const GemmSpec& kSpec>
const GemmSpec& l2_fitted() {
  static const GemmSpec spec = fit_to_l2(kSpec);
  return spec;
}

template <typename T>
const KernelChoice<T>& kernel_choice() {
  static const KernelChoice<T> choice = [] {
    switch (cpu_isa()) {
#if CNNOPS_X86
      case Isa::Avx512:
        return make_choice<T>(kernel_avx512_f, kernel_avx512_d, l2_fitted<kGemmAvx512>());
      case Isa::Avx2:
        return make_choice<T>(kernel_avx2_f, kernel_avx2_d, l2_fitted<kGemmAvx2>());
#endif
      default:
        return make_choice<T>(kernel_portable_f, kernel_portable_d, l2_fitted<kGemmPortable>());
    }
  }();
  return choice;
}

// The micro-kernel of the GEMMs that read B's panels in place (gemm.h): AVX-512's wide one, else
// kernel_choice's.
template <typename T>
const KernelChoice<T>& wide_kernel_choice() {
  static const KernelChoice<T> choice = [] {
#if CNNOPS_X86
    if (cpu_isa() == Isa::Avx512)
      return make_choice<T>(kernel_avx512_wide_f, kernel_avx512_wide_d, l2_fitted<kGemmAvx512Wide>());
#endif
    return kernel_choice<T>();
  }();
  return choice;
}

}  // namespace

Isa cpu_isa() {
  // The tests name a narrower ISA (avx2, portable) to run every kernel version on one machine.
  static const Isa isa = [] {
    const char* env = std::getenv("CNNOPS_CPU_ISA");
    const std::string cap = env && *env ? env : "avx512";
#if CNNOPS_X86
    __builtin_cpu_init();
    if (cap == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
      return Isa::Avx512;
    if (cap != "portable" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
    return Isa::Portable;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "portable";
  }
}

const GemmSpec& gemm_spec() { return *kernel_choice<float>().spec; }

int64_t l2_cache_bytes() {
  if (const char* forced = std::getenv("CNNOPS_CPU_L2_BYTES")) return std::max<int64_t>(std::atoll(forced), 0);
#ifdef _SC_LEVEL2_CACHE_SIZE
  return std::max<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE), 0);
#else
  return 0;
#endif
}

const char* gemm_isa() { return gemm_spec().name; }

double gemm_micro_kernel_seconds(bool wide, int64_t kc, int64_t reps, int64_t* mr) {
  const auto& kernel = wide ? wide_kernel_choice<float>() : kernel_choice<float>();
  constexpr int64_t nr = gemm_nr<float>();
  *mr = kernel.spec->mr;
  std::vector<float> a(*mr * kc + 16), b(kc * nr + 16), c(*mr * nr + 16);
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(i % 7) * 1e-3f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = float(i % 5) * 1e-3f;
  auto align = [](float* p) {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
  };
  float *ap = align(a.data()), *bp = align(b.data()), *cp = align(c.data());
  timespec t0, t1;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  for (int64_t r = 0; r < reps; ++r)
    kernel.fn(kc, ap, nullptr, 0, bp, nullptr, cp, nr, *mr, nr, nullptr, true, Activation::None, NextPanel{});
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  return double(t1.tv_sec - t0.tv_sec) + 1e-9 * double(t1.tv_nsec - t0.tv_nsec);
}

template <typename T>
int64_t gemm_mr() {
  return gemm_spec().mr;
}
template int64_t gemm_mr<float>();
template int64_t gemm_mr<double>();

template <typename T>
PackedA<T> pack_a_panels(int64_t m, int64_t k, ReadPanel<T> read_panel) {
  PackedA<T> packed;
  packed.m = m;
  packed.k = k;
  packed.mr = gemm_spec().mr;
  const int64_t mr = packed.mr, block = gemm_spec().kc;
  const int64_t padded_m = ceil_div(m, mr) * mr;
  if (m % mr == 0) {
    packed.data.resize(padded_m * k);  // left uninitialized: the panels cover every value
  } else {
    packed.data.assign(padded_m * k, T(0));
  }
  for (int64_t k0 = 0; k0 < k; k0 += block) {
    const int64_t kc = std::min(block, k - k0);
    for (int64_t i0 = 0; i0 < m; i0 += mr)
      read_panel(i0, std::min(mr, m - i0), k0, kc, packed.data.data() + k0 * padded_m + i0 * kc, mr);
  }
  return packed;
}

// dst[kk * 8 + i] = src[i * lda + kk] for 8 rows and kk < kc: 8 x 8 blocks transposed in registers
// by swapping the off-diagonal h x h blocks of every 2h x 2h block, h = 4, 2, 1.
template <typename T>
CNNOPS_ALWAYS_INLINE void pack_rows8_body(const T* src, int64_t lda, int64_t kc, T* dst) {
  typedef T V8 __attribute__((vector_size(8 * sizeof(T)), aligned(sizeof(T)), __may_alias__));
  int64_t kk = 0;
  for (; kk + 8 <= kc; kk += 8) {
    V8 r[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const V8*>(src + i * lda + kk);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const V8 x = r[i], y = r[i + 4];
      r[i] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11);
      r[i + 4] = __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
    }
#pragma GCC unroll 4
    for (int i : {0, 1, 4, 5}) {
      const V8 x = r[i], y = r[i + 2];
      r[i] = __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13);
      r[i + 2] = __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    }
#pragma GCC unroll 4
    for (int i : {0, 2, 4, 6}) {
      const V8 x = r[i], y = r[i + 1];
      r[i] = __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14);
      r[i + 1] = __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) *reinterpret_cast<V8*>(dst + (kk + j) * 8) = r[j];
  }
  for (; kk < kc; ++kk)
    for (int i = 0; i < 8; ++i) dst[kk * 8 + i] = src[i * lda + kk];
}

template <typename T>
void pack_a_rows(const T* a, int64_t lda, int64_t rows, int64_t kc, T* dst, int64_t mr) {
  if (mr == 8 && rows == 8) {  // full panel: 8 x 8 register transposes
    CNNOPS_SIMD_CALL(pack_rows8_body<T>(a, lda, kc, dst));
    return;
  }
  for (int64_t kk = 0; kk < kc; ++kk)
    for (int64_t i = 0; i < rows; ++i) dst[kk * mr + i] = a[i * lda + kk];
}

template <typename T>
PackedA<T> pack_a(int64_t m, int64_t k, const T* a, int64_t row_stride, int64_t col_stride) {
  return pack_a_panels<T>(m, k, [&](int64_t i0, int64_t rows, int64_t k0, int64_t kc, T* dst, int64_t mr) {
    if (col_stride == 1) return pack_a_rows(a + i0 * row_stride + k0, row_stride, rows, kc, dst, mr);  // weights
    for (int64_t kk = 0; kk < kc; ++kk)
      for (int64_t i = 0; i < rows; ++i) dst[kk * mr + i] = a[(i0 + i) * row_stride + (k0 + kk) * col_stride];
  });
}

template <typename T>
struct APanel {
  const T* data;
  const int64_t* offsets;  // per k, for A read in place (data[offsets[k] + i * lda])
  int64_t lda;
};

template <typename T>
struct BPanel {
  const T* data;
  const int64_t* offsets;  // per k, for B read in place (row k at data + offsets[k])
};

// Rows [s0, ...) of an A or B panel: its per-k offsets or its packed rows (width values each)
// from s0 on.
template <typename Panel>
Panel from_row(Panel panel, int64_t s0, int64_t width) {
  if (panel.offsets) {
    panel.offsets += s0;
  } else {
    panel.data += s0 * width;
  }
  return panel;
}

// The MR-row kernel takes each reduction block in sub-blocks of kSubBlockRows rows. B read in place
// has its rows a plane apart, most of them off a line boundary, so a panel row of NR values spans
// 3 lines: a panel of kKc rows (48 KB) would not share L1 with its A panel. NCHW, 1 thread, B in
// place: 3x3 256->256 at 14x14, batch 8, 6.2-6.5 -> 5.8 ms; 1x1 256->64 at 56x56 4.7 -> 4.4 ms;
// 1x1 1024->256 at 14x14, batch 1, 0.64-0.69 -> 0.60 ms. Packed B sums in the same sub-blocks, so
// a C value is bitwise the same whichever product serves its column block (ColumnBlocks move with
// the thread count); there (min of 3, a busy machine) 1x1 1024->256 -10%, 512->128 -13%, 3x3
// 512->512 at 7x7 +5%. The wide kernel (A in place, channels-last) keeps whole blocks: sub-blocks
// made it slower there (1x1 1024->256 at 14x14, 4.0 -> 4.2-4.35 ms).
constexpr int64_t kSubBlockRows = 128;

// A short reduction (one block of at most kShortReduction rows, as in 1x1 layers of 64-128 input
// channels) leaves each micro-kernel call little work against the C tile it writes. With A read in
// place and at least kShortReductionPanels B panels, the loops then turn round: one A panel stays
// in L1 while the B panels pass, so C's rows are written whole, left to right. Channels-last 1x1,
// batch 8, 1 thread: forward 64->256 at 56x56 4.48 -> 4.01 ms, 128->512 at 28x28 4.01 -> 3.68 ms;
// grad input 256->64 4.51 -> 4.16 ms. Level with 2 panels or a 256-row reduction; slower for NCHW
// (packed A: 128->512 forward 4.19 -> 4.35 ms) and for several reduction blocks (3x3 64->64).
constexpr int64_t kShortReduction = 128;
constexpr int64_t kShortReductionPanels = 4;

// The blocked loops shared by every operand source, BLIS's order: for each block of spec.nc
// columns (kPacksB; all N when B is read in place) and each spec.kc reduction block,
// prepare(k0, kc, n0, nc) makes that part of B ready (packs it, or nothing) while it fits L2;
// then, for each block of spec.mc rows (kept in L2), every NR-column B panel,
// b_panel(k0, kc, j0), stays in L1 while the block's A panels, a_panel(k0, kc, i0), stream past it
// (or the other way round, for a short reduction: kShortReduction). Each C value sums its k blocks in order whatever the blocks.
// C's panel starting at column j0 is at c + c_panel_offset[j0 / NR], or c + j0 without offsets.
template <typename T, bool kPacksB, typename Prepare, typename APanelFn, typename BPanelFn>
void gemm_blocked(int64_t m, int64_t k, int64_t mr, int64_t n, T* c, int64_t ldc, const T* row_bias, bool accumulate,
                  int64_t row_begin, int64_t row_end, Activation activation, Prepare&& prepare, APanelFn&& a_panel,
                  BPanelFn&& b_panel, const int64_t* c_panel_offset = nullptr, bool wide = false) {
  const auto& kernel = wide ? wide_kernel_choice<T>() : kernel_choice<T>();
  const int64_t nr = gemm_nr<T>(), block = kernel.spec->kc, mc = kernel.spec->mc;
  const int64_t nc_block = kPacksB ? kernel.spec->nc : std::max<int64_t>(n, 1);  // B read in place: one block
  if (row_end < 0) row_end = m;
  TORCH_INTERNAL_ASSERT(row_begin % mr == 0 && row_end <= m, "gemm: row range must start on a panel");
  auto c_column = [&](int64_t j) { return c_panel_offset ? c_panel_offset[j / nr] + j % nr : j; };
  if (k == 0) {  // empty reduction: C = init
    for (int64_t i = row_begin; i < row_end; ++i)
      for (int64_t j = 0; j < n; ++j) {
        T& out = c[i * ldc + c_column(j)];
        out = apply_activation(accumulate ? out : (row_bias ? row_bias[i] : T(0)), activation);
      }
    return;
  }
  for (int64_t n0 = 0; n0 < n; n0 += nc_block) {  // an L2 block of B columns
    const int64_t nc = std::min(nc_block, n - n0);
    const bool a_outer = wide && k <= kShortReduction && nc >= kShortReductionPanels * nr;
    for (int64_t k0 = 0; k0 < k; k0 += block) {
      const int64_t kc = std::min(block, k - k0);
      prepare(k0, kc, n0, nc);
      const int64_t step = wide ? kc : kSubBlockRows;
      for (int64_t s0 = 0; s0 < kc; s0 += step) {  // rows [s0, s0 + ks) of the block's panels
        const int64_t ks = std::min(step, kc - s0);
        const bool acc = accumulate || k0 + s0 > 0;
        const Activation act = k0 + s0 + ks == k ? activation : Activation::None;  // only on final sums
        auto a_rows = [&](int64_t i0) { return from_row(a_panel(k0, kc, i0), s0, mr); };
        auto b_rows = [&](int64_t j0) { return from_row(b_panel(k0, kc, j0), s0, nr); };
        for (int64_t ib = row_begin; ib < row_end; ib += mc) {  // an L2 block of A rows
          const int64_t ie = std::min(row_end, ib + mc);
          auto micro_kernel = [&](int64_t i0, int64_t j0, const auto& a, const auto& b, NextPanel next) {
            kernel.fn(ks, a.data, a.offsets, a.lda, b.data, b.offsets, c + c_column(j0) + i0 * ldc, ldc,
                      std::min(mr, ie - i0), std::min(nr, n - j0), row_bias ? row_bias + i0 : nullptr, acc, act, next);
          };
          if (a_outer) {
            for (int64_t i0 = ib; i0 < ie; i0 += mr) {
              const auto a = a_rows(i0);
              for (int64_t j0 = n0; j0 < n0 + nc; j0 += nr) micro_kernel(i0, j0, a, b_rows(j0), NextPanel{});
            }
            continue;
          }
          for (int64_t j0 = n0; j0 < n0 + nc; j0 += nr) {
            const auto b = b_rows(j0);
            // B in place: the calls on this panel prefetch the next one's rows, an even share each.
            const int64_t share = !kPacksB && j0 + nr < n ? ceil_div(ks, ceil_div(ie - ib, mr)) : 0;
            for (int64_t i0 = ib; i0 < ie; i0 += mr) {
              const int64_t first = std::min(ks, (i0 - ib) / mr * share);
              micro_kernel(i0, j0, a_rows(i0), b, NextPanel{first, std::min(ks, first + share) - first});
            }
          }
        }
      }
    }
  }
}

template <typename T>
void gemm(const PackedA<T>& a, int64_t n, PackB<T> pack_b, T* c, int64_t ldc, const T* row_bias, bool accumulate,
          T* workspace, int64_t row_begin, int64_t row_end, Activation activation, const int64_t* c_panel_offset) {
  // Each L2 block of B columns is packed at the start of the workspace: the same kc x nc values
  // stay in L2 block after block, where blocks packed side by side sent N x kc values to memory.
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t block_cols = gemm_spec().nc;
  gemm_blocked<T, true>(
      a.m, a.k, a.mr, n, c, ldc, row_bias, accumulate, row_begin, row_end, activation,
      [&](int64_t k0, int64_t kc, int64_t n0, int64_t nc) { pack_b(k0, kc, n0, nc, workspace); },
      [&](int64_t k0, int64_t kc, int64_t i0) { return APanel<T>{a.panel(k0, kc, i0), nullptr, 0}; },
      [&](int64_t, int64_t kc, int64_t j0) { return BPanel<T>{workspace + (j0 % block_cols) / nr * kc * nr, nullptr}; },
      c_panel_offset);
}

// The packed copy of an operand's partial edge panel (A's last rows, B's last columns), kept for
// the reduction block it holds: the blocked loops ask for it once per panel of the other operand
// (a scalar repack each time cost 3% of a channels-last 1x1 forward, 256->128 at 56x56).
template <typename T>
struct EdgePanel {
  std::vector<T> data;
  int64_t k0 = -1, first = -1;  // the reduction block and the first row (A) or column (B) held
  // Whether data holds that panel already; if not, it is taken as held and the caller fills it.
  bool holds(int64_t block, int64_t first_index) {
    if (k0 == block && first == first_index) return true;
    k0 = block;
    first = first_index;
    return false;
  }
};

// A B panel read in place, row k at b + row_offset[k], except a last, partial one (N not a
// multiple of NR): that one is copied (zero columns past N) into `edge`, so no read passes a
// row's last column.
template <typename T>
BPanel<T> in_place_b_panel(int64_t n, const T* b, const int64_t* row_offset, int64_t k0, int64_t kc, int64_t j0,
                           EdgePanel<T>& edge) {
  constexpr int64_t nr = gemm_nr<T>();
  if (j0 + nr <= n) return BPanel<T>{b + j0, row_offset + k0};
  if (!edge.holds(k0, j0)) {
    edge.data.assign(kc * nr, T(0));
    for (int64_t kk = 0; kk < kc; ++kk) std::copy_n(b + row_offset[k0 + kk] + j0, n - j0, edge.data.data() + kk * nr);
  }
  return BPanel<T>{edge.data.data(), nullptr};
}

template <typename T>
void gemm_shifted_b(const PackedA<T>& a, int64_t n, const T* b, const int64_t* row_offset, T* c, int64_t ldc,
                    const T* row_bias, bool accumulate, int64_t row_begin, int64_t row_end, Activation activation) {
  EdgePanel<T> edge_b;
  gemm_blocked<T, false>(
      a.m, a.k, a.mr, n, c, ldc, row_bias, accumulate, row_begin, row_end, activation,
      [](int64_t, int64_t, int64_t, int64_t) {},
      [&](int64_t k0, int64_t kc, int64_t i0) { return APanel<T>{a.panel(k0, kc, i0), nullptr, 0}; },
      [&](int64_t k0, int64_t kc, int64_t j0) { return in_place_b_panel(n, b, row_offset, k0, kc, j0, edge_b); });
}

// A panel read in place, A[i, k] = a[column_offset[k] + i * lda], except the last one when M is
// not a multiple of MR: that one is packed (zero rows past M) into `edge`, so no read passes
// A's last row.
template <typename T>
APanel<T> in_place_a_panel(int64_t m, const T* a, int64_t lda, const int64_t* column_offset, int64_t k0, int64_t kc,
                           int64_t i0, int64_t mr, EdgePanel<T>& edge) {
  if (i0 + mr <= m) return APanel<T>{a + i0 * lda, column_offset + k0, lda};
  if (!edge.holds(k0, i0)) {
    edge.data.assign(mr * kc, T(0));
    for (int64_t kk = 0; kk < kc; ++kk)
      for (int64_t i = i0; i < m; ++i) edge.data[kk * mr + i - i0] = a[column_offset[k0 + kk] + i * lda];
  }
  return APanel<T>{edge.data.data(), nullptr, 0};
}

template <typename T>
void gemm_shifted_a(int64_t m, int64_t k, const T* a, int64_t lda, const int64_t* column_offset, int64_t n,
                    PackB<T> pack_b, T* c, int64_t ldc, T* workspace, bool accumulate, Activation activation) {
  constexpr int64_t nr = gemm_nr<T>();
  const int64_t block_cols = gemm_spec().nc;  // a block of B at the workspace's start, as in gemm()
  const int64_t mr = gemm_spec().mr;
  EdgePanel<T> edge;
  gemm_blocked<T, true>(
      m, k, mr, n, c, ldc, nullptr, accumulate, 0, -1, activation,
      [&](int64_t k0, int64_t kc, int64_t n0, int64_t nc) { pack_b(k0, kc, n0, nc, workspace); },
      [&](int64_t k0, int64_t kc, int64_t i0) {
        return in_place_a_panel(m, a, lda, column_offset, k0, kc, i0, mr, edge);
      },
      [&](int64_t, int64_t kc, int64_t j0) {
        return BPanel<T>{workspace + (j0 % block_cols) / nr * kc * nr, nullptr};
      });
}

template <typename T>
void gemm_shifted_a_packed_b(int64_t m, int64_t k, const T* a, int64_t lda, const int64_t* column_offset, int64_t n,
                             PackedBPanel<T> b_panel, T* c, int64_t ldc, bool accumulate, Activation activation) {
  const int64_t mr = wide_kernel_choice<T>().spec->mr;  // A is read in place: any MR serves
  EdgePanel<T> edge;
  gemm_blocked<T, true>(
      m, k, mr, n, c, ldc, nullptr, accumulate, 0, -1, activation, [](int64_t, int64_t, int64_t, int64_t) {},
      [&](int64_t k0, int64_t kc, int64_t i0) {
        return in_place_a_panel(m, a, lda, column_offset, k0, kc, i0, mr, edge);
      },
      [&](int64_t k0, int64_t kc, int64_t j0) { return BPanel<T>{b_panel(k0, kc, j0), nullptr}; }, nullptr,
      /*wide=*/true);
}

template <typename T>
void gemm_packed_b(const PackedA<T>& a, int64_t n, PackedBPanel<T> b_panel, T* c, int64_t ldc, bool accumulate,
                   Activation activation) {
  gemm_blocked<T, true>(
      a.m, a.k, a.mr, n, c, ldc, nullptr, accumulate, 0, -1, activation, [](int64_t, int64_t, int64_t, int64_t) {},
      [&](int64_t k0, int64_t kc, int64_t i0) { return APanel<T>{a.panel(k0, kc, i0), nullptr, 0}; },
      [&](int64_t k0, int64_t kc, int64_t j0) { return BPanel<T>{b_panel(k0, kc, j0), nullptr}; });
}

template <typename T>
void gemm_shifted_ab(int64_t m, int64_t k, const T* a, int64_t lda, const int64_t* column_offset, int64_t n, const T* b,
                     const int64_t* row_offset, T* c, int64_t ldc, const T* row_bias, bool accumulate,
                     Activation activation) {
  const int64_t mr = gemm_spec().mr;
  EdgePanel<T> edge, edge_b;
  gemm_blocked<T, false>(
      m, k, mr, n, c, ldc, row_bias, accumulate, 0, -1, activation, [](int64_t, int64_t, int64_t, int64_t) {},
      [&](int64_t k0, int64_t kc, int64_t i0) {
        return in_place_a_panel(m, a, lda, column_offset, k0, kc, i0, mr, edge);
      },
      [&](int64_t k0, int64_t kc, int64_t j0) { return in_place_b_panel(n, b, row_offset, k0, kc, j0, edge_b); });
}

template <typename T>
void gemm_offset_a_packed_b(int64_t m, int64_t k, const T* a, const int64_t* row_offset, const int64_t* column_offset,
                            int64_t n, PackedBPanel<T> b_panel, T* c, int64_t ldc, bool accumulate) {
  const int64_t mr = gemm_spec().mr;
  EdgePanel<T> edge;
  gemm_blocked<T, true>(
      m, k, mr, n, c, ldc, nullptr, accumulate, 0, -1, Activation::None, [](int64_t, int64_t, int64_t, int64_t) {},
      [&](int64_t k0, int64_t kc, int64_t i0) {
        const int64_t rows = std::min(mr, m - i0), step = rows > 1 ? row_offset[i0 + 1] - row_offset[i0] : 0;
        bool even = rows == mr;
        for (int64_t i = 2; i < rows && even; ++i) even = row_offset[i0 + i] - row_offset[i0] == i * step;
        if (even) return APanel<T>{a + row_offset[i0], column_offset + k0, step};
        if (!edge.holds(k0, i0)) {
          edge.data.assign(mr * kc, T(0));
          for (int64_t kk = 0; kk < kc; ++kk)
            for (int64_t i = 0; i < rows; ++i) edge.data[kk * mr + i] = a[row_offset[i0 + i] + column_offset[k0 + kk]];
        }
        return APanel<T>{edge.data.data(), nullptr, 0};
      },
      [&](int64_t k0, int64_t kc, int64_t j0) { return BPanel<T>{b_panel(k0, kc, j0), nullptr}; });
}

template <typename T>
void pack_b_strided(const T* b, int64_t row_stride, int64_t col_stride, int64_t k0, int64_t kc, int64_t n0, int64_t nc,
                    T* dst, int64_t first_col) {
  constexpr int64_t nr = gemm_nr<T>();
  if (col_stride == 1) {  // row by row: each row of B read as one sequential run, not one panel at a time
    for (int64_t kk = 0; kk < kc; ++kk) {
      const T* src = b + (k0 + kk) * row_stride + n0;
      for (int64_t j = 0; j < nc;) {  // pieces of the row that stay inside one panel
        const int64_t col = first_col + j, piece = std::min(nc - j, nr - col % nr);
        T* out = dst + ((col / nr) * kc + kk) * nr + col % nr;
        if (piece == nr) {
          std::memcpy(out, src + j, nr * sizeof(T));  // a fixed size: inlined as vector moves
        } else {
          std::memcpy(out, src + j, piece * sizeof(T));
        }
        j += piece;
      }
    }
    return;
  }
  for (int64_t j = 0; j < nc;) {  // pieces of columns that stay inside one panel
    const int64_t col = first_col + j, piece = std::min(nc - j, nr - col % nr);
    T* panel = dst + (col / nr) * kc * nr + col % nr;
    for (int64_t kk = 0; kk < kc; ++kk) {
      const T* src = b + (k0 + kk) * row_stride + (n0 + j) * col_stride;
      T* out = panel + kk * nr;
      for (int64_t jj = 0; jj < piece; ++jj) out[jj] = src[jj * col_stride];
    }
    j += piece;
  }
}

template <typename T>
void zero_panel_tail(int64_t kc, int64_t nc, T* dst) {
  constexpr int64_t nr = gemm_nr<T>();
  if (nc % nr == 0) return;
  T* last_panel = dst + (nc / nr) * kc * nr;
  for (int64_t kk = 0; kk < kc; ++kk) std::fill(last_panel + kk * nr + nc % nr, last_panel + (kk + 1) * nr, T(0));
}

// Row segments (gemm.h): micro-kernels of 6 to 12 rows with A read in place, one per row count,
// so a segment of a convolution's output row runs with no padding rows.
namespace {

template <typename T>
using SegmentKernel = void (*)(int64_t, const T*, const int64_t*, int64_t, const T*, T*, int64_t, int64_t, int64_t,
                               bool, Activation);
constexpr int64_t kSegmentMinMr = 6, kSegmentMaxMr = 12;

#if CNNOPS_X86
#define CNNOPS_DEFINE_SEGMENT_KERNEL(NAME, T, MR)                                                                  \
  CNNOPS_TARGET_AVX512 __attribute__((noinline)) void NAME##_edge(                                                 \
      const T* tile, T* c, int64_t ldc, int64_t mr, int64_t nr, const T* bias, bool acc, Activation act) {         \
    store_edge_tile_body<T>(tile, c, ldc, mr, nr, bias, acc, act);                                                 \
  }                                                                                                                \
  CNNOPS_TARGET_AVX512 void NAME(int64_t kc, const T* a, const int64_t* a_offsets, int64_t lda, const T* b, T* c,  \
                                 int64_t ldc, int64_t mr, int64_t nr, bool acc, Activation act) {                  \
    micro_kernel_body<T, MR, true, false, NAME##_edge>(kc, a, a_offsets, lda, b, nullptr, c, ldc, mr, nr, nullptr, \
                                                       acc, act, NextPanel{});                                     \
  }
#define CNNOPS_DEFINE_SEGMENT_KERNELS(MR)                          \
  CNNOPS_DEFINE_SEGMENT_KERNEL(segment_kernel_##MR##_f, float, MR) \
  CNNOPS_DEFINE_SEGMENT_KERNEL(segment_kernel_##MR##_d, double, MR)
CNNOPS_DEFINE_SEGMENT_KERNELS(6)
CNNOPS_DEFINE_SEGMENT_KERNELS(7)
CNNOPS_DEFINE_SEGMENT_KERNELS(8)
CNNOPS_DEFINE_SEGMENT_KERNELS(9)
CNNOPS_DEFINE_SEGMENT_KERNELS(10)
CNNOPS_DEFINE_SEGMENT_KERNELS(11)
CNNOPS_DEFINE_SEGMENT_KERNELS(12)

template <typename T>
SegmentKernel<T> segment_kernel(int64_t mr) {
  if constexpr (sizeof(T) == sizeof(float)) {
    static constexpr SegmentKernel<T> kernels[] = {segment_kernel_6_f, segment_kernel_7_f,  segment_kernel_8_f,
                                                   segment_kernel_9_f, segment_kernel_10_f, segment_kernel_11_f,
                                                   segment_kernel_12_f};
    return kernels[mr - kSegmentMinMr];
  } else {
    static constexpr SegmentKernel<T> kernels[] = {segment_kernel_6_d, segment_kernel_7_d,  segment_kernel_8_d,
                                                   segment_kernel_9_d, segment_kernel_10_d, segment_kernel_11_d,
                                                   segment_kernel_12_d};
    return kernels[mr - kSegmentMinMr];
  }
}
#endif

}  // namespace

int64_t gemm_row_segments_min_mr() { return kSegmentMinMr; }

int64_t gemm_row_segments_max_mr() {
#if CNNOPS_X86
  if (cpu_isa() == Isa::Avx512) return kSegmentMaxMr;
#endif
  return 0;
}

template <typename T>
void gemm_row_segments(int64_t mr, int64_t segments, const int64_t* a_row, const int64_t* c_row, const int64_t* rows,
                       int64_t k, const T* a, int64_t lda, const int64_t* column_offset, int64_t n,
                       PackedBPanel<T> b_panel, T* c, int64_t ldc, bool accumulate, Activation activation) {
  TORCH_INTERNAL_ASSERT(mr >= kSegmentMinMr && mr <= gemm_row_segments_max_mr(), "gemm_row_segments: mr ", mr);
#if CNNOPS_X86
  constexpr int64_t nr = gemm_nr<T>();
  const SegmentKernel<T> kernel = segment_kernel<T>(mr);
  if (k == 0) {  // empty reduction: C = init
    for (int64_t s = 0; s < segments; ++s)
      for (int64_t i = 0; i < rows[s]; ++i)
        for (int64_t j = 0; j < n; ++j) {
          T& out = c[c_row[s] + i * ldc + j];
          out = apply_activation(accumulate ? out : T(0), activation);
        }
    return;
  }
  // BLIS's order: each kKc x NR panel of B stays in L1 while the segments' A rows stream past it.
  for (int64_t k0 = 0; k0 < k; k0 += kKc) {
    const int64_t kc = std::min(kKc, k - k0);
    const bool acc = accumulate || k0 > 0;
    const Activation act = k0 + kc == k ? activation : Activation::None;  // only on final sums
    for (int64_t j0 = 0; j0 < n; j0 += nr) {
      const T* b = b_panel(k0, kc, j0);
      const int64_t nc = std::min(nr, n - j0);
      for (int64_t s = 0; s < segments; ++s)
        kernel(kc, a + a_row[s], column_offset + k0, lda, b, c + c_row[s] + j0, ldc, rows[s], nc, acc, act);
    }
  }
#endif
}

#define CNNOPS_INSTANTIATE_GEMM(T)                                                                                     \
  template PackedA<T> pack_a<T>(int64_t, int64_t, const T*, int64_t, int64_t);                                         \
  template void pack_a_rows<T>(const T*, int64_t, int64_t, int64_t, T*, int64_t);                                      \
  template PackedA<T> pack_a_panels<T>(int64_t, int64_t, ReadPanel<T>);                                                \
  template void gemm<T>(const PackedA<T>&, int64_t, PackB<T>, T*, int64_t, const T*, bool, T*, int64_t, int64_t,       \
                        Activation, const int64_t*);                                                                   \
  template void gemm_shifted_b<T>(const PackedA<T>&, int64_t, const T*, const int64_t*, T*, int64_t, const T*, bool,   \
                                  int64_t, int64_t, Activation);                                                       \
  template void gemm_shifted_a<T>(int64_t, int64_t, const T*, int64_t, const int64_t*, int64_t, PackB<T>, T*, int64_t, \
                                  T*, bool, Activation);                                                               \
  template void gemm_shifted_a_packed_b<T>(int64_t, int64_t, const T*, int64_t, const int64_t*, int64_t,               \
                                           PackedBPanel<T>, T*, int64_t, bool, Activation);                            \
  template void gemm_packed_b<T>(const PackedA<T>&, int64_t, PackedBPanel<T>, T*, int64_t, bool, Activation);          \
  template void gemm_shifted_ab<T>(int64_t, int64_t, const T*, int64_t, const int64_t*, int64_t, const T*,             \
                                   const int64_t*, T*, int64_t, const T*, bool, Activation);                           \
  template void gemm_offset_a_packed_b<T>(int64_t, int64_t, const T*, const int64_t*, const int64_t*, int64_t,         \
                                          PackedBPanel<T>, T*, int64_t, bool);                                         \
  template void pack_b_strided<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T*, int64_t);        \
  template void zero_panel_tail<T>(int64_t, int64_t, T*);
CNNOPS_INSTANTIATE_GEMM(float)
CNNOPS_INSTANTIATE_GEMM(double)
#define CNNOPS_INSTANTIATE_ROW_SEGMENTS(T)                                                                           \
  template void gemm_row_segments<T>(int64_t, int64_t, const int64_t*, const int64_t*, const int64_t*, int64_t,      \
                                     const T*, int64_t, const int64_t*, int64_t, PackedBPanel<T>, T*, int64_t, bool, \
                                     Activation);
CNNOPS_INSTANTIATE_ROW_SEGMENTS(float)
CNNOPS_INSTANTIATE_ROW_SEGMENTS(double)

}  // namespace cpu
}  // namespace cnnops

// No tensor arguments, so no backend key: CompositeExplicitAutograd serves every call.
TORCH_LIBRARY_IMPL(cnnops, CompositeExplicitAutograd, m) {
  m.impl("cpu_gemm_isa", [] { return std::string(cnnops::cpu::gemm_isa()); });
}
