// contour_mine and contour_band on the CPU: one pass over the mask, read in its own dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/contour.h"

namespace fastiml {
namespace contour {
namespace {

constexpr int64_t kStrip = 256;  // columns per task in contour_band's vertical pass

void check_mask(const at::Tensor& mask, const std::optional<at::Tensor>& valid, const char* op) {
  TORCH_CHECK(mask.dim() == 3, op, ": mask must be [B, H, W], got ", mask.sizes());
  TORCH_CHECK(!valid.has_value() || (valid->sizes() == mask.sizes() &&
                                     valid->scalar_type() == at::kBool &&
                                     valid->device() == mask.device()),
              op, ": valid must be a bool tensor of mask's shape ", mask.sizes());
}

// Rows of `width` pixels per parallel task: at least ~64K pixels, so small masks run inline.
int64_t rows_per_task(int64_t width) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, width));
}

std::tuple<at::Tensor, at::Tensor> contour_mine_cpu(const at::Tensor& mask_in, int64_t patch,
                                                    double lo, double hi,
                                                    const std::optional<at::Tensor>& valid_in) {
  check_mask(mask_in, valid_in, "contour_mine");
  TORCH_CHECK(patch > 0, "contour_mine: patch must be > 0, got ", patch);
  TORCH_CHECK(lo < hi, "contour_mine: need lo < hi, got lo=", lo, " hi=", hi);
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2);
  const int64_t gh = cells(H, patch), gw = cells(W, patch);
  at::Tensor frac = at::empty({B, gh, gw}, mask.options().dtype(at::kFloat));
  at::Tensor klass = at::empty({B, gh, gw}, mask.options().dtype(at::kChar));
  if (frac.numel() == 0) return {frac, klass};
  const bool* valid_p = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  float* frac_p = frac.data_ptr<float>();
  int8_t* klass_p = klass.data_ptr<int8_t>();
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  FASTIML_DISPATCH_MASK(mask.scalar_type(), "contour_mine_cpu", [&] {
    const scalar_t* mask_p = mask.const_data_ptr<scalar_t>();
    // One task per row of cells: the p mask rows under it are read once, left to right.
    at::parallel_for(0, B * gh, rows_per_task(patch * W), [&](int64_t begin, int64_t end) {
      std::vector<float> sum(gw);
      std::vector<int64_t> count(gw);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / gh, y0 = (row % gh) * patch, y1 = std::min(H, y0 + patch);
        std::fill(sum.begin(), sum.end(), 0.0f);
        std::fill(count.begin(), count.end(), 0);
        for (int64_t y = y0; y < y1; ++y) {
          const int64_t offset = (b * H + y) * W;
          const scalar_t* m = mask_p + offset;
          const bool* v = valid_p ? valid_p + offset : nullptr;
          for (int64_t cx = 0; cx < gw; ++cx) {
            const int64_t x1 = std::min(W, (cx + 1) * patch);
            float s = 0.0f;
            int64_t c = 0;
            for (int64_t x = cx * patch; x < x1; ++x) {
              const bool keep = v == nullptr || v[x];
              s += keep ? tampered_weight(readable(m[x])) : 0.0f;
              c += keep;
            }
            sum[cx] += s;
            count[cx] += c;
          }
        }
        for (int64_t cx = 0; cx < gw; ++cx) {
          const float f = cell_fraction(sum[cx], count[cx]);
          frac_p[row * gw + cx] = f;
          klass_p[row * gw + cx] = classify_cell(f, count[cx], flo, fhi);
        }
      }
    });
  });
  return {frac, klass};
}

// band = valid & (some tampered pixel within the window) & (some authentic pixel within it),
// the window being the (2r+1)^2 square around the pixel: two separable sliding-window counts.
at::Tensor contour_band_cpu(const at::Tensor& mask_in, int64_t radius,
                            const std::optional<at::Tensor>& valid_in) {
  check_mask(mask_in, valid_in, "contour_band");
  TORCH_CHECK(radius >= 0, "contour_band: radius must be >= 0, got ", radius);
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2);
  at::Tensor band = at::zeros({B, H, W}, mask.options().dtype(at::kBool));
  if (band.numel() == 0 || radius == 0) return band;
  // Row pass: per pixel, whether its row window holds a tampered / an authentic valid pixel.
  at::Tensor row_t = at::empty({B, H, W}, mask.options().dtype(at::kByte));
  at::Tensor row_a = at::empty({B, H, W}, mask.options().dtype(at::kByte));
  const bool* valid_p = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  uint8_t* rt = row_t.data_ptr<uint8_t>();
  uint8_t* ra = row_a.data_ptr<uint8_t>();
  FASTIML_DISPATCH_MASK(mask.scalar_type(), "contour_band_cpu", [&] {
    const scalar_t* mask_p = mask.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, rows_per_task(W), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> pt(W + 1), pa(W + 1);  // prefix counts along the row
      for (int64_t row = begin; row < end; ++row) {
        const int64_t offset = row * W;
        for (int64_t x = 0; x < W; ++x) {
          const bool keep = valid_p == nullptr || valid_p[offset + x];
          const bool t = keep && is_tampered(readable(mask_p[offset + x]));
          pt[x + 1] = pt[x] + t;
          pa[x + 1] = pa[x] + (keep && !t);
        }
        for (int64_t x = 0; x < W; ++x) {
          const int64_t x0 = std::max<int64_t>(0, x - radius), x1 = std::min(W, x + radius + 1);
          rt[offset + x] = pt[x1] - pt[x0] > 0;
          ra[offset + x] = pa[x1] - pa[x0] > 0;
        }
      }
    });
  });
  // Column pass: a sliding window of 2r+1 rows over strips of columns.
  bool* out = band.data_ptr<bool>();
  const int64_t strips = cells(W, kStrip);
  at::parallel_for(0, B * strips, std::max<int64_t>(1, rows_per_task(H * kStrip)),
                   [&](int64_t begin, int64_t end) {
    std::vector<int32_t> ct(kStrip), ca(kStrip);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / strips, xs = (task % strips) * kStrip;
      const int64_t xw = std::min(kStrip, W - xs);
      std::fill(ct.begin(), ct.end(), 0);
      std::fill(ca.begin(), ca.end(), 0);
      const auto add_row = [&](int64_t y, int32_t sign) {
        const int64_t offset = (b * H + y) * W + xs;
        for (int64_t x = 0; x < xw; ++x) {
          ct[x] += sign * rt[offset + x];
          ca[x] += sign * ra[offset + x];
        }
      };
      for (int64_t y = 0; y < std::min(H, radius); ++y) add_row(y, 1);
      for (int64_t y = 0; y < H; ++y) {
        if (y + radius < H) add_row(y + radius, 1);
        if (y - radius - 1 >= 0) add_row(y - radius - 1, -1);
        const int64_t offset = (b * H + y) * W + xs;
        for (int64_t x = 0; x < xw; ++x) {
          const bool keep = valid_p == nullptr || valid_p[offset + x];
          out[offset + x] = keep && ct[x] > 0 && ca[x] > 0;
        }
      }
    }
  });
  return band;
}

}  // namespace
}  // namespace contour
}  // namespace fastiml

TORCH_LIBRARY_IMPL(fastiml, CPU, m) {
  m.impl("contour_mine", &fastiml::contour::contour_mine_cpu);
  m.impl("contour_band", &fastiml::contour::contour_band_cpu);
}
