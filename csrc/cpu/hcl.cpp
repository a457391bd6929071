// HCL on CPU (docs/spec.md §1; formulas in common/hcl.h).
//
// Four kernels, chosen by the plane's shape only:
//   * TileKernel (hcl_nested.h): the largest pool L divides H and W, so every
//     bin is a union of L x L equal tiles; one pass builds the tile sums and
//     every pool's sums follow from them. Every CIFAR level (8, 16, 32) and
//     ImageNet's 56 and 28 take it.
//   * Otherwise bins overlap (H or W not a multiple of L: 7, 14, ...). Every
//     bin edge of every pool splits each axis into "segments"; a bin is a
//     rectangle of segment cells (one pool's sums cannot be built from
//     another's, but cell sums serve them all). Per plane: cell sums of d and
//     sum d^2, then the bins' sums from the cells, then
//       forward   partial = coef_mse sum d^2 + sum_b coef_j / area_b^2 * S_b^2
//       backward  one gradient term per cell (the bins covering it, from the
//                 bin sums the forward saved), then grad = g (2 coef_mse d + term).
//     - BatchKernel: rows shorter than 32 except rows of exactly 16, while the
//       plane has at most 16,384 elements: 8 planes at a time, one per vector
//       lane, so the per-plane bookkeeping runs 8-wide instead of in short
//       scalar chains.
//     - PlaneKernel: everything else (rows of 16, rows of 32 or more, and
//       planes over 16,384 elements whatever their rows): one plane at a time;
//       each row adds d into a per-column array (and d^2 into another:
//       elementwise, so it vectorises without reassociation), folded into cells
//       at the end of each row segment.
//     - hcl_small.h's FixedBatchKernel: 7 x 7 and 14 x 14 (float accumulation),
//       BatchKernel's 8 lanes with every bin bound a compile-time constant.
// Entry points: hcl_loss_cpu / hcl_loss_backward_cpu take every level of a call
// at once (one parallel region, no per-level Python). A call is cut into work items of about
// kChunkElements elements (whole planes, by shape only), claimed one at a time
// by the threads; the forward sums each item's partials in double, then the
// items in order. A plane's result never depends on the thread count or on
// which item, batch or lane it fell in, nor on which copy of the kernels runs
// (baseline or AVX2, see use_avx2).
// The forward saves every plane's bin sums (hcl_bins(npools) of them, pool by pool,
// row-major) in the accumulation dtype, and the backward reads them instead of summing the
// plane again: one pass over fs and ft each way. A level's planes [p, p + n) keep their
// n x bins sums at its offset p x bins: plane after plane (TileKernel, PlaneKernel), or bin
// after bin within one batch of n <= 8 planes (the batch kernels: a vector per bin); only the
// kernel that wrote them reads them.
// The sums are exactly those the backward would compute (the same code, the same order),
// so the gradient is the same either way.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#define KDK_HCL_SSE 1
#else
#define KDK_HCL_SSE 0
#endif

#include "../common/checks.h"
#include "../common/adaptive_pool.h"
#include "../common/dtype.h"
#include "../common/hcl.h"
#include "../common/parallel.h"
#include "hcl_nested.h"
#include "hcl_small.h"
#include "isa.h"
#include "transpose4.h"

// hcl_small.h's 8-lane vectors never cross a function boundary that is not inlined (the
// AVX2 copies are flattened): GCC's note that passing them by value changes the ABI with
// AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kdk {
namespace {

// Below this many elements per thread, starting a thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;

// Sorted distinct bin edges along one axis; segment s is [edges[s], edges[s+1]).
struct Axis {
  std::vector<int64_t> edges;
  int64_t segments() const { return int64_t(edges.size()) - 1; }
  int64_t edge_index(int64_t x) const {
    return int64_t(std::lower_bound(edges.begin(), edges.end(), x) - edges.begin());
  }
};

Axis make_axis(int64_t length, const HclCoefs& coefs) {
  Axis axis;
  axis.edges = {0, length};
  for (int j = 0; j < coefs.npools; ++j) {
    const int64_t l = hcl_pool_size(coefs.npools, j);
    for (int64_t i = 0; i < l; ++i) {
      axis.edges.push_back(pool_bin_start(i, length, l));
      axis.edges.push_back(pool_bin_end(i, length, l));
    }
  }
  std::sort(axis.edges.begin(), axis.edges.end());
  axis.edges.erase(std::unique(axis.edges.begin(), axis.edges.end()), axis.edges.end());
  return axis;
}

// Everything about one plane shape that does not depend on the data. Cell
// (rs, cs) is index rs * nc + cs; each bin is a list of cells. The int32 lists
// index cells and bins only (at most 9 x 9 cells: 10 distinct edges per axis,
// and 21 bins), never elements; element offsets are int64 throughout.
struct Plan {
  int64_t H = 0, W = 0;
  Axis rows, cols;
  std::vector<int32_t> bin_begin;   // bin b covers cells bin_cells[bin_begin[b] .. bin_begin[b + 1])
  std::vector<int32_t> bin_cells;
  std::vector<double> bin_loss;     // coef_j / area^2: the bin adds bin_loss * S^2 to the plane's loss
  std::vector<double> bin_grad;     // 2 coef_j / area^2: the bin adds bin_grad * S to each pixel it covers
  std::vector<int32_t> cell_begin;  // cell c lies in bins cell_bins[cell_begin[c] .. cell_begin[c + 1])
  std::vector<int32_t> cell_bins;
  int64_t bins() const { return int64_t(bin_begin.size()) - 1; }
  int64_t cells() const { return rows.segments() * cols.segments(); }
};

Plan make_plan(int64_t H, int64_t W, const HclCoefs& coefs) {
  Plan plan;
  plan.H = H;
  plan.W = W;
  plan.rows = make_axis(H, coefs);
  plan.cols = make_axis(W, coefs);
  const int64_t nc = plan.cols.segments();
  std::vector<std::vector<int32_t>> of_cell(plan.cells());
  plan.bin_begin.push_back(0);
  for (int j = 0; j < coefs.npools; ++j) {  // bins pool by pool, then row-major (i, k)
    const int64_t l = hcl_pool_size(coefs.npools, j);
    for (int64_t i = 0; i < l; ++i) {
      const int64_t rs = pool_bin_start(i, H, l), re = pool_bin_end(i, H, l);
      for (int64_t k = 0; k < l; ++k) {
        const int64_t cs = pool_bin_start(k, W, l), ce = pool_bin_end(k, W, l);
        const int32_t b = int32_t(plan.bin_begin.size() - 1);
        for (int64_t r = plan.rows.edge_index(rs); r < plan.rows.edge_index(re); ++r)
          for (int64_t c = plan.cols.edge_index(cs); c < plan.cols.edge_index(ce); ++c) {
            plan.bin_cells.push_back(int32_t(r * nc + c));
            of_cell[r * nc + c].push_back(b);
          }
        plan.bin_begin.push_back(int32_t(plan.bin_cells.size()));
        const double area = double((re - rs) * (ce - cs));
        plan.bin_loss.push_back(coefs.pool[j] / (area * area));
        plan.bin_grad.push_back(2.0 * coefs.pool[j] / (area * area));
      }
    }
  }
  plan.cell_begin.push_back(0);
  for (const auto& bins : of_cell) {
    plan.cell_bins.insert(plan.cell_bins.end(), bins.begin(), bins.end());
    plan.cell_begin.push_back(int32_t(plan.cell_bins.size()));
  }
  return plan;
}

// colsum[c] (=, or += when ADD) d[r, c] over one row; colsq[c] likewise with d^2 when SQ.
// WC > 0: the row length W is that constant.
template <typename T, bool ADD, bool SQ, bool SQ_ADD, int WC = 0>
inline void row_sums(const T* __restrict a, const T* __restrict b, int64_t W, acc_t<T>* __restrict colsum,
                     acc_t<T>* __restrict colsq) {
  using A = acc_t<T>;
  if (WC > 0) W = WC;
  for (int64_t c = 0; c < W; ++c) {
    const A d = Scalar<T>::load(a[c]) - Scalar<T>::load(b[c]);
    colsum[c] = ADD ? colsum[c] + d : d;
    if (SQ) colsq[c] = SQ_ADD ? colsq[c] + d * d : d * d;
  }
}

// One plane at a time (per-thread scratch), for planes whose bins overlap:
// rows of 32 or more, rows of exactly 16, and planes past BatchKernel's limit.
// WC > 0 is the row length known at compile time (16, 32: rows of CIFAR
// widths under a height that is not a multiple of the largest pool): the
// per-row loops then unroll completely instead of paying loop overhead per row.
template <typename T, int WC = 0>
class PlaneKernel {
 public:
  using A = acc_t<T>;

  PlaneKernel(const Plan& plan, const HclCoefs& coefs)
      : plan_(plan),
        W_(WC > 0 ? WC : plan.W),
        nr_(plan.rows.segments()),
        nc_(plan.cols.segments()),
        mse_(A(coefs.mse)),
        colsum_(plan.W),
        colsq_(plan.W),
        cells_(plan.cells()),
        terms_(plan.bins()),
        bin_loss_(plan.bin_loss.begin(), plan.bin_loss.end()),
        bin_grad_(plan.bin_grad.begin(), plan.bin_grad.end()) {}

  // The plane's partial; sums[b] = S_b for every bin (the plan's order: pool by pool, row-major).
  A forward(const T* fs, const T* ft, A* __restrict sums) {
    const A sq = cell_sums<true>(fs, ft);
    const A* cells = cells_.data();
    const int32_t* list = plan_.bin_cells.data();
    A pooled = A(0);
    for (int64_t b = 0, nb = plan_.bins(); b < nb; ++b) {
      A s = A(0);
      for (int32_t t = plan_.bin_begin[b]; t < plan_.bin_begin[b + 1]; ++t) s += cells[list[t]];
      sums[b] = s;
      pooled += bin_loss_[b] * (s * s);
    }
    return mse_ * sq + pooled;
  }

  // grad of the plane from its saved bin sums.
  void backward(const T* fs, const T* ft, const A* __restrict sums, A g, T* __restrict grad) {
    // bin b adds g * bin_grad * S_b to every pixel it covers: gather that per cell.
    A* cells = cells_.data();
    A* terms = terms_.data();
    for (int64_t b = 0, nb = plan_.bins(); b < nb; ++b) terms[b] = bin_grad_[b] * sums[b];
    for (int64_t cell = 0, n = nr_ * nc_; cell < n; ++cell) {
      A s = A(0);
      for (int32_t t = plan_.cell_begin[cell]; t < plan_.cell_begin[cell + 1]; ++t) s += terms[plan_.cell_bins[t]];
      cells[cell] = g * s;
    }
    const A a = g * (mse_ + mse_);
    A* __restrict add = colsum_.data();
    for (int64_t rs = 0; rs < nr_; ++rs) {
      for (int64_t cs = 0; cs < nc_; ++cs)
        for (int64_t c = plan_.cols.edges[cs]; c < plan_.cols.edges[cs + 1]; ++c) add[c] = cells[rs * nc_ + cs];
      for (int64_t r = plan_.rows.edges[rs]; r < plan_.rows.edges[rs + 1]; ++r) {
        const T* __restrict x = fs + r * W_;
        const T* __restrict y = ft + r * W_;
        T* __restrict out = grad + r * W_;
        for (int64_t c = 0; c < width(); ++c) {
          const A d = Scalar<T>::load(x[c]) - Scalar<T>::load(y[c]);
          out[c] = Scalar<T>::store(a * d + add[c]);
        }
      }
    }
  }

 private:
  // cells_[rs * nc + cs] = sum of d over the cell; returns sum d^2 when WITH_SQ.
  template <bool WITH_SQ>
  A cell_sums(const T* fs, const T* ft) {
    A* colsum = colsum_.data();
    A* colsq = colsq_.data();
    for (int64_t rs = 0; rs < nr_; ++rs) {
      const int64_t r0 = plan_.rows.edges[rs], r1 = plan_.rows.edges[rs + 1];
      if (rs == 0)
        row_sums<T, false, WITH_SQ, false, WC>(fs + r0 * W_, ft + r0 * W_, W_, colsum, colsq);
      else
        row_sums<T, false, WITH_SQ, true, WC>(fs + r0 * W_, ft + r0 * W_, W_, colsum, colsq);
      for (int64_t r = r0 + 1; r < r1; ++r)
        row_sums<T, true, WITH_SQ, true, WC>(fs + r * W_, ft + r * W_, W_, colsum, colsq);
      for (int64_t cs = 0; cs < nc_; ++cs) {
        A s = A(0);
        for (int64_t c = plan_.cols.edges[cs]; c < plan_.cols.edges[cs + 1]; ++c) s += colsum[c];
        cells_[rs * nc_ + cs] = s;
      }
    }
    A sq = A(0);
    if (WITH_SQ)
      for (int64_t c = 0; c < width(); ++c) sq += colsq[c];
    return sq;
  }

  int64_t width() const { return WC > 0 ? WC : W_; }

  const Plan& plan_;
  const int64_t W_, nr_, nc_;
  const A mse_;
  std::vector<A> colsum_, colsq_, cells_, terms_, bin_loss_, bin_grad_;
};

// P-wide lane operations of BatchKernel. Every load comes before every store,
// so that the compiler can use vector instructions without proving no-alias.
template <typename A, int64_t P>
inline void lanes_add(A* s, const A* x) {
  A sv[P], xv[P];
  for (int64_t l = 0; l < P; ++l) sv[l] = s[l], xv[l] = x[l];
  for (int64_t l = 0; l < P; ++l) s[l] = sv[l] + xv[l];
}

template <typename A, int64_t P>
inline void lanes_add_sq(A* s, const A* x) {
  A sv[P], xv[P];
  for (int64_t l = 0; l < P; ++l) sv[l] = s[l], xv[l] = x[l];
  for (int64_t l = 0; l < P; ++l) s[l] = sv[l] + xv[l] * xv[l];
}

template <typename A, int64_t P>
inline void lanes_axpy(A* x, A a, const A* t) {  // x = a x + t
  A xv[P], tv[P];
  for (int64_t l = 0; l < P; ++l) xv[l] = x[l], tv[l] = t[l];
  for (int64_t l = 0; l < P; ++l) x[l] = a * xv[l] + tv[l];
}

// Short rows: P planes at a time, transposed into d_[e * P + lane], so that
// everything done once per plane (cell and bin sums, the loss, the gradient
// terms) runs as P-wide elementwise loops instead of short scalar chains.
// Lanes never mix: a plane's result does not depend on its lane.
template <typename T>
class BatchKernel {
 public:
  using A = acc_t<T>;
  static constexpr int64_t P = 8;

  BatchKernel(const Plan& plan, const HclCoefs& coefs)
      : plan_(plan),
        HW_(plan.H * plan.W),
        mse_(A(coefs.mse)),
        d_(HW_ * P),
        cells_(plan.cells() * P),
        terms_(plan.bins() * P),
        cell_of_(HW_),
        bin_loss_(plan.bin_loss.begin(), plan.bin_loss.end()),
        bin_grad_(plan.bin_grad.begin(), plan.bin_grad.end()) {
    const int64_t nc = plan.cols.segments();
    for (int64_t rs = 0; rs < plan.rows.segments(); ++rs)
      for (int64_t r = plan.rows.edges[rs]; r < plan.rows.edges[rs + 1]; ++r)
        for (int64_t cs = 0; cs < nc; ++cs)
          for (int64_t c = plan.cols.edges[cs]; c < plan.cols.edges[cs + 1]; ++c)
            cell_of_[r * plan.W + c] = int32_t(rs * nc + cs);
  }

  // partial[l] for the n <= P planes starting at fs, ft; their bin sums to sums, bin-major
  // (bin b of plane l at sums[b n + l]).
  void forward(const T* fs, const T* ft, int64_t n, A* partial, A* sums) {
    load(fs, ft, n);
    A sq[P] = {};
    for (int64_t e = 0; e < HW_; ++e) lanes_add_sq<A, P>(sq, &d_[e * P]);
    cell_sums();
    A pooled[P] = {};
    const int64_t nb = plan_.bins();
    for (int64_t b = 0; b < nb; ++b) {
      A s[P];
      bin_sum(b, s);
      for (int64_t l = 0; l < n; ++l) sums[b * n + l] = s[l];
      for (int64_t l = 0; l < P; ++l) pooled[l] += bin_loss_[b] * (s[l] * s[l]);
    }
    for (int64_t l = 0; l < n; ++l) partial[l] = mse_ * sq[l] + pooled[l];
  }

  // grad of the n <= P planes starting at fs, ft, from their saved bin sums.
  void backward(const T* fs, const T* ft, const A* sums, int64_t n, A g, T* grad) {
    load(fs, ft, n);
    const int64_t nb = plan_.bins();
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t l = 0; l < P; ++l) terms_[b * P + l] = bin_grad_[b] * (l < n ? sums[b * n + l] : A(0));
    for (int64_t cell = 0, nc = plan_.cells(); cell < nc; ++cell) {
      A s[P] = {};
      for (int32_t t = plan_.cell_begin[cell]; t < plan_.cell_begin[cell + 1]; ++t)
        lanes_add<A, P>(s, &terms_[int64_t(plan_.cell_bins[t]) * P]);
      for (int64_t l = 0; l < P; ++l) cells_[cell * P + l] = g * s[l];
    }
    // grad = a d + the cell's term, computed P-wide in place of d, then written plane by plane.
    const A a = g * (mse_ + mse_);
    for (int64_t e = 0; e < HW_; ++e) lanes_axpy<A, P>(&d_[e * P], a, &cells_[int64_t(cell_of_[e]) * P]);
    const A* __restrict x = d_.data();
    int64_t l = 0;
#if KDK_HCL_SSE
    if constexpr (std::is_same<T, float>::value) {
      for (; l + 4 <= n; l += 4) {  // whole groups of four planes: 4 x 4 register transposes
        float* out = grad + l * HW_;
        int64_t e = 0;
        for (; e + 4 <= HW_; e += 4) transpose4_store(x + e * P + l, P, out, HW_, e);
        for (; e < HW_; ++e)
          for (int64_t k = 0; k < 4; ++k) out[k * HW_ + e] = x[e * P + l + k];
      }
    }
#endif
    for (; l < n; ++l) {
      T* __restrict out = grad + l * HW_;
#pragma GCC unroll 4
      for (int64_t e = 0; e < HW_; ++e) out[e] = Scalar<T>::store(x[e * P + l]);
    }
  }

 private:
  void load(const T* fs, const T* ft, int64_t n) {
    A* __restrict d = d_.data();
    int64_t l = 0;
#if KDK_HCL_SSE
    if constexpr (std::is_same<T, float>::value) {
      for (; l + 4 <= n; l += 4) {  // whole groups of four planes: 4 x 4 register transposes
        const float* a = fs + l * HW_;
        const float* b = ft + l * HW_;
        // Reading 2 x 4 short planes at once defeats the hardware prefetcher at
        // 16 x 16 (1 KB planes); fetch the next batch's planes (P planes on) early.
        const int64_t ahead = P * HW_;
        int64_t e = 0;
        for (; e + 4 <= HW_; e += 4) {
          if ((e & 15) == 0)
            for (int k = 0; k < 4; ++k) {
              __builtin_prefetch(a + k * HW_ + e + ahead);
              __builtin_prefetch(b + k * HW_ + e + ahead);
            }
          sub_transpose4(a, b, HW_, e, d + e * P + l, P);
        }
        for (; e < HW_; ++e)
          for (int64_t k = 0; k < 4; ++k) d[e * P + l + k] = a[k * HW_ + e] - b[k * HW_ + e];
      }
    }
#endif
    for (; l < P; ++l) {
      if (l < n) {
        const T* __restrict a = fs + l * HW_;
        const T* __restrict b = ft + l * HW_;
#pragma GCC unroll 4
        for (int64_t e = 0; e < HW_; ++e) d[e * P + l] = Scalar<T>::load(a[e]) - Scalar<T>::load(b[e]);
      } else {
        for (int64_t e = 0; e < HW_; ++e) d[e * P + l] = A(0);
      }
    }
  }

  void cell_sums() {
    const int64_t nc = plan_.cols.segments(), W = plan_.W;
    for (int64_t rs = 0; rs < plan_.rows.segments(); ++rs)
      for (int64_t cs = 0; cs < nc; ++cs) {
        A s[P] = {};
        for (int64_t r = plan_.rows.edges[rs]; r < plan_.rows.edges[rs + 1]; ++r)
          for (int64_t c = plan_.cols.edges[cs]; c < plan_.cols.edges[cs + 1]; ++c)
            lanes_add<A, P>(s, &d_[(r * W + c) * P]);
        for (int64_t l = 0; l < P; ++l) cells_[(rs * nc + cs) * P + l] = s[l];
      }
  }

  void bin_sum(int64_t b, A* s) const {
    for (int64_t l = 0; l < P; ++l) s[l] = A(0);
    for (int32_t t = plan_.bin_begin[b]; t < plan_.bin_begin[b + 1]; ++t)
      lanes_add<A, P>(s, &cells_[int64_t(plan_.bin_cells[t]) * P]);
  }

  const Plan& plan_;
  const int64_t HW_;
  const A mse_;
  std::vector<A> d_, cells_, terms_;
  std::vector<int32_t> cell_of_;
  std::vector<A> bin_loss_, bin_grad_;
};

// BatchKernel for short rows (PlaneKernel's per-row work does not pay off there),
// as long as its P-plane scratch stays small.
// (Rows of exactly 16 go to PlaneKernel<T, 16>, whose unrolled rows beat it.)
bool use_batches(int64_t H, int64_t W) { return W < 32 && W != 16 && H * W <= 16384; }

// f(kernel) with the PlaneKernel for rows of W: the compile-time width where there is one.
template <typename T, typename F>
void with_plane_kernel(const Plan& plan, const HclCoefs& coefs, F&& f) {
  if (plan.W == 16) return f(PlaneKernel<T, 16>(plan, coefs));
  if (plan.W == 32) return f(PlaneKernel<T, 32>(plan, coefs));
  f(PlaneKernel<T>(plan, coefs));
}

// f(kernel) with the TileKernel for rows of W (L = tile_pool(H, W, coefs) > 0).
template <typename T, typename F>
void with_tile_kernel(int64_t H, int64_t W, int64_t L, const HclCoefs& coefs, F&& f) {
  using hcl_nested::TileKernel;
  if (L == 4 && H == W && (W == 8 || W == 16 || W == 32)) {  // CIFAR levels: everything unrolled
    if (W == 8) return f(TileKernel<T, 8, 8, 4>(H, W, L, coefs));
    if (W == 16) return f(TileKernel<T, 16, 16, 4>(H, W, L, coefs));
    return f(TileKernel<T, 32, 32, 4>(H, W, L, coefs));
  }
  // ImageNet's 28 x 28 level: rows of 7-column tiles, fully unrolled (the generic loops'
  // per-tile bookkeeping was most of its time)
  if (L == 4 && H == 28 && W == 28) return f(TileKernel<T, 28, 28, 4>(H, W, L, coefs));
  // ImageNet's 56 x 56 level: rows of seven 8-float vectors (hcl_nested.h, tile_sums_vec)
  if (W == 56) return f(TileKernel<T, 56>(H, W, L, coefs));
  if (W == 8) return f(TileKernel<T, 8>(H, W, L, coefs));
  if (W == 16) return f(TileKernel<T, 16>(H, W, L, coefs));
  if (W == 32) return f(TileKernel<T, 32>(H, W, L, coefs));
  f(TileKernel<T>(H, W, L, coefs));
}


// f(kernel) with the fixed-size batch kernel of H x H planes (hcl_small::fixed_size).
template <typename T, typename F>
void with_fixed_kernel(int64_t H, const HclCoefs& coefs, F&& f) {
  if (H == 7) {
    hcl_small::FixedBatchKernel<T, 7, 7> kernel(coefs);
    return f(kernel);
  }
  hcl_small::FixedBatchKernel<T, 14, 14> kernel(coefs);
  f(kernel);
}

// ---- one level's planes [p0, p1): the kernel its shape takes --------------------------------

// One level of a call: its tensors, shape, coefficients and the data-independent plan.
struct Level {
  uintptr_t fs = 0, ft = 0, grad = 0;
  uintptr_t sums = 0;       // the call's bin-sum buffer (accumulation dtype), every level's in order
  int64_t planes = 0, H = 0, W = 0;
  int64_t bins = 0;         // bin sums per plane: hcl_bins(coefs.npools)
  int64_t first_sum = 0;    // index of the level's first bin sum in the buffer
  HclCoefs coefs;
  Plan plan;
  double scale = 1.0;       // c0 of the level (multi-level entry points): loss = scale * sum of partials
  int64_t chunk = 0;        // planes per work item
  int64_t first_item = 0;   // index of the level's first work item in the call's list
  int64_t first_plane = 0;  // index of the level's first plane among all the call's planes
  int64_t items() const { return (planes + chunk - 1) / chunk; }
  int64_t HW() const { return H * W; }
  template <typename A>
  A* plane_sums(int64_t p) const {
    return reinterpret_cast<A*>(sums) + first_sum + p * bins;
  }
};

// partial[p - p0] and the bin sums of planes [p0, p1) of level lv (HW > 0).
template <typename T>
inline void forward_planes(const Level& lv, int64_t p0, int64_t p1, acc_t<T>* __restrict partial) {
  using A = acc_t<T>;
  const int64_t H = lv.H, W = lv.W, HW = H * W, nb = lv.bins;
  const HclCoefs& coefs = lv.coefs;
  const T* fs = reinterpret_cast<const T*>(lv.fs) + p0 * HW;
  const T* ft = reinterpret_cast<const T*>(lv.ft) + p0 * HW;
  A* sums = lv.plane_sums<A>(p0);
  const int64_t n = p1 - p0;
  if (coefs.npools == 0) {  // plain MSE: no bins to track
    const A mse = A(coefs.mse);
    if (HW == 1) {  // the pooled 1 x 1 level: one element per plane
      for (int64_t p = 0; p < n; ++p) {
        const A d = Scalar<T>::load(fs[p]) - Scalar<T>::load(ft[p]);
        partial[p] = mse * (d * d);
      }
      return;
    }
    for (int64_t p = 0; p < n; ++p) partial[p] = mse * hcl_nested::sum_squares(fs + p * HW, ft + p * HW, HW);
    return;
  }
  if (const int64_t L = hcl_nested::tile_pool(H, W, coefs)) {
    with_tile_kernel<T>(H, W, L, coefs, [&](auto kernel) {
      for (int64_t p = 0; p < n; ++p) partial[p] = kernel.forward(fs + p * HW, ft + p * HW, sums + p * nb);
    });
    return;
  }
  if constexpr (std::is_same<acc_t<T>, float>::value) {
    if (hcl_small::fixed_size(H, W, coefs)) {  // 7 x 7, 14 x 14: bins known at compile time
      with_fixed_kernel<T>(H, coefs, [&](auto& kernel) {
        for (int64_t p = 0; p < n; p += kernel.P)
          kernel.forward(fs + p * HW, ft + p * HW, std::min<int64_t>(kernel.P, n - p), partial + p, sums + p * nb);
      });
      return;
    }
  }
  if (use_batches(H, W)) {
    BatchKernel<T> kernel(lv.plan, coefs);
    for (int64_t p = 0; p < n; p += BatchKernel<T>::P)
      kernel.forward(fs + p * HW, ft + p * HW, std::min(BatchKernel<T>::P, n - p), partial + p, sums + p * nb);
    return;
  }
  with_plane_kernel<T>(lv.plan, coefs, [&](auto kernel) {
    for (int64_t p = 0; p < n; ++p) partial[p] = kernel.forward(fs + p * HW, ft + p * HW, sums + p * nb);
  });
}

// grad of planes [p0, p1) of level lv (HW > 0) from their saved bin sums; g = grad_output * the
// level's scale.
template <typename T>
inline void backward_planes(const Level& lv, int64_t p0, int64_t p1, acc_t<T> g) {
  using A = acc_t<T>;
  const int64_t H = lv.H, W = lv.W, HW = H * W, nb = lv.bins;
  const A* sums = lv.plane_sums<A>(p0);
  const HclCoefs& coefs = lv.coefs;
  const T* fs = reinterpret_cast<const T*>(lv.fs) + p0 * HW;
  const T* ft = reinterpret_cast<const T*>(lv.ft) + p0 * HW;
  T* grad = reinterpret_cast<T*>(lv.grad) + p0 * HW;
  const int64_t n = p1 - p0;
  if (coefs.npools == 0) {  // plain MSE: elementwise over the whole chunk
    const A a = g * A(2.0 * coefs.mse);
    const T* __restrict x = fs;
    const T* __restrict y = ft;
    T* __restrict out = grad;
    for (int64_t i = 0, m = n * HW; i < m; ++i)
      out[i] = Scalar<T>::store(a * (Scalar<T>::load(x[i]) - Scalar<T>::load(y[i])));
    return;
  }
  if (const int64_t L = hcl_nested::tile_pool(H, W, coefs)) {
    with_tile_kernel<T>(H, W, L, coefs, [&](auto kernel) {
      for (int64_t p = 0; p < n; ++p) kernel.backward(fs + p * HW, ft + p * HW, sums + p * nb, g, grad + p * HW);
    });
    return;
  }
  if constexpr (std::is_same<acc_t<T>, float>::value) {
    if (hcl_small::fixed_size(H, W, coefs)) {
      with_fixed_kernel<T>(H, coefs, [&](auto& kernel) {
        for (int64_t p = 0; p < n; p += kernel.P)
          kernel.backward(fs + p * HW, ft + p * HW, sums + p * nb, std::min<int64_t>(kernel.P, n - p), g,
                          grad + p * HW);
      });
      return;
    }
  }
  if (use_batches(H, W)) {
    BatchKernel<T> kernel(lv.plan, coefs);
    for (int64_t p = 0; p < n; p += BatchKernel<T>::P)
      kernel.backward(fs + p * HW, ft + p * HW, sums + p * nb, std::min(BatchKernel<T>::P, n - p), g, grad + p * HW);
    return;
  }
  with_plane_kernel<T>(lv.plan, coefs, [&](auto kernel) {
    for (int64_t p = 0; p < n; ++p) kernel.backward(fs + p * HW, ft + p * HW, sums + p * nb, g, grad + p * HW);
  });
}

// ---- the instruction set: the same code compiled twice ------------------------------------
//
// The portable build targets SSE2 only (no -march: the wheel runs anywhere). The kernels'
// per-row loops keep 2 x W column accumulators: at W = 32 that is every xmm register, so
// they spill; with AVX2 the same loops take half the registers and half the instructions.
// `flatten` inlines the whole kernel into the AVX2 copy so that all of it is compiled for
// AVX2. Without FMA (GCC would contract a * b + c into one rounding) and without
// -ffast-math, the AVX2 copy performs the same operations in the same order: both copies
// give bitwise the same results (python_tests/test_hcl.py checks).
template <typename T>
using FwdFn = void (*)(const Level&, int64_t, int64_t, acc_t<T>*);
template <typename T>
using BwdFn = void (*)(const Level&, int64_t, int64_t, acc_t<T>);

#define KDK_HCL_RUNNERS(SUFFIX, TARGET, T)                                                           \
  TARGET void forward_##SUFFIX(const Level& lv, int64_t p0, int64_t p1, acc_t<T>* partial) {         \
    forward_planes<T>(lv, p0, p1, partial);                                                          \
  }                                                                                                  \
  TARGET void backward_##SUFFIX(const Level& lv, int64_t p0, int64_t p1, acc_t<T> g) {               \
    backward_planes<T>(lv, p0, p1, g);                                                               \
  }

KDK_HCL_RUNNERS(base_f32, , float)
KDK_HCL_RUNNERS(base_f64, , double)
KDK_HCL_RUNNERS(base_f16, , Half)
KDK_HCL_RUNNERS(base_bf16, , BFloat16)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KDK_HCL_X86 1
#define KDK_HCL_AVX2 __attribute__((target("avx2"), flatten))
KDK_HCL_RUNNERS(avx2_f32, KDK_HCL_AVX2, float)
KDK_HCL_RUNNERS(avx2_f64, KDK_HCL_AVX2, double)
KDK_HCL_RUNNERS(avx2_f16, KDK_HCL_AVX2, Half)
KDK_HCL_RUNNERS(avx2_bf16, KDK_HCL_AVX2, BFloat16)
#else
#define KDK_HCL_X86 0
#endif

// Whether the AVX2 copy runs: isa.h's choice (the CPU's, or $KDKERNELS_CPU_ISA's) is AVX2 or wider.
bool use_avx2() { return KDK_HCL_X86 && isa() >= Isa::kAvx2; }

template <typename T>
struct Runners {
  FwdFn<T> forward;
  BwdFn<T> backward;
};

#if KDK_HCL_X86
#define KDK_HCL_PICK(SUFFIX)                                                              \
  (use_avx2() ? Runners<T>{forward_avx2_##SUFFIX, backward_avx2_##SUFFIX}                \
              : Runners<T>{forward_base_##SUFFIX, backward_base_##SUFFIX})
#else
#define KDK_HCL_PICK(SUFFIX) (Runners<T>{forward_base_##SUFFIX, backward_base_##SUFFIX})
#endif

template <typename T>
Runners<T> runners() {
  if constexpr (std::is_same<T, float>::value) return KDK_HCL_PICK(f32);
  else if constexpr (std::is_same<T, double>::value) return KDK_HCL_PICK(f64);
  else if constexpr (std::is_same<T, Half>::value) return KDK_HCL_PICK(f16);
  else return KDK_HCL_PICK(bf16);
}

// ---- work items: (level, chunk of planes), from the shapes only -----------------------------

// About this many elements per work item: small enough that two threads share even
// a CIFAR call's levels evenly (and a thread that starts late, its core busy elsewhere,
// still finds work), large enough that a claim costs nothing next to it.
constexpr int64_t kChunkElements = 16384;

// Planes per work item of a level: a multiple of BatchKernel's 8 lanes (whole batches).
int64_t chunk_planes(int64_t planes, int64_t HW) {
  int64_t c = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, HW));
  c = (c + 7) / 8 * 8;
  return std::max<int64_t>(1, std::min(c, planes));
}

// The levels' work items, numbered level by level; returns the total number.
int64_t assign_items(std::vector<Level>& levels) {
  int64_t items = 0, planes = 0, sums = 0;
  for (Level& lv : levels) {
    lv.chunk = chunk_planes(lv.planes, lv.HW());
    lv.first_item = items;
    lv.first_plane = planes;
    lv.first_sum = sums;
    sums += lv.planes * lv.bins;
    planes += lv.planes;
    items += lv.planes > 0 && lv.HW() > 0 ? lv.items() : 0;
  }
  return items;
}

// fn(level, p0, p1) for every work item, claimed one at a time by up to num_threads threads.
// Which thread runs an item never changes what it computes.
template <typename F>
void for_each_item(const std::vector<Level>& levels, int64_t items, int64_t num_threads, F&& fn) {
  int64_t elements = 0;
  for (const Level& lv : levels) elements += lv.planes * lv.HW();
  const int64_t threads = choose_threads(num_threads, items, elements, kMinElementsPerThread);
  std::vector<std::pair<int32_t, int64_t>> where(items);  // item -> (level, first plane)
  for (size_t l = 0; l < levels.size(); ++l) {
    const Level& lv = levels[l];
    if (lv.planes == 0 || lv.HW() == 0) continue;
    for (int64_t i = 0; i < lv.items(); ++i) where[lv.first_item + i] = {int32_t(l), i * lv.chunk};
  }
  parallel_for_each(items, threads, [&](int64_t item) {
    const Level& lv = levels[where[item].first];
    const int64_t p0 = where[item].second;
    fn(lv, item, p0, std::min(lv.planes, p0 + lv.chunk));
  });
}

// Sum of x[0 .. n) in double, in 4 interleaved lanes (a fixed order).
template <typename A>
double sum_double(const A* x, int64_t n) {
  double lane[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int k = 0; k < 4; ++k) lane[k] += double(x[i + k]);
  for (int k = 0; i < n; ++i, ++k) lane[k] += double(x[i]);
  return (lane[0] + lane[1]) + (lane[2] + lane[3]);
}

Level make_level(const char* where, uintptr_t fs, uintptr_t ft, uintptr_t grad, uintptr_t sums, int64_t planes,
                 int64_t H, int64_t W, const HclCoefs& coefs, double scale) {
  hcl_check_sizes(where, planes, H, W);
  Level lv;
  lv.fs = fs, lv.ft = ft, lv.grad = grad, lv.sums = sums;
  lv.planes = planes, lv.H = H, lv.W = W;
  lv.bins = hcl_bins(coefs.npools);
  lv.coefs = coefs;
  lv.scale = scale;
  if (planes > 0 && H * W > 0) {
    check_pointers(where, {fs, ft});
    if (lv.bins > 0) check_pointers(where, {sums});
    if (coefs.npools > 0 && !hcl_nested::tile_pool(H, W, coefs)) lv.plan = make_plan(H, W, coefs);
  }
  return lv;
}

// One Level per entry of a call's per-level lists; grad is null for the forward; sums is the
// call's bin-sum buffer (written by the forward, read by the backward).
std::vector<Level> make_levels(const char* where, const std::vector<uintptr_t>& fs, const std::vector<uintptr_t>& ft,
                               const std::vector<uintptr_t>* grad, uintptr_t sums, const std::vector<int64_t>& planes,
                               const std::vector<int64_t>& H, const std::vector<int64_t>& W,
                               const std::vector<HclCoefs>& coefs, const std::vector<double>& scale) {
  const size_t n = fs.size();
  if (ft.size() != n || (grad && grad->size() != n) || planes.size() != n || H.size() != n || W.size() != n ||
      coefs.size() != n || scale.size() != n)
    throw std::invalid_argument(std::string(where) + ": the per-level lists differ in length");
  std::vector<Level> levels;
  levels.reserve(n);
  for (size_t l = 0; l < n; ++l) {
    const uintptr_t g = grad ? (*grad)[l] : 0;
    levels.push_back(make_level(where, fs[l], ft[l], g, sums, planes[l], H[l], W[l], coefs[l], scale[l]));
    if (grad && planes[l] > 0 && H[l] * W[l] > 0) check_pointers(where, {g});
  }
  return levels;
}

}  // namespace

void hcl_loss_cpu(int dtype, const std::vector<uintptr_t>& fs, const std::vector<uintptr_t>& ft, uintptr_t out_ptr,
                  uintptr_t sums_ptr, const std::vector<int64_t>& planes, const std::vector<int64_t>& H, const std::vector<int64_t>& W,
                  const std::vector<HclCoefs>& coefs, const std::vector<double>& scale, int64_t num_threads) {
  check_pointers("hcl_loss_cpu", {out_ptr});
  dispatch_dtype(dtype, "hcl_loss_cpu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    std::vector<Level> levels = make_levels("hcl_loss_cpu", fs, ft, nullptr, sums_ptr, planes, H, W, coefs, scale);
    const int64_t items = assign_items(levels);
    // Each item writes its planes' partials (the acc dtype, as the per-level entry point
    // does) into its slice of a scratch buffer and sums them in double into its own
    // slot; the slots are then summed in item order. Items come from the shapes only:
    // the loss does not depend on the thread count.
    std::vector<A> partial(std::max<int64_t>(1, levels.empty() ? 0 : levels.back().first_plane + levels.back().planes));
    std::vector<double> item_sum(items, 0.0);
    const Runners<T> run = runners<T>();
    for_each_item(levels, items, num_threads, [&](const Level& lv, int64_t item, int64_t p0, int64_t p1) {
      A* mine = partial.data() + lv.first_plane + p0;
      run.forward(lv, p0, p1, mine);
      item_sum[item] = sum_double(mine, p1 - p0);
    });
    double total = 0.0;
    for (const Level& lv : levels) {
      if (lv.planes == 0 || lv.HW() == 0) continue;
      double s = 0.0;
      for (int64_t i = 0; i < lv.items(); ++i) s += item_sum[lv.first_item + i];
      total += lv.scale * s;
    }
    *reinterpret_cast<A*>(out_ptr) = A(total);
  });
}

void hcl_loss_backward_cpu(int dtype, const std::vector<uintptr_t>& fs, const std::vector<uintptr_t>& ft,
                           uintptr_t gout_ptr, uintptr_t sums_ptr, const std::vector<uintptr_t>& grad,
                           const std::vector<int64_t>& planes,
                           const std::vector<int64_t>& H, const std::vector<int64_t>& W,
                           const std::vector<HclCoefs>& coefs, const std::vector<double>& scale,
                           int64_t num_threads) {
  check_pointers("hcl_loss_backward_cpu", {gout_ptr});
  dispatch_dtype(dtype, "hcl_loss_backward_cpu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    std::vector<Level> levels =
        make_levels("hcl_loss_backward_cpu", fs, ft, &grad, sums_ptr, planes, H, W, coefs, scale);
    const size_t n = levels.size();
    const int64_t items = assign_items(levels);
    // g of a level = grad_output * c0, rounded to the acc dtype as the per-level path did
    const A gout = *reinterpret_cast<const A*>(gout_ptr);
    std::vector<A> g(n);
    for (size_t l = 0; l < n; ++l) g[l] = gout * A(scale[l]);
    const Level* first = levels.data();
    const Runners<T> run = runners<T>();
    for_each_item(levels, items, num_threads, [&](const Level& lv, int64_t, int64_t p0, int64_t p1) {
      run.backward(lv, p0, p1, g[&lv - first]);
    });
  });
}

}  // namespace kdk
