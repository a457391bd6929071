// Four planes x four elements, transposed in SSE registers: the moves between plane-major
// data (a[k][e], four planes k) and the lane-major batches of HCL's batch kernels
// (d[e * stride + k], one plane per lane). Four 16-byte stores instead of sixteen scalar
// ones: the scalar transpose was most of BatchKernel's time.
#pragma once

#include <cstdint>

#if defined(__SSE2__)
#include <emmintrin.h>

namespace kdk {

// d[j * stride + k] = a[k][e + j] - b[k][e + j] for j, k < 4.
inline void sub_transpose4(const float* const* a, const float* const* b, int64_t e, float* d, int64_t stride) {
  __m128 r0 = _mm_sub_ps(_mm_loadu_ps(a[0] + e), _mm_loadu_ps(b[0] + e));
  __m128 r1 = _mm_sub_ps(_mm_loadu_ps(a[1] + e), _mm_loadu_ps(b[1] + e));
  __m128 r2 = _mm_sub_ps(_mm_loadu_ps(a[2] + e), _mm_loadu_ps(b[2] + e));
  __m128 r3 = _mm_sub_ps(_mm_loadu_ps(a[3] + e), _mm_loadu_ps(b[3] + e));
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(d, r0);
  _mm_storeu_ps(d + stride, r1);
  _mm_storeu_ps(d + 2 * stride, r2);
  _mm_storeu_ps(d + 3 * stride, r3);
}

// d[j * stride + k] = a[k][e + j] for j, k < 4.
inline void transpose4(const float* const* a, int64_t e, float* d, int64_t stride) {
  __m128 r0 = _mm_loadu_ps(a[0] + e), r1 = _mm_loadu_ps(a[1] + e);
  __m128 r2 = _mm_loadu_ps(a[2] + e), r3 = _mm_loadu_ps(a[3] + e);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(d, r0);
  _mm_storeu_ps(d + stride, r1);
  _mm_storeu_ps(d + 2 * stride, r2);
  _mm_storeu_ps(d + 3 * stride, r3);
}

// The inverse: out[k][e + j] = x[j * stride + k] for j, k < 4.
inline void transpose4_store(const float* x, int64_t stride, float* const* out, int64_t e) {
  __m128 r0 = _mm_loadu_ps(x), r1 = _mm_loadu_ps(x + stride);
  __m128 r2 = _mm_loadu_ps(x + 2 * stride), r3 = _mm_loadu_ps(x + 3 * stride);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(out[0] + e, r0);
  _mm_storeu_ps(out[1] + e, r1);
  _mm_storeu_ps(out[2] + e, r2);
  _mm_storeu_ps(out[3] + e, r3);
}

}  // namespace kdk
#endif
