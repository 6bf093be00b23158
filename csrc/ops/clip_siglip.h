// clip_lse and siglip_loss: the math shared by the CPU and CUDA kernels (DESIGN 11).
//
// Both ops read the tiles of P = Q K^T (rows q_i, columns k_j) scaled by a learned t:
//  * clip_lse: row and column log-sum-exps of S = t P in one pass; its backward recomputes each
//    tile once for G_ij = g_r[i] e^(S_ij - r_i) + g_c[j] e^(S_ij - c_j) (both directions'
//    softmax weights), dQ = t G K, dK = t G^T Q, dt = sum_ij G_ij P_ij.
//  * siglip_loss: sum over every pair of softplus(-z_ij (t P_ij + b)), z = +1 on the pairs
//    (i, i + offset), -1 elsewhere: O(1) per pair, no log-sum-exp.
#pragma once

#include "ops/common.h"

namespace FASTIML_NAMESPACE {
namespace clip_siglip {

// log(1 + e) for e in [0, 1], to a few ulp *relative* (the SigLIP negatives' terms are e ~ 1e-5
// and must keep their digits, which log(1 + e) would round away), without a library call so that
// GCC vectorises the loops calling it: 2 atanh(u), u = e / (2 + e) in [0, 1/3], as u times a
// polynomial in w = u^2 <= 1/9 (the series 1 + w/3 + w^2/5 + ...; the first term left out is
// below 1.4e-9 relative). float64 uses the library's log1p.
FASTIML_HD float log1p_unit(float e) {
  const float u = e / (2.0f + e), w = u * u;
  float p = 1.0f / 15.0f;
  p = fma_acc(p, w, 1.0f / 13.0f);
  p = fma_acc(p, w, 1.0f / 11.0f);
  p = fma_acc(p, w, 1.0f / 9.0f);
  p = fma_acc(p, w, 1.0f / 7.0f);
  p = fma_acc(p, w, 1.0f / 5.0f);
  p = fma_acc(p, w, 1.0f / 3.0f);
  p = fma_acc(p, w, 1.0f);
  return 2.0f * u * p;
}
FASTIML_HD double log1p_unit(double e) { return log1p(e); }

// One pair of SigLIP: the loss softplus(x) and dloss/dlogit = -z sigmoid(x), x = -z l, from one
// exponential of -|x| (never overflows).
template <typename T>
struct SigmoidPair {
  T loss, grad;
};

template <typename T>
FASTIML_HD SigmoidPair<T> sigmoid_pair(T logit, bool positive) {
  const T x = positive ? -logit : logit;
  const T e = exp_acc(x > T(0) ? -x : x);  // e^{-|x|} in (0, 1]
  const T inv = T(1) / (T(1) + e);
  const T sigmoid = x > T(0) ? inv : e * inv;
  return {(x > T(0) ? x : T(0)) + log1p_unit(e), positive ? -sigmoid : sigmoid};
}

}  // namespace clip_siglip
}  // namespace fastiml
