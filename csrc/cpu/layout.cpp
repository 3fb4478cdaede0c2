// NCHW <-> NHWC: per sample, the C x S plane matrix and the S x C row matrix are transposes of
// each other (S = D*H*W). Bands of kTile source rows are transposed in L x L register blocks
// (simd_transpose.h): each block reads L source rows and writes L whole vectors of the destination.
#include "cpu/layout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "common/macros.h"
#include "common/conv_checks.h"
#include "cpu/simd.h"
#include "cpu/simd_transpose.h"

namespace cnnops {
namespace cpu {
namespace {

constexpr int64_t kTile = 16;  // source rows a task unit: a float vector of AVX-512 down each column

// dst[j * rows + i] = src[i * cols + j] for one sample's rows x cols matrix, source rows
// [band_begin * kTile, band_end * kTile).
template <typename T>
void transpose_bands(const T* __restrict src, T* __restrict dst, int64_t rows, int64_t cols, int64_t band_begin,
                     int64_t band_end) {
  const int64_t i0 = band_begin * kTile, i1 = std::min(rows, band_end * kTile);
  simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY {
    transpose_matrix<T, vector_bytes(decltype(isa)::value)>(src + i0 * cols, cols, i1 - i0, cols, dst + i0, rows);
  });
}

}  // namespace

at::Tensor contiguous_as(const at::Tensor& t, at::MemoryFormat format) {
  if (t.is_contiguous(format)) return t;
  const bool to_rows = format != at::MemoryFormat::Contiguous;  // to channels last
  const bool convertible = (t.dim() == 4 || t.dim() == 5) && t.numel() > 0 &&
                           (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
                           format == (to_rows ? channels_last_format(t.dim()) : at::MemoryFormat::Contiguous) &&
                           t.is_contiguous(to_rows ? at::MemoryFormat::Contiguous : channels_last_format(t.dim()));
  if (!convertible) return t.contiguous(format);
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(format));
  const int64_t n = t.size(0), c = t.size(1), s = t.numel() / (n * c);
  const int64_t rows = to_rows ? c : s, cols = to_rows ? s : c;  // the source matrix of a sample
  const int64_t tiles = ceil_div(rows, kTile);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "contiguous_as", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, kTile * cols));
    at::parallel_for(0, n * tiles, grain, [&](int64_t begin, int64_t end) {
      while (begin < end) {  // a range may span samples: one call per sample's part
        const int64_t sample = begin / tiles, first = begin % tiles;
        const int64_t last = std::min(tiles, first + (end - begin));
        transpose_bands(src + sample * c * s, dst + sample * c * s, rows, cols, first, last);
        begin += last - first;
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace cnnops
