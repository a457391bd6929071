// Hinton KD on CUDA (docs/spec.md §4; the streaming state and formulas are in common/kd.h).
//
// Forward: one block per row (blocks stride over the rows when there are more
// than the grid holds). Thread k of the block reads the classes
// k, k + B, k + 2B, ... (B = blockDim.x, coalesced across the block) kUnroll at
// a time: the group's maxima update the thread's running maxima (rescaling its
// sums when they grow), then the group's terms are added. The block then merges
// the threads' states: an xor-butterfly of shuffles inside each warp, the warp
// results through shared memory, and warp 0 merges those in warp order. The
// merge is a fixed tree, with no atomics: deterministic. Thread 0 writes the
// row's stats and KL. One pass over the inputs.
//
// Backward: elementwise, a block per tile of kBwdThreads * kUnroll classes of
// one row (tiles stride over the grid), from the forward's per-row stats.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../common/checks.h"
#include "check_launch.h"
#include "../common/dtype.h"
#include "../common/kd.h"

namespace kdk {
namespace {

constexpr int kUnroll = 4;
constexpr int kMaxThreads = 1024;
constexpr int kBwdThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(65535) * 16;  // beyond this the blocks stride

// exp / log in the accumulation type: the fast hardware exp for float (the
// arguments are <= 0, where its relative error stays ~1e-6 or below).
struct KdExp {
  KDK_HD float operator()(float x) const {
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    return std::exp(x);
#endif
  }
  KDK_HD double operator()(double x) const { return exp(x); }
};

struct KdLog {
  KDK_HD float operator()(float x) const { return logf(x); }
  KDK_HD double operator()(double x) const { return log(x); }
};

template <typename A>
__device__ __forceinline__ KdState<A> shfl_xor_state(const KdState<A>& s, int offset) {
  KdState<A> o;
  o.ms = __shfl_xor_sync(0xffffffffu, s.ms, offset);
  o.mt = __shfl_xor_sync(0xffffffffu, s.mt, offset);
  o.ss = __shfl_xor_sync(0xffffffffu, s.ss, offset);
  o.st = __shfl_xor_sync(0xffffffffu, s.st, offset);
  o.w = __shfl_xor_sync(0xffffffffu, s.w, offset);
  return o;
}

// Every lane of the warp ends with the merge of the 32 lanes' states.
template <typename A>
__device__ __forceinline__ void warp_merge(KdState<A>& s) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) s.merge(shfl_xor_state(s, offset), KdExp{});
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    kd_fwd_kernel(const T* __restrict__ s, const T* __restrict__ t, acc_t<T>* __restrict__ stats,
                  acc_t<T>* __restrict__ kl, int64_t rows, int64_t cols, acc_t<T> inv_t) {
  using A = acc_t<T>;
  __shared__ KdState<A> warp_states[kMaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t B = blockDim.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // uniform over the block
    const T* __restrict__ sr = s + row * cols;
    const T* __restrict__ tr = t + row * cols;
    KdState<A> state = KdState<A>::empty();
    for (int64_t c0 = threadIdx.x; c0 < cols; c0 += B * kUnroll) {
      A zs[kUnroll], zt[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + u * B;
        const bool in = c < cols;
        zs[u] = in ? Scalar<T>::load(sr[c]) * inv_t : kd_neg_inf<A>();
        zt[u] = in ? Scalar<T>::load(tr[c]) * inv_t : kd_neg_inf<A>();
      }
      A bs = zs[0], bt = zt[0];
#pragma unroll
      for (int u = 1; u < kUnroll; ++u) bs = kd_max(bs, zs[u]), bt = kd_max(bt, zt[u]);
      const A ms_new = kd_max(state.ms, bs), mt_new = kd_max(state.mt, bt);
      if (ms_new != state.ms || mt_new != state.mt) state.rescale(ms_new, mt_new, KdExp{});
      const A es = kd_eff(state.ms), et = kd_eff(state.mt);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const A a_s = zs[u] - es, a_t = zt[u] - et;
        const A e_s = KdExp{}(a_s), e_t = KdExp{}(a_t);
        state.ss += e_s;
        state.st += e_t;
        state.w += e_t * kd_gap(e_t, a_t, a_s);
      }
    }
    warp_merge(state);
    if (lane == 0) warp_states[warp] = state;
    __syncthreads();
    if (warp == 0) {
      state = lane < warps ? warp_states[lane] : KdState<A>::empty();
      warp_merge(state);
      if (lane == 0) kl[row] = state.finish(stats + row * kKdStats, KdLog{});
    }
    __syncthreads();  // warp_states is reused by the next row
  }
}

template <typename T, bool GT>
__global__ void __launch_bounds__(kBwdThreads)
    kd_bwd_kernel(const T* __restrict__ s, const T* __restrict__ t, const acc_t<T>* __restrict__ stats,
                  const acc_t<T>* __restrict__ gscale, T* __restrict__ grad_s, T* __restrict__ grad_t, int64_t rows,
                  int64_t cols, int64_t tiles_per_row, acc_t<T> inv_t) {
  using A = acc_t<T>;
  constexpr int64_t kTile = int64_t(kBwdThreads) * kUnroll;
  const int64_t tiles = rows * tiles_per_row;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = tile / tiles_per_row;
    const int64_t c_base = (tile % tiles_per_row) * kTile + threadIdx.x;
    const A* st = stats + row * kKdStats;
    const A ms = st[0], ls = st[1], mt = st[2], lt = st[3], ec = st[4];
    const A g = gscale[row];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c_base + int64_t(u) * kBwdThreads;
      if (c < cols) {
        const int64_t off = row * cols + c;
        const A a_s = Scalar<T>::load(s[off]) * inv_t - ms;
        const A a_t = Scalar<T>::load(t[off]) * inv_t - mt;
        const A p_s = KdExp{}(a_s - ls), p_t = KdExp{}(a_t - lt);
        grad_s[off] = Scalar<T>::store(g * (p_s - p_t));
        if (GT) grad_t[off] = Scalar<T>::store(g * p_t * (kd_gap(p_t, a_t, a_s) - ec));
      }
    }
  }
}

// Threads per row in the forward: about 16 classes each, 32 to 1024.
int fwd_threads(int64_t cols) {
  int threads = 32;
  while (threads < kMaxThreads && int64_t(threads) * 16 < cols) threads <<= 1;
  return threads;
}

}  // namespace

void kd_fwd_cuda(int dtype, uintptr_t s_ptr, uintptr_t t_ptr, uintptr_t stats_ptr, uintptr_t kl_ptr, int64_t rows,
                 int64_t cols, double inv_t, uintptr_t stream_ptr) {
  const char* where = "kd_fwd_cuda";
  if (!kd_begin(where, true, rows, cols, {s_ptr, t_ptr, stats_ptr, kl_ptr})) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(dtype, where, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const unsigned grid = unsigned(std::min(rows, kMaxBlocks));
    kd_fwd_kernel<T><<<grid, fwd_threads(cols), 0, stream>>>(
        reinterpret_cast<const T*>(s_ptr), reinterpret_cast<const T*>(t_ptr), reinterpret_cast<A*>(stats_ptr),
        reinterpret_cast<A*>(kl_ptr), rows, cols, A(inv_t));
    check_launch(where);
  });
}

void kd_bwd_cuda(int dtype, uintptr_t s_ptr, uintptr_t t_ptr, uintptr_t stats_ptr, uintptr_t gscale_ptr,
                 uintptr_t grad_s_ptr, uintptr_t grad_t_ptr, int64_t rows, int64_t cols, double inv_t,
                 uintptr_t stream_ptr) {
  const char* where = "kd_bwd_cuda";
  if (!kd_begin(where, false, rows, cols, {s_ptr, t_ptr, stats_ptr, gscale_ptr, grad_s_ptr})) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(dtype, where, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    constexpr int64_t tile = int64_t(kBwdThreads) * kUnroll;
    const int64_t tiles_per_row = (cols + tile - 1) / tile;
    const unsigned grid = unsigned(std::min(rows * tiles_per_row, kMaxBlocks));
    const T* s = reinterpret_cast<const T*>(s_ptr);
    const T* t = reinterpret_cast<const T*>(t_ptr);
    const A* stats = reinterpret_cast<const A*>(stats_ptr);
    const A* gscale = reinterpret_cast<const A*>(gscale_ptr);
    T* grad_s = reinterpret_cast<T*>(grad_s_ptr);
    T* grad_t = reinterpret_cast<T*>(grad_t_ptr);
    if (grad_t != nullptr)
      kd_bwd_kernel<T, true><<<grid, kBwdThreads, 0, stream>>>(s, t, stats, gscale, grad_s, grad_t, rows, cols,
                                                                tiles_per_row, A(inv_t));
    else
      kd_bwd_kernel<T, false><<<grid, kBwdThreads, 0, stream>>>(s, t, stats, gscale, grad_s, nullptr, rows, cols,
                                                                 tiles_per_row, A(inv_t));
    check_launch(where);
  });
}

}  // namespace kdk
