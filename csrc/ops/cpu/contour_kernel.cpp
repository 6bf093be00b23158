// contour_mine and contour_band on the CPU: one pass over the mask, read in its own dtype, in
// vectorisable loops over whole rows (0/1 masks as bytes, counted in integers).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops/cpu/capability.h"
#include "ops/contour.h"

namespace FASTIML_NAMESPACE {
namespace contour {
namespace {

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

// out[c] = sum of the `patch` counts from in[c * patch], for the first `n` cells. Kp > 0 fixes
// the patch at compile time, so that the loop over cells vectorises (strided loads).
template <int64_t Kp, typename count_t>
void cell_sums(const count_t* in, int64_t n, int64_t patch, int32_t* out) {
  const int64_t p = Kp > 0 ? Kp : patch;
  for (int64_t c = 0; c < n; ++c) {
    int32_t s = 0;
    for (int64_t k = 0; k < p; ++k) s += in[c * p + k];
    out[c] = s;
  }
}

template <typename count_t>
void cell_sums_any(const count_t* in, int64_t n, int64_t patch, int32_t* out) {
  switch (patch) {
    case 2: return cell_sums<2>(in, n, patch, out);
    case 4: return cell_sums<4>(in, n, patch, out);
    case 8: return cell_sums<8>(in, n, patch, out);
    case 16: return cell_sums<16>(in, n, patch, out);
    default: return cell_sums<0>(in, n, patch, out);
  }
}

// The loops of mine_binary, as functions of values and restrict pointers: uint8 stores may alias
// anything, which otherwise keeps GCC from vectorising them.
template <typename count_t>
void count_row(const uint8_t* __restrict m, int64_t n, count_t* __restrict t) {
  for (int64_t x = 0; x < n; ++x) t[x] += m[x] != 0;
}

template <typename count_t>
void count_row_valid(const uint8_t* __restrict m, const uint8_t* __restrict k, int64_t n,
                     count_t* __restrict t, count_t* __restrict v) {
  for (int64_t x = 0; x < n; ++x) {
    t[x] += (m[x] != 0) & k[x];
    v[x] += k[x];
  }
}

void classify_cells(const int32_t* __restrict tampered, const int32_t* __restrict valid,
                    int64_t n, float lo, float hi, float* __restrict frac,
                    int8_t* __restrict klass) {
  for (int64_t c = 0; c < n; ++c) {
    const int32_t count = valid[c];
    const float f =
        count > 0 ? static_cast<float>(tampered[c]) / static_cast<float>(count) : 0.0f;
    frac[c] = f;
    const int32_t k = count == 0 ? kPadding : f <= lo ? kAuthentic : f >= hi ? kTampered : kContour;
    klass[c] = static_cast<int8_t>(k);
  }
}

// contour_mine of a 0/1 mask (bool, uint8): per row of cells, per-column counts of tampered
// (and valid) pixels over its p mask rows -- a vectorisable loop over whole mask rows -- then
// per cell the sum of its p columns, then the fractions and classes in a vectorisable loop
// over the cells (cell_fraction and classify_cell, written as selects). Integer counts: exact,
// in any order, so the results equal the CUDA kernel's. count_t holds a column's count over
// the p rows (uint8 for p < 256: 32 columns per AVX2 add).
template <typename scalar_t, typename count_t>
void mine_binary_counts(const scalar_t* mask_p, const bool* valid_p, int64_t B, int64_t H,
                        int64_t W, int64_t patch, float lo, float hi, float* frac_p,
                        int8_t* klass_p) {
  const int64_t gh = cells(H, patch), gw = cells(W, patch);
  const int64_t full = W / patch;  // cells without the partial last one
  at::parallel_for(0, B * gh, rows_per_task(patch * W), [&](int64_t begin, int64_t end) {
    std::vector<count_t> tampered(W), valid(valid_p ? W : 0);
    std::vector<int32_t> t_cell(gw), v_cell(gw);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / gh, y0 = (row % gh) * patch, y1 = std::min(H, y0 + patch);
      std::fill(tampered.begin(), tampered.end(), 0);
      std::fill(valid.begin(), valid.end(), 0);
      count_t* t = tampered.data();
      count_t* v = valid.data();
      for (int64_t y = y0; y < y1; ++y) {
        // bool is one byte holding 0 or 1: read both mask dtypes as bytes.
        const auto* m = reinterpret_cast<const uint8_t*>(mask_p + (b * H + y) * W);
        if (valid_p == nullptr)
          count_row(m, W, t);
        else
          count_row_valid(m, reinterpret_cast<const uint8_t*>(valid_p + (b * H + y) * W), W, t, v);
      }
      // Per cell: its columns' counts; without `valid`, every pixel of the cell counts.
      const int64_t h = y1 - y0;
      cell_sums_any(t, full, patch, t_cell.data());
      if (valid_p) cell_sums_any(v, full, patch, v_cell.data());
      else std::fill(v_cell.begin(), v_cell.begin() + full, int32_t(h * patch));
      if (full < gw) {  // the partial last cell
        int32_t st = 0, sv = 0;
        for (int64_t x = full * patch; x < W; ++x) {
          st += t[x];
          sv += valid_p ? v[x] : int32_t(h);
        }
        t_cell[full] = st;
        v_cell[full] = sv;
      }
      classify_cells(t_cell.data(), v_cell.data(), gw, lo, hi, frac_p + row * gw,
                     klass_p + row * gw);
    }
  });
}

template <typename scalar_t>
void mine_binary(const scalar_t* mask_p, const bool* valid_p, int64_t B, int64_t H, int64_t W,
                 int64_t patch, float lo, float hi, float* frac_p, int8_t* klass_p) {
  const auto run = [&](auto count_type) {
    using count_t = decltype(count_type);
    mine_binary_counts<scalar_t, count_t>(mask_p, valid_p, B, H, W, patch, lo, hi, frac_p,
                                          klass_p);
  };
  if (patch <= 255)
    run(uint8_t{});
  else if (patch <= 65535)
    run(uint16_t{});
  else
    run(int32_t{});
}

}  // namespace

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
    if constexpr (kBinaryMask<scalar_t>) {
      mine_binary(mask_p, valid_p, B, H, W, patch, flo, fhi, frac_p, klass_p);
      return;
    }
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

namespace {

// out[i] = a[i] | b[i]: the step of the window ORs below (vectorises: 32 pixels per AVX2 op).
void or_rows(const uint8_t* __restrict a, const uint8_t* __restrict b, int64_t n,
             uint8_t* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] | b[i];
}

// out[x] = OR of in[x - r .. x + r] (clipped to the row), for 0/1 bytes. Window ORs by doubling:
// ceil(log2(2r + 1)) vectorised passes over the row instead of a serial scan. `pad` and `tmp`
// hold W + 2r bytes each.
void dilate_row(const uint8_t* in, int64_t W, int64_t r, uint8_t* out, uint8_t* pad,
                uint8_t* tmp) {
  const int64_t k = 2 * r + 1;
  std::memset(pad, 0, r);
  std::memcpy(pad + r, in, W);
  std::memset(pad + r + W, 0, r);
  uint8_t* g = pad;  // g[i] = OR of the padded row over [i, i + width), for i < len
  uint8_t* h = tmp;
  int64_t width = 1, len = W + 2 * r;
  while (2 * width <= k) {
    or_rows(g, g + width, len - width, h);
    len -= width;
    width *= 2;
    std::swap(g, h);
  }
  or_rows(g, g + (k - width), W, out);  // [x, x + width) and [x + k - width, x + k) cover k
}

// 0/1 bytes of the tampered and of the authentic valid pixels of one mask row.
template <typename scalar_t>
void split_row(const scalar_t* __restrict m, const bool* __restrict valid, int64_t n,
               uint8_t* __restrict t, uint8_t* __restrict a) {
  if constexpr (kBinaryMask<scalar_t>) {
    const auto* mb = reinterpret_cast<const uint8_t*>(m);
    if (valid == nullptr) {
      for (int64_t x = 0; x < n; ++x) {
        t[x] = mb[x] != 0;
        a[x] = mb[x] == 0;
      }
    } else {
      const auto* k = reinterpret_cast<const uint8_t*>(valid);
      for (int64_t x = 0; x < n; ++x) {
        t[x] = (mb[x] != 0) & k[x];
        a[x] = (mb[x] == 0) & k[x];
      }
    }
  } else {
    for (int64_t x = 0; x < n; ++x) {
      const bool keep = valid == nullptr || valid[x];
      const bool tampered = is_tampered(readable(m[x]));
      t[x] = keep && tampered;
      a[x] = keep && !tampered;
    }
  }
}

// The column pass's window counts: count[x] += sign * marks[x] over one strip row.
template <typename count_t>
void add_marks(const uint8_t* __restrict marks, int64_t n, count_t* __restrict count) {
  for (int64_t x = 0; x < n; ++x) count[x] += marks[x];
}
template <typename count_t>
void remove_marks(const uint8_t* __restrict marks, int64_t n, count_t* __restrict count) {
  for (int64_t x = 0; x < n; ++x) count[x] -= marks[x];
}
template <typename count_t>
void band_of_counts(const count_t* __restrict ct, const count_t* __restrict ca,
                    const uint8_t* __restrict valid, int64_t n, uint8_t* __restrict out) {
  if (valid == nullptr)
    for (int64_t x = 0; x < n; ++x) out[x] = (ct[x] != 0) & (ca[x] != 0);
  else
    for (int64_t x = 0; x < n; ++x) out[x] = (ct[x] != 0) & (ca[x] != 0) & valid[x];
}

// contour_band over blocks of rows, one block per task: the row pass marks the block's rows and
// r rows of halo on each side into per-thread buffers (no image-sized temporaries), then the
// column pass slides a window of 2r+1 rows down the block, counting those marks (O(1) per
// pixel: one row enters, one leaves).
template <typename scalar_t, typename count_t>
void band_blocks(const scalar_t* mask_p, const bool* valid_p, int64_t B, int64_t H, int64_t W,
                 int64_t radius, bool* band) {
  const int64_t rows = std::min(H, std::max<int64_t>(64, 4 * radius));  // halo <= 1/2 extra
  const int64_t blocks = cells(H, rows);
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t span = std::min(H, rows + 2 * radius);
    std::vector<uint8_t> t(W), a(W), pad(W + 2 * radius), tmp(W + 2 * radius);
    std::vector<uint8_t> rt(span * W), ra(span * W);
    std::vector<count_t> ct(W), ca(W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, y0 = (task % blocks) * rows, y1 = std::min(H, y0 + rows);
      const int64_t ya = std::max<int64_t>(0, y0 - radius), yb = std::min(H, y1 + radius);
      for (int64_t y = ya; y < yb; ++y) {  // row pass
        const int64_t offset = (b * H + y) * W;
        split_row(mask_p + offset, valid_p ? valid_p + offset : nullptr, W, t.data(), a.data());
        dilate_row(t.data(), W, radius, rt.data() + (y - ya) * W, pad.data(), tmp.data());
        dilate_row(a.data(), W, radius, ra.data() + (y - ya) * W, pad.data(), tmp.data());
      }
      const auto marks_t = [&](int64_t y) { return rt.data() + (y - ya) * W; };
      const auto marks_a = [&](int64_t y) { return ra.data() + (y - ya) * W; };
      std::fill(ct.begin(), ct.end(), 0);
      std::fill(ca.begin(), ca.end(), 0);
      for (int64_t y = ya; y < std::min(H, y0 + radius); ++y) {
        add_marks(marks_t(y), W, ct.data());
        add_marks(marks_a(y), W, ca.data());
      }
      for (int64_t y = y0; y < y1; ++y) {  // column pass: window [y - r, y + r]
        if (y + radius < H) {
          add_marks(marks_t(y + radius), W, ct.data());
          add_marks(marks_a(y + radius), W, ca.data());
        }
        if (y - radius - 1 >= ya) {
          remove_marks(marks_t(y - radius - 1), W, ct.data());
          remove_marks(marks_a(y - radius - 1), W, ca.data());
        }
        const int64_t offset = (b * H + y) * W;
        band_of_counts(ct.data(), ca.data(),
                       valid_p ? reinterpret_cast<const uint8_t*>(valid_p + offset) : nullptr, W,
                       reinterpret_cast<uint8_t*>(band + offset));
      }
    }
  });
}

}  // namespace

// band = valid & (some tampered pixel within the window) & (some authentic pixel within it),
// the window being the (2r+1)^2 square around the pixel, in two separable passes: per row,
// window ORs of the tampered / authentic marks; per column, sliding-window counts of those.
at::Tensor contour_band_cpu(const at::Tensor& mask_in, int64_t radius,
                            const std::optional<at::Tensor>& valid_in) {
  check_mask(mask_in, valid_in, "contour_band");
  TORCH_CHECK(radius >= 0, "contour_band: radius must be >= 0, got ", radius);
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2);
  if (B * H * W == 0 || radius == 0) return at::zeros({B, H, W}, mask.options().dtype(at::kBool));
  // A window wider than the image sees all of it: clip r so the buffers stay small.
  radius = std::min(radius, std::max(H, W));
  at::Tensor band = at::empty({B, H, W}, mask.options().dtype(at::kBool));
  const bool* valid_p = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  bool* out = band.data_ptr<bool>();
  FASTIML_DISPATCH_MASK(mask.scalar_type(), "contour_band_cpu", [&] {
    const scalar_t* mask_p = mask.const_data_ptr<scalar_t>();
    if (2 * radius + 1 <= 65535)
      band_blocks<scalar_t, uint16_t>(mask_p, valid_p, B, H, W, radius, out);
    else
      band_blocks<scalar_t, int32_t>(mask_p, valid_p, B, H, W, radius, out);
  });
  return band;
}

}  // namespace contour
}  // namespace fastiml

// Registered once, by the base build; each op runs the kernel of the CPU level in force.
#if !defined(FASTIML_CPU_CAPABILITY)
FASTIML_CPU_DECLARE_LEVELS(contour, contour_mine_cpu)
FASTIML_CPU_DECLARE_LEVELS(contour, contour_band_cpu)

TORCH_LIBRARY_IMPL(fastiml, CPU, m) {
  m.impl("contour_mine", FASTIML_CPU_DISPATCH(contour, contour_mine_cpu));
  m.impl("contour_band", FASTIML_CPU_DISPATCH(contour, contour_band_cpu));
}
#endif
