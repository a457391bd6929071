// Storage dtypes of the entry points, their accumulation types, and bit-exact
// fp16 / bf16 conversions (round to nearest even on store, NaN stays NaN).
//
// The dtype codes are the ones Python passes: 0 = float32, 1 = float64,
// 2 = float16, 3 = bfloat16. float32, float16 and bfloat16 accumulate in
// float; float64 accumulates in double.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "macros.h"

namespace kdk {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// 16-bit storage types; only ever converted through the functions below.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

KDK_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

KDK_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// IEEE binary16 -> binary32, exact for every input (subnormals included).
KDK_HD float half_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;          // half exponent field, moved to float position
  uint32_t o = (uint32_t(h) & 0x7fffu) << 13;           // exponent + mantissa
  const uint32_t exp = o & shifted_exp;
  o += (127u - 15u) << 23;                              // rebias the exponent
  if (exp == shifted_exp) {                             // Inf / NaN: exponent all ones
    o += (128u - 16u) << 23;
  } else if (exp == 0) {                                // zero / subnormal: renormalise exactly
    o += 1u << 23;
    o = float_as_bits(bits_as_float(o) - bits_as_float(113u << 23));
  }
  return bits_as_float(o | ((uint32_t(h) & 0x8000u) << 16));
}

// binary32 -> binary16, round to nearest even; overflow -> Inf, NaN -> quiet NaN (sign kept).
KDK_HD uint16_t float_to_half(float f) {
  const uint32_t f32_inf = 255u << 23;
  const uint32_t f16_overflow = (127u + 16u) << 23;     // 2^16: everything at or above is Inf/NaN
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = float_as_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= f16_overflow) {
    o = u > f32_inf ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {
    // Result is subnormal or zero: adding 0.5 aligns the 10 mantissa bits at
    // the bottom of the float, and the float add rounds to nearest even.
    o = float_as_bits(bits_as_float(u) + bits_as_float(denorm_magic)) - denorm_magic;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += ((15u - 127u) << 23) + 0xfffu + mant_odd;      // rebias + round half to even
    o = u >> 13;                                        // a carry may round up to Inf: correct
  }
  return uint16_t(o | (sign >> 16));
}

KDK_HD float bf16_to_float(uint16_t b) { return bits_as_float(uint32_t(b) << 16); }

KDK_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // quiet NaN, sign kept
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Load/store of one storage element in its accumulation type.
template <typename T> struct Scalar;

template <> struct Scalar<float> {
  using acc = float;
  static KDK_HD float load(float x) { return x; }
  static KDK_HD float store(float a) { return a; }
};

template <> struct Scalar<double> {
  using acc = double;
  static KDK_HD double load(double x) { return x; }
  static KDK_HD double store(double a) { return a; }
};

template <> struct Scalar<Half> {
  using acc = float;
  static KDK_HD float load(Half x) { return half_to_float(x.bits); }
  static KDK_HD Half store(float a) { return Half{float_to_half(a)}; }
};

template <> struct Scalar<BFloat16> {
  using acc = float;
  static KDK_HD float load(BFloat16 x) { return bf16_to_float(x.bits); }
  static KDK_HD BFloat16 store(float a) { return BFloat16{float_to_bf16(a)}; }
};

template <typename T> using acc_t = typename Scalar<T>::acc;

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) for the storage type of dtype code `dtype`.
template <typename F>
decltype(auto) dispatch_dtype(int dtype, const char* where, F&& f) {
  switch (dtype) {
    case kFloat32: return f(TypeTag<float>{});
    case kFloat64: return f(TypeTag<double>{});
    case kFloat16: return f(TypeTag<Half>{});
    case kBFloat16: return f(TypeTag<BFloat16>{});
    default:
      throw std::invalid_argument(std::string(where) + ": unknown dtype code " + std::to_string(dtype) +
                                  " (expected 0=float32, 1=float64, 2=float16, 3=bfloat16)");
  }
}

}  // namespace kdk
