// pair_softplus on the CPU (DESIGN 9): tiles of rows spread over threads, each walking the
// column tiles; a tile's similarities come from one float32 (float64 for double inputs) matrix
// product, half inputs converted a tile at a time. Only tiles that can hold a positive pair are
// computed: a tile is skipped when its rows' and columns' label codes (sorted, so SimCLR's
// "view 1 of i, view 2 of i" batches give narrow ranges) or group codes do not intersect.
// Backward: dq from a pass over row tiles, dk from a pass over column tiles, each thread owning
// its output rows: no atomics, deterministic for a given number of threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/cpu/capability.h"
#include "ops/pair_softplus.h"
#include "ops/pair_softplus_host.h"

namespace FASTIML_NAMESPACE {
namespace pair_softplus {
namespace {

using pair_stats::Codes;
using pair_stats::CodeTensors;
using pair_stats::PairMask;
using pair_stats::pair_mask;

constexpr int64_t kTile = 256;

// Calls fn(ii, jj, x = L_i - s_ij) for every positive pair of an active row in the tile whose
// raw products (before 1/tau) are s.
template <typename acc_t, typename Fn>
void for_positive_pairs(const acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc,
                        const Codes& codes, const acc_t* lse, acc_t inv_tau, bool exclude_self,
                        Fn fn) {
  for (int64_t ii = 0; ii < br; ++ii) {
    const int64_t i = r0 + ii;
    const int32_t li = codes.row_label[i], gi = codes.row_group[i];
    if (!row_active(gi, lse[i])) continue;
    const int32_t self_j = pair_stats::self_column(exclude_self, i, c0, bc);
    for (int64_t jj = 0; jj < bc; ++jj) {
      const PairMask pm = pair_mask(li, gi, codes.col_label[c0 + jj], codes.col_group[c0 + jj],
                                    jj == self_j, false);
      if (pm.pos) fn(ii, jj, lse[i] - s[ii * bc + jj] * inv_tau);
    }
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Problem& p, const Codes& codes,
                                                const at::Tensor& lse_in) {
  const auto options = p.q.options().dtype(p.acc);
  at::Tensor total = at::zeros({p.n}, options), weight = at::zeros({p.n}, options);
  const at::Tensor lse_c = lse_in.contiguous();
  const acc_t* lse = lse_c.data_ptr<acc_t>();
  acc_t* total_p = total.data_ptr<acc_t>();
  acc_t* weight_p = weight.data_ptr<acc_t>();
  const acc_t inv_tau = acc_t(1.0 / p.tau);
  const TileFilter filter(p, codes, kTile);
  const int64_t row_tiles = ceil_div(p.n, kTile), col_tiles = ceil_div(p.m, kTile);
  at::parallel_for(0, row_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kTile * kTile}, options);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t r0 = r * kTile, br = std::min(kTile, p.n - r0);
      at::Tensor qr;  // converted on first use: most tiles of a SimCLR batch are skipped
      for (int64_t c = 0; c < col_tiles; ++c) {
        if (!filter.may_have_positive(r, c)) continue;
        const int64_t c0 = c * kTile, bc = std::min(kTile, p.m - c0);
        if (!qr.defined()) qr = tile_rows(p.q, r0, br, p.acc);
        at::Tensor S = buffer.narrow(0, 0, br * bc).view({br, bc});
        at::mm_out(S, qr, tile_rows(p.k, c0, bc, p.acc).t());
        for_positive_pairs<acc_t>(S.data_ptr<acc_t>(), r0, br, c0, bc, codes, lse, inv_tau,
                                  p.exclude_self, [&](int64_t ii, int64_t, acc_t x) {
                                    const auto t = softplus_sigmoid(x);
                                    total_p[r0 + ii] += t.softplus;
                                    weight_p[r0 + ii] += t.sigmoid;
                                  });
      }
    }
  });
  return {total, weight};
}

// dq (for_k false) or dk (for_k true), before the self-contrast sum: G_ij = -g_i sigmoid(x_ij)
// over positive pairs, grad = G K / tau or G^T Q / tau.
template <typename acc_t>
at::Tensor backward_pass(const Problem& p, const Codes& codes, const acc_t* lse,
                         const acc_t* grad_total, bool for_k) {
  const auto options = p.q.options().dtype(p.acc);
  const int64_t own_len = for_k ? p.m : p.n, other_len = for_k ? p.n : p.m;
  const int64_t own_tiles = ceil_div(own_len, kTile), other_tiles = ceil_div(other_len, kTile);
  at::Tensor grad = at::zeros({own_len, p.d}, options);
  const acc_t inv_tau = acc_t(1.0 / p.tau);
  const TileFilter filter(p, codes, kTile);
  at::parallel_for(0, own_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kTile * kTile}, options);
    std::vector<acc_t> g(kTile * kTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = t * kTile, bo = std::min(kTile, own_len - o0);
      at::Tensor own = grad.narrow(0, o0, bo);
      for (int64_t u = 0; u < other_tiles; ++u) {
        if (!filter.may_have_positive(for_k ? u : t, for_k ? t : u)) continue;
        const int64_t x0 = u * kTile, bx = std::min(kTile, other_len - x0);
        const int64_t r0 = for_k ? x0 : o0, br = for_k ? bx : bo;
        const int64_t c0 = for_k ? o0 : x0, bc = for_k ? bo : bx;
        at::Tensor qr = tile_rows(p.q, r0, br, p.acc), kc = tile_rows(p.k, c0, bc, p.acc);
        at::Tensor S = buffer.narrow(0, 0, br * bc).view({br, bc});
        at::mm_out(S, qr, kc.t());
        // G (zero off the positive pairs) replaces S.
        acc_t* s = S.data_ptr<acc_t>();
        std::fill(g.begin(), g.begin() + br * bc, acc_t(0));
        for_positive_pairs<acc_t>(s, r0, br, c0, bc, codes, lse, inv_tau, p.exclude_self,
                                  [&](int64_t ii, int64_t jj, acc_t x) {
                                    g[ii * bc + jj] =
                                        -grad_total[r0 + ii] * softplus_sigmoid(x).sigmoid;
                                  });
        std::copy(g.begin(), g.begin() + br * bc, s);
        if (for_k)
          own.addmm_(S.t(), qr);
        else
          own.addmm_(S, kc);
      }
    }
  });
  return grad.mul_(inv_tau);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pair_softplus_cpu(
    const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& q_label,
    const std::optional<at::Tensor>& k_label, const std::optional<at::Tensor>& q_group,
    const std::optional<at::Tensor>& k_group, const at::Tensor& lse, double tau,
    bool exclude_self, int64_t ignore_index) {
  pair_stats::check_pair_stats_inputs(q, k, q_label, k_label, q_group, k_group, tau,
                                      exclude_self);
  check_row_statistic(lse, "lse", q, "pair_softplus");
  const Problem p = make_problem(q, k, tau, exclude_self);
  const CodeTensors codes = pair_stats::make_codes(q_label, k_label, q_group, k_group,
                                                   ignore_index);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "pair_softplus_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    out = forward_impl<acc_t>(p, codes.view(), lse);
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_softplus_backward_cpu(
    const at::Tensor& grad_total, const at::Tensor& q, const std::optional<at::Tensor>& k,
    const at::Tensor& q_label, const std::optional<at::Tensor>& k_label,
    const std::optional<at::Tensor>& q_group, const std::optional<at::Tensor>& k_group,
    const at::Tensor& lse, double tau, bool exclude_self, int64_t ignore_index,
    bool q_needs_grad, bool k_needs_grad) {
  pair_stats::check_pair_stats_inputs(q, k, q_label, k_label, q_group, k_group, tau,
                                      exclude_self);
  check_row_statistic(lse, "lse", q, "pair_softplus_backward");
  check_row_statistic(grad_total, "grad_total", q, "pair_softplus_backward");
  const Problem p = make_problem(q, k, tau, exclude_self);
  const CodeTensors codes = pair_stats::make_codes(q_label, k_label, q_group, k_group,
                                                   ignore_index);
  at::Tensor grad_q, grad_k;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "pair_softplus_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor l = lse.contiguous(), g = grad_total.contiguous();
        const acc_t* lp = l.data_ptr<acc_t>();
        const acc_t* gp = g.data_ptr<acc_t>();
        if (p.self) {  // one set: q's gradient is dq + dk
          if (q_needs_grad)
            grad_q = backward_pass<acc_t>(p, codes.view(), lp, gp, false)
                         .add_(backward_pass<acc_t>(p, codes.view(), lp, gp, true));
        } else {
          if (q_needs_grad) grad_q = backward_pass<acc_t>(p, codes.view(), lp, gp, false);
          if (k_needs_grad) grad_k = backward_pass<acc_t>(p, codes.view(), lp, gp, true);
        }
      });
  // Gradients in the input dtype; unrequested ones as empty tensors (the schema returns Tensors).
  grad_q = grad_q.defined() ? grad_q.to(q.scalar_type()) : at::empty({0}, q.options());
  grad_k = grad_k.defined() ? grad_k.to(q.scalar_type()) : at::empty({0}, q.options());
  return {grad_q, grad_k};
}

}  // namespace pair_softplus
}  // namespace fastiml

// Registered once, by the base build; each op runs the kernel of the CPU level in force.
#if !defined(FASTIML_CPU_CAPABILITY)
FASTIML_CPU_DECLARE_LEVELS(pair_softplus, pair_softplus_cpu)
FASTIML_CPU_DECLARE_LEVELS(pair_softplus, pair_softplus_backward_cpu)

TORCH_LIBRARY_IMPL(fastiml, CPU, m) {
  m.impl("pair_softplus", FASTIML_CPU_DISPATCH(pair_softplus, pair_softplus_cpu));
  m.impl("pair_softplus_backward", FASTIML_CPU_DISPATCH(pair_softplus, pair_softplus_backward_cpu));
}
#endif
