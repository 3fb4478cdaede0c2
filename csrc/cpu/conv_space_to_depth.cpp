// Space to depth: a strided convolution as a stride-1 one on the input's phases (see
// conv_space_to_depth.h; formulas.md §Space to depth).
#include "cpu/conv_space_to_depth.h"

#include <algorithm>
#include <atomic>

#include "common/macros.h"
#include "cpu/conv_cpu.h"
#include "cpu/conv_grouped.h"

namespace cnnops {
namespace cpu {

namespace {
std::atomic<int64_t> calls{0};
}  // namespace

int64_t space_to_depth_call_count() { return calls.load(std::memory_order_relaxed); }

bool use_space_to_depth(const ConvGeometry& g) {
  const int64_t s = g.stride[1];
  const bool strided_2d = g.in[0] == 1 && g.kernel[0] == 1 && g.stride[0] == 1 && g.pad[0] == 0 && s >= 2 &&
                          g.stride[2] == s && g.dilation[0] == 1 && g.dilation[1] == 1 && g.dilation[2] == 1;
  if (!strided_2d || g.is_depthwise()) return false;
  if (use_grouped_direct(g)) return false;  // its phase planes are this without the zero taps (the stem)
  // im2col copies each of few input values about (K/s)^2 times. (Narrow groups, where packing is
  // also most of the time, measured slower: X' is one more pass over a large input.)
  return g.in_channels_per_group() <= 4 && g.kernel[1] > 2 * s && g.kernel[2] > 2 * s;
}

template <typename T>
bool space_to_depth(const ConvGeometry& g, const T* x, const T* w, bool nhwc, SpaceToDepth<T>& out) {
  const int64_t s = g.stride[1], C = g.in_channels, cg = g.in_channels_per_group(), H = g.in[1], W = g.in[2];
  const int64_t kh = ceil_div(g.kernel[1], s), kw = ceil_div(g.kernel[2], s);
  ConvGeometry t = g;
  t.in_channels = C * s * s;
  t.kernel[1] = kh, t.kernel[2] = kw;
  t.stride[1] = t.stride[2] = 1;
  t.pad[1] = t.pad[2] = 0;
  t.in[1] = g.out[1] + kh - 1, t.in[2] = g.out[2] + kw - 1;
  const int64_t Hp = t.in[1], Wp = t.in[2], Cp = t.in_channels, cpg = t.in_channels_per_group();

  // X'[(c, p, q), i, j] = x[c, s*i + p - pad_h, s*j + q - pad_w], zero outside x. Row tasks (n, i);
  // along j, phase q reads x inside columns [j_begin[q], j_end[q]).
  std::vector<int64_t> j_begin(s), j_end(s);
  for (int64_t q = 0; q < s; ++q) {
    j_begin[q] = std::min(Wp, std::max<int64_t>(0, ceil_div(g.pad[2] - q, s)));
    const int64_t last = W - 1 + g.pad[2] - q;  // s*j + q - pad_w <= W - 1
    j_end[q] = std::max(j_begin[q], last < 0 ? 0 : std::min(Wp, last / s + 1));
  }
  std::vector<T> xs(g.batch * Cp * Hp * Wp, T(0));
  std::vector<char> nonfinite_row(g.batch * Hp);
  parallel_for(0, g.batch * Hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / Hp, i = task % Hp;
      T seen = T(0);  // x * 0 is NaN for inf and NaN, else 0
      for (int64_t p = 0; p < s; ++p) {
        const int64_t ih = s * i + p - g.pad[1];
        if (ih < 0 || ih >= H) continue;  // a row of the zero padding
        for (int64_t q = 0; q < s; ++q) {
          const int64_t shift = q - g.pad[2];
          for (int64_t c = 0; c < C; ++c) {
            const int64_t cp = (c * s + p) * s + q;
            if (nhwc) {
              const T* src = x + (n * H + ih) * W * C + c;
              T* dst = xs.data() + (n * Hp + i) * Wp * Cp + cp;
              for (int64_t j = j_begin[q]; j < j_end[q]; ++j) {
                const T v = src[(s * j + shift) * C];
                seen += v * T(0);
                dst[j * Cp] = v;
              }
            } else {
              const T* src = x + ((n * C + c) * H + ih) * W;
              T* dst = xs.data() + ((n * Cp + cp) * Hp + i) * Wp;
              for (int64_t j = j_begin[q]; j < j_end[q]; ++j) {
                const T v = src[s * j + shift];
                seen += v * T(0);
                dst[j] = v;
              }
            }
          }
        }
      }
      nonfinite_row[task] = seen != T(0);
    }
  });
  if (std::find(nonfinite_row.begin(), nonfinite_row.end(), 1) != nonfinite_row.end()) return false;

  // W'[co, (c, p, q), a, b] = w[co, c, s*a + p, s*b + q], zero past the kernel (c within co's group)
  std::vector<T> ws(g.out_channels * cpg * kh * kw, T(0));
  for (int64_t co = 0; co < g.out_channels; ++co)
    for (int64_t c = 0; c < cg; ++c)
      for (int64_t r = 0; r < g.kernel[1]; ++r)
        for (int64_t k = 0; k < g.kernel[2]; ++k) {
          const int64_t cp = (c * s + r % s) * s + k % s;
          ws[((co * cpg + cp) * kh + r / s) * kw + k / s] = w[((co * cg + c) * g.kernel[1] + r) * g.kernel[2] + k];
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
