// Four planes x four elements, transposed in SSE registers: the moves between plane-major
// data (plane k at a + k * plane, element e) and the lane-major batches of HCL's batch
// kernels (d[e * stride + k], one plane per lane). Four 16-byte stores instead of sixteen
// scalar ones: the scalar transpose was most of BatchKernel's time. The batch kernels' planes
// are adjacent, so a base pointer and the plane size give every address (with the plane size
// known at compile time, the base plus a constant; arrays of four pointers were reloaded from
// the stack on every call in the loops).
#pragma once

#include <cstdint>

#if defined(__SSE2__)
#include <emmintrin.h>

namespace kdk {

// d[j * stride + k] = a[k * plane + e + j] - b[k * plane + e + j] for j, k < 4.
inline void sub_transpose4(const float* a, const float* b, int64_t plane, int64_t e, float* d, int64_t stride) {
  __m128 r0 = _mm_sub_ps(_mm_loadu_ps(a + e), _mm_loadu_ps(b + e));
  __m128 r1 = _mm_sub_ps(_mm_loadu_ps(a + plane + e), _mm_loadu_ps(b + plane + e));
  __m128 r2 = _mm_sub_ps(_mm_loadu_ps(a + 2 * plane + e), _mm_loadu_ps(b + 2 * plane + e));
  __m128 r3 = _mm_sub_ps(_mm_loadu_ps(a + 3 * plane + e), _mm_loadu_ps(b + 3 * plane + e));
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(d, r0);
  _mm_storeu_ps(d + stride, r1);
  _mm_storeu_ps(d + 2 * stride, r2);
  _mm_storeu_ps(d + 3 * stride, r3);
}

// d[j * stride + k] = a[k * plane + e + j] for j, k < 4.
inline void transpose4(const float* a, int64_t plane, int64_t e, float* d, int64_t stride) {
  __m128 r0 = _mm_loadu_ps(a + e), r1 = _mm_loadu_ps(a + plane + e);
  __m128 r2 = _mm_loadu_ps(a + 2 * plane + e), r3 = _mm_loadu_ps(a + 3 * plane + e);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(d, r0);
  _mm_storeu_ps(d + stride, r1);
  _mm_storeu_ps(d + 2 * stride, r2);
  _mm_storeu_ps(d + 3 * stride, r3);
}

// The inverse: out[k * plane + e + j] = x[j * stride + k] for j, k < 4.
inline void transpose4_store(const float* x, int64_t stride, float* out, int64_t plane, int64_t e) {
  __m128 r0 = _mm_loadu_ps(x), r1 = _mm_loadu_ps(x + stride);
  __m128 r2 = _mm_loadu_ps(x + 2 * stride), r3 = _mm_loadu_ps(x + 3 * stride);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(out + e, r0);
  _mm_storeu_ps(out + plane + e, r1);
  _mm_storeu_ps(out + 2 * plane + e, r2);
  _mm_storeu_ps(out + 3 * plane + e, r3);
}

}  // namespace kdk
#endif
