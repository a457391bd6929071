// The instruction set of the CPU kernels compiled more than once (hint.cpp: AVX-512,
// AVX2 + FMA and the portable baseline; hcl.cpp: AVX2 and the baseline): the widest
// this CPU supports, or a narrower one named by $KDKERNELS_CPU_ISA (baseline, avx2,
// avx512; for tests and comparisons), read at every call.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace kdk {

enum class Isa { kBase, kAvx2, kAvx512 };

inline Isa detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

inline Isa isa() {
  static const Isa hardware = detect_isa();
  const char* env = std::getenv("KDKERNELS_CPU_ISA");
  if (env == nullptr || *env == 0) return hardware;
  const std::string name(env);
  Isa wanted;
  if (name == "baseline")
    wanted = Isa::kBase;
  else if (name == "avx2")
    wanted = Isa::kAvx2;
  else if (name == "avx512")
    wanted = Isa::kAvx512;
  else
    throw std::invalid_argument("KDKERNELS_CPU_ISA=" + name + ": expected baseline, avx2 or avx512");
  return std::min(wanted, hardware);
}

}  // namespace kdk
