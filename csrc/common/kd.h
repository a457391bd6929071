// Hinton KD (docs/spec.md §4): the streaming (online-softmax) state of a row,
// shared by the C++ and CUDA kernels, and the entry points of kdkernels._C.
//
// With z_s = x_s / T and z_t = x_t / T of one row, running maxima m_s, m_t and
// their "effective" values e(m) = (m == -inf ? 0 : m) (a row whose elements so
// far are all -inf contributes exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN),
// a row (or a piece of one) is summarised by
//
//   a_s = z_s - e(m_s),  a_t = z_t - e(m_t)          (<= 0: exp never overflows)
//   S_s = sum exp(a_s),  S_t = sum exp(a_t)
//   W   = sum exp(a_t) * (a_t - a_s)                  (0 where exp(a_t) == 0)
//
// and KL(p_t || p_s) = sum p_t (log p_t - log p_s)
//                    = sum p_t ((a_t - log S_t) - (a_s - log S_s))
//                    = W / S_t + log(S_s / S_t).
// Keeping a_t - a_s (small, shifted by the maxima) instead of z_t - z_s (which
// can be ~1e4 and cancel against the log-sum-exps) keeps the result accurate.
//
// When the maxima grow to m'_s, m'_t, every term is rescaled: with
// alpha = exp(e(m) - e(m')) and dc = (e(m'_t) - e(m_t)) - (e(m'_s) - e(m_s)),
//   S_s <- alpha_s S_s,   S_t <- alpha_t S_t,   W <- alpha_t (W - dc S_t).
// Two states merge by rescaling both to the common maxima and adding.
//
// Per row the forward writes stats[n] = (e(m_s), log S_s, e(m_t), log S_t, E, rho)
// and kl[n] = KL, where the teacher's gradient factor is written with the gaps
// g = a_t - (z_s - rho) for a finite reference rho of the writer's choice:
// E = E_{p_t}[g] = W / S_t + rho - e(m_s). The backward, with gscale[n] =
// grad_output[n] * T, writes
//   p_s = exp(a_s - log S_s),  p_t = exp(a_t - log S_t)
//   grad_s = gscale (p_s - p_t)
//   grad_t = gscale p_t (g - E)
// (the last since log p_t - log p_s - KL = (a_t - a_s) - W / S_t = g - E).
// KdState (the CUDA kernels) takes rho = e(m_s), so g = a_t - a_s and E = W / S_t.
// The CPU kernels take rho = the student's logit at the teacher's first argmax
// (csrc/cpu/kd.cpp): g is then exactly 0 where p_t is largest, and g - E does not
// cancel there when the teacher is peaked (with rho = e(m_s) it is the difference
// of two numbers of the size of the logits' spread, which costs up to ~10x the
// teacher gradient's accuracy).
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "checks.h"
#include "macros.h"

namespace kdk {

constexpr int kKdStats = 6;  // per-row stats: e(m_s), log S_s, e(m_t), log S_t, E_{p_t}[g], rho
constexpr int kKdCudaPart = 5;  // a row segment's KdState in the CUDA forward's scratch: m_s, m_t, S_s, S_t, W

template <typename A> KDK_HD A kd_neg_inf();
template <> KDK_HD float kd_neg_inf<float>() { return -__builtin_huge_valf(); }
template <> KDK_HD double kd_neg_inf<double>() { return -__builtin_huge_val(); }

// e(m): 0 for an all -inf prefix, m otherwise (NaN and +inf pass through).
template <typename A>
KDK_HD A kd_eff(A m) {
  return m == kd_neg_inf<A>() ? A(0) : m;
}

// max that never picks a NaN candidate (a NaN element still reaches the sums).
template <typename A>
KDK_HD A kd_max(A a, A b) {
  return b > a ? b : a;
}

// a_t - a_s where the teacher's term counts, else 0 (so that 0 * (-inf) never appears).
// (The difference is computed unconditionally: a select between two values lets
// compilers vectorise loops that a conditionally evaluated expression would not.)
template <typename A>
KDK_HD A kd_gap(A e_t, A a_t, A a_s) {
  const A gap = a_t - a_s;
  return e_t > A(0) ? gap : A(0);
}

// Rescale factors from running maxima m (old) to m_new (>= m): alpha = exp(m - e(m_new)),
// 0 when m is -inf (nothing has been summed yet). EXP is the exp function of the caller.
template <typename A, typename EXP>
KDK_HD A kd_alpha(A m, A m_new, EXP exp_fn) {
  return m == kd_neg_inf<A>() ? A(0) : exp_fn(m - kd_eff(m_new));
}

// dc of the rescale: (e(mt_new) - e(mt)) - (e(ms_new) - e(ms)).
template <typename A>
KDK_HD A kd_shift(A ms, A mt, A ms_new, A mt_new) {
  return (kd_eff(mt_new) - kd_eff(mt)) - (kd_eff(ms_new) - kd_eff(ms));
}

// Summary of a row or a piece of one (see the top of this file).
template <typename A>
struct KdState {
  A ms, mt;  // running maxima (-inf while empty)
  A ss, st;  // S_s, S_t relative to e(ms), e(mt)
  A w;       // W relative to e(ms), e(mt)

  KDK_HD static KdState empty() { return KdState{kd_neg_inf<A>(), kd_neg_inf<A>(), A(0), A(0), A(0)}; }

  // Re-express the sums relative to maxima ms_new >= ms, mt_new >= mt.
  template <typename EXP>
  KDK_HD void rescale(A ms_new, A mt_new, EXP exp_fn) {
    const A as = kd_alpha(ms, ms_new, exp_fn), at = kd_alpha(mt, mt_new, exp_fn);
    const A dc = kd_shift(ms, mt, ms_new, mt_new);
    w = st == A(0) ? A(0) : at * (w - dc * st);
    ss *= as;
    st *= at;
    ms = ms_new;
    mt = mt_new;
  }

  // Add a group of N elements (z_s[u], z_t[u]; -inf where there is none): grow the
  // maxima to the group's (rescaling the sums when they grow), then add its terms.
  template <int N, typename EXP>
  KDK_HD void add_group(const A (&zs)[N], const A (&zt)[N], EXP exp_fn) {
    A bs = zs[0], bt = zt[0];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int u = 1; u < N; ++u) bs = kd_max(bs, zs[u]), bt = kd_max(bt, zt[u]);
    const A ms_new = kd_max(ms, bs), mt_new = kd_max(mt, bt);
    if (ms_new != ms || mt_new != mt) rescale(ms_new, mt_new, exp_fn);
    const A es = kd_eff(ms), et = kd_eff(mt);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int u = 0; u < N; ++u) {
      const A a_s = zs[u] - es, a_t = zt[u] - et;
      const A e_s = exp_fn(a_s), e_t = exp_fn(a_t);
      ss += e_s;
      st += e_t;
      w += e_t * kd_gap(e_t, a_t, a_s);
    }
  }

  // *this <- merge(*this, o): order-independent up to the final additions.
  template <typename EXP>
  KDK_HD void merge(KdState o, EXP exp_fn) {
    const A ms_new = kd_max(ms, o.ms), mt_new = kd_max(mt, o.mt);
    rescale(ms_new, mt_new, exp_fn);
    o.rescale(ms_new, mt_new, exp_fn);
    ss += o.ss;
    st += o.st;
    w += o.w;
  }

  // The state as kKdCudaPart values (ms, mt, ss, st, w) and back.
  KDK_HD void store(A* p) const {
    p[0] = ms;
    p[1] = mt;
    p[2] = ss;
    p[3] = st;
    p[4] = w;
  }
  KDK_HD static KdState load(const A* p) { return KdState{p[0], p[1], p[2], p[3], p[4]}; }

  // stats[0..5] (with rho = e(m_s)) and the row's KL.
  template <typename LOG>
  KDK_HD A finish(A* stats, LOG log_fn) const {
    const A ec = w / st;
    stats[0] = kd_eff(ms);
    stats[1] = log_fn(ss);
    stats[2] = kd_eff(mt);
    stats[3] = log_fn(st);
    stats[4] = ec;
    stats[5] = kd_eff(ms);
    return ec + log_fn(ss / st);
  }
};

inline void kd_check_sizes(const char* where, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) throw std::invalid_argument(std::string(where) + ": negative size");
  if (cols > 0 && rows > std::numeric_limits<int64_t>::max() / cols)
    throw std::invalid_argument(std::string(where) + ": rows * cols overflows int64");
}

// What every entry point checks first; false when there is no work (no rows; for
// the backward also no classes). The forward refuses rows of 0 classes: no softmax.
inline bool kd_begin(const char* where, bool forward, int64_t rows, int64_t cols,
                     std::initializer_list<uintptr_t> ptrs) {
  kd_check_sizes(where, rows, cols);
  if (rows == 0 || (!forward && cols == 0)) return false;
  if (cols == 0) throw std::invalid_argument(std::string(where) + ": rows of 0 classes have no softmax");
  check_pointers(where, ptrs);
  return true;
}

// Pointers are addresses (tensor.data_ptr()); logits contiguous (rows, cols) of
// dtype code `dtype`; stats (rows, 6), kl (rows,) and gscale (rows,) in the
// accumulation dtype (the CPU kernels write their stats in their own layout,
// see csrc/cpu/kd.cpp, and only their backward reads them); grad_s / grad_t in the logits' dtype, grad_t may be 0
// (not wanted). inv_t = 1 / T.
//
// The CPU entry points also do the few scalar steps around the kernels, since
// on a CPU each extra tensor op costs as much as the kernel on small logits:
// the forward writes the loss itself in the accumulation dtype, out[0] =
// out_scale * sum_n KL_n when `reduce`, else out[n] = out_scale * KL_n; the
// backward reads grad_output in the accumulation dtype (a loss scale of 65,536
// does not fit fp16), g_n = gout_scale * gout[n * gout_stride] (stride 0 for a
// 0-dim grad_output).
void kd_fwd_cpu(int dtype, uintptr_t s, uintptr_t t, uintptr_t stats, uintptr_t out, int64_t rows, int64_t cols,
                double inv_t, double out_scale, bool reduce, int64_t num_threads);
void kd_bwd_cpu(int dtype, uintptr_t s, uintptr_t t, uintptr_t stats, uintptr_t gout, int64_t gout_stride,
                double gout_scale, uintptr_t grad_s, uintptr_t grad_t, int64_t rows, int64_t cols, double inv_t,
                int64_t num_threads);

#if defined(KDKERNELS_WITH_CUDA)
// The CUDA forward cuts each row into at most `split` segments (1 <= split <= 65535) and,
// when that gives more than one, writes their states to `part` (rows * split * kKdCudaPart
// values of the accumulation dtype; unused, and may be 0, when split is 1) before merging them.
void kd_fwd_cuda(int dtype, uintptr_t s, uintptr_t t, uintptr_t stats, uintptr_t kl, uintptr_t part, int64_t rows,
                 int64_t cols, int64_t split, double inv_t, uintptr_t stream);
void kd_bwd_cuda(int dtype, uintptr_t s, uintptr_t t, uintptr_t stats, uintptr_t gscale, uintptr_t grad_s,
                 uintptr_t grad_t, int64_t rows, int64_t cols, double inv_t, uintptr_t stream);
#endif

}  // namespace kdk
