#pragma once
// Winograd convolution F(4x4, 3x3) and F(2x2, 3x3) for float32 3x3 (and 3x3x3) stride-1 layers
// (conv_winograd.cpp).
#include <atomic>
#include <cstdint>
#include <vector>

#include "common/activation.h"
#include "common/conv_shape.h"
#include "cpu/conv_cpu.h"
#include "cpu/gemm.h"

namespace cnnops {
namespace cpu {

// cnnops.backends.cpu.allow_winograd: read by every call, so a change takes effect on the next one.
void set_winograd_allowed(bool allowed);
bool winograd_allowed();
// Convolutions that took the Winograd path since the process started (tests check the switch).
int64_t winograd_call_count();
// Weight gradients that took the Winograd path (conv_backward_weight_winograd).
int64_t winograd_weight_call_count();
// Tests and benchmarks: tiles >= 0 replaces the size rules of use_winograd by "at least this many
// tiles" (0: every eligible geometry, however small); -1 restores them.
void set_winograd_min_tiles(int64_t tiles);
// Tests and benchmarks: 1 makes every Winograd forward stream its weights (stream_weights), 0 none,
// -1 restores the size rule.
void set_winograd_weight_streaming(int64_t mode);
// Winograd forwards that streamed their weights since the process started.
int64_t winograd_streamed_call_count();
// Tests and benchmarks: 2 or 4 makes every Winograd forward run F(m x m, 3x3) with that m (the size
// rules still decide whether Winograd runs); 0 restores the choice.
void set_winograd_tile(int64_t m);
// Winograd forwards that ran F(2x2, 3x3) since the process started.
int64_t winograd_small_tile_call_count();
// Whether set_winograd_min_tiles replaces the size rules now (other kernels' rules then defer to it).
bool winograd_size_rules_replaced();

// The output tile m of the F(m x m, 3x3) that the forward runs this geometry with: 4 or 2, or 0 for
// none. Nonzero when the switch is on, the layer is a 2d 3x3 (or 3d 3x3x3) stride-1 dilation-1
// non-depthwise convolution, and its sizes are ones where Winograd pays: 4 where F(4x4) has tiles
// enough for its GEMMs, else 2 on small maps of many channels.
int64_t winograd_tile(const ConvGeometry& g);
bool use_winograd(const ConvGeometry& g);  // winograd_tile(g) != 0

// Whether conv_backward_weight_winograd (F(4x4, 3x3) only) serves g: the layers the forward runs
// with F(4x4), 2-d and 3x3x3.
bool use_winograd_weight_gradient(const ConvGeometry& g);

// Whether the forward of F(tile x tile, 3x3) makes U = G g G^T a slab of (output, input) channels at
// a time inside the products, where it stays in L2, instead of all of it first (winograd_weights),
// which the products then read back from memory when it is larger than the caches.
bool stream_weights(const ConvGeometry& g, int64_t tile);

// A 3x3 (3x3x3: depth x 3 x 3) weight as Winograd reads it, in place: value (co, ci, tap) of group
// grp, with co and ci the channels of the problem it runs and tap = 9 * depth tap + 3 * row + column,
// at
//   w[grp * group_stride + co * co_stride + ci * ci_stride + t * tap_stride],
// t = tap, or 9 * depth - 1 - tap when rotated. Reads stay before `end`. Rotated views read grad
// input's kernel (the forward weight turned 180 degrees, its channels swapped) where the forward
// weight lies.
struct WinogradWeightView {
  const float* w;
  int64_t co_stride, ci_stride, tap_stride, group_stride;
  int64_t depth;  // taps in depth: 1 (2-d) or 3
  bool rotated;
  const float* end;
};

// The transformed weights U = G g G^T of F(tile x tile, 3x3), one packed GEMM operand per (depth
// tap, transform position, group): u[(kd * (tile + 2)^2 + xi) * groups + group]. Computed per call
// (into storage reused between calls); a cache keyed by the weight's version can hold it instead.
struct WinogradWeights {
  std::vector<PackedA<float>> u;
  int64_t tile = 4;
  bool finite = true;  // false when a weight is inf or NaN
};
void winograd_weights(const ConvGeometry& g, int64_t tile, const WinogradWeightView& w, WinogradWeights& out);

// y = activation(conv(x, w) + bias) with x and y NCHW, or NHWC when nhwc. Returns false, y
// unfinished, when x or w holds an inf or NaN: Winograd's transforms would spread it to outputs
// whose window does not hold it (0 * inf), so the caller runs the direct path instead.
bool conv_forward_winograd(const ConvGeometry& g, const float* x, const WinogradWeights& weights, const float* bias,
                           float* y, bool nhwc, Activation activation);
// The same with the weights transformed by this call: streamed, or into per-thread storage kept for
// the next call.
bool conv_forward_winograd(const ConvGeometry& g, const float* x, const WinogradWeightView& w, const float* bias,
                           float* y, bool nhwc, Activation activation);

// dW of a float32 convolution that use_winograd_weight_gradient accepts, in `order` (OIHW or OHWI), dy and x NCHW,
// or NHWC when nhwc: G^T [sum over tiles of (A dY A^T) .* (B^T d B)] G (formulas.md §Winograd).
// Returns false, dw unwritten, when x or dy holds an inf or NaN (the caller runs the direct path).
bool conv_backward_weight_winograd(const ConvGeometry& g, const float* dy, const float* x, float* dw, bool nhwc,
                                   WeightOrder order);

}  // namespace cpu
}  // namespace cnnops
