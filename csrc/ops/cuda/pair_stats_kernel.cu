// pair_stats on the GPU: argument handling and launches. The device code, and the choice of tile
// sizes with its shared-memory and occupancy budget, are in pair_stats_kernel.cuh.
//
// Dtypes: float16 runs on tensor cores (sm_70+; CUDA 13 builds start at sm_75), bfloat16 on
// tensor cores from sm_80 and on the SIMT path before; float32 and float64 on the SIMT path.
// Statistics are float32 (float64 for float64 inputs), gradients in the input dtype.
//
// Work: the tile schedule of ops/pair_stats_host.h (the CPU kernel walks the same one): tile
// pairs that share no group are skipped, and every pass splits the other tiles' range when it
// has fewer than two blocks per SM (the forward's partial log-sum-exps and the backward's
// partial gradient tiles are summed in split order by small merge kernels: deterministic).
// The test hook FASTIML_CUDA_FORCE_TILES (see min_items_for_device) forces no split or the
// largest one, so that tests reach the multi-tile paths at small N.
//
// Self mode (k is None) runs the general algorithm with k = q and returns dq + dk as the single
// gradient: the dq pass writes its result in the accumulation dtype, the dk pass adds it before
// the one rounding to the input dtype. It therefore does about twice the work of the CPU
// kernel, which computes only the tiles on or above the diagonal (on the GPU that needs atomics
// or a second buffer per column tile: not done yet).
//
// Host synchronisation: none. make_codes compacts labels and groups by a sort (not unique,
// which must learn its count on the host), and the tile schedule is walked by each block from
// the per-tile group ranges (TileCursor in ops/pair_stats.h), which a small kernel computes on
// the device; the grid size depends only on the tile counts. `fastiml selftest` checks that
// the forward and the backward run under torch.cuda.set_sync_debug_mode without a sync.
// Deterministic: every output element is written by exactly one thread, in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
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

// Whether bf16 runs on tensor cores: decided by the code that was compiled for this device, not
// by the device's compute capability -- a build with only compute_75 PTX, JIT-compiled on an
// sm_80+ device, has the bf16 tensor-core kernels compiled as __trap() (__CUDA_ARCH__ < 800).
// ptxVersion is the virtual architecture the loaded kernel was compiled from (x10).
bool bf16_tensor_cores_compiled();

// Whether the current device runs `type` on tensor cores (see the top of the file).
bool use_tensor_cores(at::ScalarType type) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (type == at::kHalf) {
    TORCH_CHECK(prop->major >= 7, "pair_stats: float16 on CUDA needs compute capability 7.0 or "
                "newer, got ", prop->major, ".", prop->minor);
    return true;
  }
  return type == at::kBFloat16 && bf16_tensor_cores_compiled();
}

bool bf16_tensor_cores_compiled() {
  cudaFuncAttributes forward{}, backward{};
  if (cudaFuncGetAttributes(&forward, gpu::pair_stats_forward_kernel<c10::BFloat16, true>) !=
          cudaSuccess ||
      cudaFuncGetAttributes(&backward,
                            gpu::pair_stats_backward_kernel<c10::BFloat16, true, false>) !=
          cudaSuccess) {
    (void)cudaGetLastError();  // no image for this device: the SIMT launch will say so
    return false;
  }
  return forward.ptxVersion >= 80 && backward.ptxVersion >= 80;
}

// The group ranges of the row tiles and of the column tiles (GroupRange, ops/pair_stats.h),
// computed on the device from the group codes: all a pass's tile schedule needs. kBM == kBN, so
// the dk pass (blocks own column tiles) uses the same two tensors with their roles swapped.
static_assert(gpu::kBM == gpu::kBN, "the backward passes share the tile ranges");
static_assert(sizeof(GroupRange) == 2 * sizeof(int32_t), "GroupRange is stored as int32 pairs");

struct TileRanges {
  at::Tensor rows, cols;  // int32 [tiles, 2] on the device; cols is rows in self mode
};

at::Tensor device_group_ranges(const at::Tensor& groups) {
  const int64_t n = groups.size(0), tiles = ceil_div(n, gpu::kBM);
  at::Tensor ranges = at::empty({tiles, 2}, groups.options());
  if (tiles == 0) return ranges;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(tiles, 256), 4096));
  gpu::tile_group_ranges_kernel<<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      groups.const_data_ptr<int32_t>(), n, gpu::kBM, tiles,
      reinterpret_cast<GroupRange*>(ranges.data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ranges;
}

TileRanges tile_ranges(const CodeTensors& codes, bool self) {
  TileRanges r;
  r.rows = device_group_ranges(codes.row_group);
  r.cols = self ? r.rows : device_group_ranges(codes.col_group);
  return r;
}

// A pass's schedule: the own and other tiles' ranges, and the split, which depends only on the
// tile counts (schedule_splits): the grid size is known on the host without reading the GPU.
struct DeviceSchedule {
  at::Tensor own, other;
  int64_t splits = 1, items = 0;
  gpu::ScheduleView view() const {
    return {reinterpret_cast<const GroupRange*>(own.const_data_ptr<int32_t>()),
            reinterpret_cast<const GroupRange*>(other.const_data_ptr<int32_t>()), other.size(0),
            splits};
  }
};

DeviceSchedule device_schedule(const at::Tensor& own, const at::Tensor& other,
                               int64_t min_items) {
  DeviceSchedule d;
  d.own = own;
  d.other = other;
  d.splits = schedule_splits(own.size(0), other.size(0), min_items);
  d.items = own.size(0) * d.splits;
  return d;
}

// Work items that fill the GPU: two blocks per SM. At every size `fastiml selftest` and the
// tests use (<= ~600 rows: <= 10 tiles, against 264 items on a 132-SM device) that splits each
// list into single tiles, so the multi-tile paths would only run at N >= 2 x SMs x 64. The test
// hook FASTIML_CUDA_FORCE_TILES (forced_min_items in ops/pair_stats_host.h; never set in normal
// use) overrides the rule: "multi" gives min_items = 1 (no split, each block walks its whole
// list), "single" splits every list into runs of one tile.
int64_t min_items_for_device() {
  return forced_min_items(
      2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount));
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
void launch_forward(const Problem& p, const CodeTensors& codes, const TileRanges& ranges,
                    at::Tensor& lse, at::Tensor& pos_mean, at::Tensor& pos_count) {
  using acc_t = typename gpu::Config<scalar_t, kWmma>::acc_t;
  const DeviceSchedule schedule = device_schedule(ranges.rows, ranges.cols, min_items_for_device());
  const auto part_options = lse.options();
  const at::Tensor part_max = at::empty({schedule.splits, p.n}, part_options);
  const at::Tensor part_sum = at::empty({schedule.splits, p.n}, part_options);
  const at::Tensor part_pos_sum = at::empty({schedule.splits, p.n}, part_options);
  const at::Tensor part_pos_count = at::empty({schedule.splits, p.n}, pos_count.options());
  gpu::ForwardParams<scalar_t, acc_t> params;
  fill_common(params, p, codes.view());
  params.schedule = schedule.view();
  params.part_max = part_max.data_ptr<acc_t>();
  params.part_sum = part_sum.data_ptr<acc_t>();
  params.part_pos_sum = part_pos_sum.data_ptr<acc_t>();
  params.part_pos_count = part_pos_count.data_ptr<int64_t>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(schedule.items <= std::numeric_limits<int32_t>::max(), "pair_stats: too many tiles");
  gpu::pair_stats_forward_kernel<scalar_t, kWmma>
      <<<static_cast<unsigned>(schedule.items), gpu::kThreads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gpu::MergeParams<acc_t> merge{part_max.const_data_ptr<acc_t>(),
                                part_sum.const_data_ptr<acc_t>(),
                                part_pos_sum.const_data_ptr<acc_t>(),
                                part_pos_count.const_data_ptr<int64_t>(),
                                p.n,
                                schedule.splits,
                                lse.data_ptr<acc_t>(),
                                pos_mean.data_ptr<acc_t>(),
                                pos_count.data_ptr<int64_t>()};
  const unsigned merge_blocks =
      static_cast<unsigned>(std::min<int64_t>(ceil_div(p.n, 256), int64_t(1) << 16));
  gpu::pair_stats_merge_kernel<acc_t><<<merge_blocks, 256, 0, stream>>>(merge);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The saved statistics and incoming gradients, contiguous in the accumulation dtype.
struct Stats {
  at::Tensor grad_lse, grad_pos_mean, lse, pos_count;
  at::Tensor q_max;  // dk pass on tensor cores only: max_ij |q_ij| (0-dim float32), its scale
};

// The schedule of one backward pass. kForK = false: dq (blocks own row tiles); true: dk
// (blocks own column tiles); each walks the other tiles that share a group. grid.y covers D in
// kDV columns, so the schedule needs that many times fewer items. In self mode (the column
// ranges are the row ranges) both passes have the same schedule.
template <typename scalar_t, bool kWmma, bool kForK>
DeviceSchedule backward_schedule(const Problem& p, const TileRanges& ranges) {
  using C = gpu::Config<scalar_t, kWmma>;
  const int64_t column_blocks = ceil_div(p.d, C::kDV);
  TORCH_CHECK(column_blocks <= 65535, "pair_stats_backward: D = ", p.d, " is too large for the "
              "CUDA kernel (at most ", 65535 * C::kDV, ")");
  const int64_t min_items = ceil_div(min_items_for_device(), column_blocks);
  DeviceSchedule schedule = kForK ? device_schedule(ranges.cols, ranges.rows, min_items)
                                  : device_schedule(ranges.rows, ranges.cols, min_items);
  TORCH_CHECK(schedule.items <= std::numeric_limits<int32_t>::max(),
              "pair_stats_backward: too many tiles");
  return schedule;
}

// One backward pass over `schedule` (backward_schedule<..., kForK>). kForK = false: dq;
// true: dk.
template <typename scalar_t, bool kWmma, bool kForK>
void launch_backward(const Problem& p, const CodeTensors& codes, const Stats& st,
                     const DeviceSchedule& schedule, const at::Tensor* add_in,
                     at::Tensor* out_acc, at::Tensor* out) {
  using C = gpu::Config<scalar_t, kWmma>;
  using acc_t = typename C::acc_t;
  const int64_t own = kForK ? p.m : p.n;
  const int64_t column_blocks = ceil_div(p.d, C::kDV);
  // Split items write partial gradient tiles, summed in split order after the kernel. At most
  // (min_items + own tiles) x 64 x d floats: ~17 MB at d = 128 on a 132-SM device.
  at::Tensor part;
  if (schedule.splits > 1) part = at::empty({schedule.splits, own, p.d}, st.lse.options());
  gpu::BackwardParams<scalar_t, acc_t> params;
  fill_common(params, p, codes.view());
  params.schedule = schedule.view();
  params.grad_lse = st.grad_lse.const_data_ptr<acc_t>();
  params.grad_pos_mean = st.grad_pos_mean.const_data_ptr<acc_t>();
  params.lse = st.lse.const_data_ptr<acc_t>();
  params.pos_count = st.pos_count.const_data_ptr<int64_t>();
  params.q_max = kWmma && kForK ? st.q_max.const_data_ptr<float>() : nullptr;
  params.part = part.defined() ? part.data_ptr<acc_t>() : nullptr;
  params.add_in = add_in ? add_in->const_data_ptr<acc_t>() : nullptr;
  params.out_acc = out_acc ? out_acc->data_ptr<acc_t>() : nullptr;
  params.out = out ? out->data_ptr<scalar_t>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(schedule.items), static_cast<unsigned>(column_blocks));
  gpu::pair_stats_backward_kernel<scalar_t, kWmma, kForK>
      <<<grid, gpu::kThreads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!part.defined()) return;
  gpu::BackwardMergeParams<scalar_t, acc_t> merge{part.const_data_ptr<acc_t>(),
                                                  own * p.d,
                                                  schedule.splits,
                                                  params.add_in,
                                                  params.out_acc,
                                                  params.out};
  const unsigned merge_blocks =
      static_cast<unsigned>(std::min<int64_t>(ceil_div(own * p.d, 256), int64_t(1) << 16));
  gpu::pair_stats_backward_merge_kernel<scalar_t, acc_t><<<merge_blocks, 256, 0, stream>>>(merge);
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
  const TileRanges ranges = tile_ranges(codes, p.self);
  dispatch(q.scalar_type(), [&]<typename scalar_t, bool kWmma>() {
    launch_forward<scalar_t, kWmma>(p, codes, ranges, lse, pos_mean, pos_count);
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
  const TileRanges ranges = tile_ranges(codes, self);
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  Stats st;
  st.grad_lse = contiguous_if_needed(grad_lse.to(acc));
  st.grad_pos_mean = contiguous_if_needed(grad_pos_mean.to(acc));
  st.lse = contiguous_if_needed(lse.to(acc));
  st.pos_count = contiguous_if_needed(pos_count);
  if (use_tensor_cores(q.scalar_type()) && (self || want_k)) {
    // Bounds the dk pass's sums of 16-bit G tiles (TileRangeScale); a device scalar, read by
    // the kernel: no host sync. The infinity norm is one reduction (no |q| temporary) and
    // exact: the largest |q_ij| is one of q's own values.
    st.q_max = at::linalg_vector_norm(p.q, std::numeric_limits<double>::infinity())
                   .to(at::kFloat);
  }

  dispatch(q.scalar_type(), [&]<typename scalar_t, bool kWmma>() {
    if (self) {
      // grad = dq + dk of the general problem with k = q: the dq pass leaves its result in the
      // accumulation dtype, the dk pass adds it and rounds once.
      at::Tensor partial = at::empty({n, d}, q.options().dtype(acc));
      grad_q = at::empty({n, d}, q.options());
      const DeviceSchedule both = backward_schedule<scalar_t, kWmma, false>(p, ranges);
      launch_backward<scalar_t, kWmma, false>(p, codes, st, both, nullptr, &partial, nullptr);
      launch_backward<scalar_t, kWmma, true>(p, codes, st, both, &partial, nullptr, &grad_q);
      return;
    }
    if (want_q) {
      grad_q = at::empty({n, d}, q.options());
      launch_backward<scalar_t, kWmma, false>(p, codes, st,
                                              backward_schedule<scalar_t, kWmma, false>(p, ranges),
                                              nullptr, nullptr, &grad_q);
    }
    if (want_k) {
      grad_k = at::empty({m, d}, q.options());
      launch_backward<scalar_t, kWmma, true>(p, codes, st,
                                             backward_schedule<scalar_t, kWmma, true>(p, ranges),
                                             nullptr, nullptr, &grad_k);
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
  m.impl("pair_stats_range_exponents", &fastiml::pair_stats::range_exponents_op);
}
