#pragma once
// Overflow-checked size arithmetic: the one place where sizes derived from user arguments
// (padded size, dilated kernel extent, output size, allocation sizes) are computed. The
// geometry builders (conv_checks.h, pool_checks.h) call these before any allocation or kernel,
// so kernels may then do plain int64 arithmetic on the geometry.
//
// Everything that may throw (argument checks, these size checks, allocations) happens before
// a kernel's loops start; the loops only run over buffers they are handed.
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <limits>

namespace cnnops {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// a + b and a * b, or false when the exact result does not fit int64.
inline bool add_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }
inline bool mul_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

// a * b clamped to int64's max: for work estimates (grain sizes), never for sizes.
inline int64_t saturating_mul(int64_t a, int64_t b) {
  int64_t r;
  return mul_fits(a, b, &r) ? r : kInt64Max;
}

// The product of non-negative sizes (an element count), or an error naming `what`: a
// RuntimeError in the words torch uses for an overflowing numel, or, with `gap` set (a buffer
// only cnnops needs, where torch still computes a result), a NotImplementedError.
inline int64_t checked_numel(std::initializer_list<int64_t> sizes, const char* what, bool gap = false) {
  int64_t n = 1;
  for (const int64_t s : sizes) {
    if (s == 0) return 0;  // an empty dim makes any product empty, overflow or not
  }
  for (const int64_t s : sizes) {
    if (mul_fits(n, s, &n)) continue;
    TORCH_CHECK_NOT_IMPLEMENTED(!gap, what, ": the size ", c10::IntArrayRef(sizes),
                                " has more than 2^63 - 1 elements, which cnnops cannot allocate");
    TORCH_CHECK(false, what, ": integer multiplication overflow (the size ", c10::IntArrayRef(sizes),
                " has more than 2^63 - 1 elements)");
  }
  return n;
}

// One spatial dim of a sliding window, in exact (128-bit) arithmetic:
//   padded = in + 2 * pad, extent = dilation * (kernel - 1) + 1 (the dilated kernel's span).
// Inputs: in >= 0, kernel >= 0 (a zero kernel spans 1 - dilation, as in torch), stride >= 1,
// pad >= 0, dilation >= 1, each an int64.
struct WindowDim {
  __int128 padded, extent;
};
inline WindowDim window_dim(int64_t in, int64_t kernel, int64_t pad, int64_t dilation) {
  return {static_cast<__int128>(in) + 2 * static_cast<__int128>(pad),
          static_cast<__int128>(dilation) * (kernel - 1) + 1};
}

// Number of windows: floor((padded - extent) / stride) + 1, or with ceil_mode rounded up, where
// the last window must start inside the input or its left padding (torch's rule). May be <= 0
// (the caller rejects that) and is clamped to int64 (a larger count cannot be allocated, and
// the caller's numel check then says so).
inline int64_t window_count(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation, bool ceil_mode) {
  const WindowDim w = window_dim(in, kernel, pad, dilation);
  const __int128 span = w.padded - w.extent + (ceil_mode ? stride - 1 : 0);
  __int128 q = span / stride;
  if (span % stride != 0 && span < 0) --q;  // floor
  __int128 out = q + 1;
  if (ceil_mode && (out - 1) * stride >= static_cast<__int128>(in) + pad) --out;
  if (out > kInt64Max) return kInt64Max;
  if (out < -1) return -1;
  return static_cast<int64_t>(out);
}

// Whether the dilated kernel extent fits int64 (window offsets in the kernels need it to).
inline bool extent_fits(int64_t kernel, int64_t dilation) {
  return window_dim(0, kernel, 0, dilation).extent <= kInt64Max;
}

}  // namespace cnnops
