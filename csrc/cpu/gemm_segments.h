#pragma once
// Row segments: a GEMM whose rows come in short runs, each computed by a micro-kernel of exactly
// its row count (gemm.cpp), for channels-last convolutions whose output rows are short (narrow
// maps) or strided (grad input by stride phases, conv_nhwc.cpp).
#include <cstdint>

#include "common/activation.h"
#include "cpu/gemm.h"

namespace cnnops {
namespace cpu {

// C = A * B (or C + A * B when accumulate) over `segments` runs of rows,
// segment s holding rows[s] <= mr rows with A[i, k] = a[a_row[s] + i * lda + column_offset[k]] and
// C[i, j] = c[c_row[s] + i * ldc + j]; B's panels read in place (PackedBPanel, kKc reduction blocks).
// A micro-kernel of exactly mr rows runs each segment, so a channels-last convolution computes only
// its real output positions (one output row split into equal segments) instead of a grid's padded
// rows. A segment reads mr rows of A even when it holds fewer (the caller provides slack).
// mr in [gemm_row_segments_min_mr(), gemm_row_segments_max_mr()]; AVX-512 only (max 0 elsewhere).
int64_t gemm_row_segments_min_mr();
int64_t gemm_row_segments_max_mr();
template <typename T>
void gemm_row_segments(int64_t mr, int64_t segments, const int64_t* a_row, const int64_t* c_row, const int64_t* rows,
                       int64_t k, const T* a, int64_t lda, const int64_t* column_offset, int64_t n,
                       PackedBPanel<T> b_panel, T* c, int64_t ldc, bool accumulate,
                       Activation activation = Activation::None);

}  // namespace cpu
}  // namespace cnnops
