// clip_lse, siglip_loss and row_lse on the GPU (DESIGN 11): host code composing ATen ops (cuBLAS
// GEMMs, ATen's reductions and pointwise kernels) on chunks of rows, not hand-written kernels. Each
// chunk of `rows` rows forms its [rows, M] block of products in float32 (float64 for double
// inputs), so memory is O(rows M) -- a few such blocks of at most kChunkElements -- never N x M.
// The CPU kernels (ops/cpu/clip_siglip_kernel.cpp) compute the same sums tile by tile; this file
// trades their fused epilogues for code that is obviously right.
//
// Host synchronisation: none (the scale and bias stay on the device as 0-dim tensors).
// Deterministic: chunks run in a fixed order on one stream; ATen's reductions and GEMMs here use
// no atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <utility>

#include "ops/clip_siglip_host.h"

namespace fastiml {
namespace clip_siglip {
namespace {

constexpr int64_t kChunkElements = int64_t(1) << 24;  // 64 MB of float32 per [rows, M] block

int64_t chunk_rows(int64_t m) {
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(m, 1));
}

// Calls block(r0, qa, P) for each chunk of rows of q: qa the chunk's rows and P = qa ka^T
// ([rows, M]), both in ka's dtype (the accumulation dtype).
template <typename Block>
void for_each_row_chunk(const at::Tensor& q, const at::Tensor& ka, Block block) {
  const int64_t n = q.size(0), m = ka.size(0);
  for (int64_t r0 = 0; r0 < n; r0 += chunk_rows(m)) {
    const at::Tensor qa = q.narrow(0, r0, std::min(chunk_rows(m), n - r0)).to(ka.scalar_type());
    block(r0, qa, at::mm(qa, ka.t()));
  }
}

// The backward walk of both ops: for each block of rows, P = Q_r K^T (accumulation dtype) and
// its G = grad_block(r0, P) (dloss/dlogit), then dQ = t G K and dK = t G^T Q where asked for.
// Returns (grad_q, grad_k), undefined where not asked for.
template <typename GradBlock>
std::pair<at::Tensor, at::Tensor> feature_grads(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& scale, bool q_needs_grad,
                                                bool k_needs_grad, GradBlock grad_block) {
  const auto acc = at::toOpMathType(q.scalar_type());
  const auto options = q.options().dtype(acc);
  const int64_t n = q.size(0), m = k.size(0);
  const at::Tensor ka = k.to(acc);
  at::Tensor grad_q = q_needs_grad ? at::empty({n, q.size(1)}, options) : at::Tensor();
  at::Tensor grad_k = k_needs_grad ? at::zeros({m, k.size(1)}, options) : at::Tensor();
  for_each_row_chunk(q, ka, [&](int64_t r0, const at::Tensor& qa, const at::Tensor& P) {
    const at::Tensor G = grad_block(r0, P);
    if (q_needs_grad) {
      at::Tensor out = grad_q.narrow(0, r0, qa.size(0));
      at::mm_out(out, G, ka);
    }
    if (k_needs_grad) grad_k.addmm_(G.t(), qa);
  });
  if (q_needs_grad) grad_q.mul_(scale);
  if (k_needs_grad) grad_k.mul_(scale);
  return {grad_q, grad_k};
}

// SigLIP's x = -z * logit for the rows [r0, r0 + rows) against every column, from their
// products P: the logit itself for negatives, its negation on the positives, which lie on the
// block's diagonal at offset r0 + offset (`diagonal`).
at::Tensor signed_logits(const at::Tensor& P, const at::Tensor& scale, const at::Tensor& bias,
                         int64_t diagonal) {
  at::Tensor x = P * scale + bias;
  x.diagonal(diagonal).neg_();
  return x;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_lse_cuda(const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& scale) {
  check_features(q, k, "clip_lse");
  check_scalar(scale, "scale", q, "clip_lse");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = at::toOpMathType(q.scalar_type());
  const int64_t n = q.size(0), m = k.size(0);
  const at::Tensor ka = k.to(acc);
  at::Tensor row_lse = at::empty({n}, q.options().dtype(acc));
  at::Tensor col_lse = at::full({m}, -std::numeric_limits<double>::infinity(),
                                q.options().dtype(acc));
  at::Tensor diag = at::empty({std::min(n, m)}, q.options().dtype(acc));
  for_each_row_chunk(q, ka, [&](int64_t r0, const at::Tensor& qa, const at::Tensor& P) {
    const at::Tensor& S = P.mul_(scale);  // in place: one [rows, M] block alive
    row_lse.narrow(0, r0, qa.size(0)).copy_(at::logsumexp(S, {1}));
    col_lse = at::logaddexp(col_lse, at::logsumexp(S, {0}));
    const at::Tensor own = S.diagonal(r0);  // S_ii of the block's rows (i < M)
    diag.narrow(0, r0, own.size(0)).copy_(own);
  });
  return {row_lse, col_lse, diag};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_lse_backward_cuda(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_diag,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& row_lse,
    const at::Tensor& col_lse, bool q_needs_grad, bool k_needs_grad, bool scale_needs_grad) {
  check_backward_inputs(grad_row, grad_col, grad_diag, q, k, scale, row_lse, col_lse);
  const c10::cuda::CUDAGuard guard(q.device());
  // G = g_r e^(S - r) + g_c e^(S - c) + g_d [i == j]; dQ = t G K, dK = t G^T Q, dt = sum G P.
  at::Tensor grad_scale = at::zeros({}, scale.options());
  const auto [grad_q, grad_k] = feature_grads(
      q, k, scale, q_needs_grad, k_needs_grad, [&](int64_t r0, const at::Tensor& P) {
        const int64_t rows = P.size(0);
        const at::Tensor S = P * scale;
        at::Tensor G = at::exp(S - row_lse.narrow(0, r0, rows).unsqueeze(1))
                           .mul_(grad_row.narrow(0, r0, rows).unsqueeze(1))
                           .add_(at::exp(S - col_lse.unsqueeze(0)).mul_(grad_col.unsqueeze(0)));
        at::Tensor own = G.diagonal(r0);
        own.add_(grad_diag.narrow(0, r0, own.size(0)));
        if (scale_needs_grad) grad_scale.add_((G * P).sum());
        return G;
      });
  return {grad_or_empty(grad_q, q), grad_or_empty(grad_k, k),
          scale_needs_grad ? grad_scale : at::empty({0}, scale.options())};
}

at::Tensor siglip_loss_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                            const at::Tensor& bias, int64_t offset) {
  check_siglip_inputs(q, k, scale, bias, offset, "siglip_loss");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = at::toOpMathType(q.scalar_type());
  const at::Tensor ka = k.to(acc);
  at::Tensor loss = at::zeros({}, q.options().dtype(acc));
  for_each_row_chunk(q, ka, [&](int64_t r0, const at::Tensor&, const at::Tensor& P) {
    const at::Tensor x = signed_logits(P, scale, bias, r0 + offset);
    // softplus(x) = max(x, 0) + log1p(e^-|x|), exact (at::softplus returns x beyond x = 20).
    loss.add_((at::relu(x) + at::log1p(at::exp(-at::abs(x)))).sum());
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& bias, int64_t offset, bool q_needs_grad, bool k_needs_grad,
    bool scalars_need_grad) {
  check_siglip_inputs(q, k, scale, bias, offset, "siglip_loss_backward");
  check_scalar(grad, "grad", q, "siglip_loss_backward");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor grad_scale = at::zeros({}, scale.options()), grad_bias = at::zeros({}, bias.options());
  const auto [grad_q, grad_k] = feature_grads(
      q, k, scale, q_needs_grad, k_needs_grad, [&](int64_t r0, const at::Tensor& P) {
        // G = grad * dloss/dlogit = grad * (-z) sigmoid(x)
        at::Tensor G = at::sigmoid(signed_logits(P, scale, bias, r0 + offset)).mul_(grad);
        G.diagonal(r0 + offset).neg_();
        if (scalars_need_grad) {
          grad_scale.add_((G * P).sum());
          grad_bias.add_(G.sum());
        }
        return G;
      });
  return {grad_or_empty(grad_q, q), grad_or_empty(grad_k, k),
          scalars_need_grad ? grad_scale : at::empty({0}, scale.options()),
          scalars_need_grad ? grad_bias : at::empty({0}, bias.options())};
}

std::tuple<at::Tensor, at::Tensor> row_lse_cuda(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& scale, bool with_mean) {
  check_features(q, k, "row_lse");
  check_scalar(scale, "scale", q, "row_lse");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = at::toOpMathType(q.scalar_type());
  const int64_t n = q.size(0);
  const at::Tensor ka = k.to(acc);
  at::Tensor lse = at::empty({n}, q.options().dtype(acc));
  at::Tensor mean = with_mean ? at::empty({n, q.size(1)}, q.options().dtype(acc))
                              : at::empty({0}, q.options().dtype(acc));
  for_each_row_chunk(q, ka, [&](int64_t r0, const at::Tensor& qa, const at::Tensor& P) {
    const at::Tensor& S = P.mul_(scale);  // in place: one [rows, M] block alive
    const at::Tensor block_lse = at::logsumexp(S, {1}, /*keepdim=*/true);
    lse.narrow(0, r0, qa.size(0)).copy_(block_lse.squeeze(1));
    if (with_mean) {  // softmax rows times k; M = 0 gives [rows, 0] x [0, D] = zeros
      at::Tensor out = mean.narrow(0, r0, qa.size(0));
      at::mm_out(out, at::exp(S - block_lse), ka);
    }
  });
  return {lse, mean};
}

}  // namespace clip_siglip
}  // namespace fastiml

TORCH_LIBRARY_IMPL(fastiml, CUDA, m) {
  m.impl("clip_lse", &fastiml::clip_siglip::clip_lse_cuda);
  m.impl("clip_lse_backward", &fastiml::clip_siglip::clip_lse_backward_cuda);
  m.impl("siglip_loss", &fastiml::clip_siglip::siglip_loss_cuda);
  m.impl("siglip_loss_backward", &fastiml::clip_siglip::siglip_loss_backward_cuda);
  m.impl("row_lse", &fastiml::clip_siglip::row_lse_cuda);
}
