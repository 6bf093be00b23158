// pair_stats: the math shared by the CPU and CUDA kernels (DESIGN 2.1).
//
// Rows q_i and columns k_j carry int32 *codes*: labels compacted to small integers and groups
// compacted to codes >= 0, where an ignored row or column (label == ignore_index) gets the group
// code kIgnored. A row with a negative group code is skipped; a column with one never matches a
// row's group, so it is never counted.
#pragma once

#include "ops/common.h"

namespace FASTIML_NAMESPACE {
namespace pair_stats {

constexpr int32_t kIgnored = -1;

// 0/1 as int32, not bool: the same width as the float lanes, so that CPU loops vectorise.
struct PairMask {
  int32_t den;  // j is in the log-sum-exp denominator of row i
  int32_t pos;  // j is a positive of row i
};

// Which sums column j joins for row i. `same_index` is (exclude_self && i == j).
FASTIML_HD PairMask pair_mask(int32_t row_label, int32_t row_group, int32_t col_label,
                              int32_t col_group, bool same_index, bool negatives_only) {
  // Bitwise, not short-circuit: no branches, so the CPU loops calling this vectorise.
  const int32_t counted = int32_t(col_group == row_group) & int32_t(!same_index);
  const int32_t same = int32_t(col_label == row_label);
  return {counted & (int32_t(!negatives_only) | (same ^ 1)), counted & same};
}

// [lo, hi] of the non-negative group codes of a tile; empty (lo > hi) for a tile with no
// counted entry. Tiles whose ranges do not meet share no pair that counts: the tile schedule
// skips their product.
struct GroupRange {
  int32_t lo = INT32_MAX, hi = -1;
  FASTIML_HD void add(int32_t group) {
    if (group < 0) return;
    lo = group < lo ? group : lo;
    hi = group > hi ? group : hi;
  }
  FASTIML_HD bool meets(const GroupRange& o) const { return lo <= o.hi && o.lo <= hi; }
};

// The tile schedule of one pass, the same on both backends: which (own tile, other tile)
// products run, grouped into work items (the CPU's chunks walk them; each CUDA block is one).
//  * a pair whose tiles' group ranges do not meet is left out: with image-major groups,
//    within-image contrast over a batch of B images costs B images' work, not B^2;
//  * upper_only (the CPU's symmetric self-mode schedule): only pairs with other >= own;
//  * splits: with fewer than min_items own tiles (CUDA: ~2 blocks per SM) each own tile's list
//    is cut into `splits` contiguous runs of near-equal length, one work item each (item
//    own * splits + split; some may be empty, so every row still gets its statistics written);
//    partial results are merged in split order 0, 1, ...: deterministic.
// The rule needs the per-tile group ranges and nothing else: the CUDA kernels run it on the
// device (no schedule list, no host round trip); the CPU materialises it (make_tile_schedule).
FASTIML_HD int64_t schedule_splits(int64_t own_tiles, int64_t other_tiles, int64_t min_items) {
  if (own_tiles == 0 || own_tiles >= min_items) return 1;
  const int64_t want = (min_items + own_tiles - 1) / own_tiles;
  // At most one run per other tile: more would only add empty items.
  const int64_t splits = want < other_tiles ? want : other_tiles;
  return splits > 1 ? splits : 1;
}

// Walks work item `item`'s other tiles in column order: the entries [len * split / splits,
// len * (split + 1) / splits) of own tile item / splits' list of meeting tiles (length len).
// O(other tiles) range tests per item, twice when split (one pass counts len).
class TileCursor {
 public:
  FASTIML_HD TileCursor(const GroupRange* own_ranges, const GroupRange* other_ranges,
                        int64_t other_tiles, int64_t item, int64_t splits, bool upper_only)
      : other_(other_ranges), other_tiles_(other_tiles) {
    const int64_t own_tile = item / splits, split = item % splits;
    own_ = own_ranges[own_tile];
    tile_ = upper_only ? own_tile : 0;
    if (splits > 1) {
      int64_t len = 0;
      for (int64_t c = tile_; c < other_tiles; ++c) len += own_.meets(other_[c]) ? 1 : 0;
      begin_ = len * split / splits;
      end_ = len * (split + 1) / splits;
    }
  }

  // The next other tile of the run into `tile`; false when the run is done.
  FASTIML_HD bool next(int64_t& tile) {
    for (; tile_ < other_tiles_ && index_ < end_; ++tile_) {
      if (!own_.meets(other_[tile_])) continue;
      if (index_++ >= begin_) {
        tile = tile_++;
        return true;
      }
    }
    return false;
  }

 private:
  const GroupRange* other_;
  int64_t other_tiles_;
  GroupRange own_;
  int64_t tile_ = 0, index_ = 0, begin_ = 0, end_ = INT64_MAX;
};

// Online log-sum-exp (FlashAttention): raise the running max m to `tile_max`, rescaling the
// running sum l so that l * exp(m) is unchanged.
template <typename T>
FASTIML_HD void lse_raise_max(T& m, T& l, T tile_max) {
  if (tile_max > m) {
    l = (m == neg_inf<T>()) ? T(0) : l * exp_acc(m - tile_max);
    m = tile_max;
  }
}

// Merges the partial state (m2, l2) into (m, l).
template <typename T>
FASTIML_HD void lse_merge(T& m, T& l, T m2, T l2) {
  if (l2 == T(0)) return;
  if (l == T(0)) {
    m = m2;
    l = l2;
    return;
  }
  const T mx = m > m2 ? m : m2;
  l = l * exp_acc(m - mx) + l2 * exp_acc(m2 - mx);
  m = mx;
}

// log(l * exp(m)); an empty denominator (l == 0) gives -inf.
template <typename T>
FASTIML_HD T lse_finish(T m, T l) {
  return l > T(0) ? m + log_acc(l) : neg_inf<T>();
}

// A fixed shift may replace the running max when every similarity lies in [-bound, bound]
// (bound = max|q| max|k| / tau): then exp(s - bound) >= exp(-2 bound) stays a normal float32
// for 2 bound <= kMaxFixedShiftSpan (normalised rows and tau >= 0.025).
constexpr double kMaxFixedShiftSpan = 80.0;

// Per-row factors of the backward: G_ij = a_i exp(s_ij - lse_i) [j in den] + b_i [j positive],
// with a_i = dL/dlse_i and b_i = (dL/dpos_mean_i) / pos_count_i. Rows with an empty denominator
// or no positive contribute nothing (and must not turn -inf or 0 into NaN).
template <typename T>
struct RowGrad {
  T a, b, lse;
};

template <typename T>
FASTIML_HD RowGrad<T> row_grad(T grad_lse, T lse, T grad_pos_mean, int64_t pos_count) {
  const bool finite = lse > neg_inf<T>();
  return {finite ? grad_lse : T(0), pos_count > 0 ? grad_pos_mean / T(pos_count) : T(0),
          finite ? lse : T(0)};
}

// dL/ds_ij for one (row, column) pair.
template <typename T>
FASTIML_HD T pair_grad(T s, const RowGrad<T>& row, PairMask mask) {
  // The exp argument is selected before the call: a non-denominator entry may exceed lse.
  const T e = exp_acc(mask.den ? s - row.lse : T(-87));
  return (mask.den ? row.a * e : T(0)) + (mask.pos ? row.b : T(0));
}

// Range scales of the 16-bit G tiles on tensor cores (CUDA): G is multiplied by a power of two
// 2^e before its rounding to float16 / bfloat16, and the product's float32 accumulator is
// multiplied by 2^-e after (exact: powers of two).
//
// gradient_exponent(bound): e with bound * 2^e < 2^15, bound >= every |G_ij| it covers, so the
// largest entry keeps float16's 11 bits and cannot overflow (65504 < 2^16); 0 when the bound is
// 0 or not finite (nothing needs, or can get, scaling); at most 126 (2^e stays a normal float).
constexpr int kMaxGradientExponent = 126;
FASTIML_HD int gradient_exponent(float bound) {
  if (!(bound > 0.0f) || !(bound <= 3.402823466e38f)) return 0;
  int e;
  frexpf(bound, &e);  // bound = f 2^e, f in [0.5, 1)
  return 15 - e < kMaxGradientExponent ? 15 - e : kMaxGradientExponent;
}

// The dk pass sums G^T Q over row tiles in one float32 accumulator, so one exponent covers it
// at a time: each row tile takes its own (the gradient_exponent of its rows' largest |G|), and
// the accumulator is multiplied by 2^(e_new - e_old) before the tile is added (FlashAttention's
// rescale; exact). Capped so that the sums already accumulated stay below 2^kMaxSumExponent in
// scaled units: a tile of small gradients after large ones would otherwise raise the scale by
// up to 2^126 and push them past float32's range. `bound` bounds the true (unscaled) sums: a
// tile of `rows` rows adds at most rows * tile_max * x_max per element (x_max = max |Q_ij|).
constexpr int kMaxSumExponent = 120;
struct TileRangeScale {
  int exponent = 0;    // the accumulator holds the true sums times 2^exponent
  float bound = 0.0f;  // bound of the true sums so far

  // The exponent for the next row tile, whose |G| entries are at most tile_max. A tile with
  // nothing to scale (all zero, or not finite) keeps the current exponent.
  FASTIML_HD int next(float tile_max, float x_max, int rows) {
    if (!(tile_max > 0.0f) || !(tile_max <= 3.402823466e38f)) return exponent;
    bound += static_cast<float>(rows) * tile_max * x_max;
    int bound_exp = 128;  // an infinite (or NaN) bound: as if 2^128
    if (bound <= 3.402823466e38f) frexpf(bound, &bound_exp);  // bound < 2^bound_exp (0: 0)
    const int want = gradient_exponent(tile_max), cap = kMaxSumExponent - bound_exp;
    exponent = want < cap ? want : cap;
    return exponent;
  }
};

}  // namespace pair_stats
}  // namespace fastiml
