// The body of each CPU level's variant (avx2.cpp, avx512.cpp): every CPU kernel source again,
// compiled into fastiml::<FASTIML_CPU_CAPABILITY> (ops/cpu/capability.h). One translation unit
// per level keeps the build short: ATen's headers are parsed once for all the kernels.
//
// The variant file includes std / c10 / ATen (third_party.h) *before* its `#pragma GCC target`:
// their inline functions and templates keep the base target, so an out-of-line copy the linker
// may pick for the whole library never holds an AVX instruction (they still inline into the
// kernels' loops: a base function may inline into an AVX one). Only fastiml's own code, in its
// level's namespace, is compiled for the level; tests/test_cpu_capability.py checks this on the
// built library.
#if !defined(FASTIML_CPU_CAPABILITY) || !defined(FASTIML_CPU_THIRD_PARTY_INCLUDED)
#error "include ops/cpu/isa/third_party.h, set the target and FASTIML_CPU_CAPABILITY first"
#endif

#include "ops/cpu/clip_siglip_kernel.cpp"
#include "ops/cpu/contour_kernel.cpp"
#include "ops/cpu/pair_softplus_kernel.cpp"
#include "ops/cpu/pair_stats_kernel.cpp"
#include "ops/cpu/pivot_kernel.cpp"
