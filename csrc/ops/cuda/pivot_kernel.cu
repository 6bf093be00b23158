// pivot_consistency on the GPU: the math of ops/pivot.h, as the CPU kernel computes it
// (ops/cpu/pivot_kernel.cpp): per pixel J and its gradient in the accumulation dtype (float32,
// float64 for float64 logits), klass read by index (no upsampled mask), the weight total from the
// cells, sum(w J) / sum(w) and 0 when sum(w) = 0.
//
// Sums are deterministic and need no host synchronisation: a fixed number of blocks (set by the
// shape only, not by the GPU) write double partial sums, reduced in shared memory in a fixed
// tree; one single-block kernel adds the partials in order and writes the loss (forward) or the
// gradient scale grad / sum(w) (backward), which the per-pixel gradient kernel reads from device
// memory -- where the CPU kernel calls grad.item(), this path never waits for the GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/contour.h"
#include "ops/pivot.h"

namespace fastiml {
namespace pivot {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxReduceBlocks = 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor contiguous_if_needed(const at::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

void check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& klass,
                  int64_t patch) {
  TORCH_CHECK(a.dim() == 4 && a.size(1) == 1,
              "pivot_consistency: logit_a must be [B, 1, H, W], got ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes() && b.scalar_type() == a.scalar_type(),
              "pivot_consistency: logit_b must match logit_a's shape and dtype");
  TORCH_CHECK(patch > 0, "pivot_consistency: patch must be > 0, got ", patch);
  TORCH_CHECK(klass.scalar_type() == at::kChar && klass.dim() == 3 &&
                  klass.size(0) == a.size(0) &&
                  klass.size(1) == contour::cells(a.size(2), patch) &&
                  klass.size(2) == contour::cells(a.size(3), patch),
              "pivot_consistency: klass must be int8 [B, ceil(H/patch), ceil(W/patch)]");
  TORCH_CHECK(a.is_cuda() && b.device() == a.device() && klass.device() == a.device(),
              "pivot_consistency: logit_a, logit_b and klass must be on one CUDA device, got ",
              a.device(), ", ", b.device(), ", ", klass.device());
}

// Sum of `v` over the block, in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

struct Shape {
  int64_t B, H, W, patch, gh, gw;
};

// Per block: partial[0][block] = sum over its pixels of w J (when `logits`), partial[1][block] =
// sum over its cells of w * (pixels in the cell) -- weight_total of the CPU kernel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    partial_sums_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                        const int8_t* __restrict__ klass, Shape s, acc_t wc, acc_t wo,
                        double wc_total, double wo_total, bool logits,
                        double* __restrict__ partial) {
  __shared__ double shared[kThreads];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double loss = 0.0;
  if (logits) {
    const int64_t pixels = s.B * s.H * s.W;
    for (int64_t i = first; i < pixels; i += stride) {
      const int64_t x = i % s.W, row = i / s.W, bi = row / s.H, y = row % s.H;
      const acc_t w = pixel_weight(klass[(bi * s.gh + y / s.patch) * s.gw + x / s.patch], wc, wo);
      if (w != acc_t(0)) loss += static_cast<double>(w * jeffreys(acc_t(a[i]), acc_t(b[i])));
    }
  }
  double weights = 0.0;
  const int64_t cells = s.B * s.gh * s.gw;
  for (int64_t c = first; c < cells; c += stride) {
    const int64_t cx = c % s.gw, cy = (c / s.gw) % s.gh;
    const int64_t h = min(s.patch, s.H - cy * s.patch), w = min(s.patch, s.W - cx * s.patch);
    weights += pixel_weight(klass[c], wc_total, wo_total) * static_cast<double>(h * w);
  }
  const double block_loss = block_sum(loss, shared);
  __syncthreads();  // shared is reused
  const double block_weights = block_sum(weights, shared);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = block_loss;
    partial[gridDim.x + blockIdx.x] = block_weights;
  }
}

// One block: totals of the partials, then the loss (forward) or the gradient scale (backward).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const double* __restrict__ partial, int blocks, const double* __restrict__ grad,
                  acc_t* __restrict__ loss, double* __restrict__ scale) {
  __shared__ double shared[kThreads];
  double l = 0.0, w = 0.0;
  for (int i = threadIdx.x; i < blocks; i += kThreads) {
    l += partial[i];
    w += partial[blocks + i];
  }
  const double total = block_sum(l, shared);
  __syncthreads();
  const double weights = block_sum(w, shared);
  if (threadIdx.x == 0) {
    if (loss != nullptr) *loss = static_cast<acc_t>(weights != 0.0 ? total / weights : 0.0);
    if (scale != nullptr) *scale = weights != 0.0 ? *grad / weights : 0.0;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gradient_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                    const int8_t* __restrict__ klass, Shape s, double weight_contour,
                    double weight_other, const double* __restrict__ scale_p,
                    scalar_t* __restrict__ grad_a, scalar_t* __restrict__ grad_b) {
  const double scale = *scale_p;
  // As the CPU kernel: the weights times the scale, rounded to the accumulation dtype.
  const acc_t wc = acc_t(weight_contour * scale), wo = acc_t(weight_other * scale);
  const int64_t pixels = s.B * s.H * s.W;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pixels;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % s.W, row = i / s.W, bi = row / s.H, y = row % s.H;
    const acc_t w = pixel_weight(klass[(bi * s.gh + y / s.patch) * s.gw + x / s.patch], wc, wo);
    acc_t da = acc_t(0), db = acc_t(0);
    if (w != acc_t(0)) {
      jeffreys_grad(acc_t(a[i]), acc_t(b[i]), da, db);
      da *= w;
      db *= w;
    }
    grad_a[i] = static_cast<scalar_t>(da);
    grad_b[i] = static_cast<scalar_t>(db);
  }
}

Shape shape_of(const at::Tensor& a, int64_t patch) {
  Shape s;
  s.B = a.size(0);
  s.H = a.size(2);
  s.W = a.size(3);
  s.patch = patch;
  s.gh = contour::cells(s.H, patch);
  s.gw = contour::cells(s.W, patch);
  return s;
}

// Blocks of the partial sums: set by the shape alone, so that results do not depend on the GPU.
int reduce_blocks(const Shape& s) {
  const int64_t items = std::max(s.B * s.H * s.W, s.B * s.gh * s.gw);
  return static_cast<int>(
      std::max<int64_t>(1, std::min(kMaxReduceBlocks, ceil_div(items, kThreads))));
}

at::Tensor pivot_forward_cuda(const at::Tensor& logit_a, const at::Tensor& logit_b,
                              const at::Tensor& klass_in, int64_t patch, double weight_contour,
                              double weight_other) {
  check_inputs(logit_a, logit_b, klass_in, patch);
  const c10::cuda::CUDAGuard guard(logit_a.device());
  const at::Tensor a = contiguous_if_needed(logit_a), b = contiguous_if_needed(logit_b);
  const at::Tensor klass = contiguous_if_needed(klass_in);
  const at::ScalarType acc = at::toOpMathType(a.scalar_type());
  at::Tensor loss = at::zeros({}, a.options().dtype(acc));
  if (a.numel() == 0) return loss;
  const Shape s = shape_of(a, patch);
  const int blocks = reduce_blocks(s);
  at::Tensor partial = at::empty({2 * blocks}, a.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "pivot_forward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    partial_sums_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        klass.const_data_ptr<int8_t>(), s, acc_t(weight_contour), acc_t(weight_other),
        weight_contour, weight_other, /*logits=*/true, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_kernel<acc_t><<<1, kThreads, 0, stream>>>(partial.const_data_ptr<double>(), blocks,
                                                     nullptr, loss.data_ptr<acc_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> pivot_backward_cuda(const at::Tensor& grad,
                                                       const at::Tensor& logit_a,
                                                       const at::Tensor& logit_b,
                                                       const at::Tensor& klass_in, int64_t patch,
                                                       double weight_contour,
                                                       double weight_other) {
  check_inputs(logit_a, logit_b, klass_in, patch);
  TORCH_CHECK(grad.numel() == 1 && grad.device() == logit_a.device(),
              "pivot_consistency_backward: grad must be a scalar on ", logit_a.device());
  const c10::cuda::CUDAGuard guard(logit_a.device());
  const at::Tensor a = contiguous_if_needed(logit_a), b = contiguous_if_needed(logit_b);
  const at::Tensor klass = contiguous_if_needed(klass_in);
  if (a.numel() == 0) return {at::zeros_like(a), at::zeros_like(b)};
  at::Tensor grad_a = at::empty_like(a), grad_b = at::empty_like(b);
  const Shape s = shape_of(a, patch);
  const int blocks = reduce_blocks(s);
  at::Tensor partial = at::empty({2 * blocks}, a.options().dtype(at::kDouble));
  at::Tensor scale = at::empty({}, a.options().dtype(at::kDouble));
  const at::Tensor grad64 = grad.reshape({}).to(at::kDouble);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "pivot_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Weights only (logits = false): the loss partials stay 0.
    partial_sums_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        klass.const_data_ptr<int8_t>(), s, acc_t(weight_contour), acc_t(weight_other),
        weight_contour, weight_other, /*logits=*/false, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_kernel<acc_t><<<1, kThreads, 0, stream>>>(partial.const_data_ptr<double>(), blocks,
                                                     grad64.const_data_ptr<double>(), nullptr,
                                                     scale.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t pixels = a.numel();
    const unsigned grid = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>(ceil_div(pixels, kThreads), int64_t(1) << 20)));
    gradient_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        klass.const_data_ptr<int8_t>(), s, weight_contour, weight_other,
        scale.const_data_ptr<double>(), grad_a.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_a, grad_b};
}

}  // namespace
}  // namespace pivot
}  // namespace fastiml

TORCH_LIBRARY_IMPL(fastiml, CUDA, m) {
  m.impl("pivot_consistency", &fastiml::pivot::pivot_forward_cuda);
  m.impl("pivot_consistency_backward", &fastiml::pivot::pivot_backward_cuda);
}
