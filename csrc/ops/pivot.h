// pivot_consistency: the math shared by the CPU and CUDA kernels (DESIGN 2.3).
//
// Per pixel, the symmetric KL divergence between Bernoulli(sigmoid(a)) and
// Bernoulli(sigmoid(b)) is exactly J = (sigmoid(a) - sigmoid(b)) * (a - b): finite for any
// finite logits, no log of 0 anywhere.
#pragma once

#include "ops/common.h"
#include "ops/contour.h"

namespace FASTIML_NAMESPACE {
namespace pivot {

// sigmoid without overflow: exp is only taken of -|x|. Branch-free (a select, one division),
// so that the CPU loops over a run of pixels vectorise. A NaN x gives a finite sigmoid here;
// the callers' (a - b) factor carries it into J and its gradient.
template <typename T>
FASTIML_HD_INLINE T sigmoid(T x) {
  const bool pos = x >= T(0);
  const T e = exp_nonpositive(-abs_acc(x));
  const T r = T(1) / (T(1) + e);
  return pos ? r : e * r;
}

template <typename T>
FASTIML_HD_INLINE T jeffreys(T a, T b) {
  return (sigmoid(a) - sigmoid(b)) * (a - b);
}

// dJ/da and dJ/db.
template <typename T>
FASTIML_HD_INLINE void jeffreys_grad(T a, T b, T& da, T& db) {
  const T sa = sigmoid(a), sb = sigmoid(b), diff = sa - sb, delta = a - b;
  da = diff + delta * sa * (T(1) - sa);
  db = -diff - delta * sb * (T(1) - sb);
}

// The weight of a pixel whose patch has class `klass`.
template <typename T>
FASTIML_HD T pixel_weight(int8_t klass, T weight_contour, T weight_other) {
  if (klass == contour::kContour) return weight_contour;
  if (klass == contour::kPadding) return T(0);
  return weight_other;
}

}  // namespace pivot
}  // namespace fastiml
