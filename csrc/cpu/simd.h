#pragma once
// SIMD in cnnops' CPU kernels, one rule for new code:
//  - A kernel that needs explicit vectors is written once per ISA as a function carrying
//    CNNOPS_TARGET_AVX512 or CNNOPS_TARGET_AVX2 (intrinsics, or GCC vector extensions inlined
//    into it), beside a portable C++ version of the same loop.
//  - The caller picks one with cpu_isa(), chosen once per process, so every kernel family runs the
//    same ISA and CNNOPS_CPU_ISA=avx2|portable lets the tests run each version on one machine.
//  - Only these functions carry target attributes: no AVX-512 instruction can reach a CPU without it.
//  - Plain loops that GCC vectorizes well stay plain.
//  - A plain loop that must be compiled for each ISA to vectorize well (pooling, normalization)
//    is written once, as a CNNOPS_ALWAYS_INLINE template, and run through simd_dispatch below,
//    which instantiates it in one function per ISA.
// Target functions, unlike target_clones ones, pass exceptions on (GCC 12 cannot unwind out of
// target_clones, which cnnops no longer uses).
#include <cstdint>
#include <type_traits>

#include "common/macros.h"

namespace cnnops {
namespace cpu {

enum class Isa { Portable, Avx2, Avx512 };

// The widest ISA this CPU runs, capped by the CNNOPS_CPU_ISA environment variable.
Isa cpu_isa();
const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace cnnops

#if defined(__x86_64__) || defined(__i386__)
#define CNNOPS_X86 1
#define CNNOPS_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))
#define CNNOPS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define CNNOPS_X86 0
#endif

// Marks a lambda handed to simd_dispatch: inlined into each per-ISA function, so compiled for it.
#define CNNOPS_SIMD_BODY __attribute__((always_inline))

namespace cnnops {
namespace cpu {

// The ISA a body is instantiated for, usable as a template argument (body<isa>(...)).
template <Isa kIsa>
using IsaTag = std::integral_constant<Isa, kIsa>;

namespace detail {
#if CNNOPS_X86
template <typename F>
CNNOPS_TARGET_AVX512 decltype(auto) run_avx512(F& body) {
  return body(IsaTag<Isa::Avx512>{});
}
template <typename F>
CNNOPS_TARGET_AVX2 decltype(auto) run_avx2(F& body) {
  return body(IsaTag<Isa::Avx2>{});
}
#endif
}  // namespace detail

// Runs body(IsaTag<isa>{}) compiled for the ISA cpu_isa() picks: body is a CNNOPS_SIMD_BODY
// lambda whose loops are CNNOPS_ALWAYS_INLINE (a loop GCC does not inline would keep the
// baseline ISA). Call it around a whole loop nest, not per element: each call is a switch.
//   simd_dispatch([&](auto isa) CNNOPS_SIMD_BODY { kernel<isa>(args...); });
template <typename F>
decltype(auto) simd_dispatch(F&& body) {
#if CNNOPS_X86
  switch (cpu_isa()) {
    case Isa::Avx512:
      return detail::run_avx512(body);
    case Isa::Avx2:
      return detail::run_avx2(body);
    default:
      break;
  }
#endif
  return body(IsaTag<Isa::Portable>{});
}

// simd_dispatch of one call that needs no ISA tag: CNNOPS_SIMD_CALL(kernel<T>(args...)) returns
// what the call returns.
#define CNNOPS_SIMD_CALL(...) ::cnnops::cpu::simd_dispatch([&](auto) CNNOPS_SIMD_BODY { return __VA_ARGS__; })

}  // namespace cpu
}  // namespace cnnops
