// pivot_consistency on the CPU: reads each pixel's patch class by index (no upsampled mask),
// closed-form backward. Row partial sums are added in a fixed order: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/pivot.h"

namespace fastiml {
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
    at::parallel_for(0, B * H, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, W)), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / H, y = row % H;
        const int8_t* krow = pk + (bi * gh + y / patch) * gw;
        acc_t s = 0;
        for (int64_t x = 0; x < W; ++x) {
          const acc_t w = pixel_weight(krow[x / patch], wc, wo);
          if (w != acc_t(0)) s += w * jeffreys(acc_t(pa[row * W + x]), acc_t(pb[row * W + x]));
        }
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
  at::Tensor grad_a = at::zeros_like(a), grad_b = at::zeros_like(b);
  if (a.numel() == 0) return {grad_a, grad_b};
  const double weights =
      weight_total<double>(klass.const_data_ptr<int8_t>(), B, H, W, patch, weight_contour, weight_other);
  if (weights == 0) return {grad_a, grad_b};
  const double scale = grad.item<double>() / weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "pivot_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const int8_t* pk = klass.const_data_ptr<int8_t>();
    scalar_t* ga = grad_a.data_ptr<scalar_t>();
    scalar_t* gb = grad_b.data_ptr<scalar_t>();
    const acc_t wc = acc_t(weight_contour * scale), wo = acc_t(weight_other * scale);
    at::parallel_for(0, B * H, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, W)), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / H, y = row % H;
        const int8_t* krow = pk + (bi * gh + y / patch) * gw;
        for (int64_t x = 0; x < W; ++x) {
          const acc_t w = pixel_weight(krow[x / patch], wc, wo);
          if (w == acc_t(0)) continue;
          acc_t da, db;
          jeffreys_grad(acc_t(pa[row * W + x]), acc_t(pb[row * W + x]), da, db);
          ga[row * W + x] = scalar_t(w * da);
          gb[row * W + x] = scalar_t(w * db);
        }
      }
    });
  });
  return {grad_a, grad_b};
}

}  // namespace
}  // namespace pivot
}  // namespace fastiml

TORCH_LIBRARY_IMPL(fastiml, CPU, m) {
  m.impl("pivot_consistency", &fastiml::pivot::pivot_forward_cpu);
  m.impl("pivot_consistency_backward", &fastiml::pivot::pivot_backward_cpu);
}
