// Shared by the C++ and the CUDA sources of kdkernels._C.
#pragma once

#if defined(__CUDACC__)
#define KDK_HD __host__ __device__ __forceinline__
#define KDK_HDC __host__ __device__ constexpr
#else
#define KDK_HD inline
#define KDK_HDC constexpr
#endif

// Inline even where the compiler's heuristics would not: a kernel's inner loops
// must be compiled into their caller, with its ISA target and its compile-time
// sizes (the per-ISA runners of hint.cpp, the per-row helpers of kd.cpp).
#if defined(__GNUC__) || defined(__clang__)
#define KDK_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define KDK_ALWAYS_INLINE __forceinline
#else
#define KDK_ALWAYS_INLINE inline
#endif
