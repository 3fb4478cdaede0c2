// Space to depth: a strided convolution as a stride-1 one on the input's phases (see
// conv_space_to_depth.h; formulas.md §Space to depth).
#include "cpu/conv_space_to_depth.h"

#include <algorithm>
#include <atomic>

#include "common/macros.h"
#include "cpu/conv_cpu.h"

namespace cnnops {
namespace cpu {

namespace {
std::atomic<int64_t> calls{0};
}  // namespace

int64_t space_to_depth_call_count() { return calls.load(std::memory_order_relaxed); }

bool use_space_to_depth(const ConvGeometry& g) {
  const int64_t s = g.stride[1];
  return g.groups == 1 && g.in[0] == 1 && g.kernel[0] == 1 && g.stride[0] == 1 && g.pad[0] == 0 && s >= 2 &&
         g.stride[2] == s && g.dilation[0] == 1 && g.dilation[1] == 1 && g.dilation[2] == 1 && g.kernel[1] > 2 * s &&
         g.kernel[2] > 2 * s && g.in_channels <= 4;
}

template <typename T>
bool space_to_depth(const ConvGeometry& g, const T* x, const T* w, bool nhwc, SpaceToDepth<T>& out) {
  const int64_t s = g.stride[1], C = g.in_channels, H = g.in[1], W = g.in[2];
  const int64_t kh = ceil_div(g.kernel[1], s), kw = ceil_div(g.kernel[2], s);
  ConvGeometry t = g;
  t.in_channels = C * s * s;
  t.kernel[1] = kh, t.kernel[2] = kw;
  t.stride[1] = t.stride[2] = 1;
  t.pad[1] = t.pad[2] = 0;
  t.in[1] = g.out[1] + kh - 1, t.in[2] = g.out[2] + kw - 1;
  const int64_t Hp = t.in[1], Wp = t.in[2], Cp = t.in_channels;

  // X'[(c, p, q), i, j] = x[c, s*i + p - pad_h, s*j + q - pad_w], zero outside x
  std::vector<T> xs(g.batch * Cp * Hp * Wp);
  std::vector<char> nonfinite_row(g.batch * Hp);
  parallel_for(0, g.batch * Hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / Hp, i = task % Hp;
      T seen = T(0);  // x * 0 is NaN for inf and NaN, else 0
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < s; ++p) {
          const int64_t ih = s * i + p - g.pad[1];
          for (int64_t q = 0; q < s; ++q) {
            const int64_t cp = (c * s + p) * s + q;
            for (int64_t j = 0; j < Wp; ++j) {
              const int64_t iw = s * j + q - g.pad[2];
              const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
              const T v = !inside ? T(0)
                          : nhwc  ? x[((n * H + ih) * W + iw) * C + c]
                                  : x[((n * C + c) * H + ih) * W + iw];
              seen += v * T(0);
              if (nhwc)
                xs[((n * Hp + i) * Wp + j) * Cp + cp] = v;
              else
                xs[((n * Cp + cp) * Hp + i) * Wp + j] = v;
            }
          }
        }
      nonfinite_row[task] = seen != T(0);
    }
  });
  if (std::find(nonfinite_row.begin(), nonfinite_row.end(), 1) != nonfinite_row.end()) return false;

  // W'[co, (c, p, q), a, b] = w[co, c, s*a + p, s*b + q], zero past the kernel
  std::vector<T> ws(g.out_channels * Cp * kh * kw, T(0));
  for (int64_t co = 0; co < g.out_channels; ++co)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t r = 0; r < g.kernel[1]; ++r)
        for (int64_t k = 0; k < g.kernel[2]; ++k) {
          const int64_t cp = (c * s + r % s) * s + k % s;
          ws[((co * Cp + cp) * kh + r / s) * kw + k / s] = w[((co * C + c) * g.kernel[1] + r) * g.kernel[2] + k];
        }
  calls.fetch_add(1, std::memory_order_relaxed);
  out.g = t;
  out.x = std::move(xs);
  out.w = std::move(ws);
  return true;
}

template bool space_to_depth<float>(const ConvGeometry&, const float*, const float*, bool, SpaceToDepth<float>&);
template bool space_to_depth<double>(const ConvGeometry&, const double*, const double*, bool, SpaceToDepth<double>&);

}  // namespace cpu
}  // namespace cnnops
