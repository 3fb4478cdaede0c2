#pragma once
// Our own cache-blocked GEMM for the convolution kernels: C = init + A * B.
//
// Blocking follows BLIS: the reduction dim is cut into blocks of kKc, A is packed once into
// row panels of MR rows (MR depends on the SIMD width picked at run time), and B is packed
// block by block (spec.nc columns by kKc rows, sized for L2) into column panels of NR columns by
// a caller-supplied packer, which lets convolution write im2col columns straight into the panel
// instead of materialising im2col. A register-tiled MR x NR micro-kernel does the arithmetic,
// over spec.mc rows of A at a time (an L2-sized block).
#include <c10/util/FunctionRef.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "common/activation.h"
#include "cpu/scratch.h"

namespace cnnops {
namespace cpu {

// Reduction block of every spec below: an MR x kKc A panel and a kKc x NR B panel fit L1.
constexpr int64_t kKc = 256;

template <typename T>
constexpr int64_t gemm_nr() {  // columns per B panel: two 64-byte vectors
  return 128 / sizeof(T);
}

// One micro-kernel per ISA, described by its spec; gemm.cpp instantiates the micro-kernel from
// it, packing, blocking, the workspace size and the tests read it, nothing restates it.
// MR x 2 vectors of accumulators plus 2 B vectors must fit the register file (32 zmm for
// AVX-512; 16 ymm for AVX2, where a 64-byte vector takes two). AVX-512 uses 8 rather than the 12
// that would fit: channel counts are multiples of 8, so no panel computes padding rows.
struct GemmSpec {
  const char* name;  // what cpu_gemm_isa() reports
  int mr;            // rows of A per packed panel and per micro-kernel call (float and double)
  int64_t kc;        // reduction block
  int64_t mc;        // rows of A per L2 block (a multiple of mr): an mc x kc block of A stays in L2
  int64_t nc;        // columns of B per L2 block (a multiple of NR): a kc x nc block of B stays in L2;
                     // gemm_spec() narrows it on CPUs with a smaller L2 (gemm.cpp, fit_to_l2)
  template <typename T>
  constexpr int64_t nr() const {  // columns per B panel: two 64-byte vectors on every ISA
    return gemm_nr<T>();
  }
};
constexpr GemmSpec kGemmAvx512{"avx512", 8, kKc, 384, 512};
// gemm_shifted_a_packed_b's micro-kernel on AVX-512: its rows are output positions, not channels,
// so 12 rows (24 accumulators) waste nothing and load A and B less per FMA than 8.
constexpr GemmSpec kGemmAvx512Wide{"avx512", 12, kKc, 384, 512};
constexpr GemmSpec kGemmAvx2{"avx2", 3, kKc, 384, 512};
constexpr GemmSpec kGemmPortable{"portable", 2, kKc, 384, 512};
constexpr int kGemmMaxMr = std::max({kGemmAvx512.mr, kGemmAvx2.mr, kGemmPortable.mr});  // fixed-size row arrays

// The spec of the micro-kernel this CPU runs (cpu_isa(), which CNNOPS_CPU_ISA caps), its nc fitted
// to this CPU's L2.
const GemmSpec& gemm_spec();
// This CPU's L2 cache per core in bytes as the C library reports it (0 when it does not), or the
// environment's CNNOPS_CPU_L2_BYTES (read once; tests run the GEMM with another CPU's blocks).
int64_t l2_cache_bytes();

// Fills dst with B[k0 : k0+kc, n0 : n0+nc] as ceil(nc / NR) panels, each kc rows of NR values,
// zero padded past nc (zero_panel_tail). The GEMM asks for one L2 block of columns at a time
// (spec.nc; n0 a multiple of NR), so a packer must honour n0.
template <typename T>
using PackB = c10::function_ref<void(int64_t k0, int64_t kc, int64_t n0, int64_t nc, T* dst)>;

// A (M x K) packed once and reused for many B blocks: per kKc block, ceil(M / mr) panels of
// kc x mr values, zero padded past M.
template <typename T>
struct PackedA {
  int64_t m = 0, k = 0, mr = 0;
  OperandVector<T> data;
  const T* panel(int64_t k0, int64_t kc, int64_t m0) const {
    const int64_t padded_m = ceil_div(m, mr) * mr;
    return data.data() + k0 * padded_m + m0 * kc;
  }
};

// Writes one A panel: rows [i0, i0 + rows) x columns [k0, k0 + kc) to dst[kk * mr + i] (rows up
// to mr, the rest of the panel already zero).
template <typename T>
using ReadPanel = c10::function_ref<void(int64_t i0, int64_t rows, int64_t k0, int64_t kc, T* dst, int64_t mr)>;

// A packed panel by panel by a reader: lets convolution pack channels-last im2col rows directly.
template <typename T>
PackedA<T> pack_a_panels(int64_t m, int64_t k, ReadPanel<T> read_panel);

// One panel of a row-major A: dst[kk * mr + i] = a[i * lda + kk] for i < rows (<= mr), kk < kc.
// Rows past `rows` are left as they are (zero them first where a panel is partial).
template <typename T>
void pack_a_rows(const T* a, int64_t lda, int64_t rows, int64_t kc, T* dst, int64_t mr);

// A[i, j] = a[i * row_stride + j * col_stride]: a transposed view costs nothing.
template <typename T>
PackedA<T> pack_a(int64_t m, int64_t k, const T* a, int64_t row_stride, int64_t col_stride);

// C[M, N] (row stride ldc) = activation(init + A * B), where init is C itself when accumulate,
// else row_bias[i] for row i when row_bias is given, else 0. The activation is applied by the
// micro-kernel as it writes the last reduction block, so it costs no pass of its own.
// `workspace` must hold gemm_workspace_size<T>(n) values. Only rows [row_begin, row_end) are
// computed (row_begin a multiple of a.mr, row_end -1 for all): splitting M lets threads share a
// GEMM whose A is large and whose N is small. C's columns are contiguous unless
// c_panel_offset is given: then the NR columns of panel p start at c + c_panel_offset[p], which
// lets a convolution write a block of columns that spans samples straight into each sample.
template <typename T>
void gemm(const PackedA<T>& a, int64_t n, PackB<T> pack_b, T* c, int64_t ldc, const T* row_bias, bool accumulate,
          T* workspace, int64_t row_begin = 0, int64_t row_end = -1, Activation activation = Activation::None,
          const int64_t* c_panel_offset = nullptr);

// The same product with B read in place, no packing: B[k, j] = b[row_offset[k] + j]. Reads stay
// inside columns [0, n) of each row (a last, partial NR panel is copied). This is how the
// stride-1 convolution reads its shifted-window im2col rows straight from the padded input.
template <typename T>
void gemm_shifted_b(const PackedA<T>& a, int64_t n, const T* b, const int64_t* row_offset, T* c, int64_t ldc,
                    const T* row_bias, bool accumulate, int64_t row_begin = 0, int64_t row_end = -1,
                    Activation activation = Activation::None);

// C[M, N] = A * B with A read in place, A[i, k] = a[column_offset[k] + i * lda], and B packed
// as in gemm(). The channels-last stride-1 convolution reads its shifted-window im2col rows this
// way, and the weight gradient its dY rows. Reads stay inside A's rows [0, M) (the last, partial
// panel is packed). C = A * B, or C + A * B when accumulate; the activation goes on as the last
// reduction block is written.
template <typename T>
void gemm_shifted_a(int64_t m, int64_t k, const T* a, int64_t lda, const int64_t* column_offset, int64_t n,
                    PackB<T> pack_b, T* c, int64_t ldc, T* workspace, bool accumulate = false,
                    Activation activation = Activation::None);

// B already packed as gemm()'s packers write it, read where it lies: the panels of reduction block
// k0 (kc rows, blocks of gemm_spec().kc) that hold columns [j0, j0 + NR) start at
// panel(k0, kc, j0), zero past N. For weights packed once per call (or cached), where copying them
// into the workspace for every block of rows would cost a pass over K x N values each time.
template <typename T>
using PackedBPanel = c10::function_ref<const T*(int64_t k0, int64_t kc, int64_t j0)>;

// gemm_shifted_a with B's panels read in place (PackedBPanel): no workspace.
template <typename T>
void gemm_shifted_a_packed_b(int64_t m, int64_t k, const T* a, int64_t lda, const int64_t* column_offset, int64_t n,
                             PackedBPanel<T> b_panel, T* c, int64_t ldc, bool accumulate = false,
                             Activation activation = Activation::None);

// gemm() with B's panels read in place (PackedBPanel): no workspace.
template <typename T>
void gemm_packed_b(const PackedA<T>& a, int64_t n, PackedBPanel<T> b_panel, T* c, int64_t ldc, bool accumulate,
                   Activation activation = Activation::None);

// C[M, N] (row stride ldc) = activation(init + A * B) with both operands read in place, no
// packing: A as in gemm_shifted_a (a transposed or rotated weight read where it lies), B as in
// gemm_shifted_b; init as in gemm(). For products with few columns (small maps, batch 1), where
// packing A would cost as much as the product.
template <typename T>
void gemm_shifted_ab(int64_t m, int64_t k, const T* a, int64_t lda, const int64_t* column_offset, int64_t n, const T* b,
                     const int64_t* row_offset, T* c, int64_t ldc, const T* row_bias, bool accumulate,
                     Activation activation = Activation::None);

// C[M, N] (row stride ldc) = A * B, or C + A * B when accumulate, with A an im2col-shaped matrix
// read where it lies, A[i, k] = a[row_offset[i] + column_offset[k]], and B's panels read in place
// (PackedBPanel). A panel whose MR rows are evenly spaced is read in place, any other (the last,
// partial one) is packed. For the weight gradient with few output channels: there B (dY^T) is the
// small operand, packed once, and A (the input) would be used by only one or two B panels.
template <typename T>
void gemm_offset_a_packed_b(int64_t m, int64_t k, const T* a, const int64_t* row_offset, const int64_t* column_offset,
                            int64_t n, PackedBPanel<T> b_panel, T* c, int64_t ldc, bool accumulate);

// Rows per A panel of the micro-kernel this CPU runs: gemm_spec().mr.
template <typename T>
int64_t gemm_mr();

// Values of gemm()'s workspace: one kKc x spec.nc block of packed B (less for a narrower B).
template <typename T>
int64_t gemm_workspace_size(int64_t n) {
  const int64_t nr = gemm_nr<T>();
  return kKc * std::min(ceil_div(n, nr) * nr, gemm_spec().nc);
}

// Packer for a plain strided B: B[k, n] = b[k * row_stride + n * col_stride], rows
// [k0, k0 + kc) and columns [n0, n0 + nc) placed at panel columns [first_col, first_col + nc).
template <typename T>
void pack_b_strided(const T* b, int64_t row_stride, int64_t col_stride, int64_t k0, int64_t kc, int64_t n0, int64_t nc,
                    T* dst, int64_t first_col = 0);

// Zeroes the padding columns [nc, NR * ceil(nc / NR)) of a packed B block of kc rows; a packer
// calls it once it has placed all nc columns.
template <typename T>
void zero_panel_tail(int64_t kc, int64_t nc, T* dst);

// Which micro-kernel the CPU runs ("avx512", "avx2" or "portable"), for benchmarks and tests.
const char* gemm_isa();

// Benchmark hook (cnnops._C.gemm_micro_kernel): thread CPU seconds of `reps` calls of the float32
// micro-kernel of gemm() (wide: gemm_shifted_a_packed_b's) on one A panel (mr x kc) and one B panel
// (kc x NR) that stay in L1, accumulating into one mr x NR tile: the kernel without packing or
// blocking. Sets *mr to the kernel's rows.
double gemm_micro_kernel_seconds(bool wide, int64_t kc, int64_t reps, int64_t* mr);

}  // namespace cpu
}  // namespace cnnops
