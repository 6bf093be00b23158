// contour_mine and contour_band on the GPU: the math of ops/contour.h, the same arithmetic in the
// same order as the CPU kernels (ops/cpu/contour_kernel.cpp), so the results are identical.
//
// contour_mine: one thread per cell (a row of cells, the CPU's unit of work, would leave a GPU
// idle: 512^2 masks at p = 4 have 128 cell rows per image). The thread reads its p x p pixels row
// by row, in the mask's own dtype; neighbouring threads read neighbouring cells, so a warp reads
// contiguous runs of each mask row.
// contour_band: two passes through uint8 buffers: the row pass marks pixels whose row window
// [x - r, x + r] holds a tampered / an authentic valid pixel, the column pass counts those marks
// over [y - r, y + r]. Both are sliding-window counts over segments of a line (one thread per
// segment): O(1) per pixel, like the CPU kernel.
// Deterministic: no atomics, every output written by one thread. No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "ops/contour.h"

namespace fastiml {
namespace contour {
namespace {

constexpr int kThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `count` items.
unsigned blocks_for(int64_t count) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(count, kThreads),
                                                                      int64_t(1) << 20)));
}

at::Tensor contiguous_if_needed(const at::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

void check_mask(const at::Tensor& mask, const std::optional<at::Tensor>& valid, const char* op) {
  TORCH_CHECK(mask.dim() == 3, op, ": mask must be [B, H, W], got ", mask.sizes());
  TORCH_CHECK(mask.is_cuda(), op, ": mask must be a CUDA tensor here, got ", mask.device());
  TORCH_CHECK(!valid.has_value() || (valid->sizes() == mask.sizes() &&
                                     valid->scalar_type() == at::kBool &&
                                     valid->device() == mask.device()),
              op, ": valid must be a bool tensor of mask's shape ", mask.sizes(), " on ",
              mask.device());
}


template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    contour_mine_kernel(const scalar_t* __restrict__ mask, const bool* __restrict__ valid,
                        int64_t B, int64_t H, int64_t W, int64_t patch, float lo, float hi,
                        float* __restrict__ frac, int8_t* __restrict__ klass) {
  const int64_t gh = cells(H, patch), gw = cells(W, patch), total = B * gh * gw;
  for (int64_t cell = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; cell < total;
       cell += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t cx = cell % gw, row = cell / gw;  // row = b * gh + cy, as on the CPU
    const int64_t b = row / gh, y0 = (row % gh) * patch, y1 = min(H, y0 + patch);
    const int64_t x0 = cx * patch, x1 = min(W, x0 + patch);
    float sum = 0.0f;
    int64_t count = 0;
    if constexpr (kBinaryMask<scalar_t>) {  // integer counts, as on the CPU: any order is exact
      int64_t tampered = 0;
      for (int64_t y = y0; y < y1; ++y) {
        const int64_t offset = (b * H + y) * W;
        for (int64_t x = x0; x < x1; ++x) {
          const bool keep = valid == nullptr || valid[offset + x];
          tampered += keep && mask[offset + x] != 0;
          count += keep;
        }
      }
      sum = static_cast<float>(tampered);
    } else {
      for (int64_t y = y0; y < y1; ++y) {  // per mask row, then into the cell: the CPU's order
        const int64_t offset = (b * H + y) * W;
        float s = 0.0f;
        int64_t c = 0;
        for (int64_t x = x0; x < x1; ++x) {
          const bool keep = valid == nullptr || valid[offset + x];
          s += keep ? tampered_weight(readable(mask[offset + x])) : 0.0f;
          c += keep;
        }
        sum += s;
        count += c;
      }
    }
    const float f = cell_fraction(sum, count);
    frac[cell] = f;
    klass[cell] = classify_cell(f, count, lo, hi);
  }
}

std::tuple<at::Tensor, at::Tensor> contour_mine_cuda(const at::Tensor& mask_in, int64_t patch,
                                                     double lo, double hi,
                                                     const std::optional<at::Tensor>& valid_in) {
  check_mask(mask_in, valid_in, "contour_mine");
  TORCH_CHECK(patch > 0, "contour_mine: patch must be > 0, got ", patch);
  TORCH_CHECK(lo < hi, "contour_mine: need lo < hi, got lo=", lo, " hi=", hi);
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = contiguous_if_needed(mask_in);
  const at::Tensor valid = valid_in.has_value() ? contiguous_if_needed(*valid_in) : at::Tensor();
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2);
  const int64_t gh = cells(H, patch), gw = cells(W, patch);
  at::Tensor frac = at::empty({B, gh, gw}, mask.options().dtype(at::kFloat));
  at::Tensor klass = at::empty({B, gh, gw}, mask.options().dtype(at::kChar));
  if (frac.numel() == 0) return {frac, klass};
  const bool* valid_p = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  FASTIML_DISPATCH_MASK(mask.scalar_type(), "contour_mine_cuda", [&] {
    contour_mine_kernel<scalar_t>
        <<<blocks_for(frac.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            mask.const_data_ptr<scalar_t>(), valid_p, B, H, W, patch, static_cast<float>(lo),
            static_cast<float>(hi), frac.data_ptr<float>(), klass.data_ptr<int8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {frac, klass};
}

// Both passes slide a window of 2r+1 marks along a segment of `seg` pixels of one line (a row,
// or a column), one thread per segment: the window's counts start with the marks before the
// segment (O(r) once per segment) and then change by one entering and one leaving mark per
// pixel -- O(1 + 2r / seg) per pixel. Segment length max(kSegment, 4r) keeps that below 1.5.
// Row pass: rt / ra = whether the row window [x - r, x + r] holds a tampered / an authentic
// valid pixel. Threads of a warp walk neighbouring rows; each reads its row's bytes in order,
// so the 32-byte sectors it loads serve its next 31 steps from L1.
constexpr int64_t kSegment = 128;

int64_t segment_length(int64_t radius) { return std::max<int64_t>(kSegment, 4 * radius); }

template <typename scalar_t>
__device__ __forceinline__ void row_marks(const scalar_t* mask, const bool* valid, int64_t i,
                                          int& t, int& a) {
  const bool keep = valid == nullptr || valid[i];
  const bool tampered = keep && is_tampered(readable(mask[i]));
  t = tampered;
  a = keep && !tampered;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    band_rows_kernel(const scalar_t* __restrict__ mask, const bool* __restrict__ valid,
                     int64_t rows, int64_t W, int64_t radius, int64_t seg,
                     uint8_t* __restrict__ rt, uint8_t* __restrict__ ra) {
  const int64_t segs = cells(W, seg), total = rows * segs;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i % rows, x0 = (i / rows) * seg, x1 = min(W, x0 + seg);
    const int64_t offset = row * W;
    int ct = 0, ca = 0, t, a;
    for (int64_t x = max(int64_t(0), x0 - radius); x < min(W, x0 + radius); ++x) {
      row_marks(mask, valid, offset + x, t, a);
      ct += t;
      ca += a;
    }
    for (int64_t x = x0; x < x1; ++x) {
      if (x + radius < W) {
        row_marks(mask, valid, offset + x + radius, t, a);
        ct += t;
        ca += a;
      }
      if (x > x0 && x - radius - 1 >= 0) {
        row_marks(mask, valid, offset + x - radius - 1, t, a);
        ct -= t;
        ca -= a;
      }
      rt[offset + x] = ct > 0;
      ra[offset + x] = ca > 0;
    }
  }
}

// Column pass: band = valid & (a tampered mark within [y - r, y + r]) & (an authentic one).
// Threads of a warp walk neighbouring columns: every step's reads are coalesced.
__global__ void __launch_bounds__(kThreads)
    band_columns_kernel(const uint8_t* __restrict__ rt, const uint8_t* __restrict__ ra,
                        const bool* __restrict__ valid, int64_t B, int64_t H, int64_t W,
                        int64_t radius, int64_t seg, bool* __restrict__ band) {
  const int64_t segs = cells(H, seg), total = B * segs * W;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % W, rest = i / W, y0 = (rest % segs) * seg, b = rest / segs;
    const int64_t y1 = min(H, y0 + seg), image = b * H * W + x;
    int ct = 0, ca = 0;
    for (int64_t y = max(int64_t(0), y0 - radius); y < min(H, y0 + radius); ++y) {
      ct += rt[image + y * W];
      ca += ra[image + y * W];
    }
    for (int64_t y = y0; y < y1; ++y) {
      if (y + radius < H) {
        ct += rt[image + (y + radius) * W];
        ca += ra[image + (y + radius) * W];
      }
      if (y > y0 && y - radius - 1 >= 0) {
        ct -= rt[image + (y - radius - 1) * W];
        ca -= ra[image + (y - radius - 1) * W];
      }
      const int64_t j = image + y * W;
      const bool keep = valid == nullptr || valid[j];
      band[j] = keep && ct > 0 && ca > 0;
    }
  }
}

at::Tensor contour_band_cuda(const at::Tensor& mask_in, int64_t radius,
                             const std::optional<at::Tensor>& valid_in) {
  check_mask(mask_in, valid_in, "contour_band");
  TORCH_CHECK(radius >= 0, "contour_band: radius must be >= 0, got ", radius);
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = contiguous_if_needed(mask_in);
  const at::Tensor valid = valid_in.has_value() ? contiguous_if_needed(*valid_in) : at::Tensor();
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2);
  if (B * H * W == 0 || radius == 0) return at::zeros({B, H, W}, mask.options().dtype(at::kBool));
  radius = std::min(radius, std::max(H, W));  // a wider window sees the whole image anyway
  at::Tensor band = at::empty({B, H, W}, mask.options().dtype(at::kBool));
  at::Tensor row_t = at::empty({B, H, W}, mask.options().dtype(at::kByte));
  at::Tensor row_a = at::empty({B, H, W}, mask.options().dtype(at::kByte));
  const bool* valid_p = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  const int64_t seg = segment_length(radius);
  const auto stream = at::cuda::getCurrentCUDAStream();
  FASTIML_DISPATCH_MASK(mask.scalar_type(), "contour_band_cuda", [&] {
    band_rows_kernel<scalar_t><<<blocks_for(B * H * ceil_div(W, seg)), kThreads, 0, stream>>>(
        mask.const_data_ptr<scalar_t>(), valid_p, B * H, W, radius, seg,
        row_t.data_ptr<uint8_t>(), row_a.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  band_columns_kernel<<<blocks_for(B * ceil_div(H, seg) * W), kThreads, 0, stream>>>(
      row_t.const_data_ptr<uint8_t>(), row_a.const_data_ptr<uint8_t>(), valid_p, B, H, W,
      radius, seg, band.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return band;
}

}  // namespace
}  // namespace contour
}  // namespace fastiml

TORCH_LIBRARY_IMPL(fastiml, CUDA, m) {
  m.impl("contour_mine", &fastiml::contour::contour_mine_cuda);
  m.impl("contour_band", &fastiml::contour::contour_band_cuda);
}
