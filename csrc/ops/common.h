// Helpers shared by every op and both backends.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define FASTIML_HD __host__ __device__ __forceinline__
#else
#define FASTIML_HD inline
#endif

// FASTIML_HD that the host compiler must inline as well: per-element math called inside the
// CPU kernels' vectorised loops, where a call left in keeps the loop scalar. GCC's inliner
// may leave one when the calling loop grows: pivot's jeffreys_grad stayed a call at the base
// level once a prefetch was added beside it, and the backward over every pixel took 4x as
// long (tests/test_cpu_capability.py checks the built library for such calls).
#if defined(__CUDACC__)
#define FASTIML_HD_INLINE FASTIML_HD
#else
#define FASTIML_HD_INLINE inline __attribute__((always_inline))
#endif

// The namespace of every fastiml kernel symbol. The CPU kernels' avx2 / avx512 variants
// (ops/cpu/isa/*.cpp) define FASTIML_CPU_CAPABILITY and so put theirs in fastiml::<level>:
// an inline function compiled for AVX-512 never shares a name with the base build's.
#if defined(FASTIML_CPU_CAPABILITY)
#define FASTIML_NAMESPACE fastiml::inline FASTIML_CPU_CAPABILITY
#else
#define FASTIML_NAMESPACE fastiml
#endif

namespace FASTIML_NAMESPACE {

// a * b + c in one rounding where the code targets FMA (-mfma, or the avx2 / avx512 variants,
// which set FASTIML_CPU_FMA: `#pragma GCC target` does not define __FMA__ in C++), else two.
// Explicit, not compiler contraction (the build has -ffp-contract=off), so a scalar loop and a
// vectorised loop round it the same way.
FASTIML_HD float fma_acc(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#elif defined(__FMA__) || defined(FASTIML_CPU_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x) for x in [-87, 88] on the float32 accumulator, written without branches or library
// calls so that GCC vectorises the loops that call it (Cephes' expf: Cody-Waite range
// reduction and a degree-6 polynomial, about 1 ulp). The CPU path of exp_acc and
// exp_nonpositive, which clamp x into that range.
FASTIML_HD_INLINE float exp_in_range(float x) {
  // n = round(x / ln 2) without a libm call (floor() is one unless -fno-trapping-math, and a
  // call stops vectorisation): adding and subtracting 1.5 * 2^23 rounds to nearest.
  const float n = fma_acc(x, 1.44269504088896341f, 12582912.0f) - 12582912.0f;
  const float r = fma_acc(n, 2.12194440e-4f, fma_acc(n, -0.693359375f, x));
  float p = 1.9875691500e-4f;
  p = fma_acc(p, r, 1.3981999507e-3f);
  p = fma_acc(p, r, 8.3334519073e-3f);
  p = fma_acc(p, r, 4.1665795894e-2f);
  p = fma_acc(p, r, 1.6666665459e-1f);
  p = fma_acc(p, r, 5.0000001201e-1f);
  p = fma_acc(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp() on the float32 accumulator. Inputs are clamped to [-87, 88]: callers only pass x <= 0
// (a shifted log-sum-exp term) or select the result away, so the clamp never shows.
FASTIML_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  return exp_in_range(x);
#endif
}

// exp(x) for x <= 0, the same value as exp_acc there (a NaN comes out as exp(-87), so a caller
// that must keep a NaN keeps it by other terms). One clamp, written as the operand order of
// maxps so that it is one instruction: the two clamps of exp_acc compile to nine instructions,
// about a quarter of a sigmoid's.
FASTIML_HD_INLINE float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_in_range(x > -87.0f ? x : -87.0f);
#endif
}

FASTIML_HD_INLINE double exp_nonpositive(double x) { return exp(x); }

FASTIML_HD double exp_acc(double x) { return exp(x); }

FASTIML_HD_INLINE float abs_acc(float x) { return fabsf(x); }
FASTIML_HD_INLINE double abs_acc(double x) { return fabs(x); }

FASTIML_HD float log_acc(float x) { return logf(x); }
FASTIML_HD double log_acc(double x) { return log(x); }

template <typename T>
FASTIML_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

}  // namespace fastiml
