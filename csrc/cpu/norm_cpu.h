#pragma once
// CPU normalization: the vectorized inner loops shared by batch, layer and group norm, and the
// host helpers around them.
//
// Two memory layouts, each with its own loops:
//  * spans: a contiguous run of values sharing one mean/invstd (an NCHW plane, an NCHW group
//    of C/G planes, a layer-norm row). Welford runs in independent SIMD lanes that all see the
//    same count (so one reciprocal serves them all), merged at the end by Chan's formula as a
//    tree of equal-count pairs; a tail shorter than the lanes is merged in once.
//  * rows: channels-last data, rows of C contiguous channels (one row per (n, spatial
//    position)). Each channel is a SIMD lane; all lanes share the row count.
//
// The loops are compiled for AVX-512, AVX2 and baseline x86-64 (simd_dispatch, simd.h) and
// cpu_isa() picks one (CNNOPS_CPU_ISA caps it). Every reduction runs over a fixed partition of
// the data (plane, fixed-size chunk or row block, never "one piece per thread") merged in a
// fixed order, so the results are bitwise the same for any thread count.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "common/norm_math.h"
#include "common/welford.h"

namespace cnnops {
namespace cpu {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Fixed partition sizes (independent of the thread count, see above).
constexpr int64_t kSpanChunk = 16384;            // values per partial Welford of a long span
constexpr int64_t kMaxRowBlocks = 256;           // row blocks per channels-last reduction, at most
constexpr int64_t kParallelGrainValues = 32768;  // values per parallel task, at least

// Rows per block of a channels-last reduction over `rows` rows: depends on the sizes only.
// At most kMaxRowBlocks blocks, each of at least kParallelGrainValues / (2 C) rows (so merging
// the partial results stays cheap beside the pass over the data).
inline int64_t rows_per_block(int64_t rows, int64_t C) {
  int64_t per = ceil_div(rows, kMaxRowBlocks);
  const int64_t min_rows = C > 0 ? kParallelGrainValues / 2 / C : rows;
  if (per < min_rows) per = min_rows;
  return per < 1 ? 1 : per;
}

// The fixed partition of a channels-last reduction over `rows` rows of C values (batch norm:
// all N x spatial rows; group norm: the spatial rows of one image).
struct RowBlocks {
  int64_t rows, per_block, count;
  RowBlocks(int64_t rows_, int64_t C) : rows(rows_), per_block(rows_per_block(rows_, C)) {
    count = ceil_div(rows, per_block);
  }
  int64_t begin(int64_t b) const { return b * per_block; }
  int64_t size(int64_t b) const { return std::min(per_block, rows - b * per_block); }
};

// Parallel grain in items of `values_per_item` values each.
inline int64_t grain_for(int64_t values_per_item) {
  const int64_t v = values_per_item > 0 ? values_per_item : 1;
  const int64_t g = kParallelGrainValues / v;
  return g < 1 ? 1 : g;
}

// ---- spans (contiguous, one mean/invstd) --------------------------------------------------

// Mean and M2 of x[0, n).
template <typename scalar_t>
Welford<acc_type<scalar_t>> welford_span(const scalar_t* x, int64_t n);

// y = (x - mean) * scale + bias.
template <typename scalar_t>
void normalize_span(const scalar_t* x, scalar_t* y, int64_t n, acc_type<scalar_t> mean, acc_type<scalar_t> scale,
                    acc_type<scalar_t> bias);

// sum(dy) and sum(dy * (x - mean)) over [0, n).
template <typename scalar_t>
void grad_sums_span(const scalar_t* dy, const scalar_t* x, int64_t n, acc_type<scalar_t> mean,
                    acc_type<scalar_t>* sum_dy, acc_type<scalar_t>* sum_dy_xmu);

// dx = invstd * (w * dy + coef_g) + coef_xmu * (x - mean) (see norm_math.h; both coefficients
// 0: eval mode, x is not read).
template <typename scalar_t>
void input_grad_span(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, acc_type<scalar_t> w,
                     acc_type<scalar_t> invstd, acc_type<scalar_t> mean, acc_type<scalar_t> coef_g,
                     acc_type<scalar_t> coef_xmu);

// ---- layer-norm rows (contiguous, per-column affine) ---------------------------------------

// g = w * dy: sum(g) and sum(g * (x - mean)).
template <typename scalar_t>
void layer_norm_row_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t n, acc_type<scalar_t> mean,
                              const acc_type<scalar_t>* w, acc_type<scalar_t>* sum_g, acc_type<scalar_t>* sum_g_xmu);

// dx = invstd * (w * dy + coef_g) + coef_xmu * (x - mean), w per column (null: 1).
template <typename scalar_t>
void layer_norm_row_input_grad(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, acc_type<scalar_t> mean,
                               acc_type<scalar_t> invstd, const acc_type<scalar_t>* w, acc_type<scalar_t> coef_g,
                               acc_type<scalar_t> coef_xmu);

// dw[k] += dy * (x - mean) * invstd, db[k] += dy.
template <typename scalar_t>
void layer_norm_row_param_grad(const scalar_t* dy, const scalar_t* x, int64_t n, acc_type<scalar_t> mean,
                               acc_type<scalar_t> invstd, acc_type<scalar_t>* dw, acc_type<scalar_t>* db);

// Rows [0, rows) of n values each: forward with Welford per row (mean/invstd written), and
// backward (dx may be null; dw/db accumulate, both null or both given).
template <typename scalar_t>
void layer_norm_rows_forward(const scalar_t* x, scalar_t* y, int64_t rows, int64_t n, acc_type<scalar_t> eps,
                             const acc_type<scalar_t>* w, const acc_type<scalar_t>* b, acc_type<scalar_t>* mean_out,
                             acc_type<scalar_t>* invstd_out);
template <typename scalar_t>
void layer_norm_rows_backward(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t rows, int64_t n,
                              const acc_type<scalar_t>* mean, const acc_type<scalar_t>* invstd,
                              const acc_type<scalar_t>* w, acc_type<scalar_t>* dw, acc_type<scalar_t>* db);

// ---- channels-last rows (C channels per row, per-channel lanes) ----------------------------

// Per-channel Welford over `rows` rows of C values (row r at x + r * C): mean[c], m2[c], all
// with count = rows.
template <typename scalar_t>
void welford_rows(const scalar_t* x, int64_t rows, int64_t C, acc_type<scalar_t>* mean, acc_type<scalar_t>* m2);

// y = (x - mean[c]) * scale[c] + bias[c].
template <typename scalar_t>
void normalize_rows(const scalar_t* x, scalar_t* y, int64_t rows, int64_t C, const acc_type<scalar_t>* mean,
                    const acc_type<scalar_t>* scale, const acc_type<scalar_t>* bias);

// sum_dy[c] = sum(dy), sum_dy_xmu[c] = sum(dy * (x - mean[c])) over the rows (overwritten).
template <typename scalar_t>
void grad_sums_rows(const scalar_t* dy, const scalar_t* x, int64_t rows, int64_t C, const acc_type<scalar_t>* mean,
                    acc_type<scalar_t>* sum_dy, acc_type<scalar_t>* sum_dy_xmu);

// dx = invstd[c] * (w[c] * dy + coef_g[c]) + coef_xmu[c] * (x - mean[c]).
template <typename scalar_t>
void input_grad_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t rows, int64_t C,
                     const acc_type<scalar_t>* w, const acc_type<scalar_t>* invstd, const acc_type<scalar_t>* mean,
                     const acc_type<scalar_t>* coef_g, const acc_type<scalar_t>* coef_xmu);

// ---- host helpers --------------------------------------------------------------------------

// A parameter vector (weight, bias, running stat) in the accumulate type; `fill` where absent.
// The parameter's dtype is the input's or float (checked before).
template <typename acc_t>
std::vector<acc_t> load_param(const c10::optional<at::Tensor>& param, int64_t n, acc_t fill);

// Writes values into a 1-d parameter tensor of the input's dtype or float, in place.
template <typename acc_t>
void store_param(at::Tensor& param, const std::vector<acc_t>& values);

// Whether a batch/group norm input runs the channels-last (rows) kernels: a 4-d/5-d input whose
// suggested memory format is channels_last. Inputs without spatial extent (N x C, or S == 1)
// are rows of C values in either layout.
bool use_rows_layout(const at::Tensor& input, int64_t spatial);

// The input made dense in the layout its kernel reads.
at::Tensor dense_for_layout(const at::Tensor& t, bool rows_layout);

// ---- the ops (each registered at the end of its file) -----------------------------------

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

TensorTriple batch_norm_forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var, bool training, double momentum,
                                double eps);
TensorTriple batch_norm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                 const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& invstd, bool training, std::array<bool, 3> output_mask);
TensorTriple layer_norm_forward(const at::Tensor& input, c10::IntArrayRef normalized_shape,
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                double eps);
TensorTriple layer_norm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                 c10::IntArrayRef normalized_shape, const at::Tensor& mean, const at::Tensor& invstd,
                                 const c10::optional<at::Tensor>& weight, std::array<bool, 3> output_mask);
TensorTriple group_norm_forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps);
TensorTriple group_norm_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& invstd, const c10::optional<at::Tensor>& weight, int64_t num_groups,
                                 std::array<bool, 3> output_mask);

}  // namespace cpu
}  // namespace cnnops

// ---- SyncBatchNorm pieces (sync_batch_norm.cpp) -----------------------------------------

namespace cnnops {
namespace cpu {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

TensorPair batch_norm_stats(const at::Tensor& input);
at::Tensor batch_norm_elemt(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd);
at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                                     const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, int64_t count);

}  // namespace cpu
}  // namespace cnnops
