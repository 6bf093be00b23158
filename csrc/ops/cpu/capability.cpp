// The CPU level in force (ops/cpu/capability.h): detected once when the library loads.
#include "ops/cpu/capability.h"

#include <c10/util/Exception.h>

namespace fastiml {
namespace cpu {
namespace {

Capability detect() {
#if FASTIML_CPU_X86_LEVELS
  // libgcc's cpuid checks include the OS's support for the registers (XCR0), not only the CPU's.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  return avx512 ? Capability::avx512 : avx2 ? Capability::avx2 : Capability::base;
#else
  return Capability::base;
#endif
}

const Capability kBest = detect();
std::atomic<int> g_level{static_cast<int>(kBest)};

}  // namespace

const char* capability_name(Capability level) {
  switch (level) {
    case Capability::avx512:
      return "avx512";
    case Capability::avx2:
      return "avx2";
    default:
      return "default";
  }
}

Capability best_capability() { return kBest; }

Capability capability() { return static_cast<Capability>(g_level.load(std::memory_order_relaxed)); }

void set_capability(const std::string& name) {
  int level = -1;
  for (int l = 0; l <= static_cast<int>(Capability::avx512); ++l)
    if (name == capability_name(static_cast<Capability>(l))) level = l;
  TORCH_CHECK_VALUE(level >= 0, "CPU capability must be one of 'default', 'avx2', 'avx512', got '",
                    name, "'");
  TORCH_CHECK_VALUE(level <= static_cast<int>(kBest), "CPU capability '", name,
                    "' is not supported here: this CPU (and build) runs at most '",
                    capability_name(kBest), "'");
  g_level.store(level, std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace fastiml
