// pair_softplus on the GPU (DESIGN 9, NT-Xent's positive-pair sum): the CPU kernel's algorithm
// with the tile products on cuBLAS (at::mm_out into one reused float32 tile buffer; half inputs
// on tensor cores with float32 accumulation) and the per-tile epilogues as CUDA kernels. The
// same tile filter as the CPU's skips tiles that cannot hold a positive pair (a SimCLR batch
// computes about one column tile per row tile).
//
// TF32: off for the call (FullFloat32Products), so s_ij matches pair_stats' lse.
// Host synchronisation: one per pass -- the tile filter reads the codes on the host (one copy
// of n + m int32 codes), since the host loop decides which tile products to launch; nothing
// else syncs (make_codes compacts labels by a sort).
// Deterministic: tiles run in a fixed order on one stream, each row's sum over a tile is a
// fixed-order block reduction, and the gradients come from GEMMs without atomics.
// Memory: O((N + M)·D) (the backward's operands in float32 for half inputs) plus one kTile x
// kTile float tile, never N x M.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/pair_softplus.h"
#include "ops/pair_softplus_host.h"

namespace fastiml {
namespace pair_softplus {
namespace {

using pair_stats::Codes;
using pair_stats::CodeTensors;
using pair_stats::PairMask;
using pair_stats::pair_mask;

constexpr int64_t kTile = 1024;  // 4 MB float32 tile: large enough for cuBLAS to run near peak
// Under the test hook FASTIML_CUDA_FORCE_TILES=multi (ops/pair_stats_host.h): tiles of 64, so
// that the tile loops, the tile filter, the reused buffer and the sums across tiles run at the
// sizes of `fastiml selftest`.
constexpr int64_t kTestTile = 64;

int64_t tile_size() {
  return pair_stats::forced_tiles() == pair_stats::ForcedTiles::kMulti ? kTestTile : kTile;
}
constexpr int kThreads = 256;    // epilogue block size (a power of two for the reduction)

// The tile products in full float32 whatever torch.backends.cuda.matmul.allow_tf32 says (set
// for the call, restored after): each s_ij meets the lse that pair_stats computed from its own
// float32 products, and a TF32 s_ij (~1e-3 relative) would not cancel against it. The flag is
// process-wide, so a matmul on another host thread during the call also runs without TF32.
class FullFloat32Products {
 public:
  FullFloat32Products() : tf32_(at::globalContext().allowTF32CuBLAS()) {
    if (tf32_) at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~FullFloat32Products() {
    if (tf32_) at::globalContext().setAllowTF32CuBLAS(true);
  }
  FullFloat32Products(const FullFloat32Products&) = delete;
  FullFloat32Products& operator=(const FullFloat32Products&) = delete;

 private:
  bool tf32_;
};

// The positive pair (i, j) of an active row: L_i - s_ij, or nothing.
template <typename acc_t>
__device__ __forceinline__ bool positive_x(const Codes& codes, int64_t i, int64_t j, acc_t lse_i,
                                           acc_t s_raw, acc_t inv_tau, bool exclude_self,
                                           acc_t& x) {
  const int32_t gi = codes.row_group[i];
  if (!row_active(gi, lse_i)) return false;
  const PairMask pm = pair_mask(codes.row_label[i], gi, codes.col_label[j], codes.col_group[j],
                                exclude_self && i == j, false);
  x = lse_i - s_raw * inv_tau;
  return pm.pos != 0;
}

// One block per row of the tile: adds the row's softplus and sigmoid sums over the tile's
// columns to total[i] and weight[i] (only this block writes row i during this launch).
template <typename acc_t>
__global__ void forward_epilogue(const acc_t* __restrict__ s, int64_t r0, int64_t c0, int64_t bc,
                                 Codes codes, const acc_t* __restrict__ lse, acc_t inv_tau,
                                 bool exclude_self, acc_t* __restrict__ total,
                                 acc_t* __restrict__ weight) {
  const int64_t ii = blockIdx.x, i = r0 + ii;
  const acc_t lse_i = lse[i];
  acc_t sp = 0, sg = 0;
  for (int64_t jj = threadIdx.x; jj < bc; jj += blockDim.x) {
    acc_t x;
    if (positive_x(codes, i, c0 + jj, lse_i, s[ii * bc + jj], inv_tau, exclude_self, x)) {
      const auto t = softplus_sigmoid(x);
      sp += t.softplus;
      sg += t.sigmoid;
    }
  }
  __shared__ acc_t sh_sp[kThreads], sh_sg[kThreads];
  sh_sp[threadIdx.x] = sp;
  sh_sg[threadIdx.x] = sg;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {  // fixed order: deterministic
    if (threadIdx.x < w) {
      sh_sp[threadIdx.x] += sh_sp[threadIdx.x + w];
      sh_sg[threadIdx.x] += sh_sg[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    total[i] += sh_sp[0];
    weight[i] += sh_sg[0];
  }
}

// In place: the tile's raw products s become G_ij = -g_i sigmoid(L_i - s_ij) on positive pairs,
// 0 elsewhere.
template <typename acc_t>
__global__ void backward_epilogue(acc_t* __restrict__ s, int64_t r0, int64_t br, int64_t c0,
                                  int64_t bc, Codes codes, const acc_t* __restrict__ lse,
                                  const acc_t* __restrict__ grad_total, acc_t inv_tau,
                                  bool exclude_self) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= br * bc) return;
  const int64_t i = r0 + idx / bc, j = c0 + idx % bc;
  acc_t x, g = 0;
  if (positive_x(codes, i, j, lse[i], s[idx], inv_tau, exclude_self, x))
    g = -grad_total[i] * softplus_sigmoid(x).sigmoid;
  s[idx] = g;
}

CodeTensors codes_on_host(const CodeTensors& c) {
  return {c.row_label.cpu(), c.row_group.cpu(), c.col_label.cpu(), c.col_group.cpu()};
}

// The operands in the accumulation dtype for the backward's gradient products, converted once
// per call (O((N + M) D) more memory for half inputs) rather than once per tile pair.
Problem in_accumulation_dtype(Problem p) {
  p.q = p.q.to(p.acc);
  p.k = p.self ? p.q : p.k.to(p.acc);
  return p;
}

// S = qr kc^T in S's dtype (the accumulation dtype): half inputs on tensor cores with float32
// accumulation and output (aten::mm.dtype, as pair_stats' own half products), float32 /
// float64 inputs as they are (full float32: FullFloat32Products).
void tile_products(at::Tensor& S, const at::Tensor& qr, const at::Tensor& kc) {
  if (qr.scalar_type() == S.scalar_type())
    at::mm_out(S, qr, kc.t());
  else
    at::mm_out(S, qr, kc.t(), S.scalar_type());
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Problem& p, const CodeTensors& codes,
                                                const at::Tensor& lse_in) {
  const auto options = p.q.options().dtype(p.acc);
  at::Tensor total = at::zeros({p.n}, options), weight = at::zeros({p.n}, options);
  if (p.n == 0 || p.m == 0) return {total, weight};
  const at::Tensor lse = lse_in.contiguous();
  const CodeTensors host = codes_on_host(codes);
  const int64_t tile = tile_size();
  const TileFilter filter(p, host.view(), tile);
  const acc_t inv_tau = acc_t(1.0 / p.tau);
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor buffer = at::empty({std::min(tile, p.n) * std::min(tile, p.m)}, options);
  for (int64_t r = 0; r < ceil_div(p.n, tile); ++r) {
    const int64_t r0 = r * tile, br = std::min(tile, p.n - r0);
    at::Tensor qr;  // taken on first use: most tiles of a SimCLR batch are skipped
    for (int64_t c = 0; c < ceil_div(p.m, tile); ++c) {
      if (!filter.may_have_positive(r, c)) continue;
      const int64_t c0 = c * tile, bc = std::min(tile, p.m - c0);
      if (!qr.defined()) qr = p.q.narrow(0, r0, br);
      at::Tensor S = buffer.narrow(0, 0, br * bc).view({br, bc});
      tile_products(S, qr, p.k.narrow(0, c0, bc));
      forward_epilogue<acc_t><<<br, kThreads, 0, stream>>>(
          S.data_ptr<acc_t>(), r0, c0, bc, codes.view(), lse.data_ptr<acc_t>(), inv_tau,
          p.exclude_self, total.data_ptr<acc_t>(), weight.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return {total, weight};
}

// dq (for_k false) or dk (for_k true), before the self-contrast sum: grad = G K / tau or
// G^T Q / tau, one tile product after another; S from p's operands (the input dtype), the
// gradient products from pa's (the accumulation dtype).
template <typename acc_t>
at::Tensor backward_pass(const Problem& p, const Problem& pa, const CodeTensors& codes,
                         const TileFilter& filter, int64_t tile, const at::Tensor& lse,
                         const at::Tensor& grad_total, bool for_k) {
  const auto options = p.q.options().dtype(p.acc);
  const int64_t own_len = for_k ? p.m : p.n, other_len = for_k ? p.n : p.m;
  at::Tensor grad = at::zeros({own_len, p.d}, options);
  if (p.n == 0 || p.m == 0) return grad;
  const acc_t inv_tau = acc_t(1.0 / p.tau);
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor buffer = at::empty({std::min(tile, p.n) * std::min(tile, p.m)}, options);
  for (int64_t t = 0; t < ceil_div(own_len, tile); ++t) {
    const int64_t o0 = t * tile, bo = std::min(tile, own_len - o0);
    at::Tensor own = grad.narrow(0, o0, bo);
    for (int64_t u = 0; u < ceil_div(other_len, tile); ++u) {
      if (!filter.may_have_positive(for_k ? u : t, for_k ? t : u)) continue;
      const int64_t x0 = u * tile, bx = std::min(tile, other_len - x0);
      const int64_t r0 = for_k ? x0 : o0, br = for_k ? bx : bo;
      const int64_t c0 = for_k ? o0 : x0, bc = for_k ? bo : bx;
      at::Tensor S = buffer.narrow(0, 0, br * bc).view({br, bc});
      tile_products(S, p.q.narrow(0, r0, br), p.k.narrow(0, c0, bc));
      const at::Tensor qr = pa.q.narrow(0, r0, br), kc = pa.k.narrow(0, c0, bc);
      const int64_t blocks = ceil_div(br * bc, kThreads);
      backward_epilogue<acc_t><<<blocks, kThreads, 0, stream>>>(
          S.data_ptr<acc_t>(), r0, br, c0, bc, codes.view(), lse.data_ptr<acc_t>(),
          grad_total.data_ptr<acc_t>(), inv_tau, p.exclude_self);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (for_k)
        own.addmm_(S.t(), qr);
      else
        own.addmm_(S, kc);
    }
  }
  return grad.mul_(inv_tau);
}

std::tuple<at::Tensor, at::Tensor> pair_softplus_cuda(
    const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& q_label,
    const std::optional<at::Tensor>& k_label, const std::optional<at::Tensor>& q_group,
    const std::optional<at::Tensor>& k_group, const at::Tensor& lse, double tau,
    bool exclude_self, int64_t ignore_index) {
  pair_stats::check_pair_stats_inputs(q, k, q_label, k_label, q_group, k_group, tau,
                                      exclude_self);
  check_row_statistic(lse, "lse", q, "pair_softplus");
  const c10::cuda::CUDAGuard guard(q.device());
  const FullFloat32Products full_float32;
  const Problem p = make_problem(q, k, tau, exclude_self);
  const CodeTensors codes = pair_stats::make_codes(q_label, k_label, q_group, k_group,
                                                   ignore_index);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "pair_softplus_cuda", [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    out = forward_impl<acc_t>(p, codes, lse);
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_softplus_backward_cuda(
    const at::Tensor& grad_total, const at::Tensor& q, const std::optional<at::Tensor>& k,
    const at::Tensor& q_label, const std::optional<at::Tensor>& k_label,
    const std::optional<at::Tensor>& q_group, const std::optional<at::Tensor>& k_group,
    const at::Tensor& lse, double tau, bool exclude_self, int64_t ignore_index,
    bool q_needs_grad, bool k_needs_grad) {
  pair_stats::check_pair_stats_inputs(q, k, q_label, k_label, q_group, k_group, tau,
                                      exclude_self);
  check_row_statistic(lse, "lse", q, "pair_softplus_backward");
  check_row_statistic(grad_total, "grad_total", q, "pair_softplus_backward");
  const c10::cuda::CUDAGuard guard(q.device());
  const FullFloat32Products full_float32;
  const Problem p = make_problem(q, k, tau, exclude_self), pa = in_accumulation_dtype(p);
  const CodeTensors codes = pair_stats::make_codes(q_label, k_label, q_group, k_group,
                                                   ignore_index);
  const CodeTensors host = codes_on_host(codes);
  const int64_t tile = tile_size();
  const TileFilter filter(p, host.view(), tile);
  const at::Tensor l = lse.contiguous(), g = grad_total.contiguous();
  at::Tensor grad_q, grad_k;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "pair_softplus_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (p.self) {  // one set: q's gradient is dq + dk
          if (q_needs_grad)
            grad_q = backward_pass<acc_t>(p, pa, codes, filter, tile, l, g, false)
                         .add_(backward_pass<acc_t>(p, pa, codes, filter, tile, l, g, true));
        } else {
          if (q_needs_grad)
            grad_q = backward_pass<acc_t>(p, pa, codes, filter, tile, l, g, false);
          if (k_needs_grad)
            grad_k = backward_pass<acc_t>(p, pa, codes, filter, tile, l, g, true);
        }
      });
  // Gradients in the input dtype; unrequested ones as empty tensors (the schema returns Tensors).
  grad_q = grad_q.defined() ? grad_q.to(q.scalar_type()) : at::empty({0}, q.options());
  grad_k = grad_k.defined() ? grad_k.to(q.scalar_type()) : at::empty({0}, q.options());
  return {grad_q, grad_k};
}

}  // namespace
}  // namespace pair_softplus
}  // namespace fastiml

TORCH_LIBRARY_IMPL(fastiml, CUDA, m) {
  m.impl("pair_softplus", &fastiml::pair_softplus::pair_softplus_cuda);
  m.impl("pair_softplus_backward", &fastiml::pair_softplus::pair_softplus_backward_cuda);
}
