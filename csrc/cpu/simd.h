#pragma once
// SIMD in cnnops' CPU kernels, one rule for new code:
//  - A kernel that needs explicit vectors is written once per ISA as a function carrying
//    CNNOPS_TARGET_AVX512 or CNNOPS_TARGET_AVX2 (intrinsics, or GCC vector extensions inlined
//    into it), beside a portable C++ version of the same loop.
//  - The caller picks one with cpu_isa(), chosen once per process, so every kernel family runs the
//    same ISA and CNNOPS_CPU_ISA=avx2|portable lets the tests run each version on one machine.
//  - Only these functions carry target attributes: no AVX-512 instruction can reach a CPU without it.
//  - Plain loops that GCC vectorizes well stay plain.
#include <cstdint>

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
