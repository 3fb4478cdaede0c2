// NCHW <-> NHWC: per sample, the C x S plane matrix and the S x C row matrix are transposes of
// each other (S = D*H*W). Bands of kTile source rows are transposed in L x L register blocks
// (simd_transpose.h): each block reads L source rows and writes L whole vectors of the destination.
#include "cpu/layout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>

#include "common/macros.h"
#include "common/conv_checks.h"
#include "cpu/result_memory.h"
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

void* KeptStorage::reserve(size_t bytes) {
  if (bytes > kLimitBytes) return nullptr;
  if (bytes > bytes_) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    data_.reset(static_cast<std::byte*>(std::aligned_alloc(64, rounded)));
    TORCH_CHECK(data_ != nullptr, "out of memory: ", rounded, " bytes of kept scratch");
    bytes_ = rounded;
  }
  return data_.get();
}

at::Tensor KeptStorage::empty(c10::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  void* data = reserve(size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize());
  if (data == nullptr) return empty_result(sizes, options, format);
  std::vector<int64_t> strides(sizes.size());
  if (format == at::MemoryFormat::ChannelsLast) {
    strides = c10::get_channels_last_strides_2d(sizes);
  } else if (format == at::MemoryFormat::ChannelsLast3d) {
    strides = c10::get_channels_last_strides_3d(sizes);
  } else {
    int64_t stride = 1;
    for (size_t i = sizes.size(); i-- > 0;) {
      strides[i] = stride;
      stride *= std::max<int64_t>(sizes[i], 1);
    }
  }
  return at::from_blob(data, sizes, strides, options);
}

at::Tensor contiguous_as(const at::Tensor& t, at::MemoryFormat format, KeptStorage* storage) {
  if (t.is_contiguous(format)) return t;
  const bool to_rows = format != at::MemoryFormat::Contiguous;  // to channels last
  const bool convertible = (t.dim() == 4 || t.dim() == 5) && t.numel() > 0 &&
                           (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
                           format == (to_rows ? channels_last_format(t.dim()) : at::MemoryFormat::Contiguous) &&
                           t.is_contiguous(to_rows ? at::MemoryFormat::Contiguous : channels_last_format(t.dim()));
  if (!convertible) return t.contiguous(format);
  at::Tensor out = storage ? storage->empty(t.sizes(), t.options(), format)
                           : empty_result(t.sizes(), t.options(), format);
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
