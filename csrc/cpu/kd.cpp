// Hinton KD on CPU (docs/spec.md §4; the streaming state and formulas are in common/kd.h).
//
// A row is cut into fixed segments of kSegment classes (the cut depends on the
// row length only); a work item is one (row, segment). Threads take contiguous
// ranges of items, so rows of 1000 classes spread over threads as whole rows
// and a single row of 128k classes still spreads over 16 items.
//
// Forward, per segment, one read of both inputs: per block of kBlock classes,
// the block maxima of the raw logits (integer-key reductions, see OrderKey)
// update the running maxima (rescaling the sums when they grow: rare after the
// first blocks), then kLanes independent lanes accumulate, in base 2 (see
// fwd_segment_impl), exp(a_s), exp(a_t) and exp(a_t)(a_t - a_s) over the same
// block, still in L1. Lanes share the maxima, so they add up at the end in a
// fixed tree; a row's segments merge in order. Nothing depends on the thread
// count: deterministic.
//
// Backward, given the per-row stats, is elementwise (two exps per class).
//
// The exps run through exp2_neg below (a branch-free polynomial, accurate to a
// few ulp, for the arguments <= 0 that the kernel produces) so that the loops
// vectorise; on x86-64 the hot functions are also compiled for AVX2+FMA and
// AVX-512, and the first call picks what the CPU supports.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/dtype.h"
#include "../common/kd.h"
#include "../common/macros.h"  // KDK_ALWAYS_INLINE
#include "../common/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define KDK_KD_X86 1
#define KDK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KDK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#else
#define KDK_KD_X86 0
#endif

namespace kdk {
namespace {

constexpr int64_t kLanes = 16;      // independent accumulators (one 512-bit vector of floats)
constexpr int64_t kBlock = 256;     // classes per update of the running maxima
constexpr int64_t kSegment = 8192;  // classes per work item (a multiple of kBlock)
// Below this many classes per thread, starting a thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 16384;

KDK_ALWAYS_INLINE uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

KDK_ALWAYS_INLINE float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// v where keep, else +0, as a bit mask. Compilers (GCC with its default
// -ftrapping-math) do not if-convert `c ? v : 0.0f` for a floating-point
// comparison c, which keeps whole loops scalar; a mask between two integer
// constants they do vectorise.
KDK_ALWAYS_INLINE float keep_if(bool keep, float v) { return u2f(f2u(v) & (keep ? ~0u : 0u)); }
KDK_ALWAYS_INLINE double keep_if(bool keep, double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  u &= keep ? ~uint64_t(0) : uint64_t(0);
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// Block maxima on integer keys: key(x) orders like x for every non-NaN float
// (flip the magnitude bits of negatives), and an integer max vectorises where a
// floating-point `b > a ? b : a` does not (it may trap, as far as GCC knows).
// A NaN gets a key above +inf or below -inf; either way its exp term reaches
// the sums, so the result is NaN as it should be.
template <typename A> struct OrderKey;
template <> struct OrderKey<float> {
  using type = int32_t;
  static KDK_ALWAYS_INLINE int32_t key(float x) {
    const int32_t i = int32_t(f2u(x));
    return i ^ ((i >> 31) & 0x7fffffff);
  }
  static KDK_ALWAYS_INLINE float value(int32_t k) { return u2f(uint32_t(k ^ ((k >> 31) & 0x7fffffff))); }
};
template <> struct OrderKey<double> {
  using type = int64_t;
  static KDK_ALWAYS_INLINE int64_t key(double x) {
    int64_t i;
    std::memcpy(&i, &x, sizeof i);
    return i ^ ((i >> 63) & INT64_MAX);
  }
  static KDK_ALWAYS_INLINE double value(int64_t k) {
    const int64_t i = k ^ ((k >> 63) & INT64_MAX);
    double x;
    std::memcpy(&x, &i, sizeof x);
    return x;
  }
};

// 2^x for x <= ~0 (a few ulp above 0 are fine), -inf (-> 0) and NaN (-> NaN),
// without branches. The kernels work in base 2 (logits scaled by log2(e) / T),
// which saves the Cody-Waite reduction of a natural exp: x = k + f with
// k = round(x) and f = x - k exact, |f| <= 1/2; 2^f by a degree-6 polynomial
// (near-minimax on [-1/2, 1/2], relative error 2e-9 in exact arithmetic, about
// 1e-7 evaluated in float); 2^k built in the exponent field. Below x = -126
// (2^-126 is the smallest normal float) the bits are garbage and the final mask
// returns 0 instead; there is deliberately no clamp of x before that, since a
// second comparison keeps GCC from vectorising the loop.
KDK_ALWAYS_INLINE float exp2_neg(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLow = -126.0f;
  const float t = x + kRound;
  const float k = t - kRound;
  const int32_t ki = int32_t(f2u(t) - f2u(kRound));  // the integer k, from t's mantissa
  const float f = x - k;
  float p = 1.5345811601371988e-4f;
  p = p * f + 1.3399931216112673e-3f;
  p = p * f + 9.6184889586126e-3f;
  p = p * f + 5.55032877697489e-2f;
  p = p * f + 0.2402264689062022f;
  p = p * f + 0.6931472057372617f;
  p = p * f + 1.0f;
  const float scale = u2f(uint32_t(ki + 127) << 23);
  return keep_if(!(x < kLow), p * scale);
}

template <typename A> struct KdMath;
template <> struct KdMath<float> {
  static KDK_ALWAYS_INLINE float exp2(float x) { return exp2_neg(x); }
};
template <> struct KdMath<double> {
  static KDK_ALWAYS_INLINE double exp2(double x) { return std::exp2(x); }
};

template <typename A> constexpr A kLog2e = A(1.442695040888963407359924681001892137);
template <typename A> constexpr A kLn2 = A(0.693147180559945309417232121458176568);

// exp(x / T) = 2^(x c) of a difference x of raw logits (KdState's rescales and merges).
template <typename A>
struct Exp2Scaled {
  A c;
  A operator()(A x) const { return std::exp2(x * c); }
};

template <typename A>
KDK_ALWAYS_INLINE A lane_sum(const A* v) {  // fixed tree over kLanes = 16
  A h[8];
  for (int l = 0; l < 8; ++l) h[l] = v[l] + v[l + 8];
  return ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]));
}

// Block i0 of a segment as accumulation-type values: the input itself when it
// is already of that type and the block is whole, else a converted copy in buf
// padded with -inf (which adds exp(-inf) = 0 and a gap of 0).
template <typename T>
KDK_ALWAYS_INLINE const acc_t<T>* block_values(const T* __restrict x, int64_t nb, acc_t<T>* __restrict buf) {
  using A = acc_t<T>;
  if constexpr (std::is_same<T, A>::value)
    if (nb == kBlock) return x;
  for (int64_t j = 0; j < nb; ++j) buf[j] = Scalar<T>::load(x[j]);
  for (int64_t j = nb; j < kBlock; ++j) buf[j] = kd_neg_inf<A>();
  return buf;
}

// The state of a row segment in raw logit units (see fwd_segment_impl): KdState's
// fields, w taken with the gaps g = d_t - (x_s - rho) (common/kd.h), plus r, the
// student's logit at the teacher's first argmax so far (-inf: none yet), and the
// reference rho = r where r is finite, else e(m_s).
template <typename A>
struct RowState {
  KdState<A> k;
  A r, rho;
};

template <typename A>
KDK_ALWAYS_INLINE A gap_reference(A r, A ms) {
  return std::isfinite(r) ? r : kd_eff(ms);
}

// a <- the state of a's classes followed by b's (rows merge their segments in order).
template <typename A>
void merge_rows(RowState<A>& a, const RowState<A>& b, A c) {
  const A ms = kd_max(a.k.ms, b.k.ms), mt = kd_max(a.k.mt, b.k.mt);
  const A r = b.k.mt > a.k.mt ? b.r : a.r;  // the first segment that holds the teacher's maximum
  const A rho = gap_reference(r, ms);
  A ss = A(0), st = A(0), w = A(0);
  const RowState<A>* both[2] = {&a, &b};
  for (const RowState<A>* p : both) {
    const A as = kd_alpha(p->k.ms, ms, Exp2Scaled<A>{c}), at = kd_alpha(p->k.mt, mt, Exp2Scaled<A>{c});
    const A dc = (kd_eff(mt) - kd_eff(p->k.mt)) - (rho - p->rho);
    w += p->k.st == A(0) ? A(0) : at * (p->k.w - dc * p->k.st);
    ss += as * p->k.ss;
    st += at * p->k.st;
  }
  a = RowState<A>{KdState<A>{ms, mt, ss, st, w}, r, rho};
}

// The state of classes [0, n) of one row segment, in raw logit units: with the
// running maxima m of the raw logits x (not of x / T) and d = x - e(m),
// exp(d / T) = 2^(d c) with c = log2(e) / T, and
//
//   ss = sum 2^(d_s c),  st = sum 2^(d_t c),  w = sum 2^(d_t c) (d_t - (x_s - rho))
//
// (KdState's fields with x in place of x / T; merged by merge_rows). Raw
// differences keep the largest logit's term exactly 1 (a single class gives a
// loss and gradient of exactly 0, as the reference does), and 2^(d c) needs no
// range reduction by ln 2.
template <typename T>
KDK_ALWAYS_INLINE RowState<acc_t<T>> fwd_segment_impl(const T* __restrict s, const T* __restrict t, int64_t n,
                                                      acc_t<T> c) {
  using A = acc_t<T>;
  using M = KdMath<A>;
  using K = OrderKey<A>;
  using Key = typename K::type;
  alignas(64) A buf_s[kBlock], buf_t[kBlock];
  // Each block's sums run in kLanes lanes of A, then add into double totals: over a long row
  // (25k classes) float lanes alone put a few 1e-7 of relative error on the normalizers.
  alignas(64) A ss[kLanes], st[kLanes], w[kLanes];
  double tss = 0.0, tst = 0.0, tw = 0.0;
  A ms = kd_neg_inf<A>(), mt = kd_neg_inf<A>();
  A r = kd_neg_inf<A>(), rho = A(0);
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - i0);
    const A* __restrict xs = block_values(s + i0, nb, buf_s);
    const A* __restrict xt = block_values(t + i0, nb, buf_t);
    Key ks = K::key(xs[0]), kt = K::key(xt[0]);
    for (int64_t j = 1; j < kBlock; ++j) {  // integer max reductions: they vectorise
      const Key a = K::key(xs[j]), b = K::key(xt[j]);
      ks = a > ks ? a : ks;
      kt = b > kt ? b : kt;
    }
    const A bt = K::value(kt);
    const A ms_new = kd_max(ms, K::value(ks)), mt_new = kd_max(mt, bt);
    if (ms_new != ms || mt_new != mt) {  // the maxima grew: rescale every lane
      if (bt > mt) {  // the teacher's maximum is in this block: the student's logit at its first argmax
        int64_t j = 0;
        while (K::key(xt[j]) != kt) ++j;
        r = xs[j];
      }
      const A rho_new = gap_reference(r, ms_new);
      const A as = kd_alpha(ms, ms_new, Exp2Scaled<A>{c}), at = kd_alpha(mt, mt_new, Exp2Scaled<A>{c});
      const A dc = (kd_eff(mt_new) - kd_eff(mt)) - (rho_new - rho);
      tw = tst == 0.0 ? 0.0 : double(at) * (tw - double(dc) * tst);
      tss *= double(as);
      tst *= double(at);
      ms = ms_new;
      mt = mt_new;
      rho = rho_new;
    }
    const A es = kd_eff(ms), et = kd_eff(mt);
    for (int64_t l = 0; l < kLanes; ++l) ss[l] = st[l] = w[l] = A(0);
    for (int64_t j = 0; j < kBlock; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const A d_s = xs[j + l] - es, d_t = xt[j + l] - et;
        const A e_s = M::exp2(d_s * c), e_t = M::exp2(d_t * c);
        ss[l] += e_s;
        st[l] += e_t;
        w[l] += e_t * keep_if(e_t > A(0), d_t - (xs[j + l] - rho));  // kd_gap
      }
    tss += double(lane_sum(ss));
    tst += double(lane_sum(st));
    tw += double(lane_sum(w));
  }
  return RowState<A>{KdState<A>{ms, mt, A(tss), A(tst), A(tw)}, r, rho};
}

// A row's stats from its raw-unit state (the CPU layout, see kd_fwd_cpu):
// (e(m_s), log2 S_s, e(m_t), log2 S_t, E, rho) with E = E_pt[g] (raw units), and
// its KL = (E + e(m_s) - rho) / T + ln(S_s / S_t).
template <typename A>
KDK_ALWAYS_INLINE A finish_row(const RowState<A>& row, A inv_t, A* stats) {
  const KdState<A>& k = row.k;
  const A ec = k.w / k.st;
  const A kl = (ec + (kd_eff(k.ms) - row.rho)) * inv_t + std::log(k.ss / k.st);
  stats[0] = kd_eff(k.ms);
  stats[1] = std::log2(k.ss);
  stats[2] = kd_eff(k.mt);
  stats[3] = std::log2(k.st);
  stats[4] = ec;
  stats[5] = row.rho;
  return kl;
}

// grad_s (and grad_t when GT) of classes [0, n) of one row, from its stats.
// u = (x - m) c - log2 S = log2 p, so p = 2^u, and the teacher's factor
// log p_t - log p_s - KL = (g - E) / T with g = (x_t - e(m_t)) - (x_s - rho).
template <typename T, bool GT>
KDK_ALWAYS_INLINE void bwd_segment_impl(const T* __restrict s, const T* __restrict t, int64_t n,
                                        const acc_t<T>* __restrict stats, acc_t<T> g, acc_t<T> c, acc_t<T> inv_t,
                                        T* __restrict grad_s, T* __restrict grad_t) {
  using A = acc_t<T>;
  using M = KdMath<A>;
  const A ms = stats[0], ls = stats[1], mt = stats[2], lt = stats[3], ec = stats[4], rho = stats[5];
  const A gt = g * inv_t;
  for (int64_t i = 0; i < n; ++i) {
    const A xs = Scalar<T>::load(s[i]), xt = Scalar<T>::load(t[i]);
    const A u_s = (xs - ms) * c - ls;
    const A u_t = (xt - mt) * c - lt;
    const A p_s = M::exp2(u_s), p_t = M::exp2(u_t);
    grad_s[i] = Scalar<T>::store(g * (p_s - p_t));
    if (GT) grad_t[i] = Scalar<T>::store(gt * p_t * (keep_if(p_t > A(0), (xt - mt) - (xs - rho)) - ec));  // kd_gap
  }
}

// Non-template entry points of the hot loops, per storage type and, on x86-64,
// per instruction set: the baseline build is SSE2 only (the wheel must run on
// any x86-64), so AVX2+FMA and AVX-512 copies are compiled beside it and one is
// chosen once, at run time, from what the CPU supports.
template <typename T>
struct SegmentFns {
  using A = acc_t<T>;
  // c = log2(e) / T
  RowState<A> (*fwd)(const T* s, const T* t, int64_t n, A c);
  // inv_t = 1 / T
  void (*bwd)(const T* s, const T* t, int64_t n, const A* stats, A g, A c, A inv_t, T* grad_s, T* grad_t);
};

#define KDK_KD_DEFINE(T, NAME, ATTR)                                                                      \
  ATTR RowState<acc_t<T>> fwd_##NAME(const T* s, const T* t, int64_t n, acc_t<T> c) {                   \
    return fwd_segment_impl<T>(s, t, n, c);                                                             \
  }                                                                                                     \
  ATTR void bwd_##NAME(const T* s, const T* t, int64_t n, const acc_t<T>* stats, acc_t<T> g, acc_t<T> c, \
                       acc_t<T> inv_t, T* grad_s, T* grad_t) {                                          \
    if (grad_t != nullptr)                                                                              \
      bwd_segment_impl<T, true>(s, t, n, stats, g, c, inv_t, grad_s, grad_t);                          \
    else                                                                                                \
      bwd_segment_impl<T, false>(s, t, n, stats, g, c, inv_t, grad_s, nullptr);                        \
  }
#define KDK_KD_DEFINE_ALL(ISA, ATTR)          \
  KDK_KD_DEFINE(float, ISA##_f32, ATTR)       \
  KDK_KD_DEFINE(double, ISA##_f64, ATTR)      \
  KDK_KD_DEFINE(Half, ISA##_f16, ATTR)        \
  KDK_KD_DEFINE(BFloat16, ISA##_bf16, ATTR)

KDK_KD_DEFINE_ALL(base, )
#if KDK_KD_X86
KDK_KD_DEFINE_ALL(avx2, KDK_TARGET_AVX2)
KDK_KD_DEFINE_ALL(avx512, KDK_TARGET_AVX512)
#endif

enum class Isa { base, avx2, avx512 };

Isa detect_isa() {
#if KDK_KD_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
  if (avx2) return Isa::avx2;
#endif
  return Isa::base;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

#if KDK_KD_X86
#define KDK_KD_PICK(T, SUF)                                                    \
  SegmentFns<T> segment_fns(TypeTag<T>) {                                      \
    switch (cpu_isa()) {                                                       \
      case Isa::avx512: return {fwd_avx512_##SUF, bwd_avx512_##SUF};           \
      case Isa::avx2: return {fwd_avx2_##SUF, bwd_avx2_##SUF};                 \
      default: return {fwd_base_##SUF, bwd_base_##SUF};                        \
    }                                                                          \
  }
#else
#define KDK_KD_PICK(T, SUF) \
  SegmentFns<T> segment_fns(TypeTag<T>) { return {fwd_base_##SUF, bwd_base_##SUF}; }
#endif
KDK_KD_PICK(float, f32)
KDK_KD_PICK(double, f64)
KDK_KD_PICK(Half, f16)
KDK_KD_PICK(BFloat16, bf16)
#undef KDK_KD_PICK
#undef KDK_KD_DEFINE_ALL
#undef KDK_KD_DEFINE

}  // namespace

void kd_fwd_cpu(int dtype, uintptr_t s_ptr, uintptr_t t_ptr, uintptr_t stats_ptr, uintptr_t out_ptr, int64_t rows,
                int64_t cols, double inv_t, double out_scale, bool reduce, int64_t num_threads) {
  const char* where = "kd_fwd_cpu";
  if (!kd_begin(where, true, rows, cols, {s_ptr, t_ptr, stats_ptr, out_ptr})) return;
  dispatch_dtype(dtype, where, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const T* s = reinterpret_cast<const T*>(s_ptr);
    const T* t = reinterpret_cast<const T*>(t_ptr);
    A* stats = reinterpret_cast<A*>(stats_ptr);
    A* out = reinterpret_cast<A*>(out_ptr);
    std::vector<A> kl(static_cast<size_t>(rows));
    const A c = A(inv_t * kLog2e<double>), inv = A(inv_t);
    const auto fwd_segment = segment_fns(tag).fwd;
    const int64_t segs = (cols + kSegment - 1) / kSegment;
    const int64_t items = rows * segs;
    const int64_t threads = choose_threads(num_threads, items, rows * cols, kMinElementsPerThread);
    if (segs == 1) {
      parallel_for(rows, threads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          kl[size_t(r)] = finish_row(fwd_segment(s + r * cols, t + r * cols, cols, c), inv, stats + r * kKdStats);
      });
    } else {
      std::vector<RowState<A>> parts(static_cast<size_t>(items));
      parallel_for(items, threads, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = i / segs, c0 = (i % segs) * kSegment;
          const int64_t off = r * cols + c0;
          parts[size_t(i)] = fwd_segment(s + off, t + off, std::min(kSegment, cols - c0), c);
        }
      });
      for (int64_t r = 0; r < rows; ++r) {  // merge each row's segments in order
        RowState<A> row = parts[size_t(r * segs)];
        for (int64_t k = 1; k < segs; ++k) merge_rows(row, parts[size_t(r * segs + k)], c);
        kl[size_t(r)] = finish_row(row, inv, stats + r * kKdStats);
      }
    }
    // The loss itself, so that the caller needs no further tensor op: rows in
    // order (deterministic), in the accumulation type (never rounded to fp16/bf16).
    const A mult = A(out_scale);
    if (reduce) {
      A sum = A(0);
      for (int64_t r = 0; r < rows; ++r) sum += kl[size_t(r)];
      out[0] = sum * mult;
    } else {
      for (int64_t r = 0; r < rows; ++r) out[r] = kl[size_t(r)] * mult;
    }
  });
}

void kd_bwd_cpu(int dtype, uintptr_t s_ptr, uintptr_t t_ptr, uintptr_t stats_ptr, uintptr_t gout_ptr,
                int64_t gout_stride, double gout_scale, uintptr_t grad_s_ptr, uintptr_t grad_t_ptr, int64_t rows,
                int64_t cols, double inv_t, int64_t num_threads) {
  const char* where = "kd_bwd_cpu";
  if (!kd_begin(where, false, rows, cols, {s_ptr, t_ptr, stats_ptr, gout_ptr, grad_s_ptr})) return;
  dispatch_dtype(dtype, where, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const T* s = reinterpret_cast<const T*>(s_ptr);
    const T* t = reinterpret_cast<const T*>(t_ptr);
    const A* stats = reinterpret_cast<const A*>(stats_ptr);
    const A* gout = reinterpret_cast<const A*>(gout_ptr);
    const A gmult = A(gout_scale);
    T* grad_s = reinterpret_cast<T*>(grad_s_ptr);
    T* grad_t = reinterpret_cast<T*>(grad_t_ptr);
    const A c = A(inv_t * kLog2e<double>), inv = A(inv_t);
    const auto bwd_segment = segment_fns(tag).bwd;
    const int64_t segs = (cols + kSegment - 1) / kSegment;
    const int64_t items = rows * segs;
    const int64_t threads = choose_threads(num_threads, items, rows * cols, kMinElementsPerThread);
    parallel_for(items, threads, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = i / segs, c0 = (i % segs) * kSegment;
        const int64_t off = r * cols + c0;
        bwd_segment(s + off, t + off, std::min(kSegment, cols - c0), stats + r * kKdStats,
                    gout[r * gout_stride] * gmult, c, inv,
                    grad_s + off, grad_t != nullptr ? grad_t + off : nullptr);
      }
    });
  });
}

}  // namespace kdk
