#pragma once
// Memory-format conversion between NC(D)HW planes and N(D)HWC rows of channels, for the kernels
// that run one layout on a tensor of the other.
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdlib>
#include <memory>

#include "cpu/scratch.h"

namespace cnnops {
namespace cpu {

// t with `format`'s strides (t itself when it has them). A dense float32 or float64 4-d/5-d
// tensor in the other layout is converted by a cache-blocked transpose per sample, in parallel;
// anything else by t.contiguous(format). (torch's copy walks the strided side one element at
// a time: about 1 GB/s on a 25 MB channels-last gradient here, several times slower.)
// Storage for one tensor that lives only inside an op call (an operand copied into the kernels'
// layout, a result before its conversion), kept by this thread for its next call when at most
// 64 MiB: fresh storage of MBs, which malloc hands back to the system between calls, is
// page-faulted in on every call (a channels-last 1x1 grad input at 7x7, batch 8: 1,071 faults,
// 1.6 of 2.4 ms). A tensor from empty() is valid until the next empty() on the same storage and
// must not leave the call.
class KeptStorage {
 public:
  at::Tensor empty(c10::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format);

  // n values of scratch in the kept storage, or past its limit in `fresh`, allocated now. Valid
  // until the next call on this storage; written before they are read.
  template <typename T>
  T* values(int64_t n, Scratch<T>& fresh) {
    if (void* kept = reserve(size_t(n) * sizeof(T))) return static_cast<T*>(kept);
    fresh = scratch<T>(n);
    return fresh.get();
  }

 private:
  static constexpr size_t kLimitBytes = size_t(64) << 20;
  void* reserve(size_t bytes);  // the kept storage grown to `bytes`, or nullptr past kLimitBytes

  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> data_;
  size_t bytes_ = 0;
};

// ... the copy (when one is made) in `storage`'s memory when given.
at::Tensor contiguous_as(const at::Tensor& t, at::MemoryFormat format, KeptStorage* storage = nullptr);

}  // namespace cpu
}  // namespace cnnops
