// HCL on CPU for planes whose bins tile exactly (docs/spec.md §1; formulas in
// common/hcl.h): the largest pool L (4, 2 or 1) divides both H and W, so every
// bin of every pool is a union of bins of pool L, the L x L "tiles" (BH = H / L
// rows by BW = W / L columns each, no overlap): a bin of pool 2 is four tiles
// when L = 4, the 1 x 1 bin all of them. One streaming pass per plane builds
// the tile sums S (and, for rows of 32 or more, sum d^2 in the forward); the
// pools' sums are then sums of tile sums.
//   forward   partial = coef_mse sum d^2 + sum_l coef_l / area_l^2 sum_bins S_l^2;
//             every bin sum S_l is saved (pool by pool, row-major) for the backward,
//   backward  term[tile] = g sum_l 2 coef_l / area_l^2 S_l(bin covering the tile)
//             from the saved sums, then grad = g 2 coef_mse d + term[tile of the
//             pixel] in one pass over the plane.
// Each tile row adds d into a per-column array (elementwise: vectorises
// without reassociating anything) that is folded into the L tile sums once per
// tile row; WC > 0 is the row length known at compile time, so that the short
// rows of CIFAR planes (8, 16, 32) unroll completely and the per-column arrays
// stay in registers. Every sum has a fixed order: a plane's result depends on
// its data only.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/dtype.h"
#include "../common/hcl.h"

namespace kdk {
namespace hcl_nested {

// sum (a - b)^2 over n elements in 8 interleaved lanes (a fixed order).
template <typename T>
acc_t<T> sum_squares(const T* __restrict a, const T* __restrict b, int64_t n) {
  using A = acc_t<T>;
  A lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const A d = Scalar<T>::load(a[i + k]) - Scalar<T>::load(b[i + k]);
      lane[k] += d * d;
    }
  for (int k = 0; i < n; ++i, ++k) {
    const A d = Scalar<T>::load(a[i]) - Scalar<T>::load(b[i]);
    lane[k] += d * d;
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}


// 8 x 8 float planes with L = 4 (the deepest CIFAR level): 2 x 2 tiles, one
// row of 8 = two 4-float vectors (GCC / Clang vector extension: SSE2 or NEON
// on the portable baseline). A tile row's 4 sums are one vector (even plus odd
// lanes of the two column sums), so no per-tile scalar work is left; the
// compiler's own vectorisation of the generic loops spent most of its time in
// lane shuffles here.
namespace v8x8 {
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

inline v4 load(const float* p) {
  v4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, v4 v) { std::memcpy(p, &v, sizeof v); }
inline v4 splat(float a) { return v4{a, a, a, a}; }

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define KDK_HCL_SHUF(a, b, i, j, k, l) __builtin_shufflevector(a, b, i, j, k, l)
#endif
#endif
#if !defined(KDK_HCL_SHUF)
#define KDK_HCL_SHUF(a, b, i, j, k, l) __builtin_shuffle(a, b, v4i{i, j, k, l})
#endif

// (x0 + x1, x2 + x3, y0 + y1, y2 + y3)
inline v4 pair_sums(v4 x, v4 y) { return KDK_HCL_SHUF(x, y, 0, 2, 4, 6) + KDK_HCL_SHUF(x, y, 1, 3, 5, 7); }
inline float hsum(v4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// Tile sums: row[i] = the 4 tile sums of tile row i (rows 2i, 2i + 1); S2 =
// (S2_00, S2_01, S2_10, S2_11); returns sum d^2 when WITH_SQ.
template <bool WITH_SQ>
inline float tiles(const float* fs, const float* ft, v4* row, v4& S2) {
  v4 sq0 = splat(0.f), sq1 = splat(0.f);
  for (int i = 0; i < 4; ++i) {
    const float* a = fs + 16 * i;
    const float* b = ft + 16 * i;
    const v4 d0 = load(a) - load(b), d1 = load(a + 4) - load(b + 4);
    const v4 e0 = load(a + 8) - load(b + 8), e1 = load(a + 12) - load(b + 12);
    if (WITH_SQ) {
      sq0 += d0 * d0 + e0 * e0;
      sq1 += d1 * d1 + e1 * e1;
    }
    row[i] = pair_sums(d0 + e0, d1 + e1);
  }
  S2 = pair_sums(row[0] + row[1], row[2] + row[3]);
  return WITH_SQ ? hsum(sq0 + sq1) : 0.f;
}
}  // namespace v8x8

// The largest pool size if it divides both H and W (the bins tile), else 0.
inline int64_t tile_pool(int64_t H, int64_t W, const HclCoefs& coefs) {
  if (coefs.npools == 0) return 0;
  const int64_t L = hcl_pool_size(coefs.npools, 0);
  return (H >= L && W >= L && H % L == 0 && W % L == 0) ? L : 0;
}

// WC, HC, LC > 0: W, H and L known at compile time (0: at run time).
template <typename T, int WC = 0, int HC = 0, int LC = 0>
class TileKernel {
 public:
  using A = acc_t<T>;
  static constexpr bool kVec8x8 = std::is_same<T, float>::value && WC == 8 && HC == 8 && LC == 4;

  // L = tile_pool(H, W, coefs) > 0.
  TileKernel(int64_t H, int64_t W, int64_t L, const HclCoefs& coefs)
      : H_(H), W_(WC > 0 ? WC : W), L_(L), BH_(H / L), BW_(W / L), mse_(A(coefs.mse)), colsum_(WC > 0 ? 0 : W), colsq_(WC > 0 ? 0 : W) {
    for (int j = 0; j < coefs.npools; ++j) {  // pools L, L/2, .., 1
      const int64_t l = hcl_pool_size(coefs.npools, j);
      const double area = double(H / l) * double(W / l);
      loss_[j] = A(coefs.pool[j] / (area * area));
      grad_[j] = A(2.0 * coefs.pool[j] / (area * area));
    }
  }

  // The plane's loss partial; sums[0 .. hcl_bins) = its bin sums, pool by pool, row-major.
  A forward(const T* fs, const T* ft, A* __restrict sums) {
    if constexpr (kVec8x8) {
      v8x8::v4 row[4], S2;
      const float sq = v8x8::tiles<true>(fs, ft, row, S2);
      const v8x8::v4 p4 = (row[0] * row[0] + row[1] * row[1]) + (row[2] * row[2] + row[3] * row[3]);
      const float S1 = v8x8::hsum(S2);
      for (int i = 0; i < 4; ++i) v8x8::store(sums + 4 * i, row[i]);
      v8x8::store(sums + 16, S2);
      sums[20] = S1;
      return mse_ * sq + ((loss_[0] * v8x8::hsum(p4) + loss_[1] * v8x8::hsum(S2 * S2)) + loss_[2] * (S1 * S1));
    }
    A S[16] = {};
    // Rows of 32 or more, and rows held as vectors (kVecRows): sum d^2 per column in the
    // same pass as the tile sums. Other short rows: as one flat run (8 lanes) after it, from
    // L1: fused into such short rows, the per-column squares cost the compiler's vectorised
    // code more lane shuffles than the second read costs.
    A sq;
    if (width() >= 32 || kVecRows) {
      sq = tile_sums<true>(fs, ft, S);
    } else {
      tile_sums<false>(fs, ft, S);
      sq = sum_squares(fs, ft, H_ * width());
    }
    A pooled = A(0);
    int j = 0;
    for (int64_t l = pool(); l >= 1; l /= 2, ++j) {
      A p = A(0);
      for (int64_t t = 0; t < l * l; ++t) {
        p += S[t] * S[t];
        *sums++ = S[t];
      }
      pooled += loss_[j] * p;
      if (l > 1) coarsen(S, l);
    }
    return mse_ * sq + pooled;
  }

  // grad of the plane from its saved bin sums (forward's order); g = grad_output * c0.
  void backward(const T* fs, const T* ft, const A* __restrict sums, A g, T* __restrict grad) {
    if constexpr (kVec8x8) {
      using v8x8::v4;
      const v4 row[4] = {v8x8::load(sums), v8x8::load(sums + 4), v8x8::load(sums + 8), v8x8::load(sums + 12)};
      const v4 S2 = v8x8::load(sums + 16);
      const v4 common = v8x8::splat(grad_[2] * sums[20]);
      const v4 half[2] = {KDK_HCL_SHUF(S2, S2, 0, 0, 1, 1), KDK_HCL_SHUF(S2, S2, 2, 2, 3, 3)};
      const v4 a = v8x8::splat(g * (mse_ + mse_));
      for (int i = 0; i < 4; ++i) {
        const v4 term = v8x8::splat(g) * ((v8x8::splat(grad_[0]) * row[i] + v8x8::splat(grad_[1]) * half[i / 2]) + common);
        const v4 lo = KDK_HCL_SHUF(term, term, 0, 0, 1, 1), hi = KDK_HCL_SHUF(term, term, 2, 2, 3, 3);
        for (int r = 2 * i; r < 2 * i + 2; ++r) {
          const float* x = fs + 8 * r;
          const float* y = ft + 8 * r;
          v8x8::store(grad + 8 * r, a * (v8x8::load(x) - v8x8::load(y)) + lo);
          v8x8::store(grad + 8 * r + 4, a * (v8x8::load(x + 4) - v8x8::load(y + 4)) + hi);
        }
      }
      return;
    }
    // term of tile (i, k) = g * sum over pools of grad_l * S of the bin holding it
    const int64_t L = pool(), BH = tile_rows(), BW = tile_cols();
    const A* S4 = sums;  // pool L: L x L
    A term[16];
    for (int64_t t = 0; t < L * L; ++t) term[t] = grad_[0] * S4[t];
    if (L >= 2) {
      const A* S2 = sums + L * L;  // pool L / 2
      const int64_t h = L / 2;
      for (int64_t i = 0; i < L; ++i)
        for (int64_t k = 0; k < L; ++k) term[i * L + k] += grad_[1] * S2[(i / 2) * h + k / 2];
      if (L == 4)
        for (int64_t t = 0; t < 16; ++t) term[t] += grad_[2] * sums[20];
    }
    for (int64_t t = 0; t < L * L; ++t) term[t] *= g;
    const A a = g * (mse_ + mse_);
    A add_local[WC > 0 ? WC : 1];
    A* __restrict add = WC > 0 ? add_local : colsum_.data();
    const int64_t W = width();
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t k = 0; k < L; ++k)
        for (int64_t c = k * BW; c < (k + 1) * BW; ++c) add[c] = term[i * L + k];
      for (int64_t r = i * BH; r < (i + 1) * BH; ++r) {
        const T* __restrict x = fs + r * W;
        const T* __restrict y = ft + r * W;
        T* __restrict out = grad + r * W;
        for (int64_t c = 0; c < W; ++c) {
          const A d = Scalar<T>::load(x[c]) - Scalar<T>::load(y[c]);
          out[c] = Scalar<T>::store(a * d + add[c]);
        }
      }
    }
  }

 private:
  int64_t width() const { return WC > 0 ? WC : W_; }
  int64_t pool() const { return LC > 0 ? LC : L_; }
  int64_t tile_rows() const { return HC > 0 && LC > 0 ? HC / LC : BH_; }
  int64_t tile_cols() const { return WC > 0 && LC > 0 ? WC / LC : BW_; }

  // Float rows of a compile-time width from 16 to 56, a multiple of 4: tile_sums with the
  // column sums (and squares) as 8-float vectors (and one 4-float vector for a width of
  // 8k + 4) in registers. GCC kept the generic loop's unrolled per-column arrays on the stack,
  // so that every add waited on a store (half of the 32 x 32 forward's time). The same
  // operations in the same order as the generic loop: the same bits.
  static constexpr bool kVecRows = std::is_same<T, float>::value && WC >= 16 && WC <= 56 && WC % 4 == 0;

  template <bool WITH_SQ>
  A tile_sums_vec(const T* fs, const T* ft, A* S) {
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    constexpr int N8 = WC / 8;
    constexpr bool kTail = WC % 8 == 4;
    const int64_t L = pool(), BH = tile_rows(), BW = tile_cols();
    v8 cq[N8] = {};
    v4 cq_tail = {};
    float col[WC];
    for (int64_t i = 0; i < L; ++i) {
      v8 cs[N8] = {};
      v4 cs_tail = {};
      for (int64_t r = i * BH; r < (i + 1) * BH; ++r) {
        const float* x = fs + r * WC;
        const float* y = ft + r * WC;
        for (int v = 0; v < N8; ++v) {
          v8 a, b;
          std::memcpy(&a, x + 8 * v, sizeof a);
          std::memcpy(&b, y + 8 * v, sizeof b);
          const v8 d = a - b;
          cs[v] += d;
          if (WITH_SQ) cq[v] += d * d;
        }
        if (kTail) {
          v4 a, b;
          std::memcpy(&a, x + 8 * N8, sizeof a);
          std::memcpy(&b, y + 8 * N8, sizeof b);
          const v4 d = a - b;
          cs_tail += d;
          if (WITH_SQ) cq_tail += d * d;
        }
      }
      std::memcpy(col, cs, sizeof cs);
      if (kTail) std::memcpy(col + 8 * N8, &cs_tail, sizeof cs_tail);
      for (int64_t k = 0; k < L; ++k) {
        A s = A(0);
        for (int64_t c = k * BW; c < (k + 1) * BW; ++c) s += col[c];
        S[i * L + k] = s;
      }
    }
    A sq = A(0);
    if (WITH_SQ) {
      std::memcpy(col, cq, sizeof cq);
      if (kTail) std::memcpy(col + 8 * N8, &cq_tail, sizeof cq_tail);
      for (int64_t c = 0; c < WC; ++c) sq += col[c];
    }
    return sq;
  }

  // S[i * L + k] = sum of d over tile (i, k); returns sum d^2 when WITH_SQ.
  template <bool WITH_SQ>
  A tile_sums(const T* fs, const T* ft, A* S) {
    if constexpr (kVecRows) return tile_sums_vec<WITH_SQ>(fs, ft, S);
    const int64_t W = width(), L = pool(), BH = tile_rows(), BW = tile_cols();
    A cs_local[WC > 0 ? WC : 1], cq_local[WC > 0 ? WC : 1];  // registers, once unrolled
    A* __restrict colsum = WC > 0 ? cs_local : colsum_.data();
    A* __restrict colsq = WC > 0 ? cq_local : colsq_.data();
    if (WITH_SQ)
      for (int64_t c = 0; c < W; ++c) colsq[c] = A(0);
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t c = 0; c < W; ++c) colsum[c] = A(0);
      for (int64_t r = i * BH; r < (i + 1) * BH; ++r) {
        const T* __restrict x = fs + r * W;
        const T* __restrict y = ft + r * W;
        for (int64_t c = 0; c < W; ++c) {
          const A d = Scalar<T>::load(x[c]) - Scalar<T>::load(y[c]);
          colsum[c] += d;
          if (WITH_SQ) colsq[c] += d * d;
        }
      }
      for (int64_t k = 0; k < L; ++k) {
        A s = A(0);
        for (int64_t c = k * BW; c < (k + 1) * BW; ++c) s += colsum[c];
        S[i * L + k] = s;
      }
    }
    A sq = A(0);
    if (WITH_SQ)
      for (int64_t c = 0; c < W; ++c) sq += colsq[c];
    return sq;
  }

  // S (l x l, row-major) becomes the (l/2 x l/2) sums of its 2 x 2 blocks, in place.
  static void coarsen(A* S, int64_t l) {
    A out[4];
    copy_coarsened(S, l, out);
    for (int64_t t = 0; t < (l / 2) * (l / 2); ++t) S[t] = out[t];
  }

  static void copy_coarsened(const A* S, int64_t l, A* out) {
    const int64_t h = l / 2;
    for (int64_t a = 0; a < h; ++a)
      for (int64_t b = 0; b < h; ++b)
        out[a * h + b] = (S[(2 * a) * l + 2 * b] + S[(2 * a) * l + 2 * b + 1]) +
                         (S[(2 * a + 1) * l + 2 * b] + S[(2 * a + 1) * l + 2 * b + 1]);
  }

  const int64_t H_, W_, L_, BH_, BW_;
  const A mse_;
  A loss_[3] = {}, grad_[3] = {};
  std::vector<A> colsum_, colsq_;
};

}  // namespace hcl_nested
}  // namespace kdk
