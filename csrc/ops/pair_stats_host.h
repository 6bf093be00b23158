// pair_stats host-side helpers used by both backends: argument checks and the compaction of
// labels and groups to the int32 codes of ops/pair_stats.h.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "ops/pair_stats.h"

namespace FASTIML_NAMESPACE {
namespace pair_stats {

// The op's own checks, for callers of torch.ops.fastiml.* who bypass fastiml.ops (which raises
// ValueError/TypeError with the same content first).
inline void check_pair_stats_inputs(const at::Tensor& q, const std::optional<at::Tensor>& k,
                                    const at::Tensor& q_label,
                                    const std::optional<at::Tensor>& k_label,
                                    const std::optional<at::Tensor>& q_group,
                                    const std::optional<at::Tensor>& k_group, double tau,
                                    bool exclude_self) {
  TORCH_CHECK(q.dim() == 2, "pair_stats: q must be 2-D [N, D], got ", q.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "pair_stats: q must be floating, got ",
              q.scalar_type());
  TORCH_CHECK(tau > 0, "pair_stats: tau must be > 0, got ", tau);
  TORCH_CHECK(q_label.dim() == 1 && q_label.size(0) == q.size(0) &&
                  q_label.scalar_type() == at::kLong,
              "pair_stats: q_label must be int64 [", q.size(0), "], got ", q_label.scalar_type(),
              " ", q_label.sizes());
  TORCH_CHECK(q_label.device() == q.device(), "pair_stats: q_label must be on ", q.device());
  TORCH_CHECK(k.has_value() == k_label.has_value(),
              "pair_stats: k and k_label must both be given, or both None (self-contrast)");
  TORCH_CHECK(!q_group.has_value() || q_group->sizes() == q_label.sizes(),
              "pair_stats: q_group must be int64 [", q.size(0), "]");
  int64_t m = q.size(0);
  if (k.has_value()) {
    TORCH_CHECK(k->dim() == 2 && k->size(1) == q.size(1), "pair_stats: k must be [M, ",
                q.size(1), "], got ", k->sizes());
    TORCH_CHECK(k->scalar_type() == q.scalar_type() && k->device() == q.device(),
                "pair_stats: k must have q's dtype and device");
    m = k->size(0);
    TORCH_CHECK(k_label->dim() == 1 && k_label->size(0) == m &&
                    k_label->scalar_type() == at::kLong && k_label->device() == q.device(),
                "pair_stats: k_label must be int64 [", m, "] on ", q.device());
    TORCH_CHECK(q_group.has_value() == k_group.has_value(),
                "pair_stats: q_group and k_group must both be given or both None");
    TORCH_CHECK(!k_group.has_value() || k_group->sizes() == k_label->sizes(),
                "pair_stats: k_group must be int64 [", m, "]");
  } else {
    TORCH_CHECK(!k_group.has_value(), "pair_stats: k_group given without k");
  }
  for (const auto* g : {&q_group, &k_group}) {
    TORCH_CHECK(!g->has_value() || ((*g)->scalar_type() == at::kLong &&
                                    (*g)->device() == q.device()),
                "pair_stats: groups must be int64 on ", q.device());
  }
  TORCH_CHECK(!exclude_self || m == q.size(0),
              "pair_stats: exclude_self needs q and k of equal length, got ", q.size(0), " and ",
              m);
}

inline void check_pair_stats_grads(const at::Tensor& grad_lse, const at::Tensor& grad_pos_mean,
                                   const at::Tensor& lse, const at::Tensor& pos_count, int64_t n) {
  for (const auto* t : {&grad_lse, &grad_pos_mean, &lse, &pos_count})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n,
                "pair_stats_backward: statistics and their gradients must be [", n, "]");
  TORCH_CHECK(pos_count.scalar_type() == at::kLong, "pair_stats_backward: pos_count must be int64");
}

// Raw pointers to the codes, as the tile epilogues take them.
struct Codes {
  const int32_t* row_label;
  const int32_t* row_group;
  const int32_t* col_label;
  const int32_t* col_group;
};

struct CodeTensors {
  at::Tensor row_label, row_group, col_label, col_group;  // int32, contiguous
  Codes view() const {
    return {row_label.data_ptr<int32_t>(), row_group.data_ptr<int32_t>(),
            col_label.data_ptr<int32_t>(), col_group.data_ptr<int32_t>()};
  }
};

// Labels and groups compacted to int32 codes (any int64 values allowed); ignored entries get the
// group code kIgnored. Without k (self-contrast) the column codes are the row codes.
inline CodeTensors make_codes(const at::Tensor& q_label, const std::optional<at::Tensor>& k_label,
                              const std::optional<at::Tensor>& q_group,
                              const std::optional<at::Tensor>& k_group, int64_t ignore_index) {
  const int64_t n = q_label.size(0);
  const bool self = !k_label.has_value();
  const at::Tensor labels = self ? q_label : at::cat({q_label, *k_label});
  // Sorted codes keep the order of the values: rows sorted by group (image-major pixel sets)
  // give tiles with narrow code ranges, which the kernels use to skip cross-group tiles. The
  // codes are the ranks of the distinct values (at::_unique2's inverse) from a sort, a mark
  // where the sorted value changes and a running count: unlike unique, nothing here waits for
  // the GPU (it needs no count of distinct values on the host).
  const auto compact = [](const at::Tensor& values) {
    const int64_t count = values.numel();
    if (count == 0) return values.to(at::kInt);
    const auto [sorted, order] = values.sort();
    at::Tensor changes = at::ones({count}, values.options().dtype(at::kInt));
    if (count > 1)
      changes.narrow(0, 1, count - 1)
          .copy_(sorted.narrow(0, 1, count - 1) != sorted.narrow(0, 0, count - 1));
    const at::Tensor ranks = changes.cumsum(0, at::kInt).sub_(1);
    return at::empty_like(ranks).scatter_(0, order, ranks);
  };
  at::Tensor label_codes = compact(labels);
  at::Tensor group_codes;
  if (q_group.has_value())
    group_codes = compact(self ? *q_group : at::cat({*q_group, *k_group}));
  else
    group_codes = at::zeros_like(label_codes);
  group_codes.masked_fill_(labels == ignore_index, kIgnored);
  CodeTensors c;
  c.row_label = label_codes.narrow(0, 0, n).contiguous();
  c.row_group = group_codes.narrow(0, 0, n).contiguous();
  c.col_label = self ? c.row_label : label_codes.narrow(0, n, labels.size(0) - n).contiguous();
  c.col_group = self ? c.row_group : group_codes.narrow(0, n, labels.size(0) - n).contiguous();
  return c;
}

// Column index of row i inside the tile starting at c0 (bc columns) when exclude_self leaves
// the pair (i, i) out, else -1. int32, as the tile loops' column index: a 64-bit compare would
// cost the CPU's vectorised loops a lane repacking per vector.
inline int32_t self_column(bool exclude_self, int64_t i, int64_t c0, int64_t bc) {
  return (exclude_self && i >= c0 && i < c0 + bc) ? int32_t(i - c0) : -1;
}

// The GroupRange (ops/pair_stats.h) of each tile of `tile` entries.
inline std::vector<GroupRange> tile_group_ranges(const int32_t* groups, int64_t n, int64_t tile) {
  std::vector<GroupRange> ranges((n + tile - 1) / tile);
  for (int64_t i = 0; i < n; ++i) ranges[i / tile].add(groups[i]);
  return ranges;
}

// The tile schedule of ops/pair_stats.h (schedule_splits, TileCursor) as lists, for the CPU
// kernel and the pair_stats_tile_schedule op; the CUDA kernels walk it on the device instead.
struct TileSchedule {
  int64_t own_tiles = 0;
  int64_t splits = 1;
  std::vector<int64_t> begin;   // [items + 1]: item w's pairs are [begin[w], begin[w + 1])
  std::vector<int32_t> others;  // other tile of each pair, item by item
  std::vector<int32_t> owner;   // own tile of each pair (for the CPU chunks)

  int64_t items() const { return own_tiles * splits; }
  int64_t pairs() const { return static_cast<int64_t>(others.size()); }
};

inline TileSchedule make_tile_schedule(const std::vector<GroupRange>& own_ranges,
                                       const std::vector<GroupRange>& other_ranges,
                                       bool upper_only, int64_t min_items) {
  TileSchedule s;
  s.own_tiles = static_cast<int64_t>(own_ranges.size());
  const int64_t other_tiles = static_cast<int64_t>(other_ranges.size());
  s.splits = schedule_splits(s.own_tiles, other_tiles, min_items);
  s.begin.reserve(s.items() + 1);
  s.begin.push_back(0);
  for (int64_t item = 0; item < s.items(); ++item) {
    TileCursor cursor(own_ranges.data(), other_ranges.data(), other_tiles, item, s.splits,
                      upper_only);
    for (int64_t tile; cursor.next(tile);) {
      s.others.push_back(static_cast<int32_t>(tile));
      s.owner.push_back(static_cast<int32_t>(item / s.splits));
    }
    s.begin.push_back(s.pairs());
  }
  return s;
}

// The CUDA kernels' tile test hook, never set in normal use: the environment variable
// FASTIML_CUDA_FORCE_TILES, read at every call (so a test can switch it within one process).
//   unset or ""  the device's own rule (min_items_for_device in ops/cuda/pair_stats_kernel.cu);
//   "multi"      every block walks several tiles at any N: pair_stats' schedule gets
//                min_items = 1 (no split: each block walks its own tile's whole list, so the
//                running log-sum-exp across tiles, the backward accumulator summed over tiles,
//                the dk pass's rescale between row tiles and the unsplit write path run at the
//                sizes of `fastiml selftest`), and pair_softplus tiles of 64 instead of 1024;
//   "single"     every pair_stats work item holds at most one tile pair (the largest split: the
//                partial buffers and merge kernels at their extreme); pair_softplus unchanged.
// Any other value is an error naming the variable.
enum class ForcedTiles { kDevice, kMulti, kSingle };
constexpr const char* kForceTilesEnv = "FASTIML_CUDA_FORCE_TILES";

inline ForcedTiles forced_tiles() {
  const char* value = std::getenv(kForceTilesEnv);
  if (value == nullptr || *value == '\0') return ForcedTiles::kDevice;
  const std::string v(value);
  if (v == "multi") return ForcedTiles::kMulti;
  TORCH_CHECK(v == "single", kForceTilesEnv, " must be 'multi', 'single' or unset, got '", v,
              "'");
  return ForcedTiles::kSingle;
}

// min_items under the hook: 1 for "multi"; for "single" more items than there are other tiles
// (schedule_splits then gives one run per other tile: runs of at most one), int32-sized so
// that its sums cannot overflow.
inline int64_t forced_min_items(int64_t min_items) {
  switch (forced_tiles()) {
    case ForcedTiles::kMulti: return 1;
    case ForcedTiles::kSingle: return std::numeric_limits<int32_t>::max();
    default: return min_items;
  }
}

// The op pair_stats_tile_schedule (both backends register it): make_tile_schedule as int64 CPU
// tensors, with min_items under the CUDA test hook (forced_min_items), as the CUDA kernels
// walk it -- so that the suite can replay the hooked schedule without a GPU. The group codes
// are read on the host (a copy from the GPU).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_schedule_op(
    const at::Tensor& own_group, const at::Tensor& other_group, int64_t tile, bool upper_only,
    int64_t min_items) {
  TORCH_CHECK(own_group.dim() == 1 && other_group.dim() == 1 &&
                  !at::isFloatingType(own_group.scalar_type()) &&
                  !at::isFloatingType(other_group.scalar_type()),
              "pair_stats_tile_schedule: own_group and other_group must be 1-D integer tensors");
  TORCH_CHECK(tile > 0, "pair_stats_tile_schedule: tile must be > 0, got ", tile);
  const at::Tensor own = own_group.to(at::kCPU, at::kInt).contiguous();
  const at::Tensor other = other_group.to(at::kCPU, at::kInt).contiguous();
  const TileSchedule s = make_tile_schedule(
      tile_group_ranges(own.data_ptr<int32_t>(), own.numel(), tile),
      tile_group_ranges(other.data_ptr<int32_t>(), other.numel(), tile), upper_only,
      forced_min_items(min_items));
  const auto as_tensor = [](const auto& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
    std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
    return t;
  };
  return {as_tensor(s.begin), as_tensor(s.others), as_tensor(s.owner)};
}

// The op pair_stats_range_exponents (both backends register it; for tests): the exponents
// TileRangeScale gives a sequence of row tiles whose largest |G| entries are tile_max, as an
// int64 CPU tensor (the rule runs on the host, as tile_schedule_op does).
inline at::Tensor range_exponents_op(const at::Tensor& tile_max, double x_max, int64_t rows) {
  TORCH_CHECK(tile_max.dim() == 1 && tile_max.scalar_type() == at::kFloat,
              "pair_stats_range_exponents: tile_max must be a 1-D float32 tensor, got ",
              tile_max.scalar_type(), " of shape ", tile_max.sizes());
  TORCH_CHECK(rows > 0, "pair_stats_range_exponents: rows must be > 0, got ", rows);
  const at::Tensor in = tile_max.cpu().contiguous();
  at::Tensor out = at::empty({in.numel()}, at::kLong);
  TileRangeScale scale;
  for (int64_t t = 0; t < in.numel(); ++t)
    out.data_ptr<int64_t>()[t] = scale.next(in.const_data_ptr<float>()[t],
                                            static_cast<float>(x_max), static_cast<int>(rows));
  return out;
}

// max_i |x_i| (plus 1% for the rounding of half-precision norms); 0 for no rows.
inline double max_row_norm(const at::Tensor& x) {
  if (x.size(0) == 0) return 0.0;
  return at::linalg_vector_norm(x, 2, {1}).max().item<double>() * 1.01;
}

}  // namespace pair_stats
}  // namespace fastiml
