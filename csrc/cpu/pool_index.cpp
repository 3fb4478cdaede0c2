// Max-pool backward and max unpool on the CPU: scatters and gathers through argmax indices.
//
// formulas.md §Max pool: the max pool's gradient flows only to the argmax, dl/dx_i = sum of dl/dy_j over the
// outputs j whose max was x_i, so the backward adds each dl/dy_j at indices[j]. Max unpool
// places each input at its index in a zero output, and its backward gathers from there.
//
// Every index is checked against the plane it points into; a bad one is skipped and reported,
// so no garbage index can ever touch memory outside the tensor.
#include <ATen/Dispatch.h>

#include "cpu/pool_cpu.h"

namespace cnnops {
namespace cpu {
namespace {

CNNOPS_ALWAYS_INLINE bool index_ok(int64_t i, int64_t size) {
  return static_cast<uint64_t>(i) < static_cast<uint64_t>(size);  // 0 <= i < size
}

// Calls per_plane(plane) for NCHW, or per_block(n, c0, cw) for NHWC (images and channel
// blocks), in parallel; each task owns what it writes.
template <typename PerPlane, typename PerBlock>
void for_each_owned_part(const IndexedPlanes& p, bool channels_last, PerPlane&& per_plane, PerBlock&& per_block) {
  const int64_t work = p.small_plane + p.large_plane;
  if (channels_last) {
    const ChannelBlocks cb(p.batch, p.channels);
    at::parallel_for(0, p.batch * cb.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / cb.count, c0 = (t % cb.count) * cb.size;
        per_block(n, c0, std::min(cb.size, p.channels - c0));
      }
    });
  } else {
    at::parallel_for(0, p.batch * p.channels, pool_grain(work), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) per_plane(plane);
    });
  }
}

bool report(const BadIndex& bad, int64_t* bad_index) {
  if (!bad.seen.load()) return true;
  *bad_index = bad.value.load();
  return false;
}

}  // namespace

bool index_scatter_add_kernel(const IndexedPlanes& p, const at::Tensor& small, const at::Tensor& indices,
                              at::Tensor& large, bool channels_last, int64_t skip_limit, int64_t* bad_index) {
  BadIndex bad;
  const int64_t C = p.channels, S = p.small_plane, L = p.large_plane;
  // an index outside [0, L) is skipped; reported unless it lies in [L, skip_limit)
  const auto skip = [&](int64_t i) {
    if (i < L || i >= skip_limit) bad.report(i);
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, small.scalar_type(), "max_pool_backward_cpu", [&] {
    using A = pool_acc_t<scalar_t>;
    const scalar_t* src = small.const_data_ptr<scalar_t>();
    const int64_t* ind = indices.const_data_ptr<int64_t>();
    scalar_t* dst = large.mutable_data_ptr<scalar_t>();
    for_each_owned_part(
        p, channels_last,
        [&](int64_t plane) {
          std::vector<A> buffer;
          with_accumulator(dst + plane * L, 1, L, 0, buffer, [&](A* acc, int64_t) {
            const scalar_t* s = src + plane * S;
            const int64_t* in = ind + plane * S;
            for (int64_t o = 0; o < S; ++o) {
              if (!index_ok(in[o], L)) {
                skip(in[o]);
                continue;
              }
              acc[in[o]] += A(s[o]);
            }
          });
        },
        [&](int64_t n, int64_t c0, int64_t cw) {
          std::vector<A> buffer;
          with_accumulator(dst + n * L * C + c0, L, cw, C, buffer, [&](A* acc, int64_t stride) {
            for (int64_t o = 0; o < S; ++o) {
              const scalar_t* s = src + (n * S + o) * C + c0;
              const int64_t* in = ind + (n * S + o) * C + c0;
              for (int64_t c = 0; c < cw; ++c) {
                if (!index_ok(in[c], L)) {
                  skip(in[c]);
                  continue;
                }
                acc[in[c] * stride + c] += A(s[c]);
              }
            }
          });
        });
  });
  return report(bad, bad_index);
}

bool index_scatter_kernel(const IndexedPlanes& p, const at::Tensor& small, const at::Tensor& indices, at::Tensor& large,
                          bool channels_last, int64_t* bad_index) {
  BadIndex bad;
  const int64_t C = p.channels, S = p.small_plane, L = p.large_plane;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, small.scalar_type(), "max_unpool_forward_cpu", [&] {
    const scalar_t* src = small.const_data_ptr<scalar_t>();
    const int64_t* ind = indices.const_data_ptr<int64_t>();
    scalar_t* dst = large.mutable_data_ptr<scalar_t>();
    for_each_owned_part(
        p, channels_last,
        [&](int64_t plane) {
          scalar_t* d = dst + plane * L;
          const scalar_t* s = src + plane * S;
          const int64_t* in = ind + plane * S;
          std::fill_n(d, L, scalar_t(0));
          for (int64_t i = 0; i < S; ++i) {
            if (!index_ok(in[i], L)) {
              bad.report(in[i]);
              continue;
            }
            d[in[i]] = s[i];  // duplicates: the last in plane order wins, as in torch
          }
        },
        [&](int64_t n, int64_t c0, int64_t cw) {
          scalar_t* d = dst + n * L * C + c0;
          for (int64_t j = 0; j < L; ++j) std::fill_n(d + j * C, cw, scalar_t(0));
          for (int64_t i = 0; i < S; ++i) {
            const scalar_t* s = src + (n * S + i) * C + c0;
            const int64_t* in = ind + (n * S + i) * C + c0;
            for (int64_t c = 0; c < cw; ++c) {
              if (!index_ok(in[c], L)) {
                bad.report(in[c]);
                continue;
              }
              d[in[c] * C + c] = s[c];
            }
          }
        });
  });
  return report(bad, bad_index);
}

bool index_gather_kernel(const IndexedPlanes& p, const at::Tensor& large, const at::Tensor& indices, at::Tensor& small,
                         bool channels_last, int64_t* bad_index) {
  BadIndex bad;
  const int64_t C = p.channels, S = p.small_plane, L = p.large_plane;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, large.scalar_type(), "max_unpool_backward_cpu", [&] {
    const scalar_t* src = large.const_data_ptr<scalar_t>();
    const int64_t* ind = indices.const_data_ptr<int64_t>();
    scalar_t* dst = small.mutable_data_ptr<scalar_t>();
    for_each_owned_part(
        p, channels_last,
        [&](int64_t plane) {
          const scalar_t* s = src + plane * L;
          const int64_t* in = ind + plane * S;
          scalar_t* d = dst + plane * S;
          for (int64_t i = 0; i < S; ++i) {
            if (!index_ok(in[i], L)) {
              bad.report(in[i]);
              d[i] = scalar_t(0);
              continue;
            }
            d[i] = s[in[i]];
          }
        },
        [&](int64_t n, int64_t c0, int64_t cw) {
          const scalar_t* s = src + n * L * C + c0;
          for (int64_t i = 0; i < S; ++i) {
            const int64_t* in = ind + (n * S + i) * C + c0;
            scalar_t* d = dst + (n * S + i) * C + c0;
            for (int64_t c = 0; c < cw; ++c) {
              if (!index_ok(in[c], L)) {
                bad.report(in[c]);
                d[c] = scalar_t(0);
                continue;
              }
              d[c] = s[in[c] * C + c];
            }
          }
        });
  });
  return report(bad, bad_index);
}

}  // namespace cpu
}  // namespace cnnops
