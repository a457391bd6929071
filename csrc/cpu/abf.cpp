// ABF fusion on CPU (SPEC section 2, step 2; the per-pixel math is in kdkernels/triton/abf.py).
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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/dtype.h"
#include "../common/parallel.h"

namespace kdk {
namespace {

constexpr int64_t kUnitPixels = 2048;     // output pixels per work unit (at least one source row's worth)
constexpr int64_t kChunkBytes = 1 << 20;  // bytes of one full-size tensor per chunk (at least one row)
constexpr int kGroup = 4;                 // channels per sweep of a channel reduction
constexpr int kLanes = 8;                 // independent partial sums of the dot products (fixed order)

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

// s0 += sum over the n channels of g_c x_c, s1 += sum of g_c u_c (u: n rows of P).
template <typename T, typename A>
inline void channel_dots(const T* g, const T* x, int64_t stride, const A* u, int n, A* __restrict s0,
                         A* __restrict s1, int64_t P) {
  using S = Scalar<T>;
  if (n == kGroup) {
    const T *__restrict ga = g, *__restrict gb = g + stride, *__restrict gc = g + 2 * stride,
                        *__restrict gd = g + 3 * stride;
    const T *__restrict xa = x, *__restrict xb = x + stride, *__restrict xc = x + 2 * stride,
                        *__restrict xd = x + 3 * stride;
    const A *__restrict ua = u, *__restrict ub = u + P, *__restrict uc = u + 2 * P, *__restrict ud = u + 3 * P;
    for (int64_t k = 0; k < P; ++k) {
      const A e0 = S::load(ga[k]), e1 = S::load(gb[k]), e2 = S::load(gc[k]), e3 = S::load(gd[k]);
      s0[k] += (e0 * S::load(xa[k]) + e1 * S::load(xb[k])) + (e2 * S::load(xc[k]) + e3 * S::load(xd[k]));
      s1[k] += (e0 * ua[k] + e1 * ub[k]) + (e2 * uc[k] + e3 * ud[k]);
    }
    return;
  }
  for (int i = 0; i < n; ++i) {
    const T* __restrict gi = g + i * stride;
    const T* __restrict xi = x + i * stride;
    const A* __restrict ui = u + i * P;
    for (int64_t k = 0; k < P; ++k) {
      const A e = S::load(gi[k]);
      s0[k] += e * S::load(xi[k]);
      s1[k] += e * ui[k];
    }
  }
}

// out = x z0 + u z1
template <typename T, typename A>
inline void fuse(const T* __restrict x, const A* __restrict u, const A* __restrict z0, const A* __restrict z1,
                 T* __restrict out, int64_t P) {
  for (int64_t k = 0; k < P; ++k) out[k] = Scalar<T>::store(Scalar<T>::load(x[k]) * z0[k] + u[k] * z1[k]);
}

// (sum of x d0, sum of x d1) in kLanes fixed-order partial sums.
template <typename T, typename A>
inline void dot2(const T* __restrict x, const A* __restrict d0, const A* __restrict d1, int64_t P, A& r0, A& r1) {
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

// grad_x = g z0 + w0 da0 + w1 da1 and t = g z1.
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

template <typename T>
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
      gather_chunk<T, A>(y + c * hw, 0, rg, r0, u.data(), p);
      fuse<T, A>(x + c * HW + p0, u.data(), z0, z1, out + c * HW + p0, P);
    }
  }
}

// One unit's partials: part[0, 4C) of grad_w, part[4C], part[4C + 1] of grad_b.
template <typename T>
void bwd_unit(const T* g, const T* x, const T* y, const std::vector<acc_t<T>>& wt, const acc_t<T>* z, T* gx, T* gy,
              acc_t<T>* part, int64_t q0, int64_t q1, const Plan& p) {
  using A = acc_t<T>;
  using S = Scalar<T>;
  const int64_t C = p.C, W = p.W, HW = p.H * p.W, hw = p.h * p.w, w = p.w;
  const int64_t nq = (q1 - q0) * w;
  const int64_t R0 = p.rfirst[q0], R1 = p.rfirst[q1];
  const int64_t maxP = std::min(R1 - R0, p.chunk_rows) * W;
  std::vector<A> D0(nq, A(0)), D1(nq, A(0)), gyacc(C * nq, A(0));
  std::vector<A> s0(maxP), s1(maxP), da0(maxP), da1(maxP), t(maxP), u(kGroup * maxP), rowsum(W);
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
      for (int i = 0; i < n; ++i) gather_chunk<T, A>(y + (c + i) * hw, 0, rg, r0, u.data() + i * P, p);
      channel_dots<T, A>(g + c * HW + p0, x + c * HW + p0, HW, u.data(), n, s0.data(), s1.data(), P);
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
    for (int64_t c = 0; c < C; ++c) {
      A px0, px1;
      grad_x_pass<T, A>(g + c * HW + p0, z0, z1, da0.data(), da1.data(), wt[c], wt[2 * C + c], gx + c * HW + p0,
                        t.data(), P);
      dot2<T, A>(x + c * HW + p0, da0.data(), da1.data(), P, px0, px1);
      scatter_chunk(t.data(), rg, r0, q0, gyacc.data() + c * nq, rowsum.data(), p);
      pw[c] += px0;
      pw[2 * C + c] += px1;
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
  dispatch_dtype(dtype, "abf_fwd_cpu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const auto wa = load_acc<T>(wt, 4 * C);
    const auto ba = load_acc<T>(bias, 2);
    const int64_t per = p.units_per_sample(), U = N * per;
    const int64_t threads = choose_threads(num_threads, U, N * C * H * W, 16384);
    parallel_for(U, threads, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n = u / per, i = u % per;
        fwd_unit<T>(reinterpret_cast<const T*>(x) + n * C * H * W, reinterpret_cast<const T*>(y) + n * C * h * w,
                    wa, ba[0], ba[1], reinterpret_cast<T*>(out) + n * C * H * W,
                    reinterpret_cast<A*>(z) + n * 2 * H * W, p.unit_q[i], p.unit_q[i + 1], p);
      }
    });
  });
}

void abf_bwd_cpu(int dtype, uintptr_t g, uintptr_t x, uintptr_t y, uintptr_t wt, uintptr_t z, uintptr_t gx,
                 uintptr_t gy, uintptr_t gw, uintptr_t gb, int64_t N, int64_t C, int64_t H, int64_t W, int64_t h,
                 int64_t w, double scale_h, double scale_w, int64_t num_threads) {
  const Plan p = make_plan("abf_bwd_cpu", dtype, N, C, H, W, h, w, scale_h, scale_w);
  dispatch_dtype(dtype, "abf_bwd_cpu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const auto wa = load_acc<T>(wt, 4 * C);
    const int64_t per = p.units_per_sample(), U = N * per, stride = 4 * C + 2;
    std::vector<A> parts(U * stride);
    const int64_t threads = choose_threads(num_threads, U, N * C * H * W, 16384);
    parallel_for(U, threads, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n = u / per, i = u % per;
        bwd_unit<T>(reinterpret_cast<const T*>(g) + n * C * H * W, reinterpret_cast<const T*>(x) + n * C * H * W,
                    reinterpret_cast<const T*>(y) + n * C * h * w, wa, reinterpret_cast<const A*>(z) + n * 2 * H * W,
                    reinterpret_cast<T*>(gx) + n * C * H * W, reinterpret_cast<T*>(gy) + n * C * h * w,
                    parts.data() + u * stride, p.unit_q[i], p.unit_q[i + 1], p);
      }
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
