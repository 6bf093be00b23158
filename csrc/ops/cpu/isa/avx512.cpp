// The CPU kernels for AVX-512 F/BW/VL/DQ (16 float32 lanes), chosen at run time
// (ops/cpu/capability.h). GCC keeps 256-bit vectors on AVX-512 targets unless told to prefer
// 512-bit ones.
#include "ops/cpu/capability.h"

#if FASTIML_CPU_X86_LEVELS
#include "ops/cpu/isa/third_party.h"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
#define FASTIML_CPU_CAPABILITY avx512
#define FASTIML_CPU_FMA 1
#define FASTIML_CPU_FLOAT_LANES 16  // float32 lanes of one vector
#include "ops/cpu/isa/kernels.h"
#endif
