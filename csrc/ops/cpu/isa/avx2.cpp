// The CPU kernels for AVX2 + FMA (8 float32 lanes), chosen at run time (ops/cpu/capability.h).
#include "ops/cpu/capability.h"

#if FASTIML_CPU_X86_LEVELS
#include "ops/cpu/isa/third_party.h"
#pragma GCC target("avx2,fma")
#define FASTIML_CPU_CAPABILITY avx2
#define FASTIML_CPU_FMA 1
#define FASTIML_CPU_FLOAT_LANES 8  // float32 lanes of one vector
#include "ops/cpu/isa/kernels.h"
#endif
