// pivot_consistency on the CPU: per cell row, how each block of 16 pixels weighs (nothing, one
// weight, or per pixel), as runs of blocks; then each pixel row a run at a time: runs that weigh
// nothing are skipped (forward) or zero-filled (backward), the others go through a vectorisable
// loop (branch-free sigmoid). Closed-form backward. Row partial sums are added in a fixed order:
// deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/cpu/capability.h"
#include "ops/pivot.h"

namespace FASTIML_NAMESPACE {
namespace pivot {
namespace {

void check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& klass,
                  int64_t patch) {
  TORCH_CHECK(a.dim() == 4 && a.size(1) == 1, "pivot_consistency: logit_a must be [B, 1, H, W], got ",
              a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes() && b.scalar_type() == a.scalar_type(),
              "pivot_consistency: logit_b must match logit_a's shape and dtype");
  TORCH_CHECK(patch > 0, "pivot_consistency: patch must be > 0, got ", patch);
  TORCH_CHECK(klass.scalar_type() == at::kChar && klass.dim() == 3 && klass.size(0) == a.size(0) &&
                  klass.size(1) == contour::cells(a.size(2), patch) &&
                  klass.size(2) == contour::cells(a.size(3), patch),
              "pivot_consistency: klass must be int8 [B, ceil(H/patch), ceil(W/patch)]");
}

// Sum over pixels of the weights: the number of pixels of contour cells and of the other
// counted cells (exact integers, counted per cell row: every cell but the last is `patch`
// wide), each times its weight. pixel_weight with weights 1 / 0 and 0 / 1 tells the classes
// apart, so its rule (padding weighs 0) is the one place that says which cells count.
template <typename acc_t>
acc_t weight_total(const int8_t* klass, int64_t B, int64_t H, int64_t W, int64_t patch,
                   acc_t wc, acc_t wo) {
  const int64_t gh = contour::cells(H, patch), gw = contour::cells(W, patch);
  if (gw == 0) return acc_t(0);
  const int64_t last_width = W - (gw - 1) * patch;
  int64_t contour_pixels = 0, other_pixels = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t cy = 0; cy < gh; ++cy) {
      const int8_t* row = klass + (b * gh + cy) * gw;
      // int32 counts of the full-width cells: a loop the compiler vectorises over the bytes.
      int32_t contour_cells = 0, other_cells = 0;
      for (int64_t cx = 0; cx + 1 < gw; ++cx) {
        contour_cells += pixel_weight<int32_t>(row[cx], 1, 0);
        other_cells += pixel_weight<int32_t>(row[cx], 0, 1);
      }
      const int8_t last = row[gw - 1];
      const int64_t h = std::min(patch, H - cy * patch);
      contour_pixels +=
          h * (contour_cells * patch + pixel_weight<int64_t>(last, 1, 0) * last_width);
      other_pixels += h * (other_cells * patch + pixel_weight<int64_t>(last, 0, 1) * last_width);
    }
  return wc * acc_t(contour_pixels) + wo * acc_t(other_pixels);
}

// Rows of `width` pixels per parallel task: at least ~32K pixels.
int64_t rows_per_task(int64_t width) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, width));
}

constexpr int64_t kLanes = 16;  // pixels per block: one 16-lane vector of float32

// float32 lanes of one vector at the level this file is compiled for (ops/cpu/isa/*.cpp; the
// base build: SSE2's 4). A block with per-pixel weights runs in groups of this many pixels and
// skips the groups that weigh nothing: at 4 lanes a whole block costs 4 vectors, and contour
// runs of a few cells leave most of them empty.
#ifndef FASTIML_CPU_FLOAT_LANES
#define FASTIML_CPU_FLOAT_LANES 4
#endif
constexpr int64_t kGroup = FASTIML_CPU_FLOAT_LANES;
static_assert(kLanes % kGroup == 0, "a block is whole groups");

// How the pixels of a cell row weigh, per block of kLanes pixels: the row goes through the
// vectorised loops a whole block at a time, blocks that weigh nothing are skipped (forward) or
// zero-filled (backward). With NCL's setting (contour cells only, patch 4) the weighted pixels
// come in runs of a few cells, which a loop per run would run almost entirely in its scalar
// tail; a block whose cells all weigh the same (every block when weight_other > 0 and there is
// no padding) multiplies by one weight.
enum class BlockKind : uint8_t { kEmpty, kUniform, kMixed };

// A cell row's blocks as runs: a maximal run of blocks that weigh nothing, a maximal run of
// blocks of one weight w, or one block with per-pixel weights. The pixel rows of the cell row
// walk these runs; they are made once per cell row, not once per pixel row.
template <typename acc_t>
struct BlockRun {
  int64_t x0, x1;  // pixels [x0, x1) of the row
  BlockKind kind;
  acc_t w;  // the weight of a uniform run
};

template <typename acc_t>
class RowWeights {
 public:
  // wc, wo: the weights of contour and of other cells (padding weighs 0). Each cell is given a
  // code, the same for two cells exactly when their weights are the same: the blocks' cells are
  // then compared as bytes (float compares cost a NaN test each, and this walk runs over every
  // cell whatever the logits).
  RowWeights(int64_t gw, int64_t W, acc_t wc, acc_t wo) : code_(gw), pixel_(W) {
    runs_.reserve((W + kLanes - 1) / kLanes);
    contour_code_ = wc == acc_t(0) ? 0 : 1;
    other_code_ = wo == acc_t(0) ? 0 : (wo == wc ? contour_code_ : 2);
    weight_of_code_[0] = acc_t(0);
    weight_of_code_[1] = wc;
    weight_of_code_[2] = wo;
  }

  // The weights of the cell row krow (gw cells of `patch` pixels, W pixels in all). The cells
  // under each block are walked along, not divided out: at patch 4 this runs once per 4 pixel
  // rows, and a division per block (or per pixel of a mixed block) weighed as much as they do.
  void set(const int8_t* krow, int64_t gw, int64_t W, int64_t patch) {
    // Through a local pointer: a store to a uint8_t may alias the vector's own pointer, which
    // the compiler would then reload on every cell.
    uint8_t* const code = code_.data();
    const uint8_t contour_code = contour_code_, other_code = other_code_;
    for (int64_t cx = 0; cx < gw; ++cx)
      code[cx] = pixel_weight<uint8_t>(krow[cx], contour_code, other_code);
    runs_.clear();
    int last_code = -1;  // the code of the last run's blocks; -1 when that run is a mixed block
    int64_t c0 = 0, c0_end = patch;  // the block's first cell, and the pixel where it ends
    for (int64_t x0 = 0; x0 < W; x0 += kLanes) {
      const int64_t x1 = std::min(W, x0 + kLanes);
      while (c0_end <= x0) ++c0, c0_end += patch;
      const uint8_t first = code[c0];
      uint8_t differs = 0;
      int64_t c1 = c0;  // the block's last cell
      for (int64_t end = c0_end; end < x1; end += patch) differs |= code[++c1] ^ first;
      if (differs != 0) {
        runs_.push_back({x0, x1, BlockKind::kMixed, acc_t(0)});
        last_code = -1;
        for (int64_t c = c0, x = x0; c <= c1; ++c) {
          const int64_t end = std::min(x1, (c + 1) * patch);
          for (; x < end; ++x) pixel_[x] = weight_of_code_[code[c]];
        }
      } else if (first == last_code) {
        runs_.back().x1 = x1;
      } else {
        runs_.push_back({x0, x1, first == 0 ? BlockKind::kEmpty : BlockKind::kUniform,
                         weight_of_code_[first]});
        last_code = first;
      }
    }
  }

  const std::vector<BlockRun<acc_t>>& runs() const { return runs_; }
  const acc_t* pixel() const { return pixel_.data(); }  // valid in mixed blocks

 private:
  std::vector<uint8_t> code_;  // per cell: 0 weighs nothing, else an index into weight_of_code_
  std::vector<BlockRun<acc_t>> runs_;
  std::vector<acc_t> pixel_;
  uint8_t contour_code_, other_code_;
  acc_t weight_of_code_[3];
};

// The counted pixels at NCL's setting (contour cells only, patch 4) are scattered: runs of a
// few cells, each a wait on memory that the CPU's stream prefetchers do not foresee (half the
// backward's samples sat on those loads). The next pixel row mostly has its counted pixels in
// the same columns (it shares the cell row's weights, but for the cell row's last pixel row),
// so a mixed block or a short run asks for them one row ahead. Longer runs are left to the
// hardware, which streams them.
constexpr int64_t kPrefetchRun = 2 * kLanes;  // pixels: runs up to this long are prefetched

// Asks for a[x0 + next_row, x1 + next_row) and the same of b when the run [x0, x1) is at most
// kPrefetchRun pixels long (every mixed block is) and there is a next row (next_row != 0).
// Always inlined: GCC takes a function that only prefetches for one without side effects and
// drops the calls to it (GCC 12, -O1 and up); inlined, the prefetches stay in the caller.
// tests/test_cpu_capability.py checks that the built library holds them.
template <typename scalar_t>
inline __attribute__((always_inline)) void prefetch_next_row(const scalar_t* a, const scalar_t* b,
                                                             int64_t x0, int64_t x1,
                                                             int64_t next_row) {
  if (next_row == 0 || x1 - x0 > kPrefetchRun) return;
  constexpr int64_t kLine = 64 / int64_t(sizeof(scalar_t));  // elements of a cache line
  for (int64_t x = x0 + next_row; x < x1 + next_row; x += kLine) {
    __builtin_prefetch(a + x);
    __builtin_prefetch(b + x);
  }
}

// Sum of jeffreys(a[i], b[i]) over i < n, in kLanes lanes added in a fixed order.
template <typename scalar_t, typename acc_t>
acc_t jeffreys_sum(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += jeffreys(acc_t(a[i + j]), acc_t(b[i + j]));
  acc_t total = 0;
  for (; i < n; ++i) total += jeffreys(acc_t(a[i]), acc_t(b[i]));
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// ga[i], gb[i] = w * dJ/da, w * dJ/db over i < n.
template <typename scalar_t, typename acc_t>
void jeffreys_grad_run(const scalar_t* a, const scalar_t* b, int64_t n, acc_t w, scalar_t* ga,
                       scalar_t* gb) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t da, db;
    jeffreys_grad(acc_t(a[i]), acc_t(b[i]), da, db);
    ga[i] = scalar_t(w * da);
    gb[i] = scalar_t(w * db);
  }
}

// Walks the row's runs: empty(x0, x1) for a run of blocks that weigh nothing, uniform(x0, x1, w)
// for a run of blocks of one weight w, mixed(x0, x1, w) for a block with per-pixel weights
// w[x0, x1) (x1 < x0 + kLanes only for the row's last block).
template <typename acc_t, typename Empty, typename Uniform, typename Mixed>
void for_each_run(const RowWeights<acc_t>& rw, Empty&& empty, Uniform&& uniform, Mixed&& mixed) {
  for (const BlockRun<acc_t>& run : rw.runs()) {
    if (run.kind == BlockKind::kEmpty)
      empty(run.x0, run.x1);
    else if (run.kind == BlockKind::kUniform)
      uniform(run.x0, run.x1, run.w);
    else
      mixed(run.x0, run.x1, rw.pixel());
  }
}

// Whether any of the kGroup weights from w on is not 0.
template <typename acc_t>
bool any_weight(const acc_t* w) {
  bool any = false;
  for (int64_t j = 0; j < kGroup; ++j) any |= w[j] != acc_t(0);
  return any;
}

// Sum over the row's pixels of w * jeffreys(a, b): a uniform run as w * (its sum), a mixed
// block in kLanes lanes where a pixel of weight 0 adds an exact 0 (a select, not 0 * J: its
// logits may be anything). Added in a fixed order: deterministic.
template <typename scalar_t, typename acc_t>
acc_t weighted_jeffreys_row(const scalar_t* a, const scalar_t* b, const RowWeights<acc_t>& rw,
                            int64_t next_row) {
  acc_t total = 0;
  acc_t lanes[kLanes] = {};
  bool any_mixed = false;  // lanes that were never added to would add 16 zeros to total
  for_each_run<acc_t>(
      rw, [](int64_t, int64_t) {},
      [&](int64_t x0, int64_t x1, acc_t w) {
        prefetch_next_row(a, b, x0, x1, next_row);
        total += w * jeffreys_sum<scalar_t, acc_t>(a + x0, b + x0, x1 - x0);
      },
      [&](int64_t x0, int64_t x1, const acc_t* wp) {
        prefetch_next_row(a, b, x0, x1, next_row);
        any_mixed = true;
        if (x1 - x0 < kLanes) {  // the row's last, partial block
          for (int64_t x = x0; x < x1; ++x)
            if (wp[x] != acc_t(0)) lanes[x - x0] += wp[x] * jeffreys(acc_t(a[x]), acc_t(b[x]));
          return;
        }
        for (int64_t g = 0; g < kLanes; g += kGroup) {
          if (!any_weight(wp + x0 + g)) continue;
          for (int64_t j = g; j < g + kGroup; ++j) {
            const acc_t J = jeffreys(acc_t(a[x0 + j]), acc_t(b[x0 + j]));
            lanes[j] += wp[x0 + j] != acc_t(0) ? wp[x0 + j] * J : acc_t(0);
          }
        }
      });
  if (any_mixed)
    for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// ga[x], gb[x] = w[x] * dJ/da, w[x] * dJ/db over the row; exact zeros where w[x] = 0.
template <typename scalar_t, typename acc_t>
void weighted_jeffreys_grad_row(const scalar_t* a, const scalar_t* b,
                                const RowWeights<acc_t>& rw, scalar_t* ga, scalar_t* gb,
                                int64_t next_row) {
  for_each_run<acc_t>(
      rw,
      [&](int64_t x0, int64_t x1) {
        std::fill(ga + x0, ga + x1, scalar_t(0));
        std::fill(gb + x0, gb + x1, scalar_t(0));
      },
      [&](int64_t x0, int64_t x1, acc_t w) {
        prefetch_next_row(a, b, x0, x1, next_row);
        jeffreys_grad_run(a + x0, b + x0, x1 - x0, w, ga + x0, gb + x0);
      },
      [&](int64_t x0, int64_t x1, const acc_t* wp) {
        prefetch_next_row(a, b, x0, x1, next_row);
        for (int64_t g0 = x0; g0 < x1; g0 += kGroup) {
          const int64_t g1 = std::min(x1, g0 + kGroup);
          if (g1 - g0 == kGroup && !any_weight(wp + g0)) {
            std::fill(ga + g0, ga + g1, scalar_t(0));
            std::fill(gb + g0, gb + g1, scalar_t(0));
            continue;
          }
          for (int64_t x = g0; x < g1; ++x) {
            acc_t da, db;
            jeffreys_grad(acc_t(a[x]), acc_t(b[x]), da, db);
            const bool counted = wp[x] != acc_t(0);
            ga[x] = scalar_t(counted ? wp[x] * da : acc_t(0));
            gb[x] = scalar_t(counted ? wp[x] * db : acc_t(0));
          }
        }
      });
}

}  // namespace

at::Tensor pivot_forward_cpu(const at::Tensor& logit_a, const at::Tensor& logit_b,
                             const at::Tensor& klass_in, int64_t patch, double weight_contour,
                             double weight_other) {
  check_inputs(logit_a, logit_b, klass_in, patch);
  const at::Tensor a = logit_a.contiguous(), b = logit_b.contiguous(), klass = klass_in.contiguous();
  const int64_t B = a.size(0), H = a.size(2), W = a.size(3);
  const int64_t gh = contour::cells(H, patch), gw = contour::cells(W, patch);
  const at::ScalarType acc = at::toOpMathType(a.scalar_type());
  at::Tensor loss = at::zeros({}, a.options().dtype(acc));
  if (a.numel() == 0) return loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "pivot_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const int8_t* pk = klass.const_data_ptr<int8_t>();
    const acc_t wc = acc_t(weight_contour), wo = acc_t(weight_other);
    std::vector<double> row_sum(B * H, 0.0);
    at::parallel_for(0, B * H, rows_per_task(W), [&](int64_t begin, int64_t end) {
      RowWeights<acc_t> weights(gw, W, wc, wo);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / H, y = row % H;
        // The pixel rows of one cell row share its weights.
        if (row == begin || y % patch == 0)
          weights.set(pk + (bi * gh + y / patch) * gw, gw, W, patch);
        const int64_t next_row = row + 1 < B * H ? W : 0;
        row_sum[row] = double(
            weighted_jeffreys_row<scalar_t, acc_t>(pa + row * W, pb + row * W, weights, next_row));
      }
    });
    double total = 0;
    for (double s : row_sum) total += s;
    const double weights = weight_total<double>(pk, B, H, W, patch, weight_contour, weight_other);
    loss.fill_(weights != 0 ? total / weights : 0.0);
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> pivot_backward_cpu(const at::Tensor& grad,
                                                      const at::Tensor& logit_a,
                                                      const at::Tensor& logit_b,
                                                      const at::Tensor& klass_in, int64_t patch,
                                                      double weight_contour, double weight_other) {
  check_inputs(logit_a, logit_b, klass_in, patch);
  const at::Tensor a = logit_a.contiguous(), b = logit_b.contiguous(), klass = klass_in.contiguous();
  const int64_t B = a.size(0), H = a.size(2), W = a.size(3);
  const int64_t gh = contour::cells(H, patch), gw = contour::cells(W, patch);
  if (a.numel() == 0) return {at::zeros_like(a), at::zeros_like(b)};
  const double weights =
      weight_total<double>(klass.const_data_ptr<int8_t>(), B, H, W, patch, weight_contour, weight_other);
  if (weights == 0) return {at::zeros_like(a), at::zeros_like(b)};
  at::Tensor grad_a = at::empty_like(a, at::MemoryFormat::Contiguous);
  at::Tensor grad_b = at::empty_like(b, at::MemoryFormat::Contiguous);
  const double scale = grad.item<double>() / weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "pivot_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const int8_t* pk = klass.const_data_ptr<int8_t>();
    scalar_t* ga = grad_a.data_ptr<scalar_t>();
    scalar_t* gb = grad_b.data_ptr<scalar_t>();
    const acc_t wc = acc_t(weight_contour * scale), wo = acc_t(weight_other * scale);
    at::parallel_for(0, B * H, rows_per_task(W), [&](int64_t begin, int64_t end) {
      RowWeights<acc_t> weights(gw, W, wc, wo);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / H, y = row % H;
        if (row == begin || y % patch == 0)
          weights.set(pk + (bi * gh + y / patch) * gw, gw, W, patch);
        // The gradients are empty, not zeroed, tensors: every pixel is written.
        const int64_t o = row * W;
        const int64_t next_row = row + 1 < B * H ? W : 0;
        weighted_jeffreys_grad_row<scalar_t, acc_t>(pa + o, pb + o, weights, ga + o, gb + o,
                                                    next_row);
      }
    });
  });
  return {grad_a, grad_b};
}

}  // namespace pivot
}  // namespace fastiml

// Registered once, by the base build; each op runs the kernel of the CPU level in force.
#if !defined(FASTIML_CPU_CAPABILITY)
FASTIML_CPU_DECLARE_LEVELS(pivot, pivot_forward_cpu)
FASTIML_CPU_DECLARE_LEVELS(pivot, pivot_backward_cpu)

TORCH_LIBRARY_IMPL(fastiml, CPU, m) {
  m.impl("pivot_consistency", FASTIML_CPU_DISPATCH(pivot, pivot_forward_cpu));
  m.impl("pivot_consistency_backward", FASTIML_CPU_DISPATCH(pivot, pivot_backward_cpu));
}
#endif
