#pragma once
// Functions in csrc/common are compiled for the host and, under nvcc, for the device too,
// so the CPU tests exercise the very index math the CUDA kernels run.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define CNNOPS_HD __host__ __device__ __forceinline__
#else
#define CNNOPS_HD inline
#endif
