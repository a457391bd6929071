// Hinton KD on CUDA (docs/spec.md §4; the streaming state and formulas are in common/kd.h).
//
// Forward: grid (row blocks, segments). Each row's classes are cut into nseg
// segments of seg_len classes (nseg > 1 only when there are too few rows to
// fill the GPU; the caller chooses, kdkernels/ops/kd.py); block (x, y) streams
// segment y of the rows x, x + gridDim.x, ... Thread k of the block reads the
// segment's classes k, k + B, k + 2B, ... (B = blockDim.x, coalesced across the
// block) kUnroll at a time: KdState::add_group (common/kd.h) updates its running
// maxima (rescaling its sums when they grow) and adds the group's terms. The
// block then merges the threads' states: an xor-butterfly of shuffles inside
// each warp, the warp results through shared memory, and warp 0 merges those in
// warp order. With one segment, thread 0 writes the row's stats and KL; with
// more, it writes the segment's state (m_s, m_t, S_s, S_t, W) to a scratch
// buffer, and kd_combine_kernel (one thread per row) merges a row's states in
// segment order and writes the row's stats and KL. Every merge is a fixed tree
// or a fixed order, with no atomics: deterministic. One pass over the inputs.
//
// Backward: elementwise, grid (tiles of kThreads * kUnroll classes, rows),
// both striding when the grid is full, from the forward's per-row stats.
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
// Threads per block of the forward (at most) and the backward; long rows get
// more blocks by segments instead of bigger blocks. The kernels carry no
// __launch_bounds__: with one (1024 before, and 256 too), ptxas aims at 64
// registers for occupancy and the double forward, whose exp and merges keep many
// 64-bit values live, spilled 112-148 B. Without one it takes what it needs, far
// under the 255 per thread that a 256-thread block allows, so every launch fits.
constexpr int kThreads = 256;
constexpr int kClassesPerThread = 8;  // forward blocks are sized for about this many classes per thread
constexpr int kCombineThreads = 128;
constexpr int64_t kMaxBlocks = int64_t(65535) * 16;  // grid x beyond this: the blocks stride
constexpr int64_t kMaxGridY = 65535;                  // grid y beyond this: the blocks stride

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
__global__ void
    kd_fwd_kernel(const T* __restrict__ s, const T* __restrict__ t, acc_t<T>* __restrict__ part,
                  acc_t<T>* __restrict__ stats, acc_t<T>* __restrict__ kl, int64_t rows, int64_t cols,
                  int64_t seg_len, acc_t<T> inv_t) {
  using A = acc_t<T>;
  __shared__ KdState<A> warp_states[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t B = blockDim.x;
  const int64_t seg = blockIdx.y, nseg = gridDim.y;
  const int64_t start = seg * seg_len;
  const int64_t end = cols - start < seg_len ? cols : start + seg_len;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // uniform over the block
    const T* __restrict__ sr = s + row * cols;
    const T* __restrict__ tr = t + row * cols;
    KdState<A> state = KdState<A>::empty();
    for (int64_t c0 = start + threadIdx.x; c0 < end; c0 += B * kUnroll) {
      A zs[kUnroll], zt[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + u * B;
        const bool in = c < end;
        zs[u] = in ? Scalar<T>::load(sr[c]) * inv_t : kd_neg_inf<A>();
        zt[u] = in ? Scalar<T>::load(tr[c]) * inv_t : kd_neg_inf<A>();
      }
      state.add_group(zs, zt, KdExp{});
    }
    warp_merge(state);
    if (lane == 0) warp_states[warp] = state;
    __syncthreads();
    if (warp == 0) {
      state = lane < warps ? warp_states[lane] : KdState<A>::empty();
      warp_merge(state);
      if (lane == 0) {
        if (nseg == 1)
          kl[row] = state.finish(stats + row * kKdStats, KdLog{});
        else
          state.store(part + (row * nseg + seg) * kKdCudaPart);
      }
    }
    __syncthreads();  // warp_states is reused by the next row
  }
}

// A row's nseg segment states, merged in segment order: one thread per row.
template <typename A>
__global__ void
    kd_combine_kernel(const A* __restrict__ part, A* __restrict__ stats, A* __restrict__ kl, int64_t rows,
                      int64_t nseg) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < rows; row += stride) {
    const A* p = part + row * nseg * kKdCudaPart;
    KdState<A> state = KdState<A>::load(p);
    for (int64_t k = 1; k < nseg; ++k) state.merge(KdState<A>::load(p + k * kKdCudaPart), KdExp{});
    kl[row] = state.finish(stats + row * kKdStats, KdLog{});
  }
}

template <typename T, bool GT>
__global__ void
    kd_bwd_kernel(const T* __restrict__ s, const T* __restrict__ t, const acc_t<T>* __restrict__ stats,
                  const acc_t<T>* __restrict__ gscale, T* __restrict__ grad_s, T* __restrict__ grad_t, int64_t rows,
                  int64_t cols, acc_t<T> inv_t) {
  using A = acc_t<T>;
  constexpr int64_t kTile = int64_t(kThreads) * kUnroll;
  // rows on y and tiles on x: no 64-bit division (a subroutine call on the GPU)
  const int64_t tile_stride = int64_t(gridDim.x) * kTile;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const A* st = stats + row * kKdStats;
    const A ms = st[0], ls = st[1], mt = st[2], lt = st[3], ec = st[4];
    const A g = gscale[row];
    const int64_t base = row * cols;
    for (int64_t c_base = int64_t(blockIdx.x) * kTile + threadIdx.x; c_base < cols; c_base += tile_stride) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c_base + int64_t(u) * kThreads;
        if (c < cols) {
          const int64_t off = base + c;
          const A a_s = Scalar<T>::load(s[off]) * inv_t - ms;
          const A a_t = Scalar<T>::load(t[off]) * inv_t - mt;
          const A p_s = KdExp{}(a_s - ls), p_t = KdExp{}(a_t - lt);
          grad_s[off] = Scalar<T>::store(g * (p_s - p_t));
          if (GT) grad_t[off] = Scalar<T>::store(g * p_t * (kd_gap(p_t, a_t, a_s) - ec));
        }
      }
    }
  }
}

// Threads per forward block for segments of seg_len classes: about
// kClassesPerThread classes each, 32 to kThreads.
int fwd_threads(int64_t seg_len) {
  int threads = 32;
  while (threads < kThreads && int64_t(threads) * kClassesPerThread < seg_len) threads <<= 1;
  return threads;
}

}  // namespace

void kd_fwd_cuda(int dtype, uintptr_t s_ptr, uintptr_t t_ptr, uintptr_t stats_ptr, uintptr_t kl_ptr,
                 uintptr_t part_ptr, int64_t rows, int64_t cols, int64_t split, double inv_t, uintptr_t stream_ptr) {
  const char* where = "kd_fwd_cuda";
  if (!kd_begin(where, true, rows, cols, {s_ptr, t_ptr, stats_ptr, kl_ptr})) return;
  if (split < 1 || split > kMaxGridY)
    throw std::invalid_argument(std::string(where) + ": split must be in [1, 65535], got " + std::to_string(split));
  // Segments of seg_len classes, a multiple of 32 (each starts 128-byte aligned
  // when the rows do); nseg <= split, so the scratch of rows * split states holds them.
  int64_t seg_len = cols / split + (cols % split != 0);
  seg_len = (seg_len + 31) / 32 * 32;
  const int64_t nseg = cols / seg_len + (cols % seg_len != 0);
  if (nseg > 1) check_pointers(where, {part_ptr});
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(dtype, where, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A* part = reinterpret_cast<A*>(part_ptr);
    A* stats = reinterpret_cast<A*>(stats_ptr);
    A* kl = reinterpret_cast<A*>(kl_ptr);
    const dim3 grid(unsigned(std::min(rows, kMaxBlocks)), unsigned(nseg));
    kd_fwd_kernel<T><<<grid, fwd_threads(seg_len), 0, stream>>>(reinterpret_cast<const T*>(s_ptr),
                                                                 reinterpret_cast<const T*>(t_ptr), part, stats, kl,
                                                                 rows, cols, seg_len, A(inv_t));
    check_launch(where);
    if (nseg > 1) {
      const unsigned cgrid = unsigned(std::min((rows + kCombineThreads - 1) / kCombineThreads, kMaxBlocks));
      kd_combine_kernel<A><<<cgrid, kCombineThreads, 0, stream>>>(part, stats, kl, rows, nseg);
      check_launch(where);
    }
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
    constexpr int64_t tile = int64_t(kThreads) * kUnroll;
    const int64_t tiles_per_row = cols / tile + (cols % tile != 0);
    const dim3 grid(unsigned(std::min(tiles_per_row, kMaxBlocks)), unsigned(std::min(rows, kMaxGridY)));
    const T* s = reinterpret_cast<const T*>(s_ptr);
    const T* t = reinterpret_cast<const T*>(t_ptr);
    const A* stats = reinterpret_cast<const A*>(stats_ptr);
    const A* gscale = reinterpret_cast<const A*>(gscale_ptr);
    T* grad_s = reinterpret_cast<T*>(grad_s_ptr);
    T* grad_t = reinterpret_cast<T*>(grad_t_ptr);
    if (grad_t != nullptr)
      kd_bwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(s, t, stats, gscale, grad_s, grad_t, rows, cols, A(inv_t));
    else
      kd_bwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(s, t, stats, gscale, grad_s, nullptr, rows, cols,
                                                             A(inv_t));
    check_launch(where);
  });
}

}  // namespace kdk
