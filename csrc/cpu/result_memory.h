#pragma once
// Storage for the tensors the CPU ops return, reused from results freed earlier. A network's
// activations are tens of MB each: malloc maps such blocks fresh from the system and unmaps them on
// free, so every step page-faults them in again (ResNet-50, channels_last, batch 8, eval: 27-31k
// faults and 42-52 ms of system time in a 206 ms step, torch.nn alike). Freed blocks of 1 MiB and
// more wait here, by size, for the next result they hold with at most an eighth to spare, up to a
// byte limit; smaller ones go to torch's CPU allocator as before.
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstdint>

namespace cnnops {
namespace cpu {

// An empty tensor (sizes, options' dtype, CPU) in `format`, whose storage comes from the pool
// while keeping results is on; torch's CPU allocator otherwise. Resizable like at::empty's.
at::Tensor empty_result(c10::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous);
// at::empty_like(x): x's sizes and, where x is dense, its strides.
at::Tensor empty_result_like(const at::Tensor& x);

// cnnops.backends.cpu.keep_result_memory: whether freed results wait for reuse (true by default).
// Turning it off releases what the pool holds.
void set_result_memory_kept(bool kept);
bool result_memory_kept();
// Releases every block the pool holds (cnnops.backends.cpu.empty_cache()).
void release_result_memory();
// Bytes the pool holds now, and the most it holds (blocks freed past it go back to the system).
int64_t result_memory_held_bytes();
int64_t result_memory_limit_bytes();
// Tests: bytes >= 0 replaces the limit, -1 restores it; either releases what the pool holds.
void set_result_memory_limit(int64_t bytes);
// Results whose storage the pool gave (tests).
int64_t result_memory_reuse_count();

}  // namespace cpu
}  // namespace cnnops
