// FitNets hint loss through a 1x1 regressor on CPU (docs/spec.md §3), loss and
// gradients in one pass over the pixels.
//
// Pixels are samples: pixel q in [0, N*P) is (n, p) = (q / P, q % P), P = H*W,
// and fs[n, c, p] sits at n*Cs*P + c*P + p. The pixels are cut into blocks of
// kBlock; each block is packed (converted to the accumulation type A, padded
// with zeros) into X (Cs x kBlock) and then, with three small GEMMs that stay in
// the thread's L2 cache,
//
//   R   = W X + b - FT                (Ct x kBlock: the residual of the block)
//   loss_part += sum R^2,  gb_part += sum_q R          (per group)
//   GFS = W^T R                        (Cs x kBlock -> grad_fs, unscaled)
//   GW_part += R X^T                   (Ct x Cs, per group)
//   grad_ft = R                        (only when asked)
//
// The regressed map never exists outside one block; fs and ft are read once.
// Gradients are unscaled (no 2/numel, no grad_output): the caller scales them.
//
// Determinism: the blocks are split into a fixed number of groups that depends
// on the shape only; a group's partials are accumulated block by block in
// order, threads take whole groups (the next free one), and the groups are
// summed in order at the end. The result does not depend on the thread count
// or on which thread ran which group.
//
// The per-group work (packing, the three GEMMs with a register-blocked
// micro-kernel written with GCC / Clang vector extensions, sums, transposes, scatters)
// is compiled three times (AVX-512, AVX2+FMA, and the portable baseline); the
// widest the CPU supports is picked at run time ($KDKERNELS_CPU_ISA can narrow
// it). While a block's GEMMs run, the next block's input lines are prefetched.
// Threads: parallel_for_each (common/parallel.h: torch's OpenMP team, else a
// persistent pool) hands out groups one at a time; block buffers and partials
// are kept per thread from call to call (no fresh memory to page-fault in).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "../common/dtype.h"
#include "../common/macros.h"    // KDK_ALWAYS_INLINE
#include "../common/parallel.h"  // choose_threads, parallel_for_each
#include "isa.h"

namespace kdk {
namespace {

// Pixels per block: a multiple of every micro-kernel's strip width (NV * VL).
constexpr int64_t kBlock = 128;
// Row stride of the block buffers: not a power of two, so that walking down a
// column (the GEMMs' B operand) does not keep hitting the same L1 sets.
constexpr int64_t kLd = kBlock + 16;
// GEMM depth per pass over a strip of B (kKc x 64 floats = 32 KiB: fits L1).
constexpr int64_t kKc = 128;
// Groups of blocks, each with its own partial sums: at most kMaxGroups, at most
// kMaxPartial weight-gradient partial elements in all, kMinBlocksPerGroup blocks each.
constexpr int64_t kMaxGroups = 32;
constexpr int64_t kMaxPartial = int64_t(1) << 21;
constexpr int64_t kMinBlocksPerGroup = 4;
// Below this many multiply-adds per thread, another thread costs more than it saves.
constexpr int64_t kMinMacsPerThread = int64_t(1) << 20;

template <typename A, int VL>
struct Vec {
  typedef A type __attribute__((vector_size(VL * sizeof(A))));
};

// C[MR x NV*VL] (= or +=) A[MR x K] B[K x NV*VL], all row-major with leading
// dimensions. The MR*NV accumulators stay in registers; A is broadcast one
// element at a time, B is read NV vectors per k.
template <typename A, int VL, int MR, int NV>
KDK_ALWAYS_INLINE void micro_kernel(int64_t K, const A* __restrict a, int64_t lda, const A* __restrict b,
                                    int64_t ldb, A* __restrict c, int64_t ldc, bool accumulate) {
  using V = typename Vec<A, VL>::type;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      if (accumulate)
        std::memcpy(&acc[i][v], c + i * ldc + v * VL, sizeof(V));
      else
        acc[i][v] = V{};
    }
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + k * ldb + v * VL, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const A ai = a[i * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += bv[v] * ai;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) std::memcpy(c + i * ldc + v * VL, &acc[i][v], sizeof(V));
}

// The last M % MR rows, with a micro-kernel of exactly that many rows.
template <typename A, int VL, int MR, int NV>
KDK_ALWAYS_INLINE void micro_tail(int rows, int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, A* c,
                                  int64_t ldc, bool accumulate) {
  if constexpr (MR > 1) {
    if (rows == MR - 1) return micro_kernel<A, VL, MR - 1, NV>(K, a, lda, b, ldb, c, ldc, accumulate);
    micro_tail<A, VL, MR - 1, NV>(rows, K, a, lda, b, ldb, c, ldc, accumulate);
  }
}

// Software prefetch of the next block's input lines, a few per micro-kernel
// call, so that reading fs and ft from memory overlaps with the GEMMs instead
// of stalling the packing of every block.
struct Prefetch {
  std::vector<const char*> lines;
  size_t next = 0, per_call = 0;
  KDK_ALWAYS_INLINE void step() {
    for (const size_t end = std::min(lines.size(), next + per_call); next < end; ++next)
      __builtin_prefetch(lines[next], 0, 2);
  }
  KDK_ALWAYS_INLINE void reset() {
    lines.clear();
    next = 0;
  }
};

// One strip of NV*VL columns: all row panels.
template <typename A, int VL, int MR, int NV>
KDK_ALWAYS_INLINE void gemm_strip(int64_t M, int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, A* c,
                                  int64_t ldc, bool accumulate, Prefetch& pf) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    pf.step();
    micro_kernel<A, VL, MR, NV>(K, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
  }
  if (i < M) micro_tail<A, VL, MR, NV>(int(M - i), K, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
}

// C[M x N] (= or +=) A[M x K] B[K x N]; N must be a multiple of 2*VL. Strips of
// NV*VL columns, then one of 2*VL columns if N leaves one.
template <typename A, int VL, int MR, int NV>
KDK_ALWAYS_INLINE void gemm_impl(int64_t M, int64_t N, int64_t K, const A* a, int64_t lda, const A* b,
                                 int64_t ldb, A* c, int64_t ldc, bool accumulate, Prefetch& pf) {
  // K in chunks of kKc, so that a strip of B (kKc x NV*VL) stays in L1
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    const bool acc = accumulate || k0 > 0;
    const A* ak = a + k0;
    const A* bk = b + k0 * ldb;
    int64_t j = 0;
    for (; j + NV * VL <= N; j += NV * VL)
      gemm_strip<A, VL, MR, NV>(M, kc, ak, lda, bk + j, ldb, c + j, ldc, acc, pf);
    if constexpr (NV > 2)
      for (; j < N; j += 2 * VL) gemm_strip<A, VL, MR, 2>(M, kc, ak, lda, bk + j, ldb, c + j, ldc, acc, pf);
  }
}

// A run of pixels of one block that lie in one sample: block columns
// [col, col + len) are pixels p .. p + len - 1 of sample n.
struct Run {
  int64_t col, n, p, len;
};

// Everything the threads share. Each group g owns loss_part[g], gw_part[g] (Ct x cs_pad)
// and gb_part[g] (Ct); nothing else is written but the disjoint pixels of gfs and gft.
template <typename T>
struct Job {
  using A = acc_t<T>;
  int64_t N, Cs, Ct, P, cs_pad, blocks, groups;
  int64_t cs_rows;  // Cs rounded up to 16: rows of X (the extra ones stay 0), for whole transpose tiles
  const T* fs;
  const T* ft;
  const A* w;     // (Ct, Cs)
  const A* wt;    // (Cs, Ct) = W^T, when gfs
  const A* bias;  // (Ct) or null
  T* gfs;         // (N, Cs, P) or null
  T* gft;         // (N, Ct, P) or null
  A* loss_part;   // (groups)
  A* gw_part;     // (groups, Ct, cs_pad) or null
  A* gb_part;     // (groups, Ct) or null
};

// Per-thread block buffers; rows of kLd elements, columns past the block's
// pixels are 0. Kept by each thread from call to call (they only grow), so that
// a call does not page-fault fresh memory in.
template <typename T>
struct Scratch {
  using A = acc_t<T>;
  int64_t xt_ld = 0;
  std::vector<A> x, r, g, xt;  // X (cs_rows x kLd), R (Ct x kLd), GFS (Cs x kLd), X^T (kBlock x xt_ld)
  std::vector<Run> runs, next_runs;
  Prefetch pf;

  static Scratch& for_this_thread(const Job<T>& job) {
    thread_local Scratch scratch;
    scratch.prepare(job);
    return scratch;
  }

  void prepare(const Job<T>& job) {
    xt_ld = job.cs_pad + 16;
    grow(x, job.cs_rows * kLd);
    grow(r, job.Ct * kLd);
    if (job.gfs) grow(g, job.Cs * kLd);
    // rows Cs .. cs_rows of X and columns cs_rows .. cs_pad of X^T are read but never written: zero them
    std::fill(x.begin() + job.Cs * kLd, x.begin() + job.cs_rows * kLd, A(0));
    if (job.gw_part) {
      grow(xt, kBlock * xt_ld);
      for (int64_t j = 0; j < kBlock; ++j)
        std::fill(xt.begin() + j * xt_ld + job.cs_rows, xt.begin() + j * xt_ld + job.cs_pad, A(0));
    }
  }

 private:
  static void grow(std::vector<A>& v, int64_t n) {
    if (int64_t(v.size()) < n) v.resize(n);
  }
};

// The calling thread's partial sums and converted weights (slots 0-5), kept
// from call to call like Scratch.
template <typename A>
A* partials(int slot, int64_t n) {
  thread_local std::vector<A> buffers[6];
  std::vector<A>& b = buffers[slot];
  if (int64_t(b.size()) < n) b.resize(n);
  return b.data();
}

template <typename T>
KDK_ALWAYS_INLINE void make_runs(const Job<T>& job, int64_t q0, int64_t len, std::vector<Run>& runs) {
  runs.clear();
  for (int64_t col = 0; col < len;) {
    const int64_t q = q0 + col;
    const int64_t n = q / job.P, p = q - n * job.P;
    const int64_t l = std::min(len - col, job.P - p);
    runs.push_back({col, n, p, l});
    col += l;
  }
}

// The cache lines of fs and ft that the block [q0, q0 + len) will read.
template <typename T>
KDK_ALWAYS_INLINE void plan_prefetch(const Job<T>& job, int64_t q0, int64_t len, std::vector<Run>& runs,
                                     Prefetch& pf) {
  pf.reset();
  make_runs(job, q0, len, runs);
  const int64_t P = job.P;
  for (int side = 0; side < 2; ++side) {
    const T* base = side == 0 ? job.fs : job.ft;
    const int64_t C = side == 0 ? job.Cs : job.Ct;
    for (int64_t c = 0; c < C; ++c)
      for (const Run& run : runs) {
        const uintptr_t begin = reinterpret_cast<uintptr_t>(base + (run.n * C + c) * P + run.p);
        const uintptr_t end = begin + uintptr_t(run.len) * sizeof(T);
        for (uintptr_t line = begin & ~uintptr_t(63); line < end; line += 64)
          pf.lines.push_back(reinterpret_cast<const char*>(line));
      }
  }
}

// X[c][j] = fs at column j and R[c][j] = b[c] - ft at column j (both 0 past len).
template <typename T>
KDK_ALWAYS_INLINE void pack(const Job<T>& job, Scratch<T>& s, int64_t len) {
  using A = acc_t<T>;
  const int64_t Cs = job.Cs, Ct = job.Ct, P = job.P;
  for (int64_t c = 0; c < Cs; ++c) {
    A* __restrict x = &s.x[c * kLd];
    for (const Run& run : s.runs) {
      const T* __restrict src = job.fs + (run.n * Cs + c) * P + run.p;
      A* __restrict dst = x + run.col;
      for (int64_t j = 0; j < run.len; ++j) dst[j] = Scalar<T>::load(src[j]);
    }
    for (int64_t j = len; j < kBlock; ++j) x[j] = A(0);
  }
  for (int64_t c = 0; c < Ct; ++c) {
    A* __restrict r = &s.r[c * kLd];
    const A b = job.bias ? job.bias[c] : A(0);
    for (const Run& run : s.runs) {
      const T* __restrict src = job.ft + (run.n * Ct + c) * P + run.p;
      A* __restrict dst = r + run.col;
      for (int64_t j = 0; j < run.len; ++j) dst[j] = b - Scalar<T>::load(src[j]);
    }
    for (int64_t j = len; j < kBlock; ++j) r[j] = A(0);
  }
}

// out[n, c, p] = buf[c][column of (n, p)] for the block's pixels, c < C.
template <typename T>
KDK_ALWAYS_INLINE void scatter(const Job<T>& job, const std::vector<Run>& runs, const acc_t<T>* buf, int64_t C,
                               T* out) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t<T>* __restrict src = buf + c * kLd;
    for (const Run& run : runs) {
      T* __restrict dst = out + (run.n * C + c) * job.P + run.p;
      const acc_t<T>* __restrict from = src + run.col;
      for (int64_t j = 0; j < run.len; ++j) dst[j] = Scalar<T>::store(from[j]);
    }
  }
}

// sum of x[0..kBlock) and of x^2, in kLanes interleaved lanes (a fixed order that vectorises).
template <typename A>
KDK_ALWAYS_INLINE void sum_and_squares(const A* __restrict x, A& sum, A& sq) {
  constexpr int kLanes = 16;
  A s[kLanes] = {}, q[kLanes] = {};
  for (int64_t i = 0; i < kBlock; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      s[k] += x[i + k];
      q[k] += x[i + k] * x[i + k];
    }
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int k = 0; k < w; ++k) {
      s[k] += s[k + w];
      q[k] += q[k + w];
    }
  sum = s[0];
  sq = q[0];
}

// Swap the off-diagonal b x b blocks of every 2b x 2b block of the VL x VL tile
// t (rows i and i + b, for each i with bit b clear): row i keeps its left part
// and takes row i+b's left part; row i+b takes row i's right part and keeps its
// right part. Then the same at b / 2, down to 1: log2(VL) rounds transpose t.
// Two-source shuffles with compile-time lane indices: __builtin_shufflevector
// (Clang, GCC >= 12), or GCC's __builtin_shuffle with constant masks.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define KDK_SHUFFLEVECTOR 1
#endif
#endif
#if !defined(KDK_SHUFFLEVECTOR) && defined(__GNUC__) && !defined(__clang__)
#define KDK_GCC_SHUFFLE 1
#endif

template <int VL, int B, typename V, std::size_t... J>
KDK_ALWAYS_INLINE void swap_blocks(V& top, V& bottom, std::index_sequence<J...>) {
  const V a = top, c = bottom;
#if defined(KDK_SHUFFLEVECTOR)
  top = __builtin_shufflevector(a, c, ((J & B) ? VL + J - B : J)...);
  bottom = __builtin_shufflevector(a, c, ((J & B) ? VL + J : J + B)...);
#else
  using I = decltype(a < c);  // the vector of lane indices (signed integers of the lanes' width)
  top = __builtin_shuffle(a, c, I{((J & B) ? VL + J - B : J)...});
  bottom = __builtin_shuffle(a, c, I{((J & B) ? VL + J : J + B)...});
#endif
}

template <int VL, int B, std::size_t I, typename V>
KDK_ALWAYS_INLINE void swap_rows(V* t) {
  if constexpr (!(I & B)) swap_blocks<VL, B>(t[I], t[I + B], std::make_index_sequence<VL>{});
}

template <int VL, int B, typename V, std::size_t... I>
KDK_ALWAYS_INLINE void transpose_round(V* t, std::index_sequence<I...>) {
  (swap_rows<VL, B, I>(t), ...);
}

template <int VL, int B, typename V>
KDK_ALWAYS_INLINE void transpose_rounds(V* t) {
  transpose_round<VL, B>(t, std::make_index_sequence<VL>{});
  if constexpr (B > 1) transpose_rounds<VL, B / 2>(t);
}

// XT[j][c] = X[c][j] for the rows c < rows (a multiple of VL; X has that many
// rows, the ones past Cs being 0), one VL x VL tile at a time: VL vector loads,
// the log2(VL) rounds of swap_blocks, VL vector stores.
template <typename A, int VL>
KDK_ALWAYS_INLINE void transpose(const A* __restrict x, int64_t rows, A* __restrict xt, int64_t xt_ld) {
#if defined(KDK_SHUFFLEVECTOR) || defined(KDK_GCC_SHUFFLE)
  using V = typename Vec<A, VL>::type;
  for (int64_t c0 = 0; c0 < rows; c0 += VL)
    for (int64_t j0 = 0; j0 < kBlock; j0 += VL) {
      V t[VL];
      for (int i = 0; i < VL; ++i) std::memcpy(&t[i], x + (c0 + i) * kLd + j0, sizeof(V));
      transpose_rounds<VL, VL / 2>(t);
      for (int i = 0; i < VL; ++i) std::memcpy(xt + (j0 + i) * xt_ld + c0, &t[i], sizeof(V));
    }
#else
  for (int64_t c = 0; c < rows; ++c)
    for (int64_t j = 0; j < kBlock; ++j) xt[j * xt_ld + c] = x[c * kLd + j];
#endif
}

// All blocks of group g, in order, into the group's partials. The first block
// writes the weight-gradient partial; the next ones add to it.
template <typename T, int VL, int MR, int NV>
KDK_ALWAYS_INLINE void run_group(const Job<T>& job, Scratch<T>& s, int64_t g) {
  using A = acc_t<T>;
  const int64_t Cs = job.Cs, Ct = job.Ct, pixels = job.N * job.P;
  const int64_t b0 = job.blocks * g / job.groups, b1 = job.blocks * (g + 1) / job.groups;
  A loss = A(0);
  // micro-kernel calls (full row panels) per block, to spread the prefetches over
  const int64_t strips = kBlock / (NV * VL), w_strips = std::max<int64_t>(1, job.cs_pad / (NV * VL));
  const size_t calls = size_t(std::max<int64_t>(
      1, Ct / MR * strips + (job.gfs ? Cs / MR * strips : 0) + (job.gw_part ? Ct / MR * w_strips : 0)));
  A* gw = job.gw_part ? job.gw_part + g * Ct * job.cs_pad : nullptr;
  A* gb = job.gb_part ? job.gb_part + g * Ct : nullptr;
  if (gb)
    for (int64_t c = 0; c < Ct; ++c) gb[c] = A(0);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t q0 = blk * kBlock, len = std::min(kBlock, pixels - q0);
    make_runs(job, q0, len, s.runs);
    pack(job, s, len);
    if (blk + 1 < b1) {
      const int64_t q1 = q0 + kBlock;
      plan_prefetch(job, q1, std::min(kBlock, pixels - q1), s.next_runs, s.pf);
      s.pf.per_call = std::max<size_t>(2, (s.pf.lines.size() + calls - 1) / calls);
    } else {
      s.pf.reset();
    }
    // R = W X + (b - FT)
    gemm_impl<A, VL, MR, NV>(Ct, kBlock, Cs, job.w, Cs, s.x.data(), kLd, s.r.data(), kLd, true, s.pf);
    for (int64_t c = 0; c < Ct; ++c) {
      A sum, sq;
      sum_and_squares(&s.r[c * kLd], sum, sq);  // the padded columns are exactly 0
      loss += sq;
      if (gb) gb[c] += sum;
    }
    if (job.gft) scatter(job, s.runs, s.r.data(), Ct, job.gft);
    if (job.gfs) {  // GFS = W^T R
      gemm_impl<A, VL, MR, NV>(Cs, kBlock, Ct, job.wt, Ct, s.r.data(), kLd, s.g.data(), kLd, false, s.pf);
      scatter(job, s.runs, s.g.data(), Cs, job.gfs);
    }
    if (gw) {  // GW (+)= R X^T
      transpose<A, VL>(s.x.data(), job.cs_rows, s.xt.data(), s.xt_ld);
      gemm_impl<A, VL, MR, NV>(Ct, job.cs_pad, kBlock, s.r.data(), kLd, s.xt.data(), s.xt_ld, gw, job.cs_pad,
                               blk != b0, s.pf);
    }
  }
  job.loss_part[g] = loss;
}

template <typename T>
using RunFn = void (*)(const Job<T>&, Scratch<T>&, int64_t);

// One compiled runner per storage type and instruction set: everything above is
// always_inline, so each runner's loops (GEMMs, packing, sums) use its ISA.
#define KDK_HINT_RUNNER(NAME, TARGET, T, VL, MR, NV) \
  TARGET void NAME(const Job<T>& job, Scratch<T>& s, int64_t g) { run_group<T, VL, MR, NV>(job, s, g); }

// Baseline (SSE2 on x86-64): 4 x 2 accumulators of 16 bytes.
KDK_HINT_RUNNER(run_base_f32, , float, 4, 4, 2)
KDK_HINT_RUNNER(run_base_f64, , double, 2, 4, 2)
KDK_HINT_RUNNER(run_base_f16, , Half, 4, 4, 2)
KDK_HINT_RUNNER(run_base_bf16, , BFloat16, 4, 4, 2)
#if defined(__x86_64__) && defined(__GNUC__)
#define KDK_HINT_X86 1
#define KDK_AVX2 __attribute__((target("avx2,fma")))
#define KDK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
// AVX2 + FMA: 16 ymm registers, 6 x 2 accumulators.
KDK_HINT_RUNNER(run_avx2_f32, KDK_AVX2, float, 8, 6, 2)
KDK_HINT_RUNNER(run_avx2_f64, KDK_AVX2, double, 4, 6, 2)
KDK_HINT_RUNNER(run_avx2_f16, KDK_AVX2, Half, 8, 6, 2)
KDK_HINT_RUNNER(run_avx2_bf16, KDK_AVX2, BFloat16, 8, 6, 2)
// AVX-512: 32 zmm registers, 6 x 4 accumulators (fewer loads per FMA than 12 x 2).
KDK_HINT_RUNNER(run_avx512_f32, KDK_AVX512, float, 16, 6, 4)
KDK_HINT_RUNNER(run_avx512_f64, KDK_AVX512, double, 8, 6, 4)
KDK_HINT_RUNNER(run_avx512_f16, KDK_AVX512, Half, 16, 6, 4)
KDK_HINT_RUNNER(run_avx512_bf16, KDK_AVX512, BFloat16, 16, 6, 4)
#endif

template <typename T>
RunFn<T> pick_runner(RunFn<T> base, RunFn<T> avx2, RunFn<T> avx512) {
  const Isa i = isa();
  if (i == Isa::kAvx512 && avx512) return avx512;
  if (i == Isa::kAvx2 && avx2) return avx2;
  return base;
}

#if defined(KDK_HINT_X86)
#define KDK_RUNNERS(SUFFIX) pick_runner(run_base_##SUFFIX, run_avx2_##SUFFIX, run_avx512_##SUFFIX)
#else
#define KDK_RUNNERS(SUFFIX) pick_runner(run_base_##SUFFIX, nullptr, nullptr)
#endif

template <typename T> RunFn<T> runner();
template <> RunFn<float> runner<float>() { return KDK_RUNNERS(f32); }
template <> RunFn<double> runner<double>() { return KDK_RUNNERS(f64); }
template <> RunFn<Half> runner<Half>() { return KDK_RUNNERS(f16); }
template <> RunFn<BFloat16> runner<BFloat16>() { return KDK_RUNNERS(bf16); }

// Number of pixel groups (each with its own partials): from the shape only. At
// least kMinBlocksPerGroup blocks per group where there are enough blocks, at
// most kMaxGroups groups and kMaxPartial weight-gradient partial elements.
int64_t groups_for(int64_t blocks, int64_t Ct, int64_t cs_pad) {
  const int64_t by_memory = std::max<int64_t>(1, kMaxPartial / std::max<int64_t>(1, Ct * cs_pad));
  const int64_t by_blocks = std::max<int64_t>(1, blocks / kMinBlocksPerGroup);
  return std::max<int64_t>(1, std::min({by_blocks, kMaxGroups, by_memory}));
}

}  // namespace

// Which compiled variant hint_fwd_cpu runs here: "avx512", "avx2" or "baseline".
const char* hint_cpu_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// See the file comment. fs (N, Cs, P), ft (N, Ct, P), w (Ct, Cs), bias (Ct) or 0: storage
// dtype. loss_out (1): accumulation dtype, sum r^2. gw (Ct, Cs) or 0, gb (Ct) or 0:
// accumulation dtype, sum r fs^T and sum r. gfs (N, Cs, P) or 0, gft (N, Ct, P) or 0:
// storage dtype, W^T r and r. (Times 2 / numel they are the loss's gradients, apart from
// the sign of gft.)
void hint_fwd_cpu(int dtype, uintptr_t fs_ptr, uintptr_t ft_ptr, uintptr_t w_ptr, uintptr_t b_ptr,
                  uintptr_t loss_ptr, uintptr_t gfs_ptr, uintptr_t gw_ptr, uintptr_t gb_ptr, uintptr_t gft_ptr,
                  int64_t N, int64_t Cs, int64_t Ct, int64_t P, int64_t num_threads) {
  if (N <= 0 || Cs <= 0 || Ct <= 0 || P <= 0)
    throw std::invalid_argument("hint_fwd_cpu: N, Cs, Ct and H*W must be positive");
  check_pointers("hint_fwd_cpu", {fs_ptr, ft_ptr, w_ptr, loss_ptr});
  dispatch_dtype(dtype, "hint_fwd_cpu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const T* w_in = reinterpret_cast<const T*>(w_ptr);
    const T* b_in = reinterpret_cast<const T*>(b_ptr);
    A* gw_out = reinterpret_cast<A*>(gw_ptr);
    A* gb_out = reinterpret_cast<A*>(gb_ptr);
    const bool need_w = gw_out != nullptr, need_b = gb_out != nullptr;
    const bool need_fs = gfs_ptr != 0;

    // W (Ct x Cs), W^T (Cs x Ct) and b in the accumulation type, once per call.
    A* w = partials<A>(3, Ct * Cs);
    A* wt = need_fs ? partials<A>(4, Cs * Ct) : nullptr;
    A* bias = b_in ? partials<A>(5, Ct) : nullptr;
    for (int64_t i = 0; i < Ct; ++i)
      for (int64_t k = 0; k < Cs; ++k) w[i * Cs + k] = Scalar<T>::load(w_in[i * Cs + k]);
    if (need_fs)
      for (int64_t i = 0; i < Ct; ++i)
        for (int64_t k = 0; k < Cs; ++k) wt[k * Ct + i] = w[i * Cs + k];
    if (b_in)
      for (int64_t i = 0; i < Ct; ++i) bias[i] = Scalar<T>::load(b_in[i]);

    Job<T> job;
    job.N = N, job.Cs = Cs, job.Ct = Ct, job.P = P;
    job.cs_pad = (Cs + 31) / 32 * 32;  // a multiple of every micro-kernel's 2*VL
    job.cs_rows = (Cs + 15) / 16 * 16;
    job.blocks = (N * P + kBlock - 1) / kBlock;
    job.groups = groups_for(job.blocks, Ct, job.cs_pad);
    job.fs = reinterpret_cast<const T*>(fs_ptr);
    job.ft = reinterpret_cast<const T*>(ft_ptr);
    job.w = w;
    job.wt = wt;
    job.bias = bias;
    job.gfs = reinterpret_cast<T*>(gfs_ptr);
    job.gft = reinterpret_cast<T*>(gft_ptr);
    // partials: every element is written by its group before it is read
    const int64_t groups = job.groups, cs_pad = job.cs_pad;
    job.loss_part = partials<A>(0, groups);
    job.gw_part = need_w ? partials<A>(1, groups * Ct * cs_pad) : nullptr;
    job.gb_part = need_b ? partials<A>(2, groups * Ct) : nullptr;

    const RunFn<T> run = runner<T>();
    const int64_t macs = N * P * Cs * Ct * (1 + (need_fs ? 1 : 0) + (need_w ? 1 : 0));
    const int64_t threads = choose_threads(num_threads, groups, macs, kMinMacsPerThread);
    // The threads of the team take the next unclaimed group; which thread
    // computes a group never changes its result.
    parallel_for_each(groups, threads, [&](int64_t g) { run(job, Scratch<T>::for_this_thread(job), g); });

    // Second reduction: the groups in order.
    A loss = A(0);
    for (int64_t g = 0; g < groups; ++g) loss += job.loss_part[g];
    *reinterpret_cast<A*>(loss_ptr) = loss;
    if (need_w)
      for (int64_t i = 0; i < Ct; ++i) {
        A* __restrict out = gw_out + i * Cs;
        for (int64_t k = 0; k < Cs; ++k) out[k] = A(0);
        for (int64_t g = 0; g < groups; ++g) {
          const A* __restrict part = job.gw_part + (g * Ct + i) * cs_pad;
          for (int64_t k = 0; k < Cs; ++k) out[k] += part[k];
        }
      }
    if (need_b)
      for (int64_t i = 0; i < Ct; ++i) {
        A s = A(0);
        for (int64_t g = 0; g < groups; ++g) s += job.gb_part[g * Ct + i];
        gb_out[i] = s;
      }
  });
}

}  // namespace kdk
