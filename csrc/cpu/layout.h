#pragma once
// Memory-format conversion between NC(D)HW planes and N(D)HWC rows of channels, for the kernels
// that run one layout on a tensor of the other.
#include <ATen/core/Tensor.h>

namespace cnnops {
namespace cpu {

// t with `format`'s strides (t itself when it has them). A dense float32 or float64 4-d/5-d
// tensor in the other layout is converted by a cache-blocked transpose per sample, in parallel;
// anything else by t.contiguous(format). (torch's copy walks the strided side one element at
// a time: about 1 GB/s on a 25 MB channels-last gradient here, several times slower.)
at::Tensor contiguous_as(const at::Tensor& t, at::MemoryFormat format);

}  // namespace cpu
}  // namespace cnnops
