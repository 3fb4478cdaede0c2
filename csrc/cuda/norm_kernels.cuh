#pragma once
// CUDA kernels of batch, layer and group norm. Every normalization is built from four pieces:
//
//  1. a first-stage reduction over one of two views of the input, writing one partial result
//     per (block, chunk) to a buffer:
//       planes:  [outer][channels][inner], reduce per channel over (outer, inner); a block per
//                (channel, chunk), threads along inner (NCHW batch norm, rows of layer norm,
//                (n, group) rows of NCHW group norm);
//       columns: [batch][rows][cols], reduce per (batch, col) over rows; threads along cols,
//                so a warp reads consecutive channels (NHWC batch and group norm, the weight
//                and bias gradients of layer norm);
//  2. a second-stage kernel merging the partials of each statistic in a fixed order;
//  3. small per-statistic kernels turning sums into coefficients;
//  4. an elementwise kernel (normalize, or grad_input).
// The reductions are Welford (mean, m2, count) merged with Chan's formula (statistics), or
// pairs of sums (gradients). Every merge happens in a fixed tree (warp shuffles, then shared
// memory), so results are bitwise reproducible and no atomics are needed.
#include <cstdint>

#include "../common/norm_cuda_math.h"
#include "../common/norm_math.h"
#include "../common/welford.h"

namespace cnnops {
namespace norm {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kElementwiseThreads = 256;

// ---------------------------------------------------------------------------------------------
// Reduction states: merge() and a warp shuffle for each.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> shfl_down(const Welford<acc_t>& w, int offset) {
  Welford<acc_t> o;
  o.mean = __shfl_down_sync(kFullMask, w.mean, offset);
  o.m2 = __shfl_down_sync(kFullMask, w.m2, offset);
  o.count = __shfl_down_sync(kFullMask, w.count, offset);
  return o;
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> shfl_down(const SumPair<acc_t>& s, int offset) {
  SumPair<acc_t> o;
  o.a = __shfl_down_sync(kFullMask, s.a, offset);
  o.b = __shfl_down_sync(kFullMask, s.b, offset);
  return o;
}

// Fixed-shape tree over a 1-d block (blockDim.x a multiple of 32, at most 1024): a shuffle tree
// inside each warp, then the warps' results in shared memory, reduced by warp 0 the same way.
// The result is valid in thread 0. `smem` holds 32 states.
template <typename State>
__device__ __forceinline__ State block_reduce(State s, State* smem) {
  for (int offset = 16; offset > 0; offset >>= 1) s.merge(shfl_down(s, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < static_cast<int>(blockDim.x / 32) ? smem[lane] : State{};
    for (int offset = 16; offset > 0; offset >>= 1) s.merge(shfl_down(s, offset));
  }
  return s;
}

// States have default member initializers, which __shared__ variables may not have: raw storage.
template <typename State, int n>
struct SharedStates {
  alignas(State) unsigned char raw[n * sizeof(State)];
  __device__ __forceinline__ State* get() { return reinterpret_cast<State*>(raw); }
};

// ---------------------------------------------------------------------------------------------
// Stage 1: partial reductions.
// ---------------------------------------------------------------------------------------------

// Planes view [outer][channels][inner]: block (blockIdx.x = channel, blockIdx.y = chunk) reduces
// the flattened (n, l) range [chunk * chunk_len, +chunk_len) of its channel, each thread a
// strided share. Writes partial[channel * gridDim.y + chunk].
template <typename Op, typename acc_t, typename index_t>
__global__ void reduce_planes_kernel(Op op, acc_t* partial, index_t outer, index_t channels, index_t inner,
                                     index_t chunk_len, int64_t partial_count) {
  using State = typename Op::State;
  __shared__ SharedStates<State, 32> shared;
  const index_t c = static_cast<index_t>(blockIdx.x);
  const index_t total = outer * inner;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk_len;
  const index_t len = total - begin < chunk_len ? total - begin : chunk_len;
  State s;
  if (static_cast<index_t>(threadIdx.x) < len) {
    PlaneCursor<index_t> cur(begin + static_cast<index_t>(threadIdx.x), inner, static_cast<index_t>(blockDim.x));
    for (index_t j = threadIdx.x; j < len; j += blockDim.x) {
      op.plane(s, cur.offset(c, channels), c, cur.l);
      cur.advance();
    }
  }
  s = block_reduce(s, shared.get());
  if (threadIdx.x == 0) store_state(s, partial, static_cast<int64_t>(c) * gridDim.y + blockIdx.y, partial_count);
}

// Columns view [batch][rows][cols]: block (blockIdx.x = 32 columns, blockIdx.y = chunk of rows,
// blockIdx.z = batch, striding by gridDim.z); thread (tx, ty) reduces column tx over rows
// ty, ty + 8, ... of the chunk, then the 8 row-partials of each column merge in a fixed tree.
// Writes partial[(b * gridDim.y + chunk) * cols + col].
template <typename Op, typename acc_t, typename index_t>
__global__ void reduce_columns_kernel(Op op, acc_t* partial, index_t batch, index_t rows, index_t cols,
                                      index_t chunk_len, int64_t partial_count) {
  using State = typename Op::State;
  __shared__ SharedStates<State, kColumnThreadsX * kColumnThreadsY> shared;
  State* smem = shared.get();
  const int tx = threadIdx.x, ty = threadIdx.y;
  const index_t col = static_cast<index_t>(blockIdx.x) * kColumnThreadsX + tx;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk_len;
  const index_t end = begin + (rows - begin < chunk_len ? rows - begin : chunk_len);
  for (index_t b = blockIdx.z; b < batch; b += gridDim.z) {
    State s;
    if (col < cols) {
      for (index_t r = begin + ty; r < end; r += kColumnThreadsY) op.column(s, (b * rows + r) * cols + col, b, r, col);
    }
    smem[ty * kColumnThreadsX + tx] = s;
    __syncthreads();
    for (int half = kColumnThreadsY / 2; half > 0; half /= 2) {
      if (ty < half) smem[ty * kColumnThreadsX + tx].merge(smem[(ty + half) * kColumnThreadsX + tx]);
      __syncthreads();
    }
    if (ty == 0 && col < cols)
      store_state(smem[tx], partial, (static_cast<int64_t>(b) * gridDim.y + blockIdx.y) * cols + col, partial_count);
    __syncthreads();  // smem is reused for the next b
  }
}

// ---------------------------------------------------------------------------------------------
// Stage 2: merge partials in a fixed order (PartialIndex), one thread per statistic.
// ---------------------------------------------------------------------------------------------

// Statistics: mean, invstd = 1 / sqrt(biased var + eps); with running stats (batch norm
// training) also running = (1 - momentum) * running + momentum * batch (unbiased variance);
// running_mean and running_var are given together.
// count == 0 (an empty batch) leaves the running stats alone, as torch does.
template <typename acc_t, typename param_t>
__global__ void welford_finalize_kernel(const acc_t* partial, int64_t partial_count, PartialIndex pi, int64_t outputs,
                                        acc_t* mean, acc_t* invstd, param_t* running_mean, param_t* running_var,
                                        acc_t momentum, acc_t eps) {
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < outputs;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Welford<acc_t> w = merge_partials<Welford<acc_t>>(partial, partial_count, pi, o);
    // No values (an empty batch): mean 0 and variance 0, as the CPU kernels return.
    mean[o] = w.mean;
    invstd[o] = norm_invstd(w.biased_variance(), eps);
    if (running_mean != nullptr && w.count > 0) {
      running_mean[o] =
          static_cast<param_t>(running_stat_update(static_cast<acc_t>(running_mean[o]), w.mean, momentum));
      running_var[o] = static_cast<param_t>(
          running_stat_update(static_cast<acc_t>(running_var[o]), w.unbiased_variance(), momentum));
    }
  }
}

// Merged Welford partials of each channel: mean and m2 (the ranks merge these with Chan's
// formula; an empty batch gives zeros).
template <typename acc_t>
__global__ void welford_mean_m2_kernel(const acc_t* partial, int64_t partial_count, PartialIndex pi, int64_t outputs,
                                       acc_t* mean, acc_t* m2) {
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < outputs;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Welford<acc_t> w = merge_partials<Welford<acc_t>>(partial, partial_count, pi, o);
    mean[o] = w.mean;
    m2[o] = w.m2;
  }
}

// Batch norm eval: the running statistics are the statistics.
template <typename acc_t, typename param_t>
__global__ void running_stats_kernel(const param_t* running_mean, const param_t* running_var, int64_t channels,
                                     acc_t* mean, acc_t* invstd, acc_t eps) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    mean[c] = static_cast<acc_t>(running_mean[c]);
    invstd[c] = norm_invstd(static_cast<acc_t>(running_var[c]), eps);
  }
}

// Gradient sums: sum_a[o], sum_b[o].
template <typename acc_t>
__global__ void sums_finalize_kernel(const acc_t* partial, int64_t partial_count, PartialIndex pi, int64_t outputs,
                                     acc_t* sum_a, acc_t* sum_b) {
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < outputs;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const SumPair<acc_t> s = merge_partials<SumPair<acc_t>>(partial, partial_count, pi, o);
    sum_a[o] = s.a;
    sum_b[o] = s.b;
  }
}

// ---------------------------------------------------------------------------------------------
// Stage 3: the coefficients of grad_input, coef_g and coef_xmu per statistic (norm_math.h's
// norm_input_grad_coef, the CPU kernels' convention), and the weight / bias gradients.
// ---------------------------------------------------------------------------------------------

// Batch norm, per channel, with sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)) over count
// elements: dbias = sum_dy, dweight = invstd * sum_dy_xmu = sum(dy * xhat); training: the
// coefficients of g = w * dy, whose sums are w times these.
template <typename acc_t, typename param_t>
__global__ void batch_norm_coeffs_kernel(const acc_t* sum_dy, const acc_t* sum_dy_xmu, const acc_t* invstd,
                                         const param_t* weight, int64_t channels, acc_t count, param_t* grad_weight,
                                         param_t* grad_bias, acc_t* coef_g, acc_t* coef_xmu) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (grad_weight != nullptr) grad_weight[c] = static_cast<param_t>(norm_weight_grad(invstd[c], sum_dy_xmu[c]));
    if (grad_bias != nullptr) grad_bias[c] = static_cast<param_t>(sum_dy[c]);
    if (coef_g != nullptr) {
      const acc_t w = weight != nullptr ? static_cast<acc_t>(weight[c]) : acc_t(1);
      InputGradCoef<acc_t> coef{acc_t(0), acc_t(0)};
      if (count > 0) coef = norm_input_grad_coef(invstd[c], w * sum_dy[c], w * sum_dy_xmu[c], count);
      coef_g[c] = coef.coef_g;
      coef_xmu[c] = coef.coef_xmu;
    }
  }
}

// Layer norm, per row, with sum_g = sum(dy * w), sum_g_xmu = sum(dy * w * (x - mean)) over the
// count values of a row.
template <typename acc_t>
__global__ void layer_norm_coeffs_kernel(const acc_t* sum_g, const acc_t* sum_g_xmu, const acc_t* invstd, int64_t rows,
                                         acc_t count, acc_t* coef_g, acc_t* coef_xmu) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const InputGradCoef<acc_t> coef = norm_input_grad_coef(invstd[r], sum_g[r], sum_g_xmu[r], count);
    coef_g[r] = coef.coef_g;
    coef_xmu[r] = coef.coef_xmu;
  }
}

// Layer norm weight / bias: column sums already merged (sum_a = dbias, sum_b = dweight).
template <typename acc_t, typename param_t>
__global__ void cast_pair_kernel(const acc_t* sum_a, const acc_t* sum_b, int64_t count, param_t* grad_weight,
                                 param_t* grad_bias) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (grad_weight != nullptr) grad_weight[i] = static_cast<param_t>(sum_b[i]);
    if (grad_bias != nullptr) grad_bias[i] = static_cast<param_t>(sum_a[i]);
  }
}

// Group norm, per (n, g), from per-(n, c) sums sum_a = sum_l dy, sum_b = sum_l dy * (x - mean)
// over the D = C / G channels of the group, count = D * spatial elements:
// sum_g = sum_c w[c] * sum_a[n, c], sum_g_xmu = sum_c w[c] * sum_b[n, c].
template <typename acc_t, typename param_t>
__global__ void group_norm_coeffs_kernel(const acc_t* sum_a, const acc_t* sum_b, const acc_t* invstd,
                                         const param_t* weight, int64_t batch, int64_t channels, int64_t groups,
                                         acc_t count, acc_t* coef_g, acc_t* coef_xmu) {
  const int64_t d_count = channels / groups;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < batch * groups;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = o / groups, g = o % groups;
    acc_t a = 0, b = 0;
    for (int64_t d = 0; d < d_count; ++d) {
      const int64_t c = g * d_count + d;
      const acc_t w = weight != nullptr ? static_cast<acc_t>(weight[c]) : acc_t(1);
      a += w * sum_a[n * channels + c];
      b += w * sum_b[n * channels + c];
    }
    const InputGradCoef<acc_t> coef = norm_input_grad_coef(invstd[o], a, b, count);
    coef_g[o] = coef.coef_g;
    coef_xmu[o] = coef.coef_xmu;
  }
}

// Group norm weight / bias, per channel: dbias = sum_n sum_a[n, c],
// dweight = sum_n sum_b[n, c] * invstd[n, g(c)], n in order.
template <typename acc_t, typename param_t>
__global__ void group_norm_param_grads_kernel(const acc_t* sum_a, const acc_t* sum_b, const acc_t* invstd,
                                              int64_t batch, int64_t channels, int64_t groups, param_t* grad_weight,
                                              param_t* grad_bias) {
  const int64_t d_count = channels / groups;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t a = 0, b = 0;
    for (int64_t n = 0; n < batch; ++n) {
      a += sum_a[n * channels + c];
      b += sum_b[n * channels + c] * invstd[n * groups + c / d_count];
    }
    if (grad_weight != nullptr) grad_weight[c] = static_cast<param_t>(b);
    if (grad_bias != nullptr) grad_bias[c] = static_cast<param_t>(a);
  }
}

// ---------------------------------------------------------------------------------------------
// Stage 4: elementwise.
// ---------------------------------------------------------------------------------------------

// y = (x - mean) * invstd * w + b (formulas.md §Norm statistics).
template <bool channels_last, typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                 const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                 const param_t* __restrict__ weight, const param_t* __restrict__ bias,
                                 NormIndex<index_t> ix, index_t numel) {
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t c, s;
    ix.template locate<channels_last>(i, c, s);
    const acc_t v = norm_output(static_cast<acc_t>(x[i]), mean[s], invstd[s],
                                weight != nullptr ? static_cast<acc_t>(weight[c]) : acc_t(1),
                                bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0));
    y[i] = static_cast<scalar_t>(v);
  }
}

// dx = invstd * (dy * w + coef_g) + coef_xmu * (x - mean); coefficients null for batch norm
// eval: dx = dy * w * invstd (x is not read there, as in torch).
template <bool channels_last, typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ dx, const acc_t* __restrict__ mean,
                                  const acc_t* __restrict__ invstd, const param_t* __restrict__ weight,
                                  const acc_t* __restrict__ coef_g, const acc_t* __restrict__ coef_xmu,
                                  NormIndex<index_t> ix, index_t numel) {
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t c, s;
    ix.template locate<channels_last>(i, c, s);
    const acc_t w = weight != nullptr ? static_cast<acc_t>(weight[c]) : acc_t(1);
    const acc_t v = coef_g != nullptr ? norm_grad_input(static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]), mean[s],
                                                        invstd[s], w, coef_g[s], coef_xmu[s])
                                      : norm_grad_input_eval(static_cast<acc_t>(dy[i]), invstd[s], w);
    dx[i] = static_cast<scalar_t>(v);
  }
}

}  // namespace norm
}  // namespace cnnops
