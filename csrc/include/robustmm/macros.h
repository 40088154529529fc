// Portability macros shared by the CPU (.cpp) and CUDA (.cu) kernels.
#pragma once

#if defined(__CUDACC__)
#define RMM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RMM_HOST_DEVICE inline
#endif

// Host-only helpers that must be inlined into a caller compiled for another ISA
// (see csrc/cpu: the AVX2 clone of a kernel inlines the same body as the baseline one).
#if defined(__GNUC__) && !defined(__CUDACC__)
#define RMM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RMM_ALWAYS_INLINE inline
#endif
