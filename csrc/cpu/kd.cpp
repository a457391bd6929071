// Hinton KD on CPU (SPEC section 4; the streaming state and formulas are in common/kd.h).
//
// A row is cut into fixed segments of kSegment classes (the cut depends on the
// row length only); a work item is one (row, segment). Threads take contiguous
// ranges of items, so rows of 1000 classes spread over threads as whole rows
// and a single row of 128k classes still spreads over 16 items.
//
// Forward, per segment, one read of both inputs: blocks of kBlock classes are
// scaled by 1/T into a small buffer, the block maxima (integer-key reductions,
// see OrderKey) update the running maxima (rescaling the sums when they grow:
// rare after the first blocks), then
// kLanes independent lanes accumulate exp(a_s), exp(a_t) and exp(a_t)(a_t - a_s).
// Lanes share the maxima, so they add up at the end in a fixed tree; a row's
// segments merge in order. Nothing depends on the thread count: deterministic.
//
// Backward, given the per-row stats, is elementwise (two exps per class).
//
// The exps run through exp_neg below (a branch-free polynomial, accurate to a
// few ulp, for the arguments <= 0 that the kernel produces) so that the loops
// vectorise; on x86-64 the hot functions are also compiled for AVX2+FMA and
// AVX-512, and the first call picks what the CPU supports.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/dtype.h"
#include "../common/kd.h"
#include "../common/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define KDK_KD_X86 1
#define KDK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KDK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#else
#define KDK_KD_X86 0
#endif
#if defined(__GNUC__)
#define KDK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define KDK_ALWAYS_INLINE inline
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

// exp(x) for x <= 0, -inf (-> 0) and NaN (-> NaN), without branches.
// x = k ln2 + r with k = round(x log2 e) and |r| <= ln2 / 2; ln2 is split in a
// 16-bit head (k * head is exact) and the rest; e^r by its Taylor series to r^7
// (truncation < 6e-9 relative); 2^k built in the exponent field. Below x = -87
// (e^-87 is about 1.6e-38, near the smallest normal float) the bits are garbage
// and the final mask returns 0 instead; there is deliberately no clamp of x
// before that, since a second comparison keeps GCC from vectorising the loop.
KDK_ALWAYS_INLINE float exp_neg(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Head = 0.693145751953125f;  // 45426 / 2^16
  constexpr float kLn2Tail = 1.42860682030941723e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLow = -87.0f;
  const float t = x * kLog2e + kRound;
  const float k = t - kRound;
  const int32_t ki = int32_t(f2u(t) - f2u(kRound));  // the integer k, from t's mantissa
  const float r = (x - k * kLn2Head) - k * kLn2Tail;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = u2f(uint32_t(ki + 127) << 23);
  return keep_if(!(x < kLow), p * scale);
}

template <typename A> struct KdMath;
template <> struct KdMath<float> {
  static KDK_ALWAYS_INLINE float exp(float x) { return exp_neg(x); }
};
template <> struct KdMath<double> {
  static KDK_ALWAYS_INLINE double exp(double x) { return std::exp(x); }
};

struct StdExp {
  template <typename A> A operator()(A x) const { return std::exp(x); }
};
struct StdLog {
  template <typename A> A operator()(A x) const { return std::log(x); }
};

template <typename A>
KDK_ALWAYS_INLINE A lane_sum(const A* v) {  // fixed tree over kLanes = 16
  A h[8];
  for (int l = 0; l < 8; ++l) h[l] = v[l] + v[l + 8];
  return ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]));
}

// The state of classes [0, n) of one row segment (see the top of the file).
template <typename T>
KDK_ALWAYS_INLINE KdState<acc_t<T>> fwd_segment_impl(const T* __restrict s, const T* __restrict t, int64_t n,
                                                     acc_t<T> inv_t) {
  using A = acc_t<T>;
  using M = KdMath<A>;
  alignas(64) A zs[kBlock], zt[kBlock];
  alignas(64) A ss[kLanes] = {}, st[kLanes] = {}, w[kLanes] = {};
  A ms = kd_neg_inf<A>(), mt = kd_neg_inf<A>();
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - i0);
    if (nb == kBlock) {
      for (int64_t j = 0; j < kBlock; ++j) zs[j] = Scalar<T>::load(s[i0 + j]) * inv_t;
      for (int64_t j = 0; j < kBlock; ++j) zt[j] = Scalar<T>::load(t[i0 + j]) * inv_t;
    } else {  // the last, partial block: pad with -inf (adds exp(-inf) = 0, gap 0)
      for (int64_t j = 0; j < nb; ++j) zs[j] = Scalar<T>::load(s[i0 + j]) * inv_t;
      for (int64_t j = 0; j < nb; ++j) zt[j] = Scalar<T>::load(t[i0 + j]) * inv_t;
      for (int64_t j = nb; j < kBlock; ++j) zs[j] = zt[j] = kd_neg_inf<A>();
    }
    using K = OrderKey<A>;
    using Key = typename K::type;
    Key ks = K::key(zs[0]), kt = K::key(zt[0]);
    for (int64_t j = 1; j < kBlock; ++j) {  // integer max reductions: they vectorise
      const Key a = K::key(zs[j]), b = K::key(zt[j]);
      ks = a > ks ? a : ks;
      kt = b > kt ? b : kt;
    }
    const A ms_new = kd_max(ms, K::value(ks)), mt_new = kd_max(mt, K::value(kt));
    if (ms_new != ms || mt_new != mt) {  // the maxima grew: rescale every lane
      const A as = kd_alpha(ms, ms_new, StdExp{}), at = kd_alpha(mt, mt_new, StdExp{});
      const A dc = kd_shift(ms, mt, ms_new, mt_new);
      for (int64_t l = 0; l < kLanes; ++l) {
        w[l] = st[l] == A(0) ? A(0) : at * (w[l] - dc * st[l]);
        ss[l] *= as;
        st[l] *= at;
      }
      ms = ms_new;
      mt = mt_new;
    }
    const A es = kd_eff(ms), et = kd_eff(mt);
    for (int64_t j = 0; j < kBlock; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const A a_s = zs[j + l] - es, a_t = zt[j + l] - et;
        const A e_s = M::exp(a_s), e_t = M::exp(a_t);
        ss[l] += e_s;
        st[l] += e_t;
        w[l] += e_t * keep_if(e_t > A(0), a_t - a_s);  // kd_gap
      }
  }
  return KdState<A>{ms, mt, lane_sum(ss), lane_sum(st), lane_sum(w)};
}

// grad_s (and grad_t when GT) of classes [0, n) of one row, from its stats.
template <typename T, bool GT>
KDK_ALWAYS_INLINE void bwd_segment_impl(const T* __restrict s, const T* __restrict t, int64_t n,
                                        const acc_t<T>* __restrict stats, acc_t<T> g, acc_t<T> inv_t,
                                        T* __restrict grad_s, T* __restrict grad_t) {
  using A = acc_t<T>;
  using M = KdMath<A>;
  const A ms = stats[0], ls = stats[1], mt = stats[2], lt = stats[3], ec = stats[4];
  for (int64_t i = 0; i < n; ++i) {
    const A a_s = Scalar<T>::load(s[i]) * inv_t - ms;
    const A a_t = Scalar<T>::load(t[i]) * inv_t - mt;
    const A p_s = M::exp(a_s - ls), p_t = M::exp(a_t - lt);
    grad_s[i] = Scalar<T>::store(g * (p_s - p_t));
    if (GT) grad_t[i] = Scalar<T>::store(g * p_t * (keep_if(p_t > A(0), a_t - a_s) - ec));  // kd_gap
  }
}

// Non-template entry points of the hot loops, per storage type and, on x86-64,
// per instruction set: the baseline build is SSE2 only (the wheel must run on
// any x86-64), so AVX2+FMA and AVX-512 copies are compiled beside it and one is
// chosen once, at run time, from what the CPU supports.
template <typename T>
struct SegmentFns {
  using A = acc_t<T>;
  KdState<A> (*fwd)(const T* s, const T* t, int64_t n, A inv_t);
  void (*bwd)(const T* s, const T* t, int64_t n, const A* stats, A g, A inv_t, T* grad_s, T* grad_t);
};

#define KDK_KD_DEFINE(T, NAME, ATTR)                                                                          \
  ATTR KdState<acc_t<T>> fwd_##NAME(const T* s, const T* t, int64_t n, acc_t<T> inv_t) {                    \
    return fwd_segment_impl<T>(s, t, n, inv_t);                                                             \
  }                                                                                                         \
  ATTR void bwd_##NAME(const T* s, const T* t, int64_t n, const acc_t<T>* stats, acc_t<T> g, acc_t<T> inv_t, \
                       T* grad_s, T* grad_t) {                                                              \
    if (grad_t != nullptr)                                                                                  \
      bwd_segment_impl<T, true>(s, t, n, stats, g, inv_t, grad_s, grad_t);                                 \
    else                                                                                                    \
      bwd_segment_impl<T, false>(s, t, n, stats, g, inv_t, grad_s, nullptr);                               \
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
    T* out = reinterpret_cast<T*>(out_ptr);
    std::vector<A> kl(static_cast<size_t>(rows));
    const A scale = A(inv_t);
    const auto fwd_segment = segment_fns(tag).fwd;
    const int64_t segs = (cols + kSegment - 1) / kSegment;
    const int64_t items = rows * segs;
    const int64_t threads = choose_threads(num_threads, items, rows * cols, kMinElementsPerThread);
    if (segs == 1) {
      parallel_for(rows, threads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          kl[size_t(r)] = fwd_segment(s + r * cols, t + r * cols, cols, scale).finish(stats + r * kKdStats, StdLog{});
      });
    } else {
      std::vector<KdState<A>> parts(static_cast<size_t>(items));
      parallel_for(items, threads, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = i / segs, c0 = (i % segs) * kSegment;
          const int64_t off = r * cols + c0;
          parts[size_t(i)] = fwd_segment(s + off, t + off, std::min(kSegment, cols - c0), scale);
        }
      });
      for (int64_t r = 0; r < rows; ++r) {  // merge each row's segments in order
        KdState<A> row = parts[size_t(r * segs)];
        for (int64_t k = 1; k < segs; ++k) row.merge(parts[size_t(r * segs + k)], StdExp{});
        kl[size_t(r)] = row.finish(stats + r * kKdStats, StdLog{});
      }
    }
    // The loss itself, so that the caller needs no further tensor op: rows in
    // order (deterministic), rounded once to the logits' dtype.
    const A mult = A(out_scale);
    if (reduce) {
      A sum = A(0);
      for (int64_t r = 0; r < rows; ++r) sum += kl[size_t(r)];
      out[0] = Scalar<T>::store(sum * mult);
    } else {
      for (int64_t r = 0; r < rows; ++r) out[r] = Scalar<T>::store(kl[size_t(r)] * mult);
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
    const T* gout = reinterpret_cast<const T*>(gout_ptr);
    const A gmult = A(gout_scale);
    T* grad_s = reinterpret_cast<T*>(grad_s_ptr);
    T* grad_t = reinterpret_cast<T*>(grad_t_ptr);
    const A scale = A(inv_t);
    const auto bwd_segment = segment_fns(tag).bwd;
    const int64_t segs = (cols + kSegment - 1) / kSegment;
    const int64_t items = rows * segs;
    const int64_t threads = choose_threads(num_threads, items, rows * cols, kMinElementsPerThread);
    parallel_for(items, threads, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = i / segs, c0 = (i % segs) * kSegment;
        const int64_t off = r * cols + c0;
        bwd_segment(s + off, t + off, std::min(kSegment, cols - c0), stats + r * kKdStats,
                    Scalar<T>::load(gout[r * gout_stride]) * gmult, scale,
                    grad_s + off, grad_t != nullptr ? grad_t + off : nullptr);
      }
    });
  });
}

}  // namespace kdk
