#pragma once
// Device side of csrc/cuda/conv.cu, tensor-core implicit-GEMM kernel (WMMA, sm_80+).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "conv_kernels.cuh"

namespace cnnops {

// ---------------------------------------------------------------------------------------------
// Tensor-core path (sm_80+): 64x64 block tile, 32-deep K-slice, 8 warps in a 4x2 grid each
// owning a 16x32 piece as 1x2 WMMA accumulators. half/bf16 use 16x16x16 fragments, float32 uses
// TF32 16x16x8; all accumulate in float.
// ---------------------------------------------------------------------------------------------

namespace wmma = nvcuda::wmma;
constexpr int kMmaBM = 64, kMmaBN = 64, kMmaBK = 32, kMmaThreads = 256;
constexpr int kMmaWarpsM = 4, kMmaWarpsN = 2;

template <typename scalar_t>
struct MmaTraits;
template <>
struct MmaTraits<c10::Half> {
  using smem_t = __half;
  using frag_t = __half;
  static constexpr int K = 16;
};
template <>
struct MmaTraits<c10::BFloat16> {
  using smem_t = __nv_bfloat16;
  using frag_t = __nv_bfloat16;
  static constexpr int K = 16;
};
template <>
struct MmaTraits<float> {
  using smem_t = float;
  using frag_t = wmma::precision::tf32;
  static constexpr int K = 8;
};

// Same GEMM as conv_gemm_fma_kernel, multiplied on tensor cores with float accumulation.
template <ConvGemm kind, typename scalar_t, typename out_t, typename index_t>
__global__ void __launch_bounds__(kMmaThreads, 2)
    conv_gemm_mma_kernel(const __grid_constant__ GemmArgs<scalar_t, out_t> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host only picks this kernel on compute capability 8.0 or newer
#else
  using Traits = MmaTraits<scalar_t>;
  using smem_t = typename Traits::smem_t;
  constexpr int BM = kMmaBM, BN = kMmaBN, BK = kMmaBK, THREADS = kMmaThreads, WK = Traits::K;
  constexpr int FM = BM / kMmaWarpsM / 16, FN = BN / kMmaWarpsN / 16;  // fragments per warp: 1x2
  // Pads shift banks between rows; WMMA needs ldm a multiple of 16 bytes and fragment origins
  // 32-byte aligned, which every origin below (rows and columns multiples of 8 or 16) is.
  constexpr int PAD = 32 / sizeof(smem_t) / 2;  // 8 halves or 4 floats
  constexpr int LDA = BK + PAD, LDB = BN + PAD, LDC = BN + 4;
  __shared__ __align__(128) smem_t As[BM][LDA];
  __shared__ __align__(128) smem_t Bs[BK][LDB];
  __shared__ __align__(128) float Cs[BM][LDC];
  __shared__ ReductionIndex<index_t> slice[2][BK];

  const GemmBlock<kind, scalar_t, out_t, index_t> blk(args);
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;

  const TileStager<kind, scalar_t, out_t, index_t, BM, BN, BK, THREADS> stage(args, tid, m0, n0);
  scalar_t a_reg[stage.A_LOADS], b_reg[stage.B_LOADS];

  const int warp = tid / 32;
  const int warp_m = (warp / kMmaWarpsN) * FM * 16, warp_n = (warp % kMmaWarpsN) * FN * 16;
  wmma::fragment<wmma::accumulator, 16, 16, WK, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const int64_t tiles = blk.tiles(BK);
  if (tid < BK) slice[0][tid] = blk.reduction(blk.r_begin + tid);
  __syncthreads();
  if (tiles > 0) stage.fetch(blk, slice[0], a_reg, b_reg);
  for (int64_t t = 0; t < tiles; ++t) {
    const int next = (t + 1) & 1;
#pragma unroll
    for (int i = 0; i < stage.A_LOADS; ++i) As[stage.a_m + i * stage.A_STEP][stage.a_k] = static_cast<smem_t>(a_reg[i]);
#pragma unroll
    for (int i = 0; i < stage.B_LOADS; ++i) Bs[stage.b_k + i * stage.B_STEP][stage.b_n] = static_cast<smem_t>(b_reg[i]);
    if (tid < BK) slice[next][tid] = blk.reduction(blk.r_begin + (t + 1) * BK + tid);
    __syncthreads();
    if (t + 1 < tiles) stage.fetch(blk, slice[next], a_reg, b_reg);
#pragma unroll
    for (int k = 0; k < BK; k += WK) {
      wmma::fragment<wmma::matrix_a, 16, 16, WK, typename Traits::frag_t, wmma::row_major> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, WK, typename Traits::frag_t, wmma::row_major> fb[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        wmma::load_matrix_sync(fa[i], &As[warp_m + 16 * i][k], LDA);
        if constexpr (std::is_same_v<scalar_t, float>)  // round the float32 operands to TF32
#pragma unroll
          for (int e = 0; e < fa[i].num_elements; ++e) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::load_matrix_sync(fb[j], &Bs[k][warp_n + 16 * j], LDB);
        if constexpr (std::is_same_v<scalar_t, float>)
#pragma unroll
          for (int e = 0; e < fb[j].num_elements; ++e) fb[j].x[e] = wmma::__float_to_tf32(fb[j].x[e]);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Accumulators go through shared memory so that each thread writes one output column.
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
      wmma::store_matrix_sync(&Cs[warp_m + 16 * i][warp_n + 16 * j], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  if (!stage.column_ok) return;  // each thread writes its staged column
#pragma unroll 4
  for (int i = 0; i < BM * BN / THREADS; ++i) {
    const int row = stage.b_k + i * stage.B_STEP;
    if (m0 + row < args.m) blk.store(m0 + row, stage.column, Cs[row][stage.b_n]);
  }
#endif
}

}  // namespace cnnops
