#pragma once
// Kernel-side buffers aligned to a cache line. The micro-kernels load packed operands (GEMM panels,
// im2col blocks, padded planes, Winograd's transforms) in whole 64-byte vectors, which straddle two
// lines wherever malloc's 16-byte alignment leaves a buffer (NCHW 3x3 forward, 512 channels at 7x7,
// batch 2, 1 thread: 3.0-3.2 ms aligned, 3.3-3.5 ms with every buffer 16 or 32 bytes past a line).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace cnnops {
namespace cpu {

constexpr std::size_t kOperandAlignment = 64;

struct AlignedDelete {
  void operator()(void* p) const noexcept { ::operator delete[](p, std::align_val_t(kOperandAlignment)); }
};

// Scratch memory that is always written before it is read (GEMM workspaces, output tiles, operand
// copies): left uninitialized, where a std::vector would zero hundreds of KB on every call.
template <typename T>
using Scratch = std::unique_ptr<T[], AlignedDelete>;

template <typename T>
Scratch<T> scratch(int64_t n) {
  static_assert(std::is_trivially_default_constructible_v<T>, "scratch holds plain values");
  return Scratch<T>(static_cast<T*>(::operator new[](std::size_t(n) * sizeof(T), std::align_val_t(kOperandAlignment))));
}

// An aligned allocator whose resize() leaves new values uninitialized, for buffers that are written
// whole before they are read (assign() and the value constructors still fill).
template <typename T>
struct OperandAllocator {
  using value_type = T;
  OperandAllocator() = default;
  template <typename U>
  OperandAllocator(const OperandAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kOperandAlignment)));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kOperandAlignment)); }
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const OperandAllocator<U>&) const noexcept {
    return true;
  }
};

template <typename T>
using OperandVector = std::vector<T, OperandAllocator<T>>;

}  // namespace cpu
}  // namespace cnnops
