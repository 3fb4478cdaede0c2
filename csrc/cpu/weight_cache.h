#pragma once
// Weights prepared for a kernel (packed GEMM panels, reordered rows), kept between inference
// calls so a model run under no_grad packs each weight once instead of on every call.
//
// An entry is served only for the same weight, unchanged: the same TensorImpl and StorageImpl
// (held weakly, so neither address can be reused by a new tensor while the entry exists), the
// same data pointer, sizes, strides, dtype and version counter (bumped by every in-place op,
// optimizer steps and load_state_dict included; `param.data = t` swaps the StorageImpl).
// Writes that bypass the version counter (through `.data`, numpy() or DLPack aliases) are not
// seen, so the cache is off unless a user turns it on (cnnops.backends.cpu.cache_packed_weights,
// CNNOPS_WEIGHT_CACHE=1) for inference code that never writes weights that way.
// Used only with grad mode off (weights change every training step) and never for inference
// tensors (no version counter). Bounded (LRU) by entry count and bytes.
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/conv_shape.h"
#include "cpu/gemm.h"

namespace cnnops {
namespace cpu {

// What a kernel made from the weight: a kind id, then whatever else decides the result
// (group sizes, the micro-kernel's rows, sizeof(T)).
using WeightTag = std::array<int64_t, 6>;

// While alive (on this thread), cached_weight() calls whose kernel_weight is `kernel_weight`
// (the pointer the kernel gets: `weight`'s data, or its contiguous float copy) may use the cache.
class WeightCacheScope {
 public:
  WeightCacheScope(const at::Tensor& weight, const void* kernel_weight);
  ~WeightCacheScope();
  WeightCacheScope(const WeightCacheScope&) = delete;
  WeightCacheScope& operator=(const WeightCacheScope&) = delete;

 private:
  bool active_ = false;
};

// Whether cached_weight() calls for kernel_weight may be served from the cache now (a scope for it
// is active): a kernel that could read the weight in place instead of packing it asks first.
bool weight_cache_serves(const void* kernel_weight);

using WeightMaker = c10::function_ref<std::shared_ptr<const void>()>;
std::shared_ptr<const void> cached_weight_impl(const void* kernel_weight, const WeightTag& tag, int64_t bytes,
                                               WeightMaker make);

// make() (returning std::shared_ptr<V>, about `bytes` large) from the cache when a scope for
// kernel_weight is active and an entry is valid, else made now (and stored when a scope is).
template <typename V, typename Make>
std::shared_ptr<const V> cached_weight(const void* kernel_weight, const WeightTag& tag, int64_t bytes, Make&& make) {
  auto made = cached_weight_impl(kernel_weight, tag, bytes,
                                 [&]() -> std::shared_ptr<const void> { return std::shared_ptr<const V>(make()); });
  return std::static_pointer_cast<const V>(made);
}

// Every group's W_g (M x K, row-major at w + g*M*K) packed as the GEMM's A, the panels packed
// in parallel; from the cache when a scope for w is active.
template <typename T>
std::shared_ptr<const std::vector<PackedA<T>>> packed_group_weights(const ConvGeometry& g, const T* w);

}  // namespace cpu
}  // namespace cnnops
