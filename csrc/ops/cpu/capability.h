// Run-time choice of the CPU kernels' instruction set (DESIGN 12), as ATen's DispatchStub does.
//
// Each CPU kernel source is compiled once per level: as itself for `base` (x86-64 with no -m
// flag, or whatever the target's baseline is), and again inside ops/cpu/isa/avx2.cpp and
// ops/cpu/isa/avx512.cpp under a `#pragma GCC target`. In those variants FASTIML_CPU_CAPABILITY
// names the level and every fastiml symbol sits in the inline namespace fastiml::<level>, so no
// function of one level can stand in for another's at link time. The primary (base) build of
// each kernel file registers one wrapper per op that calls the level in force.
//
// The level in force starts as the best this CPU runs (cpuid, with OS support for the wide
// registers) and may be lowered at run time (set_capability: fastiml.ops applies
// ATEN_CPU_CAPABILITY and FASTIML_CPU_CAPABILITY at import). Calls read it once, atomically.
#pragma once

#include <atomic>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTIML_CPU_X86_LEVELS 1  // the avx2 / avx512 variants are built (ops/cpu/isa/*.cpp)
#else
#define FASTIML_CPU_X86_LEVELS 0
#endif

namespace fastiml {
namespace cpu {

enum class Capability : int { base = 0, avx2 = 1, avx512 = 2 };

// "default", "avx2", "avx512" (the names torch.backends.cpu uses, lower-case).
const char* capability_name(Capability level);
// The best level this CPU and this build support.
Capability best_capability();
// The level the next kernel call runs.
Capability capability();
// Sets the level in force; throws (c10::Error -> RuntimeError / ValueError in Python) when
// `name` is unknown or above best_capability().
void set_capability(const std::string& name);

// A registered op that runs the kernel of the level in force: Dispatch<F>::call<base, avx2,
// avx512> has the kernels' own signature F, so TORCH_LIBRARY_IMPL infers the same schema.
template <typename F>
struct Dispatch;

template <typename R, typename... Args>
struct Dispatch<R(Args...)> {
  using Fn = R (*)(Args...);
  template <Fn base, Fn avx2, Fn avx512>
  static R call(Args... args) {
    switch (capability()) {
      case Capability::avx512:
        return avx512(args...);
      case Capability::avx2:
        return avx2(args...);
      default:
        return base(args...);
    }
  }
};

}  // namespace cpu
}  // namespace fastiml

#if FASTIML_CPU_X86_LEVELS
// Declares the avx2 / avx512 copies of the base kernel fastiml::<ns>::<fn> (defined in
// ops/cpu/isa/*.cpp; decltype gives them the base kernel's signature).
#define FASTIML_CPU_DECLARE_LEVELS(ns, fn)                          \
  namespace fastiml::avx2::ns {                                     \
  decltype(::fastiml::ns::fn) fn;                                   \
  }                                                                 \
  namespace fastiml::avx512::ns {                                   \
  decltype(::fastiml::ns::fn) fn;                                   \
  }
// The function to register for kernel fastiml::<ns>::<fn>.
#define FASTIML_CPU_DISPATCH(ns, fn)                                                   \
  (&::fastiml::cpu::Dispatch<decltype(::fastiml::ns::fn)>::call<                       \
      &::fastiml::ns::fn, &::fastiml::avx2::ns::fn, &::fastiml::avx512::ns::fn>)
#else
#define FASTIML_CPU_DECLARE_LEVELS(ns, fn)
#define FASTIML_CPU_DISPATCH(ns, fn) (&::fastiml::ns::fn)
#endif
