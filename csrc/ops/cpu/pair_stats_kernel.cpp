// pair_stats on the CPU: tiles of rows spread over threads, tiles of columns walked with an online
// log-sum-exp. Each tile's similarities come from one float32 (float64 for double inputs) matrix
// product; half inputs are converted a tile at a time. Nothing of size N x M is ever allocated.
//
// Two schedules:
//  * general: a chunk of threads' work owns whole row tiles and walks every column tile;
//  * self (k is q): only tiles on or above the diagonal are computed, each one feeding the rows
//    of both its row tile and its column tile (the similarity matrix and the masks are
//    symmetric). Forward needs a fixed log-sum-exp shift for that (see kMaxFixedShiftSpan), so
//    that partial sums of one row from several chunks simply add up.
// Tiles whose rows and columns share no group are skipped (groups sorted by image make
// within-image contrast over a batch cost one image's work per image, not the batch's).
// The tiles carry only the log-sum-exp: pos_mean, pos_count and their gradient come from
// per-class sums (positive_stats, add_positive_gradients); the self backward shares one
// exponential between a pair's two gradient terms (set_shared_exp_factors); and tiles whose
// rows and columns are all in one group skip reading the codes (denominator_is_all_but_self).
// Results are deterministic for a given number of threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/capability.h"
#include "ops/pair_stats_host.h"
#include "ops/pair_stats.h"

namespace FASTIML_NAMESPACE {
namespace pair_stats {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kLanes = 16;  // row-sum lanes: one AVX-512 register of float32, two AVX2 ones
// Upper bound on the per-chunk gradient accumulators of the self backward.
constexpr int64_t kAccumulatorBudgetBytes = int64_t(256) << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows [start, start + len) of x in the accumulation dtype: a view when x already is, else a
// converted copy of just this tile.
at::Tensor tile_rows(const at::Tensor& x, int64_t start, int64_t len, at::ScalarType acc) {
  at::Tensor t = x.narrow(0, start, len);
  return t.scalar_type() == acc ? t : t.to(acc);
}

// A contiguous rows x cols matrix over the front of a scratch buffer.
at::Tensor scratch_matrix(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

// Splits `count` work items into `chunks` contiguous ranges of near-equal size.
std::pair<int64_t, int64_t> chunk_range(int64_t count, int64_t chunks, int64_t chunk) {
  return {count * chunk / chunks, count * (chunk + 1) / chunks};
}

// Whether every pair of the tile is in the denominator but i == j (exclude_self): the "all"
// denominator, and every row and column in one group (none ignored). The epilogues then skip
// the codes (in_denominator<true>); MPC's image groups and plain self-contrast make this the
// common tile.
bool denominator_is_all_but_self(const Codes& codes, int64_t r0, int64_t br, int64_t c0,
                                 int64_t bc, bool negatives_only) {
  if (negatives_only) return false;
  const int32_t g = codes.row_group[r0];
  if (g < 0) return false;
  for (int64_t i = r0; i < r0 + br; ++i)
    if (codes.row_group[i] != g) return false;
  for (int64_t j = c0; j < c0 + bc; ++j)
    if (codes.col_group[j] != g) return false;
  return true;
}

// pair_mask(...).den; with one_group (denominator_is_all_but_self), from the index alone.
template <bool one_group>
inline int32_t in_denominator(int32_t row_label, int32_t row_group, int32_t col_label,
                              int32_t col_group, bool same_index, bool negatives_only) {
  if constexpr (one_group) return int32_t(!same_index);
  return pair_mask(row_label, row_group, col_label, col_group, same_index, negatives_only).den;
}

// Per-row running log-sum-exp of one chunk of work.
template <typename acc_t>
struct RowSums {
  std::vector<acc_t> max, sum;
  explicit RowSums(int64_t n, acc_t initial_max) : max(n, initial_max), sum(n, 0) {}
};

// Forward epilogue of one tile: scales s by 1/tau and adds each row's denominator terms to
// `rows`; with `mirror`, also each column's (the transposed tile) to `cols` at the column
// indices. `fixed` selects a constant shift over the running max (required with mirror). The
// positives' statistics do not come from the tiles (positive_stats). Overwrites s with the
// terms: each row is one pure map (the exponentials) and then plain sums, loops GCC vectorises
// without keeping accumulators in memory (2.3x faster than one fused loop).
template <typename acc_t, bool mirror, bool fixed, bool one_group>
void forward_tile_loop(acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc,
                       const Codes& codes, acc_t inv_tau, acc_t shift, bool exclude_self,
                       bool negatives_only, RowSums<acc_t>& rows, RowSums<acc_t>& cols) {
  const int32_t* __restrict klab = codes.col_label + c0;
  const int32_t* __restrict kgrp = codes.col_group + c0;
  acc_t* __restrict col_sum = cols.sum.data() + c0;
  const int32_t cols_in_tile = int32_t(bc);  // <= kTile
  for (int64_t ii = 0; ii < br; ++ii) {
    const int64_t i = r0 + ii;
    const int32_t li = codes.row_label[i], gi = codes.row_group[i];
    if (gi < 0) continue;  // ignored row
    acc_t* __restrict srow = s + ii * bc;
    const int32_t self_j = self_column(exclude_self, i, c0, bc);
    acc_t m = fixed ? shift : rows.max[i];
    if (!fixed) {
      // The max in kLanes independent lanes: one running max is a scalar loop (GCC makes no
      // vector max of it without -ffinite-math-only).
      acc_t lane_max[kLanes];
      std::fill(lane_max, lane_max + kLanes, neg_inf<acc_t>());
      const auto raise = [&](int64_t jj, acc_t& lm) {
        const int32_t den = in_denominator<one_group>(li, gi, klab[jj], kgrp[jj],
                                                      int32_t(jj) == self_j, negatives_only);
        const acc_t v = srow[jj] * inv_tau;
        lm = (den && v > lm) ? v : lm;
      };
      const int64_t whole = bc - bc % kLanes;
      for (int64_t j0 = 0; j0 < whole; j0 += kLanes)
        for (int64_t lane = 0; lane < kLanes; ++lane) raise(j0 + lane, lane_max[lane]);
      for (int64_t jj = whole; jj < bc; ++jj) raise(jj, lane_max[jj - whole]);
      acc_t tile_max = neg_inf<acc_t>();
      for (int64_t lane = 0; lane < kLanes; ++lane)
        tile_max = lane_max[lane] > tile_max ? lane_max[lane] : tile_max;
      lse_raise_max(rows.max[i], rows.sum[i], tile_max);
      m = rows.max[i];
      if (m == neg_inf<acc_t>()) m = 0;  // nothing in the denominator yet: any shift works
    }
    // A non-denominator entry may exceed m: exp_acc's clamp keeps its term finite (in float64
    // it may overflow) and the select drops it either way.
    for (int32_t jj = 0; jj < cols_in_tile; ++jj) {
      const int32_t den =
          in_denominator<one_group>(li, gi, klab[jj], kgrp[jj], jj == self_j, negatives_only);
      const acc_t e = exp_acc(srow[jj] * inv_tau - m);
      srow[jj] = den ? e : acc_t(0);
    }
    // Row sums in kLanes independent lanes: a vectorisable reduction without reassociating
    // float additions (the order is fixed, so results stay deterministic).
    // (64-bit indices here: GCC leaves this loop scalar with int32 ones.)
    acc_t sum[kLanes] = {};
    const int64_t whole = bc - bc % kLanes;
    for (int64_t j0 = 0; j0 < whole; j0 += kLanes)
      for (int64_t lane = 0; lane < kLanes; ++lane) sum[lane] += srow[j0 + lane];
    for (int64_t jj = whole; jj < bc; ++jj) sum[jj - whole] += srow[jj];
    for (int64_t lane = 0; lane < kLanes; ++lane) rows.sum[i] += sum[lane];
    if (mirror)
      for (int64_t jj = 0; jj < bc; ++jj) col_sum[jj] += srow[jj];
  }
}

template <typename acc_t, bool mirror, bool fixed>
void forward_tile(acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc, const Codes& codes,
                  acc_t inv_tau, acc_t shift, bool exclude_self, bool negatives_only,
                  RowSums<acc_t>& rows, RowSums<acc_t>& cols) {
  if (denominator_is_all_but_self(codes, r0, br, c0, bc, negatives_only))
    forward_tile_loop<acc_t, mirror, fixed, true>(s, r0, br, c0, bc, codes, inv_tau, shift,
                                                  exclude_self, negatives_only, rows, cols);
  else
    forward_tile_loop<acc_t, mirror, fixed, false>(s, r0, br, c0, bc, codes, inv_tau, shift,
                                                   exclude_self, negatives_only, rows, cols);
}

// The per-row factors of the backward (RowGrad) as separate arrays: the epilogue reads the
// columns' factors with plain vector loads.
template <typename acc_t>
struct RowGrads {
  std::vector<acc_t> a, b, lse;
  // a_i exp(shift - lse_i), when the self backward shares one exponential per pair (empty
  // otherwise): see set_shared_exp_factors.
  std::vector<acc_t> a_shifted;
};

// The self backward's G + G^T needs a_i exp(s_ij - lse_i) + a_j exp(s_ij - lse_j). With the
// forward's fixed shift that is (f_i + f_j) exp(s_ij - shift), f_i = a_i exp(shift - lse_i):
// one exponential per pair instead of two. f_i reaches |a_i| e^(2 bound) (up to e^80), so this
// returns false -- the two-exponential epilogue runs -- when some f_i is not well inside the
// float range (beyond 1e36: |dL/dlse_i| from ~20 when lse_i sits at -bound, a few thousand in
// practice).
template <typename acc_t>
bool set_shared_exp_factors(RowGrads<acc_t>& grads, double shift) {
  std::vector<acc_t> f(grads.a.size());
  for (size_t i = 0; i < f.size(); ++i) {
    const double v = double(grads.a[i]) * std::exp(shift - double(grads.lse[i]));
    if (!(std::abs(v) <= 1e36)) return false;
    f[i] = acc_t(v);
  }
  grads.a_shifted = std::move(f);
  return true;
}

// What a backward epilogue writes over the raw products s: the denominator part of G
// (a_i e^(s_ij - lse_i) on denominator pairs; the positives' b_i terms are added from class
// sums, add_positive_gradients) -- for the rows (rows), plus its transpose with two exponentials
// per pair (mirrored) or one (mirrored_shared_exp; needs RowGrads::a_shifted and the shift it
// was made with).
enum class GradTile { rows, mirrored, mirrored_shared_exp };

template <typename acc_t, GradTile kind, bool one_group>
void gradient_tile_loop(acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc,
                        const Codes& codes, acc_t inv_tau, acc_t shift, bool exclude_self,
                        bool negatives_only, const RowGrads<acc_t>& grads) {
  const int32_t* __restrict klab = codes.col_label + c0;
  const int32_t* __restrict kgrp = codes.col_group + c0;
  // mirrored: the columns are rows too
  const acc_t* __restrict col_a = grads.a.data() + c0;
  const acc_t* __restrict col_lse = grads.lse.data() + c0;
  const acc_t* __restrict col_f =
      kind == GradTile::mirrored_shared_exp ? grads.a_shifted.data() + c0 : nullptr;
  for (int64_t ii = 0; ii < br; ++ii) {
    const int64_t i = r0 + ii;
    acc_t* __restrict srow = s + ii * bc;
    const int32_t li = codes.row_label[i], gi = codes.row_group[i];
    if (gi < 0) {
      std::fill(srow, srow + bc, acc_t(0));
      continue;
    }
    const acc_t ai = grads.a[i], lse_i = grads.lse[i];
    const acc_t fi = kind == GradTile::mirrored_shared_exp ? grads.a_shifted[i] : acc_t(0);
    const int32_t self_j = self_column(exclude_self, i, c0, bc);
    const int32_t cols_in_tile = int32_t(bc);
    for (int32_t jj = 0; jj < cols_in_tile; ++jj) {
      const int32_t den =
          in_denominator<one_group>(li, gi, klab[jj], kgrp[jj], jj == self_j, negatives_only);
      const acc_t v = srow[jj] * inv_tau;
      // A non-denominator entry may exceed lse: exp_acc's clamp keeps its term finite (or, in
      // float64, it may overflow) and the select below drops it either way.
      acc_t g;
      if constexpr (kind == GradTile::mirrored_shared_exp) {
        g = (fi + col_f[jj]) * exp_acc(v - shift);
      } else {
        g = ai * exp_acc(v - lse_i);
        if (kind == GradTile::mirrored) g += col_a[jj] * exp_acc(v - col_lse[jj]);
      }
      srow[jj] = den ? g : acc_t(0);
    }
  }
}

template <typename acc_t, GradTile kind>
void gradient_tile(acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc, const Codes& codes,
                   acc_t inv_tau, acc_t shift, bool exclude_self, bool negatives_only,
                   const RowGrads<acc_t>& grads) {
  if (denominator_is_all_but_self(codes, r0, br, c0, bc, negatives_only))
    gradient_tile_loop<acc_t, kind, true>(s, r0, br, c0, bc, codes, inv_tau, shift,
                                          exclude_self, negatives_only, grads);
  else
    gradient_tile_loop<acc_t, kind, false>(s, r0, br, c0, bc, codes, inv_tau, shift,
                                           exclude_self, negatives_only, grads);
}

struct Problem {
  at::Tensor q, k;  // k is q in self mode
  bool self;
  int64_t n, m, d;
  double tau;
  bool exclude_self, negatives_only;
  at::ScalarType acc;
};

// max |s_ij| over the problem (from row norms): decides the fixed shift.
double similarity_bound(const Problem& p) {
  return max_row_norm(p.q) * (p.self ? max_row_norm(p.q) : max_row_norm(p.k)) / p.tau;
}

// Self mode takes the symmetric schedule when the fixed shift is safe. The backward must
// follow the forward's schedule: its exp(s_ij - lse_i) is only consistent with lse_i when s_ij
// comes from the same tile product (tile (c, r) and the transpose of tile (r, c) differ in the
// last bits, which |s| / tau magnifies).
bool uses_symmetric_schedule(const Problem& p, double bound) {
  return p.self && 2.0 * bound <= kMaxFixedShiftSpan;
}

// Positives by class. Row i's positives are the counted columns of its own class (same label,
// same group; column i left out with exclude_self), so every sum over positives is a per-class
// sum: sum_{j positive} s_ij = q_i . (sum of the class's k_j) / tau. The positives' statistics
// and their gradient cost O((N + M) D) this way, and the tile epilogues carry only the
// denominator.
struct Classes {
  std::vector<int64_t> row, col;  // class id of each row / column, -1: none (ignored, or a row
                                  // whose class has no column)
  std::vector<int64_t> count;     // columns per class
};

Classes make_classes(const Problem& p, const Codes& codes) {
  // A class is one (group, label) pair of codes, as the int64 key group * labels + label
  // (codes are compact: 0 .. count - 1, labels numbered over rows and columns together).
  int64_t labels = 0;
  for (int64_t i = 0; i < p.n; ++i) labels = std::max<int64_t>(labels, codes.row_label[i] + 1);
  for (int64_t j = 0; j < p.m; ++j) labels = std::max<int64_t>(labels, codes.col_label[j] + 1);
  const auto key = [labels](int32_t label, int32_t group) {
    return group < 0 ? int64_t(-1) : int64_t(group) * labels + label;
  };
  std::vector<int64_t> keys;  // the columns' classes, sorted: a class id is a position here
  for (int64_t j = 0; j < p.m; ++j)
    if (codes.col_group[j] >= 0) keys.push_back(key(codes.col_label[j], codes.col_group[j]));
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  const auto class_of = [&](int32_t label, int32_t group) -> int64_t {
    const int64_t k = key(label, group);
    const auto it = std::lower_bound(keys.begin(), keys.end(), k);
    return (k >= 0 && it != keys.end() && *it == k) ? it - keys.begin() : -1;
  };
  Classes c{std::vector<int64_t>(p.n), std::vector<int64_t>(p.m),
            std::vector<int64_t>(keys.size(), 0)};
  for (int64_t i = 0; i < p.n; ++i) c.row[i] = class_of(codes.row_label[i], codes.row_group[i]);
  for (int64_t j = 0; j < p.m; ++j) {
    c.col[j] = class_of(codes.col_label[j], codes.col_group[j]);
    if (c.col[j] >= 0) ++c.count[c.col[j]];
  }
  return c;
}

// sums[class][t] += weight(i) * x[i][t] over the entries i with a class, in float64. Threads
// split the feature columns, so each sum adds its terms in entry order (the same result at any
// thread count).
template <typename scalar_t, typename Weight>
std::vector<double> class_sums(const scalar_t* x, const std::vector<int64_t>& entry_class,
                               int64_t classes, int64_t d, Weight weight) {
  std::vector<double> sums(classes * d, 0.0);
  at::parallel_for(0, d, 8, [&](int64_t t0, int64_t t1) {
    for (size_t i = 0; i < entry_class.size(); ++i) {
      const int64_t c = entry_class[i];
      if (c < 0) continue;
      const double w = weight(i);
      for (int64_t t = t0; t < t1; ++t) sums[c * d + t] += w * double(x[i * d + t]);
    }
  });
  return sums;
}

// With exclude_self, row i's class loses column i when column i is in it (N == M then).
bool drops_self(const Problem& p, const Classes& cls, int64_t i) {
  return p.exclude_self && cls.row[i] >= 0 && cls.col[i] == cls.row[i];
}

template <typename acc_t>
void positive_stats(const Problem& p, const Classes& cls, at::Tensor& pos_mean,
                    at::Tensor& pos_count) {
  const int64_t d = p.d;
  const at::Tensor q = p.q.contiguous(), k = p.k.contiguous();
  acc_t* mean_p = pos_mean.data_ptr<acc_t>();
  int64_t* count_p = pos_count.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "positive_stats",
                                  [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const auto k_sum = class_sums(kp, cls.col, cls.count.size(), d, [](size_t) { return 1.0; });
    at::parallel_for(0, p.n, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = cls.row[i];
        const bool own = drops_self(p, cls, i);
        const int64_t count = c < 0 ? 0 : cls.count[c] - own;
        double dot = 0;
        for (int64_t t = 0; count > 0 && t < d; ++t) {
          const double k_t = k_sum[c * d + t] - (own ? double(kp[i * d + t]) : 0.0);
          dot += double(qp[i * d + t]) * k_t;
        }
        count_p[i] = count;
        mean_p[i] = count > 0 ? acc_t(dot / p.tau / double(count)) : acc_t(0);
      }
    });
  });
}

// The positives' part of the gradients, G_ij += b_i for j positive (b_i = dL/dpos_mean_i /
// pos_count_i), from class sums: dq_i += b_i (sum of i's class's k_j, less k_i if own) / tau;
// dk_j += (sum of b_i q_i over the rows of j's class, less b_j q_j if own) / tau. grad_q and
// grad_k (float accumulators, either may be undefined) may be one tensor: self mode adds both.
template <typename acc_t>
void add_positive_gradients(const Problem& p, const Classes& cls, const std::vector<acc_t>& b,
                            at::Tensor grad_q, at::Tensor grad_k) {
  const int64_t d = p.d;
  const int64_t classes = static_cast<int64_t>(cls.count.size());
  const at::Tensor q = p.q.contiguous(), k = p.k.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "add_positive_gradients", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    if (grad_q.defined()) {
      const auto k_sum = class_sums(kp, cls.col, classes, d, [](size_t) { return 1.0; });
      acc_t* g = grad_q.data_ptr<acc_t>();
      at::parallel_for(0, p.n, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t c = cls.row[i];
          if (c < 0 || b[i] == acc_t(0)) continue;
          const bool own = drops_self(p, cls, i);
          for (int64_t t = 0; t < d; ++t) {
            const double k_t = k_sum[c * d + t] - (own ? double(kp[i * d + t]) : 0.0);
            g[i * d + t] += acc_t(double(b[i]) * k_t / p.tau);
          }
        }
      });
    }
    if (grad_k.defined()) {
      const auto bq_sum =
          class_sums(qp, cls.row, classes, d, [&](size_t i) { return double(b[i]); });
      acc_t* g = grad_k.data_ptr<acc_t>();
      at::parallel_for(0, p.m, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          const int64_t c = cls.col[j];
          if (c < 0) continue;
          // own: row j (exclude_self, N == M) is a row of j's class
          const bool own = p.exclude_self && cls.row[j] == c;
          for (int64_t t = 0; t < d; ++t) {
            const double own_t = own ? double(b[j]) * double(qp[j * d + t]) : 0.0;
            const double bq_t = bq_sum[c * d + t] - own_t;
            g[j * d + t] += acc_t(bq_t / p.tau);
          }
        }
      });
    }
  });
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const Problem& p, const Codes& codes) {
  const auto stat_options = p.q.options().dtype(p.acc);
  at::Tensor lse = at::empty({p.n}, stat_options);
  at::Tensor pos_mean = at::empty({p.n}, stat_options);
  at::Tensor pos_count = at::empty({p.n}, p.q.options().dtype(at::kLong));

  const acc_t inv_tau = acc_t(1.0 / p.tau);
  const double bound = similarity_bound(p);
  const bool fixed = 2.0 * bound <= kMaxFixedShiftSpan;
  const bool symmetric = uses_symmetric_schedule(p, bound);
  const acc_t shift = fixed ? acc_t(bound) : acc_t(0);

  const int64_t row_tiles = ceil_div(p.n, kTile);
  // The tile pairs that run (pair_stats_host.h): only tiles sharing a group; upper-triangular
  // ones in the symmetric schedule. Chunks get equal numbers of pairs (symmetric) or row tiles.
  const TileSchedule schedule =
      make_tile_schedule(tile_group_ranges(codes.row_group, p.n, kTile),
                         tile_group_ranges(codes.col_group, p.m, kTile), symmetric, 1);
  const int64_t items = symmetric ? schedule.pairs() : row_tiles;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  const acc_t initial_max = fixed ? shift : neg_inf<acc_t>();
  std::vector<RowSums<acc_t>> sums;
  sums.reserve(chunks);
  for (int64_t c = 0; c < chunks; ++c) sums.emplace_back(p.n, initial_max);

  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kTile * kTile}, stat_options);
    acc_t* s = buffer.data_ptr<acc_t>();
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      RowSums<acc_t>& acc = sums[chunk];
      auto [first, last] = chunk_range(items, chunks, chunk);
      auto tile = [&](int64_t r, int64_t c, bool mirror) {
        const int64_t r0 = r * kTile, br = std::min(kTile, p.n - r0);
        const int64_t c0 = c * kTile, bc = std::min(kTile, p.m - c0);
        at::Tensor S = scratch_matrix(buffer, br, bc);
        at::mm_out(S, tile_rows(p.q, r0, br, p.acc), tile_rows(p.k, c0, bc, p.acc).t());
        const bool excl = p.exclude_self;
        if (mirror)
          forward_tile<acc_t, true, true>(s, r0, br, c0, bc, codes, inv_tau, shift, excl,
                                          p.negatives_only, acc, acc);
        else if (fixed)
          forward_tile<acc_t, false, true>(s, r0, br, c0, bc, codes, inv_tau, shift, excl,
                                           p.negatives_only, acc, acc);
        else
          forward_tile<acc_t, false, false>(s, r0, br, c0, bc, codes, inv_tau, shift, excl,
                                            p.negatives_only, acc, acc);
      };
      if (symmetric) {
        for (int64_t q = first; q < last; ++q) {
          const int64_t r = schedule.owner[q], c = schedule.others[q];
          tile(r, c, c != r);
        }
      } else {
        for (int64_t r = first; r < last; ++r)
          for (int64_t q = schedule.begin[r]; q < schedule.begin[r + 1]; ++q)
            tile(r, schedule.others[q], false);
      }
    }
  });

  acc_t* lse_p = lse.data_ptr<acc_t>();
  at::parallel_for(0, p.n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t m = neg_inf<acc_t>(), l = 0;
      for (const auto& a : sums) lse_merge(m, l, a.max[i], a.sum[i]);
      lse_p[i] = lse_finish(m, l);
    }
  });
  positive_stats<acc_t>(p, make_classes(p, codes), pos_mean, pos_count);
  return {lse, pos_mean, pos_count};
}

template <typename acc_t>
RowGrads<acc_t> row_grads_of(const at::Tensor& grad_lse, const at::Tensor& grad_pos,
                             const at::Tensor& lse, const at::Tensor& pos_count) {
  const int64_t n = lse.size(0);
  auto gl = grad_lse.to(lse.scalar_type()).contiguous();
  auto gp = grad_pos.to(lse.scalar_type()).contiguous();
  auto l = lse.contiguous();
  auto pc = pos_count.contiguous();
  RowGrads<acc_t> out{std::vector<acc_t>(n), std::vector<acc_t>(n), std::vector<acc_t>(n)};
  for (int64_t i = 0; i < n; ++i) {
    const RowGrad<acc_t> r = row_grad(gl.data_ptr<acc_t>()[i], l.data_ptr<acc_t>()[i],
                                      gp.data_ptr<acc_t>()[i], pc.data_ptr<int64_t>()[i]);
    out.a[i] = r.a;
    out.b[i] = r.b;
    out.lse[i] = r.lse;
  }
  return out;
}

// Self mode: grad = (G + G^T) X / tau over the upper tiles, each tile adding to both its row
// tile and (transposed) its column tile, into one accumulator per chunk.
template <typename acc_t>
at::Tensor backward_self(const Problem& p, const Codes& codes, RowGrads<acc_t>& rg,
                         double bound) {
  const auto options = p.q.options().dtype(p.acc);
  // The forward's symmetric schedule: the same tile products (see uses_symmetric_schedule).
  const auto ranges = tile_group_ranges(codes.row_group, p.n, kTile);
  const TileSchedule schedule = make_tile_schedule(ranges, ranges, true, 1);
  const int64_t items = schedule.pairs();
  const int64_t bytes = std::max<int64_t>(1, p.n * p.d * int64_t(sizeof(acc_t)));
  const int64_t chunks = std::max<int64_t>(
      1, std::min({int64_t(at::get_num_threads()), items, kAccumulatorBudgetBytes / bytes}));
  std::vector<at::Tensor> grads(chunks);
  const acc_t inv_tau = acc_t(1.0 / p.tau);
  const acc_t shift = acc_t(bound);  // the forward's (forward_impl)
  const bool shared_exp = set_shared_exp_factors(rg, double(shift));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kTile * kTile}, options);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      at::Tensor grad = at::zeros({p.n, p.d}, options);
      auto [first, last] = chunk_range(items, chunks, chunk);
      for (int64_t q = first; q < last; ++q) {
        const int64_t r = schedule.owner[q], c = schedule.others[q];
        const int64_t r0 = r * kTile, br = std::min(kTile, p.n - r0);
        const int64_t c0 = c * kTile, bc = std::min(kTile, p.n - c0);
        at::Tensor xr = tile_rows(p.q, r0, br, p.acc), xc = tile_rows(p.q, c0, bc, p.acc);
        at::Tensor H = scratch_matrix(buffer, br, bc);
        at::mm_out(H, xr, xc.t());
        if (shared_exp)
          gradient_tile<acc_t, GradTile::mirrored_shared_exp>(
              H.data_ptr<acc_t>(), r0, br, c0, bc, codes, inv_tau, shift, p.exclude_self,
              p.negatives_only, rg);
        else
          gradient_tile<acc_t, GradTile::mirrored>(H.data_ptr<acc_t>(), r0, br, c0, bc, codes,
                                                   inv_tau, shift, p.exclude_self,
                                                   p.negatives_only, rg);
        grad.narrow(0, r0, br).addmm_(H, xc);
        if (c != r) grad.narrow(0, c0, bc).addmm_(H.t(), xr);
      }
      grads[chunk] = grad;
    }
  });
  at::Tensor total = grads[0];
  for (int64_t c = 1; c < chunks; ++c) total.add_(grads[c]);
  return total.mul_(inv_tau);
}

// General mode: dq from a pass over row tiles, dk from a pass over column tiles; each pass
// recomputes its tiles, so no two threads ever write the same rows.
template <typename acc_t>
at::Tensor backward_general(const Problem& p, const Codes& codes,
                            const RowGrads<acc_t>& rg, bool for_k) {
  const auto options = p.q.options().dtype(p.acc);
  const int64_t own_len = for_k ? p.m : p.n;
  const int64_t other_len = for_k ? p.n : p.m;
  const int64_t own_tiles = ceil_div(own_len, kTile);
  at::Tensor grad = at::zeros({own_len, p.d}, options);
  const acc_t inv_tau = acc_t(1.0 / p.tau);
  const auto row_ranges = tile_group_ranges(codes.row_group, p.n, kTile);
  const auto col_ranges = tile_group_ranges(codes.col_group, p.m, kTile);
  const TileSchedule schedule = for_k ? make_tile_schedule(col_ranges, row_ranges, false, 1)
                                      : make_tile_schedule(row_ranges, col_ranges, false, 1);
  at::parallel_for(0, own_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kTile * kTile}, options);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = t * kTile, bo = std::min(kTile, own_len - o0);
      at::Tensor own = grad.narrow(0, o0, bo);
      for (int64_t q = schedule.begin[t]; q < schedule.begin[t + 1]; ++q) {
        const int64_t u = schedule.others[q];
        const int64_t x0 = u * kTile, bx = std::min(kTile, other_len - x0);
        const int64_t r0 = for_k ? x0 : o0, br = for_k ? bx : bo;
        const int64_t c0 = for_k ? o0 : x0, bc = for_k ? bo : bx;
        at::Tensor qr = tile_rows(p.q, r0, br, p.acc), kc = tile_rows(p.k, c0, bc, p.acc);
        at::Tensor G = scratch_matrix(buffer, br, bc);
        at::mm_out(G, qr, kc.t());
        gradient_tile<acc_t, GradTile::rows>(G.data_ptr<acc_t>(), r0, br, c0, bc, codes,
                                             inv_tau, acc_t(0), p.exclude_self,
                                             p.negatives_only, rg);
        if (for_k)
          own.addmm_(G.t(), qr);
        else
          own.addmm_(G, kc);
      }
    }
  });
  return grad.mul_(inv_tau);
}

// General mode with both gradients: one pass over row tiles, each tile's G feeding dq (rows
// owned by the chunk) and a per-chunk dk accumulator, summed at the end -- three products per
// tile instead of four. Returns false (nothing done) when the accumulators would exceed the
// budget; the two-pass backward_general then runs instead.
template <typename acc_t>
bool backward_general_one_pass(const Problem& p, const Codes& codes,
                               const RowGrads<acc_t>& rg, at::Tensor& grad_q,
                               at::Tensor& grad_k) {
  const auto options = p.q.options().dtype(p.acc);
  const int64_t row_tiles = ceil_div(p.n, kTile);
  const int64_t bytes = std::max<int64_t>(1, p.m * p.d * int64_t(sizeof(acc_t)));
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), row_tiles);
  if (chunks < 1 || chunks * bytes > kAccumulatorBudgetBytes) return false;
  at::Tensor dq = at::zeros({p.n, p.d}, options);
  std::vector<at::Tensor> dk(chunks);
  const acc_t inv_tau = acc_t(1.0 / p.tau);
  const TileSchedule schedule =
      make_tile_schedule(tile_group_ranges(codes.row_group, p.n, kTile),
                         tile_group_ranges(codes.col_group, p.m, kTile), false, 1);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kTile * kTile}, options);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      at::Tensor acc = at::zeros({p.m, p.d}, options);
      auto [first, last] = chunk_range(row_tiles, chunks, chunk);
      for (int64_t r = first; r < last; ++r) {
        const int64_t r0 = r * kTile, br = std::min(kTile, p.n - r0);
        at::Tensor qr = tile_rows(p.q, r0, br, p.acc);
        for (int64_t q = schedule.begin[r]; q < schedule.begin[r + 1]; ++q) {
          const int64_t c = schedule.others[q];
          const int64_t c0 = c * kTile, bc = std::min(kTile, p.m - c0);
          at::Tensor kc = tile_rows(p.k, c0, bc, p.acc);
          at::Tensor G = scratch_matrix(buffer, br, bc);
          at::mm_out(G, qr, kc.t());
          gradient_tile<acc_t, GradTile::rows>(G.data_ptr<acc_t>(), r0, br, c0, bc, codes,
                                               inv_tau, acc_t(0), p.exclude_self,
                                               p.negatives_only, rg);
          dq.narrow(0, r0, br).addmm_(G, kc);
          acc.narrow(0, c0, bc).addmm_(G.t(), qr);
        }
      }
      dk[chunk] = acc;
    }
  });
  for (int64_t c = 1; c < chunks; ++c) dk[0].add_(dk[c]);
  grad_q = dq.mul_(inv_tau);
  grad_k = dk[0].mul_(inv_tau);
  return true;
}

Problem make_problem(const at::Tensor& q, const std::optional<at::Tensor>& k, double tau,
                     bool exclude_self, bool negatives_only) {
  // Detached: the tile products are internal, and worker threads do not inherit guards.
  Problem p;
  p.q = q.detach();
  p.self = !k.has_value();
  p.k = p.self ? p.q : k->detach();
  p.n = q.size(0);
  p.m = p.k.size(0);
  p.d = q.size(1);
  p.tau = tau;
  p.exclude_self = exclude_self;
  p.negatives_only = negatives_only;
  p.acc = at::toOpMathType(q.scalar_type());
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_stats_cpu(
    const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& q_label,
    const std::optional<at::Tensor>& k_label, const std::optional<at::Tensor>& q_group,
    const std::optional<at::Tensor>& k_group, double tau, bool exclude_self, bool negatives_only,
    int64_t ignore_index) {
  check_pair_stats_inputs(q, k, q_label, k_label, q_group, k_group, tau, exclude_self);
  const Problem p = make_problem(q, k, tau, exclude_self, negatives_only);
  const CodeTensors codes = make_codes(q_label, k_label, q_group, k_group, ignore_index);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "pair_stats_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    out = forward_impl<acc_t>(p, codes.view());
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_stats_backward_cpu(
    const at::Tensor& grad_lse, const at::Tensor& grad_pos_mean, const at::Tensor& q,
    const std::optional<at::Tensor>& k, const at::Tensor& q_label,
    const std::optional<at::Tensor>& k_label, const std::optional<at::Tensor>& q_group,
    const std::optional<at::Tensor>& k_group, const at::Tensor& lse, const at::Tensor& pos_count,
    double tau, bool exclude_self, bool negatives_only, int64_t ignore_index, bool q_needs_grad,
    bool k_needs_grad) {
  check_pair_stats_inputs(q, k, q_label, k_label, q_group, k_group, tau, exclude_self);
  check_pair_stats_grads(grad_lse, grad_pos_mean, lse, pos_count, q.size(0));
  const Problem p = make_problem(q, k, tau, exclude_self, negatives_only);
  const CodeTensors codes = make_codes(q_label, k_label, q_group, k_group, ignore_index);
  at::Tensor grad_q = at::Tensor(), grad_k = at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "pair_stats_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto rg = row_grads_of<acc_t>(grad_lse, grad_pos_mean, lse, pos_count);
        const double bound = p.self ? similarity_bound(p) : 0.0;
        if (p.self && uses_symmetric_schedule(p, bound)) {
          if (q_needs_grad) grad_q = backward_self<acc_t>(p, codes.view(), rg, bound);
        } else if (p.self) {  // general schedule, as the forward ran: q's grad is dq + dk
          if (q_needs_grad)
            grad_q = backward_general<acc_t>(p, codes.view(), rg, false)
                         .add_(backward_general<acc_t>(p, codes.view(), rg, true));
        } else if (!(q_needs_grad && k_needs_grad &&
                     backward_general_one_pass<acc_t>(p, codes.view(), rg, grad_q, grad_k))) {
          if (q_needs_grad) grad_q = backward_general<acc_t>(p, codes.view(), rg, false);
          if (k_needs_grad) grad_k = backward_general<acc_t>(p, codes.view(), rg, true);
        }
        // The tiles' G leaves out the positives' b_i terms: they come from class sums here.
        if (std::any_of(rg.b.begin(), rg.b.end(), [](acc_t v) { return v != acc_t(0); }))
          add_positive_gradients<acc_t>(p, make_classes(p, codes.view()), rg.b, grad_q,
                                        p.self ? grad_q : grad_k);
      });
  if (grad_q.defined()) grad_q = grad_q.to(q.scalar_type());
  if (grad_k.defined()) grad_k = grad_k.to(q.scalar_type());
  // Unrequested gradients come back as empty tensors (the schema returns Tensors).
  if (!grad_q.defined()) grad_q = at::empty({0}, q.options());
  if (!grad_k.defined()) grad_k = at::empty({0}, q.options());
  return {grad_q, grad_k};
}

}  // namespace pair_stats
}  // namespace fastiml

// Registered once, by the base build; each op runs the kernel of the CPU level in force.
#if !defined(FASTIML_CPU_CAPABILITY)
FASTIML_CPU_DECLARE_LEVELS(pair_stats, pair_stats_cpu)
FASTIML_CPU_DECLARE_LEVELS(pair_stats, pair_stats_backward_cpu)

TORCH_LIBRARY_IMPL(fastiml, CPU, m) {
  m.impl("pair_stats", FASTIML_CPU_DISPATCH(pair_stats, pair_stats_cpu));
  m.impl("pair_stats_backward", FASTIML_CPU_DISPATCH(pair_stats, pair_stats_backward_cpu));
  m.impl("pair_stats_tile_schedule", &fastiml::pair_stats::tile_schedule_op);
  m.impl("pair_stats_range_exponents", &fastiml::pair_stats::range_exponents_op);
}
#endif
