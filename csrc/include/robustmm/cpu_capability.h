// Run-time choice between the baseline x86-64 and the AVX2+FMA copies of the CPU kernels.
#pragma once

#include <cstdlib>
#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define RMM_HAS_AVX2_CLONES 1
#define RMM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define RMM_HAS_AVX2_CLONES 0
#define RMM_TARGET_AVX2
#endif

namespace robustmm {
namespace cpu {

// True when the AVX2 copies should run: the CPU has AVX2 and FMA and the environment does not
// ask for the baseline (ROBUSTMM_CPU_CAPABILITY=default). Read at each call: it is cheap next to
// a kernel, and tests switch it inside one process.
inline bool use_avx2() {
#if RMM_HAS_AVX2_CLONES
  const char* forced = std::getenv("ROBUSTMM_CPU_CAPABILITY");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return false;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline const char* capability_name() { return use_avx2() ? "avx2" : "default"; }

}  // namespace cpu
}  // namespace robustmm
