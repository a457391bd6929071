// ABF fusion on CPU (docs/spec.md §2, step 2; the per-pixel math is in kdkernels/triton/abf.py).
//
// x, out, grad_out g, grad_x: (N, C, H, W); y, grad_y: (N, C, h, w); z: (N, 2, H, W)
// in the accumulation type A (float; double for float64). Weights w[k][c] act on
// x, w[k][C + c] on u = up(y). Output row r reads source row srow[r], column j
// source column scol[j] (the legacy nearest rule, in float32 like PyTorch); both
// maps are monotone, so the output rows of source row q are the run
// [rfirst[q], rfirst[q + 1]) (the same for columns), possibly empty.
//
// Work split. A work unit is (sample n, a group of consecutive source rows
// [q0, q1)) and owns every output row of those source rows: the scatter of
// grad_u into grad_y stays inside one unit, so no two threads ever write the
// same grad_y element and nothing needs atomics. The groups depend on the
// shapes only; each unit writes its partial sums of grad_w and grad_b to its own
// slot, and the slots are added afterwards in unit order (the second, small
// reduction). Results therefore depend neither on the thread count nor on
// scheduling: bitwise deterministic.
//
// Inside a unit, output rows go in chunks of about kChunkBytes per full-size
// tensor, so that the chunk of every channel of x (and g) is still in L2 when
// the second sweep, which writes the outputs, reads it again. The channel
// reductions take kGroup channels per sweep over the chunk (fewer passes over
// the accumulators). Work moved to y's resolution where the math allows:
//  - forward: the y half of the logits, sum_c w[k][C + c] y_c, is computed once
//    per source pixel and gathered per output pixel (2 values, not C);
//  - backward: the y half of grad_w, sum_p da_k(p) u_c(p) = sum_q y_c(q) D_k(q)
//    with D_k(q) = the sum of da_k over the output pixels of q, and the
//    w[k][C + c] D_k(q) terms of grad_y; only g z_1 is scattered per channel.
// The backward's per-channel pass (grad_x, g z_1 and the x half of grad_w)
// also takes kGroup channels per sweep, with explicit short vectors (vec_t) so
// that its dot products vectorise in a fixed lane order. When h = w = 1 (point)
// nothing is gathered: u_c is the scalar y_c, and the scatter of g z_1 is a
// plain sum taken in that same sweep. When H = 2h and W = 2w (halves, the usual
// ReviewKD level) u is not gathered either: the sweeps read y's rows and repeat
// each value in registers, and g z_1 is summed per 2x2 block in registers and
// added to grad_y's accumulator without a buffer. Other shapes take the
// general gather / scatter path.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/dtype.h"
#include "../common/parallel.h"

namespace kdk {
namespace {

constexpr int64_t kUnitPixels = 2048;     // output pixels per work unit (at least one source row's worth)
constexpr int64_t kChunkBytes = 1 << 20;  // bytes of one full-size tensor per chunk (at least one row)
constexpr int kGroup = 4;                 // channels per sweep of a channel reduction
constexpr int kLanes = 8;                 // independent partial sums of the grad_b / point-scatter sums (fixed order)

// Short vectors of the accumulation type (GCC / Clang vector extension), 16
// bytes: one SSE2 / NEON register on the portable baseline. Written out so the
// per-pixel loops that also carry reductions vectorise: the compiler may not
// reorder a scalar sum by itself, and this fixes the order (lane l of a
// vector sums the pixels k = l mod V, then the lanes add up in order).
template <typename A> struct VecOf;
template <> struct VecOf<float> { typedef float type __attribute__((vector_size(16))); };
template <> struct VecOf<double> { typedef double type __attribute__((vector_size(16))); };
template <typename A> using vec_t = typename VecOf<A>::type;
template <typename A> constexpr int kVec = int(16 / sizeof(A));

// The explicit-vector paths below serve float and double storage. fp16 / bf16
// keep the scalar loops (gather into a buffer, one channel per sweep): the
// compiler vectorises those together with the bit-level conversions, which an
// element-by-element vload would not.
template <typename T, typename A> constexpr bool kDirect = std::is_same<T, A>::value;

template <typename A>
inline vec_t<A> splat(A a) {
  vec_t<A> v;
  for (int i = 0; i < kVec<A>; ++i) v[i] = a;
  return v;
}

template <typename T, typename A>
inline vec_t<A> vload(const T* p) {
  vec_t<A> v;
  if constexpr (std::is_same<T, A>::value) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int i = 0; i < kVec<A>; ++i) v[i] = Scalar<T>::load(p[i]);
  }
  return v;
}

template <typename T, typename A>
inline void vstore(T* p, vec_t<A> v) {
  if constexpr (std::is_same<T, A>::value) {
    std::memcpy(p, &v, sizeof v);
  } else {
    for (int i = 0; i < kVec<A>; ++i) p[i] = Scalar<T>::store(v[i]);
  }
}

// (v0, v0, v1, v1, ...) and the same from the upper half of v: each source
// value repeated for its two output columns when W = 2w.
template <typename A>
inline vec_t<A> dup_lo(vec_t<A> v) {
  vec_t<A> r;
  for (int i = 0; i < kVec<A>; ++i) r[i] = v[i / 2];
  return r;
}

template <typename A>
inline vec_t<A> dup_hi(vec_t<A> v) {
  vec_t<A> r;
  for (int i = 0; i < kVec<A>; ++i) r[i] = v[kVec<A> / 2 + i / 2];
  return r;
}

template <typename A>
inline A vsum(vec_t<A> v) {
  A t = 0;
  for (int i = 0; i < kVec<A>; ++i) t += v[i];
  return t;
}

int64_t dtype_size(int dtype) { return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2; }

struct Plan {
  int64_t N, C, H, W, h, w;
  std::vector<int64_t> srow, scol;      // source row / column of each output row / column
  std::vector<int64_t> rfirst, cfirst;  // first output row / column of each source one; [h] = H, [w] = W
  std::vector<int64_t> unit_q;          // unit i of a sample covers source rows [unit_q[i], unit_q[i + 1])
  int64_t chunk_rows;
  bool halves;  // H = 2h and W = 2w exactly (the usual ReviewKD level): 2x2 fast paths, even chunks
  bool point;   // h = w = 1: up(y) is one value per channel
  int64_t units_per_sample() const { return int64_t(unit_q.size()) - 1; }
};

std::vector<int64_t> source_index(int64_t out, int64_t in, double scale) {
  std::vector<int64_t> src(out);
  const float s = float(scale);
  for (int64_t i = 0; i < out; ++i) {
    const int64_t v = static_cast<int64_t>(std::floor(static_cast<float>(i) * s));
    src[i] = std::min(v, in - 1);
  }
  return src;
}

std::vector<int64_t> run_starts(const std::vector<int64_t>& src, int64_t in) {
  std::vector<int64_t> first(in + 1);
  const int64_t out = int64_t(src.size());
  int64_t i = 0;
  for (int64_t q = 0; q <= in; ++q) {
    while (i < out && src[i] < q) ++i;
    first[q] = i;
  }
  return first;
}

Plan make_plan(const char* where, int dtype, int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w,
               double scale_h, double scale_w) {
  if (N <= 0 || C <= 0 || H <= 0 || W <= 0 || h <= 0 || w <= 0 || h > H || w > W)
    throw std::invalid_argument(std::string(where) + ": invalid sizes");
  Plan p{N, C, H, W, h, w, {}, {}, {}, {}, {}, 1, H == 2 * h && W == 2 * w, h == 1 && w == 1};
  p.srow = source_index(H, h, scale_h);
  p.scol = source_index(W, w, scale_w);
  p.rfirst = run_starts(p.srow, h);
  p.cfirst = run_starts(p.scol, w);
  p.unit_q.push_back(0);
  for (int64_t q = 1; q <= h; ++q)
    if (q == h || (p.rfirst[q] - p.rfirst[p.unit_q.back()]) * W >= kUnitPixels) p.unit_q.push_back(q);
  p.chunk_rows = std::max<int64_t>(1, kChunkBytes / (dtype_size(dtype) * C * W));
  if (p.halves) p.chunk_rows = std::max<int64_t>(2, p.chunk_rows & ~int64_t(1));  // whole row pairs
  return p;
}

// Output rows [r0, r1) of a chunk grouped by source row: group i is the rows
// [start[i], start[i + 1]), all reading source row src[i].
struct RowGroups {
  std::vector<int64_t> start, src;
  void build(int64_t r0, int64_t r1, const Plan& p) {
    start.clear();
    src.clear();
    for (int64_t r = r0; r < r1; ++r)
      if (r == r0 || p.srow[r] != p.srow[r - 1]) {
        start.push_back(r);
        src.push_back(p.srow[r]);
      }
    start.push_back(r1);
  }
  int64_t size() const { return int64_t(src.size()); }
};

template <typename A>
inline A lanes_total(const A* lanes) {
  A t = 0;
  for (int l = 0; l < kLanes; ++l) t += lanes[l];
  return t;
}

// One output row of u = up(y) from channel plane yc: urow[j] = yc[sr * w + scol[j]].
template <typename T, typename A>
inline void gather_row(const T* __restrict yc, int64_t sr, A* __restrict urow, const Plan& p) {
  using S = Scalar<T>;
  const T* __restrict yr = yc + sr * p.w;
  if (p.W == p.w) {
    for (int64_t j = 0; j < p.W; ++j) urow[j] = S::load(yr[j]);
  } else if (p.W == 2 * p.w) {  // scale exactly 1/2
    for (int64_t q = 0; q < p.w; ++q) urow[2 * q] = urow[2 * q + 1] = S::load(yr[q]);
  } else {
    const int64_t* __restrict sc = p.scol.data();
    for (int64_t j = 0; j < p.W; ++j) urow[j] = S::load(yr[sc[j]]);
  }
}

// u = up(y) over the chunk's rows, from the rows of a y-resolution plane yc
// that starts at source row q0: one gather per source row, copied to the other
// output rows of that source row.
template <typename T, typename A>
inline void gather_chunk(const T* yc, int64_t q0, const RowGroups& rg, int64_t r0, A* u, const Plan& p) {
  using S = Scalar<T>;
  const int64_t W = p.W;
  if (p.point) {  // one source pixel
    const A v = S::load(yc[0]);
    const int64_t P = (rg.start.back() - r0) * W;
    for (int64_t k = 0; k < P; ++k) u[k] = v;
    return;
  }
  if (p.halves) {  // source row i feeds output rows 2i, 2i + 1 (the chunk holds whole pairs)
    const int64_t w = p.w;
    for (int64_t i = r0 / 2; i < rg.start.back() / 2; ++i) {
      const T* __restrict yr = yc + (i - q0) * w;
      A* __restrict u0 = u + (2 * i - r0) * W;
      A* __restrict u1 = u0 + W;
      for (int64_t q = 0; q < w; ++q) {
        const A v = S::load(yr[q]);
        u0[2 * q] = v;
        u0[2 * q + 1] = v;
        u1[2 * q] = v;
        u1[2 * q + 1] = v;
      }
    }
    return;
  }
  for (int64_t i = 0; i < rg.size(); ++i) {
    A* first = u + (rg.start[i] - r0) * W;
    gather_row<T, A>(yc, rg.src[i] - q0, first, p);
    for (int64_t r = rg.start[i] + 1; r < rg.start[i + 1]; ++r) {
      A* __restrict dst = u + (r - r0) * W;
      for (int64_t j = 0; j < W; ++j) dst[j] = first[j];
    }
  }
}

// dst[q] += sum of src over the output columns of source column q (one row).
template <typename A>
inline void column_reduce_add(const A* __restrict src, A* __restrict dst, const Plan& p) {
  if (p.W == p.w) {
    for (int64_t q = 0; q < p.w; ++q) dst[q] += src[q];
  } else if (p.W == 2 * p.w) {
    for (int64_t q = 0; q < p.w; ++q) dst[q] += src[2 * q] + src[2 * q + 1];
  } else {
    const int64_t* cf = p.cfirst.data();
    for (int64_t q = 0; q < p.w; ++q) {
      A s = 0;
      for (int64_t j = cf[q]; j < cf[q + 1]; ++j) s += src[j];
      dst[q] += s;
    }
  }
}

// dst (rows at y's resolution, row sr - q0 for source row sr) += the chunk's
// rows of src summed over the output pixels of each source pixel.
template <typename A>
inline void scatter_chunk(const A* src, const RowGroups& rg, int64_t r0, int64_t q0, A* dst, A* rowsum,
                          const Plan& p) {
  const int64_t W = p.W;
  if (p.point) {
    const int64_t P = (rg.start.back() - r0) * W;
    A l[kLanes] = {};
    int64_t k0 = 0;
    for (; k0 + kLanes <= P; k0 += kLanes)
      for (int i = 0; i < kLanes; ++i) l[i] += src[k0 + i];
    for (int i = 0; k0 + i < P; ++i) l[i] += src[k0 + i];
    dst[0] += lanes_total(l);
    return;
  }
  if (p.halves) {
    const int64_t w = p.w;
    for (int64_t i = r0 / 2; i < rg.start.back() / 2; ++i) {
      const A* __restrict s0 = src + (2 * i - r0) * W;
      const A* __restrict s1 = s0 + W;
      A* __restrict d = dst + (i - q0) * w;
      for (int64_t q = 0; q < w; ++q) d[q] += (s0[2 * q] + s0[2 * q + 1]) + (s1[2 * q] + s1[2 * q + 1]);
    }
    return;
  }
  for (int64_t i = 0; i < rg.size(); ++i) {
    const A* row = src + (rg.start[i] - r0) * W;
    if (rg.start[i + 1] - rg.start[i] > 1) {
      const A* __restrict second = row + W;
      A* __restrict acc = rowsum;
      for (int64_t j = 0; j < W; ++j) acc[j] = row[j] + second[j];
      for (int64_t r = rg.start[i] + 2; r < rg.start[i + 1]; ++r) {
        const A* __restrict next = src + (r - r0) * W;
        for (int64_t j = 0; j < W; ++j) acc[j] += next[j];
      }
      row = rowsum;
    }
    column_reduce_add(row, dst + (rg.src[i] - q0) * p.w, p);
  }
}

// a0 += sum over the n channels (planes `stride` apart) of w0[c] x_c; a1 likewise with w1.
template <typename T, typename A>
inline void channel_axpy(const T* x, int64_t stride, int n, const A* w0, const A* w1, A* __restrict a0,
                         A* __restrict a1, int64_t P) {
  using S = Scalar<T>;
  if (n == kGroup) {
    const T* __restrict xa = x;
    const T* __restrict xb = x + stride;
    const T* __restrict xc = x + 2 * stride;
    const T* __restrict xd = x + 3 * stride;
    for (int64_t k = 0; k < P; ++k) {
      const A e0 = S::load(xa[k]), e1 = S::load(xb[k]), e2 = S::load(xc[k]), e3 = S::load(xd[k]);
      a0[k] += (w0[0] * e0 + w0[1] * e1) + (w0[2] * e2 + w0[3] * e3);
      a1[k] += (w1[0] * e0 + w1[1] * e1) + (w1[2] * e2 + w1[3] * e3);
    }
    return;
  }
  for (int i = 0; i < n; ++i) {
    const T* __restrict xi = x + i * stride;
    for (int64_t k = 0; k < P; ++k) {
      const A e = S::load(xi[k]);
      a0[k] += w0[i] * e;
      a1[k] += w1[i] * e;
    }
  }
}

// s0 += sum over the n channels of g_c x_c, s1 += sum of g_c u_c (u: n rows of P;
// with kConstU, u[i] is channel i's single value: h = w = 1, nothing gathered).
template <typename T, typename A, bool kConstU>
inline void channel_dots(const T* g, const T* x, int64_t stride, const A* u, int n, A* __restrict s0,
                         A* __restrict s1, int64_t P) {
  using S = Scalar<T>;
  const int64_t ustride = kConstU ? 1 : P;
  if (n == kGroup) {
    const T *__restrict ga = g, *__restrict gb = g + stride, *__restrict gc = g + 2 * stride,
                        *__restrict gd = g + 3 * stride;
    const T *__restrict xa = x, *__restrict xb = x + stride, *__restrict xc = x + 2 * stride,
                        *__restrict xd = x + 3 * stride;
    const A *__restrict ua = u, *__restrict ub = u + ustride, *__restrict uc = u + 2 * ustride,
                        *__restrict ud = u + 3 * ustride;
    for (int64_t k = 0; k < P; ++k) {
      const int64_t ku = kConstU ? 0 : k;
      const A e0 = S::load(ga[k]), e1 = S::load(gb[k]), e2 = S::load(gc[k]), e3 = S::load(gd[k]);
      s0[k] += (e0 * S::load(xa[k]) + e1 * S::load(xb[k])) + (e2 * S::load(xc[k]) + e3 * S::load(xd[k]));
      s1[k] += (e0 * ua[ku] + e1 * ub[ku]) + (e2 * uc[ku] + e3 * ud[ku]);
    }
    return;
  }
  for (int i = 0; i < n; ++i) {
    const T* __restrict gi = g + i * stride;
    const T* __restrict xi = x + i * stride;
    const A* __restrict ui = u + i * ustride;
    for (int64_t k = 0; k < P; ++k) {
      const A e = S::load(gi[k]);
      s0[k] += e * S::load(xi[k]);
      s1[k] += e * ui[kConstU ? 0 : k];
    }
  }
}

// channel_dots over output rows [r0, r1) (r0 even) when H = 2h and W = 2w, for
// G channels: u_c is read straight from y (planes ystride apart, row 0 = source
// row 0) and duplicated in registers instead of gathered into a buffer. The G
// products are summed in channel order, then added to s0 / s1.
template <typename T, typename A, int G>
inline void channel_dots_halves(const T* g, const T* x, int64_t stride, const T* y, int64_t ystride,
                                A* __restrict s0, A* __restrict s1, int64_t r0, int64_t r1, const Plan& p) {
  using V = vec_t<A>;
  using S = Scalar<T>;
  constexpr int L = kVec<A>;
  const int64_t W = p.W, w = p.w;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t yo = (r / 2) * w, o = (r - r0) * W;
    int64_t q = 0;
    for (; q + L <= w; q += L) {  // L source columns: 2L output columns
      const int64_t k = o + 2 * q;
      V a0 = splat<A>(0), a1 = splat<A>(0), b0 = splat<A>(0), b1 = splat<A>(0);
      for (int i = 0; i < G; ++i) {
        const V yv = vload<T, A>(y + i * ystride + yo + q);
        const V ga = vload<T, A>(g + i * stride + k), gb = vload<T, A>(g + i * stride + k + L);
        a0 += ga * vload<T, A>(x + i * stride + k);
        b0 += gb * vload<T, A>(x + i * stride + k + L);
        a1 += ga * dup_lo<A>(yv);
        b1 += gb * dup_hi<A>(yv);
      }
      vstore<A, A>(s0 + k, vload<A, A>(s0 + k) + a0);
      vstore<A, A>(s0 + k + L, vload<A, A>(s0 + k + L) + b0);
      vstore<A, A>(s1 + k, vload<A, A>(s1 + k) + a1);
      vstore<A, A>(s1 + k + L, vload<A, A>(s1 + k + L) + b1);
    }
    for (int64_t k = o + 2 * q; k < o + W; ++k) {
      A a0 = 0, a1 = 0;
      for (int i = 0; i < G; ++i) {
        const A e = S::load(g[i * stride + k]);
        a0 += e * S::load(x[i * stride + k]);
        a1 += e * S::load(y[i * ystride + yo + (k - o) / 2]);
      }
      s0[k] += a0;
      s1[k] += a1;
    }
  }
}

// out = x z0 + v z1 with one value v for the whole plane (h = w = 1)
template <typename T, typename A>
inline void fuse_const(const T* __restrict x, A v, const A* __restrict z0, const A* __restrict z1,
                       T* __restrict out, int64_t P) {
  for (int64_t k = 0; k < P; ++k) out[k] = Scalar<T>::store(Scalar<T>::load(x[k]) * z0[k] + v * z1[k]);
}

// out = x z0 + u z1 over output rows [r0, r1) (r0 even) when H = 2h and W = 2w,
// x, z0, z1 and out starting at row r0: u is read straight from y's plane yc
// and each value duplicated in registers, instead of gathered into a buffer.
template <typename T, typename A>
inline void fuse_halves(const T* x, const T* yc, const A* z0, const A* z1, T* out, int64_t r0, int64_t r1,
                        const Plan& p) {
  using V = vec_t<A>;
  using S = Scalar<T>;
  constexpr int L = kVec<A>;
  const int64_t W = p.W, w = p.w;
  for (int64_t r = r0; r < r1; ++r) {
    const T* yr = yc + (r / 2) * w;
    const int64_t o = (r - r0) * W;
    int64_t q = 0;
    for (; q + L <= w; q += L) {  // L source columns: 2L output columns
      const V yv = vload<T, A>(yr + q);
      const int64_t k = o + 2 * q;
      vstore<T, A>(out + k, vload<T, A>(x + k) * vload<A, A>(z0 + k) + dup_lo<A>(yv) * vload<A, A>(z1 + k));
      vstore<T, A>(out + k + L,
                   vload<T, A>(x + k + L) * vload<A, A>(z0 + k + L) + dup_hi<A>(yv) * vload<A, A>(z1 + k + L));
    }
    for (int64_t k = o + 2 * q; k < o + W; ++k) {
      const A u = S::load(yr[(k - o) / 2]);
      out[k] = S::store(S::load(x[k]) * z0[k] + u * z1[k]);
    }
  }
}

// out = x z0 + u z1
template <typename T, typename A>
inline void fuse(const T* __restrict x, const A* __restrict u, const A* __restrict z0, const A* __restrict z1,
                 T* __restrict out, int64_t P) {
  for (int64_t k = 0; k < P; ++k) out[k] = Scalar<T>::store(Scalar<T>::load(x[k]) * z0[k] + u[k] * z1[k]);
}

// (sum of x d0, sum of x d1) in kLanes fixed-order partial sums: the form the
// compiler vectorises together with the fp16 / bf16 conversions.
template <typename T, typename A>
inline void dot2_lanes(const T* __restrict x, const A* __restrict d0, const A* __restrict d1, int64_t P, A& r0,
                       A& r1) {
  using S = Scalar<T>;
  A l0[kLanes] = {}, l1[kLanes] = {};
  int64_t k0 = 0;
  for (; k0 + kLanes <= P; k0 += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const A xv = S::load(x[k0 + l]);
      l0[l] += xv * d0[k0 + l];
      l1[l] += xv * d1[k0 + l];
    }
  for (int l = 0; k0 + l < P; ++l) {
    const A xv = S::load(x[k0 + l]);
    l0[l] += xv * d0[k0 + l];
    l1[l] += xv * d1[k0 + l];
  }
  r0 = lanes_total(l0);
  r1 = lanes_total(l1);
}

// grad_x = g z0 + w0 da0 + w1 da1 and t = g z1 (one channel; fp16 / bf16 path).
template <typename T, typename A>
inline void grad_x_pass(const T* __restrict g, const A* __restrict z0, const A* __restrict z1,
                        const A* __restrict da0, const A* __restrict da1, A w0, A w1, T* __restrict gx,
                        A* __restrict t, int64_t P) {
  using S = Scalar<T>;
  for (int64_t k = 0; k < P; ++k) {
    const A gv = S::load(g[k]);
    gx[k] = S::store(gv * z0[k] + w0 * da0[k] + w1 * da1[k]);
    t[k] = gv * z1[k];
  }
}

// (sum of x d0, sum of x d1): vector lanes, then the P mod V tail, in a fixed order.
template <typename T, typename A>
inline void dot2(const T* __restrict x, const A* __restrict d0, const A* __restrict d1, int64_t P, A& r0, A& r1) {
  if constexpr (!kDirect<T, A>) {
    dot2_lanes<T, A>(x, d0, d1, P, r0, r1);
    return;
  }
  using V = vec_t<A>;
  constexpr int L = kVec<A>;
  V a0 = splat<A>(0), a1 = splat<A>(0);
  int64_t k = 0;
  for (; k + L <= P; k += L) {
    const V xv = vload<T, A>(x + k);
    a0 += xv * vload<A, A>(d0 + k);
    a1 += xv * vload<A, A>(d1 + k);
  }
  A s0 = vsum<A>(a0), s1 = vsum<A>(a1);
  for (; k < P; ++k) {
    const A xv = Scalar<T>::load(x[k]);
    s0 += xv * d0[k];
    s1 += xv * d1[k];
  }
  r0 = s0;
  r1 = s1;
}

// One group of G channels (planes `stride` apart) of the backward's per-channel
// pass: grad_x = g z0 + w0 da0 + w1 da1, t_i = g z1 (G rows of P, scattered into
// grad_y afterwards) and the x half of grad_w, px_k[i] = sum_p x_i da_k. z and
// da are loaded once per group instead of once per channel, and the two dot
// products ride in the same sweep over x.
//
// With kSumT (h = w = 1, every output pixel maps to the one source pixel) the
// scatter of t is just its sum, taken in the same sweep: t[i] = sum_p g_i z1.
template <typename T, typename A, int G, bool kSumT>
inline void grad_x_group(const T* g, const T* x, int64_t stride, const A* z0, const A* z1, const A* da0,
                         const A* da1, const A* w0, const A* w1, T* gx, A* t, int64_t P, A* px0, A* px1) {
  using V = vec_t<A>;
  using S = Scalar<T>;
  constexpr int L = kVec<A>;
  V acc0[G], acc1[G], acct[G], w0v[G], w1v[G];
  for (int i = 0; i < G; ++i) {
    acc0[i] = acc1[i] = acct[i] = splat<A>(0);
    w0v[i] = splat(w0[i]);
    w1v[i] = splat(w1[i]);
  }
  int64_t k = 0;
  for (; k + L <= P; k += L) {
    const V vz0 = vload<A, A>(z0 + k), vz1 = vload<A, A>(z1 + k);
    const V vd0 = vload<A, A>(da0 + k), vd1 = vload<A, A>(da1 + k);
    for (int i = 0; i < G; ++i) {
      const V gv = vload<T, A>(g + i * stride + k);
      const V xv = vload<T, A>(x + i * stride + k);
      vstore<T, A>(gx + i * stride + k, gv * vz0 + w0v[i] * vd0 + w1v[i] * vd1);
      if constexpr (kSumT)
        acct[i] += gv * vz1;
      else
        vstore<A, A>(t + i * P + k, gv * vz1);
      acc0[i] += xv * vd0;
      acc1[i] += xv * vd1;
    }
  }
  for (int i = 0; i < G; ++i) {
    A s0 = vsum<A>(acc0[i]), s1 = vsum<A>(acc1[i]), st = vsum<A>(acct[i]);
    for (int64_t j = k; j < P; ++j) {  // the last P mod L pixels
      const A gv = S::load(g[i * stride + j]), xv = S::load(x[i * stride + j]);
      gx[i * stride + j] = S::store(gv * z0[j] + w0[i] * da0[j] + w1[i] * da1[j]);
      if constexpr (kSumT)
        st += gv * z1[j];
      else
        t[i * P + j] = gv * z1[j];
      s0 += xv * da0[j];
      s1 += xv * da1[j];
    }
    px0[i] = s0;
    px1[i] = s1;
    if constexpr (kSumT) t[i] = st;
  }
}

// grad_x_group when H = 2h and W = 2w, over the chunk's output rows [r0, r1)
// (whole row pairs): g z1 is summed over each 2x2 block in registers and added
// straight to grad_y's accumulator gyacc (G rows of nq, row 0 = source row q0),
// with no t buffer and no separate scatter.
template <typename T, typename A, int G>
inline void grad_x_group_halves(const T* g, const T* x, int64_t stride, const A* z0, const A* z1, const A* da0,
                                const A* da1, const A* w0, const A* w1, T* gx, A* gyacc, int64_t nq, int64_t r0,
                                int64_t r1, int64_t q0, const Plan& p, A* px0, A* px1) {
  using V = vec_t<A>;
  using S = Scalar<T>;
  constexpr int L = kVec<A>;
  const int64_t W = p.W, w = p.w;
  V acc0[G], acc1[G], w0v[G], w1v[G];
  A tail0[G], tail1[G];  // the columns past the last whole vector
  for (int i = 0; i < G; ++i) {
    acc0[i] = acc1[i] = splat<A>(0);
    w0v[i] = splat(w0[i]);
    w1v[i] = splat(w1[i]);
    tail0[i] = tail1[i] = A(0);
  }
  for (int64_t r = r0; r < r1; r += 2) {
    const int64_t ot = (r - r0) * W, ob = ot + W, yo = (r / 2 - q0) * w;
    int64_t q = 0;
    for (; q + L <= w; q += L) {  // L source columns: 2L output columns of both rows
#pragma GCC unroll 4  // keeps acc0 / acc1 in registers
      for (int i = 0; i < G; ++i) {
        const T* gi = g + i * stride;
        const T* xi = x + i * stride;
        T* gxi = gx + i * stride;
        // grad_x and the grad_w lanes at output offset k; returns g z1 there
        auto pix = [&](int64_t k) {
          const V gv = vload<T, A>(gi + k), xv = vload<T, A>(xi + k);
          const V d0 = vload<A, A>(da0 + k), d1 = vload<A, A>(da1 + k);
          vstore<T, A>(gxi + k, gv * vload<A, A>(z0 + k) + w0v[i] * d0 + w1v[i] * d1);
          acc0[i] += xv * d0;
          acc1[i] += xv * d1;
          return gv * vload<A, A>(z1 + k);
        };
        const V top_lo = pix(ot + 2 * q), bot_lo = pix(ob + 2 * q);
        const V top_hi = pix(ot + 2 * q + L), bot_hi = pix(ob + 2 * q + L);
        const V lo = top_lo + bot_lo, hi = top_hi + bot_hi;
        V even, odd;  // source column q + m sums output columns 2m, 2m + 1 of (lo, hi)
        for (int m = 0; m < L; ++m) {
          even[m] = m < L / 2 ? lo[2 * m] : hi[2 * m - L];
          odd[m] = m < L / 2 ? lo[2 * m + 1] : hi[2 * m + 1 - L];
        }
        A* dst = gyacc + i * nq + yo + q;
        vstore<A, A>(dst, vload<A, A>(dst) + (even + odd));
      }
    }
    for (; q < w; ++q)
      for (int i = 0; i < G; ++i) {
        A tsum = 0;
        for (const int64_t k0 : {ot + 2 * q, ob + 2 * q})
          for (int64_t k = k0; k < k0 + 2; ++k) {
            const A gv = S::load(g[i * stride + k]), xv = S::load(x[i * stride + k]);
            gx[i * stride + k] = S::store(gv * z0[k] + w0[i] * da0[k] + w1[i] * da1[k]);
            tail0[i] += xv * da0[k];
            tail1[i] += xv * da1[k];
            tsum += gv * z1[k];
          }
        gyacc[i * nq + yo + q] += tsum;
      }
  }
  for (int i = 0; i < G; ++i) {
    px0[i] = vsum<A>(acc0[i]) + tail0[i];
    px1[i] = vsum<A>(acc1[i]) + tail1[i];
  }
}

// The shape path of a call (see the file comment), fixed at compile time in the
// unit functions: kPoint when h = w = 1, kHalves when H = 2h and W = 2w (float
// and double storage only: fp16 / bf16 take kGeneral there), else kGeneral.
enum class Path { kPoint, kHalves, kGeneral };
template <Path P> using PathTag = std::integral_constant<Path, P>;

template <typename T, typename F>
void with_path(const Plan& p, F&& f) {
  if (p.point) return f(PathTag<Path::kPoint>{});
  if constexpr (kDirect<T, acc_t<T>>) {
    if (p.halves) return f(PathTag<Path::kHalves>{});
  }
  f(PathTag<Path::kGeneral>{});
}

// body(G, i) for the n <= kGroup channels of one sweep, G a compile-time group
// size: once with G = kGroup (i = 0) for a whole group, else once per channel
// with G = 1 (channel i of the sweep).
template <typename F>
inline void for_group(int n, F&& body) {
  if (n == kGroup) {
    body(std::integral_constant<int, kGroup>{}, 0);
  } else {
    for (int i = 0; i < n; ++i) body(std::integral_constant<int, 1>{}, i);
  }
}

template <typename T, Path kPath>
void fwd_unit(const T* x, const T* y, const std::vector<acc_t<T>>& wt, acc_t<T> b0, acc_t<T> b1, T* out,
              acc_t<T>* z, int64_t q0, int64_t q1, const Plan& p) {
  using A = acc_t<T>;
  const int64_t C = p.C, W = p.W, HW = p.H * p.W, hw = p.h * p.w, w = p.w;
  const A* w0x = wt.data();
  const A* w0u = wt.data() + C;
  const A* w1x = wt.data() + 2 * C;
  const A* w1u = wt.data() + 3 * C;
  // the y half of the logits plus the bias, for this unit's source pixels
  const int64_t nq = (q1 - q0) * w;
  std::vector<A> ay0(nq, b0), ay1(nq, b1);
  for (int64_t c = 0; c < C; c += kGroup) {
    const int n = int(std::min<int64_t>(kGroup, C - c));
    channel_axpy<T, A>(y + c * hw + q0 * w, hw, n, w0u + c, w1u + c, ay0.data(), ay1.data(), nq);
  }
  const int64_t R0 = p.rfirst[q0], R1 = p.rfirst[q1];
  const int64_t maxP = std::min(R1 - R0, p.chunk_rows) * W;
  std::vector<A> a0(maxP), a1(maxP), u(maxP);
  RowGroups rg;
  for (int64_t r0 = R0; r0 < R1; r0 += p.chunk_rows) {
    const int64_t r1 = std::min(R1, r0 + p.chunk_rows), P = (r1 - r0) * W, p0 = r0 * W;
    rg.build(r0, r1, p);
    // a_k = (b_k + y half at the source pixel) + sum_c w[k][c] x_c
    gather_chunk<A, A>(ay0.data(), q0, rg, r0, a0.data(), p);
    gather_chunk<A, A>(ay1.data(), q0, rg, r0, a1.data(), p);
    for (int64_t c = 0; c < C; c += kGroup) {
      const int n = int(std::min<int64_t>(kGroup, C - c));
      channel_axpy<T, A>(x + c * HW + p0, HW, n, w0x + c, w1x + c, a0.data(), a1.data(), P);
    }
    A* __restrict z0 = z + p0;
    A* __restrict z1 = z + HW + p0;
    for (int64_t k = 0; k < P; ++k) {
      z0[k] = A(1) / (A(1) + std::exp(-a0[k]));
      z1[k] = A(1) / (A(1) + std::exp(-a1[k]));
    }
    for (int64_t c = 0; c < C; ++c) {
      const T* xc = x + c * HW + p0;
      T* oc = out + c * HW + p0;
      if constexpr (kPath == Path::kPoint) {
        fuse_const<T, A>(xc, Scalar<T>::load(y[c]), z0, z1, oc, P);
      } else if constexpr (kPath == Path::kHalves) {
        fuse_halves<T, A>(xc, y + c * hw, z0, z1, oc, r0, r1, p);
      } else {
        gather_chunk<T, A>(y + c * hw, 0, rg, r0, u.data(), p);
        fuse<T, A>(xc, u.data(), z0, z1, oc, P);
      }
    }
  }
}

// One unit's partials: part[0, 4C) of grad_w, part[4C], part[4C + 1] of grad_b.
template <typename T, Path kPath>
void bwd_unit(const T* g, const T* x, const T* y, const std::vector<acc_t<T>>& wt, const acc_t<T>* z, T* gx, T* gy,
              acc_t<T>* part, int64_t q0, int64_t q1, const Plan& p) {
  using A = acc_t<T>;
  using S = Scalar<T>;
  const int64_t C = p.C, W = p.W, HW = p.H * p.W, hw = p.h * p.w, w = p.w;
  const int64_t nq = (q1 - q0) * w;
  const int64_t R0 = p.rfirst[q0], R1 = p.rfirst[q1];
  const int64_t maxP = std::min(R1 - R0, p.chunk_rows) * W;
  std::vector<A> D0(nq, A(0)), D1(nq, A(0)), gyacc(C * nq, A(0));
  std::vector<A> s0(maxP), s1(maxP), da0(maxP), da1(maxP), t(kGroup * maxP), u(kGroup * maxP), rowsum(W);
  RowGroups rg;
  A* pw = part;
  std::fill(pw, pw + 4 * C + 2, A(0));
  A lb0[kLanes] = {}, lb1[kLanes] = {};
  for (int64_t r0 = R0; r0 < R1; r0 += p.chunk_rows) {
    const int64_t r1 = std::min(R1, r0 + p.chunk_rows), P = (r1 - r0) * W, p0 = r0 * W;
    rg.build(r0, r1, p);
    // s_0 = sum_c g_c x_c, s_1 = sum_c g_c u_c
    std::fill(s0.begin(), s0.begin() + P, A(0));
    std::fill(s1.begin(), s1.begin() + P, A(0));
    for (int64_t c = 0; c < C; c += kGroup) {
      const int n = int(std::min<int64_t>(kGroup, C - c));
      if constexpr (kPath == Path::kPoint) {  // u_c is the single value y_c
        for (int i = 0; i < n; ++i) u[i] = S::load(y[c + i]);
        channel_dots<T, A, true>(g + c * HW + p0, x + c * HW + p0, HW, u.data(), n, s0.data(), s1.data(), P);
      } else if constexpr (kPath == Path::kHalves) {
        for_group(n, [&](auto G, int i) {
          channel_dots_halves<T, A, decltype(G)::value>(g + (c + i) * HW + p0, x + (c + i) * HW + p0, HW,
                                                        y + (c + i) * hw, hw, s0.data(), s1.data(), r0, r1, p);
        });
      } else {
        for (int i = 0; i < n; ++i) gather_chunk<T, A>(y + (c + i) * hw, 0, rg, r0, u.data() + i * P, p);
        channel_dots<T, A, false>(g + c * HW + p0, x + c * HW + p0, HW, u.data(), n, s0.data(), s1.data(), P);
      }
    }
    // da_k = s_k z_k (1 - z_k); the grad_b lanes; D_k = da_k summed per source pixel
    const A* z0 = z + p0;
    const A* z1 = z + HW + p0;
    for (int64_t k = 0; k < P; ++k) {
      da0[k] = s0[k] * z0[k] * (A(1) - z0[k]);
      da1[k] = s1[k] * z1[k] * (A(1) - z1[k]);
    }
    int64_t k0 = 0;
    for (; k0 + kLanes <= P; k0 += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        lb0[l] += da0[k0 + l];
        lb1[l] += da1[k0 + l];
      }
    for (int l = 0; k0 + l < P; ++l) {
      lb0[l] += da0[k0 + l];
      lb1[l] += da1[k0 + l];
    }
    scatter_chunk(da0.data(), rg, r0, q0, D0.data(), rowsum.data(), p);
    scatter_chunk(da1.data(), rg, r0, q0, D1.data(), rowsum.data(), p);
    // grad_x, the x half of grad_w, and g z_1 scattered into grad_y's accumulator
    for (int64_t c = 0; c < C; c += kGroup) {
      const int n = int(std::min<int64_t>(kGroup, C - c));
      A px0[kGroup], px1[kGroup];
      const T* gc = g + c * HW + p0;
      const T* xc = x + c * HW + p0;
      T* gxc = gx + c * HW + p0;
      const A *w0 = &wt[c], *w1 = &wt[2 * C + c];
      if constexpr (!kDirect<T, A>) {  // fp16 / bf16: one channel per sweep, scalar loops
        for (int i = 0; i < n; ++i) {
          grad_x_pass<T, A>(gc + i * HW, z0, z1, da0.data(), da1.data(), w0[i], w1[i], gxc + i * HW, t.data(), P);
          dot2_lanes<T, A>(xc + i * HW, da0.data(), da1.data(), P, px0[i], px1[i]);
          scatter_chunk(t.data(), rg, r0, q0, gyacc.data() + (c + i) * nq, rowsum.data(), p);
        }
      } else if constexpr (kPath == Path::kPoint) {  // t[i] = sum_p g z1, added straight to grad_y's accumulator
        for_group(n, [&](auto G, int i) {
          grad_x_group<T, A, decltype(G)::value, true>(gc + i * HW, xc + i * HW, HW, z0, z1, da0.data(), da1.data(),
                                                       w0 + i, w1 + i, gxc + i * HW, t.data() + i, P, px0 + i,
                                                       px1 + i);
        });
        for (int i = 0; i < n; ++i) gyacc[c + i] += t[i];
      } else if constexpr (kPath == Path::kHalves) {  // g z1 summed per 2x2 block into grad_y's accumulator
        A* gyc = gyacc.data() + c * nq;
        for_group(n, [&](auto G, int i) {
          grad_x_group_halves<T, A, decltype(G)::value>(gc + i * HW, xc + i * HW, HW, z0, z1, da0.data(), da1.data(),
                                                        w0 + i, w1 + i, gxc + i * HW, gyc + i * nq, nq, r0, r1, q0, p,
                                                        px0 + i, px1 + i);
        });
      } else {
        for_group(n, [&](auto G, int i) {
          grad_x_group<T, A, decltype(G)::value, false>(gc + i * HW, xc + i * HW, HW, z0, z1, da0.data(),
                                                        da1.data(), w0 + i, w1 + i, gxc + i * HW, t.data() + i * P,
                                                        P, px0 + i, px1 + i);
        });
        for (int i = 0; i < n; ++i)
          scatter_chunk(t.data() + i * P, rg, r0, q0, gyacc.data() + (c + i) * nq, rowsum.data(), p);
      }
      for (int i = 0; i < n; ++i) {
        pw[c + i] += px0[i];
        pw[2 * C + c + i] += px1[i];
      }
    }
  }
  pw[4 * C] = lanes_total(lb0);
  pw[4 * C + 1] = lanes_total(lb1);
  // grad_y = scattered g z_1 + w[k][C + c] D_k; the y half of grad_w = sum_q y_c D_k
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict yc = y + c * hw + q0 * w;
    T* __restrict gyc = gy + c * hw + q0 * w;
    const A* __restrict acc = gyacc.data() + c * nq;
    const A w0u = wt[C + c], w1u = wt[3 * C + c];
    for (int64_t i = 0; i < nq; ++i) gyc[i] = S::store(acc[i] + w0u * D0[i] + w1u * D1[i]);
    dot2<T, A>(yc, D0.data(), D1.data(), nq, pw[C + c], pw[3 * C + c]);
  }
}

template <typename T>
std::vector<acc_t<T>> load_acc(uintptr_t ptr, int64_t n) {
  const T* src = reinterpret_cast<const T*>(ptr);
  std::vector<acc_t<T>> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = Scalar<T>::load(src[i]);
  return out;
}

}  // namespace

void abf_fwd_cpu(int dtype, uintptr_t x, uintptr_t y, uintptr_t wt, uintptr_t bias, uintptr_t out, uintptr_t z,
                 int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, double scale_h, double scale_w,
                 int64_t num_threads) {
  const Plan p = make_plan("abf_fwd_cpu", dtype, N, C, H, W, h, w, scale_h, scale_w);
  check_pointers("abf_fwd_cpu", {x, y, wt, bias, out, z});
  dispatch_dtype(dtype, "abf_fwd_cpu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const auto wa = load_acc<T>(wt, 4 * C);
    const auto ba = load_acc<T>(bias, 2);
    const int64_t per = p.units_per_sample(), U = N * per;
    const int64_t threads = choose_threads(num_threads, U, N * C * H * W, 16384);
    with_path<T>(p, [&](auto path) {
      parallel_for(U, threads, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t n = u / per, i = u % per;
          fwd_unit<T, decltype(path)::value>(
              reinterpret_cast<const T*>(x) + n * C * H * W, reinterpret_cast<const T*>(y) + n * C * h * w, wa,
              ba[0], ba[1], reinterpret_cast<T*>(out) + n * C * H * W, reinterpret_cast<A*>(z) + n * 2 * H * W,
              p.unit_q[i], p.unit_q[i + 1], p);
        }
      });
    });
  });
}

void abf_bwd_cpu(int dtype, uintptr_t g, uintptr_t x, uintptr_t y, uintptr_t wt, uintptr_t z, uintptr_t gx,
                 uintptr_t gy, uintptr_t gw, uintptr_t gb, int64_t N, int64_t C, int64_t H, int64_t W, int64_t h,
                 int64_t w, double scale_h, double scale_w, int64_t num_threads) {
  const Plan p = make_plan("abf_bwd_cpu", dtype, N, C, H, W, h, w, scale_h, scale_w);
  check_pointers("abf_bwd_cpu", {g, x, y, wt, z, gx, gy, gw, gb});
  dispatch_dtype(dtype, "abf_bwd_cpu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const auto wa = load_acc<T>(wt, 4 * C);
    const int64_t per = p.units_per_sample(), U = N * per, stride = 4 * C + 2;
    std::vector<A> parts(U * stride);
    const int64_t threads = choose_threads(num_threads, U, N * C * H * W, 16384);
    with_path<T>(p, [&](auto path) {
      parallel_for(U, threads, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t n = u / per, i = u % per;
          bwd_unit<T, decltype(path)::value>(
              reinterpret_cast<const T*>(g) + n * C * H * W, reinterpret_cast<const T*>(x) + n * C * H * W,
              reinterpret_cast<const T*>(y) + n * C * h * w, wa, reinterpret_cast<const A*>(z) + n * 2 * H * W,
              reinterpret_cast<T*>(gx) + n * C * H * W, reinterpret_cast<T*>(gy) + n * C * h * w,
              parts.data() + u * stride, p.unit_q[i], p.unit_q[i + 1], p);
        }
      });
    });
    // the second, small reduction: unit partials added in unit order
    A* gwa = reinterpret_cast<A*>(gw);
    A* gba = reinterpret_cast<A*>(gb);
    std::fill(gwa, gwa + 4 * C, A(0));
    gba[0] = gba[1] = A(0);
    for (int64_t u = 0; u < U; ++u) {
      const A* part = parts.data() + u * stride;
      for (int64_t i = 0; i < 4 * C; ++i) gwa[i] += part[i];
      gba[0] += part[4 * C];
      gba[1] += part[4 * C + 1];
    }
  });
}

}  // namespace kdk
