// HCL on CUDA (docs/spec.md §1; formulas in common/hcl.h).
//
// A group of G = TX * TY threads (a power of two, 1..256) owns one (n, c) plane;
// a 256-thread block holds 256 / G groups, so tiny planes share a block. Thread
// (tx, ty) of a group handles the columns c = tx, tx + TX, ... and, for each, the
// rows r = ty, ty + TY, ... (TX >= W unless W > 256, so usually one column):
//
//   * per element it adds d to the row-bin sums of its column (the bins of each
//     pool whose row range covers r: a register per row bin, 4 + 2 + 1 at most)
//     and d^2 to a register;
//   * per column it folds those row-bin sums into the (i, k) bin sums of the
//     column bins k that cover c (21 registers at most).
//
// Bins overlap and several may cover one index, so membership is a compare on
// each bin edge, never an index computation. The group then reduces its
// registers with an xor-butterfly of shuffles (every lane ends with the same,
// fixed-order sum: fp addition is commutative) and, for G > 32, the warps'
// results in shared memory summed in warp order. No atomics: deterministic.
//
// The backward recomputes the bin sums the same way, turns them into the
// gradient terms f = 2 coef S / area^2, folds those per column into one term
// per row bin, and writes grad = g (2 coef_mse d + terms) in a second read of
// the plane (from L2).
//
// The per-bin factors coef / area^2 and 2 coef / area^2 are computed on the host
// in double, as the C++ CPU kernels do (csrc/cpu/hcl.cpp), and passed by value:
// the kernels only multiply. (A division on the GPU is a subroutine call on its
// slow path, and the registers saved around those calls were all of the HCL
// kernels' register spills.)
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../common/checks.h"
#include "check_launch.h"
#include "../common/adaptive_pool.h"
#include "../common/dtype.h"
#include "../common/hcl.h"

namespace kdk {
namespace hcl_detail {

constexpr int kMaxBins = 21;  // 16 + 4 + 1

// Per bin b (pool by pool, then row-major (i, k), as in Layout and csrc/cpu/hcl.cpp):
// the plane's loss adds loss[b] * S_b^2, each pixel the bin covers gets g * grad[b] * S_b.
template <typename A>
struct BinFactors {
  A loss[kMaxBins];  // coef_j / area_b^2
  A grad[kMaxBins];  // 2 coef_j / area_b^2
};

// Register layout for NP kept pools (a suffix of 4, 2, 1).
template <int NP>
struct Layout {
  static constexpr bool has4 = NP >= 3, has2 = NP >= 2, has1 = NP >= 1;
  // row-bin sums of one column: pool 4 at R4..R4+3, pool 2 at R2..R2+1, pool 1 at R1
  static constexpr int R4 = 0, R2 = has4 ? 4 : 0, R1 = R2 + (has2 ? 2 : 0);
  static constexpr int rows = R1 + (has1 ? 1 : 0);
  // bin sums, row-major (i, k) per pool: pool 4 at B4.., pool 2 at B2.., pool 1 at B1
  static constexpr int B4 = 0, B2 = has4 ? 16 : 0, B1 = B2 + (has2 ? 4 : 0);
  static constexpr int bins = B1 + (has1 ? 1 : 0);
  static_assert(bins <= kMaxBins, "at most the 21 bins of pools 4, 2, 1");
};

}  // namespace hcl_detail

namespace {

using hcl_detail::BinFactors;
using hcl_detail::Layout;

// Blocks of kThreads threads. The kernels carry no __launch_bounds__: with one,
// ptxas aims at a register count for occupancy and spills a few bytes of
// loop-invariant values to reach it (4-28 B in several instantiations); without
// one it keeps them in registers (at most 134 per thread here, well under the 255
// a 256-thread block allows, so every launch fits).
constexpr int kThreadBits = 8;
constexpr int kThreads = 1 << kThreadBits;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t(65535) * 16;  // beyond this the blocks stride over the planes

// Index widths: plane bases (plane * H * W) are int64, so planes * H * W may pass
// 2^31. Offsets inside one plane (r * W + c) and H, W themselves stay int: 32-bit
// math is cheaper on the GPU, and hcl_check_sizes (common/hcl.h) refuses planes of
// 2^31 elements or more and H, W >= 2^28 (so the bin-edge products 4 * (x + 1) and
// (i + 1) * length in pool_bin_covers<int> cannot wrap either).
struct Shape {
  int64_t planes;
  int H, W;
  int tx_bits, ty_bits;  // TX = 1 << tx_bits threads along W, TY = 1 << ty_bits along H
};

// Bit i set <=> bin i of pool L covers index x of an axis of `length`.
template <int L>
__device__ __forceinline__ unsigned bins_covering(int x, int length) {
  unsigned mask = 0;
#pragma unroll
  for (int i = 0; i < L; ++i) mask |= unsigned(pool_bin_covers<int>(i, x, length, L)) << i;
  return mask;
}

template <int L, typename A>
__device__ __forceinline__ void add_masked(A* acc, unsigned mask, A v) {
#pragma unroll
  for (int i = 0; i < L; ++i) acc[i] += ((mask >> i) & 1u) ? v : A(0);
}

// This thread's share of one plane: v[0] += sum d^2 (WITH_SQ), v[OFF + b] += bin sums.
template <typename T, int NP, bool WITH_SQ, int N>
__device__ __forceinline__ void thread_sums(const T* __restrict__ fs, const T* __restrict__ ft, int H, int W,
                                            int tx, int ty, int TX, int TY, acc_t<T> (&v)[N]) {
  using A = acc_t<T>;
  using Lay = Layout<NP>;
  constexpr int OFF = WITH_SQ ? 1 : 0;
  for (int c = tx; c < W; c += TX) {
    A rows[Lay::rows > 0 ? Lay::rows : 1];
#pragma unroll
    for (int i = 0; i < (Lay::rows > 0 ? Lay::rows : 1); ++i) rows[i] = A(0);
#pragma unroll 4
    for (int r = ty; r < H; r += TY) {
      const int off = r * W + c;  // inside one plane: < 2^31 (hcl_check_sizes)
      const A d = Scalar<T>::load(fs[off]) - Scalar<T>::load(ft[off]);
      if (WITH_SQ) v[0] += d * d;
      if constexpr (Lay::has4) add_masked<4>(rows + Lay::R4, bins_covering<4>(r, H), d);
      if constexpr (Lay::has2) add_masked<2>(rows + Lay::R2, bins_covering<2>(r, H), d);
      if constexpr (Lay::has1) rows[Lay::R1] += d;
    }
    if constexpr (Lay::has4) {
      const unsigned cols = bins_covering<4>(c, W);
#pragma unroll
      for (int i = 0; i < 4; ++i) add_masked<4>(v + OFF + Lay::B4 + 4 * i, cols, rows[Lay::R4 + i]);
    }
    if constexpr (Lay::has2) {
      const unsigned cols = bins_covering<2>(c, W);
#pragma unroll
      for (int i = 0; i < 2; ++i) add_masked<2>(v + OFF + Lay::B2 + 2 * i, cols, rows[Lay::R2 + i]);
    }
    if constexpr (Lay::has1) v[OFF + Lay::B1] += rows[Lay::R1];
  }
}

// Sum of v over the group of `group_size` consecutive threads (a power of two);
// every thread of the group gets the same, bitwise identical result. All threads
// of the block must call it (it may __syncthreads); smem holds kWarps * N values.
template <typename A, int N>
__device__ __forceinline__ void group_allreduce(A (&v)[N], int group_size, A* smem) {
  const int width = group_size < 32 ? group_size : 32;
  for (int offset = 1; offset < width; offset <<= 1) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] += __shfl_xor_sync(0xffffffffu, v[n], offset);
  }
  if (group_size > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) smem[warp * N + n] = v[n];
    }
    __syncthreads();
    const int warps = group_size >> 5, first = warp - warp % warps;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      A s = smem[first * N + n];
      for (int w = 1; w < warps; ++w) s += smem[(first + w) * N + n];
      v[n] = s;
    }
    __syncthreads();  // smem is reused by the next tile
  }
}

// The plane's loss from its reduced sums v[0] = sum d^2, v[1 + b] = bin sums:
// coef_mse sum d^2 + sum_b loss[b] S_b^2 (bins in order, as the C++ CPU kernel).
template <int NP, typename A>
__device__ __forceinline__ A plane_loss(const A* v, A mse, const BinFactors<A>& f) {
  A pooled = A(0);
#pragma unroll
  for (int b = 0; b < Layout<NP>::bins; ++b) pooled += f.loss[b] * (v[1 + b] * v[1 + b]);
  return mse * v[0] + pooled;
}

// Bin sums -> gradient terms grad[b] * S_b, in place.
template <int NP, typename A>
__device__ __forceinline__ void grad_terms(A* t, const BinFactors<A>& f) {
#pragma unroll
  for (int b = 0; b < Layout<NP>::bins; ++b) t[b] = f.grad[b] * t[b];
}

// Row-bin terms of column c: q[i] = sum over the column bins k covering c of f(i, k).
template <int L, typename A>
__device__ __forceinline__ void fold_columns(A* q, const A* f, int c, int W) {
  const unsigned cols = bins_covering<L>(c, W);
#pragma unroll
  for (int i = 0; i < L; ++i) {
    A t = A(0);
#pragma unroll
    for (int k = 0; k < L; ++k) t += ((cols >> k) & 1u) ? f[i * L + k] : A(0);
    q[i] = t;
  }
}

// This thread's share of one plane's gradient: grad = a d + g * (sum of the terms f
// of the bins covering each pixel), a = g * 2 coef_mse.
template <typename T, int NP>
__device__ __forceinline__ void thread_grad(const T* __restrict__ fs, const T* __restrict__ ft, T* __restrict__ grad,
                                            int H, int W, int tx, int ty, int TX, int TY, const acc_t<T>* f,
                                            acc_t<T> g, acc_t<T> a) {
  using A = acc_t<T>;
  using Lay = Layout<NP>;
  constexpr int NR = Lay::rows > 0 ? Lay::rows : 1;
  for (int c = tx; c < W; c += TX) {
    A q[NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) q[i] = A(0);
    if constexpr (Lay::has4) fold_columns<4>(q + Lay::R4, f + Lay::B4, c, W);
    if constexpr (Lay::has2) fold_columns<2>(q + Lay::R2, f + Lay::B2, c, W);
    if constexpr (Lay::has1) q[Lay::R1] = f[Lay::B1];
#pragma unroll 4
    for (int r = ty; r < H; r += TY) {
      const int off = r * W + c;  // inside one plane: < 2^31 (hcl_check_sizes)
      const A d = Scalar<T>::load(fs[off]) - Scalar<T>::load(ft[off]);
      A t = A(0);
      if constexpr (Lay::has4) {
        const unsigned m = bins_covering<4>(r, H);
#pragma unroll
        for (int i = 0; i < 4; ++i) t += ((m >> i) & 1u) ? q[Lay::R4 + i] : A(0);
      }
      if constexpr (Lay::has2) {
        const unsigned m = bins_covering<2>(r, H);
#pragma unroll
        for (int i = 0; i < 2; ++i) t += ((m >> i) & 1u) ? q[Lay::R2 + i] : A(0);
      }
      if constexpr (Lay::has1) t += q[Lay::R1];
      grad[off] = Scalar<T>::store(a * d + g * t);
    }
  }
}

// Thread (group, tx, ty) of the block for shape s.
struct ThreadPos {
  int group, lane, tx, ty, TX, TY, G, groups;
};

__device__ __forceinline__ ThreadPos thread_pos(const Shape& s, int thread) {
  ThreadPos t;
  const int bits = s.tx_bits + s.ty_bits;
  t.G = 1 << bits;
  t.TX = 1 << s.tx_bits;
  t.TY = 1 << s.ty_bits;
  t.groups = kThreads >> bits;
  t.group = thread >> bits;
  t.lane = thread & (t.G - 1);
  t.tx = t.lane & (t.TX - 1);
  t.ty = t.lane >> s.tx_bits;
  return t;
}

template <typename T, int NP>
__global__ void
    hcl_fwd_kernel(const T* __restrict__ fs, const T* __restrict__ ft, acc_t<T>* __restrict__ partial, Shape s,
                   acc_t<T> mse, BinFactors<acc_t<T>> factors) {
  using A = acc_t<T>;
  constexpr int N = 1 + Layout<NP>::bins;  // v[0] = sum d^2, v[1 + b] = bin sums
  __shared__ A smem[kWarps * N];
  const ThreadPos t = thread_pos(s, threadIdx.x);
  const int64_t HW = int64_t(s.H) * s.W;
  // groups is a power of two: a shift, not a 64-bit division (a subroutine call on the
  // GPU whose saved registers ptxas reports as spills)
  const int64_t tiles = (s.planes + t.groups - 1) >> (kThreadBits - s.tx_bits - s.ty_bits);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform over the block
    const int64_t plane = tile * t.groups + t.group;
    A v[N];
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] = A(0);
    if (plane < s.planes)
      thread_sums<T, NP, true>(fs + plane * HW, ft + plane * HW, s.H, s.W, t.tx, t.ty, t.TX, t.TY, v);
    group_allreduce(v, t.G, smem);
    if (plane < s.planes && t.lane == 0) partial[plane] = plane_loss<NP>(v, mse, factors);
  }
}

template <typename T, int NP>
__global__ void
    hcl_bwd_kernel(const T* __restrict__ fs, const T* __restrict__ ft, const acc_t<T>* __restrict__ gout,
                   T* __restrict__ grad, Shape s, acc_t<T> mse2, BinFactors<acc_t<T>> factors) {
  using A = acc_t<T>;
  constexpr int N = Layout<NP>::bins > 0 ? Layout<NP>::bins : 1;
  __shared__ A smem[kWarps * N];
  const ThreadPos t = thread_pos(s, threadIdx.x);
  const int64_t HW = int64_t(s.H) * s.W;
  // groups is a power of two: a shift, not a 64-bit division (a subroutine call on the
  // GPU whose saved registers ptxas reports as spills)
  const int64_t tiles = (s.planes + t.groups - 1) >> (kThreadBits - s.tx_bits - s.ty_bits);
  const A g = *gout;
  const A a = g * mse2;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform over the block
    const int64_t plane = tile * t.groups + t.group;
    A f[N];
#pragma unroll
    for (int n = 0; n < N; ++n) f[n] = A(0);
    if constexpr (Layout<NP>::bins > 0) {
      if (plane < s.planes)
        thread_sums<T, NP, false>(fs + plane * HW, ft + plane * HW, s.H, s.W, t.tx, t.ty, t.TX, t.TY, f);
      group_allreduce(f, t.G, smem);
      grad_terms<NP>(f, factors);
    }
    if (plane < s.planes)
      thread_grad<T, NP>(fs + plane * HW, ft + plane * HW, grad + plane * HW, s.H, s.W, t.tx, t.ty, t.TX, t.TY, f,
                         g, a);
  }
}

int log2_ceil(int64_t x) {
  int b = 0;
  while ((int64_t(1) << b) < x) ++b;
  return b;
}

// One column per thread when W <= 256; about 8 rows per thread; at most 256 threads per plane.
Shape make_shape(int64_t planes, int64_t H, int64_t W) {
  Shape s;
  s.planes = planes;
  s.H = int(H);
  s.W = int(W);
  s.tx_bits = log2_ceil(std::min<int64_t>(W, kThreads));
  s.ty_bits = std::min(log2_ceil((H + 7) / 8), 8 - s.tx_bits);
  return s;
}

// The factors of the bins of a plane of H x W, in double and then rounded to A
// (the C++ CPU kernels' make_plan computes the same numbers).
template <typename A>
BinFactors<A> make_factors(const HclCoefs& coefs, int64_t H, int64_t W) {
  BinFactors<A> f{};
  int b = 0;
  for (int j = 0; j < coefs.npools; ++j) {
    const int64_t l = hcl_pool_size(coefs.npools, j);
    for (int64_t i = 0; i < l; ++i)
      for (int64_t k = 0; k < l; ++k, ++b) {
        const int64_t rows = pool_bin_end<int64_t>(i, H, l) - pool_bin_start<int64_t>(i, H, l);
        const int64_t cols = pool_bin_end<int64_t>(k, W, l) - pool_bin_start<int64_t>(k, W, l);
        const double area = double(rows * cols);
        f.loss[b] = A(coefs.pool[j] / (area * area));
        f.grad[b] = A(2.0 * coefs.pool[j] / (area * area));
      }
  }
  return f;
}

unsigned grid_for(const Shape& s) {
  const int64_t groups = kThreads >> (s.tx_bits + s.ty_bits);
  const int64_t tiles = (s.planes + groups - 1) / groups;
  return unsigned(std::min(tiles, kMaxBlocks));
}

template <typename T, int NP>
void launch_fwd(const Shape& s, const T* fs, const T* ft, acc_t<T>* partial, const HclCoefs& coefs,
                cudaStream_t stream) {
  using A = acc_t<T>;
  hcl_fwd_kernel<T, NP><<<grid_for(s), kThreads, 0, stream>>>(fs, ft, partial, s, A(coefs.mse),
                                                               make_factors<A>(coefs, s.H, s.W));
}

template <typename T, int NP>
void launch_bwd(const Shape& s, const T* fs, const T* ft, const acc_t<T>* gout, T* grad, const HclCoefs& coefs,
                cudaStream_t stream) {
  using A = acc_t<T>;
  hcl_bwd_kernel<T, NP><<<grid_for(s), kThreads, 0, stream>>>(fs, ft, gout, grad, s, A(2.0 * coefs.mse),
                                                               make_factors<A>(coefs, s.H, s.W));
}

}  // namespace

void hcl_fwd_cuda(int dtype, uintptr_t fs_ptr, uintptr_t ft_ptr, uintptr_t partial_ptr, int64_t planes, int64_t H,
                  int64_t W, const HclCoefs& coefs, uintptr_t stream_ptr) {
  const char* where = "hcl_fwd_cuda";
  hcl_check_sizes(where, planes, H, W);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(dtype, where, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (planes == 0) return;
    check_pointers(where, {partial_ptr});
    A* partial = reinterpret_cast<A*>(partial_ptr);
    if (H * W == 0) {
      cudaMemsetAsync(partial, 0, size_t(planes) * sizeof(A), stream);
      check_launch(where);
      return;
    }
    check_pointers(where, {fs_ptr, ft_ptr});
    const T* fs = reinterpret_cast<const T*>(fs_ptr);
    const T* ft = reinterpret_cast<const T*>(ft_ptr);
    const Shape s = make_shape(planes, H, W);
    switch (coefs.npools) {
      case 0: launch_fwd<T, 0>(s, fs, ft, partial, coefs, stream); break;
      case 1: launch_fwd<T, 1>(s, fs, ft, partial, coefs, stream); break;
      case 2: launch_fwd<T, 2>(s, fs, ft, partial, coefs, stream); break;
      default: launch_fwd<T, 3>(s, fs, ft, partial, coefs, stream); break;
    }
    check_launch(where);
  });
}

void hcl_bwd_cuda(int dtype, uintptr_t fs_ptr, uintptr_t ft_ptr, uintptr_t gout_ptr, uintptr_t grad_ptr,
                  int64_t planes, int64_t H, int64_t W, const HclCoefs& coefs, uintptr_t stream_ptr) {
  const char* where = "hcl_bwd_cuda";
  hcl_check_sizes(where, planes, H, W);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(dtype, where, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (planes == 0 || H * W == 0) return;
    check_pointers(where, {fs_ptr, ft_ptr, gout_ptr, grad_ptr});
    const T* fs = reinterpret_cast<const T*>(fs_ptr);
    const T* ft = reinterpret_cast<const T*>(ft_ptr);
    const A* gout = reinterpret_cast<const A*>(gout_ptr);
    T* grad = reinterpret_cast<T*>(grad_ptr);
    const Shape s = make_shape(planes, H, W);
    switch (coefs.npools) {
      case 0: launch_bwd<T, 0>(s, fs, ft, gout, grad, coefs, stream); break;
      case 1: launch_bwd<T, 1>(s, fs, ft, gout, grad, coefs, stream); break;
      case 2: launch_bwd<T, 2>(s, fs, ft, gout, grad, coefs, stream); break;
      default: launch_bwd<T, 3>(s, fs, ft, gout, grad, coefs, stream); break;
    }
    check_launch(where);
  });
}

}  // namespace kdk
