// pivot_consistency on the CPU: walks each pixel row cell by cell -- the class is read once per
// cell, runs of cells with the same weight are merged, zero-weight runs are skipped (forward) or
// zero-filled (backward) -- and the pixels of a run go through a vectorisable loop (branch-free
// sigmoid, no division by the patch). Closed-form backward. Row partial sums are added in a
// fixed order: deterministic.
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

// Sum over pixels of the weights: per cell, its weight times its number of pixels.
template <typename acc_t>
acc_t weight_total(const int8_t* klass, int64_t B, int64_t H, int64_t W, int64_t patch,
                   acc_t wc, acc_t wo) {
  const int64_t gh = contour::cells(H, patch), gw = contour::cells(W, patch);
  acc_t total = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t cy = 0; cy < gh; ++cy)
      for (int64_t cx = 0; cx < gw; ++cx) {
        const int64_t h = std::min(patch, H - cy * patch), w = std::min(patch, W - cx * patch);
        total += pixel_weight(klass[(b * gh + cy) * gw + cx], wc, wo) * acc_t(h * w);
      }
  return total;
}

// Rows of `width` pixels per parallel task: at least ~32K pixels.
int64_t rows_per_task(int64_t width) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, width));
}

// Calls visit(x0, x1, w) for each maximal run of the pixel row [0, W) whose cells all have the
// same weight w (zero-weight runs included: the backward writes zeros there).
template <typename acc_t, typename Visit>
void for_each_run(const int8_t* krow, int64_t gw, int64_t W, int64_t patch, acc_t wc, acc_t wo,
                  Visit&& visit) {
  int64_t cx = 0;
  while (cx < gw) {
    const acc_t w = pixel_weight(krow[cx], wc, wo);
    int64_t end = cx + 1;
    while (end < gw && pixel_weight(krow[end], wc, wo) == w) ++end;
    visit(cx * patch, std::min(W, end * patch), w);
    cx = end;
  }
}

constexpr int64_t kLanes = 16;  // independent partial sums: a vectorisable reduction

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
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / H, y = row % H;
        const int8_t* krow = pk + (bi * gh + y / patch) * gw;
        const scalar_t* ra = pa + row * W;
        const scalar_t* rb = pb + row * W;
        double s = 0;
        for_each_run<acc_t>(krow, gw, W, patch, wc, wo, [&](int64_t x0, int64_t x1, acc_t w) {
          if (w != acc_t(0)) s += double(w * jeffreys_sum<scalar_t, acc_t>(ra + x0, rb + x0, x1 - x0));
        });
        row_sum[row] = s;
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
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / H, y = row % H;
        const int8_t* krow = pk + (bi * gh + y / patch) * gw;
        const int64_t o = row * W;
        for_each_run<acc_t>(krow, gw, W, patch, wc, wo, [&](int64_t x0, int64_t x1, acc_t w) {
          if (w == acc_t(0)) {  // the gradients are empty, not zeroed, tensors: write the zeros
            std::fill(ga + o + x0, ga + o + x1, scalar_t(0));
            std::fill(gb + o + x0, gb + o + x1, scalar_t(0));
          } else {
            jeffreys_grad_run(pa + o + x0, pb + o + x0, x1 - x0, w, ga + o + x0, gb + o + x0);
          }
        });
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
