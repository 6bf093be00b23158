// pair_softplus: the math shared by the CPU and CUDA kernels (DESIGN 9, NT-Xent).
//
// For row i with the negatives' log-sum-exp L_i (pair_stats with denominator "negatives"),
//   A_i = sum over positives j of softplus(L_i - s_ij),   W_i = sum over positives j of
//   sigmoid(L_i - s_ij),
// where -log(e^s / (e^s + e^L)) = softplus(L - s) is NT-Xent's term of the pair (i, j). The
// backward needs dA_i/ds_ij = -sigmoid(L_i - s_ij) and dA_i/dL_i = W_i. Positives are those of
// pair_stats (same codes, see ops/pair_stats.h). A row with no negative (L_i = -inf) has A_i = 0,
// W_i = 0.
#pragma once

#include "ops/common.h"
#include "ops/pair_stats.h"

namespace FASTIML_NAMESPACE {
namespace pair_softplus {

FASTIML_HD float log1p_acc(float x) { return log1pf(x); }
FASTIML_HD double log1p_acc(double x) { return log1p(x); }

// softplus(x) and sigmoid(x) from one exponential of -|x| (never overflows).
template <typename T>
struct SoftplusSigmoid {
  T softplus, sigmoid;
};

template <typename T>
FASTIML_HD SoftplusSigmoid<T> softplus_sigmoid(T x) {
  const T e = exp_acc(x > T(0) ? -x : x);  // e^{-|x|} in (0, 1]
  const T inv = T(1) / (T(1) + e);
  return {(x > T(0) ? x : T(0)) + log1p_acc(e), x > T(0) ? inv : e * inv};
}

// Whether row i takes part at all: not ignored and with a finite negatives' log-sum-exp.
template <typename T>
FASTIML_HD bool row_active(int32_t row_group, T lse) {
  return row_group >= 0 && lse > neg_inf<T>();
}

}  // namespace pair_softplus
}  // namespace fastiml
