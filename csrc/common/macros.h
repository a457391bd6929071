// Shared by the C++ and the CUDA sources of kdkernels._C.
#pragma once

#if defined(__CUDACC__)
#define KDK_HD __host__ __device__ __forceinline__
#define KDK_HDC __host__ __device__ constexpr
#else
#define KDK_HD inline
#define KDK_HDC constexpr
#endif
