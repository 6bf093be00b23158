// clip_lse / siglip_loss host-side pieces shared by both backends: the ops' own checks (for
// callers of torch.ops.fastiml.* who bypass fastiml.ops, which raises ValueError / TypeError
// with the same content first).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "ops/common.h"

namespace FASTIML_NAMESPACE {
namespace clip_siglip {

// q [N, D] and k [M, D]: floating, one dtype, one device.
inline void check_features(const at::Tensor& q, const at::Tensor& k, const char* op) {
  TORCH_CHECK(q.dim() == 2, op, ": q must be 2-D [N, D], got ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be floating, got ",
              q.scalar_type());
  TORCH_CHECK(k.dim() == 2 && k.size(1) == q.size(1), op, ": k must be [M, ", q.size(1),
              "], got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && k.device() == q.device(), op,
              ": k must have q's dtype ", q.scalar_type(), " and device ", q.device(), ", got ",
              k.scalar_type(), " on ", k.device());
}

// A learned scalar (scale, bias): 0-dim, in q's accumulation dtype, on q's device.
inline void check_scalar(const at::Tensor& t, const char* name, const at::Tensor& q,
                         const char* op) {
  const auto acc = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == acc && t.device() == q.device(), op, ": ",
              name, " must be a 0-dim ", acc, " tensor on ", q.device(), ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// A per-row (per-column) statistic or its gradient: [len], accumulation dtype, q's device.
inline void check_vector(const at::Tensor& t, const char* name, int64_t len, const at::Tensor& q,
                         const char* op) {
  const auto acc = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len && t.scalar_type() == acc &&
                  t.device() == q.device(),
              op, ": ", name, " must be ", acc, " [", len, "] on ", q.device(), ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// clip_lse_backward's inputs.
inline void check_backward_inputs(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                  const at::Tensor& grad_diag, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& scale,
                                  const at::Tensor& row_lse, const at::Tensor& col_lse) {
  const char* op = "clip_lse_backward";
  check_features(q, k, op);
  check_scalar(scale, "scale", q, op);
  check_vector(grad_row, "grad_row", q.size(0), q, op);
  check_vector(row_lse, "row_lse", q.size(0), q, op);
  check_vector(grad_col, "grad_col", k.size(0), q, op);
  check_vector(col_lse, "col_lse", k.size(0), q, op);
  check_vector(grad_diag, "grad_diag", std::min(q.size(0), k.size(0)), q, op);
}

// siglip_loss(_backward)'s inputs; the positives (i, i + offset) must all be columns.
inline void check_siglip_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                                const at::Tensor& bias, int64_t offset, const char* op) {
  check_features(q, k, op);
  check_scalar(scale, "scale", q, op);
  check_scalar(bias, "bias", q, op);
  TORCH_CHECK(offset >= 0 && offset + q.size(0) <= k.size(0), op,
              ": offset must be in [0, M - N] = [0, ", k.size(0) - q.size(0),
              "] (row i's positive is column i + offset), got ", offset);
}

// Gradients in the input's dtype; an unrequested one as an empty tensor (the schemas return
// Tensors).
inline at::Tensor grad_or_empty(const at::Tensor& g, const at::Tensor& like) {
  return g.defined() ? g.to(like.scalar_type()) : at::empty({0}, like.options());
}

}  // namespace clip_siglip
}  // namespace fastiml
