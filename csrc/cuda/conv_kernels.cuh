#pragma once
// Device side of csrc/cuda/conv.cu, CUDA-core kernels: the implicit-GEMM FMA kernel, the
// deterministic reductions and the depthwise direct kernels. The operand index math lives in
// csrc/common/cuda_implicit_gemm.h.
#include <ATen/AccumulateType.h>

#include "../common/activation.h"
#include "../common/conv_shape.h"
#include "../common/cuda_implicit_gemm.h"

namespace cnnops {

// ---------------------------------------------------------------------------------------------
// Implicit GEMM: shared structure of both kernels
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename out_t>
struct GemmArgs {
  ConvGeometry g;
  const scalar_t* a;
  const scalar_t* b;
  const scalar_t* bias;  // forward only, may be null
  out_t* out;
  int64_t m, n, r;  // GEMM sizes of one group
  int64_t r_chunk;  // reduction length of one split-K chunk
  int64_t chunks;   // blockIdx.z = group * chunks + chunk
  int64_t out_chunk_stride;
  Activation activation;  // forward only: applied to each output as it is stored
};

// The part of a block's work that does not depend on the tile sizes: where its operands start,
// which reduction range it owns, and how one element of A or B is fetched.
template <ConvGemm kind, typename scalar_t, typename out_t, typename index_t>
struct GemmBlock {
  const GemmArgs<scalar_t, out_t>& p;
  int64_t group, r_begin, r_end;
  const scalar_t* a;
  const scalar_t* b;
  out_t* out;
  index_t a_row_stride, out_row_stride;

  __device__ explicit GemmBlock(const GemmArgs<scalar_t, out_t>& args) : p(args) {
    group = blockIdx.z / p.chunks;
    const int64_t chunk = blockIdx.z % p.chunks;
    r_begin = chunk * p.r_chunk;
    r_end = ::min(p.r, r_begin + p.r_chunk);
    a = p.a + gemm_a_group_offset<kind>(p.g, group);
    b = p.b + gemm_b_group_offset<kind>(p.g, group);
    out = p.out + gemm_out_group_offset<kind>(p.g, group) + chunk * p.out_chunk_stride;
    a_row_stride = static_cast<index_t>(gemm_a_row_stride<kind>(p.g));
    out_row_stride = static_cast<index_t>(gemm_out_row_stride<kind>(p.g));
  }
  __device__ int64_t tiles(int bk) const { return r_end > r_begin ? (r_end - r_begin + bk - 1) / bk : 0; }
  // Decomposes reduction index r (once per K-slice, shared by the whole block).
  __device__ ReductionIndex<index_t> reduction(int64_t r) const {
    if (r < r_end) return reduction_index<kind, index_t>(p.g, r);
    ReductionIndex<index_t> past_end{};
    past_end.a_offset = -1;
    return past_end;
  }
  __device__ scalar_t load_a(int64_t m, const ReductionIndex<index_t>& e) const {
    if (m >= p.m || e.a_offset < 0) return scalar_t(0);
    return a[static_cast<index_t>(m) * a_row_stride + e.a_offset];
  }
  __device__ scalar_t load_b(bool column_ok, const ReductionIndex<index_t>& e, const ColumnIndex<index_t>& c) const {
    if (!column_ok || e.a_offset < 0) return scalar_t(0);
    const index_t offset = gemm_b_offset<kind, index_t>(p.g, e, c);
    return offset >= 0 ? b[offset] : scalar_t(0);
  }
  // The epilogue of both GEMM kernels: bias, then the activation, on the accumulator type.
  template <typename acc_t>
  __device__ void store(int64_t m, const ColumnIndex<index_t>& c, acc_t value) const {
    if constexpr (kind == ConvGemm::Forward) {
      if (p.bias != nullptr) value += static_cast<acc_t>(p.bias[group * p.m + m]);
      value = apply_activation(value, p.activation);
    }
    out[static_cast<index_t>(m) * out_row_stride + c.out_offset] = static_cast<out_t>(value);
  }
};

// The global-memory half shared by both GEMM kernels: thread tid stages A_LOADS elements of the
// block's A tile (rows a_m + i*A_STEP, reduction a_k: a warp reads along k, contiguous in W and
// dY) and B_LOADS of its B tile (reduction b_k + i*B_STEP, one column b_n per thread, decomposed
// once) in registers, fetching the next K-slice while the current one is multiplied.
template <ConvGemm kind, typename scalar_t, typename out_t, typename index_t, int BM, int BN, int BK, int THREADS>
struct TileStager {
  static constexpr int A_LOADS = BM * BK / THREADS, B_LOADS = BK * BN / THREADS;
  static constexpr int A_STEP = THREADS / BK, B_STEP = THREADS / BN;
  int a_k, a_m, b_n, b_k;
  int64_t m0;
  bool column_ok;
  ColumnIndex<index_t> column;

  __device__ __forceinline__ TileStager(const GemmArgs<scalar_t, out_t>& args, int tid, int64_t block_m0, int64_t n0)
      : a_k(tid % BK),
        a_m(tid / BK),
        b_n(tid % BN),
        b_k(tid / BN),
        m0(block_m0),
        column_ok(n0 + b_n < args.n),
        column(column_index<kind, index_t>(args.g, column_ok ? n0 + b_n : 0)) {}

  // a and b are the calling kernel's register arrays (kept out of this struct, which would
  // otherwise be spilled to local memory).
  __device__ __forceinline__ void fetch(const GemmBlock<kind, scalar_t, out_t, index_t>& blk,
                                        const ReductionIndex<index_t>* slice, scalar_t (&a)[A_LOADS],
                                        scalar_t (&b)[B_LOADS]) const {
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) a[i] = blk.load_a(m0 + a_m + i * A_STEP, slice[a_k]);
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i) b[i] = blk.load_b(column_ok, slice[b_k + i * B_STEP], column);
  }
};

// ---------------------------------------------------------------------------------------------
// CUDA-core path: 64x64 block tile, 16-deep K-slice, 4x4 register micro-tile per thread.
// ---------------------------------------------------------------------------------------------

constexpr int kFmaBM = 64, kFmaBN = 64, kFmaBK = 16, kFmaThreads = 256;

// OUT[M, N] = A[M, R] x B[R, N] (+ bias), B = im2col / col(dY) gathered on the fly.
// The next K-slice is fetched into registers while the current one is multiplied from shared
// memory, so global latency hides behind the FMAs.
template <ConvGemm kind, typename scalar_t, typename out_t, typename index_t>
__global__ void __launch_bounds__(kFmaThreads)
    conv_gemm_fma_kernel(const __grid_constant__ GemmArgs<scalar_t, out_t> args) {
  using acc_t = at::acc_type<scalar_t, true>;
  constexpr int BM = kFmaBM, BN = kFmaBN, BK = kFmaBK, THREADS = kFmaThreads;
  constexpr int TM = 4, TN = 4;  // micro-tile: rows ty + 16i, cols tx + 16j
  // A is stored k-major so a thread's rows are one broadcast read per k; +2 pads the stores.
  __shared__ acc_t As[BK][BM + 2];
  __shared__ acc_t Bs[BK][BN];
  __shared__ ReductionIndex<index_t> slice[2][BK];

  const GemmBlock<kind, scalar_t, out_t, index_t> blk(args);
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const TileStager<kind, scalar_t, out_t, index_t, BM, BN, BK, THREADS> stage(args, tid, m0, n0);
  scalar_t a_reg[stage.A_LOADS], b_reg[stage.B_LOADS];

  const int tx = tid % 16, ty = tid / 16;
  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

  const int64_t tiles = blk.tiles(BK);
  if (tid < BK) slice[0][tid] = blk.reduction(blk.r_begin + tid);
  __syncthreads();
  if (tiles > 0) stage.fetch(blk, slice[0], a_reg, b_reg);
  for (int64_t t = 0; t < tiles; ++t) {
    const int next = (t + 1) & 1;
#pragma unroll
    for (int i = 0; i < stage.A_LOADS; ++i) As[stage.a_k][stage.a_m + i * stage.A_STEP] = static_cast<acc_t>(a_reg[i]);
#pragma unroll
    for (int i = 0; i < stage.B_LOADS; ++i) Bs[stage.b_k + i * stage.B_STEP][stage.b_n] = static_cast<acc_t>(b_reg[i]);
    if (tid < BK) slice[next][tid] = blk.reduction(blk.r_begin + (t + 1) * BK + tid);
    __syncthreads();
    if (t + 1 < tiles) stage.fetch(blk, slice[next], a_reg, b_reg);
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      acc_t av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = As[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }

#pragma unroll
  for (int j = 0; j < TN; ++j) {
    const int64_t n = n0 + tx + 16 * j;
    if (n >= args.n) continue;
    const ColumnIndex<index_t> c = column_index<kind, index_t>(args.g, n);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m < args.m) blk.store(m, c, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic reductions
// ---------------------------------------------------------------------------------------------

// out[i] = sum_c partial[c][i], summed in chunk order.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void sum_chunks_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ out, index_t count,
                                  index_t chunks) {
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    acc_t sum = acc_t(0);
    for (index_t c = 0; c < chunks; ++c) sum += partial[c * count + i];
    out[i] = static_cast<scalar_t>(sum);
  }
}

constexpr int kReduceThreads = 256;

// Fixed-shape tree over the block: the same inputs always add up in the same order.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* buffer) {
  buffer[threadIdx.x] = value;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) buffer[threadIdx.x] += buffer[threadIdx.x + s];
    __syncthreads();
  }
  return buffer[0];
}

// partial[chunk][co] = sum of dY[b, co, l] over the chunk's share of the (b, l) pairs (db, stage 1).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads)
    bias_grad_partial_kernel(const scalar_t* __restrict__ grad_output,
                             at::acc_type<scalar_t, true>* __restrict__ partial, index_t channels, index_t plane,
                             index_t total, index_t chunk_len) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t buffer[kReduceThreads];
  const index_t co = blockIdx.x;
  const index_t begin = blockIdx.y * chunk_len;
  const index_t end = ::min(total, begin + chunk_len);
  // Walk j = b * plane + l in steps of blockDim without dividing per element.
  const index_t step_b = kReduceThreads / plane, step_l = kReduceThreads % plane;
  index_t j = begin + threadIdx.x;
  index_t b = j / plane, l = j % plane;
  acc_t sum = acc_t(0);
  for (; j < end; j += kReduceThreads) {
    sum += static_cast<acc_t>(grad_output[(b * channels + co) * plane + l]);
    b += step_b;
    l += step_l;
    if (l >= plane) {
      l -= plane;
      ++b;
    }
  }
  sum = block_sum(sum, buffer);
  if (threadIdx.x == 0) partial[blockIdx.y * channels + co] = sum;
}

// ---------------------------------------------------------------------------------------------
// Depthwise: groups == C_in, C_out = C_in * multiplier, one input channel per output channel.
// ---------------------------------------------------------------------------------------------

constexpr int kDepthwiseThreads = 256;
constexpr int kDepthwiseMaxSmem = 16 * 1024;  // bytes of weight taps staged in shared memory

// y[b, co, o] = act(bias[co] + sum_k x[b, co / mult, o*stride - pad + k*dilation] * w[co, k])
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kDepthwiseThreads)
    depthwise_forward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
                             const scalar_t* __restrict__ bias, scalar_t* __restrict__ output,
                             const __grid_constant__ ConvGeometry g, Activation activation) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t taps[kDepthwiseMaxSmem / sizeof(acc_t)];
  const index_t kd_n = g.kernel[0], kh_n = g.kernel[1], kw_n = g.kernel[2];
  const index_t kvol = kd_n * kh_n * kw_n;
  const index_t co = blockIdx.y;
  for (index_t t = threadIdx.x; t < kvol; t += blockDim.x) taps[t] = static_cast<acc_t>(weight[co * kvol + t]);
  __syncthreads();

  const index_t out_plane = g.out_plane(), in_plane = g.in_plane();
  // Widen before multiplying: unsigned 32-bit blockIdx.x * blockDim.x wraps for planes of 2^32+.
  const index_t l = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= out_plane) return;
  const index_t c = co / static_cast<index_t>(g.out_channels / g.in_channels);
  const int64_t out_dims[3] = {g.out[0], g.out[1], g.out[2]};
  const GridPosition o = split_grid_position(l, out_dims);
  const index_t z0 = conv_input_index(o.d, 0, g.stride[0], g.pad[0], g.dilation[0]);
  const index_t y0 = conv_input_index(o.h, 0, g.stride[1], g.pad[1], g.dilation[1]);
  const index_t x0 = conv_input_index(o.w, 0, g.stride[2], g.pad[2], g.dilation[2]);
  const index_t D = g.in[0], H = g.in[1], W = g.in[2];
  const index_t dd = g.dilation[0], dh = g.dilation[1], dw = g.dilation[2];
  const acc_t b0 = bias != nullptr ? static_cast<acc_t>(bias[co]) : acc_t(0);

  for (index_t b = blockIdx.z; b < g.batch; b += gridDim.z) {
    const scalar_t* x = input + (b * static_cast<index_t>(g.in_channels) + c) * in_plane;
    acc_t sum = b0;
    for (index_t kd = 0; kd < kd_n; ++kd) {
      const index_t z = z0 + kd * dd;
      if (!in_extent(z, D)) continue;
      for (index_t kh = 0; kh < kh_n; ++kh) {
        const index_t y = y0 + kh * dh;
        if (!in_extent(y, H)) continue;
        const scalar_t* row = x + (z * H + y) * W;
        const acc_t* tap = taps + (kd * kh_n + kh) * kw_n;
        for (index_t kw = 0; kw < kw_n; ++kw) {
          const index_t xx = x0 + kw * dw;
          if (in_extent(xx, W)) sum += static_cast<acc_t>(row[xx]) * tap[kw];
        }
      }
    }
    output[(b * static_cast<index_t>(g.out_channels) + co) * out_plane + l] =
        static_cast<scalar_t>(apply_activation(sum, activation));
  }
}

// dx[b, c, i] = sum_{m < mult} sum_k dy[b, c*mult + m, (i + pad - k*dilation) / stride] * w[c*mult + m, k],
// over the taps where i + pad - k*dilation is a multiple of stride inside the output (col2im as a gather).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kDepthwiseThreads)
    depthwise_grad_input_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ weight,
                                scalar_t* __restrict__ grad_input, const __grid_constant__ ConvGeometry g) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t taps[kDepthwiseMaxSmem / sizeof(acc_t)];
  const index_t kd_n = g.kernel[0], kh_n = g.kernel[1], kw_n = g.kernel[2];
  const index_t kvol = kd_n * kh_n * kw_n;
  const index_t mult = g.out_channels / g.in_channels;
  const index_t c = blockIdx.y;
  for (index_t t = threadIdx.x; t < mult * kvol; t += blockDim.x)  // w[c*mult .. c*mult+mult-1, :]
    taps[t] = static_cast<acc_t>(weight[c * mult * kvol + t]);
  __syncthreads();

  const index_t out_plane = g.out_plane(), in_plane = g.in_plane();
  const index_t l = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= in_plane) return;
  const int64_t in_dims[3] = {g.in[0], g.in[1], g.in[2]};
  const GridPosition i = split_grid_position(l, in_dims);
  // i + pad: the coordinate that tap k reaches from output o satisfies o*stride = i + pad - k*dil.
  const index_t zp = i.d + g.pad[0], yp = i.h + g.pad[1], xp = i.w + g.pad[2];
  const index_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const index_t sd = g.stride[0], sh = g.stride[1], sw = g.stride[2];
  const index_t dd = g.dilation[0], dh = g.dilation[1], dw = g.dilation[2];

  for (index_t b = blockIdx.z; b < g.batch; b += gridDim.z) {
    const scalar_t* dy = grad_output + (b * static_cast<index_t>(g.out_channels) + c * mult) * out_plane;
    acc_t sum = acc_t(0);
    for (index_t m = 0; m < mult; ++m, dy += out_plane) {
      const acc_t* w = taps + m * kvol;
      for (index_t kd = 0; kd < kd_n; ++kd) {
        const index_t tz = zp - kd * dd;
        if (tz < 0) break;  // grows more negative with kd
        if (tz % sd != 0 || tz / sd >= OD) continue;
        for (index_t kh = 0; kh < kh_n; ++kh) {
          const index_t ty = yp - kh * dh;
          if (ty < 0) break;
          if (ty % sh != 0 || ty / sh >= OH) continue;
          const scalar_t* row = dy + (tz / sd * OH + ty / sh) * OW;
          const acc_t* tap = w + (kd * kh_n + kh) * kw_n;
          for (index_t kw = 0; kw < kw_n; ++kw) {
            const index_t tx = xp - kw * dw;
            if (tx < 0) break;
            if (tx % sw == 0 && tx / sw < OW) sum += static_cast<acc_t>(row[tx / sw]) * tap[kw];
          }
        }
      }
    }
    grad_input[(b * static_cast<index_t>(g.in_channels) + c) * in_plane + l] = static_cast<scalar_t>(sum);
  }
}

// partial[chunk][co, k] = sum over the chunk's (b, o) of dy[b, co, o] * x[b, co / mult, o*stride - pad + k*dilation],
// iterating only the output box where tap k stays inside the input (valid_output_range).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads)
    depthwise_grad_weight_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                                 at::acc_type<scalar_t, true>* __restrict__ partial,
                                 const __grid_constant__ ConvGeometry g, index_t chunks) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t buffer[kReduceThreads];
  const index_t kvol = g.kernel_volume();
  const index_t co = blockIdx.x / kvol, tap = blockIdx.x % kvol;
  const index_t c = co / static_cast<index_t>(g.out_channels / g.in_channels);
  const KernelTap k = decompose_gemm_row(g, tap);
  const int64_t kk[3] = {k.kd, k.kh, k.kw};
  int64_t lo[3], hi[3], box[3];
  for (int d = 0; d < 3; ++d) {
    valid_output_range(g.in[d], g.out[d], kk[d], g.stride[d], g.pad[d], g.dilation[d], &lo[d], &hi[d]);
    box[d] = hi[d] - lo[d];
  }
  const index_t box_plane = box[0] * box[1] * box[2];
  const index_t total = static_cast<index_t>(g.batch) * box_plane;
  const index_t chunk_len = (total + chunks - 1) / chunks;
  const index_t begin = blockIdx.y * chunk_len;
  const index_t end = ::min(total, begin + chunk_len);

  const index_t OH = g.out[1], OW = g.out[2], H = g.in[1], W = g.in[2];
  const index_t out_plane = g.out_plane(), in_plane = g.in_plane();
  const index_t Cout = g.out_channels, Cin = g.in_channels;
  const index_t sd = g.stride[0], sh = g.stride[1], sw = g.stride[2];
  // Along each dim the input coordinate is o*stride + (k*dilation - pad).
  const index_t off_d = kk[0] * g.dilation[0] - g.pad[0], off_h = kk[1] * g.dilation[1] - g.pad[1],
                off_w = kk[2] * g.dilation[2] - g.pad[2];
  const index_t lo_d = lo[0], lo_h = lo[1], lo_w = lo[2], bh = box[1], bw = box[2];
  acc_t sum = acc_t(0);
  for (index_t j = begin + threadIdx.x; j < end; j += kReduceThreads) {
    const index_t b = j / box_plane, r = j - b * box_plane;
    const index_t od = lo_d + r / (bh * bw), oh = lo_h + (r / bw) % bh, ow = lo_w + r % bw;
    const scalar_t dy = grad_output[(b * Cout + co) * out_plane + (od * OH + oh) * OW + ow];
    const scalar_t x =
        input[(b * Cin + c) * in_plane + ((od * sd + off_d) * H + oh * sh + off_h) * W + ow * sw + off_w];
    sum += static_cast<acc_t>(dy) * static_cast<acc_t>(x);
  }
  sum = block_sum(sum, buffer);
  if (threadIdx.x == 0) partial[blockIdx.y * static_cast<index_t>(gridDim.x) + blockIdx.x] = sum;
}

}  // namespace cnnops
