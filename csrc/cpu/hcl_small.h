// HCL on CPU for small planes of a size known at compile time whose bins overlap
// (docs/spec.md §1; formulas in common/hcl.h): 7 x 7 and 14 x 14, the two deepest
// ImageNet levels, with all three pools (4, 2, 1). Included by hcl.cpp only.
//
// Like hcl.cpp's BatchKernel, 8 planes at a time, one per lane (d[e][lane]), so that the
// per-plane work runs 8 wide; unlike it, the bins are known at compile time: instead of
// walking a plan's cell and bin lists (most of BatchKernel's time at 7 x 7, where every
// pixel is its own cell), every loop below has constant bounds and unrolls. Per plane:
//   cb[r][j]  = sum of d over row r's columns in column bin j (the 4 + 2 + 1 column bins
//               of the three pools, pool by pool),
//   S(i, j)   = sum over the rows of row bin i of cb[r][j] (i, j bins of the same pool),
//   forward   partial = coef_mse sum d^2 + sum_bins coef_l / area^2 S^2; every S saved,
//   backward  G(i, j) = g 2 coef_l / area^2 S(i, j) (the saved S);  u[r][j] = sum over the row bins i
//             of j's pool that hold row r of G(i, j);  grad[r, c] = g 2 coef_mse d[r, c]
//             + sum over the column bins j holding c of u[r][j].
// Every sum has a fixed order (lanes never mix): a plane's result depends on its data only.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../common/dtype.h"
#include "../common/hcl.h"
#include "transpose4.h"

// The 8-lane vector type is internal (every function here is inlined into its caller):
// GCC's note that passing it by value has another ABI with AVX does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kdk {
namespace hcl_small {

constexpr int kBins = 7;  // 4 + 2 + 1 bins along each axis

constexpr int pool_of(int j) { return j < 4 ? 4 : (j < 6 ? 2 : 1); }
constexpr int index_in_pool(int j) { return j < 4 ? j : (j < 6 ? j - 4 : 0); }
constexpr int pool_index(int j) { return j < 4 ? 0 : (j < 6 ? 1 : 2); }  // coefs.pool[] of bin j's pool
constexpr int bin_start(int j, int n) { return (index_in_pool(j) * n) / pool_of(j); }
constexpr int bin_end(int j, int n) { return ((index_in_pool(j) + 1) * n + pool_of(j) - 1) / pool_of(j); }
// Index of bin (row bin i, column bin j) of one pool among a plane's 21 saved bin sums
// (pool by pool, row-major: hcl.cpp's order).
constexpr int saved_index(int i, int j) {
  return pool_of(i) == 4 ? i * 4 + j : (pool_of(i) == 2 ? 16 + (i - 4) * 2 + (j - 4) : 20);
}

// f(std::integral_constant<int, i>()) for i = 0 .. N-1: loop indices that are constants, so
// that every bin bound below is one and nothing is left to compute per plane.
template <typename F, int... I>
inline void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>()), ...);
}
template <int N, typename F>
inline void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>());
}

// Whether FixedBatchKernel<T, H, W> serves this plane: the sizes it is compiled for.
inline bool fixed_size(int64_t H, int64_t W, const HclCoefs& coefs) {
  return coefs.npools == 3 && H == W && (H == 7 || H == 14);
}

template <typename T, int H, int W>
class FixedBatchKernel {
 public:
  using A = acc_t<T>;
  static_assert(std::is_same<A, float>::value, "float accumulation only (float32, float16, bfloat16)");
  static constexpr int64_t P = 8;
  static constexpr int HW = H * W;
  typedef float V __attribute__((vector_size(32)));  // 8 lanes: 2 SSE or 1 AVX register

  explicit FixedBatchKernel(const HclCoefs& coefs) : mse_(A(coefs.mse)) {
    for (int i = 0; i < kBins; ++i)
      for (int j = 0; j < kBins; ++j) {
        if (pool_of(i) != pool_of(j)) continue;
        const double area = double(bin_end(i, H) - bin_start(i, H)) * double(bin_end(j, W) - bin_start(j, W));
        const double c = coefs.pool[pool_index(i)];
        loss_[i][j] = A(c / (area * area));
        grad_[i][j] = A(2.0 * c / (area * area));
      }
  }

  // partial[l] for the n <= P planes starting at fs, ft; their 21 n bin sums to sums, bin-major
  // (bin b of plane l at sums[b n + l]: one vector store per bin in a whole batch).
  void forward(const T* fs, const T* ft, int64_t n, A* partial, A* sums) {
    load(fs, ft, n);
    column_bins();
    V pooled = splat(0.f);
    static_for<kBins>([&](auto I) {
      static_for<kBins>([&](auto J) {
        if constexpr (pool_of(I) == pool_of(J)) {
          const V s = bin_sum<I, J>();
          save_lanes(sums + saved_index(I, J) * n, s, n);
          pooled += splat(loss_[I][J]) * (s * s);
        }
      });
    });
    // (the squares last: live across the unrolled bins above, GCC kept their sum in memory)
    // in 4 interleaved accumulators (a fixed order): one chain of HW dependent adds was
    // most of the 14 x 14 forward's time
    V q0 = splat(0.f), q1 = q0, q2 = q0, q3 = q0;
    int e = 0;
    for (; e + 4 <= HW; e += 4) {
      q0 += d_[e] * d_[e];
      q1 += d_[e + 1] * d_[e + 1];
      q2 += d_[e + 2] * d_[e + 2];
      q3 += d_[e + 3] * d_[e + 3];
    }
    if (e < HW) q0 += d_[e] * d_[e];  // HW % 4 <= 1 for 7 x 7 (49) and 14 x 14 (196)
    static_assert(HW % 4 <= 1, "one leftover element at most");
    const V sq = (q0 + q1) + (q2 + q3);
    // through memory: a lane read at a run-time index would make the vectors addressable
    // (kept in memory: the sum of squares above then ran at store-forwarding latency)
    alignas(32) float total[P];
    const V t = splat(mse_) * sq + pooled;
    std::memcpy(total, &t, sizeof t);
    for (int64_t l = 0; l < n; ++l) partial[l] = total[l];
  }

  // grad of the n <= P planes starting at fs, ft, from their saved bin sums; g = grad_output * c0.
  void backward(const T* fs, const T* ft, const A* sums, int64_t n, A g, T* grad) {
    load(fs, ft, n);
    V G[kBins][kBins];
    static_for<kBins>([&](auto I) {
      static_for<kBins>([&](auto J) {
        if constexpr (pool_of(I) == pool_of(J)) {
          G[I][J] = splat(g * grad_[I][J]) * saved_lanes(sums + saved_index(I, J) * n, n);
        }
      });
    });
    const V a = splat(g * (mse_ + mse_));
    static_for<H>([&](auto R) {
      V u[kBins];  // u[j] = sum over the row bins holding row R (of j's pool) of G(i, j)
      static_for<kBins>([&](auto J) {
        u[J] = splat(0.f);
        static_for<kBins>([&](auto I) {
          if constexpr (pool_of(I) == pool_of(J) && bin_start(I, H) <= R && R < bin_end(I, H)) u[J] += G[I][J];
        });
      });
      static_for<W>([&](auto C) {
        V term = splat(0.f);
        static_for<kBins>([&](auto J) {
          if constexpr (bin_start(J, W) <= C && C < bin_end(J, W)) term += u[J];
        });
        d_[R * W + C] = a * d_[R * W + C] + term;
      });
    });
    store(grad, n);
  }

 private:
  static V splat(float x) { return V{x, x, x, x, x, x, x, x}; }

  // The first n <= P lanes of v to p[0 .. n), and back (lanes past n read as 0). A whole batch
  // (n = P) takes one vector store or load: a copy of run-time length is a call to memcpy.
  static void save_lanes(float* p, V v, int64_t n) {
    if (n == P) {
      std::memcpy(p, &v, sizeof v);
      return;
    }
    alignas(32) float lanes[P];
    std::memcpy(lanes, &v, sizeof v);
    for (int64_t l = 0; l < n; ++l) p[l] = lanes[l];
  }
  static V saved_lanes(const float* p, int64_t n) {
    V v;
    if (n == P) {
      std::memcpy(&v, p, sizeof v);
      return v;
    }
    alignas(32) float lanes[P] = {};
    for (int64_t l = 0; l < n; ++l) lanes[l] = p[l];
    std::memcpy(&v, lanes, sizeof v);
    return v;
  }

  // cb_[r][j] = sum of d over row r, columns of column bin j.
  void column_bins() {
    for (int r = 0; r < H; ++r)
      static_for<kBins>([&](auto J) {
        constexpr int c0 = bin_start(J, W), c1 = bin_end(J, W);
        V s = d_[r * W + c0];
        for (int c = c0 + 1; c < c1; ++c) s += d_[r * W + c];
        cb_[r][J] = s;
      });
  }

  // S of row bin I, column bin J (same pool).
  template <int I, int J>
  V bin_sum() const {
    constexpr int r0 = bin_start(I, H), r1 = bin_end(I, H);
    V s = cb_[r0][J];
    for (int r = r0 + 1; r < r1; ++r) s += cb_[r][J];
    return s;
  }

  // d_[e][l] = fs - ft of element e of plane l (zero in lanes past n).
  void load(const T* fs, const T* ft, int64_t n) {
    float* d = reinterpret_cast<float*>(d_);
    int64_t l = 0;
#if defined(__SSE2__)
    if constexpr (std::is_same<T, float>::value && (HW > 64)) {
      // A full batch of planes over a few cache lines each (14 x 14: 12): fs - ft over the
      // batch's contiguous block first, then the transposes from L1. Read in the transposes'
      // order, 2 x 8 interleaved short streams, the block from memory took 3x its time from
      // cache (the hardware prefetcher does not follow them); read in order, it streams.
      if (n == P) {
        float* flat = &flat_[0][0];
        for (int64_t i = 0; i < P * HW; ++i) flat[i] = fs[i] - ft[i];
        for (; l < P; l += 4) {
          const float* a = flat_[l];
          int e = 0;
          for (; e + 4 <= HW; e += 4) transpose4(a, HW, e, d + e * P + l, P);
          for (; e < HW; ++e)
            for (int k = 0; k < 4; ++k) d[e * P + l + k] = a[k * HW + e];
        }
        return;
      }
    }
    if constexpr (std::is_same<T, float>::value) {
      for (; l + 4 <= n; l += 4) {  // whole groups of four planes: 4 x 4 register transposes
        const float* a = fs + l * HW;
        const float* b = ft + l * HW;
        int e = 0;
        for (; e + 4 <= HW; e += 4) sub_transpose4(a, b, HW, e, d + e * P + l, P);
        for (; e < HW; ++e)
          for (int k = 0; k < 4; ++k) d[e * P + l + k] = a[k * HW + e] - b[k * HW + e];
      }
    }
#endif
    for (; l < P; ++l) {
      if (l < n) {
        const T* __restrict x = fs + l * HW;
        const T* __restrict y = ft + l * HW;
        for (int e = 0; e < HW; ++e) d[e * P + l] = Scalar<T>::load(x[e]) - Scalar<T>::load(y[e]);
      } else {
        for (int e = 0; e < HW; ++e) d[e * P + l] = 0.f;
      }
    }
  }

  // grad of plane l = lane l of d_.
  void store(T* grad, int64_t n) {
    const float* x = reinterpret_cast<const float*>(d_);
    int64_t l = 0;
#if defined(__SSE2__)
    if constexpr (std::is_same<T, float>::value && (HW > 64)) {
      if (n == P) {  // as load(): transposes into L1, then one in-order pass over the block
        for (; l < P; l += 4) {
          float* out = flat_[l];
          int e = 0;
          for (; e + 4 <= HW; e += 4) transpose4_store(x + e * P + l, P, out, HW, e);
          for (; e < HW; ++e)
            for (int k = 0; k < 4; ++k) out[k * HW + e] = x[e * P + l + k];
        }
        std::memcpy(grad, &flat_[0][0], sizeof(float) * P * HW);
        return;
      }
    }
    if constexpr (std::is_same<T, float>::value) {
      for (; l + 4 <= n; l += 4) {
        float* out = grad + l * HW;
        int e = 0;
        for (; e + 4 <= HW; e += 4) transpose4_store(x + e * P + l, P, out, HW, e);
        for (; e < HW; ++e)
          for (int k = 0; k < 4; ++k) out[k * HW + e] = x[e * P + l + k];
      }
    }
#endif
    for (; l < n; ++l) {
      T* __restrict out = grad + l * HW;
      for (int e = 0; e < HW; ++e) out[e] = Scalar<T>::store(x[e * P + l]);
    }
  }

  const A mse_;
  A loss_[kBins][kBins] = {}, grad_[kBins][kBins] = {};
  V d_[HW];
  V cb_[H][kBins];
  alignas(32) float flat_[HW > 64 ? P : 1][HW];  // a batch plane-major: load()'s fs - ft, store()'s grad
};

}  // namespace hcl_small
}  // namespace kdk

#pragma GCC diagnostic pop
