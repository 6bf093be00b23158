// pair_softplus host-side checks shared by both backends (the label/group checks and codes are
// pair_stats', ops/pair_stats_host.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "ops/pair_stats_host.h"

namespace fastiml {
namespace pair_softplus {

// A per-row statistic (lse, its gradient): [N], in the accumulation dtype of q, on q's device.
inline void check_row_statistic(const at::Tensor& t, const char* name, const at::Tensor& q,
                                const char* op) {
  const auto acc = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == q.size(0) && t.scalar_type() == acc &&
                  t.device() == q.device(),
              op, ": ", name, " must be ", acc, " [", q.size(0), "] on ", q.device(), ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

}  // namespace pair_softplus
}  // namespace fastiml
