// pair_softplus host-side pieces shared by both backends: checks, the problem's tensors and the
// tile filter (the label/group checks and codes are pair_stats', ops/pair_stats_host.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <vector>

#include "ops/pair_stats_host.h"

namespace FASTIML_NAMESPACE {
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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows [start, start + len) of x in the accumulation dtype (a view when x already is).
inline at::Tensor tile_rows(const at::Tensor& x, int64_t start, int64_t len, at::ScalarType acc) {
  at::Tensor t = x.narrow(0, start, len);
  return t.scalar_type() == acc ? t : t.to(acc);
}

struct Problem {
  at::Tensor q, k;  // k is q for self-contrast
  bool self;
  int64_t n, m, d;
  double tau;
  bool exclude_self;
  at::ScalarType acc;
};

inline Problem make_problem(const at::Tensor& q, const std::optional<at::Tensor>& k, double tau,
                            bool exclude_self) {
  // Detached: the tile products are internal, and CPU worker threads do not inherit guards.
  Problem p;
  p.q = q.detach();
  p.self = !k.has_value();
  p.k = p.self ? p.q : k->detach();
  p.n = q.size(0);
  p.m = p.k.size(0);
  p.d = q.size(1);
  p.tau = tau;
  p.exclude_self = exclude_self;
  p.acc = at::toOpMathType(q.scalar_type());
  return p;
}

// Tiles of `tile` rows x `tile` columns that may hold a positive pair: their group and label
// code ranges both intersect (codes are sorted values, so SimCLR's "view 1 of i, view 2 of i"
// batches and image-major pixel sets give narrow ranges). Built from codes in host memory.
struct TileFilter {
  std::vector<pair_stats::GroupRange> row_groups, col_groups, row_labels, col_labels;
  TileFilter(const Problem& p, const pair_stats::Codes& host_codes, int64_t tile)
      : row_groups(pair_stats::tile_group_ranges(host_codes.row_group, p.n, tile)),
        col_groups(pair_stats::tile_group_ranges(host_codes.col_group, p.m, tile)),
        row_labels(pair_stats::tile_group_ranges(host_codes.row_label, p.n, tile)),
        col_labels(pair_stats::tile_group_ranges(host_codes.col_label, p.m, tile)) {}
  bool may_have_positive(int64_t r, int64_t c) const {
    return row_groups[r].meets(col_groups[c]) && row_labels[r].meets(col_labels[c]);
  }
};

}  // namespace pair_softplus
}  // namespace fastiml
