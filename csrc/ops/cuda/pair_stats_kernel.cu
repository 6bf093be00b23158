// pair_stats on the GPU: argument handling and launches. The device code, and the choice of tile
// sizes with its shared-memory and occupancy budget, are in pair_stats_kernel.cuh.
//
// Dtypes: float16 runs on tensor cores (sm_70+; CUDA 13 builds start at sm_75), bfloat16 on
// tensor cores from sm_80 and on the SIMT path before; float32 and float64 on the SIMT path.
// Statistics are float32 (float64 for float64 inputs), gradients in the input dtype.
//
// Self mode (k is None) runs the general algorithm with k = q and returns dq + dk as the single
// gradient: the dq pass writes its result in the accumulation dtype, the dk pass adds it before
// the one rounding to the input dtype. (The CPU kernel instead computes only the tiles on or
// above the diagonal; on the GPU that would need atomics or a second buffer per column tile.)
//
// Host synchronisation: make_codes compacts labels and groups with at::_unique2, which on CUDA
// synchronises once per call (it must learn the number of distinct values); nothing else syncs.
// Deterministic: every output element is written by exactly one thread, in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "ops/cuda/pair_stats_kernel.cuh"
#include "ops/pair_stats.h"
#include "ops/pair_stats_host.h"

namespace fastiml {
namespace pair_stats {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tensor itself when already contiguous, else a contiguous copy.
at::Tensor contiguous_if_needed(const at::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

bool aligned_16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Whether the current device runs `type` on tensor cores (see the top of the file).
bool use_tensor_cores(at::ScalarType type) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (type == at::kHalf) {
    TORCH_CHECK(prop->major >= 7, "pair_stats: float16 on CUDA needs compute capability 7.0 or "
                "newer, got ", prop->major, ".", prop->minor);
    return true;
  }
  return type == at::kBFloat16 && prop->major >= 8;
}

// The operands of one call, ready for the kernels.
struct Problem {
  at::Tensor q, k;  // contiguous; k is q in self mode
  bool self;
  int64_t n, m, d;
  double tau;
  bool exclude_self, negatives_only;
  bool vec;  // 16-byte vector loads possible (16-bit dtypes, d % 8 == 0, aligned pointers)
};

Problem make_problem(const at::Tensor& q, const std::optional<at::Tensor>& k, double tau,
                     bool exclude_self, bool negatives_only) {
  Problem p;
  p.q = contiguous_if_needed(q);
  p.self = !k.has_value();
  p.k = p.self ? p.q : contiguous_if_needed(*k);
  p.n = p.q.size(0);
  p.m = p.k.size(0);
  p.d = p.q.size(1);
  p.tau = tau;
  p.exclude_self = exclude_self;
  p.negatives_only = negatives_only;
  p.vec = p.q.element_size() == 2 && p.d % 8 == 0 && aligned_16(p.q) && aligned_16(p.k);
  return p;
}

template <typename scalar_t, typename acc_t>
void fill_common(gpu::PairInputs<scalar_t, acc_t>& params, const Problem& p, const Codes& codes) {
  params.q = p.q.const_data_ptr<scalar_t>();
  params.k = p.k.const_data_ptr<scalar_t>();
  params.row_label = codes.row_label;
  params.row_group = codes.row_group;
  params.col_label = codes.col_label;
  params.col_group = codes.col_group;
  params.n = p.n;
  params.m = p.m;
  params.d = p.d;
  params.inv_tau = acc_t(1.0 / p.tau);
  params.exclude_self = p.exclude_self;
  params.negatives_only = p.negatives_only;
  params.vec = p.vec;
}

template <typename scalar_t, bool kWmma>
void launch_forward(const Problem& p, const Codes& codes, at::Tensor& lse, at::Tensor& pos_mean,
                    at::Tensor& pos_count) {
  using acc_t = typename gpu::Config<scalar_t, kWmma>::acc_t;
  gpu::ForwardParams<scalar_t, acc_t> params;
  fill_common(params, p, codes);
  params.lse = lse.data_ptr<acc_t>();
  params.pos_mean = pos_mean.data_ptr<acc_t>();
  params.pos_count = pos_count.data_ptr<int64_t>();
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, gpu::kBM)));
  gpu::pair_stats_forward_kernel<scalar_t, kWmma>
      <<<grid, gpu::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The saved statistics and incoming gradients, contiguous in the accumulation dtype.
struct Stats {
  at::Tensor grad_lse, grad_pos_mean, lse, pos_count;
  at::Tensor grad_max;  // tensor cores only: max_i |a_i| + |b_i| (0-dim float32)
};

// One backward pass. kForK = false: dq (blocks own rows); true: dk (blocks own columns).
template <typename scalar_t, bool kWmma, bool kForK>
void launch_backward(const Problem& p, const Codes& codes, const Stats& st,
                     const at::Tensor* add_in, at::Tensor* out_acc, at::Tensor* out) {
  using C = gpu::Config<scalar_t, kWmma>;
  using acc_t = typename C::acc_t;
  gpu::BackwardParams<scalar_t, acc_t> params;
  fill_common(params, p, codes);
  params.grad_lse = st.grad_lse.const_data_ptr<acc_t>();
  params.grad_pos_mean = st.grad_pos_mean.const_data_ptr<acc_t>();
  params.lse = st.lse.const_data_ptr<acc_t>();
  params.pos_count = st.pos_count.const_data_ptr<int64_t>();
  params.grad_max = kWmma ? st.grad_max.const_data_ptr<float>() : nullptr;
  params.add_in = add_in ? add_in->const_data_ptr<acc_t>() : nullptr;
  params.out_acc = out_acc ? out_acc->data_ptr<acc_t>() : nullptr;
  params.out = out ? out->data_ptr<scalar_t>() : nullptr;
  const int64_t own = kForK ? p.m : p.n;
  const int64_t column_blocks = ceil_div(p.d, C::kDV);
  TORCH_CHECK(column_blocks <= 65535, "pair_stats_backward: D = ", p.d, " is too large for the "
              "CUDA kernel (at most ", 65535 * C::kDV, ")");
  const dim3 grid(static_cast<unsigned>(ceil_div(own, gpu::kBM)),
                  static_cast<unsigned>(column_blocks));
  gpu::pair_stats_backward_kernel<scalar_t, kWmma, kForK>
      <<<grid, gpu::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn.template operator()<scalar_t, kWmma>() for q's dtype and the current device.
template <typename Fn>
void dispatch(at::ScalarType type, Fn&& fn) {
  const bool tensor_cores = use_tensor_cores(type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "pair_stats_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half>) {
      fn.template operator()<scalar_t, true>();
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (tensor_cores)
        fn.template operator()<scalar_t, true>();
      else
        fn.template operator()<scalar_t, false>();
    } else {
      fn.template operator()<scalar_t, false>();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_stats_cuda(
    const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& q_label,
    const std::optional<at::Tensor>& k_label, const std::optional<at::Tensor>& q_group,
    const std::optional<at::Tensor>& k_group, double tau, bool exclude_self, bool negatives_only,
    int64_t ignore_index) {
  check_pair_stats_inputs(q, k, q_label, k_label, q_group, k_group, tau, exclude_self);
  TORCH_CHECK(q.is_cuda(), "pair_stats: q must be a CUDA tensor here, got ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  const int64_t n = q.size(0), m = k.has_value() ? k->size(0) : n;
  at::Tensor lse = at::empty({n}, q.options().dtype(acc));
  at::Tensor pos_mean = at::empty({n}, q.options().dtype(acc));
  at::Tensor pos_count = at::empty({n}, q.options().dtype(at::kLong));
  if (n == 0) return {lse, pos_mean, pos_count};
  if (m == 0) {  // every denominator is empty, no row has a positive
    lse.fill_(-std::numeric_limits<double>::infinity());
    pos_mean.zero_();
    pos_count.zero_();
    return {lse, pos_mean, pos_count};
  }
  const Problem p = make_problem(q, k, tau, exclude_self, negatives_only);
  const CodeTensors codes = make_codes(q_label, k_label, q_group, k_group, ignore_index);
  dispatch(q.scalar_type(), [&]<typename scalar_t, bool kWmma>() {
    launch_forward<scalar_t, kWmma>(p, codes.view(), lse, pos_mean, pos_count);
  });
  return {lse, pos_mean, pos_count};
}

std::tuple<at::Tensor, at::Tensor> pair_stats_backward_cuda(
    const at::Tensor& grad_lse, const at::Tensor& grad_pos_mean, const at::Tensor& q,
    const std::optional<at::Tensor>& k, const at::Tensor& q_label,
    const std::optional<at::Tensor>& k_label, const std::optional<at::Tensor>& q_group,
    const std::optional<at::Tensor>& k_group, const at::Tensor& lse, const at::Tensor& pos_count,
    double tau, bool exclude_self, bool negatives_only, int64_t ignore_index, bool q_needs_grad,
    bool k_needs_grad) {
  check_pair_stats_inputs(q, k, q_label, k_label, q_group, k_group, tau, exclude_self);
  check_pair_stats_grads(grad_lse, grad_pos_mean, lse, pos_count, q.size(0));
  TORCH_CHECK(q.is_cuda(), "pair_stats_backward: q must be a CUDA tensor here, got ", q.device());
  for (const at::Tensor* t : {&grad_lse, &grad_pos_mean, &lse, &pos_count})
    TORCH_CHECK(t->device() == q.device(), "pair_stats_backward: statistics and their gradients "
                "must be on ", q.device(), ", got ", t->device());
  const c10::cuda::CUDAGuard guard(q.device());
  const bool self = !k.has_value();
  const bool want_q = q_needs_grad, want_k = k_needs_grad && !self;
  const int64_t n = q.size(0), m = self ? n : k->size(0), d = q.size(1);
  // Unrequested gradients come back as empty tensors (the schema returns Tensors).
  at::Tensor grad_q = at::empty({0}, q.options()), grad_k = at::empty({0}, q.options());
  if (n == 0 || m == 0 || d == 0) {  // nothing to multiply: zero gradients
    if (want_q) grad_q = at::zeros({n, d}, q.options());
    if (want_k) grad_k = at::zeros({m, d}, q.options());
    return {grad_q, grad_k};
  }
  if (!want_q && !want_k) return {grad_q, grad_k};

  const Problem p = make_problem(q, k, tau, exclude_self, negatives_only);
  const CodeTensors codes = make_codes(q_label, k_label, q_group, k_group, ignore_index);
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  Stats st;
  st.grad_lse = contiguous_if_needed(grad_lse.to(acc));
  st.grad_pos_mean = contiguous_if_needed(grad_pos_mean.to(acc));
  st.lse = contiguous_if_needed(lse.to(acc));
  st.pos_count = contiguous_if_needed(pos_count);
  if (use_tensor_cores(q.scalar_type())) {
    // The bound of |G| that sets the range scale of the 16-bit G tiles (as row_grad computes a
    // and b); a device scalar, read by the kernels: no host sync.
    const at::Tensor a = at::where(st.lse > -std::numeric_limits<double>::infinity(),
                                   st.grad_lse, at::zeros_like(st.grad_lse));
    const at::Tensor b = at::where(st.pos_count > 0,
                                   st.grad_pos_mean / st.pos_count.clamp_min(1).to(acc),
                                   at::zeros_like(st.grad_pos_mean));
    st.grad_max = (a.abs() + b.abs()).amax().to(at::kFloat);
  }

  dispatch(q.scalar_type(), [&]<typename scalar_t, bool kWmma>() {
    if (self) {
      // grad = dq + dk of the general problem with k = q: the dq pass leaves its result in the
      // accumulation dtype, the dk pass adds it and rounds once.
      at::Tensor partial = at::empty({n, d}, q.options().dtype(acc));
      grad_q = at::empty({n, d}, q.options());
      launch_backward<scalar_t, kWmma, false>(p, codes.view(), st, nullptr, &partial, nullptr);
      launch_backward<scalar_t, kWmma, true>(p, codes.view(), st, &partial, nullptr, &grad_q);
      return;
    }
    if (want_q) {
      grad_q = at::empty({n, d}, q.options());
      launch_backward<scalar_t, kWmma, false>(p, codes.view(), st, nullptr, nullptr, &grad_q);
    }
    if (want_k) {
      grad_k = at::empty({m, d}, q.options());
      launch_backward<scalar_t, kWmma, true>(p, codes.view(), st, nullptr, nullptr, &grad_k);
    }
  });
  return {grad_q, grad_k};
}

}  // namespace
}  // namespace pair_stats
}  // namespace fastiml

TORCH_LIBRARY_IMPL(fastiml, CUDA, m) {
  m.impl("pair_stats", &fastiml::pair_stats::pair_stats_cuda);
  m.impl("pair_stats_backward", &fastiml::pair_stats::pair_stats_backward_cuda);
  m.impl("pair_stats_tile_schedule", &fastiml::pair_stats::tile_schedule_op);
}
